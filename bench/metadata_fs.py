"""Bench rows for the metadata file system: file reads per second in a TCG guest through
vhost-pv's virtio-fs (serve --meta-socket) and through QEMU's own virtiofsd serving a
directory with the same content, the same guest loop on both.

The loop reads a small file with the shell's `read` builtin (open, read, close; no fork),
so the row measures a FUSE LOOKUP/OPEN/READ/RELEASE round trip each time. virtiofsd runs
with cache=none; vhost-pv's files are direct I/O with a 1 s entry/attribute timeout.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from vhost_pv.control import client
from vhost_pv.control.wire import MetaOp
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import run_guest
from vhost_pv_tools.serverproc import ServerProcess

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
READS = 2000
JOB = """
mkdir -p /m
mount -t virtiofs metadata /m || exit 20
read -r first < /m/instance/zone
[ "$first" = rack-3 ] || exit 21
t0=$(cut -d' ' -f1 /proc/uptime)
i=0
while [ $i -lt {reads} ]; do read -r v < /m/instance/zone; i=$((i + 1)); done
t1=$(cut -d' ' -f1 /proc/uptime)
echo "READS {reads} SECONDS $(awk -v a=$t0 -v b=$t1 'BEGIN {{print b - a}}')"
umount /m
"""


def _reads_per_second(socket: Path) -> float:
    fs_args = ["-chardev", f"socket,id=m0,path={socket}",
               "-device", "vhost-user-fs-pci,chardev=m0,tag=metadata"]
    result = run_guest(JOB.format(reads=READS), extra_args=fs_args, timeout=600)
    line = next((ln for ln in result.console.splitlines() if ln.startswith("READS ")), None)
    if result.exit_code != 0 or line is None:
        raise RuntimeError(f"metadata fs bench guest failed:\n{result.console[-2000:]}")
    seconds = float(line.split()[3])
    return READS / seconds if seconds > 0 else float("inf")


def metadata_rows(workdir: Path) -> dict[str, Any]:
    """Reads per second through vhost-pv's virtio-fs and through virtiofsd."""
    volume = workdir / "vol0.img"
    create_volume(volume, CreateOptions(size=4 << 20, ring_size=1 << 20))
    socket = workdir / "meta.sock"
    with ServerProcess([volume], workdir / "d", extra_args=["--meta-socket", str(socket)]) as server:
        client.meta(server.control, MetaOp.SET, "vm0", "instance/zone", "rack-3")
        ours = _reads_per_second(socket)
    source = workdir / "tree" / "instance"
    source.mkdir(parents=True)
    (source / "zone").write_text("rack-3\n")
    vsock = workdir / "virtiofsd.sock"
    with open(workdir / "virtiofsd.log", "wb") as log:
        daemon = subprocess.Popen(
            [VIRTIOFSD, f"--socket-path={vsock}", "-o", f"source={source.parent}", "-o", "cache=none",
             "-o", "sandbox=chroot"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not vsock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"virtiofsd did not start: {(workdir / 'virtiofsd.log').read_text()}")
            time.sleep(0.05)
        theirs = _reads_per_second(vsock)
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
    return {"vhost-pv": ours, "virtiofsd": theirs, "ratio": ours / theirs if theirs else float("nan")}
