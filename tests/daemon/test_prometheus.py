"""`serve --metrics` scraped by a real Prometheus server (Debian's /usr/bin/prometheus) every
second, and PromQL through its HTTP API: request counters equal what a frontend did (also
across a reconnect), the dangling flag and its time, the ring, and a latency quantile."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.attach import Guest, pattern
from support.frontend import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, BlkRequest

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

PROMETHEUS = "/usr/bin/prometheus"
WAIT_S = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A Prometheus server scraping one target every second, its data in tmp."""

    def __init__(self, workdir: Path, target: str) -> None:
        workdir.mkdir()
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: vhost-pv\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            reply = json.load(response)
        assert reply["status"] == "success", reply
        return reply["data"]

    def wait_up(self) -> dict[str, Any]:
        """Until the target has been scraped successfully; returns it."""
        deadline = time.monotonic() + WAIT_S
        last: Any = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                last = self.api("targets")["activeTargets"]
            except OSError:
                last = None  # not listening yet
            if last and last[0]["health"] == "up":
                return dict(last[0])
            time.sleep(0.2)
        raise AssertionError(f"target not up after {WAIT_S} s: {last}\n{self.log_path.read_text()}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def wait_value(self, promql: str, expected: float) -> float:
        """The query's single value once it is `expected` (scrapes come every second)."""
        deadline = time.monotonic() + WAIT_S
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if len(result) == 1 and float(result[0]["value"][1]) == expected:
                return expected
            time.sleep(0.25)
        raise AssertionError(f"{promql}: {result}, expected {expected}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ServerProcess]:
    volume = tmp_path / "vol0.img"
    create_volume(volume, CreateOptions(size=16 << 20, ring_size=1 << 20))
    with ServerProcess([volume], tmp_path / "run", extra_args=["--metrics", "127.0.0.1:0"]) as server:
        yield server
        assert "Traceback" not in server.log()


@pytest.mark.timeout(60)
def test_prometheus_scrapes_the_daemon(daemon: ServerProcess, tmp_path: Path) -> None:
    assert shutil.which(PROMETHEUS), "the Debian package prometheus is a test dependency"
    target = client.status(daemon.control)["metrics"]
    host, _, port = target.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0  # loopback, the port the kernel gave
    prometheus = Prometheus(tmp_path / "prometheus", target)
    try:
        prometheus.wait_up()
        prometheus.wait_value('vhost_pv_info{job="vhost-pv"}', 1)
        # Before any frontend: the series exist, at zero.
        prometheus.wait_value('sum(vhost_pv_requests_total{volume="vol0",op="write"})', 0)
        prometheus.wait_value('vhost_pv_request_duration_seconds_count{volume="vol0",op="write"}', 0)

        # Two connections: the counters are the daemon's, not the connection's.
        writes = reads = 0
        for round_ in range(2):
            guest = Guest(daemon.socket_for("vol0"))
            try:
                for i in range(4 + round_):
                    guest.round_trip(8 * i, pattern(4096, i))
                    writes += 1
                    reads += 1
                flush = BlkRequest.build(guest.memory, VIRTIO_BLK_T_FLUSH)
                guest.frontend.submit(0, guest.ring, flush)
                assert flush.status == VIRTIO_BLK_S_OK
            finally:
                guest.close()
        prometheus.wait_value('sum(vhost_pv_requests_total{volume="vol0",op="write"})', writes)
        prometheus.wait_value('sum(vhost_pv_requests_total{volume="vol0",op="read"})', reads)
        prometheus.wait_value('sum(vhost_pv_requests_total{volume="vol0",op="flush"})', 2)
        prometheus.wait_value('sum(vhost_pv_written_bytes_total{volume="vol0"})', writes * 4096)
        prometheus.wait_value('vhost_pv_connections_total{volume="vol0"}', 2)
        prometheus.wait_value('vhost_pv_request_duration_seconds_count{volume="vol0",op="write"}', writes)
        (p99,) = prometheus.query(
            'histogram_quantile(0.99, sum by (le) (vhost_pv_request_duration_seconds_bucket'
            '{volume="vol0",op="write"}))')
        latency = float(p99["value"][1])
        assert math.isfinite(latency) and 0 < latency < 4.3, p99

        prometheus.wait_value('vhost_pv_volume_dangling{volume="vol0"}', 0)
        before = time.time()
        client.persistent_disk_dangling(daemon.control, "vol0", reason="test")
        prometheus.wait_value('vhost_pv_volume_dangling{volume="vol0"}', 1)
        (since,) = prometheus.query('vhost_pv_volume_dangling_since_timestamp_seconds{volume="vol0"}')
        assert before - 1 <= float(since["value"][1]) <= time.time()

        # A write to the dangling volume goes to the ring: the ring's gauges and the counter.
        guest = Guest(daemon.socket_for("vol0"))
        try:
            assert guest.write(0, pattern(4096, 7)) == VIRTIO_BLK_S_OK
        finally:
            guest.close()
        prometheus.wait_value('sum(vhost_pv_quarantined_total{volume="vol0"})', 1)
        prometheus.wait_value('vhost_pv_ring_records{volume="vol0"}', 1)
        (used,) = prometheus.query('vhost_pv_ring_used_bytes{volume="vol0"}')
        assert float(used["value"][1]) >= 4096
        prometheus.wait_value('vhost_pv_alerts_total{kind="dangling-attach"}', 1)
        prometheus.wait_value('vhost_pv_frontend_attached{volume="vol0"}', 0)
        # The process collector's metrics come along.
        assert prometheus.query('process_resident_memory_bytes{job="vhost-pv"}')
    finally:
        prometheus.close()
