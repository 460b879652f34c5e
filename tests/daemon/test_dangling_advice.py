"""What a real daemon tells the administrator about a dangling volume: the alerts (flip,
I/O on it, time limit) carry the exact `vhost-pv` commands to reclaim or delete it, and
`vhost-pv status` / `vhost-pv ls` show age, ring use and time limit in human units, with
the raw values kept in --json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from support.attach import Guest, pattern, run_cli
from support.daemon_status import alert_kinds, wait_until

from vhost_pv.control import client
from vhost_pv.volume.header import TtlAction
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
# A nanosecond timestamp has 19 digits, epoch seconds 10: text output shows neither.
RAW_NUMBER = re.compile(r"\d{10,}")


def _alerts(control: Path, volume: str, kind: str) -> list[dict[str, Any]]:
    return [a for a in client.alerts(control) if a["volume"] == volume and a["kind"] == kind]


def _expected(control: Path, volume: str) -> list[str]:
    return [f"vhost-pv reclaim --control {control} {volume} --owner NEW_OWNER --replay",
            f"vhost-pv delete --control {control} {volume}"]


@pytest.mark.timeout(60)
def test_dangling_alerts_and_status_tell_the_admin_what_to_do(tmp_path: Path) -> None:
    gone, kept, live = tmp_path / "gone.img", tmp_path / "kept.img", tmp_path / "live.img"
    create_volume(gone, CreateOptions(size=8 * MiB, ring_size=2 * MiB, ttl_seconds=600,
                                      ttl_action=TtlAction.DELETE))
    create_volume(kept, CreateOptions(size=8 * MiB, ring_size=MiB, ttl_seconds=1,
                                      ttl_action=TtlAction.ALERT))
    create_volume(live, CreateOptions(size=8 * MiB, ring_size=MiB))
    with ServerProcess([gone, kept, live], tmp_path / "run") as server:
        control = server.control
        guest = Guest(server.socket_for(gone))
        try:
            client.persistent_disk_dangling(control, "gone", reason="container-deleted")
            client.persistent_disk_dangling(control, "kept", reason="owner-exited")
            wait_until(lambda: "volume-dangling" in alert_kinds(control, "gone"), 10.0,
                       "the flip's alert", server.log)
            guest.write(8, pattern(4096, 7))  # quarantined: one ring record, one dangling-io alert
            wait_until(lambda: bool(_alerts(control, "gone", "dangling-io")), 10.0,
                       "the dangling I/O alert", server.log)
            wait_until(lambda: bool(_alerts(control, "kept", "ttl-expired")), 10.0,
                       "the time limit's alert", server.log)

            (flip,) = _alerts(control, "gone", "volume-dangling")
            assert flip["details"]["suggested"] == _expected(control, "gone")
            assert "deleted in 10m00s unless reclaimed" in flip["message"]
            for command in _expected(control, "gone"):
                assert f"`{command}`" in flip["message"]
            io = _alerts(control, "gone", "dangling-io")[0]
            assert io["details"]["suggested"] == _expected(control, "gone")
            assert _expected(control, "gone")[1] in io["message"]
            (expired,) = _alerts(control, "kept", "ttl-expired")
            assert expired["details"]["suggested"] == _expected(control, "kept")
            assert expired["message"].startswith("time limit of 1s passed for dangling volume kept: ")
            assert _expected(control, "kept")[0] in expired["message"]
            # The alerts command's text shows the same advice.
            shown = run_cli("alerts", "--control", str(control))
            assert shown.returncode == 0, shown.stderr
            assert _expected(control, "kept")[1] in shown.stdout

            status = run_cli("status", "--control", str(control))
            assert status.returncode == 0, status.stderr
            text = status.stdout
            assert not RAW_NUMBER.search(text), text
            assert re.search(r"gone: 8 MiB, state dangling", text), text
            assert re.search(r"dangling for \d+s: container-deleted \(source: \S+\)", text), text
            assert re.search(r"ring 4\.\d KiB of 2 MiB, 1 record; deletes in 9m5\ds", text), text
            assert re.search(r"time limit passed \d+s ago \(alert sent\)", text), text
            for volume in ("gone", "kept"):
                reclaim, delete = _expected(control, volume)
                assert f"to reclaim: {reclaim}" in text and f"to delete: {delete}" in text
            assert "live: 8 MiB, state attached" in text

            listing = run_cli("ls", "--control", str(control))
            assert listing.returncode == 0, listing.stderr
            assert not RAW_NUMBER.search(listing.stdout), listing.stdout
            lines = listing.stdout.splitlines()
            assert lines[0].split() == ["NAME", "STATE", "AGE", "RING", "TTL", "OPTIONS", "FRONTEND"]
            rows = {line.split()[0]: line for line in lines[1:]}
            assert list(rows) == ["gone", "kept", "live"]
            assert re.search(r"dangling +\d+s +4\.\d KiB of 2 MiB, 1 record +deletes in 9m5\ds"
                             r" +q1 +attached by pid \d+$", rows["gone"]), rows["gone"]
            assert re.search(r"dangling +\d+s .* time limit passed \d+s ago \(alert sent\) +q1 +none$",
                             rows["kept"]), rows["kept"]
            assert re.search(r"attached +- +0 B of [\d.]+ [KM]iB, 0 records +no time limit +q1 +none$",
                             rows["live"]), rows["live"]

            # --json keeps the raw values: nanoseconds and bytes.
            raw = run_cli("status", "--control", str(control), "--json")
            assert raw.returncode == 0, raw.stderr
            entry = {v["name"]: v for v in json.loads(raw.stdout)["volumes"]}["gone"]
            since = entry["header"]["dangling_since_ns"]
            assert since > 10**18
            assert entry["guard"]["ttl_deadline_ns"] == since + 600 * 10**9
            assert entry["guard"]["suggested"] == _expected(control, "gone")
            assert entry["ring"]["area_size"] > 0 and entry["ring"]["bytes_used"] > 4096
            ls_raw = run_cli("ls", "--control", str(control), "--json")
            assert ls_raw.returncode == 0, ls_raw.stderr
            assert [v["name"] for v in json.loads(ls_raw.stdout)] == ["gone", "kept", "live"]
        finally:
            guest.close()
