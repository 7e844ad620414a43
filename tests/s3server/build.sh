#!/usr/bin/env bash
# Builds tests/s3server/bin/versitygw — the Versity S3 Gateway (github.com/versity/versitygw, pinned
# in go.mod through a `tool` directive) — unless the binary is newer than go.mod and go.sum.
# The tests run it with its posix backend on loopback as a real S3-compatible server.
# Uses the default Go module and build caches, so a rebuild after a version bump is incremental.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$here/bin/versitygw"
pkg="github.com/versity/versitygw/cmd/versitygw"
start_ns=$(date +%s%N)

stale=0
if [[ ! -x "$bin" ]]; then
  stale=1
else
  for f in "$here"/go.mod "$here"/go.sum; do
    if [[ "$f" -nt "$bin" ]]; then stale=1; break; fi
  done
fi

if (( stale )); then
  command -v go >/dev/null || { echo "build.sh: Go toolchain not found on PATH" >&2; exit 1; }
  mkdir -p "$here/bin"
  ver="$(cd "$here" && go list -m -f '{{.Version}}' github.com/versity/versitygw)"
  ldflags="-s -w -X main.Version=$ver -X main.Build=go-module -X main.BuildTime=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  (cd "$here" && go build -trimpath -ldflags="$ldflags" -o "$bin.tmp" "$pkg")
  mv -f "$bin.tmp" "$bin"
  status="built"
else
  status="up to date"
fi

elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
printf 'versitygw %s in %d.%03ds: %s\n' "$status" $((elapsed_ms / 1000)) $((elapsed_ms % 1000)) "$bin"
