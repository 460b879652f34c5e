"""`vhost-pv verify` run as a subprocess: its exit codes and output in a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_pv.volume.seal import compute_seal, write_seal
from vhost_pv.volume.volume import read_header

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
_ENTRY = REPO / ".venv" / "bin" / "vhost-pv"
VHOST_PV = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "vhost_pv.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VHOST_PV, *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.timeout(60)
def test_verify_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    created = run("create", str(path), "--size", "64M", "--ring-size", "2M")
    assert created.returncode == 0, created.stderr

    unsealed = run("verify", str(path))
    assert unsealed.returncode == 0, unsealed.stderr
    assert "no seal" in unsealed.stdout
    assert json.loads(run("verify", "--json", str(path)).stdout)["sealed"] is False

    # The seal the guard writes at the flip, written here directly.
    header = read_header(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"data", header.data_offset + 10 * MiB)
        seal = compute_seal(fd, header)
        write_seal(fd, seal)
        unchanged = run("verify", str(path))
        assert unchanged.returncode == 0, unchanged.stderr
        assert "unchanged" in unchanged.stdout
        assert unchanged.stderr == ""  # no progress bar in a pipe

        os.pwrite(fd, b"X", header.data_offset + 40 * MiB + 5)
    finally:
        os.close(fd)
    changed = run("verify", "--json", str(path))
    assert changed.returncode == 3, changed.stderr
    assert changed.stderr == ""
    report = json.loads(changed.stdout)
    chunk = 40 * MiB // seal.chunk_size
    assert report["changed_chunks"] == [chunk]
    assert report["changed_ranges"] == [{"offset": chunk * seal.chunk_size, "length": seal.chunk_size}]
    text = run("verify", str(path))
    assert text.returncode == 3 and "1 chunk(s) CHANGED" in text.stdout

    missing = run("verify", str(tmp_path / "nope.img"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("vhost-pv: ") and missing.stderr.count("\n") == 1
