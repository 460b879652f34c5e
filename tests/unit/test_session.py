"""VhostUserSession in process: the vhost-user state machine over a socketpair, with a fake
DeviceBackend that records what the session asks of it. No daemon, no C data path.

The session runs on an asyncio loop in a thread of its own; the test drives the other end of
the socketpair with the blocking client of vhost_pv.protocol.frontend. With REPLY_ACK
negotiated every command waits for its ack, so the backend's records are complete when a
command returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from vhost_pv.protocol.channel import MessageChannel, ProtocolError
from vhost_pv.protocol.frontend import FrontendError, VhostUserFrontend
from vhost_pv.protocol.messages import (
    MAX_MEMORY_REGIONS,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_FILE_NOFD,
    MemoryRegion,
    ProtocolFeature,
    Request,
    U64Payload,
    VringAddress,
    VringState,
)
from vhost_pv.protocol.session import (
    BASE_PROTOCOL_FEATURES,
    TRANSPORT_FEATURES,
    MemoryRegionSpec,
    VhostUserSession,
    VringSetup,
    check_frontend_fd,
)

DEVICE_FEATURE = 1 << 9  # any device-specific bit: the session offers it on top of its own
STOP_BASE = 42  # what the fake device says its last_avail_idx is when stopped
MEMORY_SIZE = 1 << 20
GPA = 0x4000_0000
UADDR = 0x7F12_3400_0000
DESC, AVAIL, USED = UADDR, UADDR + 0x4000, UADDR + 0x8000


def fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@dataclasses.dataclass
class FakeDevice:
    """A DeviceBackend that only records: the session's decisions are all there is to see."""

    queues: int = 2
    calls: list[tuple[str, object]] = dataclasses.field(default_factory=list)
    started: list[VringSetup] = dataclasses.field(default_factory=list)
    # What each started queue's fds were (the session closes them later: readlink now).
    started_fds: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    closed: bool = False

    def device_features(self) -> int:
        return DEVICE_FEATURE

    def device_protocol_features(self) -> int:
        return 0

    def max_queues(self) -> int:
        return self.queues

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:
        self.calls.append(("set_config", offset))

    def set_memory(self, regions: list[MemoryRegionSpec]) -> None:
        self.calls.append(("set_memory", [(r.guest_phys_addr, r.memory_size, r.userspace_addr)
                                          for r in regions]))

    def start_queue(self, setup: VringSetup) -> None:
        self.calls.append(("start", setup.index))
        self.started.append(setup)
        self.started_fds.append((fd_target(setup.kick_fd),
                                 fd_target(setup.call_fd) if setup.call_fd >= 0 else ""))

    def stop_queue(self, index: int) -> int:
        self.calls.append(("stop", index))
        return STOP_BASE

    def close(self) -> None:
        self.closed = True

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class PairFrontend(VhostUserFrontend):
    """The library's blocking frontend on one end of a socketpair instead of a socket path."""

    def __init__(self, sock: socket.socket) -> None:  # no super().__init__: it would connect
        self.sock = sock
        self.sock.settimeout(5.0)
        self.reply_ack = False
        self.queues = {}


class Running:
    """A session serving one end of a socketpair on its own event loop thread."""

    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.frontend = PairFrontend(theirs)
        self.session: VhostUserSession | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ours,), name="session", daemon=True)
        self.thread.start()
        assert self._ready.wait(5)

    def _serve(self, sock: socket.socket) -> None:
        async def main() -> None:
            # MessageChannel binds to the running loop: create both inside it.
            self.session = VhostUserSession(MessageChannel(sock), self.device, "test")
            self._ready.set()
            await self.session.run()

        asyncio.run(main())

    def ended(self, timeout: float = 5.0) -> bool:
        """True once the session closed the connection and its run() returned."""
        closed = self.frontend.wait_closed(timeout)
        self.thread.join(timeout)
        return closed and not self.thread.is_alive()

    def close(self) -> None:
        self.frontend.close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the session did not end when the frontend closed"


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def running(device: FakeDevice) -> Iterator[Running]:
    run = Running(device)
    yield run
    run.close()


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-session-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEMORY_SIZE)
    yield fd
    os.close(fd)


def region(fd: int) -> MemoryRegionSpec:
    return MemoryRegionSpec(GPA, MEMORY_SIZE, UADDR, 0, fd)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def negotiate(frontend: VhostUserFrontend) -> None:
    """Everything offered acked, REPLY_ACK included: from here on each command is synchronous."""
    frontend.negotiate()
    assert frontend.reply_ack


def vring_num(frontend: VhostUserFrontend, index: int, num: int) -> None:
    frontend.command(Request.SET_VRING_NUM, bytes(VringState.build({"index": index, "num": num})))


def vring_addr(frontend: VhostUserFrontend, index: int) -> None:
    frontend.command(Request.SET_VRING_ADDR, bytes(VringAddress.build(
        {"index": index, "flags": 0, "desc_user_addr": DESC, "used_user_addr": USED,
         "avail_user_addr": AVAIL, "log_guest_addr": 0})))


def vring_file(frontend: VhostUserFrontend, request: Request, index: int, fd: int) -> None:
    frontend.command(request, bytes(U64Payload.build(index)), [fd])


def start_queue0(frontend: VhostUserFrontend, memfd: int) -> tuple[int, int]:
    """A negotiated frontend with queue 0 running; returns the frontend's (kick, call) fds."""
    negotiate(frontend)
    frontend.set_mem_table([region(memfd)])
    fds = frontend.setup_vring(0, 64, DESC, AVAIL, USED)
    return fds.kick, fds.call


def log_errors(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


# -- negotiation -----------------------------------------------------------------------------


def test_offers_transport_and_device_features_and_its_queues(running: Running) -> None:
    frontend = running.frontend
    assert frontend.get_features() == TRANSPORT_FEATURES | DEVICE_FEATURE
    assert frontend.get_protocol_features() == BASE_PROTOCOL_FEATURES
    assert frontend.get_queue_num() == 2
    negotiate(frontend)
    assert running.session is not None
    assert running.session.features == TRANSPORT_FEATURES | DEVICE_FEATURE
    assert running.session.protocol_features == BASE_PROTOCOL_FEATURES


@pytest.mark.parametrize(("request_", "offered"), [
    (Request.SET_FEATURES, TRANSPORT_FEATURES | DEVICE_FEATURE),
    (Request.SET_PROTOCOL_FEATURES, BASE_PROTOCOL_FEATURES),
])
def test_acking_a_feature_never_offered_ends_the_session(
    running: Running, caplog: pytest.LogCaptureFixture, request_: Request, offered: int
) -> None:
    never = 1 << 40
    assert not offered & never
    running.frontend.send(request_, bytes(U64Payload.build(offered | never)))
    assert running.ended()
    assert f"{request_.name}: acks features never offered: {never:#x}" in log_errors(caplog)
    assert running.device.closed


def test_reply_ack_only_once_negotiated(running: Running) -> None:
    frontend = running.frontend
    frontend.set_features(frontend.get_features())
    # REPLY_ACK not acked: a NEED_REPLY message gets no ack, so the next reply read is the
    # GET_QUEUE_NUM one (receive() refuses a reply to any other request).
    frontend.set_protocol_features(1 << ProtocolFeature.MQ)
    frontend.send(Request.SET_OWNER, need_reply=True)
    assert frontend.get_queue_num() == 2
    # Acked: every NEED_REPLY command is answered with 0 ...
    frontend.set_protocol_features(BASE_PROTOCOL_FEATURES)
    frontend.send(Request.SET_OWNER, need_reply=True)
    assert U64Payload.parse(frontend.receive(Request.SET_OWNER)) == 0
    # ... but a request with a reply of its own gets that reply only.
    frontend.send(Request.GET_QUEUE_NUM, need_reply=True)
    assert U64Payload.parse(frontend.receive(Request.GET_QUEUE_NUM)) == 2
    assert frontend.get_protocol_features() == BASE_PROTOCOL_FEATURES


# -- the memory table --------------------------------------------------------------------------


def _table(count: int) -> bytes:
    # num_regions, padding, then `count` regions (all alike: the fds decide what they are).
    one = MemoryRegion.build({"guest_phys_addr": GPA, "memory_size": MEMORY_SIZE,
                              "userspace_addr": UADDR, "mmap_offset": 0})
    return count.to_bytes(4, "little") + bytes(4) + bytes(one) * count


@pytest.mark.parametrize(("case", "expected"), [
    ("no-regions", "SET_MEM_TABLE: 0 regions (1..8 allowed)"),
    ("too-many-regions", f"SET_MEM_TABLE: {MAX_MEMORY_REGIONS + 1} regions (1..8 allowed)"),
    # The channel refuses a 9th fd before the session sees the message.
    ("too-many-fds", f"more than {MAX_MEMORY_REGIONS} fds in one message"),
    ("short-payload", "SET_MEM_TABLE: payload is 4 bytes"),
    ("no-fd", "SET_MEM_TABLE: carries 0 fds, expected 1"),
    ("two-fds-one-region", "SET_MEM_TABLE: carries 2 fds, expected 1"),
    ("pipe", "SET_MEM_TABLE: the memory fd is a pipe"),
    ("eventfd", "SET_MEM_TABLE: the memory fd is anon_inode:[eventfd], not a regular file"),
])
def test_bad_memory_tables_end_the_session_unmapped(
    running: Running, memfd: int, caplog: pytest.LogCaptureFixture, case: str, expected: str
) -> None:
    negotiate(running.frontend)
    read_end, write_end = os.pipe()
    event = eventfd()
    try:
        payload, fds = {
            "no-regions": (_table(0), []),
            "too-many-regions": (_table(MAX_MEMORY_REGIONS + 1), [memfd] * MAX_MEMORY_REGIONS),
            "too-many-fds": (_table(MAX_MEMORY_REGIONS), [memfd] * (MAX_MEMORY_REGIONS + 1)),
            "short-payload": (bytes(4), [memfd]),
            "no-fd": (_table(1), []),
            "two-fds-one-region": (_table(1), [memfd, memfd]),
            "pipe": (_table(1), [read_end]),
            "eventfd": (_table(1), [event]),
        }[case]
        running.frontend.send(Request.SET_MEM_TABLE, payload, fds)
        assert running.ended()
    finally:
        for fd in (read_end, write_end, event):
            os.close(fd)
    assert expected in log_errors(caplog)
    assert "set_memory" not in running.device.names()
    assert running.session is not None and not running.session.memory_mapped


def test_memory_table_reaches_the_device(running: Running, memfd: int) -> None:
    negotiate(running.frontend)
    running.frontend.set_mem_table([region(memfd), MemoryRegionSpec(1 << 32, MEMORY_SIZE, 1 << 46, 0, memfd)])
    assert running.device.calls == [("set_memory", [(GPA, MEMORY_SIZE, UADDR),
                                                    (1 << 32, MEMORY_SIZE, 1 << 46)])]


# -- when a queue runs ---------------------------------------------------------------------------


def _setup_without(frontend: VhostUserFrontend, memfd: int, kick: int, missing: str) -> None:
    if missing == "disabled":
        frontend.set_vring_enable(0, False)
    if missing != "num":
        vring_num(frontend, 0, 64)
    if missing != "addr":
        vring_addr(frontend, 0)
    if missing != "kick":
        vring_file(frontend, Request.SET_VRING_KICK, 0, kick)
    if missing != "memory":
        frontend.set_mem_table([region(memfd)])


def _assert_started_once(device: FakeDevice) -> None:
    assert device.names().count("start") == 1
    (setup,) = device.started
    assert (setup.index, setup.num, setup.base) == (0, 64, 0)
    assert (setup.desc_user_addr, setup.avail_user_addr, setup.used_user_addr) == (DESC, AVAIL, USED)
    assert setup.event_idx and setup.indirect  # both were offered and acked
    assert device.started_fds[0][0] == "anon_inode:[eventfd]"
    assert setup.call_fd == -1  # no call fd yet: the device must cope


@pytest.mark.parametrize("missing", ["kick", "memory", "disabled"])
def test_a_queue_starts_when_its_last_piece_arrives(running: Running, memfd: int, missing: str) -> None:
    """Kick, memory table and enable may come in any order (the spec does not order them):
    whichever completes the set starts the queue."""
    frontend = running.frontend
    negotiate(frontend)
    kick = eventfd()
    try:
        _setup_without(frontend, memfd, kick, missing)
        assert "start" not in running.device.names()
        last_piece: dict[str, Callable[[], None]] = {
            "kick": lambda: vring_file(frontend, Request.SET_VRING_KICK, 0, kick),
            "memory": lambda: frontend.set_mem_table([region(memfd)]),
            "disabled": lambda: frontend.set_vring_enable(0, True),
        }
        last_piece[missing]()
    finally:
        os.close(kick)
    _assert_started_once(running.device)


@pytest.mark.parametrize("missing", ["addr", "num"])
def test_a_queue_without_addr_or_num_does_not_start_until_kicked_again(
    running: Running, memfd: int, missing: str
) -> None:
    """The ring's size and addresses come before its kick fd (QEMU's order): they never
    start a queue themselves; the next SET_VRING_KICK does."""
    frontend = running.frontend
    negotiate(frontend)
    kick = eventfd()
    try:
        _setup_without(frontend, memfd, kick, missing)
        if missing == "addr":
            vring_addr(frontend, 0)
        else:
            vring_num(frontend, 0, 64)
        assert "start" not in running.device.names()
        vring_file(frontend, Request.SET_VRING_KICK, 0, kick)
    finally:
        os.close(kick)
    _assert_started_once(running.device)


def test_ring_size_and_addresses_are_refused_while_the_queue_runs(
    running: Running, memfd: int, caplog: pytest.LogCaptureFixture
) -> None:
    start_queue0(running.frontend, memfd)
    running.frontend.send(Request.SET_VRING_NUM, bytes(VringState.build({"index": 0, "num": 128})))
    assert running.ended()
    assert "SET_VRING_NUM: queue 0 is running" in log_errors(caplog)
    assert running.device.started[-1].num == 64


def test_features_not_acked_are_not_used_by_the_queue(running: Running, memfd: int) -> None:
    frontend = running.frontend
    offered = frontend.get_features()
    frontend.set_features(offered & ~(1 << VIRTIO_RING_F_EVENT_IDX) & ~(1 << VIRTIO_RING_F_INDIRECT_DESC))
    frontend.set_protocol_features(BASE_PROTOCOL_FEATURES)
    frontend.set_mem_table([region(memfd)])
    frontend.setup_vring(0, 16, DESC, AVAIL, USED, base=7)
    assert all(not s.event_idx and not s.indirect for s in running.device.started)
    # The first start is the kick's, with the frontend's base (SET_VRING_CALL restarts later).
    assert (running.device.started[0].num, running.device.started[0].base) == (16, 7)


def test_get_vring_base_stops_the_queue_and_a_new_kick_resumes_it(running: Running, memfd: int) -> None:
    frontend = running.frontend
    start_queue0(frontend, memfd)
    assert running.device.names()[-1] == "start"
    assert frontend.get_vring_base(0) == STOP_BASE
    assert running.device.names()[-1] == "stop"
    assert running.session is not None
    queue = running.session.queues[0]
    assert not queue.running and queue.kick_fd == queue.call_fd == -1  # the fds are released
    # A frontend restarts the queue by sending a kick fd again; it resumes where it stopped.
    kick = eventfd()
    try:
        vring_file(frontend, Request.SET_VRING_KICK, 0, kick)
    finally:
        os.close(kick)
    assert running.device.names()[-1] == "start"
    assert running.device.started[-1].base == STOP_BASE


def test_set_vring_call_while_running_restarts_the_queue_with_the_new_fd(
    running: Running, memfd: int
) -> None:
    frontend = running.frontend
    start_queue0(frontend, memfd)
    before = len(running.device.calls)
    call = eventfd()
    try:
        vring_file(frontend, Request.SET_VRING_CALL, 0, call)
        # The worker writes to the call fd: it was stopped for the swap, then started again.
        assert running.device.names()[before:] == ["stop", "start"]
        setup = running.device.started[-1]
        assert setup.base == STOP_BASE
        assert os.fstat(setup.call_fd).st_ino == os.fstat(call).st_ino  # the new eventfd, not the old
        # No call fd at all (NOFD): the queue runs on, without interrupts.
        frontend.command(Request.SET_VRING_CALL, bytes(U64Payload.build(VRING_FILE_NOFD)))
        assert running.device.names()[-2:] == ["stop", "start"]
        assert running.device.started[-1].call_fd == -1
    finally:
        os.close(call)


def test_set_vring_call_on_a_stopped_queue_starts_nothing(running: Running, memfd: int) -> None:
    frontend = running.frontend
    negotiate(frontend)
    call = eventfd()
    try:
        vring_file(frontend, Request.SET_VRING_CALL, 1, call)
    finally:
        os.close(call)
    assert "start" not in running.device.names() and "stop" not in running.device.names()


# -- fds of the wrong kind -----------------------------------------------------------------------


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR])
@pytest.mark.parametrize("kind", ["pipe", "memfd", "socket"])
def test_a_vring_fd_that_is_not_an_eventfd_ends_the_session(
    running: Running, memfd: int, caplog: pytest.LogCaptureFixture, request_: Request, kind: str
) -> None:
    negotiate(running.frontend)
    read_end, write_end = os.pipe()
    left, right = socket.socketpair()
    try:
        fd = {"pipe": read_end, "memfd": memfd, "socket": left.fileno()}[kind]
        running.frontend.send(request_, bytes(U64Payload.build(0)), [fd])
        assert running.ended()
    finally:
        os.close(read_end)
        os.close(write_end)
        left.close()
        right.close()
    assert f"{request_.name}: the fd is " in log_errors(caplog)
    assert "not an eventfd" in log_errors(caplog)
    assert "start" not in running.device.names()


def test_check_frontend_fd_accepts_what_it_should_and_makes_eventfds_non_blocking(memfd: int) -> None:
    blocking = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        check_frontend_fd(blocking, "eventfd", "SET_VRING_KICK")
        # O_NONBLOCK now: neither a queue worker nor the event loop can block on it.
        assert fcntl.fcntl(blocking, fcntl.F_GETFL) & os.O_NONBLOCK
        with pytest.raises(ProtocolError, match=r"SET_MEM_TABLE: the memory fd is anon_inode:\[eventfd\]"):
            check_frontend_fd(blocking, "memory", "SET_MEM_TABLE")
    finally:
        os.close(blocking)
    check_frontend_fd(memfd, "memory", "SET_MEM_TABLE")
    with pytest.raises(ProtocolError, match="SET_VRING_CALL: the fd is a regular file"):
        check_frontend_fd(memfd, "eventfd", "SET_VRING_CALL")
    zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(ProtocolError, match="the memory fd is a character device"):
            check_frontend_fd(zero, "memory", "SET_INFLIGHT_FD")
    finally:
        os.close(zero)
    # An fd number that is not open: examined and refused, no exception of another kind.
    spare = os.dup(memfd)
    os.close(spare)
    with pytest.raises(ProtocolError, match="cannot be examined"):
        check_frontend_fd(spare, "memory", "SET_MEM_TABLE")


def test_unsupported_requests_end_the_session(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    # The fake device offers no INFLIGHT_SHMFD: the inflight requests are not served.
    negotiate(running.frontend)
    running.frontend.send(Request.GET_INFLIGHT_FD, bytes(24))
    assert running.ended()
    assert "GET_INFLIGHT_FD is not supported by this backend" in log_errors(caplog)


# -- shutdown --------------------------------------------------------------------------------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_shutdown_stops_the_queues_and_releases_every_fd(memfd: int) -> None:
    before = open_fds()
    device = FakeDevice()
    run = Running(device)
    frontend = run.frontend
    start_queue0(frontend, memfd)
    frontend.setup_vring(1, 64, DESC, AVAIL, USED)
    err = eventfd()
    vring_file(frontend, Request.SET_VRING_ERR, 0, err)
    os.close(err)
    assert run.session is not None
    assert [q.running for q in run.session.queues] == [True, True]
    queues = run.session.queues
    held = [queues[0].kick_fd, queues[0].call_fd, queues[0].err_fd, queues[1].kick_fd, queues[1].call_fd]
    assert min(held) >= 0
    run.close()  # closes the frontend's socket and eventfds too
    assert sorted(device.calls[-2:]) == [("stop", 0), ("stop", 1)]
    assert device.closed
    # Everything the frontend passed, the session's end of the socket and the event loop's
    # own fds are gone: nothing is left open from the whole session.
    assert open_fds() == before, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before}


def test_a_frontend_that_hangs_up_mid_setup_leaves_no_fd(memfd: int) -> None:
    before = open_fds()
    device = FakeDevice()
    run = Running(device)
    negotiate(run.frontend)
    kick = eventfd()
    vring_file(run.frontend, Request.SET_VRING_KICK, 1, kick)  # queue 1 never gets the rest
    os.close(kick)
    run.close()
    assert "start" not in device.names() and device.closed
    assert open_fds() == before


def test_hangup_with_a_message_half_sent_is_a_disconnect(running: Running) -> None:
    negotiate(running.frontend)
    running.frontend.sock.sendall(bytes(6))  # part of a header
    running.frontend.sock.shutdown(socket.SHUT_WR)
    assert running.ended()
    assert running.device.closed
    with pytest.raises((FrontendError, OSError)):
        running.frontend.get_queue_num()
