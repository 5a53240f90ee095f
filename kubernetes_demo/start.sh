#!/usr/bin/env bash
# The Kubernetes demo: Mishards over MySQL, one writable and N read-only Milvus 0.9.1 nodes,
# everything in namespace "mishards".
#
#   start.sh cluster              create everything and wait until it is ready (= baseup + appup)
#   start.sh baseup | appup       the two halves: namespace, storage, config, MySQL | Milvus, RBAC, proxy
#   start.sh status               pods, services and volume claims of the demo
#   start.sh address              "HOST PORT" of the proxy's LoadBalancer (for make probe_cluster)
#   start.sh scale-ro-server N    N read-only nodes; back to the previous count if not ready in time
#   start.sh scale-proxy N        N proxies; the same
#   start.sh appdown              delete the proxy, RBAC and the Milvus nodes; keep data and MySQL
#   start.sh delete | cleanup     delete everything, data included
#
# KUBECTL names the kubectl to use; ROLLOUT_TIMEOUT (default 300s) bounds every wait.
set -euo pipefail
cd "$(dirname "$0")"

NS=mishards
KUBECTL="${KUBECTL:-kubectl}"
ROLLOUT_TIMEOUT="${ROLLOUT_TIMEOUT:-300s}"
BASE=(mishards_namespace.yaml mishards_data_pvc.yaml mishards_configmap.yaml mishards_auxiliary.yaml)
APP=(mishards_write_servers.yaml mishards_stateful_servers.yaml mishards_rbac.yaml mishards_proxy.yaml)

k() { "$KUBECTL" "$@"; }

apply() { local f; for f in "$@"; do k apply -f "$f"; done; }

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
  for ((i = $# ; i > 0 ; i--)); do k delete -f "${!i}" --ignore-not-found; done
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
  sed -n '2,16s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

case "${1:-}" in
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
