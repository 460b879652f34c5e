"""More hostile frontends, beyond test_hostile_frontend.py: whatever one connection does, the
control socket and every other volume keep answering within a second, and the daemon keeps
neither the connection's fds nor its memory once it is gone.

The daemon runs as a subprocess serving two volumes (a victim and a bystander) and, where a
test needs it, the metadata file system (virtio-fs) socket.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.attach import Guest, pattern
from support.frontend import (
    VIRTIO_BLK_S_OK,
    FrontendError,
    GuestMemory,
    SplitRing,
    VhostUserFrontend,
    write_request,
)

from vhost_pv._native import lib
from vhost_pv.control import client
from vhost_pv.control.wire import Command
from vhost_pv.meta.fuse import (
    IN_HEADER_SIZE,
    MAX_HANDLES,
    FuseFileSystem,
    InHeader,
    InitInCompat,
    Opcode,
    OpenIn,
    OutHeader,
)
from vhost_pv.meta.policy import Policy
from vhost_pv.meta.store import MetadataStore
from vhost_pv.protocol.messages import Request
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

DISK_SIZE = 16 << 20
MEMORY_SIZE = 4 << 20
VICTIM, BYSTANDER = 0, 1
FUSE_STATFS = 17
FUSE_BATCH_FORGET = 42
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2


class Daemon:
    def __init__(self, server: ServerProcess, volumes: list[Path], meta_socket: Path) -> None:
        self.server = server
        self.volumes = volumes
        self.meta_socket = meta_socket

    def socket(self, index: int) -> Path:
        return self.server.socket_for(self.volumes[index])

    def status(self) -> dict[str, Any]:
        """STATUS, which must answer within a second whatever a frontend does."""
        started = time.monotonic()
        result: dict[str, Any] = json.loads(client.call(self.server.control, Command.STATUS, timeout=1.0))
        assert time.monotonic() - started < 1.0
        return result

    def entry(self, index: int) -> dict[str, Any]:
        name = self.volumes[index].stem
        (entry,) = [v for v in self.status()["volumes"] if v["name"] == name]
        return dict(entry)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.server.pid}/fd"))

    def assert_alive(self) -> None:
        assert self.server.process is not None and self.server.process.poll() is None, self.server.log()
        self.status()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    volumes = [tmp_path / "victim.img", tmp_path / "bystander.img"]
    for path in volumes:
        create_volume(path, CreateOptions(size=DISK_SIZE, ring_size=1 << 20))
    meta_socket = tmp_path / "meta.sock"
    server = ServerProcess(volumes, tmp_path / "run", extra_args=["--meta-socket", str(meta_socket)])
    with server:
        yield Daemon(server, volumes, meta_socket)
        assert server.process is not None and server.process.poll() is None, server.log()
        assert "Traceback" not in server.log()


# -- the metadata file system's queue, kept full --------------------------------------------------


class FuseFlood:
    """A virtio-fs frontend that keeps its request ring full: every slot holds the same
    FUSE request, and whenever the device has answered some, they are made available again
    and kicked, so the ring never runs dry."""

    RING = 1024

    def __init__(self, meta_socket: Path, *, malformed: bool = False, opcode: int = FUSE_STATFS,
                 body: bytes = b"") -> None:
        """malformed: the request's buffer lies outside guest memory."""
        self.frontend = VhostUserFrontend(meta_socket, timeout=3.0)
        self.memory = GuestMemory(MEMORY_SIZE)
        self.frontend.negotiate()
        self.frontend.set_mem_table(self.memory)
        self.ring = SplitRing(self.memory, self.RING)
        length = IN_HEADER_SIZE + len(body)
        header = InHeader.build({"len": length, "opcode": opcode, "unique": 1, "nodeid": 1,
                                 "uid": 0, "gid": 0, "pid": 1, "total_extlen": 0})
        request = self.memory.put(header + body)
        reply = self.memory.alloc(4096)
        if malformed:
            request = self.memory.end + (1 << 20)
        self.ring.set_desc(0, request, length, VRING_DESC_F_NEXT, 1)
        self.ring.set_desc(1, reply, 4096, VRING_DESC_F_WRITE)
        self.ring.avail[2 : 2 + self.RING] = 0  # every slot: the chain at descriptor 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.frontend.setup_queue(1, self.ring)  # the request queue

    def _run(self) -> None:
        ring = self.ring
        while not self._stop.is_set():
            wanted = (ring.used_idx + self.RING) & 0xFFFF
            if 0 < (wanted - ring.avail_idx) & 0xFFFF < 0x8000:
                ring.set_avail_idx(wanted)
                self.frontend.kick(1)
            # The device needs far longer than this for a ring of requests: the ring never
            # runs dry, and the test leaves the machine's other core alone.
            self._stop.wait(0.001)

    def __enter__(self) -> FuseFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.frontend.close()
        self.memory.close()


@pytest.mark.timeout(60)
def test_a_full_metadata_queue_does_not_starve_the_event_loop(daemon: Daemon) -> None:
    """The virtio-fs queues are served on the event loop: a frontend that refills its ring
    as fast as it is emptied must leave the loop free for everything else."""
    with FuseFlood(daemon.meta_socket) as flood:
        deadline = time.monotonic() + 10
        while flood.ring.used_idx < 2 * FuseFlood.RING:  # the flood is being served
            assert time.monotonic() < deadline, "the metadata queue is not served"
            time.sleep(0.01)
        for _ in range(5):
            daemon.status()  # within 1 s
        started = time.monotonic()
        guest = Guest(daemon.socket(BYSTANDER), timeout=1.0)
        try:
            guest.round_trip(8, pattern(4096, 1))
        finally:
            guest.close()
        assert time.monotonic() - started < 2.0
        served = flood.ring.used_idx
    assert served > 0
    daemon.assert_alive()


def test_largest_batch_forgets_in_a_full_queue_leave_the_loop_free(daemon: Daemon) -> None:
    """A FUSE request is answered on the event loop in one go: the costliest one a frontend
    can post (a 1 MiB BATCH_FORGET of 65533 entries) must still take a small slice of it."""
    count = (lib.VPV_FS_MAX_REQUEST - IN_HEADER_SIZE - 8) // 16
    body = struct.pack("<II", count, 0) + struct.pack("<QQ", 2, 1) * count
    with FuseFlood(daemon.meta_socket, opcode=FUSE_BATCH_FORGET, body=body) as flood:
        deadline = time.monotonic() + 20
        while flood.ring.used_idx < 4:  # the flood is being served
            assert time.monotonic() < deadline, "the metadata queue is not served"
            time.sleep(0.01)
        for _ in range(3):
            daemon.status()  # within 1 s


def test_malformed_chains_posted_without_end_do_not_flood_the_log(daemon: Daemon) -> None:
    """Each malformed chain is given back empty and counted; the log gets a line for the 1st,
    2nd, 4th, ... of them, not one per chain a frontend can post by the thousand."""
    with FuseFlood(daemon.meta_socket, malformed=True) as flood:
        deadline = time.monotonic() + 20
        while flood.ring.used_idx < 8 * FuseFlood.RING:
            assert time.monotonic() < deadline, "the metadata queue is not served"
            time.sleep(0.01)
        daemon.status()
    lines = [line for line in daemon.server.log().splitlines() if "malformed descriptor chain" in line]
    assert 1 <= len(lines) <= 20, len(lines)


# -- reconnects ------------------------------------------------------------------------------------


def test_a_reconnect_queued_behind_the_hang_up_is_admitted(daemon: Daemon) -> None:
    """A new frontend whose connection the daemon sees before the old one's hang-up (here:
    the daemon is stopped while the old frontend closes and the new one connects, so both
    wait for it together) is admitted, not refused as a second frontend."""
    old = Guest(daemon.socket(VICTIM))
    os.kill(daemon.server.pid, signal.SIGSTOP)
    try:
        new = VhostUserFrontend(daemon.socket(VICTIM), timeout=3.0)  # queued in the backlog
        old.close()
    finally:
        os.kill(daemon.server.pid, signal.SIGCONT)
    try:
        assert new.get_features()  # refused: "the backend closed the connection"
    finally:
        new.close()
    assert daemon.entry(VICTIM)["refused_total"] == 0


def test_a_metadata_reconnect_queued_behind_the_hang_up_is_admitted(daemon: Daemon) -> None:
    """The same for the metadata file system's socket (one frontend at a time too)."""
    old = VhostUserFrontend(daemon.meta_socket, timeout=3.0)
    memory = GuestMemory(1 << 20)
    try:
        old.negotiate()
        old.set_mem_table(memory)
        old.setup_queue(1, SplitRing(memory, 64))
        os.kill(daemon.server.pid, signal.SIGSTOP)
        try:
            new = VhostUserFrontend(daemon.meta_socket, timeout=3.0)
            old.close()
        finally:
            os.kill(daemon.server.pid, signal.SIGCONT)
        try:
            assert new.get_features()
        finally:
            new.close()
    finally:
        old.close()
        memory.close()
    assert "one is attached already" not in daemon.server.log()


def test_a_second_frontend_of_a_live_one_is_still_refused(daemon: Daemon) -> None:
    guest = Guest(daemon.socket(VICTIM))
    try:
        second = VhostUserFrontend(daemon.socket(VICTIM), timeout=3.0)
        with pytest.raises((FrontendError, OSError)):  # closed before or after the request
            second.get_features()
        second.close()
        guest.round_trip(0, pattern(512, 2))  # the first one is untouched
    finally:
        guest.close()
    assert daemon.entry(VICTIM)["refused_total"] == 1


@pytest.mark.timeout(120)
def test_close_then_connect_in_a_tight_loop_is_never_refused(daemon: Daemon) -> None:
    """What QEMU does on a reconnect, 150 times: close a connection whose queue runs, connect
    at once. Every new frontend is admitted; the daemon keeps no fd of the old ones."""
    Guest(daemon.socket(VICTIM)).close()
    time.sleep(0.2)  # the first session's end, so the fd count below is its steady state
    fds_before = daemon.fds()
    memory = GuestMemory(1 << 20)
    try:
        for _ in range(150):
            frontend = VhostUserFrontend(daemon.socket(VICTIM), timeout=3.0)
            try:
                frontend.negotiate()
                frontend.set_mem_table(memory)
                memory._next = 0  # the same ring every time
                frontend.setup_queue(0, SplitRing(memory, 64))
            finally:
                frontend.close()
    finally:
        memory.close()
    assert daemon.entry(VICTIM)["refused_total"] == 0
    deadline = time.monotonic() + 5
    while daemon.entry(VICTIM)["connection"] is not None or daemon.fds() > fds_before:
        assert time.monotonic() < deadline, (daemon.fds(), fds_before)
        time.sleep(0.05)


# -- messages in an unusual order, fds where none belong ------------------------------------------


def test_rings_set_up_before_the_memory_table_start_with_it(daemon: Daemon) -> None:
    """Nothing in the spec orders SET_VRING_* before SET_MEM_TABLE: a queue that had all but
    its memory starts once the memory comes (it used to wait forever for a kick it ignored)."""
    frontend = VhostUserFrontend(daemon.socket(VICTIM), timeout=3.0)
    memory = GuestMemory(MEMORY_SIZE)
    try:
        frontend.negotiate()
        ring = SplitRing(memory, 64)
        frontend.setup_queue(0, ring)
        frontend.set_mem_table(memory)
        request = frontend.submit(0, ring, write_request(memory, 0, pattern(4096, 3)))
        assert request.status == VIRTIO_BLK_S_OK
    finally:
        frontend.close()
        memory.close()


def test_fds_on_messages_that_take_none_are_closed(daemon: Daemon) -> None:
    """300 connections each sending a request that takes no fd with 8 eventfds attached: every
    one is closed with its connection, the daemon's fd count comes back where it was."""
    Guest(daemon.socket(VICTIM)).close()
    time.sleep(0.2)  # the first session's end, so the fd count below is its steady state
    fds_before = daemon.fds()
    eventfds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(8)]
    try:
        for request in (Request.GET_FEATURES, Request.SET_OWNER, Request.GET_QUEUE_NUM) * 100:
            frontend = VhostUserFrontend(daemon.socket(VICTIM), timeout=3.0)
            try:
                frontend.send(request, b"", eventfds)
                assert frontend.wait_closed()
            finally:
                frontend.close()
    finally:
        for fd in eventfds:
            os.close(fd)
    deadline = time.monotonic() + 5
    while daemon.entry(VICTIM)["connection"] is not None or daemon.fds() > fds_before:
        assert time.monotonic() < deadline, (daemon.fds(), fds_before)
        time.sleep(0.05)
    daemon.assert_alive()


def test_messages_repeated_without_end_do_not_flood_the_log(daemon: Daemon) -> None:
    """Requests a frontend may repeat at will on a live connection (memory tables, config
    writes) are logged 1st, 2nd, 4th, ... time, not once each: the log cannot fill the disk."""
    guest = Guest(daemon.socket(VICTIM))
    try:
        config_write = struct.pack("<III", 0, 8, 0) + bytes(8)
        for _ in range(1000):
            guest.frontend.set_mem_table(guest.memory)
            guest.frontend.command(Request.SET_CONFIG, config_write)
        guest.round_trip(0, pattern(4096, 4))  # the queue was paused and resumed each time
    finally:
        guest.close()
    log = daemon.server.log()
    assert 1 <= log.count(": memory table") <= 12, log.count(": memory table")
    assert 1 <= log.count("ignoring SET_CONFIG") <= 12, log.count("ignoring SET_CONFIG")


def test_unreadable_fuse_requests_are_counted_and_logged_rarely(caplog: pytest.LogCaptureFixture) -> None:
    fs = FuseFileSystem(MetadataStore("vm0", dict), Policy.default())
    with caplog.at_level(logging.WARNING, logger="vhost_pv.meta.fuse"):
        for _ in range(1000):
            assert fs.handle(b"short", 4096) is None
    assert 1 <= len(caplog.records) <= 11
    assert fs.malformed == 1000


def _heap_size(pid: int) -> int:
    """The size of a process's brk heap (where malloc puts what it does not mmap)."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[heap]"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                return end - start
    return 0


@pytest.mark.timeout(120)
def test_metadata_connection_churn_does_not_grow_the_heap(daemon: Daemon) -> None:
    """A frontend connecting, setting up a queue and leaving, 1000 times: the daemon's heap
    stays where it was (each connection's 1 MiB request buffer used to wait for the cyclic
    garbage collector, and the heap grew some 9 MiB per 500 connections)."""
    memory = GuestMemory(1 << 20)

    def churn(count: int) -> None:
        for _ in range(count):
            frontend = VhostUserFrontend(daemon.meta_socket, timeout=3.0)
            try:
                frontend.negotiate()
                frontend.set_mem_table(memory)
                memory._next = 0  # the same ring every time
                frontend.setup_queue(1, SplitRing(memory, 64))
            finally:
                frontend.close()

    try:
        churn(100)  # warm-up: imports, caches, the allocator's own arenas
        heap_before = _heap_size(daemon.server.pid)
        churn(1000)
    finally:
        memory.close()
    daemon.assert_alive()
    growth = _heap_size(daemon.server.pid) - heap_before
    assert growth < 3 << 20, f"heap grew {growth >> 10} KiB"


# -- the metadata file system's state across frontends ---------------------------------------------


def _fuse_call(fs: FuseFileSystem, opcode: int, body: bytes, unique: int) -> int:
    """One request to the FUSE layer; returns the reply's error field."""
    header = InHeader.build({"len": IN_HEADER_SIZE + len(body), "opcode": opcode, "unique": unique,
                             "nodeid": 1, "uid": 0, "gid": 0, "pid": 1, "total_extlen": 0})
    reply = fs.handle(header + body, 4096)
    assert reply is not None
    return int(OutHeader.parse(reply).error)


def test_handles_left_open_by_a_gone_frontend_do_not_outlive_its_session() -> None:
    """The FUSE layer outlives the vhost-user connections (one per daemon): a frontend that
    fills the handle table and goes away without DESTROY must not leave the next one (a new
    INIT) with ENFILE on every open."""
    fs = FuseFileSystem(MetadataStore("vm0", dict), Policy.default())
    init = InitInCompat.build({"major": 7, "minor": 31, "max_readahead": 65536, "flags": 0})
    opendir = OpenIn.build({"flags": 0, "open_flags": 0})
    assert _fuse_call(fs, Opcode.INIT, init, 1) == 0
    for unique in range(MAX_HANDLES):
        assert _fuse_call(fs, Opcode.OPENDIR, opendir, 2 + unique) == 0
    assert _fuse_call(fs, Opcode.OPENDIR, opendir, 1 << 20) < 0  # the table is full
    # The next frontend's guest mounts: a new FUSE session.
    assert _fuse_call(fs, Opcode.INIT, init, 1) == 0
    assert _fuse_call(fs, Opcode.OPENDIR, opendir, 2) == 0


@pytest.mark.timeout(60)
def test_fds_dripped_across_one_message_cannot_fill_the_fd_table(daemon: Daemon) -> None:
    """The 8-fd limit holds per message, not per read: a frontend that sends a message one
    payload byte at a time with 8 eventfds on each byte is cut off at the ninth fd, and the
    daemon never holds more than one message's worth of them."""
    import socket as socket_module

    before = daemon.fds()
    spare = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(8)]
    sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    try:
        sock.connect(str(daemon.socket(0)))
        payload_size = 200
        # SET_MEM_TABLE header: request, flags (version 1), size.
        sock.sendall(struct.pack("<III", int(Request.SET_MEM_TABLE), 1, payload_size))
        peak = before
        closed = False
        for _ in range(payload_size):
            try:
                sock.sendmsg([b"\0"], [(socket_module.SOL_SOCKET, socket_module.SCM_RIGHTS,
                                        struct.pack("8i", *spare))])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            peak = max(peak, daemon.fds())
        if not closed:
            sock.settimeout(5)
            closed = sock.recv(1) == b""
        assert closed, "the daemon kept reading a message that carried more than 8 fds"
        assert peak - before <= 16 + 4, (before, peak)
    finally:
        sock.close()
        for fd in spare:
            os.close(fd)
    deadline = time.monotonic() + 5
    while daemon.fds() > before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.fds() <= before + 1
    daemon.assert_alive()
    assert "more than 8 fds in one message" in daemon.server.log()
