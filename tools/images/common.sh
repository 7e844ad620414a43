# Shared settings of the image scripts (sourced). buildah runs with chroot isolation and the vfs
# storage driver: these machines have no container engine and no overlay-capable user namespace.
export STORAGE_DRIVER=vfs
export BUILDAH_ISOLATION=chroot
SUITE="${FERMATA_BASE_SUITE:-bookworm}"
MIRROR="${FERMATA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_REF="${FERMATA_BASE_IMAGE:-localhost/fermata/debian:$SUITE-slim}"

bah() { buildah --storage-driver vfs "$@"; }

need_tools() {  # buildah and debootstrap from Debian, installed when missing (CI starts bare)
  command -v buildah >/dev/null && command -v debootstrap >/dev/null && return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "images: buildah and debootstrap are needed (apt-get install buildah debootstrap)" >&2
    return 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah debootstrap >/dev/null
}
need_tools
