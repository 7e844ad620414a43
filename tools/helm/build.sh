#!/usr/bin/env bash
# Builds tools/helm/bin/helm — Helm v3 compiled from the Go module proxy (helm.sh/helm/v3 as pinned in
# go.mod/go.sum) — unless it is newer than go.mod, go.sum and this script. The version is stamped as
# Helm's own Makefile does (internal/version, and the Kubernetes version derived from client-go that
# `helm lint` and `helm template` report as .Capabilities.KubeVersion).
# Cold build: ~4 min on 2 cores; then instant. Uses the default Go module and build caches.
#
#   bash tools/helm/build.sh               # build (or wait for a background build) in the foreground
#   bash tools/helm/build.sh --background  # start a cold build with nohup (log: bin/build.log), return
#   bash tools/helm/build.sh --status      # exit 0 when bin/helm is up to date, 1 otherwise
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$here/bin/helm"
log="$here/bin/build.log"
pidfile="$here/bin/build.pid"
export PATH="$PATH:/usr/local/go/bin"
start_ns=$(date +%s%N)

is_stale() {
  [[ -x "$bin" ]] || return 0
  local f
  for f in "$here"/go.mod "$here"/go.sum "$here"/build.sh; do
    [[ "$f" -nt "$bin" ]] && return 0
  done
  return 1
}

running_pid() {  # pid of a background build still running, if any
  [[ -f "$pidfile" ]] || return 1
  local pid
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
  return 1
}

case "${1:-}" in
  --status)
    if is_stale; then
      if pid=$(running_pid); then echo "helm: building (pid $pid, log $log)"; else echo "helm: stale"; fi
      exit 1
    fi
    echo "helm: up to date: $bin"
    exit 0
    ;;
  --background)
    mkdir -p "$here/bin"
    if ! is_stale; then echo "helm: up to date: $bin"; exit 0; fi
    if pid=$(running_pid); then echo "helm: already building (pid $pid), log: $log"; exit 0; fi
    nohup bash "$here/build.sh" --foreground >"$log" 2>&1 &
    echo $! >"$pidfile"
    echo "helm: build started in the background (pid $!), log: $log; poll with: bash $here/build.sh --status"
    exit 0
    ;;
  ""|--foreground) ;;
  *) echo "usage: build.sh [--background|--status]" >&2; exit 2 ;;
esac

if [[ "${1:-}" != "--foreground" ]] && pid=$(running_pid); then
  echo "helm: waiting for the background build (pid $pid, log $log)"
  while kill -0 "$pid" 2>/dev/null; do sleep 5; done
fi

if is_stale; then
  command -v go >/dev/null || { echo "build.sh: Go toolchain not found on PATH" >&2; exit 1; }
  mkdir -p "$here/bin"
  cd "$here"
  helm_version=$(go list -m -f '{{.Version}}' helm.sh/helm/v3)
  client_go=$(go list -m -f '{{.Version}}' k8s.io/client-go)   # v0.MINOR.PATCH <-> Kubernetes 1.MINOR
  k8s_minor=$(echo "$client_go" | cut -d. -f2)
  ldflags="-s -w"
  ldflags+=" -X helm.sh/helm/v3/internal/version.version=$helm_version"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$bin.tmp" helm.sh/helm/v3/cmd/helm
  mv -f "$bin.tmp" "$bin"
  status="built"
else
  status="up to date"
fi

elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
printf 'helm %s in %d.%03ds: %s (%s)\n' "$status" $((elapsed_ms / 1000)) $((elapsed_ms % 1000)) "$bin" \
  "$("$bin" version --short 2>/dev/null || echo '?')"
