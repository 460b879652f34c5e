"""The fuzzing loop: a daemon subprocess, connections at its scratch volume, health checks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import select
import time
from pathlib import Path
from typing import Any

from fuzz.cases import CONNECTION_ERRORS, FdKit, Stats, handshake, ring_session
from fuzz.guest import (
    BLK_HEADER_SIZE,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    GuestMemory,
    SplitRing,
    blk_header,
)
from vhost_pv.control import client
from vhost_pv.control.wire import Command
from vhost_pv.protocol.frontend import VhostUserFrontend
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

VOLUME_SIZE = 4 << 20
STATUS_TIMEOUT_S = 1.0
"""The control socket must answer `status` this fast after every connection."""
READ_TIMEOUT_S = 2.0
"""...and the bystander must complete a read this fast."""
DETACH_TIMEOUT_S = 5.0
"""A closed connection must be cleaned up (the volume free for the next frontend) this fast."""
PATTERN = bytes(range(256)) * 16
TOTALS_REPORTED = frozenset({"requests", "reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
                             "unsupported", "io_errors", "bad_requests", "kicks"})


_LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
"""The start of every record the daemon logs (vhost_pv.cli's logging format)."""


class Unhealthy(Exception):
    """The daemon died, stalled, or stopped serving the bystander."""


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def daemon_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def daemon_native(pid: int) -> tuple[str, bool]:
    """The C data path file the daemon mapped, and whether the ASan runtime is in it too
    (`make asan` runs this fuzzer against the sanitized build: this proves it did)."""
    native, asan = "", False
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            path = line.split(maxsplit=5)[-1].strip() if line.count(" ") >= 5 else ""
            if "_vhost_pv_native" in path:
                native = path
            asan = asan or "libasan" in path
    return native, asan


class Bystander:
    """A well-behaved frontend on the other volume: one read request at a time."""

    def __init__(self, socket_path: Path) -> None:
        self.memory = GuestMemory(1 << 20)
        self.ring = SplitRing(self.memory, 16)
        self.conn = VhostUserFrontend(socket_path, timeout=READ_TIMEOUT_S)
        self.conn.negotiate()
        self.conn.set_mem_table([self.memory.region()])
        self.conn.setup_vring(0, self.ring.size, self.memory.uaddr(self.ring.desc_addr),
                              self.memory.uaddr(self.ring.avail_addr), self.memory.uaddr(self.ring.used_addr))
        self.header = self.memory.alloc(BLK_HEADER_SIZE)
        self.data = self.memory.alloc(len(PATTERN), 4096)
        self.status = self.memory.alloc(1, 1)
        self.request(VIRTIO_BLK_T_OUT, PATTERN)

    def request(self, req_type: int, payload: bytes = b"") -> bytes:
        self.memory.write(self.header, blk_header(req_type, 8))
        self.memory.write(self.data, payload or bytes(len(PATTERN)))
        self.memory.write(self.status, b"\xff")
        data_flags = VRING_DESC_F_NEXT | (0 if payload else VRING_DESC_F_WRITE)
        self.ring.set_desc(0, self.header, BLK_HEADER_SIZE, VRING_DESC_F_NEXT, 1)
        self.ring.set_desc(1, self.data, len(PATTERN), data_flags, 2)
        self.ring.set_desc(2, self.status, 1, VRING_DESC_F_WRITE, 0)
        before = self.ring.used_idx
        self.ring.publish(0)
        self.conn.kick(0)
        deadline = time.monotonic() + READ_TIMEOUT_S
        call = self.conn.queues[0].call
        while self.ring.used_idx == before:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unhealthy(f"the bystander's request did not complete within {READ_TIMEOUT_S} s")
            ready, _, _ = select.select([call], [], [], min(remaining, 0.05))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(call)
        status = self.memory.read(self.status, 1)[0]
        if status != 0:
            raise Unhealthy(f"the bystander's request failed with virtio-blk status {status}")
        return self.memory.read(self.data, len(PATTERN))

    def check(self) -> None:
        if self.request(VIRTIO_BLK_T_IN) != PATTERN:
            raise Unhealthy("the bystander read back something else than it wrote")

    def close(self) -> None:
        self.conn.close()
        self.memory.close()


@dataclasses.dataclass
class Report:
    seed: int
    skipped: list[str] = dataclasses.field(default_factory=list)
    duration_s: float = 0.0
    connections: int = 0
    messages: int = 0
    kicks: int = 0
    descriptors: int = 0
    handshakes: int = 0
    ring_sessions: int = 0
    connection_errors: int = 0
    daemon_pid: int = 0
    daemon_native: str = ""
    daemon_asan: bool = False
    fds_before: int = 0
    fds_after: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    target_totals: dict[str, int] = dataclasses.field(default_factory=dict)
    """The scratch volume's request counters at the end: proof the rings reached the workers."""
    log_tracebacks: int = 0
    log_errors: int = 0
    log_stray_lines: int = 0
    """Log lines that are not a record of their own (a message with a newline in it): reported,
    not a failure, as the first one found is in code this harness does not own."""
    failure: dict[str, Any] | None = None
    ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class Fuzzer:
    def __init__(self, workdir: Path, seed: int, duration: float, *, max_connections: int = 0,
                 max_fd_growth: int = 8, max_rss_growth_kib: int = 64 << 10,
                 skip: frozenset[str] = frozenset()) -> None:
        self.skip = skip
        self.workdir = workdir
        self.seed = seed
        self.duration = duration
        self.max_connections = max_connections
        self.max_fd_growth = max_fd_growth
        self.max_rss_growth_kib = max_rss_growth_kib
        self.report = Report(seed=seed, skipped=sorted(skip))
        self.stats = Stats()

    def run(self) -> Report:
        target = self.workdir / "target.img"
        bystander = self.workdir / "bystander.img"
        # Fresh volumes and log each run: a kept --workdir must not mix runs.
        (self.workdir / "daemon" / "vhost-pv.log").unlink(missing_ok=True)
        for path in (target, bystander):
            path.unlink(missing_ok=True)
            create_volume(path, CreateOptions(size=VOLUME_SIZE, ring_size=1 << 20,
                                              allowed_uids=(os.getuid(),)))
        server = ServerProcess([target, bystander], self.workdir / "daemon", queues=2).start()
        report = self.report
        report.daemon_pid = server.pid
        started = time.monotonic()
        try:
            self._loop(server, target, bystander, started)
        finally:
            report.duration_s = round(time.monotonic() - started, 3)
            report.messages, report.kicks, report.descriptors = (self.stats.messages, self.stats.kicks,
                                                                 self.stats.descriptors)
            alive = server.process is not None and server.process.poll() is None
            if alive:
                with contextlib.suppress(OSError):
                    code = server.stop()
                    if code != 0 and report.failure is None:
                        report.failure = {"problem": f"the daemon exited with {code} on SIGTERM"}
            else:
                server.kill()
            log = server.log()
            report.log_tracebacks = log.count("Traceback")
            report.log_stray_lines = sum(1 for line in log.splitlines()
                                         if line and not _LOG_RECORD.match(line))
            report.log_errors = sum(1 for line in log.splitlines()
                                    if " ERROR " in line or " CRITICAL " in line)
            if report.failure is None and report.log_tracebacks:
                # A peer's bytes must end in a one-line log message, never an unhandled path.
                first = log.index("Traceback")
                report.failure = {"problem": f"the daemon logged {report.log_tracebacks} tracebacks",
                                  "first": log[max(0, first - 300):first + 3000].splitlines()}
            if report.failure is not None:
                report.failure["log_tail"] = log.splitlines()[-40:]
            report.ok = report.failure is None
        return report

    def _loop(self, server: ServerProcess, target: Path, bystander: Path, started: float) -> None:
        report = self.report
        rng = random.Random(self.seed)
        target_socket = server.socket_for(target)
        watcher = Bystander(server.socket_for(bystander))
        kit = FdKit(self.workdir)
        try:
            try:
                self._check(server, watcher)
            except Unhealthy as exc:
                report.failure = {"problem": f"before any fuzzing: {exc}"}
                return
            report.daemon_native, report.daemon_asan = daemon_native(server.pid)
            report.fds_before = daemon_fds(server.pid)
            report.rss_before_kib = daemon_rss_kib(server.pid)
            while time.monotonic() - started < self.duration and (
                    not self.max_connections or report.connections < self.max_connections):
                conn_seed = rng.getrandbits(32)
                conn_rng = random.Random(conn_seed)
                kind = "handshake" if conn_rng.random() < 0.5 else "ring"
                what = kind
                try:
                    if kind == "handshake":
                        report.handshakes += 1
                        what = handshake(conn_rng, target_socket, kit, self.stats)
                    else:
                        report.ring_sessions += 1
                        what = ring_session(conn_rng, target_socket, kit, self.stats, VOLUME_SIZE, self.skip)
                except CONNECTION_ERRORS:
                    report.connection_errors += 1
                finally:
                    kit.close()
                report.connections += 1
                try:
                    self._check(server, watcher)
                except Unhealthy as exc:
                    report.failure = {"problem": str(exc), "connection": report.connections,
                                      "connection_seed": conn_seed, "kind": kind, "what": what}
                    return
            report.fds_after, report.rss_after_kib = self._settled(server.pid)
            if report.fds_after - report.fds_before > self.max_fd_growth:
                report.failure = {"problem": f"the daemon's fds grew from {report.fds_before} to "
                                             f"{report.fds_after} (bound {self.max_fd_growth})"}
            elif report.rss_after_kib - report.rss_before_kib > self.max_rss_growth_kib:
                report.failure = {"problem": f"the daemon's RSS grew from {report.rss_before_kib} KiB "
                                             f"to {report.rss_after_kib} KiB "
                                             f"(bound {self.max_rss_growth_kib} KiB)"}
        finally:
            kit.close()
            watcher.close()

    def _settled(self, pid: int) -> tuple[int, int]:
        """fds and RSS once the last connection's clean-up is done (it runs asynchronously)."""
        deadline = time.monotonic() + 2.0
        fds = daemon_fds(pid)
        while fds - self.report.fds_before > self.max_fd_growth and time.monotonic() < deadline:
            time.sleep(0.05)
            fds = daemon_fds(pid)
        return fds, daemon_rss_kib(pid)

    def _check(self, server: ServerProcess, watcher: Bystander) -> None:
        process = server.process
        assert process is not None
        if process.poll() is not None:
            code = process.returncode
            how = f"signal {-code}" if code < 0 else f"exit {code}"
            raise Unhealthy(f"the daemon died ({how})")
        deadline = time.monotonic() + DETACH_TIMEOUT_S
        while True:
            try:
                status = json.loads(client.call(server.control, Command.STATUS, timeout=STATUS_TIMEOUT_S))
            except (OSError, client.ControlError) as exc:
                raise Unhealthy(f"the control socket did not answer status within {STATUS_TIMEOUT_S} s: "
                                f"{exc}") from None
            # The scratch volume must be free again for the next frontend.
            scratch = [v for v in status["volumes"] if v["name"] == "target"]
            if scratch:
                self.report.target_totals = {key: value for key, value in scratch[0]["totals"].items()
                                             if key in TOTALS_REPORTED}
            if not scratch or scratch[0]["connection"] is None:
                break
            if time.monotonic() > deadline:
                raise Unhealthy(f"the closed connection was not cleaned up within {DETACH_TIMEOUT_S} s")
            time.sleep(0.01)
        try:
            watcher.check()
        except CONNECTION_ERRORS as exc:
            raise Unhealthy(f"the bystander's connection failed: {exc!r}") from None
