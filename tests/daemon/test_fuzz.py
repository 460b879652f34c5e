"""A short seeded fuzz round (python -m fuzz) against a daemon subprocess: it must survive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SEED = 20261202
# Under `make asan` every free goes through ASan's quarantine (256 MiB by default) before it
# is reused: RSS growth there says nothing about leaks, so the bound is the quarantine's.
RSS_BOUND_MIB = 512 if os.environ.get("VHOST_PV_NATIVE") else 64


@pytest.mark.timeout(180)
def test_fuzz_round(tmp_path: Path) -> None:
    # Every mutation runs, guest memory shrunk under the daemon included (the SIGBUS guard).
    result = subprocess.run(
        [sys.executable, "-m", "fuzz", "--seed", str(SEED), "--duration", "20",
         "--max-rss-growth", str(RSS_BOUND_MIB), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=170, check=False,
    )
    report = json.loads(result.stdout)
    assert result.returncode == 0, json.dumps(report.get("failure"), indent=2)
    assert report["ok"] and report["failure"] is None
    assert report["seed"] == SEED and report["skipped"] == []
    # It did fuzz: both kinds of connection, messages, descriptors and kicks.
    assert report["connections"] >= 50, report
    assert report["handshakes"] > 0 and report["ring_sessions"] > 0
    assert report["messages"] > report["connections"] and report["descriptors"] > 0 and report["kicks"] > 0
    assert report["connection_errors"] > 0  # the daemon did refuse some of what it was sent
    # The rings reached the data path: requests served, and malformed ones counted as such.
    totals = report["target_totals"]
    assert totals["requests"] > 0 and totals["bad_requests"] > 0, totals
    # What it measured, and the bounds it held the daemon to.
    assert report["daemon_pid"] > 0
    # The daemon ran the C data path this test run meant: the sanitized one under make asan.
    sanitized = os.environ.get("VHOST_PV_NATIVE")
    assert report["daemon_asan"] == bool(sanitized)
    expected_dir = Path(sanitized).parent if sanitized else REPO / "vhost_pv"
    assert Path(report["daemon_native"]).parent == expected_dir
    assert report["fds_before"] > 0 and report["fds_after"] - report["fds_before"] <= 8
    assert report["rss_before_kib"] > 0
    assert report["rss_after_kib"] - report["rss_before_kib"] <= RSS_BOUND_MIB << 10
    assert report["log_tracebacks"] == 0
