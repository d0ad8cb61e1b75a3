#!/usr/bin/env bash
# Builds a local image of the real mcp-outline server (the code of
# ghcr.io/vortiago/mcp-outline) with no registry:
#   1. a Debian rootfs (debootstrap --variant=minbase, with python3 and venv);
#   2. mcp-outline and its dependencies, pinned in tests/mcp-outline/requirements.txt,
#      downloaded as wheels on the host (the host's pip has the CA settings) and
#      installed offline into a venv inside the rootfs;
#   3. `docker import` with the image's settings: MCP_TRANSPORT=streamable-http,
#      MCP_HOST=0.0.0.0, MCP_PORT=3000, a non-root user, its entrypoint.
# The tag carries the pinned set's hash: an existing image of the same pins is reused.
# Prints the tag on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/image-lib.sh
req=tests/mcp-outline/requirements.txt
version=$(grep -E '^mcp-outline==' "$req" | cut -d= -f3)
pins=$(sha256sum "$req" | cut -c1-10)
tag="outline-mcp-proxy-mcp-outline:${version}-${pins}"
reuse_image "$tag"
work=$(mktemp -d /var/tmp/mcp-outline-image.XXXXXX)
trap 'umount "$work/rootfs/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
root="$work/rootfs"

debian_rootfs "$root" python3,python3-venv "$work/debootstrap.log"

echo "downloading wheels for $(grep -c '==' "$req") pinned packages ..." >&2
python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --python-version 3.11 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  -r "$req" -d "$root/tmp/wheels"
cp "$req" "$root/tmp/requirements.txt"

echo "installing offline into /opt/mcp-outline ..." >&2
mount -t proc proc "$root/proc"
chroot_run() { chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp "$@"; }
chroot_run /usr/bin/python3 -m venv /opt/mcp-outline
chroot_run /opt/mcp-outline/bin/pip install --quiet --no-index --disable-pip-version-check \
  --find-links /tmp/wheels -r /tmp/requirements.txt
chroot_run /opt/mcp-outline/bin/python -c "import mcp_outline"
umount "$root/proc"

# trim: no package cache, docs or wheels in the image; a user to run as
rm -rf "$root/tmp/"* "$root/var/cache/apt/"* "$root/var/lib/apt/lists/"* "$root/usr/share/doc" "$root/usr/share/man" \
  "$root/usr/share/locale"
grep -q '^mcp:' "$root/etc/passwd" || echo 'mcp:x:10001:10001:mcp-outline:/tmp:/usr/sbin/nologin' >>"$root/etc/passwd"
grep -q '^mcp:' "$root/etc/group" || echo 'mcp:x:10001:' >>"$root/etc/group"

echo "importing $tag ..." >&2
tar -C "$root" -c . | docker import \
  --change 'ENV MCP_TRANSPORT=streamable-http' \
  --change 'ENV MCP_HOST=0.0.0.0' \
  --change 'ENV MCP_PORT=3000' \
  --change 'ENV HOME=/tmp' \
  --change 'ENV PATH=/opt/mcp-outline/bin:/usr/local/bin:/usr/bin:/bin' \
  --change 'ENV PYTHONUNBUFFERED=1' \
  --change 'USER 10001:10001' \
  --change 'WORKDIR /tmp' \
  --change 'EXPOSE 3000' \
  --change 'ENTRYPOINT ["/opt/mcp-outline/bin/mcp-outline"]' \
  - "$tag" >/dev/null
echo "$tag"
