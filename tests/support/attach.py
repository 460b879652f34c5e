"""Helpers the daemon-hardening tests share: a frontend that attaches and does I/O, and
`vhost-pv` runs whose exit code and output are looked at."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.frontend import (
    VIRTIO_BLK_S_OK,
    GuestMemory,
    SplitRing,
    VhostUserFrontend,
    read_request,
    write_request,
)

VHOST_PV = [sys.executable, "-m", "vhost_pv.cli"]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VHOST_PV, *args], capture_output=True, text=True, timeout=timeout, check=False)


class Guest:
    """A connected, negotiated frontend with memory and queue 0 running."""

    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        self.frontend = VhostUserFrontend(socket_path, timeout=timeout)
        self.memory = GuestMemory(4 << 20)
        try:
            self.frontend.negotiate()
            self.frontend.set_mem_table(self.memory)
            self.ring = SplitRing(self.memory, 64)
            self.frontend.setup_queue(0, self.ring)
        except BaseException:
            self.close()
            raise

    def write(self, sector: int, data: bytes) -> int:
        return self.frontend.submit(0, self.ring, write_request(self.memory, sector, data)).status

    def round_trip(self, sector: int, data: bytes) -> None:
        assert self.write(sector, data) == VIRTIO_BLK_S_OK
        read = self.frontend.submit(0, self.ring, read_request(self.memory, sector, len(data)))
        assert read.status == VIRTIO_BLK_S_OK
        assert read.data() == data

    def close(self) -> None:
        self.frontend.close()
        self.memory.close()


def pattern(length: int, seed: int) -> bytes:
    """Seeded bytes that differ per offset, so misplaced or stale data shows up."""
    return bytes((i * 31 + seed) & 0xFF for i in range(length))
