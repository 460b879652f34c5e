"""Helpers the daemon tests share for waiting on, and reading, `vhost-pv status`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vhost_pv.control import client


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition",
               log: Callable[[], str] | None = None) -> float:
    """Poll until predicate holds; returns how long it took. On time-out the assertion
    names what was awaited and, given log, ends with the daemon's log."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start >= timeout:
            tail = f":\n{log()[-4000:]}" if log else ""
            raise AssertionError(f"{what} not reached in {timeout} s{tail}")
        time.sleep(0.02)
    return time.monotonic() - start


def volume_entry(control: Path, volume: str) -> dict[str, Any]:
    """One volume's entry of the daemon's status."""
    for entry in client.status(control)["volumes"]:
        if entry["name"] == volume:
            result: dict[str, Any] = entry
            return result
    raise AssertionError(f"{volume} is not served")


def header(control: Path, volume: str) -> dict[str, Any]:
    result: dict[str, Any] = volume_entry(control, volume)["header"]
    return result


def alert_kinds(control: Path, volume: str) -> list[str]:
    return [a["kind"] for a in client.alerts(control) if a["volume"] == volume]
