#!/usr/bin/env bash
# Builds tests/cluster/bin/fermata-testcluster (kube-apiserver + embedded etcd, kube-controller-manager,
# kube-scheduler and kubectl in one binary) unless it is newer than go.mod, go.sum, this script and every *.go.
# Uses the default Go module and build caches, so a rebuild after a source change is incremental.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$here/bin/fermata-testcluster"
start_ns=$(date +%s%N)

stale=0
if [[ ! -x "$bin" ]]; then
  stale=1
else
  for f in "$here"/go.mod "$here"/go.sum "$here"/build.sh "$here"/*.go; do
    if [[ "$f" -nt "$bin" ]]; then stale=1; break; fi
  done
fi

if (( stale )); then
  command -v go >/dev/null || { echo "build.sh: Go toolchain not found on PATH" >&2; exit 1; }
  mkdir -p "$here/bin"
  # Stamp the Kubernetes version (as hack/lib/version.sh does), so /version and kubectl report it.
  k8s_version=$(cd "$here" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
  minor=${k8s_version#v1.}; minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$here" && go build -trimpath -ldflags="$ldflags" -o "$bin.tmp" .)
  mv -f "$bin.tmp" "$bin"
  status="built"
else
  status="up to date"
fi
ln -sfn fermata-testcluster "$here/bin/kubectl"

elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
printf 'fermata-testcluster %s in %d.%03ds: %s\n' "$status" $((elapsed_ms / 1000)) $((elapsed_ms % 1000)) "$bin"
