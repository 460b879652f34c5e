"""`vhost-pv demo`: the main job on a default volume, end to end, with a readable summary.

Creates a volume, serves it with `vhost-pv serve`, boots a small QEMU guest (TCG) that
attaches it as a vhost-user-blk disk and runs a verifying fio job, then prints what the
guest measured beside what the backend counted.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import VhostUserBlkDisk, ensure_guest_image, guest_image_dir, run_guest
from vhost_pv_tools.serverproc import ServerProcess

FIO_JOB = """
set -e
echo "guest kernel $(uname -r), disk: $(cat /sys/block/vda/size) sectors"
fio --name=demo --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randrw --rwmixread=50 --bs=4k --size=100% --verify=crc32c --verify_fatal=1 \
    --output-format=json --output=/tmp/fio.json
echo "=== BEGIN fio ==="
cat /tmp/fio.json
echo "=== END fio ==="
"""


def run_demo(workdir: Path | None = None, *, size: int = 256 << 20) -> int:
    console = Console()
    base = workdir or guest_image_dir().parent / "demo"
    base.mkdir(parents=True, exist_ok=True)
    volume = base / "default.img"
    volume.unlink(missing_ok=True)
    header = create_volume(volume, CreateOptions(size=size, owner="demo"))
    console.print(f"[bold]volume[/] {volume}: {size >> 20} MiB, uuid {header.uuid}")

    image = ensure_guest_image()
    rundir = Path(tempfile.mkdtemp(prefix="vhost-pv-demo-"))
    try:
        with ServerProcess([volume], rundir) as server:
            console.print(f"[bold]serving[/] on {server.socket_for(volume)} (pid {server.pid})")
            console.print("[bold]booting[/] QEMU guest (TCG), running fio with crc32c verify ...")
            result = run_guest(
                FIO_JOB,
                disks=[VhostUserBlkDisk(server.socket_for(volume))],
                image=image,
                timeout=600,
            )
            status = client.status(server.control)
        fio_text = result.section("fio")
        if result.exit_code != 0 or fio_text is None:
            console.print(f"[red]guest job failed (exit {result.exit_code})[/]")
            console.print(result.console[-4000:])
            return 1
        _summary(console, json.loads(fio_text), status)
        return 0
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _summary(console: Console, fio: dict[str, Any], status: dict[str, Any]) -> None:
    job = fio["jobs"][0]
    table = Table(title="vhost-pv demo: fio in a QEMU guest on a vhost-pv volume")
    table.add_column("")
    table.add_column("read", justify="right")
    table.add_column("write", justify="right")
    for label, key, fmt in (
        ("IOPS", "iops", "{:,.0f}"),
        ("MiB/s", "bw", "{:,.1f}"),
        ("I/Os", "total_ios", "{:,}"),
    ):
        values = []
        for side in ("read", "write"):
            value = job[side][key]
            values.append(fmt.format(value / 1024 if key == "bw" else value))
        table.add_row(label, *values)
    table.add_row("p99 latency (us)",
                  *(f"{job[s]['clat_ns']['percentile'].get('99.000000', 0) / 1000:,.0f}"
                    for s in ("read", "write")))
    console.print(table)
    errors = job["error"]
    console.print(f"fio verify errors: [bold]{errors}[/] "
                  f"({'all data verified' if errors == 0 else 'DATA MISMATCH'})")
    volume = status["volumes"][0]
    # The guest has powered off by now, so the counters come from the per-volume totals
    # the daemon keeps across connections.
    totals = volume["totals"]
    console.print(f"backend served {totals['requests']:,} requests "
                  f"({totals['reads']:,} reads, {totals['writes']:,} writes, "
                  f"{totals['flushes']:,} flushes) over {volume['connections_total']} connection(s), "
                  f"{totals['io_errors']} I/O errors; volume state {volume['header']['state']}")
