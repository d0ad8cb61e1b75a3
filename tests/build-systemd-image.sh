#!/usr/bin/env bash
# A Debian bookworm host with a real systemd as PID 1, for the install test: systemd,
# dbus, nginx, openssl, curl, ca-certificates and iptables preinstalled (so
# systemd/install.sh runs without the network), the host's docker CLI copied in, and a stub docker.service
# (oneshot) standing for the host's Docker, whose socket the test mounts in. Built with
# debootstrap and `docker import`; the tag carries a hash of its inputs, so a second run
# reuses it. Prints the tag on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/image-lib.sh
packages=systemd,systemd-sysv,dbus,nginx,openssl,curl,ca-certificates,procps,iptables
docker_cli=$(command -v docker)
inputs=$( (cat "$0" tests/image-lib.sh; echo "$packages"; sha256sum "$docker_cli") | sha256sum | cut -c1-10)
tag="outline-mcp-proxy-systemd:bookworm-$inputs"
reuse_image "$tag"
work=$(mktemp -d /var/tmp/systemd-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
debian_rootfs "$root" "$packages" "$work/debootstrap.log"
install -m 0755 "$docker_cli" "$root/usr/bin/docker"
# the host's Docker stands behind the mounted socket; this unit stands for its service
cat > "$root/etc/systemd/system/docker.service" <<'UNIT'
[Unit]
Description=Docker (stub: the host's daemon, through the mounted socket)
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/docker.service "$root/etc/systemd/system/multi-user.target.wants/docker.service"
# nothing of Debian's own site, and no services the test does not need
rm -f "$root/etc/nginx/sites-enabled/default"
for unit in systemd-resolved systemd-timesyncd apt-daily.timer apt-daily-upgrade.timer; do
  rm -f "$root/etc/systemd/system/"*.wants/"$unit"* 2>/dev/null || true
done
echo "outline-mcp-proxy-test-host" > "$root/etc/hostname"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
echo "importing $tag ..." >&2
tar -C "$root" -c . | docker import \
  --change 'ENV container=docker' \
  --change 'CMD ["/lib/systemd/systemd"]' - "$tag" >/dev/null
echo "$tag"
