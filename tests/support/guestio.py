"""Helpers the QEMU guest tests share: waiting on the guest's console and checking what its
jobs wrote by reading the volume file from the host."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

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


def fio_rounds_job(*, rounds: int, iodepth: int, size_mib: int) -> str:
    """A guest job: `rounds` fio runs of random 4k reads and writes over /dev/vda (reads in
    between, both completing out of order), each verifying what it wrote (crc32c, fatal);
    their JSON results between BEGIN/END markers for fio_jobs. A lost write, a request
    completed twice or one never completed shows as a verify error or as a hang."""
    numbers = " ".join(str(n) for n in range(1, rounds + 1))
    return f"""
set -e
echo FIO-START
for round in {numbers}; do
  fio --name=v$round --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth={iodepth} \\
      --rw=randrw --rwmixread=30 --bs=4k --size={size_mib}M --verify=crc32c --verify_fatal=1 \\
      --randseed=$round --output-format=json --output=/tmp/fio$round.json
  echo "=== BEGIN fio$round ==="
  cat /tmp/fio$round.json
  echo "=== END fio$round ==="
done
echo FIO-ROUNDS-DONE
"""


def fio_jobs(console: str) -> list[dict[str, Any]]:
    """Every fio job result a fio_rounds_job printed on the console."""
    jobs: list[dict[str, Any]] = []
    for text in re.findall(r"=== BEGIN fio\d+ ===\r?\n(.*?)=== END fio\d+ ===", console, re.DOTALL):
        text = text.replace("\r\n", "\n")
        # fio puts warnings (e.g. about several verifying writers) before the JSON document.
        jobs.extend(json.loads(text[text.index("{"):])["jobs"])
    return jobs
