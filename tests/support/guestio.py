"""Helpers the QEMU guest tests share: waiting on the guest's console and checking what its
jobs wrote by reading the volume file from the host."""

from __future__ import annotations

import time
from pathlib import Path

from vhost_pv.volume.header import VolumeHeader
from vhost_pv_tools.guest import GuestProcess


def read_data(path: Path, header: VolumeHeader, offset: int, length: int) -> bytes:
    """Bytes of the guest-visible disk at `offset`, read straight from the volume file."""
    with open(path, "rb") as f:
        f.seek(header.data_offset + offset)
        return f.read(length)


def text_pattern(label: str, length: int) -> bytes:
    """What `yes LABEL | head -c LENGTH` prints in the guest."""
    line = (label + "\n").encode()
    return (line * (length // len(line) + 1))[:length]


def wait_console(guest: GuestProcess, marker: str, timeout: float = 300) -> None:
    """Wait for the guest job to print `marker`; fail (with the console) if it ends first."""
    deadline = time.monotonic() + timeout
    while marker not in guest.console_so_far():
        assert guest.process.poll() is None, f"guest ended before {marker}:\n{guest.console_so_far()[-3000:]}"
        assert time.monotonic() < deadline, f"no {marker} (I/O hung?):\n{guest.console_so_far()[-3000:]}"
        time.sleep(0.1)
