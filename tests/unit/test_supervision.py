"""Which stuck worker withholds the watchdog's ping: a worker that stopped turning outside
its storage work does (a restart is the cure), one waiting on stalled storage does not (a
restart cannot unstick a disk and would interrupt every other volume): it is logged,
alerted once per episode and shown in STATUS."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from vhost_pv.supervision import Supervision

S = 1_000_000_000


class _Volumes:
    def __init__(self) -> None:
        self.served: dict[str, Any] = {}
        self.failed: list[dict[str, str]] = []
        self.alerts: list[tuple[str, str]] = []

    def alert(self, kind: str, volume: str, message: str, **details: Any) -> None:
        self.alerts.append((kind, volume))


def _supervision(health: list[dict[str, int]]) -> tuple[Supervision, _Volumes]:
    volumes = _Volumes()
    supervision = Supervision(volumes, stuck_after=2.0)  # type: ignore[arg-type]

    def workers() -> Iterator[tuple[str, int, dict[str, int]]]:
        for index, queue in enumerate(health):
            yield "vol0", index, {"heartbeats": 1, "busy_ns": 0, "uring_wait_ns": 0,
                                  "storage_wait_ns": 0, "has_worker": 1, **queue}

    supervision._workers = workers  # type: ignore[method-assign]
    return supervision, volumes


def test_a_worker_stuck_outside_storage_withholds_the_ping(caplog: pytest.LogCaptureFixture) -> None:
    supervision, volumes = _supervision([{"busy_ns": 5 * S}])
    with caplog.at_level(logging.ERROR, "vhost_pv.daemon"):
        assert not supervision.check()
    assert "withholding the service watchdog's ping" in caplog.text
    assert "1 worker stuck" in supervision.summary()
    assert volumes.alerts == []


@pytest.mark.parametrize("field", ["storage_wait_ns", "uring_wait_ns"])
def test_stalled_storage_is_reported_but_the_ping_goes_on(field: str) -> None:
    supervision, volumes = _supervision([{"busy_ns": 5 * S, field: 5 * S}, {}])
    assert supervision.check()
    assert supervision.check()  # still stalled: one alert per episode
    assert volumes.alerts == [("storage-stalled", "vol0")]
    assert "1 queue waiting on stalled storage" in supervision.summary()
    assert "stuck" not in supervision.summary()


def test_short_waits_are_not_stuck() -> None:
    supervision, volumes = _supervision([{"busy_ns": S, "storage_wait_ns": S, "uring_wait_ns": S}])
    assert supervision.check()
    assert volumes.alerts == [] and supervision.summary() == "0 volumes served, 0 attached, 0 dangling"
