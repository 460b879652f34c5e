"""`make bench`: vhost-pv beside qemu-storage-daemon on the same file, from the host and from a guest.

First bench/loadgen_table.py's tables from the host: `vhost-pv loadgen` plays the frontend
against vhost-pv and QSD (aio=native/io_uring/threads), host fio on the same file is the
ceiling; an O_DIRECT table and a page-cache table, each with one caching mode for every
backend; then writes to a dangling volume and the daemon's RSS with idle volumes.

Then fio in a TCG guest against both backends: both serve the same bytes of the same file
(QSD through a raw node with the volume's data offset and size), both with the host page
cache, and the same guest runs the same fio jobs. Rounds alternate between the backends so
drift on the machine hits both alike. Last, the guest's quarantine-path writes and the flip
latency (bench/dangling.py).

Performance goals are read from these tables, never asserted in tests. `--only` picks parts;
a failed run shows as "error" in its table (or a failed part as a traceback) and the exit
code is 1, after everything else has been printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import dangling, loadgen_table, metadata_fs, recovery, restart
from bench.qsd import QsdProcess
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import VhostUserBlkDisk, ensure_guest_image, run_guest
from vhost_pv_tools.serverproc import ServerProcess

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


PARTS = ("loadgen-direct", "loadgen-buffered", "loadgen-dangling", "rss", "guest", "dangling", "metadata",
         "recovery", "restart")
ALIASES = {"loadgen": ("loadgen-direct", "loadgen-buffered", "loadgen-dangling"), "all": PARTS}


def parse_parts(text: str) -> set[str]:
    parts: set[str] = set()
    for word in filter(None, (w.strip() for w in text.split(","))):
        if word in ALIASES:
            parts.update(ALIASES[word])
        elif word in PARTS:
            parts.add(word)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown part {word!r}: choose from {', '.join([*ALIASES, *PARTS])}")
    return parts


def mode_line(parts: set[str]) -> str:
    lines = ["caching mode per table:"]
    if "loadgen-direct" in parts:
        lines.append(f"  loadgen table 1: {loadgen_table.DIRECT.title}")
    if "loadgen-buffered" in parts:
        lines.append(f"  loadgen table 2: {loadgen_table.BUFFERED.title}")
    if "loadgen-dangling" in parts:
        lines.append("  loadgen dangling rows: vhost-pv serve --direct (the mode of table 1)")
    if "rss" in parts:
        lines.append("  RSS: vhost-pv serve --direct and without, idle volumes")
    if "guest" in parts:
        lines.append("  guest fio: host page cache on both backends (fio --direct=1 inside the guest)")
    if "dangling" in parts:
        lines.append("  guest dangling rows and flip latency: vhost-pv serve, host page cache")
    if "metadata" in parts:
        lines.append("  metadata fs: reads in a TCG guest, vhost-pv virtio-fs vs virtiofsd cache=none")
    if "recovery" in parts:
        lines.append("  recovery: vhost-pv serve (host page cache), QEMU reconnect=1, kill -9 + restart")
    if "restart" in parts:
        lines.append("  restart: listening sockets kept (fd store / vhost-pv supervise), QEMU reconnect=1, "
                     "restarts by hand with LISTEN_FDS, SIGUSR2 upgrade, kill -9 under supervise")
    return "\n".join(lines)


def metadata_part(console: Console, summary: dict[str, Any]) -> None:
    console.print("metadata file system: file reads in a guest ...")
    with tempfile.TemporaryDirectory(prefix="vhost-pv-bench-") as tmp:
        rows = metadata_fs.metadata_rows(Path(tmp))
    table = Table(title="metadata file reads per second in a TCG guest (shell read loop, "
                        f"{metadata_fs.READS} reads of instance/zone)")
    for column in ("file system", "reads/s", "ratio"):
        table.add_column(column, justify="left" if column == "file system" else "right")
    table.add_row("vhost-pv virtio-fs (serve --meta-socket)", f"{rows['vhost-pv']:,.0f}",
                  f"{rows['ratio']:.2f}x")
    table.add_row("QEMU virtiofsd, cache=none, same content", f"{rows['virtiofsd']:,.0f}", "1.00x")
    console.print(table)
    summary["metadata_fs"] = rows


def loadgen_parts(args: argparse.Namespace, parts: set[str], console: Console,
                  summary: dict[str, Any], problems: list[str]) -> None:
    runtime, rounds = args.loadgen_runtime, args.loadgen_rounds
    with tempfile.TemporaryDirectory(prefix="vhost-pv-bench-") as tmp:
        workdir = Path(tmp)
        modes = [m for key, m in (("loadgen-direct", loadgen_table.DIRECT),
                                  ("loadgen-buffered", loadgen_table.BUFFERED)) if key in parts]
        if modes:
            console.print(f"loadgen: filling a {args.loadgen_size} MiB volume ...")
            volume, header = loadgen_table.prepare(workdir, args.loadgen_size)
            bench = loadgen_table.Bench(volume, header, workdir, runtime, verify=args.loadgen_verify)
            for mode in modes:
                console.print(f"loadgen, {mode.title} ...")
                rows = loadgen_table.run_mode(bench, mode, rounds, console.print)
                console.print(loadgen_table.mode_table(mode, rows, runtime, rounds, args.loadgen_size))
                if mode.direct:
                    for note in loadgen_table.page_cache_fallbacks(rows):
                        console.print(f"  note: {note}", markup=False)
                errors = loadgen_table.mode_errors(rows)
                for error in errors:
                    console.print(f"  error: {error}", markup=False)
                problems.extend(errors)
                summary[f"loadgen_{mode.key}"] = loadgen_table.mode_json(mode, rows)
            volume.unlink(missing_ok=True)
        if "loadgen-dangling" in parts:
            console.print("loadgen: writes to a dangling volume ...")
            mode = loadgen_table.DIRECT
            result = loadgen_table.dangling_writes(workdir, mode, runtime, rounds, verify=args.loadgen_verify)
            console.print(loadgen_table.dangling_table(mode, result, runtime, rounds))
            errors = loadgen_table.dangling_errors(result)
            for error in errors:
                console.print(f"  error: {error}", markup=False)
            problems.extend(errors)
            summary["loadgen_dangling"] = result.to_json()
        if "rss" in parts:
            console.print("daemon RSS with idle volumes ...")
            results = [loadgen_table.rss(workdir, mode)
                       for mode in (loadgen_table.DIRECT, loadgen_table.BUFFERED)]
            console.print(loadgen_table.rss_table(results))
            for result_rss in results:
                problems.extend(result_rss.errors)
            summary["rss"] = [r.to_json() for r in results]


def guest_part(args: argparse.Namespace, console: Console, summary: dict[str, Any],
               rounds_out: dict[str, Any], problems: list[str]) -> None:
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
        rounds_out.update(results)
        for round_no in range(args.rounds):
            console.print(f"guest fio, round {round_no + 1}/{args.rounds}: vhost-pv")
            results["vhost-pv"].append(run_round(
                "vhost-pv",
                lambda: ServerProcess([volume], workdir, queues=args.queues),
                lambda s: s.socket_for(volume),
                args.runtime, args.queues,
            ))
            console.print(f"guest fio, round {round_no + 1}/{args.rounds}: qemu-storage-daemon")
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
    guest: dict[str, Any] = {}
    for name, _ in WORKLOADS:
        keys = ("iops", "mib_s", "lat_us")
        ours = {k: statistics.mean(r[name][k] for r in results["vhost-pv"]) for k in keys}
        qsd = {k: statistics.mean(r[name][k] for r in results["qsd"]) for k in keys}
        ratio = ours["iops"] / qsd["iops"] if qsd["iops"] else float("nan")
        guest[name] = {"vhost-pv": ours, "qsd": qsd, "ratio": ratio}
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
    summary.update(guest)
    errors = sum(r[name]["errors"] for rs in results.values() for r in rs for name, _ in WORKLOADS)
    console.print(f"fio errors: {errors}")
    if errors:
        problems.append(f"guest fio: {errors} fio errors")


def dangling_part(args: argparse.Namespace, console: Console, summary: dict[str, Any]) -> None:
    console.print("dangling volumes: quarantine path and flip latency ...")
    with tempfile.TemporaryDirectory(prefix="vhost-pv-bench-") as tmp:
        quarantine = dangling.quarantine_rows(Path(tmp), args.runtime)
        flip = dangling.flip_latency(Path(tmp))
    second = Table(title="dangling volumes, fio in a TCG guest (vhost-pv only: QSD has no quarantine)")
    for column in ("row", "value", "reference", "ratio"):
        second.add_column(column, justify="left" if column == "row" else "right")
    for row in dangling.table_rows(quarantine, flip):
        second.add_row(*row)
    console.print(second)
    summary["dangling"] = dangling.as_json(quarantine, flip)


def recovery_part(args: argparse.Namespace, console: Console, summary: dict[str, Any],
                  problems: list[str]) -> None:
    console.print(f"crash recovery: {args.kills} x kill -9 under fio --verify in a guest ...")
    with tempfile.TemporaryDirectory(prefix="vhost-pv-bench-") as tmp:
        rows = recovery.recovery_rows(Path(tmp), kills=args.kills)
    table = Table(title="crash recovery: daemon kill -9 and immediate restart under fio --verify in a "
                        "TCG guest (QEMU reconnect=1, inflight area handed back)")
    for column in ("row", "value", "goal"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row in recovery.table_rows(rows):
        table.add_row(*row)
    console.print(table)
    summary["recovery"] = rows
    if rows["fio_errors"]:
        problems.append(f"crash recovery: {rows['fio_errors']} fio verify errors")


def restart_part(args: argparse.Namespace, console: Console, summary: dict[str, Any],
                 problems: list[str]) -> None:
    console.print(f"restarts: {args.restart_rounds} x {len(restart.WAYS)} restarts with the sockets kept "
                  "under fio --verify in a guest ...")
    with tempfile.TemporaryDirectory(prefix="vhost-pv-bench-") as tmp:
        rows = restart.restart_rows(Path(tmp), rounds=args.restart_rounds)
    table = Table(title="restarts the guest does not notice: listening sockets kept across the restart, "
                        f"fio --verify in a TCG guest (QEMU reconnect={restart.RECONNECT_S}, whole seconds "
                        "in QEMU 7.2)")
    for column in ("row", "value", "goal"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row in restart.table_rows(rows):
        table.add_row(*row)
    console.print(table)
    summary["restart"] = rows
    if rows["fio_errors"]:
        problems.append(f"restart: {rows['fio_errors']} fio verify or probe errors")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    env_runtime = os.environ.get("BENCH_RUNTIME")
    parser.add_argument("--runtime", type=int, default=int(env_runtime) if env_runtime else None,
                        help="seconds per fio job in the guest (default 8) and, unless "
                        "--loadgen-runtime says otherwise, per loadgen run (default 5); "
                        "env BENCH_RUNTIME")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "2")),
                        help="guest fio rounds (default 2, env BENCH_ROUNDS)")
    parser.add_argument("--size", type=int, default=256, help="guest fio volume size in MiB")
    parser.add_argument("--queues", type=int, default=1, help="guest fio queues")
    env_lg_runtime = os.environ.get("BENCH_LOADGEN_RUNTIME")
    parser.add_argument("--loadgen-runtime", type=int,
                        default=int(env_lg_runtime) if env_lg_runtime else None,
                        help="seconds per loadgen/host fio run (env BENCH_LOADGEN_RUNTIME)")
    parser.add_argument("--loadgen-rounds", type=int,
                        default=int(os.environ.get("BENCH_LOADGEN_ROUNDS", "1")),
                        help="loadgen rounds per row, order rotated each round, mean shown "
                        "(default 1, env BENCH_LOADGEN_ROUNDS)")
    parser.add_argument("--loadgen-size", type=int, default=1024,
                        help="loadgen volume data region in MiB (default 1024)")
    parser.add_argument("--loadgen-verify", action="store_true",
                        help="loadgen --verify on every vhost-user run (prefills and checks; "
                        "slower, and host fio cannot do the same)")
    parser.add_argument("--only", type=parse_parts, default=set(PARTS),
                        help=f"comma-separated parts: {', '.join(ALIASES)}, {', '.join(PARTS)} "
                        "(default: all)")
    parser.add_argument("--kills", type=int, default=5,
                        help="crash recovery: daemon kills under the guest (default 5)")
    parser.add_argument("--restart-rounds", type=int, default=2,
                        help=f"restart: guests, each through the {len(restart.WAYS)} ways to restart "
                        "(default 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.loadgen_runtime = args.loadgen_runtime or args.runtime or 5
    args.runtime = args.runtime or 8
    parts: set[str] = args.only
    # Tables, not a terminal: keep the columns readable in logs.
    console = Console(width=190)
    console.print(mode_line(parts))
    started = time.monotonic()
    summary: dict[str, Any] = {}
    rounds_out: dict[str, Any] = {}
    problems: list[str] = []

    def attempt(name: str, body: Callable[[], object]) -> None:
        try:
            body()
        except Exception as exc:  # report, go on with the other parts
            console.print(f"{name} failed:", markup=False)
            console.print(traceback.format_exc(), markup=False)
            problems.append(f"{name}: {type(exc).__name__}: {exc}")

    if parts & {"loadgen-direct", "loadgen-buffered", "loadgen-dangling", "rss"}:
        attempt("loadgen", lambda: loadgen_parts(args, parts, console, summary, problems))
    guest_parts = parts & {"guest", "dangling", "recovery", "restart"}
    if guest_parts:
        before = len(problems)
        attempt("guest image", ensure_guest_image)
        if len(problems) > before:
            guest_parts = set()
    if "guest" in guest_parts:
        attempt("guest fio", lambda: guest_part(args, console, summary, rounds_out, problems))
    if "dangling" in guest_parts:
        attempt("guest dangling", lambda: dangling_part(args, console, summary))
    if "metadata" in parts:
        attempt("metadata fs", lambda: metadata_part(console, summary))
    if "recovery" in guest_parts:
        attempt("crash recovery", lambda: recovery_part(args, console, summary, problems))
    if "restart" in guest_parts:
        attempt("restart", lambda: restart_part(args, console, summary, problems))

    elapsed = time.monotonic() - started
    console.print(f"bench took {elapsed / 60:.1f} min; "
                  + (f"{len(problems)} failure(s):" if problems else "no failures"))
    for problem in problems:
        console.print(f"  {problem}", markup=False)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rounds": rounds_out,
                                         "elapsed_s": elapsed, "failures": problems}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
