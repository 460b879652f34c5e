"""Small QEMU TCG guests for the demo, the tests and the benchmark."""

from vhost_pv_tools.guest.vm import (
    GuestImage,
    GuestProcess,
    GuestResult,
    GuestTimeout,
    VhostUserBlkDisk,
    ensure_guest_image,
    guest_image_dir,
    run_guest,
    start_guest,
)

__all__ = [
    "GuestImage",
    "GuestProcess",
    "GuestResult",
    "GuestTimeout",
    "VhostUserBlkDisk",
    "ensure_guest_image",
    "guest_image_dir",
    "run_guest",
    "start_guest",
]
