"""virtio-fs: the metadata file system as a vhost-user-fs device.

QEMU: `-chardev socket,id=m0,path=SOCK -device vhost-user-fs-pci,chardev=m0,tag=metadata`
(QEMU keeps the tag and the config space itself); guest: `mount -t virtiofs metadata DIR`.
Queue 0 is the high-priority queue (FORGET, INTERRUPT), queue 1 the request queue. The C
side walks the rings (csrc/fs.c, the block device's hardened ring code); each request is a
FUSE message answered by the handler on the daemon's event loop, when the queue's kick
eventfd fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from vhost_pv._native import ffi, lib
from vhost_pv.devices.native_ring import memory_table, strerror, vring_config
from vhost_pv.protocol.channel import ProtocolError
from vhost_pv.protocol.session import MemoryRegionSpec, VringSetup, is_power_of_two

log = logging.getLogger("vhost_pv.fs")

Handler = Callable[[bytes, int], bytes | None]
"""One FUSE request's bytes and the reply's room -> the reply, or None (no reply)."""

SERVE_BATCH = 32
SERVE_BUDGET_S = 0.005
"""Requests answered per queue per turn of the event loop: at most SERVE_BATCH, and none
started after SERVE_BUDGET_S (a READDIRPLUS of a big directory costs far more than a
GETATTR). The queues are served on the daemon's event loop: a frontend that refills its ring
as fast as we empty it must not keep the loop (control socket, other volumes, the HTTP
metadata server) from running."""


class FsDevice:
    """One frontend connection's virtio-fs device; implements protocol.DeviceBackend."""

    def __init__(self, name: str, handler: Handler) -> None:
        self.name = name
        self.handler = handler
        self._handle: Any = lib.vpv_fs_new()
        if self._handle == ffi.NULL:
            raise MemoryError("cannot allocate the virtio-fs device")
        self._buffer = ffi.new("uint8_t[]", lib.VPV_FS_MAX_REQUEST)
        self._head = ffi.new("uint32_t *")
        self._writable = ffi.new("uint32_t *")
        self._kick_fds: dict[int, int] = {}
        # Queues whose ring still held requests after a batch: served again on the next turn.
        self._resume: dict[int, asyncio.Handle] = {}
        self.requests = 0
        self.bad_requests = 0
        self.oversized_replies = 0
        self._config_writes = 0
        self.broken: set[int] = set()
        self._on_failure: Callable[[str], None] | None = None

    def set_failure_handler(self, handler: Callable[[str], None]) -> None:
        """Who ends the connection when guest memory vanishes (the session)."""
        self._on_failure = handler

    def _fail(self, index: int, rc: int) -> None:
        """A queue cannot go on: log it, and end the connection when its memory is gone."""
        self.broken.add(index)
        if rc == -errno.EFAULT:
            reason = f"queue {index} stopped: its guest memory vanished (the frontend shrank its memory file)"
            if self._on_failure is not None:
                self._on_failure(reason)
            else:
                log.error("%s: %s", self.name, reason)
        else:
            log.error("%s: queue %d stopped: %s", self.name, index, strerror(rc))

    # -- DeviceBackend ----------------------------------------------------------------------

    def device_features(self) -> int:
        return 0  # no virtio-fs feature bits (no DAX window, no notification queue)

    def device_protocol_features(self) -> int:
        return 0

    def max_queues(self) -> int:
        return int(lib.VPV_FS_MAX_QUEUES)

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)  # QEMU answers the guest's config reads (tag) itself

    def set_config(self, offset: int, data: bytes) -> None:
        self._config_writes += 1
        if is_power_of_two(self._config_writes):
            log.info("%s: ignoring SET_CONFIG at offset %d (%d bytes; %d so far)", self.name, offset,
                     len(data), self._config_writes)

    def set_memory(self, regions: list[MemoryRegionSpec]) -> None:
        rc = lib.vpv_fs_set_memory(self._handle, memory_table(regions), len(regions))
        if rc < 0:
            raise ProtocolError(f"memory table does not map: {strerror(rc)}")

    def start_queue(self, setup: VringSetup) -> None:
        rc = lib.vpv_fs_queue_start(self._handle, setup.index, vring_config(setup))
        if rc < 0:
            raise ProtocolError(f"queue {setup.index} cannot start: {strerror(rc)}")
        self._kick_fds[setup.index] = setup.kick_fd
        asyncio.get_running_loop().add_reader(setup.kick_fd, self._kicked, setup.index)
        self._serve(setup.index)  # requests posted before the kick fd was watched

    def stop_queue(self, index: int) -> int:
        kick_fd = self._kick_fds.pop(index, None)
        if kick_fd is not None:
            asyncio.get_running_loop().remove_reader(kick_fd)
        resume = self._resume.pop(index, None)
        if resume is not None:
            resume.cancel()
        rc = lib.vpv_fs_queue_stop(self._handle, index)
        if rc < 0:
            raise ProtocolError(f"queue {index} cannot stop: {strerror(rc)}")
        return int(rc)

    def close(self) -> None:
        if self._handle is None:
            return
        loop = asyncio.get_event_loop()
        for kick_fd in self._kick_fds.values():
            loop.remove_reader(kick_fd)
        self._kick_fds.clear()
        for resume in self._resume.values():
            resume.cancel()
        self._resume.clear()
        lib.vpv_fs_free(self._handle)
        self._handle = None
        # The session and this device refer to each other (the failure handler): only the
        # cyclic garbage collector frees them, and it runs rarely in a daemon with many
        # long-lived objects. Release the request buffer (1 MiB) now, and the cycle with it.
        self._buffer = ffi.NULL
        self._on_failure = None

    def describe(self) -> dict[str, int]:
        return {"requests": self.requests, "bad_requests": self.bad_requests, "broken": len(self.broken)}

    # -- the queues -------------------------------------------------------------------------

    def _kicked(self, index: int) -> None:
        with contextlib.suppress(BlockingIOError, KeyError):
            _consume_kick(self._kick_fds[index])
        if index not in self._resume:  # else the next batch is scheduled already
            self._serve(index)

    def _serve(self, index: int) -> None:
        """Answer the requests on the queue, as many as SERVE_BATCH and SERVE_BUDGET_S allow
        in this turn of the event loop; the rest in the next turns."""
        self._resume.pop(index, None)
        if index in self.broken or self._handle is None or index not in self._kick_fds:
            return
        budget_end = time.monotonic() + SERVE_BUDGET_S
        for _ in range(SERVE_BATCH):
            if time.monotonic() > budget_end:
                break
            n = lib.vpv_fs_pop(self._handle, index, self._buffer, lib.VPV_FS_MAX_REQUEST, self._head,
                               self._writable)
            if n == -errno.EAGAIN:  # empty, kicks re-enabled
                return
            if n == -errno.EBADMSG:  # a chain nobody can answer, given back empty
                self.bad_requests += 1
                # A frontend can post these as fast as we give them back: log the 1st, 2nd,
                # 4th, ... so that it cannot fill the disk with our log.
                if is_power_of_two(self.bad_requests):
                    log.warning("%s: queue %d: malformed descriptor chain given back empty (%d so far)",
                                self.name, index, self.bad_requests)
                continue
            if n < 0:
                self._fail(index, n)
                return
            self.requests += 1
            request = bytes(ffi.buffer(self._buffer, n))
            room = int(self._writable[0])
            try:
                reply = self.handler(request, room)
            except Exception:  # the handler must not take the connection down with it
                log.exception("%s: FUSE handler failed", self.name)
                reply = None
            if reply is not None and len(reply) > room:
                self.oversized_replies += 1
                if is_power_of_two(self.oversized_replies):
                    log.warning("%s: a %d-byte reply does not fit in %d bytes (%d so far)", self.name,
                                len(reply), room, self.oversized_replies)
                reply = None
            data = reply or b""
            rc = lib.vpv_fs_push(self._handle, index, self._head[0], data, len(data))
            if rc < 0:
                self._fail(index, rc)
                return
        # The ring may hold more, and its kicks are off while we drain it (pop turned them
        # off): come back after whatever else is ready on the loop.
        self._resume[index] = asyncio.get_running_loop().call_soon(self._serve, index)


def _consume_kick(fd: int) -> None:
    """Read a kick eventfd without ever blocking the event loop: RWF_NOWAIT holds whatever
    the frontend did to the O_NONBLOCK flag of the description it shares with us."""
    try:
        os.preadv(fd, [bytearray(8)], -1, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:  # eventfds take RWF_NOWAIT since Linux 5.12
            raise
        os.set_blocking(fd, False)
        os.eventfd_read(fd)
