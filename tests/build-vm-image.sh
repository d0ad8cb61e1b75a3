#!/usr/bin/env bash
# A Debian 12 host as the cloud gives it, for tests/test_debian12_vm.py: a disk image for a
# QEMU guest with Debian's own kernel (so cgroup v2, the unified hierarchy, as bookworm
# boots), systemd as init, Debian's docker.io (under cgroup v2 and systemd its cgroup
# driver is systemd) with AppArmor as Debian installs it, nginx, and sshd taking only the
# key made here. This machine runs cgroup v1 and Docker's cgroupfs driver; the guest is
# how the test meets the other two.
# Built with debootstrap and `mkfs.ext4 -d` (no loop mount); kept in /var/tmp under a hash
# of its inputs, so a second run reuses it. Prints the image's directory on its last line:
#   disk.img (raw ext4, the root), vmlinuz, initrd.img, id_ed25519 (the key for root)
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/image-lib.sh
packages=systemd,systemd-sysv,dbus,udev,kmod,linux-image-amd64,openssh-server,docker.io,nginx,openssl,curl,\
ca-certificates,procps,iptables,iproute2,python3,apparmor
inputs=$( (cat "$0" tests/image-lib.sh; echo "$packages") | sha256sum | cut -c1-10)
out="/var/tmp/outline-mcp-proxy-vm-$inputs"
if [ -f "$out/disk.img" ]; then
  echo "reusing $out" >&2
  echo "$out"
  exit 0
fi
work=$(mktemp -d /var/tmp/vm-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
debian_rootfs "$root" "$packages" "$work/debootstrap.log"
# the network: the one NIC by DHCP (QEMU's user network), no resolver needed
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=ipv4\n' > "$root/etc/systemd/network/10-nic.network"
ln -sf /lib/systemd/system/systemd-networkd.service \
  "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
# the repository, read-only, and the test's files, from the host (9p)
cat >> "$root/etc/fstab" <<'FSTAB'
/dev/vda / ext4 rw,relatime 0 1
src /src 9p trans=virtio,version=9p2000.L,ro,nofail 0 0
share /share 9p trans=virtio,version=9p2000.L,nofail 0 0
FSTAB
mkdir -p "$root/src" "$root/share"
printf '9p\n9pnet_virtio\n' > "$root/etc/modules-load.d/9p.conf"
# root by this key only
ssh-keygen -q -t ed25519 -N '' -C outline-mcp-proxy-vm -f "$work/id_ed25519"
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$work/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n' \
  > "$root/etc/ssh/sshd_config.d/test.conf"
echo "outline-mcp-proxy-debian12" > "$root/etc/hostname"
# nothing of Debian's own site, and no timers the test does not need
rm -f "$root/etc/nginx/sites-enabled/default"
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer man-db.timer; do
  rm -f "$root/etc/systemd/system/"*.wants/"$unit" 2>/dev/null || true
done
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
mkdir -p "$work/out"
cp "$(ls "$root"/boot/vmlinuz-* | tail -1)" "$work/out/vmlinuz"
cp "$(ls "$root"/boot/initrd.img-* | tail -1)" "$work/out/initrd.img"
cp "$work/id_ed25519" "$work/out/id_ed25519"
echo "making the disk ..." >&2
mkfs.ext4 -q -L root -d "$root" "$work/out/disk.img" 6G
rm -rf "$out"
mv "$work/out" "$out"
echo "$out"
