#!/usr/bin/env bash
# Builds the base image the Dockerfile starts from, the way its official counterpart is made:
# `debootstrap --variant=minbase bookworm` from Debian's archive, then slimmed as the Docker
# Official Image debian:bookworm-slim is (no docs, man pages, locales or apt lists), committed
# with buildah as localhost/fermata/debian:bookworm-slim. `make images` passes it to the
# Dockerfile as BASE_IMAGE, so the file users build from debian:bookworm-slim is the file built here.
#
#   bash tools/images/base.sh            # build unless the image exists
#   bash tools/images/base.sh --force    # build again
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tools/images/common.sh
source "$here/common.sh"

if [[ "${1:-}" != "--force" ]] && bah inspect --type image "$BASE_REF" >/dev/null 2>&1; then
  echo "base: $BASE_REF exists"
  exit 0
fi
start=$(date +%s)
work="$(mktemp -d /var/tmp/fermata-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
echo "base: debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log"; exit 1; }
# The slimming of the official -slim variant (its dpkg path excludes, applied after the fact).
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
CFG
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
printf 'Acquire::Languages "none";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
printf 'APT::Install-Recommends "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: %s-security\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
  "$MIRROR" "$SUITE" "$SUITE" "$MIRROR" "$SUITE" >"$rootfs/etc/apt/sources.list.d/debian.sources"
rm -f "$rootfs/etc/apt/sources.list"
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda,locale}/* "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log \
  "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/root/.bash_history
: >"$rootfs/etc/machine-id"

ctr=$(bah from scratch)
mnt=$(bah mount "$ctr")
cp -a "$rootfs/." "$mnt/"
bah umount "$ctr" >/dev/null
bah config --os linux --arch amd64 --cmd '["bash"]' \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --label org.opencontainers.image.title="debian:$SUITE-slim (debootstrap)" \
  --label org.opencontainers.image.source="$MIRROR" "$ctr"
bah commit --rm -q "$ctr" "$BASE_REF" >/dev/null
echo "base: $BASE_REF built in $(( $(date +%s) - start )) s"
