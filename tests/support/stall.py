"""A disk that stalls on demand: a FUSE file system (fuse-overlayfs in the foreground) whose
server the test stops with SIGSTOP. Every request on it then waits in the kernel, where no
signal but a fatal one interrupts the waiting thread: a worker doing I/O there is stuck."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from support.daemon_status import wait_until


@contextlib.contextmanager
def stallable_fs(where: Path) -> Iterator[tuple[Path, int]]:
    """Yields (mount point, FUSE server pid); SIGSTOP to the pid stalls the disk."""
    for name in ("lower", "upper", "work", "mnt"):
        (where / name).mkdir()
    mount = where / "mnt"
    server = subprocess.Popen(
        ["fuse-overlayfs", "-f", "-o",
         f"lowerdir={where / 'lower'},upperdir={where / 'upper'},workdir={where / 'work'}", str(mount)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.ismount(mount), 10.0, "the FUSE mount")
        yield mount, server.pid
    finally:
        os.kill(server.pid, signal.SIGCONT)
        subprocess.run(["fusermount", "-u", "-z", str(mount)], check=False, timeout=30)
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def resumed(fuse_pid: int) -> Iterator[None]:
    """SIGCONT to the FUSE server however the block ends, before the daemon is stopped or
    killed: a process cannot even exit while a close on a stopped FUSE file system waits."""
    try:
        yield
    finally:
        os.kill(fuse_pid, signal.SIGCONT)


def waiting_on_fuse(pid: int) -> bool:
    """Whether a thread of pid waits for a FUSE reply (its kernel stack shows it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if "fuse" in Path(f"/proc/{pid}/task/{tid}/stack").read_text():
                return True
    return False
