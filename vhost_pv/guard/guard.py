"""One guard thread per volume, sleeping on a condition variable until the volume dangles.

The flip itself (header durable, data path quiesced) is done by whoever calls
VolumeService.set_dangling; the guard is then woken and does the slow follow-up work off the event
loop: seal the data region, alert, keep the time limit, and turn every I/O attempt the C
data path reports on the dangling volume into a (rate-limited, counted) alert.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vhost_pv._native import lib
from vhost_pv.guard.alerts import AlertHub
from vhost_pv.humanize import duration, suggested_commands
from vhost_pv.virtio.blk import RequestType
from vhost_pv.volume.header import TtlAction
from vhost_pv.volume.seal import Seal, SealError, compute_seal, read_seal, write_seal
from vhost_pv.volume.volume import Volume

log = logging.getLogger("vhost_pv.guard")

REQUEST_NAMES: dict[int, str] = {
    RequestType.IN: "read", RequestType.OUT: "write", RequestType.FLUSH: "flush",
    RequestType.GET_ID: "get-id", RequestType.DISCARD: "discard", RequestType.WRITE_ZEROES: "write-zeroes",
}
OUTCOME_NAMES = {
    lib.VPV_EVENT_QUARANTINED: "quarantined",
    lib.VPV_EVENT_READ_DENIED: "read-denied",
    lib.VPV_EVENT_READ_ZEROS: "read-zeros",
    lib.VPV_EVENT_READ_ALLOWED: "read-allowed",
    lib.VPV_EVENT_RING_FULL: "ring-full",
    lib.VPV_EVENT_RING_ERROR: "ring-error",
}
# Alert rate limit for dangling I/O: a burst of ALERT_BURST, then ALERT_RATE per second.
ALERT_BURST = 20
ALERT_RATE = 5.0
SEAL_PROGRESS_MIN_BYTES = 1 << 30


class VolumeGuard:
    def __init__(
        self,
        volume: Volume,
        hub: AlertHub,
        *,
        describe_source: Callable[[int], dict[str, Any]],
        delete_volume: Callable[[str], None],
        control_path: Path | None = None,
    ) -> None:
        self.volume = volume
        # Where the daemon's control socket is, so the alerts can give the exact commands;
        # absolute, since whoever reads an alert is not in the daemon's working directory.
        self.control_path = control_path.absolute() if control_path is not None else None
        self.name = volume.name
        self.hub = hub
        self.describe_source = describe_source
        self.delete_volume = delete_volume
        self.cond = threading.Condition()
        self.is_dangling = volume.header.dangling
        self._flip_pending = self.is_dangling  # a volume dangling at start-up needs its guard
        self._events_pending = False
        self._rearm_pending = False
        self._stopping = False
        self._deadline_ns: int | None = None
        self._ttl_done = False
        self.seal: Seal | None = None
        self.seal_progress = 0.0
        self.events_total = 0
        self.events_lost = 0
        self.alerts_suppressed = 0
        self.io_counts: collections.Counter[str] = collections.Counter()
        self._tokens = float(ALERT_BURST)
        self._tokens_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"guard-{self.name}", daemon=True)

    # -- called from other threads ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def flipped(self, dangling: bool) -> None:
        """The volume's state changed (already durable and published)."""
        with self.cond:
            self.is_dangling = dangling
            self._flip_pending = True
            if dangling:
                self.seal = None
                self.seal_progress = 0.0
            self.cond.notify()

    def ttl_changed(self) -> None:
        """The time limit or its action changed (already durable in the header): the deadline
        is computed again from the header, and expiry counts as not yet handled, so a limit
        that has already passed acts now (with the action in force now) and a longer one
        waits again."""
        with self.cond:
            self._rearm_pending = True
            self.cond.notify()

    def events_ready(self) -> None:
        with self.cond:
            self._events_pending = True
            self.cond.notify()

    def wait_sealed(self, timeout: float) -> Seal | None:
        with self.cond:
            self.cond.wait_for(lambda: self.seal is not None or not self.is_dangling or self._stopping,
                               timeout)
            return self.seal

    def suggested(self) -> list[str]:
        """The commands that settle this volume (reclaim or delete), for alerts and status."""
        control = self.control_path if self.control_path is not None else "CONTROL_SOCKET"
        return suggested_commands(control, self.name)

    def _advice(self) -> str:
        reclaim, delete = self.suggested()
        return f"reclaim it with `{reclaim}` or delete it with `{delete}`"

    def describe(self) -> dict[str, Any]:
        with self.cond:
            deadline = self._deadline_ns
            return {
                "suggested": self.suggested() if self.is_dangling else [],
                "is_dangling": self.is_dangling,
                "sealed": self.seal is not None,
                "seal_root": self.seal.root if self.seal else None,
                "seal_progress": round(self.seal_progress, 3),
                "ttl_deadline_ns": deadline,
                "ttl_expired": self._ttl_done,
                "dangling_io_events": self.events_total,
                "dangling_io_by_kind": dict(self.io_counts),
                "alerts_suppressed": self.alerts_suppressed,
                "events_lost": self.events_lost,
            }

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(self._has_work, timeout=self._wait_timeout())
                if self._stopping:
                    return
                flip, self._flip_pending = self._flip_pending, False
                events, self._events_pending = self._events_pending, False
                rearm, self._rearm_pending = self._rearm_pending, False
                dangling = self.is_dangling
            try:
                if flip:
                    self._on_flip(dangling)
                if rearm:
                    self._rearm()
                if events:
                    self._drain_events()
                self._check_deadline()
            except Exception:  # a guard must outlive any single failure; the log has it
                log.exception("%s: guard step failed", self.name)

    def _has_work(self) -> bool:
        return (self._stopping or self._flip_pending or self._events_pending or self._rearm_pending
                or self._deadline_due())

    def _deadline_due(self) -> bool:
        return self._deadline_ns is not None and not self._ttl_done and time.time_ns() >= self._deadline_ns

    def _wait_timeout(self) -> float | None:
        if self._deadline_ns is None or self._ttl_done:
            return None
        return max(0.0, (self._deadline_ns - time.time_ns()) / 1e9)

    def _on_flip(self, dangling: bool) -> None:
        header = self.volume.header
        if not dangling:
            with self.cond:
                self._deadline_ns = None
                self._ttl_done = False
            return
        seal = self._seal(header.dangling_since_ns)
        deadline = None
        if header.ttl_seconds:
            deadline = header.dangling_since_ns + header.ttl_seconds * 1_000_000_000
        with self.cond:
            self.seal = seal
            self._deadline_ns = deadline
            self._ttl_done = False
            self.cond.notify_all()
        if not header.ttl_seconds:
            limit = "no time limit"
        elif header.ttl_action == TtlAction.DELETE:
            limit = f"it is deleted in {duration(header.ttl_seconds)} unless reclaimed"
        else:
            limit = f"an alert follows in {duration(header.ttl_seconds)}"
        self.hub.raise_alert(
            "volume-dangling", self.name,
            f"volume {self.name} is dangling ({header.reason or 'no reason given'}): "
            f"its data is sealed and new writes go to the quarantine ring ({limit}); "
            + self._advice(),
            severity="critical",
            suggested=self.suggested(),
            reason=header.reason,
            source=header.dangling_source,
            owner=header.owner,
            dangling_since_ns=header.dangling_since_ns,
            ttl_seconds=header.ttl_seconds,
            ttl_action=header.ttl_action.name.lower(),
            seal_root=seal.root,
            seal_chunks=len(seal.digests),
        )

    def _rearm(self) -> None:
        """The deadline from the header's time limit now (after a settings change). Runs
        after any pending flip in the same step, so it never arms a volume whose flip (and
        seal) the guard has not handled yet."""
        header = self.volume.header
        with self.cond:
            if not self.is_dangling or not header.dangling:
                return
            deadline = (header.dangling_since_ns + header.ttl_seconds * 1_000_000_000
                        if header.ttl_seconds else None)
            self._deadline_ns = deadline
            self._ttl_done = False
        if deadline is None:
            log.info("%s: time limit removed", self.name)
        else:
            left = (deadline - time.time_ns()) / 1e9
            log.info("%s: time limit now %s, action %s: %s", self.name, duration(header.ttl_seconds),
                     header.ttl_action.name.lower(),
                     f"expires in {duration(left)}" if left > 0 else "already passed, acting now")

    def _seal(self, dangling_since_ns: int) -> Seal:
        fd, header = self.volume.fd, self.volume.header
        try:
            stored = read_seal(fd, header)
        except SealError as exc:
            log.warning("%s: stored seal unusable (%s); sealing again", self.name, exc)
            stored = None
        if stored is not None and stored.dangling_since_ns == dangling_since_ns:
            self.seal_progress = 1.0
            return stored  # the same dangling period, e.g. after a daemon restart
        started = time.monotonic()
        last_logged = [-1]

        def progress(done: int, total: int) -> None:
            self.seal_progress = done / total
            tenth = int(10 * done / total)
            if total >= SEAL_PROGRESS_MIN_BYTES and tenth != last_logged[0]:
                last_logged[0] = tenth
                log.info("%s: sealing data region %d%% (%d MiB)", self.name, 10 * tenth, total >> 20)

        seal = compute_seal(fd, header, progress)
        write_seal(fd, seal)
        log.info("%s: sealed %d chunks of %d KiB in %.2f s (root %s)", self.name, len(seal.digests),
                 seal.chunk_size >> 10, time.monotonic() - started, seal.root[:16])
        return seal

    def _drain_events(self) -> None:
        while True:
            events, lost = self.volume.drain_events()
            if lost:
                with self.cond:
                    self.events_lost += lost
                    self.alerts_suppressed += lost
            if not events:
                return
            for event in events:
                self._on_event(event)

    def _on_event(self, event: dict[str, int]) -> None:
        request = REQUEST_NAMES.get(event["request_type"], f"type-{event['request_type']}")
        outcome = OUTCOME_NAMES.get(event["outcome"], str(event["outcome"]))
        with self.cond:
            self.events_total += 1
            self.io_counts[f"{request}:{outcome}"] += 1
            now = time.monotonic()
            self._tokens = min(ALERT_BURST, self._tokens + (now - self._tokens_at) * ALERT_RATE)
            self._tokens_at = now
            if self._tokens < 1:
                self.alerts_suppressed += 1
                return
            self._tokens -= 1
            suppressed, self.alerts_suppressed = self.alerts_suppressed, 0
        frontend = self.describe_source(event["source"])
        self.hub.raise_alert(
            "dangling-io", self.name,
            f"{request} at sector {event['sector']} on dangling volume {self.name}: {outcome}; "
            + self._advice(),
            suggested=self.suggested(),
            request=request,
            outcome=outcome,
            sector=event["sector"],
            length=event["length"],
            ring_seq=event["seq"],
            queue=event["queue"],
            frontend=frontend,
            suppressed_before=suppressed,
        )

    def _check_deadline(self) -> None:
        with self.cond:
            if not self._deadline_due() or not self.is_dangling:
                return
            self._ttl_done = True
        header = self.volume.header
        if header.ttl_action == TtlAction.DELETE:
            self.hub.raise_alert(
                "ttl-expired", self.name,
                f"time limit of {duration(header.ttl_seconds)} passed for dangling volume {self.name}: "
                "deleting it",
                severity="critical", ttl_seconds=header.ttl_seconds, action="delete", suggested=[],
            )
            self.delete_volume(self.name)
        else:
            self.hub.raise_alert(
                "ttl-expired", self.name,
                f"time limit of {duration(header.ttl_seconds)} passed for dangling volume {self.name}: "
                + self._advice(),
                severity="critical", ttl_seconds=header.ttl_seconds, action="alert",
                suggested=self.suggested(),
            )
