"""The virtio-blk device: features, config space, and the C data path per connection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from vhost_pv._native import ffi, lib
from vhost_pv.devices.native_ring import memory_table, strerror, vring_config
from vhost_pv.protocol.channel import ProtocolError
from vhost_pv.protocol.messages import CONFIG_SPACE_MAX, ProtocolFeature
from vhost_pv.protocol.session import MemoryRegionSpec, VringSetup, is_power_of_two
from vhost_pv.virtio.blk import (
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEGMENTS,
    MAX_SEGMENT_SIZE,
    SECTOR_SIZE,
    SEG_MAX,
    BlkFeature,
    VirtioBlkConfig,
)
from vhost_pv.volume.volume import Volume

log = logging.getLogger("vhost_pv.blk")


@dataclasses.dataclass
class BlkStats:
    """Counters summed over the queues of one connection."""

    queues: list[dict[str, int]]

    def total(self, key: str) -> int:
        return sum(q[key] for q in self.queues)


class BlkDevice:
    """One frontend connection's view of a volume; implements protocol.DeviceBackend."""

    def __init__(
        self, volume: Volume, num_queues: int, *, read_only: bool, source: int = 0, sync_io: bool = False
    ) -> None:
        """sync_io: no io_uring, data I/O one request at a time (what the data path falls
        back to where io_uring is unavailable; the tests run it on purpose)."""
        self.volume = volume
        self.num_queues = num_queues
        self.read_only = read_only or volume.read_only
        err = ffi.new("int *")
        flags = (lib.VPV_BLK_READ_ONLY if self.read_only else 0) | (lib.VPV_BLK_SYNC_IO if sync_io else 0)
        # source names this connection in quarantine records and dangling events.
        handle = lib.vpv_blk_new(volume.native, flags, volume.header.serial, source, volume.direct_fd, err)
        if handle == ffi.NULL:
            raise OSError(-err[0], f"cannot set up the data path for {volume.path}")
        self._handle: Any = handle
        self._started: set[int] = set()
        self._final_stats: BlkStats | None = None
        self._broken_fd = int(lib.vpv_blk_broken_fd(handle))
        self._watching: asyncio.AbstractEventLoop | None = None
        self._on_failure: Callable[[str], None] | None = None
        self._failed = False
        self._config_writes = 0

    def set_failure_handler(self, handler: Callable[[str], None]) -> None:
        """Who ends the connection when a queue breaks (the session)."""
        self._on_failure = handler

    def _watch_broken(self) -> None:
        """Watch the C side's broken eventfd on the running loop (once per device)."""
        if self._watching is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (in-process tests): process_queue reports a broken queue itself
        loop.add_reader(self._broken_fd, self._queue_broke)
        self._watching = loop

    def _queue_broke(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._broken_fd)
        if self._failed or self._handle is None:
            return
        reasons = []
        for index, queue in enumerate(self.stats().queues):
            if queue["broken"]:
                why = ("its guest memory vanished (the frontend shrank or truncated its memory file)"
                       if queue["guest_faults"] else "its ring is corrupt")
                reasons.append(f"queue {index} stopped: {why}")
        if not reasons:
            return
        self._failed = True
        reason = "; ".join(reasons)
        if self._on_failure is None:
            log.error("%s: %s", self.volume.name, reason)
        else:
            self._on_failure(reason)

    # -- DeviceBackend ----------------------------------------------------------------------

    def device_features(self) -> int:
        features = (
            (1 << BlkFeature.SIZE_MAX)
            | (1 << BlkFeature.SEG_MAX)
            | (1 << BlkFeature.BLK_SIZE)
            | (1 << BlkFeature.TOPOLOGY)
            | (1 << BlkFeature.FLUSH)
            | (1 << BlkFeature.MQ)
        )
        if self.read_only:
            features |= 1 << BlkFeature.RO
        else:
            features |= (1 << BlkFeature.DISCARD) | (1 << BlkFeature.WRITE_ZEROES)
        return features

    def device_protocol_features(self) -> int:
        # INFLIGHT_SHMFD: requests complete out of order (io_uring), so after a crash the
        # ring alone cannot say which were done; the inflight area can (session.py, vring.c).
        return (1 << ProtocolFeature.CONFIG) | (1 << ProtocolFeature.INFLIGHT_SHMFD)

    def max_queues(self) -> int:
        return self.num_queues

    def config_space(self) -> bytes:
        header = self.volume.header
        raw: bytes = VirtioBlkConfig.build(
            {
                "capacity": header.capacity // SECTOR_SIZE,
                "size_max": MAX_SEGMENT_SIZE,
                "seg_max": SEG_MAX,
                "cylinders": 0,
                "heads": 0,
                "sectors": 0,
                "blk_size": SECTOR_SIZE,
                "physical_block_exp": 3,  # 4 KiB physical blocks: page-sized I/O is fastest
                "alignment_offset": 0,
                "min_io_size": 1,
                "opt_io_size": 0,
                "writeback": 1,
                "num_queues": self.num_queues,
                "max_discard_sectors": MAX_DISCARD_SECTORS,
                "max_discard_seg": MAX_DISCARD_SEGMENTS,
                "discard_sector_alignment": 8,
                "max_write_zeroes_sectors": MAX_DISCARD_SECTORS,
                "max_write_zeroes_seg": MAX_DISCARD_SEGMENTS,
                "write_zeroes_may_unmap": 1,
            }
        )
        return raw.ljust(CONFIG_SPACE_MAX, b"\0")

    def get_config(self, offset: int, size: int) -> bytes:
        return self.config_space()[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        # Nothing in our config space is writable (CONFIG_WCE is not offered).
        self._config_writes += 1
        if is_power_of_two(self._config_writes):
            log.info("%s: ignoring SET_CONFIG at offset %d (%d bytes; %d so far)", self.volume.name, offset,
                     len(data), self._config_writes)

    def set_memory(self, regions: list[MemoryRegionSpec]) -> None:
        table = memory_table(regions)
        rc = lib.vpv_blk_set_memory(self._handle, table, len(regions))
        if rc < 0:
            raise ProtocolError(f"memory table does not map: {strerror(rc)}")

    def start_queue(self, setup: VringSetup) -> None:
        cfg = vring_config(setup)
        rc = lib.vpv_blk_queue_start(self._handle, setup.index, cfg)
        if rc == -errno.EBADMSG:
            raise ProtocolError(f"queue {setup.index} cannot start: its inflight region is inconsistent")
        if rc < 0:
            raise ProtocolError(f"queue {setup.index} cannot start: {strerror(rc)}")
        self._started.add(setup.index)
        self._watch_broken()

    def stop_queue(self, index: int) -> int:
        rc = lib.vpv_blk_queue_stop(self._handle, index)
        self._started.discard(index)
        if rc == -errno.ETIMEDOUT:
            # The worker is stuck in the kernel on the volume's file (a stalled disk): the C
            # side gave up waiting rather than hold the event loop; the worker finishes on its
            # own, guest memory mapped until then. This frontend is done with.
            reason = (f"queue {index}: its worker is stuck on {self.volume.path} (a stalled "
                      "disk?) and was left to finish on its own")
            self._failed = True
            if self._on_failure is None:
                log.error("%s: %s", self.volume.name, reason)
            else:
                self._on_failure(reason)
            return int(self.stats().queues[index]["last_avail_idx"])
        if rc < 0:
            raise ProtocolError(f"queue {index} cannot stop: {strerror(rc)}")
        # The worker drains its io_uring before it exits: after a clean stop nothing may be
        # left marked in flight, or a later restart would do it again.
        left = int(lib.vpv_blk_queue_inflight(self._handle, index))
        if left > 0:
            # Legitimate when the queue is stopped before it got through what an earlier
            # backend left in flight (QEMU replaces the call fd right after the start): they
            # stay marked and are resubmitted when the queue starts again.
            log.info("%s: queue %d stopped with %d requests still marked in flight (resubmitted at "
                     "its next start)", self.volume.name, index, left)
        return int(rc)

    def process_queue(self, index: int) -> int:
        """Drain a queue started without a kick fd in this thread (tests, polling)."""
        return int(lib.vpv_blk_queue_process(self._handle, index))

    def close(self) -> None:
        if self._watching is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                self._watching.remove_reader(self._broken_fd)
            self._watching = None
        if self._handle is not None:
            # Stop the workers first so the counters kept for status are final.
            for index in sorted(self._started):
                lib.vpv_blk_queue_stop(self._handle, index)
            self._started.clear()
            self._final_stats = self.stats()
            lib.vpv_blk_free(self._handle)
            self._handle = None
        self._on_failure = None  # the session refers to us too: break the cycle

    # -- introspection ----------------------------------------------------------------------

    def stats(self) -> BlkStats:
        """Per-queue counters; after close, the last values the queues had."""
        if self._handle is None:
            return self._final_stats or BlkStats([])
        out = ffi.new("struct vpv_queue_stats *")
        queues = []
        for index in range(self.num_queues):
            lib.vpv_blk_queue_stats(self._handle, index, out)
            queues.append({name: int(getattr(out, name)) for name in _STAT_FIELDS})
        return BlkStats(queues)

    def health(self) -> list[dict[str, int]]:
        """Per-queue liveness of the workers (vpv_queue_health): heartbeats, busy_ns,
        uring_wait_ns, has_worker. Empty after close."""
        if self._handle is None:
            return []
        out = ffi.new("struct vpv_queue_health *")
        queues = []
        for index in range(self.num_queues):
            lib.vpv_blk_queue_health(self._handle, index, out)
            queues.append({name: int(getattr(out, name)) for name in _HEALTH_FIELDS})
        return queues


_HEALTH_FIELDS = [
    name for name, _ in ffi.typeof("struct vpv_queue_health").fields if not name.startswith("_")
]

_STAT_FIELDS = [
    name for name, _ in ffi.typeof("struct vpv_queue_stats").fields if not name.startswith("_")
]

