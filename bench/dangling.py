"""Benchmark rows for dangling volumes: the quarantine write path beside the normal one, and
the latency of the Persistent_Disk_Dangling flip (durable header + quiesce of the workers)."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from vhost_pv.control import client
from vhost_pv.volume.header import RingFullPolicy
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import VhostUserBlkDisk, start_guest
from vhost_pv_tools.serverproc import ServerProcess

FIO = ("fio --output-format=json --output=/tmp/{name}.json --filename=/dev/vda --direct=1 "
       "--ioengine=libaio --time_based --runtime={runtime} --ramp_time=1 --size=100% "
       "--name={name} --rw=randwrite --bs=4k --iodepth=32")

# Attached and dangling phases alternate (twice each) in one guest, so drift on the machine
# hits both alike. The guest sees each flip through its reads (policy deny).
JOB = """
set -e
for round in 1 2; do
  {normal}
  echo "=== BEGIN normal$round ==="; cat /tmp/normal.json; echo "=== END normal$round ==="
  echo "FLIP-NOW $round"
  while dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; do sleep 0.1; done
  {dangling}
  echo "=== BEGIN dangling$round ==="; cat /tmp/dangling.json; echo "=== END dangling$round ==="
  echo "CLEAR-NOW $round"
  until dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; do sleep 0.1; done
done
"""
ROUNDS = 2


def _wait_for(guest: Any, marker: str) -> None:
    deadline = time.monotonic() + 300
    while marker not in guest.console_so_far():
        if guest.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"quarantine bench guest failed:\n{guest.console_so_far()[-3000:]}")
        time.sleep(0.1)


def quarantine_rows(workdir: Path, runtime: int) -> dict[str, float]:
    """4k randwrite QD32 IOPS on one volume, attached and dangling in turns (same guest)."""
    volume = workdir / "quarantine.img"
    volume.unlink(missing_ok=True)
    # A big ring with overwrite: the run measures the quarantine path, not a full ring.
    create_volume(volume, CreateOptions(size=64 << 20, ring_size=512 << 20,
                                        ring_full_policy=RingFullPolicy.OVERWRITE))
    job = JOB.format(normal=FIO.format(name="normal", runtime=runtime),
                     dangling=FIO.format(name="dangling", runtime=runtime))
    with ServerProcess([volume], workdir / "q") as server:
        with start_guest(job, disks=[VhostUserBlkDisk(server.socket_for(volume))]) as guest:
            for round_no in range(1, ROUNDS + 1):
                _wait_for(guest, f"FLIP-NOW {round_no}")
                client.persistent_disk_dangling(server.control, volume.stem, reason="bench")
                _wait_for(guest, f"CLEAR-NOW {round_no}")
                client.persistent_disk_dangling(server.control, volume.stem, clear=True)
            result = guest.wait(300)
        quarantined = client.status(server.control)["volumes"][0]["totals"]["quarantined"]
    rows: dict[str, float] = {}
    for name in ("normal", "dangling"):
        values = []
        for round_no in range(1, ROUNDS + 1):
            text = result.section(f"{name}{round_no}")
            if result.exit_code != 0 or text is None:
                raise RuntimeError(f"quarantine bench: no {name} result:\n{result.console[-3000:]}")
            values.append(float(json.loads(text[text.index("{"):])["jobs"][0]["write"]["iops"]))
        rows[name] = statistics.mean(values)
    rows["quarantined"] = float(quarantined)
    volume.unlink(missing_ok=True)
    return rows


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def flip_latency(workdir: Path, flips: int = 100) -> dict[str, float]:
    """Set and clear the flag `flips` times; server-side flip time and client round trip (ms)."""
    volume = workdir / "flip.img"
    volume.unlink(missing_ok=True)
    create_volume(volume, CreateOptions(size=64 << 20))
    server_ms: list[float] = []
    rtt_ms: list[float] = []
    with ServerProcess([volume], workdir / "f") as server:
        for i in range(flips):
            started = time.perf_counter()
            reply = client.persistent_disk_dangling(
                server.control, volume.stem, clear=bool(i % 2), reason="bench"
            )
            rtt_ms.append((time.perf_counter() - started) * 1e3)
            server_ms.append(reply["flip_ns"] / 1e6)
    # The floor under any durable flip: one 4 KiB write + fdatasync on the same file system.
    fsync_ms: list[float] = []
    probe = workdir / "fsync.probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for _ in range(flips):
            started = time.perf_counter()
            os.pwrite(fd, os.urandom(4096), 0)
            os.fdatasync(fd)
            fsync_ms.append((time.perf_counter() - started) * 1e3)
    finally:
        os.close(fd)
    volume.unlink(missing_ok=True)
    return {
        "flip_p50_ms": statistics.median(server_ms),
        "flip_p99_ms": _percentile(server_ms, 0.99),
        "rtt_p50_ms": statistics.median(rtt_ms),
        "rtt_p99_ms": _percentile(rtt_ms, 0.99),
        "fsync_p50_ms": statistics.median(fsync_ms),
        "fsync_p99_ms": _percentile(fsync_ms, 0.99),
    }


def table_rows(quarantine: dict[str, float], flip: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """(row, value, reference, ratio) lines for the benchmark's second table."""
    ratio = quarantine["dangling"] / quarantine["normal"] if quarantine["normal"] else float("nan")
    return [
        ("4k randwrite QD32 IOPS, dangling (quarantine) vs attached",
         f"{quarantine['dangling']:,.0f}", f"{quarantine['normal']:,.0f}", f"{ratio:.2f}x"),
        ("Persistent_Disk_Dangling flip p50 / p99 (ms, in daemon)",
         f"{flip['flip_p50_ms']:.2f} / {flip['flip_p99_ms']:.2f}",
         f"fdatasync {flip['fsync_p50_ms']:.2f} / {flip['fsync_p99_ms']:.2f}",
         f"+{flip['flip_p50_ms'] - flip['fsync_p50_ms']:.2f} ms"),
        ("ioctl round trip p50 / p99 (ms, client)",
         f"{flip['rtt_p50_ms']:.2f} / {flip['rtt_p99_ms']:.2f}", "", ""),
    ]


def as_json(quarantine: dict[str, float], flip: dict[str, float]) -> dict[str, Any]:
    return {"quarantine": quarantine, "flip": flip}
