#!/usr/bin/env bash
# The Kubernetes demo: Mishards over MySQL, one writable and N read-only Milvus 0.9.1 nodes,
# everything in one namespace. Run it from any directory.
#
#   start.sh cluster              create everything and wait until it is ready (= baseup + appup)
#   start.sh render DIR           write the manifests as they would be applied into DIR, apply nothing
#   start.sh baseup | appup       the two halves: namespace, storage, config, MySQL | Milvus, RBAC, proxy
#   start.sh status               pods, services and volume claims of the demo
#   start.sh address              "HOST PORT" of the proxy's LoadBalancer (for make probe_cluster)
#   start.sh scale-ro-server N    N read-only nodes; back to the previous count if not ready in time
#   start.sh scale-proxy N        N proxies; the same
#   start.sh appdown              delete the proxy, RBAC and the Milvus nodes; keep data and MySQL
#   start.sh delete | cleanup     delete everything, data included
#
# Settings (environment variables), the one place to change them:
#   NAMESPACE (mishards)           every object's namespace, and the proxy's discovery namespace
#   PROXY_IMAGE (mishards:latest)  the proxy image (make build push REGISTRY=...); PULL_POLICY (IfNotPresent)
#   MYSQL_PASSWORD (milvusroot)    MySQL's root password, kept in Secret mishards-mysql-secret
#   STORAGE_CLASS (cluster default) class of the two ReadWriteMany claims (mishards-db-disk,
#                                  mishards-log-disk): it must offer ReadWriteMany (NFS, CephFS, ...)
#   KUBECTL (kubectl); ROLLOUT_TIMEOUT (300s) bounds every wait
set -euo pipefail
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")"

NS="${NAMESPACE:-mishards}"
PROXY_IMAGE="${PROXY_IMAGE:-mishards:latest}"
PULL_POLICY="${PULL_POLICY:-IfNotPresent}"
MYSQL_PASSWORD="${MYSQL_PASSWORD:-milvusroot}"
STORAGE_CLASS="${STORAGE_CLASS:-}"
KUBECTL="${KUBECTL:-kubectl}"
ROLLOUT_TIMEOUT="${ROLLOUT_TIMEOUT:-300s}"
BASE=(mishards_namespace.yaml mishards_data_pvc.yaml mishards_secret.yaml mishards_configmap.yaml mishards_auxiliary.yaml)
APP=(mishards_write_servers.yaml mishards_stateful_servers.yaml mishards_rbac.yaml mishards_proxy.yaml)

k() { "$KUBECTL" "$@"; }

check_settings() {
  [[ "$NS" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || { echo "NAMESPACE must be a DNS label, got '$NS'" >&2; exit 2; }
  [[ "$PROXY_IMAGE" =~ ^[A-Za-z0-9._/:@-]+$ ]] || { echo "PROXY_IMAGE is not an image name: '$PROXY_IMAGE'" >&2; exit 2; }
  [[ "$PULL_POLICY" =~ ^(Always|IfNotPresent|Never)$ ]] || { echo "PULL_POLICY must be Always, IfNotPresent or Never" >&2; exit 2; }
  [[ "$MYSQL_PASSWORD" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "MYSQL_PASSWORD: letters, digits, . _ - only" >&2; exit 2; }
  [[ -z "$STORAGE_CLASS" || "$STORAGE_CLASS" =~ ^[a-z0-9.-]+$ ]] || { echo "STORAGE_CLASS is not a class name" >&2; exit 2; }
}

# One manifest with the settings above filled in, on stdout.
render_file() {
  local storage=""
  [ -z "$STORAGE_CLASS" ] || storage="storageClassName: $STORAGE_CLASS"
  sed -e "s|^\(\s*namespace:\) mishards\$|\1 $NS|" \
      -e "s|^\(\s*DISCOVERY_KUBERNETES_NAMESPACE:\) mishards\$|\1 $NS|" \
      -e "s|^\(\s*image:\) mishards:latest\$|\1 $PROXY_IMAGE|" \
      -e "s|^\(\s*imagePullPolicy:\) IfNotPresent  # proxy\$|\1 $PULL_POLICY  # proxy|" \
      -e "s|milvusroot|$MYSQL_PASSWORD|g" \
      -e "${storage:+s|# storageClassName: .*\$|$storage|}" \
      "$1" | if [ "$1" = mishards_namespace.yaml ]; then sed "s|^\(  name:\) mishards\$|\1 $NS|"; else cat; fi
}

# Every manifest rendered into a directory (a fresh temporary one unless given).
RENDERED=""
render_all() {
  local f
  check_settings
  RENDERED="${1:-$(mktemp -d "${TMPDIR:-/tmp}/mishards-k8s.XXXXXX")}"
  mkdir -p "$RENDERED"
  for f in "${BASE[@]}" "${APP[@]}"; do render_file "$f" > "$RENDERED/$f"; done
}

apply() {
  local f
  [ -n "$RENDERED" ] || render_all
  for f in "$@"; do k apply -f "$RENDERED/$f"; done
}

rollout() { k rollout status "$1" -n "$NS" --timeout="$ROLLOUT_TIMEOUT"; }

baseup() {
  apply "${BASE[@]}"
  rollout deployment/mishards-mysql
}

appup() {
  apply mishards_write_servers.yaml
  rollout deployment/mishards-wo-servers
  apply mishards_stateful_servers.yaml
  rollout statefulset/mishards-ro-servers
  apply mishards_rbac.yaml mishards_proxy.yaml
  rollout deployment/mishards-proxy
}

delete_files() {
  local i
  [ -n "$RENDERED" ] || render_all
  for ((i = $# ; i > 0 ; i--)); do k delete -f "$RENDERED/${!i}" --ignore-not-found; done
}

status() {
  k get pods -n "$NS" -o wide
  k get services,pvc -n "$NS"
}

address() {
  local ingress port
  ingress="$(k get service mishards-proxy-servers -n "$NS" \
    -o jsonpath='{.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}')"
  port="$(k get service mishards-proxy-servers -n "$NS" -o jsonpath='{.spec.ports[0].port}')"
  if [ -z "$ingress" ]; then
    echo "service mishards-proxy-servers has no LoadBalancer address yet" >&2
    return 1
  fi
  echo "$ingress $port"
}

# scale KIND/NAME N: set the replicas, wait, and restore the previous count if the wait fails.
scale() {
  local target="$1" count="$2" previous
  if ! [[ "$count" =~ ^[0-9]+$ ]]; then
    echo "replica count must be a non-negative integer, got '$count'" >&2
    return 2
  fi
  previous="$(k get "$target" -n "$NS" -o jsonpath='{.spec.replicas}')"
  k scale "$target" -n "$NS" --replicas="$count"
  if ! rollout "$target"; then
    echo "$target not ready with $count replicas; back to $previous" >&2
    k scale "$target" -n "$NS" --replicas="$previous"
    return 1
  fi
}

usage() {
  sed -n '2,25s/^# \{0,1\}//p' "$SCRIPT" >&2
  exit 2
}

cleanup_rendered() { case "$RENDERED" in "${TMPDIR:-/tmp}"/mishards-k8s.*) rm -rf "$RENDERED" ;; esac; }
trap cleanup_rendered EXIT

case "${1:-}" in
  render) [ $# -eq 2 ] || usage; render_all "$2"; echo "rendered into $2 (namespace $NS, proxy image $PROXY_IMAGE)" ;;
  cluster | allup) baseup; appup ;;
  baseup) baseup ;;
  appup) appup ;;
  status) status ;;
  address) address ;;
  scale-ro-server) [ $# -eq 2 ] || usage; scale statefulset/mishards-ro-servers "$2" ;;
  scale-proxy) [ $# -eq 2 ] || usage; scale deployment/mishards-proxy "$2" ;;
  appdown) delete_files "${APP[@]}" ;;
  delete | cleanup) delete_files "${BASE[@]}" "${APP[@]}" ;;
  *) usage ;;
esac
