"""Shared fixtures, and the markers by folder.

The tests are organised by what they need to run: tests/unit (in process: no daemon
subprocess, no QEMU, no container engine), tests/daemon (`vhost-pv serve` as a subprocess),
tests/guest (a QEMU guest on top) and tests/engines (podman, or a fake Docker Engine API).
Each test gets the marker of its folder here, so `pytest -m unit` runs the fast ones without
anyone having to remember to decorate a new test. Helpers shared between folders live in
tests/support/ (imported as `support.frontend`; tests/ is on sys.path, see pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vhost_pv_tools.guest import GuestImage, ensure_guest_image

_TESTS = Path(__file__).resolve().parent
# Folder -> marker; the markers are registered in pyproject.toml.
FOLDER_MARKERS = {"unit": "unit", "daemon": "daemon", "guest": "guest", "engines": "engine"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path.resolve()
        if not path.is_relative_to(_TESTS):
            continue  # collected from elsewhere in the same run (this hook sees every item)
        folder = path.relative_to(_TESTS).parts[0]
        marker = FOLDER_MARKERS.get(folder)
        # A test file outside the four folders would escape every `-m` selection unnoticed.
        assert marker is not None, f"{item.nodeid}: tests live in one of {sorted(FOLDER_MARKERS)}"
        item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return ensure_guest_image()
