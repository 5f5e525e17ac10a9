#!/bin/sh
# Builds the VM image: the nspawn scenario's root filesystem (the same packages, built by the
# pgvpn_lab role) plus a kernel, as a qcow2 base image with the kernel and initrd beside it.
# create.yml keys the cache by this file's hash, the root filesystem's name and the mirror:
# any edit here rebuilds the image.
# Usage: build-image.sh ROOTFS DEST MIRROR     (DEST must not exist; the caller renames it)
set -eu
rootfs=$1
dest=$2
mirror=$3
# Sparse: the base image holds ~1 GB; the rest is room for PostgreSQL's WAL in the overlays.
size=6G

tree=$dest/tree
mkdir -p "$dest/upper" "$dest/work" "$tree"
unmount_all() {
    for m in dev/pts dev proc sys ""; do
        if mountpoint -q "$tree/$m"; then umount -l "$tree/$m"; fi
    done
}
trap unmount_all EXIT
trap 'exit 1' INT TERM HUP

echo "== overlay on $rootfs"
mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$dest/upper,workdir=$dest/work" "$tree"
mount -t proc proc "$tree/proc"
mount -t sysfs sysfs "$tree/sys"
mount --bind /dev "$tree/dev"
mount --bind /dev/pts "$tree/dev/pts"

# A small initrd boots faster under emulation: only what finds a virtio root disk. A hook,
# because /etc/initramfs-tools/modules is a conffile of the package installed below.
mkdir -p "$tree/etc/initramfs-tools/conf.d" "$tree/etc/initramfs-tools/hooks"
echo 'MODULES=list' >"$tree/etc/initramfs-tools/conf.d/pgvpn-vm.conf"
cat >"$tree/etc/initramfs-tools/hooks/pgvpn-vm" <<'HOOK'
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk ext4
HOOK
chmod 0755 "$tree/etc/initramfs-tools/hooks/pgvpn-vm"

echo "== apt-get install linux-image-amd64 from $mirror"
printf 'deb %s bookworm main\n' "$mirror" >"$tree/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' >"$tree/usr/sbin/policy-rc.d"
chmod 0755 "$tree/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$tree/etc/resolv.conf"
chroot "$tree" apt-get update -q
DEBIAN_FRONTEND=noninteractive chroot "$tree" apt-get install -q -y --no-install-recommends linux-image-amd64
rm -f "$tree/usr/sbin/policy-rc.d" "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*_Packages

echo "== VM configuration"
# Per-VM settings (hostname, hosts, static address, SSH key) come from a tar archive on a
# second disk, unpacked before the network starts: one base image serves every VM.
cat >"$tree/etc/systemd/system/pgvpn-vm-seed.service" <<'UNIT'
[Unit]
Description=Unpack this VM's settings from /dev/vdb
DefaultDependencies=no
BindsTo=dev-vdb.device
After=dev-vdb.device systemd-remount-fs.service
Before=sysinit.target systemd-networkd.service ssh.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/tar --extract --no-overwrite-dir --file=/dev/vdb --directory=/
ExecStart=/bin/hostname --file /etc/hostname

[Install]
WantedBy=sysinit.target
UNIT
chroot "$tree" systemctl enable pgvpn-vm-seed.service
echo '/dev/vda / ext4 rw,relatime 0 1' >"$tree/etc/fstab"
# Drivers for hardware the VMs lack or do not need; each costs seconds to probe under TCG.
printf 'blacklist %s\n' floppy pcspkr cfg80211 >"$tree/etc/modprobe.d/pgvpn-vm.conf"
# Snapshot clean-up for LVM volumes, which the VMs do not have: 10-30 s of each boot.
chroot "$tree" systemctl mask e2scrub_reap.service

echo "== filesystem image"
cp "$tree"/boot/vmlinuz-* "$dest/vmlinuz"
cp "$tree"/boot/initrd.img-* "$dest/initrd.img"
for m in dev/pts dev proc sys; do umount "$tree/$m"; done
mkfs.ext4 -q -L root -d "$tree" "$dest/root.raw" "$size"
umount "$tree"
qemu-img convert -f raw -O qcow2 "$dest/root.raw" "$dest/base.qcow2"
rm -rf "$dest/root.raw" "$dest/upper" "$dest/work" "$tree"
ls -l "$dest"
echo "== done"
