#!/usr/bin/env bash
# `make images`: builds the operator and trainer images from the Dockerfile with buildah (chroot
# isolation, vfs storage), on the debootstrap base of tools/images/base.sh, and tags each with the
# name the Helm chart and the examples use (ghcr.io/fermata-dev/fermata-{operator,trainer}:VERSION).
# An image whose inputs (Dockerfile, .dockerignore, pyproject.toml, README.md and the packages'
# files) are unchanged is not built again: its label dev.fermata.inputs holds their digest.
# pip's wheel cache is a cache mount, kept across builds.
#
# After the build each image's root file system is kept as a buildah working container
# (fermata-rootfs-<image id>) and described in .fermata/images/index.json — image name → rootfs,
# entrypoint, cmd, env, working dir, user, id, size — for the development kubelet, which runs a
# pod's container from it (fermata_dev.podexec).
#
#   bash tools/images/build.sh                 # both
#   bash tools/images/build.sh operator        # one
#   bash tools/images/build.sh --status        # exit 0 when both are up to date
#   bash tools/images/build.sh --clean         # remove the images, their working containers, the base
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=tools/images/common.sh
source "$here/common.sh"
registry="${FERMATA_IMAGE_REGISTRY:-ghcr.io/fermata-dev}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -1)"
index_dir="$repo/.fermata/images"
index="$index_dir/index.json"
mkdir -p "$index_dir"

inputs_digest() {  # the files the Dockerfile reads, by content
  cd "$repo"
  {
    printf '%s\n' Dockerfile .dockerignore pyproject.toml README.md
    git ls-files --cached --others --exclude-standard -- api operator trainer kubectl \
      | grep -v -e '__pycache__' -e '\.pyc$' -e '\.egg-info/'
  } | LC_ALL=C sort -u | while read -r f; do [[ -f "$f" ]] && printf '%s  %s\n' "$(sha256sum <"$f" | cut -c1-64)" "$f"; done \
    | { cat; echo "base $(bah inspect --type image --format '{{.FromImageID}}' "$BASE_REF" 2>/dev/null)"; } \
    | sha256sum | cut -c1-64
}

ref_of() { echo "$registry/fermata-$1:$version"; }

built_digest() {
  bah inspect --type image --format '{{index .ImageAnnotations "dev.fermata.inputs"}}{{index .OCIv1.Config.Labels "dev.fermata.inputs"}}' "$(ref_of "$1")" 2>/dev/null || true
}

pip_secrets() {  # the host's pip index and CA, handed to the build as secrets (never stored)
  local conf="$index_dir/pip.conf" cert index
  cert="${PIP_CERT:-$(sed -n 's/^ *cert *= *//p' /etc/pip.conf 2>/dev/null | head -1)}"
  index="${PIP_INDEX_URL:-$(sed -n 's/^ *index-url *= *//p' /etc/pip.conf 2>/dev/null | head -1)}"
  [[ -n "$cert$index" ]] || return 0
  {
    echo "[global]"
    [[ -n "$index" ]] && echo "index-url = $index"
    [[ -n "$cert" && -f "$cert" ]] && echo "cert = /etc/ssl/certs/build-ca.crt"
  } >"$conf"
  echo "--secret id=pip.conf,src=$conf"
  [[ -n "$cert" && -f "$cert" ]] && echo "--secret id=build-ca.crt,src=$cert"
  return 0
}

build_one() {
  local target="$1" digest="$2" ref start
  ref="$(ref_of "$target")"
  start=$(date +%s)
  previous="$(bah inspect --type image --format '{{.FromImageID}}' "$ref" 2>/dev/null || true)"
  echo "images: building $ref (target $target)"
  # shellcheck disable=SC2046
  bah bud --isolation chroot --layers=false --target "$target" $(pip_secrets) \
    --build-arg "BASE_IMAGE=$BASE_REF" --build-arg "VERSION=$version" \
    --label "dev.fermata.inputs=$digest" \
    -f "$repo/Dockerfile" -t "$ref" "$repo" >"$index_dir/build-$target.log" 2>&1 \
    || { tail -40 "$index_dir/build-$target.log"; echo "images: $target failed (log: $index_dir/build-$target.log)" >&2; return 1; }
  echo "images: $ref built in $(( $(date +%s) - start )) s"
  if [[ -n "$previous" ]]; then  # the build it replaces, and that build's working container
    bah containers --format '{{.ContainerName}}' | { grep "^fermata-rootfs-$target-" || true; } \
      | while read -r old; do bah rm "$old" >/dev/null 2>&1 || true; done
    bah rmi "$previous" >/dev/null 2>&1 || true
  fi
  echo "$target $(( $(date +%s) - start ))" >>"$index_dir/build-times.txt"
}

rootfs_entry() {  # keep a working container of the image; print its index entry (JSON)
  local target="$1" ref id name mnt
  ref="$(ref_of "$target")"
  id="$(bah inspect --type image --format '{{.FromImageID}}' "$ref")"
  name="fermata-rootfs-$target-${id:0:12}"
  if ! bah inspect --type container "$name" >/dev/null 2>&1; then
    # The working container of an earlier build of this target goes first (a full copy each).
    bah containers --format '{{.ContainerName}}' | { grep "^fermata-rootfs-$target-" || true; } \
      | while read -r old; do bah rm "$old" >/dev/null 2>&1 || true; done
    bah from --pull-never --name "$name" "$ref" >/dev/null
  fi
  mnt="$(bah mount "$name")"
  bah inspect --type image "$ref" | jq -c --arg ref "$ref" --arg rootfs "$mnt" --arg ctr "$name" \
    --arg size "$(du -sb "$mnt" | cut -f1)" '{($ref): {
      rootfs: $rootfs, container: $ctr, id: .FromImageID, sizeBytes: ($size | tonumber),
      entrypoint: (.OCIv1.config.Entrypoint // []), cmd: (.OCIv1.config.Cmd // []),
      env: (.OCIv1.config.Env // []), workingDir: (.OCIv1.config.WorkingDir // ""),
      user: (.OCIv1.config.User // ""), labels: (.OCIv1.config.Labels // {})}}'
}

clean() {
  bah containers --format '{{.ContainerName}}' | { grep '^fermata-rootfs-' || true; } \
    | while read -r c; do bah rm "$c" >/dev/null; done
  for t in operator trainer; do bah rmi "$(ref_of "$t")" >/dev/null 2>&1 || true; done
  bah rmi "$BASE_REF" >/dev/null 2>&1 || true
  rm -f "$index"
  echo "images: removed"
}

targets=()
status_only=false
for arg in "$@"; do
  case "$arg" in
    --clean) clean; exit 0 ;;
    --status) status_only=true ;;
    operator|trainer) targets+=("$arg") ;;
    *) echo "usage: build.sh [--status] [operator] [trainer]" >&2; exit 2 ;;
  esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=(operator trainer)

bash "$here/base.sh"
digest="$(inputs_digest)"
if $status_only; then
  rc=0
  for t in "${targets[@]}"; do
    if [[ "$(built_digest "$t")" == "$digest" ]]; then echo "images: $(ref_of "$t") up to date"; else echo "images: $(ref_of "$t") stale"; rc=1; fi
  done
  exit $rc
fi
for t in "${targets[@]}"; do
  if [[ "$(built_digest "$t")" == "$digest" ]]; then
    echo "images: $(ref_of "$t") up to date"
  else
    build_one "$t" "$digest"
  fi
done
entries="[]"
for t in operator trainer; do
  if bah inspect --type image "$(ref_of "$t")" >/dev/null 2>&1 && [[ "$(built_digest "$t")" == "$digest" ]]; then
    entries="$(jq -c --argjson e "$(rootfs_entry "$t")" '. + [$e]' <<<"$entries")"
  fi
done
jq 'add // {}' <<<"$entries" >"$index.tmp" && mv "$index.tmp" "$index"
echo "images: index $index"
