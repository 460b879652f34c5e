"""Benchmark tables from the host: `vhost-pv loadgen` plays the frontend against vhost-pv and
qemu-storage-daemon serving the same bytes of the same file, and host fio on that file is the
ceiling; then writes to a dangling volume, and the daemon's RSS with idle volumes.

Fairness rules, the reason this module exists:

* one backing file for every backend of a table (QSD through a raw node with the volume's
  data offset and size, host fio with --offset/--size on the same range);
* one caching mode per table, the same for every backend: O_DIRECT (vhost-pv serve --direct,
  QSD cache.direct=on, fio --direct=1) or the host page cache (vhost-pv serve, QSD
  cache.direct=off, fio --direct=0, the file read once beforehand so every backend starts
  warm); the mode is in the table's title;
* for each row the backends run back to back (same minute), in an order rotated from row to
  row and round to round, each freshly started with as many queues as the row uses; `sync`
  before every run so no backend pays for another's dirty pages.

Performance goals are read from these tables, never asserted. A run that fails shows as
"error" and makes `python -m bench` exit non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from bench.qsd import QsdProcess
from vhost_pv.control import client
from vhost_pv.volume.header import RingFullPolicy, VolumeHeader
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.loadgen import LoadgenResult, run_loadgen
from vhost_pv_tools.serverproc import ServerProcess

VHOST_PV = "vhost-pv"
HOST = "host fio"
RSS_GOAL_BASE_MIB = 60.0
RSS_GOAL_PER_VOLUME_MIB = 0.5


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # loadgen and fio spell these the same
    bs: int
    iodepth: int


WORKLOADS = (
    Workload("4k randread QD1", "randread", 4096, 1),
    Workload("4k randread QD32", "randread", 4096, 32),
    Workload("4k randwrite QD1", "randwrite", 4096, 1),
    Workload("4k randwrite QD32", "randwrite", 4096, 32),
    Workload("128k read QD8", "read", 128 << 10, 8),
    Workload("128k write QD8", "write", 128 << 10, 8),
)


@dataclasses.dataclass(frozen=True)
class Mode:
    key: str
    title: str
    direct: bool
    qsd_aios: tuple[str, ...]
    workloads: tuple[Workload, ...]
    queues: tuple[int, ...]

    @property
    def backends(self) -> list[str]:
        return [VHOST_PV, *(qsd_name(aio) for aio in self.qsd_aios), HOST]

    @property
    def vhost_pv_args(self) -> list[str]:
        return ["--direct"] if self.direct else []


DIRECT = Mode(
    "direct",
    "O_DIRECT on every backend (vhost-pv serve --direct, QSD cache.direct=on, host fio --direct=1)",
    True, ("native", "io_uring"), WORKLOADS, (1, 2),
)
BUFFERED = Mode(
    "buffered",
    "host page cache on every backend (vhost-pv serve without --direct, QSD cache.direct=off, "
    "host fio --direct=0 as a reference, not a ceiling), file read into the cache first",
    False, ("io_uring", "threads"), WORKLOADS[:4], (1,),
)
MODES = {mode.key: mode for mode in (DIRECT, BUFFERED)}


def qsd_name(aio: str) -> str:
    return f"QSD {aio}"


class BenchError(RuntimeError):
    """One run failed: I/O errors, a verify mismatch, fio failing."""


@dataclasses.dataclass
class Sample:
    """One run of one backend."""

    iops: float
    mib_s: float
    p50_us: float
    p99_us: float
    cpu_us_per_io: float | None  # the backend's CPU (for host fio: fio's own, kernel included)
    ios: int
    raw: dict[str, Any]


@dataclasses.dataclass
class Cell:
    """One backend on one row, over the rounds."""

    samples: list[Sample] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.samples) and not self.errors

    def mean(self, key: str) -> float | None:
        values = [getattr(s, key) for s in self.samples]
        if not self.ok or any(v is None for v in values):
            return None
        return float(statistics.mean(values))

    def to_json(self) -> dict[str, Any]:
        keys = ("iops", "mib_s", "p50_us", "p99_us", "cpu_us_per_io")
        return {
            "ok": self.ok,
            "mean": {k: self.mean(k) for k in keys} if self.ok else None,
            "errors": self.errors,
            "rounds": [dataclasses.asdict(s) for s in self.samples],
        }


@dataclasses.dataclass
class Row:
    workload: Workload
    queues: int
    cells: dict[str, Cell]
    order: list[list[str]]  # the order the backends ran in, per round

    def best_qsd(self, mode: Mode) -> str | None:
        """The QSD variant with the most IOPS on this row (None if none of them ran)."""
        ran = [(self.cells[qsd_name(a)].mean("iops"), qsd_name(a)) for a in mode.qsd_aios]
        ok = [(iops, name) for iops, name in ran if iops is not None]
        return max(ok)[1] if ok else None


@dataclasses.dataclass
class Bench:
    """What every run of a table shares: the volume file, a scratch directory, the knobs."""

    volume: Path
    header: VolumeHeader
    workdir: Path
    runtime: float
    verify: bool = False

    def run(self, mode: Mode, backend: str, workload: Workload, queues: int) -> Sample:
        if backend == VHOST_PV:
            return self._vhost_pv(mode, workload, queues)
        if backend == HOST:
            return self._host_fio(mode, workload, queues)
        for aio in mode.qsd_aios:
            if backend == qsd_name(aio):
                return self._qsd(mode, aio, workload, queues)
        raise ValueError(backend)

    def _loadgen(self, socket: Path, pid: int, workload: Workload, queues: int) -> Sample:
        result = run_loadgen(socket, workload.rw, workload.bs, workload.iodepth, queues, self.runtime,
                             verify=self.verify, backend_pid=pid)
        return loadgen_sample(result)

    def _vhost_pv(self, mode: Mode, workload: Workload, queues: int) -> Sample:
        with ServerProcess([self.volume], self.workdir / f"vhost-pv-{mode.key}", queues=queues,
                           extra_args=mode.vhost_pv_args) as server:
            sample = self._loadgen(server.socket_for(self.volume), server.pid, workload, queues)
            # The daemon's own counters go with the sample: direct_fallbacks says whether any
            # request of an O_DIRECT run went through the page cache after all.
            sample.raw["daemon_totals"] = client.status(server.control)["volumes"][0]["totals"]
            return sample

    def _qsd(self, mode: Mode, aio: str, workload: Workload, queues: int) -> Sample:
        with QsdProcess(self.volume, self.header, self.workdir / f"qsd-{aio}.sock", queues=queues,
                        aio=aio, direct=mode.direct) as qsd:
            return self._loadgen(qsd.socket, qsd.pid, workload, queues)

    def _host_fio(self, mode: Mode, workload: Workload, queues: int) -> Sample:
        return host_fio(self.volume, self.header, mode.direct, workload, queues, self.runtime)


def loadgen_sample(result: LoadgenResult) -> Sample:
    if not result.ok:
        raise BenchError(f"{result.errors} I/O errors, {result.verify_mismatches} verify mismatches"
                         + (", interrupted" if result.interrupted else ""))
    return Sample(result.iops, result.mib_s, result.lat_p50_us, result.lat_p99_us,
                  result.backend_cpu_us_per_io, result.ios, result.to_dict())


def fio_command(volume: Path, header: VolumeHeader, direct: bool, workload: Workload, queues: int,
                runtime: float) -> list[str]:
    """fio on the data region the backends serve; with several jobs, sequential ones each
    stream their own slice (loadgen's queues start at capacity * i / queues likewise)."""
    size = header.capacity
    extra: list[str] = []
    if queues > 1:
        extra.append("--group_reporting")
        if workload.rw in ("read", "write"):
            size = header.capacity // queues // workload.bs * workload.bs
            extra.append(f"--offset_increment={size}")
    return [
        "fio", "--name=ceiling", f"--filename={volume}", f"--offset={header.data_offset}",
        f"--size={size}", f"--direct={int(direct)}", "--ioengine=io_uring", f"--rw={workload.rw}",
        f"--bs={workload.bs}", f"--iodepth={workload.iodepth}", f"--numjobs={queues}",
        "--time_based", f"--runtime={runtime:g}", "--invalidate=0", "--norandommap",
        "--lat_percentiles=1", "--output-format=json", *extra,
    ]


def host_fio(volume: Path, header: VolumeHeader, direct: bool, workload: Workload, queues: int,
             runtime: float) -> Sample:
    cmd = fio_command(volume, header, direct, workload, queues, runtime)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"fio timed out after {exc.timeout} s") from exc
    if done.returncode != 0:
        raise BenchError(f"fio exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    text = done.stdout
    try:
        job = json.loads(text[text.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        raise BenchError(f"fio printed no JSON result: {text[-500:]!r}") from exc
    if job["error"]:
        raise BenchError(f"fio job error {job['error']}")
    side = job["read"] if workload.rw in ("read", "randread") else job["write"]
    ios = int(side["total_ios"])
    percentiles = side["lat_ns"].get("percentile") or side["clat_ns"]["percentile"]
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
    return Sample(
        iops=float(side["iops"]),
        mib_s=side["bw"] / 1024,
        p50_us=percentiles["50.000000"] / 1000,
        p99_us=percentiles["99.000000"] / 1000,
        cpu_us_per_io=cpu_s * 1e6 / ios if ios else None,
        ios=ios,
        raw={"cmd": cmd, "job": {k: job[k] for k in ("usr_cpu", "sys_cpu", "job_runtime", "ctx")},
             "side": {k: side[k] for k in ("iops", "bw", "total_ios", "lat_ns")}},
    )


# -- the volume ----------------------------------------------------------------------------


def fill(volume: Path, header: VolumeHeader) -> None:
    """Random data in the whole data region, on disk, so reads hit real blocks everywhere."""
    chunk = os.urandom(1 << 20)
    with open(volume, "r+b") as f:
        f.seek(header.data_offset)
        left = header.capacity
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())


def drop_cache(volume: Path) -> None:
    """Evict the file from the page cache (it was fsynced), for the O_DIRECT table."""
    fd = os.open(volume, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(volume: Path) -> None:
    """Read the whole file once, for the page-cache table: every backend starts warm."""
    with open(volume, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def prepare(workdir: Path, size_mib: int) -> tuple[Path, VolumeHeader]:
    volume = workdir / "loadgen.img"
    volume.unlink(missing_ok=True)
    header = create_volume(volume, CreateOptions(size=size_mib << 20))
    fill(volume, header)
    return volume, header


# -- the tables ----------------------------------------------------------------------------


def rotated(items: Sequence[str], by: int) -> list[str]:
    k = by % len(items)
    return [*items[k:], *items[:k]]


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run_mode(bench: Bench, mode: Mode, rounds: int, progress: Callable[[str], None]) -> list[Row]:
    if mode.direct:
        drop_cache(bench.volume)
    else:
        warm_cache(bench.volume)
    rows: list[Row] = []
    index = 0
    for queues in mode.queues:
        for workload in mode.workloads:
            row = Row(workload, queues, {b: Cell() for b in mode.backends}, [])
            for round_no in range(rounds):
                order = rotated(mode.backends, index + round_no)
                row.order.append(order)
                for backend in order:
                    os.sync()  # nobody pays for another backend's dirty pages
                    try:
                        row.cells[backend].samples.append(bench.run(mode, backend, workload, queues))
                    except Exception as exc:  # any failure is an "error" cell
                        row.cells[backend].errors.append(short_error(exc))
            index += 1
            progress(f"  {mode.key}: {workload.name}, {queues} queue(s): " + ", ".join(
                f"{b} {_fmt_iops(row.cells[b].mean('iops'), row.cells[b])}" for b in mode.backends))
            rows.append(row)
    return rows


def _fmt_iops(value: float | None, cell: Cell) -> str:
    """Mean IOPS; with several rounds, +-half their range in percent (the run-to-run noise)."""
    if not cell.ok or value is None:
        return "error"
    text = f"{value:,.0f}"
    if len(cell.samples) > 1 and value:
        spread = max(s.iops for s in cell.samples) - min(s.iops for s in cell.samples)
        text += f" ±{50 * spread / value:.0f}%"
    return text


def _fmt_ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num is not None and den else "-"


def _fmt_lat(cell: Cell | None) -> str:
    if cell is None or not cell.ok:
        return "error" if cell is not None else "-"
    p50, p99 = cell.mean("p50_us"), cell.mean("p99_us")
    return f"{p50:,.0f} / {p99:,.0f}" if p50 is not None and p99 is not None else "-"


def _fmt_cpu(cell: Cell | None) -> str:
    if cell is None or not cell.ok:
        return "error" if cell is not None else "-"
    cpu = cell.mean("cpu_us_per_io")
    return "n/a" if cpu is None else f"{cpu:.2f}"


def mode_table(mode: Mode, rows: list[Row], runtime: float, rounds: int, size_mib: int) -> Table:
    table = Table(title=f"loadgen from the host, {mode.title}; one {size_mib} MiB data region, "
                        f"{runtime:g} s per run, {rounds} round(s), backends in rotated order")
    qsd = [qsd_name(a) for a in mode.qsd_aios]
    headers = ["workload", "q", "vhost-pv\nIOPS", *(f"{n}\nIOPS" for n in qsd), "host fio\nIOPS",
               "vhost-pv /\nbest QSD", "vhost-pv /\nhost fio", "vhost-pv\np50/p99 us",
               "best QSD\np50/p99 us", "host fio\np50/p99 us", "vhost-pv\nCPU us/IO",
               "best QSD\nCPU us/IO"]
    for header in headers:
        table.add_column(header, justify="left" if header == "workload" else "right")
    for row in rows:
        ours = row.cells[VHOST_PV]
        best = row.best_qsd(mode)
        best_cell = row.cells[best] if best else None
        host = row.cells[HOST]
        ours_iops = ours.mean("iops")
        table.add_row(
            row.workload.name, str(row.queues),
            _fmt_iops(ours_iops, ours),
            *(_fmt_iops(row.cells[n].mean("iops"), row.cells[n]) for n in qsd),
            _fmt_iops(host.mean("iops"), host),
            _fmt_ratio(ours_iops, best_cell.mean("iops") if best_cell else None)
            + (f" ({best.removeprefix('QSD ')})" if best else ""),
            _fmt_ratio(ours_iops, host.mean("iops")),
            _fmt_lat(ours), _fmt_lat(best_cell), _fmt_lat(host), _fmt_cpu(ours), _fmt_cpu(best_cell),
        )
    return table


def page_cache_fallbacks(rows: list[Row]) -> list[str]:
    """O_DIRECT runs of vhost-pv where some requests went through the page cache (the device
    refused their alignment): printed under the table, so the row is not read as pure O_DIRECT."""
    notes = []
    for row in rows:
        for sample in row.cells[VHOST_PV].samples:
            fallbacks = int(sample.raw.get("daemon_totals", {}).get("direct_fallbacks", 0))
            if fallbacks:
                notes.append(f"{row.workload.name}, {row.queues} queue(s): vhost-pv served {fallbacks} "
                             f"of {sample.ios} requests through the page cache (direct_fallbacks)")
    return notes


def mode_errors(rows: list[Row]) -> list[str]:
    return [f"{row.workload.name}, {row.queues} queue(s), {backend}: {error}"
            for row in rows for backend, cell in row.cells.items() for error in cell.errors]


def mode_json(mode: Mode, rows: list[Row]) -> dict[str, Any]:
    return {
        "mode": mode.key,
        "title": mode.title,
        "rows": [
            {
                "workload": dataclasses.asdict(row.workload),
                "queues": row.queues,
                "order": row.order,
                "best_qsd": row.best_qsd(mode),
                "backends": {name: cell.to_json() for name, cell in row.cells.items()},
            }
            for row in rows
        ],
    }


# -- dangling writes -----------------------------------------------------------------------
#
# The daemon refuses a new frontend on a dangling volume (reclaim first), so both phases run
# on one loadgen connection, as a guest would see them: `vhost-pv loadgen` in a child process,
# the daemon's own counters (requests, quarantined) and its CPU time sampled over one window
# before the flip and one after the seal, then SIGINT ends the run. Per-phase latency
# percentiles are not available that way (the loadgen histogram spans both phases).

DANGLING_WORKLOAD = Workload("4k randwrite QD32", "randwrite", 4096, 32)
DANGLING_WARMUP_S = 1.0
DANGLING_SEAL_BUDGET_S = 60.0


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Snapshot:
    at: float
    cpu_s: float
    totals: dict[str, int]

    @classmethod
    def take(cls, control: Path, pid: int) -> Snapshot:
        totals = client.status(control)["volumes"][0]["totals"]
        return cls(time.monotonic(), process_cpu_seconds(pid), totals)


@dataclasses.dataclass
class Window:
    """What the daemon did between two snapshots."""

    seconds: float
    requests: int
    quarantined: int
    failed: int  # io_errors + quarantine_refused + bad_requests
    cpu_s: float

    @classmethod
    def between(cls, a: Snapshot, b: Snapshot) -> Window:
        def delta(key: str) -> int:
            return int(b.totals.get(key, 0)) - int(a.totals.get(key, 0))

        return cls(b.at - a.at, delta("requests"), delta("quarantined"),
                   delta("io_errors") + delta("quarantine_refused") + delta("bad_requests"),
                   b.cpu_s - a.cpu_s)

    @property
    def iops(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_io(self) -> float | None:
        return self.cpu_s * 1e6 / self.requests if self.requests else None


@dataclasses.dataclass
class DanglingResult:
    attached: list[Window] = dataclasses.field(default_factory=list)
    dangling: list[Window] = dataclasses.field(default_factory=list)
    seal_wait_s: list[float] = dataclasses.field(default_factory=list)
    loadgen: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.attached) and bool(self.dangling)

    @staticmethod
    def mean(windows: list[Window], key: str) -> float | None:
        values = [getattr(w, key) for w in windows]
        if not values or any(v is None for v in values):
            return None
        return float(statistics.mean(values))

    def to_json(self) -> dict[str, Any]:
        def windows(ws: list[Window]) -> list[dict[str, Any]]:
            return [{**dataclasses.asdict(w), "iops": w.iops, "cpu_us_per_io": w.cpu_us_per_io}
                    for w in ws]

        return {"ok": self.ok, "attached": windows(self.attached), "dangling": windows(self.dangling),
                "seal_wait_s": self.seal_wait_s, "loadgen": self.loadgen, "errors": self.errors}


def _wait_sealed(control: Path, timeout: float) -> float:
    started = time.monotonic()
    while not client.status(control)["volumes"][0]["guard"]["sealed"]:
        if time.monotonic() - started > timeout:
            raise BenchError(f"the guard did not seal the volume within {timeout:g} s")
        time.sleep(0.05)
    return time.monotonic() - started


def _wait_attached(control: Path, loadgen: subprocess.Popen[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not (client.status(control)["volumes"][0]["totals"].get("requests", 0)
               and client.status(control)["volumes"][0]["connection"] is not None):
        if loadgen.poll() is not None or time.monotonic() > deadline:
            raise BenchError("loadgen did not attach and start writing")
        time.sleep(0.05)


def _dangling_round(server: ServerProcess, volume: Path, runtime: float, verify: bool,
                    result: DanglingResult) -> None:
    w = DANGLING_WORKLOAD
    # Long enough for both windows and a slow seal; SIGINT ends it once the windows are taken.
    total = DANGLING_WARMUP_S + 2 * runtime + DANGLING_SEAL_BUDGET_S + 10
    cmd = [sys.executable, "-m", "vhost_pv.cli", "loadgen", "--socket", str(server.socket_for(volume)),
           "--rw", w.rw, "--bs", str(w.bs), "--iodepth", str(w.iodepth), "--queues", "1",
           "--runtime", f"{total:g}", "--pid", str(server.pid), "--json", *(["--verify"] if verify else [])]
    loadgen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_attached(server.control, loadgen)
        time.sleep(DANGLING_WARMUP_S)
        a = Snapshot.take(server.control, server.pid)
        time.sleep(runtime)
        attached = Window.between(a, Snapshot.take(server.control, server.pid))
        client.persistent_disk_dangling(server.control, volume.stem, reason="bench")
        result.seal_wait_s.append(_wait_sealed(server.control, DANGLING_SEAL_BUDGET_S))
        b = Snapshot.take(server.control, server.pid)
        time.sleep(runtime)
        dangling = Window.between(b, Snapshot.take(server.control, server.pid))
        early = loadgen.poll() is not None
        loadgen.send_signal(signal.SIGINT)
        out, err = loadgen.communicate(timeout=60)
    except BaseException:
        loadgen.kill()
        loadgen.wait()
        raise
    if early:
        raise BenchError(f"loadgen ended before the windows were taken: {err.strip()[-500:]}")
    try:
        summary = json.loads(out)
    except ValueError as exc:
        raise BenchError(f"loadgen exited with {loadgen.returncode}: {err.strip()[-500:]}") from exc
    result.loadgen.append(summary)
    if summary["errors"] or summary["verify_mismatches"]:
        raise BenchError(f"loadgen: {summary['errors']} I/O errors, "
                         f"{summary['verify_mismatches']} verify mismatches")
    for name, window in (("attached", attached), ("dangling", dangling)):
        if window.failed:
            raise BenchError(f"{name}: the daemon counted {window.failed} failed requests")
    # The two counters are bumped at different points of a request (and read per queue), so
    # they may differ by what was in flight when the snapshots were taken.
    if dangling.quarantined < dangling.requests - w.iodepth:
        raise BenchError(f"dangling: only {dangling.quarantined} of {dangling.requests} writes "
                         "were quarantined")
    result.attached.append(attached)
    result.dangling.append(dangling)


def dangling_writes(workdir: Path, mode: Mode, runtime: float, rounds: int, size_mib: int = 256,
                    verify: bool = False) -> DanglingResult:
    """4k randwrite QD32, 1 queue, one volume, one daemon, one frontend connection: a window
    attached, the flip, the seal, a window dangling (writes go to the quarantine ring); the
    flag is cleared between rounds. The dangling window starts once the guard has sealed the
    data, so it measures the quarantine path, not the one-off seal (timed beside it)."""
    volume = workdir / "dangling.img"
    volume.unlink(missing_ok=True)
    header = create_volume(volume, CreateOptions(size=size_mib << 20, ring_size=512 << 20,
                                                 ring_full_policy=RingFullPolicy.OVERWRITE))
    fill(volume, header)
    if mode.direct:
        drop_cache(volume)
    result = DanglingResult()
    try:
        with ServerProcess([volume], workdir / "dangling", queues=1, extra_args=mode.vhost_pv_args) as server:
            for _ in range(rounds):
                os.sync()
                try:
                    _dangling_round(server, volume, runtime, verify, result)
                except Exception as exc:  # one failed round is an "error"; go on
                    result.errors.append(short_error(exc))
                state = client.persistent_disk_dangling(server.control, volume.stem, clear=True)
                if state["state"] != "attached":
                    raise BenchError(f"clearing the flag left the volume {state['state']}")
    except Exception as exc:
        result.errors.append(short_error(exc))
    volume.unlink(missing_ok=True)
    return result


def dangling_table(mode: Mode, result: DanglingResult, runtime: float, rounds: int,
                   size_mib: int = 256) -> Table:
    flags = " ".join(mode.vhost_pv_args) or "(no --direct)"
    table = Table(title=f"dangling volume, host loadgen: 4k randwrite QD32, 1 queue, one connection "
                        f"to one vhost-pv serve {flags} daemon, {size_mib} MiB data, 512 MiB ring "
                        f"(overwrite); {runtime:g} s windows counted by the daemon, {rounds} round(s)")
    for column in ("row", "IOPS", "ratio", "backend CPU us/IO", "requests in window(s)"):
        table.add_column(column, justify="left" if column == "row" else "right")

    def fmt(windows: list[Window], key: str, spec: str) -> str:
        value = DanglingResult.mean(windows, key)
        return "error" if value is None else format(value, spec)

    attached_iops = DanglingResult.mean(result.attached, "iops")
    dangling_iops = DanglingResult.mean(result.dangling, "iops")
    table.add_row("writes, attached", fmt(result.attached, "iops", ",.0f"), "1.00x",
                  fmt(result.attached, "cpu_us_per_io", ".2f"),
                  f"{sum(w.requests for w in result.attached):,}")
    table.add_row("writes, dangling (quarantine ring)", fmt(result.dangling, "iops", ",.0f"),
                  _fmt_ratio(dangling_iops, attached_iops), fmt(result.dangling, "cpu_us_per_io", ".2f"),
                  f"{sum(w.requests for w in result.dangling):,} "
                  f"({sum(w.quarantined for w in result.dangling):,} quarantined)")
    if result.seal_wait_s:
        table.add_row(f"seal of the {size_mib} MiB after the flip, under load (s)",
                      " / ".join(f"{s:.2f}" for s in result.seal_wait_s), "", "", "")
    for error in result.errors:
        table.add_row(f"error: {error}", "", "", "", "")
    return table


def dangling_errors(result: DanglingResult) -> list[str]:
    return [f"dangling writes: {e}" for e in result.errors]


# -- RSS -----------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kib(value: str) -> int:
    return int(value.split()[0])


def daemon_rss(workdir: Path, count: int, mode: Mode, settle_s: float = 2.0,
               size_mib: int = 4) -> dict[str, Any]:
    """`vhost-pv serve` with `count` idle volumes (no frontend): VmRSS once it has settled."""
    base = workdir / f"rss-{mode.key}-{count}"
    base.mkdir(parents=True, exist_ok=True)
    volumes = [base / f"idle{i:03d}.img" for i in range(count)]
    for path in volumes:
        path.unlink(missing_ok=True)
        create_volume(path, CreateOptions(size=size_mib << 20))
    try:
        with ServerProcess(volumes, base, queues=1, extra_args=mode.vhost_pv_args,
                           start_timeout=60) as server:
            time.sleep(settle_s)
            status = _proc_status(server.pid)
        return {
            "volumes": count,
            "vm_rss_kib": _kib(status["VmRSS"]),
            "rss_anon_kib": _kib(status.get("RssAnon", "0 kB")),
            "rss_file_kib": _kib(status.get("RssFile", "0 kB")),
            "threads": int(status["Threads"]),
            "goal_mib": RSS_GOAL_BASE_MIB + RSS_GOAL_PER_VOLUME_MIB * count,
        }
    finally:
        for path in volumes:
            path.unlink(missing_ok=True)


@dataclasses.dataclass
class RssResult:
    mode: Mode
    points: list[dict[str, Any]]
    errors: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode.key, "points": self.points, "errors": self.errors}


def rss(workdir: Path, mode: Mode, counts: Sequence[int] = (1, 64)) -> RssResult:
    result = RssResult(mode, [], [])
    for count in counts:
        try:
            result.points.append(daemon_rss(workdir, count, mode))
        except Exception as exc:
            result.errors.append(f"RSS with {count} volume(s): {short_error(exc)}")
    return result


def rss_table(results: Sequence[RssResult]) -> Table:
    table = Table(title="vhost-pv serve RSS, idle volumes (4 MiB data, default ring, 1 queue, no "
                        f"frontend, 2 s after the sockets exist); goal <= {RSS_GOAL_BASE_MIB:g} MiB "
                        f"+ {RSS_GOAL_PER_VOLUME_MIB:g} MiB per idle volume")
    for column in ("daemon", "volumes", "VmRSS MiB", "goal MiB", "anon / file MiB", "threads"):
        table.add_column(column, justify="left" if column == "daemon" else "right")
    for result in results:
        flags = " ".join(result.mode.vhost_pv_args) or "(no --direct)"
        for point in result.points:
            table.add_row(f"serve {flags}", str(point["volumes"]), f"{point['vm_rss_kib'] / 1024:.1f}",
                          f"{point['goal_mib']:.1f}",
                          f"{point['rss_anon_kib'] / 1024:.1f} / {point['rss_file_kib'] / 1024:.1f}",
                          str(point["threads"]))
        if len(result.points) >= 2:
            first, last = result.points[0], result.points[-1]
            per = (last["vm_rss_kib"] - first["vm_rss_kib"]) / 1024 / (last["volumes"] - first["volumes"])
            table.add_row(f"serve {flags}", "per extra volume", f"{per:.2f}",
                          f"{RSS_GOAL_PER_VOLUME_MIB:.2f}", "", "")
        for error in result.errors:
            table.add_row(f"serve {flags}", "error", error, "", "", "")
    return table
