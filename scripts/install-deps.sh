#!/usr/bin/env bash
# Installs the Debian packages vhost-pv needs, only those that are missing.
set -euo pipefail
# liburing-dev: the data path submits through io_uring.
# libasan8 / libubsan1: `make asan` (they normally come with gcc; named so they are checked).
# libseccomp-dev: the data-path threads' seccomp filter. systemd: `systemd-analyze verify` of
# the unit file. prometheus: the metrics test scrapes the daemon with a real server.
packages=(qemu-system-x86 qemu-utils fio busybox-static cpio linux-image-cloud-amd64 gcc python3-venv
          liburing-dev libasan8 libubsan1 libseccomp-dev systemd prometheus)
# podman + runc: the container-watcher tests run real containers (runc: crun fails on this
# kernel's cgroup layout). Installed with their recommended packages, as they were tested.
with_recommends=(podman runc)

missing() {
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}
plain=($(missing "${packages[@]}"))
recommended=($(missing "${with_recommends[@]}"))
if [ ${#plain[@]} -eq 0 ] && [ ${#recommended[@]} -eq 0 ]; then
    echo "debian packages: all present"
    exit 0
fi
echo "debian packages: installing ${plain[*]} ${recommended[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
if [ ${#plain[@]} -gt 0 ]; then
    $sudo apt-get install -y -qq --no-install-recommends "${plain[@]}"
fi
if [ ${#recommended[@]} -gt 0 ]; then
    $sudo apt-get install -y -qq "${recommended[@]}"
fi
