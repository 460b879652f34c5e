"""`vhost-pv loadgen`: drive any vhost-user-blk backend at its limit, from the host.

A TCG guest issues ~10k IOPS at best, so to compare backends (vhost-pv, qemu-storage-daemon)
we play the frontend ourselves: the vhost-user handshake here (VhostUserFrontend), rings and
request buffers in a memfd we share with the backend, and the data path in C
(csrc/loadgen.c, one thread per queue, all inside one cffi call that releases the GIL).

The handshake, in the order QEMU uses:

    GET_FEATURES
    GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (MQ, CONFIG, REPLY_ACK as offered)
    GET_QUEUE_NUM (protocol MQ)
    SET_OWNER
    GET_CONFIG (capacity in 512-byte sectors, size_max, num_queues)
    SET_FEATURES (VERSION_1, EVENT_IDX, MQ when queues > 1, PROTOCOL_FEATURES, as offered)
    SET_MEM_TABLE (one memfd region: guest physical address GPA_BASE, userspace address = our
                   mapping's real address, which is what SET_VRING_ADDR speaks in)
    per queue: SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE 0, SET_VRING_KICK, SET_VRING_CALL,
               SET_VRING_ENABLE 1 (with protocol features)
    ... run ...
    per queue: GET_VRING_BASE (stops it; must equal the requests we made, mod 2^16); close
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import secrets
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vhost_pv.protocol.frontend import FrontendError, VhostUserFrontend
from vhost_pv.protocol.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    ProtocolFeature,
)
from vhost_pv.protocol.session import MemoryRegionSpec
from vhost_pv.virtio.blk import CONFIG_SIZE, SECTOR_SIZE, BlkFeature, config_offset
from vhost_pv_tools.loadgen._native import ffi, lib

log = logging.getLogger("vhost_pv_tools.loadgen")

RW_MODES = {
    "randread": lib.VPV_LG_RANDREAD,
    "randwrite": lib.VPV_LG_RANDWRITE,
    "read": lib.VPV_LG_READ,
    "write": lib.VPV_LG_WRITE,
    "randrw": lib.VPV_LG_RANDRW,
}
WRITING_MODES = frozenset({"randwrite", "write", "randrw"})
READING_MODES = frozenset({"randread", "read", "randrw"})

PAGE = 4096
# Guest physical addresses start here; our own mapping's address is the userspace address.
# They differ, so a backend that confuses the two finds nothing.
GPA_BASE = 0x1_0000_0000
STALL_TIMEOUT_MS = 5000
MAX_IODEPTH = int(lib.VPV_LG_MAX_IODEPTH)
MAX_QUEUES = int(lib.VPV_LG_MAX_QUEUES)
MAX_RING_SIZE = 1024  # VIRTQUEUE_MAX_SIZE of QEMU and libvhost-user

CONFIG_SIZE_MAX_OFFSET = config_offset("size_max")
CONFIG_NUM_QUEUES_OFFSET = config_offset("num_queues")

_HIST_VALUES_NS = np.array(
    [lib.vpv_lg_hist_value(i) for i in range(lib.VPV_LG_HIST_BUCKETS)], dtype=np.float64
)


class LoadgenError(RuntimeError):
    """The backend refused the handshake, or the run failed (stall, protocol violation)."""


@dataclasses.dataclass
class VerifyState:
    """What a verify run leaves behind: block size, pattern seed and every block's generation
    (0: unknown). Pass it to the next run to have that run check what this one wrote."""

    bs: int
    seed: int
    generations: npt.NDArray[np.uint32]

    @property
    def written_blocks(self) -> npt.NDArray[np.intp]:
        """Numbers of the blocks holding a known pattern."""
        return np.flatnonzero(self.generations)


@dataclasses.dataclass
class LoadgenResult:
    rw: str
    bs: int
    iodepth: int
    queues: int
    runtime_s: float
    elapsed_s: float
    ios: int
    reads: int
    writes: int
    bytes: int
    iops: float
    mib_s: float
    lat_mean_us: float
    lat_p50_us: float
    lat_p99_us: float
    lat_p999_us: float
    lat_max_us: float
    errors: int
    verify: bool
    verified_reads: int
    verify_mismatches: int
    bad_sectors: list[int]
    prefill_ios: int
    check_ios: int
    event_idx: bool
    kicks: int
    waits: int
    client_cpu_us_per_io: float
    backend_cpu_us_per_io: float | None
    capacity: int
    seed: int
    interrupted: bool = False
    verify_state: VerifyState | None = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.verify_mismatches == 0 and not self.interrupted

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["verify_state"]
        return out

    def summary(self) -> str:
        lines = [
            f"{self.rw} bs={self.bs} iodepth={self.iodepth} queues={self.queues}: "
            f"{self.iops:,.0f} IOPS, {self.mib_s:,.1f} MiB/s over {self.elapsed_s:.2f} s "
            f"({self.ios} I/Os, {self.errors} errors)",
            f"  latency us: mean {self.lat_mean_us:.1f}  p50 {self.lat_p50_us:.1f}  "
            f"p99 {self.lat_p99_us:.1f}  p99.9 {self.lat_p999_us:.1f}  max {self.lat_max_us:.1f}",
            f"  cpu us/io: client {self.client_cpu_us_per_io:.2f}  backend "
            + ("n/a" if self.backend_cpu_us_per_io is None else f"{self.backend_cpu_us_per_io:.2f}")
            + f"; kicks {self.kicks}, waits {self.waits}, event_idx {'on' if self.event_idx else 'off'}",
        ]
        if self.verify:
            lines.append(
                f"  verify: {self.verified_reads} reads checked, {self.verify_mismatches} mismatches"
                + (f" (first sectors {self.bad_sectors})" if self.bad_sectors else "")
                + f"; prefill {self.prefill_ios} writes, check {self.check_ios} reads"
            )
        if self.interrupted:
            lines.append("  interrupted")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Negotiated:
    features: int
    protocol: int
    capacity: int
    event_idx: bool
    size_max: int  # 0: no limit offered


@dataclasses.dataclass(frozen=True)
class _QueueLayout:
    desc: int
    avail: int
    used: int
    area: int
    area_size: int


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def ring_size_for(iodepth: int) -> int:
    """Three descriptors per request: the smallest power of two holding them (at least 64)."""
    num = 64
    while num < 3 * iodepth:
        num *= 2
    return num


def _layout(queues: int, num: int, iodepth: int, bs: int) -> tuple[list[_QueueLayout], int]:
    """Each queue: descriptor table, available ring, used ring (4096-aligned), request area."""
    layouts = []
    offset = 0
    area_size = int(lib.vpv_lg_area_size(iodepth, bs))
    for _ in range(queues):
        desc = _align(offset, PAGE)
        avail = desc + 16 * num
        used = _align(avail + 6 + 2 * num, PAGE)
        area = _align(used + 6 + 8 * num, PAGE)
        offset = area + area_size
        layouts.append(_QueueLayout(GPA_BASE + desc, GPA_BASE + avail, GPA_BASE + used,
                                    GPA_BASE + area, area_size))
    return layouts, _align(offset, PAGE)


def _handshake(frontend: VhostUserFrontend, queues: int, event_idx: bool) -> _Negotiated:
    offered = frontend.get_features()
    if not offered & (1 << VIRTIO_F_VERSION_1):
        raise LoadgenError(f"the backend does not offer VIRTIO_F_VERSION_1 (features {offered:#x})")
    protocol = 0
    max_queues = None
    if offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
        wanted = sum(1 << f for f in (ProtocolFeature.MQ, ProtocolFeature.CONFIG, ProtocolFeature.REPLY_ACK))
        protocol = frontend.get_protocol_features() & wanted
        frontend.set_protocol_features(protocol)
        if protocol & (1 << ProtocolFeature.MQ):
            max_queues = frontend.get_queue_num()
    frontend.set_owner()
    if not protocol & (1 << ProtocolFeature.CONFIG):
        raise LoadgenError("the backend offers no GET_CONFIG (protocol feature CONFIG): capacity unknown")
    try:
        config = frontend.get_config(CONFIG_SIZE)
    except FrontendError:
        config = frontend.get_config(8)
    (sectors,) = struct.unpack_from("<Q", config, 0)
    capacity = int(sectors) * SECTOR_SIZE
    if offered & (1 << BlkFeature.RO):
        log.warning("the backend offers a read-only disk; writes will fail")
    has_num_queues = len(config) >= CONFIG_NUM_QUEUES_OFFSET + 2
    if has_num_queues and max_queues is None and offered & (1 << BlkFeature.MQ):
        (max_queues,) = struct.unpack_from("<H", config, CONFIG_NUM_QUEUES_OFFSET)
    if queues > 1:
        if not offered & (1 << BlkFeature.MQ):
            raise LoadgenError(f"{queues} queues asked, but the backend does not offer VIRTIO_BLK_F_MQ")
        if max_queues is not None and queues > max_queues:
            raise LoadgenError(f"{queues} queues asked, the backend has {max_queues}")
    size_max = None
    if offered & (1 << BlkFeature.SIZE_MAX) and len(config) >= CONFIG_SIZE_MAX_OFFSET + 4:
        (size_max,) = struct.unpack_from("<I", config, CONFIG_SIZE_MAX_OFFSET)
    features = 1 << VIRTIO_F_VERSION_1
    use_event_idx = event_idx and bool(offered & (1 << VIRTIO_RING_F_EVENT_IDX))
    if use_event_idx:
        features |= 1 << VIRTIO_RING_F_EVENT_IDX
    if queues > 1:
        features |= 1 << BlkFeature.MQ
    if size_max:
        features |= 1 << BlkFeature.SIZE_MAX
    if offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
        features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
    frontend.set_features(features)
    return _Negotiated(features, protocol, capacity, use_event_idx, int(size_max or 0))


def _cpu_ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


def run_loadgen(
    socket_path: Path | str,
    rw: str = "randread",
    bs: int = 4096,
    iodepth: int = 32,
    queues: int = 1,
    runtime_s: float = 10.0,
    verify: bool = False,
    backend_pid: int | None = None,
    seed: int | None = None,
    *,
    size: int | None = None,
    rwmix_read: int = 50,
    event_idx: bool = True,
    verify_state: VerifyState | None = None,
    check_all: bool | None = None,
    stall_timeout_ms: int = STALL_TIMEOUT_MS,
) -> LoadgenResult:
    """Connect to a vhost-user-blk socket, run the workload, disconnect.

    `size` limits the workload to the first `size` bytes of the disk. With `verify`, every
    write carries a pattern of (seed, block, generation) and every read of a known block is
    checked; reading workloads first write every block not yet known (prefill), writing ones
    read everything back at the end (also reading ones with `check_all`). `verify_state` (from
    an earlier result) carries the pattern seed and generations over: the run checks what the
    earlier one wrote. Raises LoadgenError on a failed handshake, a stall (no completion for
    `stall_timeout_ms` with requests in flight) or a protocol violation by the backend.
    """
    if rw not in RW_MODES:
        raise ValueError(f"rw must be one of {', '.join(RW_MODES)}")
    if bs <= 0 or bs % SECTOR_SIZE:
        raise ValueError(f"block size {bs} is not a positive multiple of {SECTOR_SIZE}")
    if not 1 <= iodepth <= MAX_IODEPTH:
        raise ValueError(f"iodepth must be 1..{MAX_IODEPTH}")
    if not 1 <= queues <= MAX_QUEUES:
        raise ValueError(f"queues must be 1..{MAX_QUEUES}")
    if runtime_s <= 0:
        raise ValueError("runtime must be positive")
    if not 0 <= rwmix_read <= 100:
        raise ValueError("rwmix_read is a percentage")
    if verify_state is not None:
        verify = True
        if verify_state.bs != bs:
            raise ValueError(f"the verify state is for bs={verify_state.bs}, not {bs}")
        seed = verify_state.seed
    if seed is None:
        seed = secrets.randbits(63)
    if check_all is None:
        check_all = rw in WRITING_MODES

    num = ring_size_for(iodepth)
    if num > MAX_RING_SIZE:
        raise ValueError(f"iodepth {iodepth} needs a ring of {num} > {MAX_RING_SIZE} entries")

    with VhostUserFrontend(socket_path) as frontend:
        try:
            negotiated = _handshake(frontend, queues, event_idx)
        except FrontendError as exc:
            raise LoadgenError(f"handshake failed: {exc}") from exc
        if negotiated.size_max and bs > negotiated.size_max:
            raise LoadgenError(f"bs {bs} is larger than the backend's size_max {negotiated.size_max}")
        capacity = negotiated.capacity if size is None else min(size, negotiated.capacity)
        nblocks = capacity // bs
        if nblocks == 0:
            raise LoadgenError(f"the disk ({negotiated.capacity} bytes) is smaller than one block")
        if verify:
            if nblocks <= iodepth * queues:
                raise LoadgenError(f"verify needs more than iodepth*queues = {iodepth * queues} blocks")
            if verify_state is None:
                verify_state = VerifyState(bs, seed, np.zeros(nblocks, dtype=np.uint32))
            elif len(verify_state.generations) != nblocks:
                raise ValueError(
                    f"the verify state has {len(verify_state.generations)} blocks, the disk {nblocks}"
                )

        layouts, memory_size = _layout(queues, num, iodepth, bs)
        fd = os.memfd_create("vhost-pv-loadgen", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, memory_size)
            # MAP_SHARED (mmap's default): the backend maps the same pages.
            memory = mmap.mmap(fd, memory_size, flags=mmap.MAP_SHARED)
            host = ffi.from_buffer(memory)
            try:
                return _run(
                    frontend, negotiated, fd, memory_size, host, layouts, num,
                    rw=rw, bs=bs, iodepth=iodepth, queues=queues, runtime_s=runtime_s,
                    verify=verify, verify_state=verify_state, check_all=check_all,
                    seed=seed, capacity=nblocks * bs, rwmix_read=rwmix_read,
                    backend_pid=backend_pid, stall_timeout_ms=stall_timeout_ms,
                )
            finally:
                ffi.release(host)
                memory.close()
        finally:
            os.close(fd)


def _run(
    frontend: VhostUserFrontend,
    negotiated: _Negotiated,
    fd: int,
    memory_size: int,
    host: Any,
    layouts: list[_QueueLayout],
    num: int,
    *,
    rw: str,
    bs: int,
    iodepth: int,
    queues: int,
    runtime_s: float,
    verify: bool,
    verify_state: VerifyState | None,
    check_all: bool,
    seed: int,
    capacity: int,
    rwmix_read: int,
    backend_pid: int | None,
    stall_timeout_ms: int,
) -> LoadgenResult:
    host_addr = int(ffi.cast("uintptr_t", host))

    def uaddr(gpa: int) -> int:
        return host_addr + (gpa - GPA_BASE)

    frontend.set_mem_table([MemoryRegionSpec(GPA_BASE, memory_size, host_addr, 0, fd)])
    enable = bool(negotiated.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES))
    qcfg = ffi.new("struct vpv_lg_queue[]", queues)
    for index, layout in enumerate(layouts):
        fds = frontend.setup_vring(
            index, num, uaddr(layout.desc), uaddr(layout.avail), uaddr(layout.used), enable=enable
        )
        q = qcfg[index]
        q.desc_gpa, q.avail_gpa, q.used_gpa = layout.desc, layout.avail, layout.used
        q.area_gpa, q.area_size, q.num = layout.area, layout.area_size, num
        q.kick_fd, q.call_fd = fds.kick, fds.call

    cfg = ffi.new("struct vpv_lg_config *")
    cfg.mem_host, cfg.mem_gpa, cfg.mem_size = host_addr, GPA_BASE, memory_size
    cfg.capacity = capacity
    cfg.runtime_ns = int(runtime_s * 1e9)
    cfg.seed = seed
    cfg.rw = RW_MODES[rw]
    cfg.bs, cfg.iodepth, cfg.rwmix_read = bs, iodepth, rwmix_read
    cfg.timeout_ms = stall_timeout_ms
    cfg.backend_pid = backend_pid or 0
    flags = lib.VPV_LG_F_EVENT_IDX if negotiated.event_idx else 0
    generations = None
    if verify:
        assert verify_state is not None
        flags |= lib.VPV_LG_F_VERIFY
        if rw in READING_MODES:
            flags |= lib.VPV_LG_F_PREFILL
        if check_all:
            flags |= lib.VPV_LG_F_CHECK
        generations = ffi.from_buffer("uint32_t[]", verify_state.generations, require_writable=True)
        cfg.generations = generations
    cfg.flags = flags
    results = ffi.new("struct vpv_lg_result[]", queues)

    # The one blocking call, in a thread of ours so Ctrl-C can ask it to stop (cfg.stop). We
    # must not return (and unmap the memory its threads use) before it has: wait on an Event,
    # not on Thread.join, which an interrupt can leave claiming a live thread is gone.
    outcome: list[int] = []
    done = threading.Event()

    def work() -> None:
        try:
            outcome.append(int(lib.vpv_lg_run(cfg, qcfg, results, queues)))
        finally:
            done.set()

    interrupted = False
    threading.Thread(target=work, name="loadgen").start()
    while not done.is_set():
        try:
            done.wait(0.2)
        except KeyboardInterrupt:
            interrupted = True
            cfg.stop = 1  # the queues stop submitting, collect what is in flight and return
    if generations is not None:
        ffi.release(generations)
    rc = outcome[0] if outcome else -errno.EIO

    if rc not in (0, -errno.EINTR):
        # Requests may still be in flight (a stalled backend): no GET_VRING_BASE, which could
        # wait for them; closing the connection makes the backend drop the queues.
        statuses = [int(results[i].status) for i in range(queues)]
        what = {
            errno.ETIMEDOUT: f"no completion for {stall_timeout_ms} ms with requests in flight",
            errno.EPROTO: "the backend returned a used entry for no request in flight",
            errno.EINVAL: "invalid configuration",
        }.get(-rc, os.strerror(-rc))
        raise LoadgenError(f"loadgen failed: {what} (queue statuses {statuses})")

    # Teardown: GET_VRING_BASE stops each queue and says how far the backend got, which must
    # be every request we made.
    for index in range(queues):
        r = results[index]
        submitted = int(r.ios + r.prefill_ios + r.check_ios)
        try:
            base = frontend.get_vring_base(index)
        except (FrontendError, OSError) as exc:
            raise LoadgenError(f"teardown: GET_VRING_BASE {index} failed: {exc}") from exc
        if base != submitted & 0xFFFF:
            raise LoadgenError(f"queue {index}: GET_VRING_BASE says {base}, but {submitted} requests "
                               f"were made (mod 65536: {submitted & 0xFFFF})")
    return _result(
        results, cfg, queues, rw=rw, bs=bs, iodepth=iodepth, runtime_s=runtime_s, verify=verify,
        verify_state=verify_state, event_idx=negotiated.event_idx, capacity=capacity, seed=seed,
        interrupted=interrupted or rc == -errno.EINTR,
    )


def _percentile(hist: npt.NDArray[np.uint64], cumulative: npt.NDArray[np.uint64], q: float) -> float:
    total = int(cumulative[-1])
    if total == 0:
        return 0.0
    rank = max(1, int(np.ceil(q * total)))
    bucket = int(np.searchsorted(cumulative, rank))
    return float(_HIST_VALUES_NS[bucket]) / 1000.0


def _result(
    results: Any,
    cfg: Any,
    queues: int,
    *,
    rw: str,
    bs: int,
    iodepth: int,
    runtime_s: float,
    verify: bool,
    verify_state: VerifyState | None,
    event_idx: bool,
    capacity: int,
    seed: int,
    interrupted: bool,
) -> LoadgenResult:
    per_queue = [results[i] for i in range(queues)]

    def total(name: str) -> int:
        return sum(int(getattr(r, name)) for r in per_queue)

    hist = np.zeros(int(lib.VPV_LG_HIST_BUCKETS), dtype=np.uint64)
    for r in per_queue:
        hist += np.frombuffer(ffi.buffer(r.hist), dtype=np.uint64)
    cumulative = np.cumsum(hist)
    ios = total("ios")
    elapsed = max(int(r.elapsed_ns) for r in per_queue) / 1e9
    bad: list[int] = []
    for r in per_queue:
        bad.extend(int(r.bad_sectors[i]) for i in range(int(r.nbad)))
    backend_cpu = None
    if cfg.backend_cpu_ok and ios:
        backend_cpu = int(cfg.backend_cpu_ticks) / _cpu_ticks_per_second() * 1e6 / ios
    return LoadgenResult(
        rw=rw,
        bs=bs,
        iodepth=iodepth,
        queues=queues,
        runtime_s=runtime_s,
        elapsed_s=elapsed,
        ios=ios,
        reads=total("reads"),
        writes=total("writes"),
        bytes=total("bytes"),
        iops=ios / elapsed if elapsed else 0.0,
        mib_s=total("bytes") / elapsed / (1 << 20) if elapsed else 0.0,
        lat_mean_us=total("lat_sum_ns") / ios / 1000 if ios else 0.0,
        lat_p50_us=_percentile(hist, cumulative, 0.50),
        lat_p99_us=_percentile(hist, cumulative, 0.99),
        lat_p999_us=_percentile(hist, cumulative, 0.999),
        lat_max_us=max(int(r.lat_max_ns) for r in per_queue) / 1000,
        errors=total("errors"),
        verify=verify,
        verified_reads=total("verified"),
        verify_mismatches=total("mismatches"),
        bad_sectors=sorted(bad),
        prefill_ios=total("prefill_ios"),
        check_ios=total("check_ios"),
        event_idx=event_idx,
        kicks=total("kicks"),
        waits=total("waits"),
        client_cpu_us_per_io=total("cpu_ns") / 1000 / ios if ios else 0.0,
        backend_cpu_us_per_io=backend_cpu,
        capacity=capacity,
        seed=seed,
        interrupted=interrupted,
        verify_state=verify_state,
    )


def pattern(seed: int, block: int, generation: int, bs: int) -> bytes:
    """The bytes a verify run writes to `block` at `generation` (for tests and debugging)."""
    buf = ffi.new("uint8_t[]", bs)
    lib.vpv_lg_pattern(seed, block, generation, buf, bs)
    return bytes(ffi.buffer(buf))


