"""Shared fixtures: the guest image is built (or found up to date) once per test session."""

from __future__ import annotations

import pytest

from vhost_pv_tools.guest import GuestImage, ensure_guest_image


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return ensure_guest_image()
