#!/usr/bin/env bash
# Builds deploy/rest/bin/llmserve-rest, the OpenAI-compatible REST sidecar, fully offline:
#   1. protoc (Debian's) generates the Go messages + gRPC client (protoc-gen-go 1.3.5) and the grpc-gateway v1
#      reverse proxy (protoc-gen-grpc-gateway 1.6.4) from protos/llmserve/inference/v1/inference.proto;
#   2. the generated files and the hand-written deploy/rest/*.go become one `main` package under
#      deploy/rest/build/ (git-ignored), so the hand-written code can replace the generated forwarders;
#   3. `go build` in GOPATH mode against Debian's /usr/share/gocode (no module downloads).
# Skips everything when the binary is newer than every input (--force rebuilds; --test generates and runs the
# Go tests, deploy/rest/*_test.go, against a fake gateway, without touching the binary). Exit codes: 0 built or up to date, 2 toolchain missing
# (deploy/rest/install-deps.sh installs it), 1 anything else.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REST="$ROOT/deploy/rest"
BUILD="$REST/build"
BIN="$REST/bin/llmserve-rest"
GOCODE="${LLMSERVE_GOCODE:-/usr/share/gocode}"
GATEWAY_SRC="$GOCODE/src/github.com/grpc-ecosystem/grpc-gateway"
PROTO=llmserve/inference/v1/inference.proto

MODE="${1:-}"
case "$MODE" in ""|--force|--test) ;; *) echo "usage: $0 [--force|--test]" >&2; exit 1 ;; esac
inputs=("$ROOT/protos/$PROTO" "$REST/build.sh" "$REST"/*.go "$REST/openapi.json")
if [ -z "$MODE" ] && [ -x "$BIN" ]; then
  newer=$(find "${inputs[@]}" -newer "$BIN" -print -quit)
  if [ -z "$newer" ]; then
    echo "llmserve-rest: up to date ($BIN)"
    exit 0
  fi
fi

missing=()
command -v go >/dev/null || missing+=("go (golang-go)")
command -v protoc >/dev/null || missing+=("protoc (protobuf-compiler)")
command -v protoc-gen-go >/dev/null || missing+=("protoc-gen-go (golang-goprotobuf-dev)")
command -v protoc-gen-grpc-gateway >/dev/null || missing+=("protoc-gen-grpc-gateway (golang-grpc-gateway)")
[ -d "$GATEWAY_SRC/runtime" ] || missing+=("grpc-gateway Go sources (golang-github-grpc-ecosystem-grpc-gateway-dev)")
[ -d "$GOCODE/src/google.golang.org/grpc" ] || missing+=("grpc-go sources (golang-google-grpc-dev)")
[ -d "$GOCODE/src/github.com/golang/protobuf/ptypes/wrappers" ] || missing+=("golang/protobuf sources (golang-goprotobuf-dev)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "llmserve-rest: cannot build the REST sidecar; the Go toolchain is missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  echo "  install it with: bash deploy/rest/install-deps.sh (as root or with sudo), or" >&2
  echo "  apt-get install golang-go golang-grpc-gateway golang-github-grpc-ecosystem-grpc-gateway-dev golang-google-grpc-dev golang-goprotobuf-dev protobuf-compiler" >&2
  exit 2
fi

started=$(date +%s%N)
GOPATH_DIR="$BUILD/gopath"
PKG="$GOPATH_DIR/src/llmserve-rest"
GEN="$BUILD/gen"
rm -rf "$PKG" "$GEN"
mkdir -p "$PKG" "$GEN" "$(dirname "$BIN")"

# google/api/annotations.proto: the copy that matches the generator (Debian's), else the repo's own.
GOOGLEAPIS="$GATEWAY_SRC/third_party/googleapis"
[ -f "$GOOGLEAPIS/google/api/annotations.proto" ] || GOOGLEAPIS="$ROOT/protos/third_party"
# protoc-gen-go 1.3.5 predates google.golang.org/protobuf: map the well-known types to the old Go packages.
M="Mgoogle/protobuf/wrappers.proto=github.com/golang/protobuf/ptypes/wrappers"
M="$M,Mgoogle/protobuf/struct.proto=github.com/golang/protobuf/ptypes/struct"
M="$M,Mgoogle/api/annotations.proto=google.golang.org/genproto/googleapis/api/annotations"
(cd "$ROOT" && protoc -I protos -I "$GOOGLEAPIS" \
  --go_out="plugins=grpc,paths=source_relative,$M:$GEN" \
  --grpc-gateway_out="logtostderr=true,paths=source_relative,$M:$GEN" \
  "protos/$PROTO")

# One package: the generated code is renamed into `main` next to the hand-written files.
for f in "$GEN/${PROTO%.proto}".pb.go "$GEN/${PROTO%.proto}".pb.gw.go; do
  sed -E 's/^package [a-z0-9_]+$/package main/' "$f" > "$PKG/$(basename "$f")"
done
cp "$REST"/*.go "$PKG/"  # *_test.go too: `go build` ignores them
cp "$REST/openapi.json" "$PKG/"  # served at GET /openapi.json (openapi.go embeds it)

export GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$GOPATH_DIR:$GOCODE"
if [ -z "$(go env GOCACHE 2>/dev/null)" ] || [ "$(go env GOCACHE 2>/dev/null)" = "off" ]; then
  export GOCACHE="$BUILD/go-cache"
fi
if [ "$MODE" = "--test" ]; then  # the Go tests only; the binary is left as it is
  cd "$PKG" && exec go test -count=1 -vet=off -timeout 300s .
fi
(cd "$PKG" && go build -trimpath -o "$BIN.tmp" .)
mv -f "$BIN.tmp" "$BIN"
elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
printf 'llmserve-rest: built %s in %d.%01ds\n' "$BIN" $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100))
