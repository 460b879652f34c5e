"""Split virtqueue layout (virtio 1.x, section 2.7 "Split Virtqueues").

C: csrc/vring.h (checked by tests/unit/test_c_headers.py).
"""

from __future__ import annotations

from typing import Final

VRING_DESC_F_NEXT: Final = 1
"""The buffer continues in the descriptor named by `next`."""
VRING_DESC_F_WRITE: Final = 2
"""The buffer is device-writable (otherwise device-readable)."""
VRING_DESC_F_INDIRECT: Final = 4
"""The buffer is a table of descriptors (VIRTIO_RING_F_INDIRECT_DESC)."""
VRING_AVAIL_F_NO_INTERRUPT: Final = 1
VRING_USED_F_NO_NOTIFY: Final = 1

DESC_SIZE: Final = 16
"""struct vring_desc { le64 addr; le32 len; le16 flags; le16 next; }"""
USED_ELEM_SIZE: Final = 8
"""struct vring_used_elem { le32 id; le32 len; }"""
