"""The daemon's Prometheus metrics, read from its state at scrape time.

Python never runs per request: the C data path keeps per-queue counters and latency
histograms (struct vpv_queue_stats), and everything else is state the daemon holds anyway.
So nothing here is updated as things happen; a scrape takes a snapshot (`snapshot`, on the
event loop: the state is the loop's) and `DaemonCollector` turns that plain dict into metric
families. The snapshot is App.status() with each volume's per-queue totals added, so the
collector can be tested on a dict.

Counters count from the daemon's start: a volume's totals add the connections that ended
(ServedVolume.finished_queues) to the one attached, so a reconnect never sends them back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from vhost_pv import __version__

if TYPE_CHECKING:
    from vhost_pv.app import App

PREFIX = "vhost_pv_"

# Per-queue request counters by operation: status key -> the `op` label.
REQUEST_OPS = {
    "reads": "read",
    "writes": "write",
    "flushes": "flush",
    "discards": "discard",
    "write_zeroes": "write_zeroes",
    "get_ids": "get_id",
    "unsupported": "unsupported",
}

# Other per-queue counters: status key -> (metric name without prefix and _total, help).
QUEUE_COUNTERS = {
    "bytes_read": ("read_bytes", "Bytes read from the volume's data region for the guest."),
    "bytes_written": ("written_bytes", "Bytes the guest wrote to the volume's data region."),
    "io_errors": ("io_errors", "Requests completed with an I/O error status (as the guest saw them)."),
    "bad_requests": ("bad_requests", "Malformed chains or requests from the frontend."),
    "quarantined": ("quarantined",
                    "Writes and discards on the dangling volume stored in its quarantine ring."),
    "quarantine_refused": ("quarantine_refused",
                           "Writes on the dangling volume refused: its ring full or failing."),
    "dangling_denied": ("dangling_denied", "Reads of the dangling volume refused by the deny read policy."),
    "kicks": ("kicks", "Kicks (doorbells) received from the driver."),
    "notifications": ("interrupts", "Interrupts sent to the driver."),
    "watchdog_notifications": ("watchdog_interrupts", "Interrupts re-sent to a driver left waiting."),
    "calls_saturated": ("interrupts_saturated", "Interrupts not sent: one was pending already."),
    "coalesced_wakes": ("coalesced_wakes", "Kicks answered after the coalescing wait."),
    "polled_wakes": ("polled_wakes", "Requests found by adaptive polling, without a kick."),
    "async_ios": ("async_ios", "Data requests served through the io_uring."),
    "direct_fallbacks": ("direct_fallbacks",
                         "Requests O_DIRECT refused for their alignment, served through the page cache."),
    "guest_faults": ("guest_faults", "Guest memory vanished under the queue."),
}


def latency_bounds() -> list[float]:
    """The upper bounds, in seconds, of the data path's latency buckets but the last (+Inf):
    bucket i counts latencies below 2^(VPV_LAT_SHIFT + i) ns (csrc/vhost_pv.h)."""
    from vhost_pv._native import lib

    return [(1 << (lib.VPV_LAT_SHIFT + i)) / 1e9 for i in range(lib.VPV_LAT_BUCKETS - 1)]


def snapshot(app: App) -> dict[str, Any]:
    """What a scrape shows, taken on the event loop: App.status(), each volume with its
    per-queue totals ("queue_totals"), and the version. A queue no frontend has used yet
    shows zeros: its series exist from the start, so rate() and alerts on them work at once."""
    from vhost_pv._native import lib
    from vhost_pv.devices.blk import LATENCY_OPS

    status = app.status()
    for entry in status["volumes"]:
        served = app.volumes.served.get(entry["name"])
        totals = served.queue_totals() if served is not None else []
        totals += [{} for _ in range(app.config.queues - len(totals))]
        for queue in totals:
            latency = queue.setdefault("latency", {})
            for op in LATENCY_OPS.values():
                latency.setdefault(op, {"buckets": [0] * lib.VPV_LAT_BUCKETS, "sum_ns": 0})
        entry["queue_totals"] = totals
    status["version"] = __version__
    return status


def _counter(name: str, documentation: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, labels=labels)


def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, labels=labels)


class DaemonCollector(Collector):
    """Metric families from one snapshot (see `snapshot`)."""

    def __init__(self, state: dict[str, Any], bounds: list[float] | None = None) -> None:
        self.state = state
        self.bounds = bounds if bounds is not None else latency_bounds()

    def collect(self) -> Iterable[Metric]:
        yield from self._daemon()
        volumes = self.state.get("volumes", [])
        yield from self._queues(volumes)
        yield from self._latency(volumes)
        yield from self._volumes(volumes)
        yield from self._watchers()

    # -- the daemon -----------------------------------------------------------------------

    def _daemon(self) -> Iterator[Metric]:
        state = self.state
        info = InfoMetricFamily(PREFIX.rstrip("_"),
                                "The daemon: its version and the VM it serves metadata to.",
                                labels=["version", "vm"])
        info.add_metric([str(state.get("version", "")), str(state.get("metadata", {}).get("vm") or "")], {})
        yield info
        yield GaugeMetricFamily(PREFIX + "start_time_seconds", "When the daemon started (Unix time).",
                                value=float(state.get("started_at", 0.0)))
        yield GaugeMetricFamily(PREFIX + "volumes_failed",
                                "Volumes named at start that could not be served.",
                                value=len(state.get("failed", [])))
        alerts = state.get("alerts", {})
        by_kind = _counter("alerts", "Alerts raised, by kind.", ["kind"])
        for kind, count in sorted(alerts.get("by_kind", {}).items()):
            by_kind.add_metric([kind], count)
        yield by_kind
        yield CounterMetricFamily(PREFIX + "alert_webhook_failures", "Alerts the webhook did not take.",
                                  value=alerts.get("webhook_failures", 0))
        yield GaugeMetricFamily(PREFIX + "alert_subscribers", "Clients following the alerts.",
                                value=alerts.get("subscribers", 0))
        metadata = state.get("metadata", {})
        yield CounterMetricFamily(PREFIX + "metadata_http_refused", "Metadata HTTP requests refused.",
                                  value=metadata.get("http_refused", 0))

    # -- per volume and queue -------------------------------------------------------------

    def _queues(self, volumes: list[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["volume", "queue"]
        requests = _counter("requests", "Requests completed or refused, by operation.", [*labels, "op"])
        counters = {key: _counter(name, doc, labels) for key, (name, doc) in QUEUE_COUNTERS.items()}
        running = _gauge("queue_running", "1 while the queue's worker serves it (attached frontend).", labels)
        broken = _gauge("queue_broken",
                        "1 if the queue stopped: its ring was corrupt or its memory vanished.", labels)
        for volume in volumes:
            name = volume["name"]
            for index, totals in enumerate(volume.get("queue_totals", [])):
                queue = str(index)
                for key, op in REQUEST_OPS.items():
                    requests.add_metric([name, queue, op], totals.get(key, 0))
                for key, family in counters.items():
                    family.add_metric([name, queue], totals.get(key, 0))
            connection = volume.get("connection")
            for index, queue_state in enumerate(connection["queues"] if connection else []):
                running.add_metric([name, str(index)], queue_state.get("running", 0))
                broken.add_metric([name, str(index)], queue_state.get("broken", 0))
        yield requests
        yield from counters.values()
        yield running
        yield broken

    def _latency(self, volumes: list[dict[str, Any]]) -> Iterator[Metric]:
        """Per volume and operation: the queues' histograms summed, cumulative, in seconds."""
        family = HistogramMetricFamily(
            PREFIX + "request_duration_seconds",
            "Request latency in the data path, from the worker taking the request in to its completion.",
            labels=["volume", "op"])
        edges = [_le(bound) for bound in self.bounds] + ["+Inf"]
        for volume in volumes:
            ops: dict[str, tuple[list[int], int]] = {}
            for totals in volume.get("queue_totals", []):
                for op, histogram in totals.get("latency", {}).items():
                    counts, total_ns = ops.get(op, ([0] * len(edges), 0))
                    buckets = histogram["buckets"]
                    if len(buckets) != len(edges):
                        raise ValueError(f"{len(buckets)} latency buckets, expected {len(edges)}")
                    ops[op] = ([a + b for a, b in zip(counts, buckets, strict=True)],
                               total_ns + histogram["sum_ns"])
            for op, (counts, total_ns) in sorted(ops.items()):
                cumulative = []
                running = 0
                for edge, count in zip(edges, counts, strict=True):
                    running += count
                    cumulative.append((edge, float(running)))
                family.add_metric([volume["name"], op], cumulative, total_ns / 1e9)
        yield family

    # -- per volume -----------------------------------------------------------------------

    def _volumes(self, volumes: list[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["volume"]
        dangling = _gauge("volume_dangling", "1 while the volume is dangling (its owner is gone).", labels)
        since = _gauge("volume_dangling_since_timestamp_seconds",
                       "When the volume turned dangling (Unix time); only while dangling.", labels)
        capacity = _gauge("volume_capacity_bytes", "The volume's data region.", labels)
        read_only = _gauge("volume_read_only", "1 if the volume is served read-only.", labels)
        sealed = _gauge("volume_sealed", "1 once the dangling volume's data is sealed.", labels)
        ttl = _gauge("volume_ttl_deadline_timestamp_seconds",
                     "When the dangling volume's time limit runs out (Unix time); only with one.", labels)
        attached = _gauge("frontend_attached", "1 while a frontend is attached to the volume.", labels)
        connections = _counter("connections", "Frontends admitted.", labels)
        refused = _counter("connections_refused", "Frontends refused (not allowed, or one attached).",
                           labels)
        dangling_attaches = _counter("dangling_attaches", "Frontends that attached while the volume dangled.",
                                     labels)
        dangling_io = _counter("dangling_io", "I/O attempts on the dangling volume, by request and outcome.",
                               [*labels, "request", "outcome"])
        events_lost = _counter("dangling_events_lost",
                               "Dangling I/O events the guard could not keep up with.", labels)
        ring_used = _gauge("ring_used_bytes", "Bytes of the quarantine ring in use.", labels)
        ring_capacity = _gauge("ring_capacity_bytes", "Size of the quarantine ring's record area.", labels)
        ring_records = _gauge("ring_records", "Records in the quarantine ring.", labels)
        ring_rejected = _counter("ring_rejected", "Writes the full ring refused (reject policy).", labels)
        ring_dropped = _counter("ring_dropped", "Records the full ring overwrote (overwrite policy).", labels)
        for volume in volumes:
            name = [volume["name"]]
            header = volume.get("header", {})
            is_dangling = bool(header.get("dangling"))
            dangling.add_metric(name, int(is_dangling))
            if is_dangling and header.get("dangling_since_ns"):
                since.add_metric(name, header["dangling_since_ns"] / 1e9)
            capacity.add_metric(name, header.get("capacity", 0))
            read_only.add_metric(name, int(bool(volume.get("read_only"))))
            guard = volume.get("guard", {})
            sealed.add_metric(name, int(bool(guard.get("sealed"))))
            if guard.get("ttl_deadline_ns"):
                ttl.add_metric(name, guard["ttl_deadline_ns"] / 1e9)
            for kind, count in sorted(guard.get("dangling_io_by_kind", {}).items()):
                request, _, outcome = kind.partition(":")
                dangling_io.add_metric([*name, request, outcome], count)
            events_lost.add_metric(name, guard.get("events_lost", 0))
            attached.add_metric(name, int(volume.get("connection") is not None))
            connections.add_metric(name, volume.get("connections_total", 0))
            refused.add_metric(name, volume.get("refused_total", 0))
            dangling_attaches.add_metric(name, volume.get("dangling_attaches", 0))
            ring = volume.get("ring", {})
            ring_used.add_metric(name, ring.get("bytes_used", 0))
            ring_capacity.add_metric(name, ring.get("area_size", 0))
            ring_records.add_metric(name, ring.get("records", 0))
            ring_rejected.add_metric(name, ring.get("rejected", 0))
            ring_dropped.add_metric(name, ring.get("dropped", 0))
        yield from (dangling, since, capacity, read_only, sealed, ttl, attached, connections, refused,
                    dangling_attaches, dangling_io, events_lost, ring_used, ring_capacity, ring_records,
                    ring_rejected, ring_dropped)

    # -- the owners' watchers -------------------------------------------------------------

    def _watchers(self) -> Iterator[Metric]:
        watchers = self.state.get("watchers", {})
        engine = watchers.get("engine")
        if engine is not None:
            yield GaugeMetricFamily(PREFIX + "engine_connected",
                                    "1 while the container engine's event stream is followed.",
                                    value=int(bool(engine.get("connected"))))
            connects = engine.get("connects", 0)
            yield CounterMetricFamily(PREFIX + "engine_connects", "Event streams opened to the engine.",
                                      value=connects)
            yield CounterMetricFamily(PREFIX + "engine_reconnects",
                                      "Event streams opened again after one broke.",
                                      value=max(connects - 1, 0))
            yield CounterMetricFamily(PREFIX + "engine_events", "Container events seen.",
                                      value=engine.get("events_seen", 0))
            yield CounterMetricFamily(PREFIX + "engine_reconciles",
                                      "Owners looked up through the engine (connect and periodic).",
                                      value=engine.get("reconciles", 0))
        proc = watchers.get("proc_events")
        if proc is not None:
            yield GaugeMetricFamily(PREFIX + "proc_events_enabled",
                                    "1 while kernel process events are followed.",
                                    value=int(bool(proc.get("enabled"))))
            yield GaugeMetricFamily(PREFIX + "proc_events_watched_pids", "Owner init pids watched.",
                                    value=len(proc.get("watched", {})))
            yield CounterMetricFamily(PREFIX + "proc_events_owner_exits", "Owner init pid exits seen.",
                                      value=proc.get("owner_exits_seen", 0))


def _le(seconds: float) -> str:
    """A bucket bound as Prometheus' own clients spell it."""
    return str(floatToGoString(seconds))  # type: ignore[no-untyped-call]
