"""Alerts: what the guards tell the administrator, delivered three ways.

1. The log, one structured (JSON) line per alert, at WARNING.
2. Live subscribers (`vhost-pv alerts --follow` through the control socket): each gets every
   alert raised after it subscribed, plus the recent history it asks for.
3. An optional webhook in Alertmanager's JSON format (POST /api/v2/alerts), sent from a
   worker thread so a slow receiver never stalls a guard.

raise_alert may be called from any thread (guards are threads); delivery to subscribers
happens on the daemon's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

log = logging.getLogger("vhost_pv.alerts")

HISTORY = 1000
SUBSCRIBER_BACKLOG = 10000


@dataclasses.dataclass(frozen=True)
class Alert:
    seq: int
    time_ns: int
    kind: str  # volume-dangling, dangling-io, ttl-expired, volume-deleted, tamper-detected, ...
    severity: str  # info, warning, critical
    volume: str
    message: str
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def alertmanager(self) -> dict[str, Any]:
        """One element of Alertmanager's POST /api/v2/alerts body."""
        starts = datetime.datetime.fromtimestamp(self.time_ns / 1e9, tz=datetime.UTC)
        return {
            "labels": {
                "alertname": "VhostPv" + "".join(p.capitalize() for p in self.kind.split("-")),
                "severity": self.severity,
                "volume": self.volume,
                "service": "vhost-pv",
            },
            "annotations": {
                "summary": self.message,
                "description": json.dumps(self.details, sort_keys=True),
            },
            "startsAt": starts.isoformat().replace("+00:00", "Z"),
        }


class AlertHub:
    def __init__(self, webhook_url: str | None = None) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._history: collections.deque[Alert] = collections.deque(maxlen=HISTORY)
        self._subscribers: set[asyncio.Queue[Alert]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self.webhook_url = webhook_url
        self.webhook_failures = 0
        self._webhook_queue: queue.Queue[Alert | None] = queue.Queue(maxsize=10000)
        self._webhook_thread: threading.Thread | None = None
        if webhook_url:
            self._webhook_thread = threading.Thread(target=self._post_loop, name="alert-webhook", daemon=True)
            self._webhook_thread.start()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def raise_alert(
        self, kind: str, volume: str, message: str, *, severity: str = "warning", **details: Any
    ) -> Alert:
        with self._lock:
            self._seq += 1
            alert = Alert(self._seq, time.time_ns(), kind, severity, volume, message, details)
            self._history.append(alert)
            self.counts[kind] += 1
        log.warning("ALERT %s", json.dumps(alert.to_dict(), sort_keys=True),
                    extra={"volume": volume, "source": details.get("source"),
                           "reason": details.get("reason")})
        if self._loop is not None and not self._loop.is_closed():
            # RuntimeError: the loop is shutting down; the log line above is the record.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._fan_out, alert)
        if self._webhook_thread is not None:
            try:
                self._webhook_queue.put_nowait(alert)
            except queue.Full:
                self.webhook_failures += 1
        return alert

    def _fan_out(self, alert: Alert) -> None:
        for subscriber in list(self._subscribers):
            # A subscriber that does not read loses alerts rather than stalling others.
            with contextlib.suppress(asyncio.QueueFull):
                subscriber.put_nowait(alert)

    def history(self, since_seq: int = 0) -> list[Alert]:
        with self._lock:
            return [a for a in self._history if a.seq > since_seq]

    def subscribe(self) -> asyncio.Queue[Alert]:
        q: asyncio.Queue[Alert] = asyncio.Queue(maxsize=SUBSCRIBER_BACKLOG)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Alert]) -> None:
        self._subscribers.discard(q)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        if self._webhook_thread is not None:
            self._webhook_queue.put(None)
            self._webhook_thread.join(timeout=5)
            self._webhook_thread = None

    def _post_loop(self) -> None:
        assert self.webhook_url is not None
        while True:
            alert = self._webhook_queue.get()
            if alert is None:
                return
            body = json.dumps([alert.alertmanager()]).encode()
            request = urllib.request.Request(
                self.webhook_url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
            except (urllib.error.URLError, OSError) as exc:
                self.webhook_failures += 1
                log.error("alert webhook %s failed: %s", _redacted(self.webhook_url), exc)


def _redacted(url: str) -> str:
    """The URL without credentials: secrets never go to the log."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, "", ""))
