#!/usr/bin/env bash
# Installs the Debian packages vhost-pv needs, only those that are missing.
set -euo pipefail
# podman + runc: the container-watcher tests run real containers (runc: crun fails on this
# kernel's cgroup layout).
# liburing-dev: the direct-mode data path submits through io_uring.
packages=(qemu-system-x86 qemu-utils fio busybox-static cpio linux-image-cloud-amd64 gcc python3-venv
          podman runc liburing-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "debian packages: all present"
    exit 0
fi
echo "debian packages: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
