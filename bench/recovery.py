"""Benchmark rows for crash recovery: the daemon SIGKILLed under a verifying guest and
restarted at once, QEMU reconnecting (reconnect=1) and handing back the inflight area.

What the guest sees is a pause in its I/O: from the kill until the restarted daemon takes
requests again (its status counters, polled from the host), and, from the guest side, fio's
worst completion latency. Nothing may be lost: fio verifies everything it wrote.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import VhostUserBlkDisk, start_guest
from vhost_pv_tools.serverproc import ServerProcess

RECONNECT_S = 1
# Random 4k writes and reads with the written blocks verified as it goes (verify_backlog), for
# as long as the host keeps killing the daemon.
JOB = """
set -e
echo FIO-START
fio --name=recovery --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 \\
    --rw=randrw --rwmixread=30 --bs=4k --size=100% --time_based --runtime={runtime} \\
    --verify=crc32c --verify_backlog=512 --verify_fatal=1 \\
    --output-format=json --output=/tmp/fio.json || true
echo "=== BEGIN fio ==="
cat /tmp/fio.json
echo "=== END fio ==="
"""


def _requests(server: ServerProcess) -> int:
    return int(client.status(server.control)["volumes"][0]["totals"].get("requests", 0))


def _wait(predicate: Any, what: str, timeout: float, guest: Any) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if guest.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"recovery bench: {what}:\n{guest.console_so_far()[-3000:]}")
        time.sleep(0.01)


def recovery_rows(workdir: Path, kills: int = 5, between_s: float = 3.0) -> dict[str, Any]:
    """Kill the daemon `kills` times under fio --verify; pauses (s), fio errors and worst
    completion latency."""
    volume = workdir / "recovery.img"
    volume.unlink(missing_ok=True)
    create_volume(volume, CreateOptions(size=64 << 20))
    run = workdir / "r"
    runtime = int(kills * (between_s + 4) + 10)
    pauses: list[float] = []
    server = ServerProcess([volume], run).start()
    try:
        disk = VhostUserBlkDisk(server.socket_for(volume), reconnect=RECONNECT_S)
        with start_guest(JOB.format(runtime=runtime), disks=[disk]) as guest:
            _wait(lambda: "FIO-START" in guest.console_so_far(), "fio never started", 300, guest)
            for _ in range(kills):
                _wait(lambda s=server: _requests(s) > 1000, "no guest I/O", 120, guest)
                time.sleep(between_s)
                killed = time.monotonic()
                server.kill()
                server = ServerProcess([volume], run).start()
                _wait(lambda s=server: _requests(s) > 0, "no I/O after the restart", 60, guest)
                pauses.append(time.monotonic() - killed)
            result = guest.wait(runtime + 120)
    finally:
        server.kill()
    volume.unlink(missing_ok=True)
    text = result.section("fio")
    if text is None:
        raise RuntimeError(f"recovery bench: no fio result:\n{result.console[-3000:]}")
    job = json.loads(text[text.index("{"):])["jobs"][0]
    clat_max_s = max(job[d]["clat_ns"]["max"] for d in ("read", "write")) / 1e9
    return {
        "kills": kills,
        "pause_p50_s": statistics.median(pauses),
        "pause_max_s": max(pauses),
        "fio_errors": int(job["error"]),
        "fio_clat_max_s": clat_max_s,
        "ios": int(job["read"]["total_ios"] + job["write"]["total_ios"]),
    }


def table_rows(rows: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(row, value, goal) lines."""
    goal = RECONNECT_S + 0.5
    return [
        (f"I/O pause after kill -9 + restart, p50 / max over {rows['kills']} kills (s, host: kill to "
         "first request taken)", f"{rows['pause_p50_s']:.2f} / {rows['pause_max_s']:.2f}",
         f"<= {goal:.1f} (reconnect {RECONNECT_S} s + 0.5)"),
        ("worst guest completion latency (s, fio clat max)", f"{rows['fio_clat_max_s']:.2f}", ""),
        ("fio verify errors", str(rows["fio_errors"]), "0"),
        ("guest I/Os during the run", f"{rows['ios']:,}", ""),
    ]
