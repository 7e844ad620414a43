#!/usr/bin/env bash
# Builds tests/cluster/bin/fermata-testcluster (kube-apiserver + embedded etcd, kube-controller-manager,
# kube-scheduler and kubectl in one binary) unless it is newer than go.mod, go.sum and every *.go.
# Uses the default Go module and build caches, so a rebuild after a source change is incremental.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$here/bin/fermata-testcluster"
start_ns=$(date +%s%N)

stale=0
if [[ ! -x "$bin" ]]; then
  stale=1
else
  for f in "$here"/go.mod "$here"/go.sum "$here"/*.go; do
    if [[ "$f" -nt "$bin" ]]; then stale=1; break; fi
  done
fi

if (( stale )); then
  command -v go >/dev/null || { echo "build.sh: Go toolchain not found on PATH" >&2; exit 1; }
  mkdir -p "$here/bin"
  (cd "$here" && go build -trimpath -ldflags='-s -w' -o "$bin.tmp" .)
  mv -f "$bin.tmp" "$bin"
  status="built"
else
  status="up to date"
fi
ln -sfn fermata-testcluster "$here/bin/kubectl"

elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
printf 'fermata-testcluster %s in %d.%03ds: %s\n' "$status" $((elapsed_ms / 1000)) $((elapsed_ms % 1000)) "$bin"
