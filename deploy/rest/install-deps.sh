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
bash "$(dirname "$0")/../local/apt-install.sh" "the REST sidecar" "${missing[@]}"
