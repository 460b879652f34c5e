"""The daemon's side of the service manager's protocol: READY once the control socket
answers, STATUS (volumes served, attached, dangling) whenever it changes, RELOADING around a
SIGHUP reload, STOPPING on the way out, and WATCHDOG=1 pings from the event loop.

A ping means more than "the event loop turns": it is withheld while a queue worker is stuck
outside its storage work for longer than `stuck_after` seconds (a worker that stopped
turning: a deadlock, a lock never released, a loop that does not end). A missed ping makes
systemd restart the daemon (WatchdogSec=, Restart=on-failure); the log line names the
volume and the queue first.

A worker waiting that long on the volume's storage (inside a request's syscalls on the
volume, or on its io_uring with nothing completing: a stalled disk, a FUSE or NFS server
that stopped answering) is a different failure: a restart cannot unstick a disk, would
interrupt every other volume's guests, and a thread in uninterruptible I/O would not even
let the process exit. So it is reported (log, a "storage-stalled" alert, STATUS) and the
pings go on. The C workers keep a heartbeat, the start of their current request and of its
storage part (vpv_blk_queue_health); reading them costs a few loads per queue.

The protocol itself (datagrams to NOTIFY_SOCKET, WATCHDOG_USEC) is vhost_pv/systemd.py.
Outside systemd nothing is sent and the liveness check still logs stuck workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterator

from vhost_pv import systemd
from vhost_pv.service.volumes import VolumeService

log = logging.getLogger("vhost_pv.daemon")

STATUS_EVERY_S = 1.0
"""How often the STATUS line is recomputed (sent only when it changed)."""
STUCK_AFTER_S = 30.0
"""A worker inside one request for longer than this is stuck (DaemonConfig.worker_stuck_after)."""


@dataclasses.dataclass(frozen=True)
class StuckWorker:
    volume: str
    queue: int
    seconds: float
    what: str
    """"in one request", "waiting on the volume's storage", "waiting on its io_uring"."""
    storage: bool = False
    """Stuck on the volume's storage (reported, pings go on), not in the worker itself."""

    def describe(self) -> str:
        return f"{self.volume} queue {self.queue}: worker {self.what} for {self.seconds:.0f}s"


class Supervision:
    """Tells the service manager (if any) how the daemon is, and checks the queue workers."""

    def __init__(self, volumes: VolumeService, *, stuck_after: float = STUCK_AFTER_S) -> None:
        self.volumes = volumes
        self.stuck_after = stuck_after
        self._status = ""
        self._stuck: set[tuple[str, int]] = set()
        self._stalled: set[tuple[str, int]] = set()
        self.pings = 0
        self.withheld = 0

    def _send(self, fields: dict[str, str]) -> None:
        try:
            systemd.notify(fields)
        except OSError as exc:  # the manager went away or refuses: the daemon carries on
            log.debug("service manager notification %s failed: %s", sorted(fields), exc)

    # -- states -----------------------------------------------------------------------------

    def ready(self) -> None:
        """Everything is up and the control socket answers."""
        self._status = self.summary()
        self._send({"READY": "1", "STATUS": self._status})

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 tell this reload from an earlier one.
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send({"RELOADING": "1", "MONOTONIC_USEC": str(now_usec), "STATUS": "reloading"})

    def reloaded(self) -> None:
        self._status = self.summary()
        self._send({"READY": "1", "STATUS": self._status})

    def stopping(self) -> None:
        self._send({"STOPPING": "1", "STATUS": "stopping"})

    def summary(self) -> str:
        """One line: what `systemctl status` shows under the unit."""
        served = list(self.volumes.served.values())
        attached = sum(1 for s in served if s.connection is not None)
        dangling = sum(1 for s in served if s.volume.header.dangling)
        parts = [f"{len(served)} volume{'' if len(served) == 1 else 's'} served",
                 f"{attached} attached", f"{dangling} dangling"]
        if self.volumes.failed:
            parts.append(f"{len(self.volumes.failed)} failed to open")
        if self._stuck:
            parts.append(f"{len(self._stuck)} worker{'' if len(self._stuck) == 1 else 's'} stuck")
        if self._stalled:
            count = len(self._stalled)
            parts.append(f"{count} queue{'' if count == 1 else 's'} waiting on stalled storage")
        return ", ".join(parts)

    # -- liveness ---------------------------------------------------------------------------

    def _workers(self) -> Iterator[tuple[str, int, dict[str, int]]]:
        for name, served in list(self.volumes.served.items()):
            connection = served.connection
            if connection is None:
                continue
            for index, health in enumerate(connection.device.health()):
                if health["has_worker"]:
                    yield name, index, health

    def stuck_workers(self) -> list[StuckWorker]:
        """Workers inside one request, or waiting on the volume's storage, for over stuck_after s."""
        limit = int(self.stuck_after * 1e9)
        stuck = []
        for name, index, health in self._workers():
            if health["storage_wait_ns"] > limit:
                stuck.append(StuckWorker(name, index, health["storage_wait_ns"] / 1e9,
                                         "waiting on the volume's storage", storage=True))
            elif health["uring_wait_ns"] > limit:
                stuck.append(StuckWorker(name, index, health["uring_wait_ns"] / 1e9,
                                         "waiting on its io_uring with no completion", storage=True))
            elif health["busy_ns"] > limit:
                stuck.append(StuckWorker(name, index, health["busy_ns"] / 1e9, "in one request"))
        return stuck

    def check(self) -> bool:
        """Whether every worker is alive (stalled storage does not count against it); logs
        and alerts the ones that turned stuck or stalled, and those that came back."""
        found = self.stuck_workers()
        stuck = {(w.volume, w.queue) for w in found if not w.storage}
        stalled = {(w.volume, w.queue) for w in found if w.storage}
        for worker in found:
            key = (worker.volume, worker.queue)
            extra = {"volume": worker.volume, "queue": worker.queue}
            if not worker.storage and key not in self._stuck:
                log.error("%s; withholding the service watchdog's ping", worker.describe(), extra=extra)
            elif worker.storage and key not in self._stalled:
                log.error("%s (a stalled disk?); the daemon keeps serving the other volumes "
                          "(a restart cannot unstick storage)", worker.describe(), extra=extra)
                self.volumes.alert(
                    "storage-stalled", worker.volume,
                    f"{worker.volume}: queue {worker.queue} has waited {worker.seconds:.0f}s on the "
                    "volume's storage; its guest's I/O is stuck until the storage answers",
                    queue=worker.queue, seconds=round(worker.seconds))
        for volume, queue in sorted((self._stuck - stuck) | (self._stalled - stalled)):
            log.info("%s queue %d: worker moving again", volume, queue,
                     extra={"volume": volume, "queue": queue})
        self._stuck, self._stalled = stuck, stalled
        return not stuck

    async def run(self) -> None:
        """Until cancelled: STATUS on change, WATCHDOG=1 every watchdog interval while the
        workers are alive. Runs on the event loop, so a blocked loop stops the pings too."""
        interval = systemd.watchdog_interval()
        next_ping = time.monotonic()
        while True:
            healthy = self.check()
            status = self.summary()
            if status != self._status:
                self._status = status
                self._send({"STATUS": status})
            now = time.monotonic()
            if interval is not None and now >= next_ping:
                if healthy:
                    self._send({"WATCHDOG": "1"})
                    self.pings += 1
                else:
                    self.withheld += 1
                next_ping = now + interval
            wait = STATUS_EVERY_S if interval is None else min(STATUS_EVERY_S, max(next_ping - now, 0.01))
            await asyncio.sleep(wait)
