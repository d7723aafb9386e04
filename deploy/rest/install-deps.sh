#!/usr/bin/env bash
# Installs what deploy/rest/build.sh needs to build the REST sidecar, from Debian packages (Go 1.19,
# grpc-gateway 1.6.4 and its Go sources, grpc-go, golang/protobuf, protoc), when they are missing.
# Uses apt when running as root or with passwordless sudo; otherwise says what is missing and exits 0, so that
# `make install` / `make run` go on and the mesh serves gRPC only (the launcher skips an unbuilt sidecar).
set -euo pipefail

GOCODE=/usr/share/gocode/src
missing=()
command -v go >/dev/null || missing+=(golang-go)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v protoc-gen-grpc-gateway >/dev/null || missing+=(golang-grpc-gateway)
[ -d "$GOCODE/github.com/grpc-ecosystem/grpc-gateway/runtime" ] || missing+=(golang-github-grpc-ecosystem-grpc-gateway-dev)
[ -d "$GOCODE/google.golang.org/grpc/health" ] || missing+=(golang-google-grpc-dev)
{ command -v protoc-gen-go >/dev/null && [ -d "$GOCODE/github.com/golang/protobuf/ptypes/wrappers" ]; } \
  || missing+=(golang-goprotobuf-dev)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "llmserve: the REST sidecar needs ${missing[*]} (Debian package names) and this system has no apt-get;" >&2
  echo "llmserve: skipping it, the mesh serves gRPC only." >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "llmserve: the REST sidecar needs these packages: ${missing[*]} (no root or sudo to install them with apt)." >&2
  echo "llmserve: install them (sudo apt-get install ${missing[*]}) and run \`make rest\`; until then the mesh serves gRPC only." >&2
  exit 0
fi
echo "llmserve: installing ${missing[*]} with apt (for the REST sidecar)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
