"""kill -9 at any instant: whenever the daemon dies, after a restart

(a) every write the frontend saw complete OK is there: in the data region, or in the
    quarantine ring while the volume is dangling (and in the data region once a reclaim
    --replay that the control client saw succeed has run);
(b) the header is valid and a state change the control client saw succeed is never undone;
(c) the ring's chain verifies and its superblock agrees with its records;
(d) the restarted daemon serves (its sockets are not stale, the volume lock is free), the
    frontend reconnecting with its inflight area as QEMU does.

A seeded random test drives a fake frontend (writes of distinct patterns, each to a 4 KiB
block of its own, so every block says which write put it there) and a control thread
(dangling set, reclaim --replay / --discard with the frontend attached, ring discard, bind)
against a daemon subprocess, and SIGKILLs it at a random moment. Pointed variants kill it in
the middle of a reclaim --replay and of a header update. A failure names its seed:
CRASH_SEEDS=<seed> reruns just that one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support.frontend import (
    SECTOR,
    VIRTIO_BLK_S_OK,
    BlkRequest,
    GuestMemory,
    SplitRing,
    VhostUserFrontend,
    read_request,
    write_request,
)

from vhost_pv.control import client
from vhost_pv.control.client import ControlError
from vhost_pv.control.wire import ReclaimMode, RingOp
from vhost_pv.volume.header import DATA_OFFSET, SLOT_OFFSETS, SLOT_SIZE, VolumeState, resolve_slots
from vhost_pv.volume.ring import SUPER_SIZE, RecordType, RingReader, parse_super
from vhost_pv.volume.volume import CreateOptions, create_volume, inspect_header
from vhost_pv_tools.serverproc import ServerError, ServerProcess

DISK_SIZE = 16 << 20
RING_SIZE = 4 << 20
BLOCK = 4096
BLOCKS = DISK_SIZE // BLOCK
QUEUE_SIZE = 256
NAME = "vol"
ITERATIONS = 15
SEEDS = [int(s) for s in os.environ.get("CRASH_SEEDS", "").split(",") if s] or [
    1000 + i for i in range(ITERATIONS)]


def payload(tag: int, block: int) -> bytes:
    """4 KiB that name their write: no two writes of a run share a pattern."""
    return struct.pack("<QQ", tag, block) * (BLOCK // 16)


@dataclasses.dataclass
class Write:
    tag: int
    block: int
    submitted: float
    acked: float | None = None  # None: not (yet) completed OK

    @property
    def data(self) -> bytes:
        return payload(self.tag, self.block)


@dataclasses.dataclass
class Op:
    kind: str  # dangling | replay | discard | ring-discard | bind
    started: float
    ended: float | None = None  # None: the daemon died before it answered
    refused: bool = False
    generation: int = 0  # the header generation a flip reply named


class Frontend:
    """QEMU's side: guest memory and one queue that outlive daemon restarts, with the
    inflight area QEMU keeps, and a batch of writes to fresh blocks at a time."""

    def __init__(self, socket_path: Path, control: Path) -> None:
        self.socket_path = socket_path
        self.control = control
        self.memory = GuestMemory(24 << 20)
        self.ring = SplitRing(self.memory, QUEUE_SIZE)
        self.mark = self.memory.mark()
        self.writes: list[Write] = []
        self.pending: dict[int, tuple[Write, BlkRequest]] = {}  # head -> write, request
        with VhostUserFrontend(socket_path) as probe:
            probe.negotiate()
            self.area = probe.get_inflight_fd(1, QUEUE_SIZE)
        # One frontend at a time: the next attach waits until the daemon saw this one go.
        deadline = time.monotonic() + 10
        while client.status(control)["volumes"][0]["connection"] is not None:
            assert time.monotonic() < deadline, "the daemon never saw the first connection end"
            time.sleep(0.01)
        self.conn = self._connect()

    def _connect(self) -> VhostUserFrontend:
        fd, size, offset = self.area
        conn = VhostUserFrontend(self.socket_path)
        conn.negotiate()
        conn.set_inflight_fd(fd, size, offset, 1, QUEUE_SIZE)
        conn.set_mem_table(self.memory)
        conn.setup_queue(0, self.ring, base=self.ring.used_idx)
        return conn

    def reconnect(self) -> None:
        """After a daemon restart: the ring restarts at used->idx, the area says the rest."""
        self.conn.close()
        self.conn = self._connect()
        self.conn.kick(0)

    def collect(self) -> None:
        now = time.monotonic()
        for head, _ in self.ring.collect():
            write, request = self.pending.pop(head)
            if request.status == VIRTIO_BLK_S_OK:
                write.acked = now

    def submit(self, writes: list[Write]) -> None:
        heads = []
        for write in writes:
            request = write_request(self.memory, write.block * BLOCK // SECTOR, write.data)
            request.head = self.ring.add_chain(request.buffers)
            self.pending[request.head] = (write, request)
            heads.append(request.head)
            self.writes.append(write)
        self.ring.publish(*heads)
        self.conn.kick(0)

    def drain(self, timeout: float, stop: threading.Event | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while self.pending:
            self.collect()
            if not self.pending or (stop is not None and stop.is_set()) or time.monotonic() > deadline:
                break
            time.sleep(0.0003)
        self.collect()
        return not self.pending

    def read_block(self, block: int) -> bytes:
        if not self.pending:
            self.memory.rewind(self.mark)  # nothing in flight uses the buffers any more
        request = self.conn.submit(0, self.ring, read_request(self.memory, block * BLOCK // SECTOR, BLOCK))
        assert request.status == VIRTIO_BLK_S_OK, f"read of block {block}: status {request.status}"
        return request.data()

    def close(self) -> None:
        self.conn.close()
        os.close(self.area[0])
        self.memory.close()


class Run:
    """One seeded iteration: load, kill, restart, check."""

    def __init__(self, seed: int, workdir: Path) -> None:
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / f"{NAME}.img"
        create_volume(self.path, CreateOptions(size=DISK_SIZE, ring_size=RING_SIZE))
        self.server = ServerProcess([self.path], workdir / "run")
        self.ops: list[Op] = []
        self.blocks = iter(self.rng.permutation(BLOCKS).tolist())
        self.tags = iter(range(1, 1 << 40))
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.frontend: Frontend | None = None

    def where(self) -> str:
        return f"seed {self.seed} (CRASH_SEEDS={self.seed}), log {self.server.log_path}"

    # -- load -------------------------------------------------------------------------------

    def write_loop(self, rng: np.random.Generator) -> None:
        assert self.frontend is not None
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                count = int(rng.integers(1, 5))
                batch = [Write(next(self.tags), next(self.blocks), now) for _ in range(count)]
                self.frontend.submit(batch)
                self.frontend.drain(10.0, self.stop)
        except Exception as exc:  # the daemon was killed under us: ends the loop
            if not self.stop.is_set():
                self.errors.append(f"writer: {exc!r}")

    def control_loop(self, rng: np.random.Generator) -> None:
        control = self.server.control
        dangling = False
        owner = 0
        while not self.stop.is_set():
            time.sleep(float(rng.uniform(0.0, 0.03)))
            roll = float(rng.random())
            if not dangling:
                kind = "dangling" if roll < 0.55 else "bind" if roll < 0.8 else "ring-discard"
            else:
                kind = "replay" if roll < 0.5 else "discard" if roll < 0.7 else "ring-discard" \
                    if roll < 0.85 else "bind"
            op = Op(kind, time.monotonic())
            self.ops.append(op)
            owner += 1
            try:
                if kind == "dangling":
                    reply = client.persistent_disk_dangling(control, NAME, reason="crash test")
                    op.generation = reply["generation"]
                    dangling = True
                elif kind in ("replay", "discard"):
                    mode = ReclaimMode.REPLAY if kind == "replay" else ReclaimMode.DISCARD
                    client.reclaim(control, NAME, f"owner-{owner}", mode)
                    dangling = False
                elif kind == "ring-discard":
                    client.ring(control, NAME, RingOp.DISCARD)
                else:
                    client.bind(control, NAME, f"owner-{owner}")
            except ControlError as exc:
                if exc.status == 0:
                    return  # the daemon died before it answered: this op is in progress at the kill
                if kind != "bind" or not dangling:
                    self.errors.append(f"control {kind}: {exc}")
                op.refused = True
                op.ended = time.monotonic()
                continue
            except OSError:
                return  # the daemon died: this op is the one in progress at the kill
            op.ended = time.monotonic()

    def load_and_kill(self, duration: float) -> None:
        self.server.start()
        self.frontend = Frontend(self.server.socket_for(self.path), self.server.control)
        threads = [threading.Thread(target=self.write_loop, args=(np.random.default_rng(self.seed + 1),)),
                   threading.Thread(target=self.control_loop, args=(np.random.default_rng(self.seed + 2),))]
        for thread in threads:
            thread.start()
        time.sleep(duration)
        self.kill(threads)

    def kill(self, threads: list[threading.Thread]) -> None:
        assert self.frontend is not None
        self.server.kill()
        self.server.process = None
        self.stop.set()
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive(), "a load thread hangs after the kill"
        self.frontend.collect()  # completions the daemon published before it died count
        assert not self.errors, f"{self.where()}: {self.errors}"

    # -- what may be where ------------------------------------------------------------------

    def state_ops(self) -> list[Op]:
        return [op for op in self.ops if op.kind in ("dangling", "replay", "discard") and not op.refused]

    def allowed_states(self) -> set[VolumeState]:
        """The state after the last change the client saw succeed, and after the one in
        progress at the kill (if any)."""
        state = VolumeState.ATTACHED
        allowed = set()
        for op in self.state_ops():
            state = VolumeState.DANGLING if op.kind == "dangling" else VolumeState.ATTACHED
            if op.ended is None:
                allowed.add(state)
                state = VolumeState.DANGLING if op.kind != "dangling" else VolumeState.ATTACHED
        allowed.add(state)
        return allowed

    def classify(self, write: Write) -> tuple[bool, bool, bool]:
        """(surely in the data region, surely in the ring, may have been discarded)."""
        assert write.acked is not None
        ops = self.state_ops()
        # Dangling from the start of a set until the end of the reclaim after it.
        maybe_dangling = False
        surely_dangling = False
        for i, op in enumerate(ops):
            if op.kind != "dangling":
                continue
            end = next((o for o in ops[i + 1:] if o.kind != "dangling"), None)
            until = end.ended if end is not None and end.ended is not None else float("inf")
            if op.started < write.acked and write.submitted < until:
                maybe_dangling = True
            settled = op.ended is not None and op.ended < write.submitted
            if settled and (end is None or write.acked < end.started):
                surely_dangling = True
        discards = [op for op in self.ops if op.kind in ("discard", "ring-discard") and not op.refused]
        discarded = maybe_dangling and any(
            op.ended is None or op.ended > write.submitted for op in discards)
        replayed = any(op.kind == "replay" and op.ended is not None and op.started > write.acked
                       for op in ops)
        in_data = not maybe_dangling or (replayed and not discarded)
        later_reclaim = any(op.kind in ("replay", "discard") and op.started > write.acked for op in ops)
        in_ring = surely_dangling and not discarded and not later_reclaim
        return in_data, in_ring, discarded

    # -- checks -----------------------------------------------------------------------------

    def check_file(self) -> VolumeState:
        """(a)-(c) from the file alone, before any daemon touches it again."""
        where = self.where()
        resolution = inspect_header(self.path)
        header = resolution.header
        assert header.state in self.allowed_states(), (
            f"{where}: header says {header.state.name}, the client saw {self.ops}")
        seen = max((op.generation for op in self.ops), default=0)
        assert header.generation >= seen, f"{where}: header generation {header.generation} < {seen}"
        with RingReader(self.path, header) as reader:
            report = reader.verify()
            assert report.ok, f"{where}: ring chain: {report.problems}"
            records = list(reader.records())
            assert reader.super.records == len(records), f"{where}: superblock counts " \
                f"{reader.super.records} records, the ring holds {len(records)}"
            ring = {r.sector: reader.payload(r).tobytes() for r in records if r.type == RecordType.WRITE}
        if header.state == VolumeState.ATTACHED:
            # Every reclaim empties the ring before the header says attached.
            assert not records, f"{where}: attached with {len(records)} records in the ring"
        with open(self.path, "rb") as f:
            raw = f.read(header.data_offset + DISK_SIZE)[header.data_offset:]
        data = np.frombuffer(raw, dtype=np.uint8).reshape(BLOCKS, BLOCK)
        assert self.frontend is not None
        written = {w.block: w for w in self.frontend.writes}
        for block in np.nonzero(data.any(axis=1))[0].tolist():
            got = data[block].tobytes()
            assert block in written, f"{where}: block {block} holds data no write put there"
            write = written[block]
            if write.acked is not None or got == write.data:
                assert got == write.data, f"{where}: block {block} holds data no write put there"
                continue
            # Never acknowledged: the kill may have cut the daemon's pwritev short (a fault on
            # the guest buffer, which may cross a page anywhere, then the fatal signal), so
            # each byte is the write's or still the zero it replaces (blocks are written once
            # each) - nothing else.
            mine = np.frombuffer(write.data, dtype=np.uint8)
            foreign = np.nonzero((data[block] != mine) & (data[block] != 0))[0]
            assert not foreign.size, (
                f"{where}: block {block} (write {write.tag}, never acknowledged) holds data no "
                f"write put there from byte {int(foreign[0]) if foreign.size else 0}")
        for write in self.frontend.writes:
            if write.acked is None:
                continue
            sector = write.block * BLOCK // SECTOR
            here = data[write.block].tobytes() == write.data
            quarantined = ring.get(sector) == write.data
            in_data, in_ring, discarded = self.classify(write)
            what = (f"{where}: write {write.tag} (block {write.block}, "
                    f"{write.submitted:.3f}-{write.acked:.3f}), ops {self.ops}")
            if in_data:
                assert here, f"{what}: not in the data region"
            if in_ring and header.dangling:
                assert quarantined, f"{what}: not in the ring"
            if not discarded:
                assert here or quarantined, f"{what}: lost"
        return header.state

    def restart_killed_while_starting(self, delay: float) -> None:
        """Kill the restarted daemon again `delay` s after it was spawned: while it repairs
        the header, seals a dangling volume or claims its sockets, or just after."""

        def kill() -> None:
            process = self.server.process
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)

        timer = threading.Timer(delay, kill)
        timer.start()
        with contextlib.suppress(ServerError):
            self.server.start()
        timer.join()
        self.server.kill()
        self.server.process = None

    def restart_and_check(self) -> None:
        """(d): the restarted daemon serves; the frontend reconnects with its inflight area,
        its requests in flight complete; after a reclaim --replay (if dangling), every write
        that is anywhere reads back through the daemon."""
        assert self.frontend is not None
        self.stop.clear()
        self.server.start()
        self.frontend.reconnect()
        assert self.frontend.drain(20.0), f"{self.where()}: requests in flight never completed"
        status = client.status(self.server.control)["volumes"][0]
        if status["header"]["state"] == "dangling":
            report = client.reclaim(self.server.control, NAME, "after-restart", ReclaimMode.REPLAY)
            # Nobody wrote the file behind the daemon's back: whatever a killed reclaim had
            # replayed already is no tampering.
            assert not report["seal"].get("changed_chunks"), f"{self.where()}: false tamper alarm {report}"

        with open(self.path, "rb") as f:
            f.seek(inspect_header(self.path).header.data_offset)
            raw = f.read(DISK_SIZE)
        for write in self.frontend.writes:
            block = raw[write.block * BLOCK:(write.block + 1) * BLOCK]
            if write.acked is not None and not self.classify(write)[2]:
                # Acknowledged and never exposed to a discard: in the data region now.
                assert block == write.data, f"{self.where()}: write {write.tag} lost after the reclaim"
            else:
                assert block in (write.data, bytes(BLOCK)), f"{self.where()}: block {write.block}"
        # Through the daemon: what the file says is what the frontend reads.
        for write in self.frontend.writes[-64:]:
            block = raw[write.block * BLOCK:(write.block + 1) * BLOCK]
            assert self.frontend.read_block(write.block) == block, f"{self.where()}: block {write.block}"
        assert self.server.stop() == 0
        self.server.process = None
        assert "Traceback" not in self.server.log(), f"{self.where()}: {self.server.log()[-3000:]}"
        self.frontend.close()

    def close(self) -> None:
        self.server.kill()


@pytest.mark.parametrize("seed", SEEDS)
def test_kill_at_a_random_instant(seed: int, tmp_path: Path) -> None:
    run = Run(seed, tmp_path)
    try:
        run.load_and_kill(float(run.rng.uniform(0.1, 0.45)))
        assert run.frontend is not None
        assert any(w.acked for w in run.frontend.writes), f"{run.where()}: no write completed"
        run.check_file()
        if run.rng.random() < 0.5:
            run.restart_killed_while_starting(float(run.rng.uniform(0.0, 1.0)))
            run.check_file()
        run.restart_and_check()
    finally:
        run.close()


def test_ring_cli_reads_a_killed_daemons_volume(tmp_path: Path) -> None:
    """`vhost-pv ring --json` on the file a daemon was killed over: chain intact."""
    run = Run(7, tmp_path)
    try:
        run.load_and_kill(0.4)
        run.check_file()
        out = subprocess.run([sys.executable, "-m", "vhost_pv.cli", "ring", "--json", str(run.path)],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["verify"]["ok"] and info["records"] == len(info["entries"])
    finally:
        run.close()


def _fill_ring(run: Run, count: int) -> list[Write]:
    """A dangling volume with `count` acknowledged writes in its ring, the frontend attached."""
    run.server.start()
    frontend = run.frontend = Frontend(run.server.socket_for(run.path), run.server.control)
    run.ops.append(Op("dangling", time.monotonic()))
    client.persistent_disk_dangling(run.server.control, NAME, reason="crash test")
    run.ops[-1].ended = time.monotonic()
    writes: list[Write] = []
    while len(writes) < count:
        batch = [Write(next(run.tags), next(run.blocks), time.monotonic()) for _ in range(8)]
        frontend.submit(batch)
        assert frontend.drain(10.0)
        writes += batch
    assert all(w.acked for w in writes)
    deadline = time.monotonic() + 20
    while not client.status(run.server.control)["volumes"][0]["guard"]["sealed"]:
        assert time.monotonic() < deadline, "the dangling volume was never sealed"
        time.sleep(0.01)
    return writes


def _block_written(fd: int, write: Write) -> bool:
    return os.pread(fd, 16, DATA_OFFSET + write.block * BLOCK) == write.data[:16]


def _reclaim_in_background(run: Run, kind: str) -> threading.Thread:
    op = Op(kind, time.monotonic())
    run.ops.append(op)
    mode = ReclaimMode.REPLAY if kind == "replay" else ReclaimMode.DISCARD

    def reclaim() -> None:
        try:
            client.reclaim(run.server.control, NAME, "new-owner", mode)
            op.ended = time.monotonic()
        except (ControlError, OSError):
            pass  # killed before it answered

    thread = threading.Thread(target=reclaim)
    thread.start()
    return thread


def test_kill_in_the_middle_of_a_reclaim_replay(tmp_path: Path) -> None:
    """SIGKILL once reclaim --replay has applied part of the ring: after the restart the
    volume is still dangling with the ring intact, the next reclaim --replay finds no
    tampering (the killed one's writes are the backend's own) and every write is there."""
    run = Run(42, tmp_path)
    try:
        writes = _fill_ring(run, 640)
        fd = os.open(run.path, os.O_RDONLY)
        try:
            thread = _reclaim_in_background(run, "replay")
            deadline = time.monotonic() + 30
            while not _block_written(fd, writes[0]):
                assert time.monotonic() < deadline, "the replay never started"
            os.kill(run.server.pid, signal.SIGSTOP)  # freeze it where it is, then look
            partial = not _block_written(fd, writes[-1])
            run.kill([thread])
            assert partial, "the replay had finished before the kill: not the case under test"
        finally:
            os.close(fd)
        assert run.check_file() == VolumeState.DANGLING
        run.restart_and_check()
    finally:
        run.close()


def _ring_records_on_disk(fd: int) -> int:
    """The superblock's record count, read from the file as it is now."""
    return int(parse_super(os.pread(fd, SUPER_SIZE, DATA_OFFSET + DISK_SIZE)).records)


def _dangling_on_disk(fd: int) -> bool:
    return resolve_slots([os.pread(fd, SLOT_SIZE, off) for off in SLOT_OFFSETS]).header.dangling


def _kill_at(run: Run, thread: threading.Thread, moment: Callable[[int], bool], what: str) -> bool:
    """SIGSTOP the daemon as soon as moment(fd) holds, then SIGKILL it; whether moment still
    held with the daemon frozen (the kill came exactly there)."""
    fd = os.open(run.path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + 30
        while not moment(fd):
            if not thread.is_alive() or time.monotonic() > deadline:
                break
        os.kill(run.server.pid, signal.SIGSTOP)
        caught = moment(fd)
        run.kill([thread])
        return caught
    finally:
        os.close(fd)


def _copies_differ(fd: int) -> bool:
    first, second = (os.pread(fd, SLOT_SIZE, off) for off in SLOT_OFFSETS)
    return first != second


def test_kill_between_the_header_copies_of_a_reclaim(tmp_path: Path) -> None:
    """SIGKILL between the two header copies of reclaim --replay: restarted, the volume is
    dangling (the client never saw the reclaim succeed; the copies disagree, so it is served
    dangling), its ring empty and every write in the data region; the next reclaim finds no
    tampering. Each attempt is a fresh volume; the window is hit within a few."""
    for attempt in range(12):
        run = Run(100 + attempt, tmp_path / f"{attempt}")
        try:
            writes = _fill_ring(run, 64)
            thread = _reclaim_in_background(run, "replay")
            if not _kill_at(run, thread, _copies_differ, "header-copies") or run.ops[-1].ended is not None:
                continue
            assert run.check_file() == VolumeState.DANGLING
            assert all(_block_written_path(run.path, w) for w in writes)
            run.restart_and_check()
            return
        finally:
            run.close()
    pytest.fail("never killed the daemon between the header copies in 12 attempts")


def test_kill_after_the_ring_reset_of_a_reclaim(tmp_path: Path) -> None:
    """SIGKILL after reclaim --replay reset the ring and before its header update (a window
    of a thread hand-off: watched for with plain byte compares): restarted, the volume is
    dangling with an empty ring and every write in the data region, and the next reclaim
    finds no tampering."""
    for attempt in range(20):
        run = Run(300 + attempt, tmp_path / f"{attempt}")
        try:
            writes = _fill_ring(run, 64)
            fd = os.open(run.path, os.O_RDONLY)
            try:
                ring_at = DATA_OFFSET + DISK_SIZE
                superblock = os.pread(fd, 128, ring_at)
                slots = [os.pread(fd, SLOT_SIZE, off) for off in SLOT_OFFSETS]

                def reset_not_flipped(fd: int, superblock: bytes = superblock, slots: list[bytes] = slots,
                                      ring_at: int = ring_at) -> bool:
                    # The frontend is idle: only the reset changes the superblock now.
                    return (os.pread(fd, 128, ring_at) != superblock
                            and os.pread(fd, SLOT_SIZE, SLOT_OFFSETS[0]) == slots[0]
                            and os.pread(fd, SLOT_SIZE, SLOT_OFFSETS[1]) == slots[1])

            finally:
                os.close(fd)
            thread = _reclaim_in_background(run, "replay")
            if not _kill_at(run, thread, reset_not_flipped, "ring-reset") or run.ops[-1].ended is not None:
                continue
            assert _ring_records_on_disk_path(run.path) == 0
            assert run.check_file() == VolumeState.DANGLING
            assert all(_block_written_path(run.path, w) for w in writes)
            run.restart_and_check()
            return
        finally:
            run.close()
    pytest.fail("never killed the daemon between the ring reset and the header update in 20 attempts")


def _ring_records_on_disk_path(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _ring_records_on_disk(fd)
    finally:
        os.close(fd)


def _block_written_path(path: Path, write: Write) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _block_written(fd, write)
    finally:
        os.close(fd)


def test_kill_between_the_header_copies_of_a_dangling_flip(tmp_path: Path) -> None:
    """SIGKILL between the two header copies of a dangling flip, writes going on: restarted,
    the volume is dangling (the newer copy wins) and nothing acknowledged is lost."""
    for attempt in range(12):
        run = Run(200 + attempt, tmp_path / f"{attempt}")
        try:
            run.server.start()
            frontend = run.frontend = Frontend(run.server.socket_for(run.path), run.server.control)
            writer = threading.Thread(target=run.write_loop, args=(np.random.default_rng(attempt),))
            writer.start()
            time.sleep(0.05)
            op = Op("dangling", time.monotonic())
            run.ops.append(op)

            def flip(op: Op = op, control: Path = run.server.control) -> None:
                try:
                    client.persistent_disk_dangling(control, NAME, reason="crash test")
                    op.ended = time.monotonic()
                except (ControlError, OSError):
                    pass

            flipper = threading.Thread(target=flip)
            flipper.start()
            caught = _kill_at(run, flipper, _copies_differ, "header-copies")
            run.stop.set()
            writer.join(30)
            frontend.collect()
            if not caught or op.ended is not None:
                continue
            assert run.check_file() == VolumeState.DANGLING
            run.restart_and_check()
            return
        finally:
            run.close()
    pytest.fail("never killed the daemon between the header copies in 12 attempts")


def test_kill_during_a_ring_discard(tmp_path: Path) -> None:
    """SIGKILL as ring discard rewrites the superblock of a dangling volume: restarted, the
    ring is either whole or empty (never part of it), its chain verifies, the volume is still
    dangling, and the next reclaim --replay applies what the ring still holds."""
    run = Run(400, tmp_path)
    try:
        writes = _fill_ring(run, 64)
        op = Op("ring-discard", time.monotonic())
        run.ops.append(op)

        def discard() -> None:
            try:
                client.ring(run.server.control, NAME, RingOp.DISCARD)
                op.ended = time.monotonic()
            except (ControlError, OSError):
                pass

        thread = threading.Thread(target=discard)
        fd = os.open(run.path, os.O_RDONLY)
        try:
            before = os.pread(fd, 128, DATA_OFFSET + DISK_SIZE)
        finally:
            os.close(fd)
        thread.start()
        _kill_at(run, thread, lambda fd: os.pread(fd, 128, DATA_OFFSET + DISK_SIZE) != before, "ring-discard")
        assert run.check_file() == VolumeState.DANGLING
        assert _ring_records_on_disk_path(run.path) in (0, len(writes))
        run.restart_and_check()
    finally:
        run.close()
