#!/usr/bin/env bash
# scripts/install_docker_tools.sh [compose|engine]
#   compose: Debian's docker-compose 1.29.2 only, to validate compose files offline (tests, CI).
#   engine:  also the docker.io engine, containerd, runc and debootstrap (make smoke-docker).
# Installs only what is missing; needs root and Debian's package archive (docs/development.md).
set -euo pipefail
what="${1:-compose}"
case "$what" in
  compose) need=(docker-compose) ;;
  engine) need=(docker-compose docker.io containerd runc debootstrap) ;;
  *) echo "usage: $0 [compose|engine]" >&2; exit 2 ;;
esac
missing=()
for pkg in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
timeout 300 apt-get update -qq
timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
