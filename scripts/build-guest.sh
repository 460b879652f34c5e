#!/usr/bin/env bash
# Builds the small TCG test guest: Debian's cloud kernel plus an initramfs holding busybox,
# fio (with the shared libraries it links) and the virtio / virtio-fs modules, which the
# cloud kernel ships as modules rather than built in.
#
#   scripts/build-guest.sh [OUTDIR]
#
# OUTDIR defaults to ${VHOST_PV_CACHE:-$HOME/.cache/vhost-pv}/guest and is outside the repo
# on purpose: the image is a build product, never committed. The script is idempotent: it
# rebuilds only when the kernel, busybox, fio or this script changed, and it replaces the
# image atomically so a concurrent reader never sees half a file.
set -euo pipefail

out="${1:-${VHOST_PV_CACHE:-$HOME/.cache/vhost-pv}/guest}"

kernel="$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1 || true)"
if [ -z "$kernel" ]; then
    echo "build-guest: no /boot/vmlinuz-*-cloud-amd64; install linux-image-cloud-amd64" >&2
    exit 1
fi
kver="${kernel#/boot/vmlinuz-}"
moddir="/lib/modules/$kver"
for tool in busybox fio cpio gzip ldd; do
    command -v "$tool" >/dev/null || { echo "build-guest: $tool is missing" >&2; exit 1; }
done
busybox="$(command -v busybox)"
fio="$(command -v fio)"

# What the image is built from; a change in any of them means a rebuild.
stamp="$(sha256sum "$kernel" "$busybox" "$fio" "$0" | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
    && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ]; then
    echo "guest image up to date in $out (kernel $kver)"
    exit 0
fi

# Modules in load order (dependencies first). virtio_pci pulls in the core; virtio_blk is
# the disk, virtiofs the metadata file system, virtio_net the user-mode network.
modules=(
    kernel/drivers/virtio/virtio_ring.ko
    kernel/drivers/virtio/virtio.ko
    kernel/drivers/virtio/virtio_pci_legacy_dev.ko
    kernel/drivers/virtio/virtio_pci_modern_dev.ko
    kernel/drivers/virtio/virtio_pci.ko
    kernel/drivers/block/virtio_blk.ko
    kernel/fs/fuse/fuse.ko
    kernel/fs/fuse/virtiofs.ko
    kernel/net/core/failover.ko
    kernel/drivers/net/net_failover.ko
    kernel/drivers/net/virtio_net.ko
)

mkdir -p "$out"
work="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,mnt,etc,lib/modules,usr/bin}

cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# fio and every shared object it needs, at the same paths, plus the dynamic loader.
cp "$fio" "$root/usr/bin/fio"
ldd "$fio" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

i=0
for m in "${modules[@]}"; do
    src="$moddir/$m"
    [ -f "$src" ] || src="$(ls "$src".* 2>/dev/null | head -n 1 || true)"
    if [ -z "$src" ] || [ ! -f "$src" ]; then
        echo "build-guest: module $m missing in $moddir" >&2
        exit 1
    fi
    dest="$root/lib/modules/$(printf '%02d' "$i")-$(basename "$m")"
    case "$src" in
        *.xz) xz -dc "$src" >"$dest" ;;
        *.zst) zstd -qdc "$src" >"$dest" ;;
        *) cp "$src" "$dest" ;;
    esac
    i=$((i + 1))
done

cat >"$root/init" <<'EOF'
#!/bin/sh
# vhost-pv test guest: load virtio drivers, run the job the host appended as /job.sh,
# report its exit code on the console, power off.
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in /lib/modules/*.ko; do
    insmod "$m" 2>/dev/null || echo "guest: insmod $m failed"
done
# Let the block and fs drivers finish probing before the job looks for devices.
mdev -s 2>/dev/null
n=0
while [ $n -lt 50 ] && [ -e /sys/bus/pci/drivers/virtio-pci ] && \
      [ "$(ls /sys/bus/virtio/devices 2>/dev/null | wc -l)" -gt "$(ls -d /sys/bus/virtio/drivers/*/virtio* 2>/dev/null | wc -l)" ]; do
    sleep 0.1
    n=$((n + 1))
done
ip link set lo up 2>/dev/null
if [ -f /job.sh ]; then
    sh /job.sh
    rc=$?
else
    # A missing job must not look like success.
    echo "guest: no /job.sh in the initramfs"
    rc=125
fi
sync
echo "VHOSTPV-GUEST-EXIT $rc"
poweroff -f
EOF
chmod 0755 "$root/init"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) \
    | gzip -6 >"$work/initramfs.cpio.gz"
cp "$kernel" "$work/vmlinuz"
echo "$stamp" >"$work/stamp"
echo "$kver" >"$work/kernel-version"
for f in vmlinuz initramfs.cpio.gz kernel-version stamp; do
    mv -f "$work/$f" "$out/$f"
done
echo "guest image built in $out (kernel $kver, $(du -h "$out/initramfs.cpio.gz" | cut -f1) initramfs)"
