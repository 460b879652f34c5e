"""Helpers the QEMU tests share for looking at a volume file from the host."""

from __future__ import annotations

import hashlib
from pathlib import Path

from vhost_pv.volume.header import VolumeHeader


def data_digest(path: Path, header: VolumeHeader) -> str:
    """SHA-256 of the data region (what the guest sees), read straight from the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(header.data_offset)
        remaining = header.capacity
        while remaining:
            chunk = f.read(min(remaining, 1 << 20))
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()
