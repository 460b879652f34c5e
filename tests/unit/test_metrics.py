"""The metrics collector on a status dict, the exposition text it gives (parsed back with
prometheus_client's own parser), and the /metrics HTTP server against bad and idle clients."""

from __future__ import annotations

import asyncio
import copy
import socket
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from vhost_pv._native import lib
from vhost_pv.devices.blk import BlkStats, QueueLatency
from vhost_pv.metrics.collector import latency_bounds
from vhost_pv.metrics.server import MetricsServer, render
from vhost_pv.service.volumes import add_queue_totals

BUCKETS = lib.VPV_LAT_BUCKETS


def histogram(counts: dict[int, int], sum_ns: int) -> dict[str, Any]:
    buckets = [0] * BUCKETS
    for index, count in counts.items():
        buckets[index] = count
    return {"buckets": buckets, "sum_ns": sum_ns}


def queue(**counters: int) -> dict[str, Any]:
    return {"reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0, **counters}


def volume(name: str, *, dangling: bool = False, attached: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "read_only": False,
        "header": {"dangling": dangling, "dangling_since_ns": 1_700_000_000_500_000_000 if dangling else 0,
                   "capacity": 16 << 20},
        "connections_total": 3,
        "refused_total": 1,
        "dangling_attaches": 0,
        "ring": {"area_size": 1 << 20, "bytes_used": 8192, "records": 2, "rejected": 1, "dropped": 0},
        "guard": {"sealed": dangling, "ttl_deadline_ns": 0, "events_lost": 0,
                  "dangling_io_by_kind": {"write:quarantined": 2} if dangling else {}},
        "connection": {"queues": [{"running": 1, "broken": 0}, {"running": 1, "broken": 1}]}
        if attached else None,
        "queue_totals": [
            {**queue(writes=10, bytes_written=40960, reads=4),
             "latency": {"write": histogram({3: 6, 5: 4}, 90_000), "read": histogram({2: 4}, 12_000)}},
            {**queue(writes=5, io_errors=2),
             "latency": {"write": histogram({4: 5}, 50_000)}},
        ],
    }


STATE: dict[str, Any] = {
    "version": "9.9.9",
    "started_at": 1_700_000_000.25,
    "failed": [{"path": "/x.img", "error": "bad header"}],
    "volumes": [volume("vol0", dangling=True), volume("vol1", attached=False)],
    "alerts": {"by_kind": {"owner-gone": 2, "volume-failed": 1}, "subscribers": 1, "webhook_failures": 0},
    "metadata": {"vm": "vm7", "http_refused": 4},
    "watchers": {
        "engine": {"connected": True, "connects": 3, "events_seen": 17, "reconciles": 5},
        "proc_events": {"enabled": True, "watched": {"123": ["vol1"]}, "owner_exits_seen": 1},
    },
}


def scrape(state: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition text of a snapshot, parsed back: (sample name, sorted labels) -> value."""
    text = render(state, latency_bounds()).decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert isinstance(sample, Sample)
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_queue_counters_by_volume_queue_and_op() -> None:
    samples = scrape(STATE)
    assert value(samples, "vhost_pv_requests_total", volume="vol0", queue="0", op="write") == 10
    assert value(samples, "vhost_pv_requests_total", volume="vol0", queue="1", op="write") == 5
    assert value(samples, "vhost_pv_requests_total", volume="vol0", queue="0", op="read") == 4
    assert value(samples, "vhost_pv_requests_total", volume="vol0", queue="0", op="flush") == 0
    assert value(samples, "vhost_pv_written_bytes_total", volume="vol0", queue="0") == 40960
    assert value(samples, "vhost_pv_io_errors_total", volume="vol0", queue="1") == 2
    # The queues of the attached frontend only.
    assert value(samples, "vhost_pv_queue_broken", volume="vol0", queue="1") == 1
    assert ("vhost_pv_queue_running", (("queue", "0"), ("volume", "vol1"))) not in samples


def test_latency_histogram_sums_the_queues_cumulatively_in_seconds() -> None:
    samples = scrape(STATE)
    bounds = latency_bounds()

    def bucket(index: int | None) -> float:
        le = "+Inf" if index is None else repr(bounds[index])
        return value(samples, "vhost_pv_request_duration_seconds_bucket", volume="vol0", op="write", le=le)

    # queue 0: 6 in bucket 3, 4 in bucket 5; queue 1: 5 in bucket 4.
    assert [bucket(i) for i in range(7)] == [0, 0, 0, 6, 11, 15, 15]
    assert bucket(None) == 15
    assert value(samples, "vhost_pv_request_duration_seconds_count", volume="vol0", op="write") == 15
    assert value(samples, "vhost_pv_request_duration_seconds_sum", volume="vol0", op="write") == \
        pytest.approx(140_000 / 1e9)
    assert value(samples, "vhost_pv_request_duration_seconds_count", volume="vol0", op="read") == 4
    assert bounds[0] == pytest.approx(1.024e-6)


def test_dangling_ring_and_frontends_per_volume() -> None:
    samples = scrape(STATE)
    assert value(samples, "vhost_pv_volume_dangling", volume="vol0") == 1
    assert value(samples, "vhost_pv_volume_dangling", volume="vol1") == 0
    assert value(samples, "vhost_pv_volume_dangling_since_timestamp_seconds", volume="vol0") == \
        pytest.approx(1_700_000_000.5)
    # Only while dangling: `time() - since` never means "dangling since 1970".
    assert ("vhost_pv_volume_dangling_since_timestamp_seconds", (("volume", "vol1"),)) not in samples
    assert value(samples, "vhost_pv_ring_used_bytes", volume="vol0") == 8192
    assert value(samples, "vhost_pv_ring_capacity_bytes", volume="vol0") == 1 << 20
    assert value(samples, "vhost_pv_ring_records", volume="vol0") == 2
    assert value(samples, "vhost_pv_ring_rejected_total", volume="vol0") == 1
    assert value(samples, "vhost_pv_frontend_attached", volume="vol0") == 1
    assert value(samples, "vhost_pv_frontend_attached", volume="vol1") == 0
    assert value(samples, "vhost_pv_connections_total", volume="vol1") == 3
    assert value(samples, "vhost_pv_connections_refused_total", volume="vol1") == 1
    assert value(samples, "vhost_pv_dangling_io_total", volume="vol0", request="write",
                 outcome="quarantined") == 2


def test_daemon_alerts_and_watchers() -> None:
    samples = scrape(STATE)
    assert value(samples, "vhost_pv_info", version="9.9.9", vm="vm7") == 1
    assert value(samples, "vhost_pv_start_time_seconds") == pytest.approx(1_700_000_000.25)
    assert value(samples, "vhost_pv_volumes_failed") == 1
    assert value(samples, "vhost_pv_alerts_total", kind="owner-gone") == 2
    assert value(samples, "vhost_pv_engine_connected") == 1
    assert value(samples, "vhost_pv_engine_reconnects_total") == 2
    assert value(samples, "vhost_pv_engine_events_total") == 17
    assert value(samples, "vhost_pv_proc_events_watched_pids") == 1
    assert value(samples, "vhost_pv_proc_events_owner_exits_total") == 1
    assert value(samples, "vhost_pv_metadata_http_refused_total") == 4
    assert value(samples, "process_open_fds") > 0  # prometheus_client's process collector
    # No engine configured: no engine metrics at all (not a misleading "disconnected").
    quiet = copy.deepcopy(STATE)
    quiet["watchers"] = {"engine": None, "proc_events": None}
    watchers = ("vhost_pv_engine_", "vhost_pv_proc_events_")
    assert not any(name.startswith(watchers) for name, _ in scrape(quiet))


def test_queue_totals_add_connections() -> None:
    """What ServedVolume keeps of ended connections: per queue, counters and histograms add."""
    def stats(writes: int, bucket: int) -> BlkStats:
        buckets = [0] * BUCKETS
        buckets[bucket] = writes
        return BlkStats(
            [{"writes": writes, "running": 1, "last_avail_idx": 7}],
            [QueueLatency({"write": buckets}, {"write": 1000 * writes})])

    totals: list[dict[str, Any]] = []
    add_queue_totals(totals, stats(3, 2))
    add_queue_totals(totals, stats(4, 5))
    (only,) = totals
    assert only["writes"] == 7
    assert "running" not in only and "last_avail_idx" not in only  # states, not counters
    assert only["latency"]["write"]["buckets"][2] == 3 and only["latency"]["write"]["buckets"][5] == 4
    assert only["latency"]["write"]["sum_ns"] == 7000


# -- the HTTP server ------------------------------------------------------------------------


async def _with_server(body: Any, *, idle_timeout: float = 5.0) -> Any:
    server = MetricsServer(lambda: copy.deepcopy(STATE), "127.0.0.1", 0, idle_timeout=idle_timeout)
    await server.start()
    try:
        return await body(server)
    finally:
        await server.close()


def test_server_answers_get_metrics_and_refuses_the_rest() -> None:
    async def body(server: MetricsServer) -> None:
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await response.text()
            async with session.post(base + "/metrics", data=b"x" * 100_000) as response:
                assert response.status == 405
            async with session.get(base + "/") as response:
                assert response.status == 404
            async with session.get(base + "/metrics/../admin") as response:
                assert response.status == 404
        families = {family.name for family in text_string_to_metric_families(text)}
        assert {"vhost_pv_requests", "vhost_pv_request_duration_seconds",
                "vhost_pv_volume_dangling"} <= families
        assert server.scrapes == 1 and server.refused == 3

    asyncio.run(_with_server(body))


def test_server_closes_idle_and_slow_connections() -> None:
    """A client that connects and sends nothing, or half a request, is closed after the idle
    timeout, and scrapes go on meanwhile."""
    async def body(server: MetricsServer) -> None:
        loop = asyncio.get_running_loop()
        silent = socket.create_connection(("127.0.0.1", server.port))
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        for sock in (silent, slow):
            sock.setblocking(False)
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{server.port}/metrics") as response:
            assert response.status == 200
        for sock in (silent, slow):
            closed = await asyncio.wait_for(loop.sock_recv(sock, 1024), timeout=5.0)
            assert closed == b""  # the server hung up
            sock.close()

    asyncio.run(_with_server(body, idle_timeout=0.5))


def test_server_caps_connections() -> None:
    async def body(server: MetricsServer) -> None:
        from vhost_pv.metrics.server import MAX_CONNECTIONS

        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS + 4)]
        try:
            for _ in range(50):
                if server.dropped >= 4:
                    break
                await asyncio.sleep(0.02)
            assert server.dropped >= 4
        finally:
            for sock in held:
                sock.close()

    asyncio.run(_with_server(body))
