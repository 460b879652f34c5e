"""The load generator against real backends: `vhost-pv serve` and qemu-storage-daemon.

Short verified runs (writes, then reads of what was written) on 1 and 2 queues against both,
the bytes landing where they should in the file, a run without EVENT_IDX, a verify run that
catches data changed behind the backend's back, a stalled backend, and the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.qsd import QsdProcess
from vhost_pv.control import client
from vhost_pv.volume.header import VolumeHeader
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.loadgen import LoadgenError, LoadgenResult, VerifyState, pattern, run_loadgen
from vhost_pv_tools.loadgen._native import lib
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
DISK_SIZE = 64 * MiB
BS = 4096
QUEUES = 2
REPO = Path(__file__).resolve().parents[2]
_ENTRY = REPO / ".venv" / "bin" / "vhost-pv"
VHOST_PV = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "vhost_pv.cli"]


@dataclasses.dataclass
class Backend:
    name: str
    socket: Path
    pid: int
    volume: Path
    header: VolumeHeader

    def block_on_disk(self, block: int, bs: int = BS) -> bytes:
        with open(self.volume, "rb") as f:
            f.seek(self.header.data_offset + block * bs)
            return f.read(bs)


def _volume(directory: Path) -> tuple[Path, VolumeHeader]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lg.img"
    header = create_volume(path, CreateOptions(size=DISK_SIZE, ring_size=MiB, allowed_uids=(os.getuid(),)))
    return path, header


@pytest.fixture(scope="module", params=["vhost-pv", "vhost-pv-direct", "qsd"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One backend per kind for the module, serving a 64 MiB volume on two queues
    (vhost-pv-direct: O_DIRECT, requests in flight on an io_uring per queue)."""
    workdir = tmp_path_factory.mktemp(request.param)
    volume, header = _volume(workdir)
    if request.param.startswith("vhost-pv"):
        direct = request.param.endswith("direct")
        with ServerProcess([volume], workdir / "run", queues=QUEUES,
                           extra_args=["--direct"] if direct else []) as server:
            yield Backend(request.param, server.socket_for(volume), server.pid, volume, header)
            assert "Traceback" not in server.log()
            if direct:  # the requests really went through the io_uring
                totals = client.status(server.control)["volumes"][0]["totals"]
                assert totals["async_ios"] > 0 and totals["io_errors"] == 0, totals
    else:
        with QsdProcess(volume, header, workdir / "qsd.sock", queues=QUEUES) as qsd:
            yield Backend("qsd", qsd.socket, qsd.pid, volume, header)


def _assert_clean(result: LoadgenResult) -> None:
    assert result.errors == 0, result.summary()
    assert result.verify_mismatches == 0, result.summary()
    assert result.ios > 0 and result.iops > 0, result.summary()
    assert not result.interrupted
    # Little's law: the queues are kept full, so IOPS x mean latency is about the queue depth
    # (less the time a request spends between being reaped and resubmitted: verifying a
    # large block takes a while on a machine the backend shares).
    in_flight = result.iops * result.lat_mean_us / 1e6
    assert 0.5 * result.iodepth * result.queues <= in_flight <= 1.05 * result.iodepth * result.queues
    assert result.lat_p50_us <= result.lat_p99_us <= result.lat_p999_us <= result.lat_max_us * 1.02


@pytest.mark.timeout(60)
@pytest.mark.parametrize("queues", [1, 2])
def test_verified_write_then_read(backend: Backend, queues: int) -> None:
    written = run_loadgen(
        backend.socket, "randwrite", BS, 16, queues, 1.0, verify=True, backend_pid=backend.pid
    )
    _assert_clean(written)
    assert written.writes == written.ios and written.reads == 0
    # The write pass reads back every block it wrote.
    state = written.verify_state
    assert state is not None
    assert written.check_ios == written.verified_reads == len(state.written_blocks) > 0
    assert written.backend_cpu_us_per_io is not None and written.backend_cpu_us_per_io > 0

    # The bytes are where the offsets say, on the host: the pattern of (seed, block, generation).
    for block in state.written_blocks[:: max(1, len(state.written_blocks) // 7)]:
        expected = pattern(state.seed, int(block), int(state.generations[block]), BS)
        assert backend.block_on_disk(int(block)) == expected, f"block {block}"

    read = run_loadgen(backend.socket, "randread", BS, 16, queues, 1.0, verify=True)
    _assert_clean(read)
    assert read.reads == read.ios and read.writes == 0
    # The read pass wrote every block first (prefill), so every read was checked.
    assert read.prefill_ios == DISK_SIZE // BS
    assert read.verified_reads == read.ios


@pytest.mark.timeout(60)
def test_sequential_and_mixed_without_event_idx(backend: Backend) -> None:
    mixed = run_loadgen(backend.socket, "randrw", BS, 8, 2, 0.5, verify=True, event_idx=False)
    _assert_clean(mixed)
    assert not mixed.event_idx
    assert mixed.reads > 0 and mixed.writes > 0
    assert 0.4 < mixed.reads / mixed.ios < 0.6
    assert mixed.kicks > 0

    seq = run_loadgen(backend.socket, "write", 64 << 10, 4, 1, 0.5, verify=True)
    _assert_clean(seq)
    assert seq.event_idx
    # Sequential writes walk the disk and wrap: every block is written once before any twice.
    assert seq.verify_state is not None
    generations = seq.verify_state.generations
    assert int(generations.max()) - int(generations[generations > 0].min()) <= 1
    assert seq.check_ios == len(seq.verify_state.written_blocks)

    # Sequential reads after the prefill (which walks the disk on its own cursor) stay on it.
    seq_read = run_loadgen(backend.socket, "read", 64 << 10, 4, 2, 0.5, verify=True)
    _assert_clean(seq_read)
    assert seq_read.prefill_ios == DISK_SIZE // (64 << 10)
    assert seq_read.verified_reads == seq_read.ios


@pytest.mark.timeout(60)
def test_verify_detects_corruption(tmp_path: Path) -> None:
    volume, header = _volume(tmp_path)
    with ServerProcess([volume], tmp_path / "run") as server:
        socket = server.socket_for(volume)
        written = run_loadgen(socket, "randwrite", BS, 16, 1, 0.5, verify=True, seed=1234)
        _assert_clean(written)
        state = written.verify_state
        assert state is not None and state.seed == 1234
        blocks = state.written_blocks
        unknown = DISK_SIZE // BS - len(blocks)
        victims = [int(blocks[len(blocks) // 4]), int(blocks[len(blocks) // 2])]

        # Change bytes of two written blocks behind the backend's back (sectors 3 and 0 of them).
        with open(volume, "r+b") as f:
            f.seek(header.data_offset + victims[0] * BS + 3 * 512 + 100)
            f.write(b"corrupted!")
            f.seek(header.data_offset + victims[1] * BS)
            f.write(bytes(8))

        # A read pass that knows the patterns (the first run's state) must notice.
        read = run_loadgen(socket, "randread", BS, 16, 1, 0.3, verify_state=state, check_all=True)
        assert read.errors == 0
        assert read.prefill_ios == unknown  # only blocks the first run never wrote
        assert read.verify_mismatches >= 2, read.summary()
        assert not read.ok
        sectors = set(read.bad_sectors)
        assert {victims[0] * (BS // 512) + 3, victims[1] * (BS // 512)} <= sectors, read.bad_sectors
        assert "Traceback" not in server.log()


@pytest.mark.timeout(60)
def test_stalled_backend_ends_the_run(tmp_path: Path) -> None:
    volume, _ = _volume(tmp_path)
    with ServerProcess([volume], tmp_path / "run") as server:
        outcome: dict[str, object] = {}

        def run() -> None:
            started = time.monotonic()
            try:
                run_loadgen(server.socket_for(volume), "randread", BS, 8, 1, 30.0, stall_timeout_ms=1000)
            except LoadgenError as exc:
                outcome["error"] = str(exc)
            outcome["seconds"] = time.monotonic() - started

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            worker.join(15)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert not worker.is_alive()
        assert "no completion" in str(outcome.get("error")), outcome
        assert float(str(outcome["seconds"])) < 5
        # The backend took the disconnect in its stride: the next frontend runs.
        time.sleep(0.2)
        _assert_clean(run_loadgen(server.socket_for(volume), "randread", BS, 8, 1, 0.3))


@pytest.mark.timeout(60)
def test_cli(backend: Backend) -> None:
    base = [*VHOST_PV, "loadgen", "--socket", str(backend.socket), "--runtime", "0.3"]
    result = subprocess.run(
        [*base, "--rw", "randread", "--bs", "8k", "--iodepth", "4", "--json", "--pid", str(backend.pid)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bs"] == 8192 and report["iodepth"] == 4 and report["ios"] > 0
    assert report["errors"] == 0 and report["backend_cpu_us_per_io"] > 0
    assert report["capacity"] == DISK_SIZE

    result = subprocess.run(
        [*base, "--rw", "randrw", "--verify", "--queues", "2"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "IOPS" in result.stdout and "0 mismatches" in result.stdout

    too_many = subprocess.run(
        [*base, "--queues", "3"], capture_output=True, text=True, timeout=30, check=False
    )
    assert too_many.returncode == 1 and "3 queues asked" in too_many.stderr


def test_histogram_buckets_are_within_one_percent() -> None:
    for ns in [*range(1, 3000, 7), *(int(1.37**k) for k in range(20, 80))]:
        value = lib.vpv_lg_hist_value(lib.vpv_lg_hist_bucket(ns))
        assert abs(value - ns) <= max(1.0, 0.008 * ns), ns
    assert lib.vpv_lg_hist_bucket(10**15) == lib.VPV_LG_HIST_BUCKETS - 1


def test_verify_state_must_match() -> None:
    state = VerifyState(BS, 1, np.zeros(10, dtype=np.uint32))
    with pytest.raises(ValueError, match="bs=4096"):
        run_loadgen("/nonexistent", "randread", 8192, 1, 1, 1.0, verify_state=state)
