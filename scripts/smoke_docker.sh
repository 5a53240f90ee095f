#!/usr/bin/env bash
# make smoke-docker: the images and the node-image all_in_one cluster, for real, on this machine.
#
# Starts a private Docker engine (docs/development.md: no bridge, no iptables, state under
# $DOCKER_BASE), builds a Debian base image with debootstrap (no image registry is reachable;
# the rootfs tarball is cached in .run/docker-cache), builds the proxy and node images from it with
# the legacy builder on the host network, brings up all_in_one/all_in_one_node.yml (every container
# network_mode: host, bound to 127.0.0.1 on free ports), runs probe_test.py and a search through
# the proxy, and tears everything down: compose down, dockerd stopped by its PID, mounts
# undone, state removed. Exit code 0 only if both probes passed. Slow: minutes, not seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
B="${DOCKER_BASE:-$ROOT/.run/docker}"      # short: unix socket paths are length-limited
CACHE="$ROOT/.run/docker-cache"
BASE_IMAGE=mishards-base:bookworm
PROXY_IMAGE=mishards:smoke
NODE_IMAGE=mishards-node:smoke
PROJECT=mishards-smoke
COMPOSE=(docker-compose -p "$PROJECT" -f all_in_one/all_in_one_node.yml)
DOCKERD_PID=""

step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

archive_url() {
  # The Debian archive apt is configured with (deb822 sources first, then sources.list).
  if [ -n "${DEBIAN_ARCHIVE_URL:-}" ]; then echo "$DEBIAN_ARCHIVE_URL"; return; fi
  local url
  url="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  [ -n "$url" ] || url="$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  echo "${url:-http://deb.debian.org/debian}"
}

teardown() {
  local rc=$?
  step "teardown"
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    if [ "$rc" -ne 0 ]; then
      timeout 60 "${COMPOSE[@]}" ps || true
      timeout 60 "${COMPOSE[@]}" logs --no-color --tail=40 || true
    fi
    timeout 120 "${COMPOSE[@]}" down -v --timeout 10 || echo "compose down failed"
    local containerd_pid=""
    [ -f "$B/exec/containerd/containerd.pid" ] && containerd_pid="$(cat "$B/exec/containerd/containerd.pid")"
    kill "$DOCKERD_PID"
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then echo "dockerd still up after 30 s: SIGKILL"; kill -9 "$DOCKERD_PID"; fi
    if [ -n "$containerd_pid" ] && kill -0 "$containerd_pid" 2>/dev/null; then
      kill "$containerd_pid"; sleep 2; kill -0 "$containerd_pid" 2>/dev/null && kill -9 "$containerd_pid"
    fi
    echo "dockerd (pid $DOCKERD_PID) stopped"
  fi
  # dockerd leaves an nsfs mount (and overlays, after a crash) under its state: innermost first.
  awk -v b="$B" '$5 == b || index($5, b "/") == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r mnt; do
    umount "$mnt" || umount -l "$mnt" || echo "could not unmount $mnt"
  done
  rm -rf "$B"
  echo "removed $B"
  echo "smoke-docker: $([ "$rc" -eq 0 ] && echo PASSED || echo "FAILED (exit $rc)")"
  exit "$rc"
}

step "tools"
scripts/install_docker_tools.sh engine
dockerd --version; docker --version; docker-compose --version

step "start dockerd in $B"
[ ! -e "$B/dockerd.pid" ] || { echo "a dockerd from an earlier run may be up ($B/dockerd.pid); stop it first" >&2; exit 1; }
rm -rf "$B"; mkdir -p "$B" "$CACHE"
export DOCKER_HOST="unix://$B/docker.sock" DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
dockerd --bridge=none --iptables=false --ip6tables=false \
  --data-root "$B/root" --exec-root "$B/exec" \
  -H "$DOCKER_HOST" --pidfile "$B/dockerd.pid" >"$B/dockerd.log" 2>&1 &
DOCKERD_PID=$!
trap teardown EXIT
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; kill -0 "$DOCKERD_PID" || break; sleep 0.5; done
docker info --format 'engine {{.ServerVersion}}, storage {{.Driver}}, cgroup {{.CgroupVersion}}' \
  || { echo "dockerd did not come up:"; tail -n 30 "$B/dockerd.log"; exit 1; }

step "base image $BASE_IMAGE"
if [ ! -s "$CACHE/base-bookworm.tar" ]; then
  rootfs="$CACHE/rootfs"; rm -rf "$rootfs"
  echo "debootstrap from $(archive_url) (about a minute)"
  timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    bookworm "$rootfs" "$(archive_url)" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -n 30 "$CACHE/debootstrap.log"; exit 1; }
  # The host's CA bundle, so pip inside the build trusts what the host trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb
  tar -C "$rootfs" -cf "$CACHE/base-bookworm.tar.tmp" . && mv "$CACHE/base-bookworm.tar.tmp" "$CACHE/base-bookworm.tar"
  rm -rf "$rootfs"
else
  echo "cached: $CACHE/base-bookworm.tar"
fi
docker import "$CACHE/base-bookworm.tar" "$BASE_IMAGE" >/dev/null
docker run --rm --network none "$BASE_IMAGE" python3 --version

step "build $PROXY_IMAGE and $NODE_IMAGE"
for spec in "$PROXY_IMAGE:Dockerfile" "$NODE_IMAGE:Dockerfile.node"; do
  image="${spec%:*}"; file="${spec##*:}"
  echo "$file -> $image (log: $CACHE/build-$file.log)"
  start=$SECONDS
  timeout 1200 docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$image" -f "$file" . \
    >"$CACHE/build-$file.log" 2>&1 || { tail -n 40 "$CACHE/build-$file.log"; exit 1; }
  echo "built in $((SECONDS - start)) s"
done
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^mishards'
echo "proxy runs as: $(docker run --rm --network none "$PROXY_IMAGE" id -un)"

step "compose up (node image, network_mode: host)"
MISHARDS_PORT="$(free_port)"; MILVUS_WR_PORT="$(free_port)"; MILVUS_RO_PORT="$(free_port)"
export MISHARDS_PORT MILVUS_WR_PORT MILVUS_RO_PORT MISHARDS_IMAGE="$PROXY_IMAGE" MILVUS_NODE_IMAGE="$NODE_IMAGE"
echo "mishards 127.0.0.1:$MISHARDS_PORT, writable :$MILVUS_WR_PORT, read-only :$MILVUS_RO_PORT"
timeout 300 "${COMPOSE[@]}" up -d
echo "networks: $(docker network ls --format '{{.Name}}/{{.Driver}}' | tr '\n' ' ')"
proxy_id="$("${COMPOSE[@]}" ps -q mishards)"
status=""
for _ in $(seq 90); do
  status="$(docker inspect -f '{{.State.Health.Status}}' "$proxy_id")"
  [ "$status" = healthy ] && break
  sleep 2
done
"${COMPOSE[@]}" ps
[ "$status" = healthy ] || { echo "mishards is $status after 180 s"; exit 1; }

step "probe_test.py through mishards"
docker run --rm --network host "$PROXY_IMAGE" python all_in_one/probe_test.py --host 127.0.0.1 --port "$MISHARDS_PORT"
step "probe_test.py --search through mishards"
docker run --rm --network host "$PROXY_IMAGE" python all_in_one/probe_test.py --host 127.0.0.1 --port "$MISHARDS_PORT" --search
step "topology as the proxy sees it (Cmd conn_stats)"
docker run --rm --network host "$PROXY_IMAGE" python -c '
import sys, grpc
from milvus_grpc import milvus_pb2, milvus_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    print(milvus_pb2_grpc.MilvusServiceStub(channel).Cmd(milvus_pb2.Command(cmd="conn_stats"), timeout=5).string_reply)
' "127.0.0.1:$MISHARDS_PORT"
