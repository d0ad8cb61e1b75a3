# Sourced by the image builders (tests/build-*-image.sh): what they share.

# An image already built from the same inputs (its tag carries their hash) is reused:
# its tag is printed and the builder ends here.
reuse_image() {
  if docker image inspect "$1" >/dev/null 2>&1; then
    echo "reusing $1" >&2
    echo "$1"
    exit 0
  fi
}

# A minimal Debian rootfs with these packages in ROOT (DEBIAN_SUITE, DEBIAN_MIRROR
# override bookworm and deb.debian.org); debootstrap's log tail on failure.
debian_rootfs() {
  local root=$1 packages=$2 log=$3
  local suite=${DEBIAN_SUITE:-bookworm} mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  echo "debootstrap $suite (minbase + $packages) ..." >&2
  debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$log" 2>&1 \
    || { tail -30 "$log" >&2; exit 1; }
}
