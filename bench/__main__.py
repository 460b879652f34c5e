"""`make bench`: fio in a TCG guest against vhost-pv and qemu-storage-daemon, side by side.

Both backends serve the same bytes of the same file (QSD through a raw node with the volume's
data offset and size), both with the host page cache (no O_DIRECT on the host), and the same
guest runs the same fio jobs. Rounds alternate between the backends so drift on the machine
hits both alike. Performance goals are read from this table, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import dangling
from bench.qsd import QsdProcess
from vhost_pv.guest import VhostUserBlkDisk, ensure_guest_image, run_guest
from vhost_pv.serverproc import ServerProcess
from vhost_pv.volume.volume import CreateOptions, create_volume

WORKLOADS = [
    ("4k randread QD32", "--rw=randread --bs=4k --iodepth=32"),
    ("4k randwrite QD32", "--rw=randwrite --bs=4k --iodepth=32"),
    # QD1 shows what kick coalescing costs a driver with one request in flight.
    ("4k randread QD1", "--rw=randread --bs=4k --iodepth=1"),
    ("128k read", "--rw=read --bs=128k --iodepth=8"),
    ("128k write", "--rw=write --bs=128k --iodepth=8"),
]


def fio_job(runtime: int) -> str:
    jobs = " ".join(
        f"--name={name.replace(' ', '_')} {args} --stonewall" for name, args in WORKLOADS
    )
    return f"""
set -e
fio --output-format=json --output=/tmp/fio.json --filename=/dev/vda --direct=1 \\
    --ioengine=libaio --time_based --runtime={runtime} --ramp_time=2 --size=100% {jobs}
echo "=== BEGIN fio ==="
cat /tmp/fio.json
echo "=== END fio ==="
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def run_round(
    label: str,
    backend: Callable[[], AbstractContextManager[Any]],
    socket_of: Callable[[Any], Path],
    runtime: int,
    queues: int,
) -> dict[str, Any]:
    with backend() as server:
        before = cpu_seconds(server.pid)
        result = run_guest(
            fio_job(runtime),
            disks=[VhostUserBlkDisk(socket_of(server), num_queues=queues)],
            cpus=2 if queues > 1 else 1,
            timeout=120 + 10 * runtime * len(WORKLOADS),
        )
        cpu = cpu_seconds(server.pid) - before
    text = result.section("fio")
    if result.exit_code != 0 or text is None:
        raise RuntimeError(f"{label}: guest fio failed:\n{result.console[-3000:]}")
    fio = json.loads(text)
    rows: dict[str, Any] = {"cpu_s": cpu}
    total_ios = 0
    for (name, _), job in zip(WORKLOADS, fio["jobs"], strict=True):
        ios = job["read"]["iops"] + job["write"]["iops"]
        bw = (job["read"]["bw"] + job["write"]["bw"]) / 1024
        lat = max(job["read"]["clat_ns"]["mean"], job["write"]["clat_ns"]["mean"]) / 1000
        rows[name] = {"iops": ios, "mib_s": bw, "lat_us": lat, "errors": job["error"]}
        total_ios += job["read"]["total_ios"] + job["write"]["total_ios"]
    rows["cpu_us_per_io"] = cpu * 1e6 / max(total_ios, 1)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runtime", type=int, default=int(os.environ.get("BENCH_RUNTIME", "8")))
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "2")))
    parser.add_argument("--size", type=int, default=256, help="volume size in MiB")
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    console = Console(width=150)  # a table, not a terminal: keep the columns readable in logs
    ensure_guest_image()

    with tempfile.TemporaryDirectory(prefix="vhost-pv-bench-") as tmp:
        workdir = Path(tmp)
        volume = workdir / "bench.img"
        header = create_volume(volume, CreateOptions(size=args.size << 20))
        # Fill the data region so reads hit real blocks on both backends.
        with open(volume, "r+b") as f:
            f.seek(header.data_offset)
            chunk = os.urandom(1 << 20)
            for _ in range(args.size):
                f.write(chunk)
        results: dict[str, list[dict[str, Any]]] = {"vhost-pv": [], "qsd": []}
        for round_no in range(args.rounds):
            console.print(f"round {round_no + 1}/{args.rounds}: vhost-pv")
            results["vhost-pv"].append(run_round(
                "vhost-pv",
                lambda: ServerProcess([volume], workdir, queues=args.queues),
                lambda s: s.socket_for(volume),
                args.runtime, args.queues,
            ))
            console.print(f"round {round_no + 1}/{args.rounds}: qemu-storage-daemon")
            results["qsd"].append(run_round(
                "qsd",
                lambda: QsdProcess(volume, header, workdir / "qsd.sock", queues=args.queues),
                lambda s: s.socket,
                args.runtime, args.queues,
            ))

    table = Table(title=f"fio in a TCG guest, {args.queues} queue(s), host page cache on both "
                        f"(mean of {args.rounds} rounds, {args.runtime} s each)")
    for column in ("workload", "vhost-pv IOPS", "QSD IOPS", "ratio", "vhost-pv MiB/s", "QSD MiB/s",
                   "vhost-pv lat us", "QSD lat us"):
        table.add_column(column, justify="right" if column != "workload" else "left")
    summary: dict[str, Any] = {}
    for name, _ in WORKLOADS:
        keys = ("iops", "mib_s", "lat_us")
        ours = {k: statistics.mean(r[name][k] for r in results["vhost-pv"]) for k in keys}
        qsd = {k: statistics.mean(r[name][k] for r in results["qsd"]) for k in keys}
        ratio = ours["iops"] / qsd["iops"] if qsd["iops"] else float("nan")
        summary[name] = {"vhost-pv": ours, "qsd": qsd, "ratio": ratio}
        table.add_row(
            name, f"{ours['iops']:,.0f}", f"{qsd['iops']:,.0f}", f"{ratio:.2f}x",
            f"{ours['mib_s']:,.1f}", f"{qsd['mib_s']:,.1f}",
            f"{ours['lat_us']:,.0f}", f"{qsd['lat_us']:,.0f}",
        )
    cpu_ours = statistics.mean(r["cpu_us_per_io"] for r in results["vhost-pv"])
    cpu_qsd = statistics.mean(r["cpu_us_per_io"] for r in results["qsd"])
    table.add_row("backend CPU us/IO", f"{cpu_ours:.1f}", f"{cpu_qsd:.1f}",
                  f"{cpu_ours / cpu_qsd:.2f}x" if cpu_qsd else "-", "", "", "", "")
    console.print(table)

    console.print("dangling volumes: quarantine path and flip latency ...")
    with tempfile.TemporaryDirectory(prefix="vhost-pv-bench-") as tmp:
        quarantine = dangling.quarantine_rows(Path(tmp), args.runtime)
        flip = dangling.flip_latency(Path(tmp))
    second = Table(title="dangling volumes (vhost-pv only: QSD has no quarantine)")
    for column in ("row", "value", "reference", "ratio"):
        second.add_column(column, justify="left" if column == "row" else "right")
    for row in dangling.table_rows(quarantine, flip):
        second.add_row(*row)
    console.print(second)
    summary["dangling"] = dangling.as_json(quarantine, flip)
    errors = sum(r[name]["errors"] for rs in results.values() for r in rs for name, _ in WORKLOADS)
    console.print(f"fio errors: {errors}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rounds": results}, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
