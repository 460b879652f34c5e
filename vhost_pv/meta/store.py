"""Per-VM metadata: a tree of text values under four roots.

    instance/<key>      set by the administrator; the guest reads
    attributes/<key>    set by the administrator or the guest
    secrets/<key>       set by the administrator; the guest reads with the boot token
    volumes/<name>/...  computed on every read from the daemon's volumes (live state)

Values are immutable strings, replaced whole on the daemon's event loop, so a reader sees
the old or the new value, never a mix. Every change bumps a version that long-polling
readers wait on. Secret values never reach a log line or an error message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
from collections.abc import Callable
from typing import Any

WRITABLE_ROOTS = ("instance", "attributes", "secrets")
ROOTS = (*WRITABLE_ROOTS, "volumes")
MAX_VALUE = 64 << 10
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Tree = dict[str, Any]  # nested: a value is a str, a directory a dict
VolumeState = Callable[[], dict[str, dict[str, str]]]


class MetadataError(Exception):
    """A bad path or value; `status` is the HTTP status that fits, the message is safe to log."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def split_path(path: str) -> list[str]:
    """'instance/zone' -> ['instance', 'zone']; '' -> []. Refuses '..', '.', empty or
    over-long segments, and keys outside [A-Za-z0-9._-]."""
    parts = path.strip("/").split("/") if path.strip("/") else []
    for part in parts:
        if part in ("", ".", ".."):
            raise MetadataError(400, "path segments may not be empty, '.' or '..'")
        if len(part) > 128:
            raise MetadataError(400, "a path segment is longer than 128 characters")
        if not _KEY.match(part):
            raise MetadataError(400, f"{part[:40]!r} is not a valid key (A-Z a-z 0-9 . _ -)")
    return parts


def listing(directory: Tree) -> list[str]:
    """A directory's entries, sorted, subdirectories with a trailing '/'."""
    return sorted(f"{k}/" if isinstance(v, dict) else k for k, v in directory.items())


class MetadataStore:
    def __init__(self, vm: str, volume_state: VolumeState) -> None:
        self.vm = vm
        self._volume_state = volume_state
        self._values: dict[str, dict[str, str]] = {root: {} for root in WRITABLE_ROOTS}
        self.version = 0
        self._changed = asyncio.Event()
        self.boot_token = ""
        self.boot_token_fetched = False
        self.new_boot()

    # -- changes (on the event loop) ---------------------------------------------------------

    def set(self, path: str, value: str) -> None:
        root, key = self._writable(path)
        if len(value.encode()) > MAX_VALUE:
            raise MetadataError(413, f"values are at most {MAX_VALUE} bytes")
        self._values[root] = {**self._values[root], key: value}
        self.touch()

    def remove(self, path: str) -> bool:
        root, key = self._writable(path)
        if key not in self._values[root]:
            return False
        self._values[root] = {k: v for k, v in self._values[root].items() if k != key}
        self.touch()
        return True

    def touch(self) -> None:
        """Something readers may wait on changed (a value, or a volume's state)."""
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def new_boot(self) -> str:
        """A new boot of the VM: a new one-time token for its trusted agent."""
        self.boot_token = secrets.token_urlsafe(32)
        self.boot_token_fetched = False
        return self.boot_token

    def take_boot_token(self) -> str | None:
        """The token, the first time in a boot; None after that."""
        if self.boot_token_fetched:
            return None
        self.boot_token_fetched = True
        return self.boot_token

    def token_matches(self, offered: str) -> bool:
        return bool(offered) and secrets.compare_digest(offered.encode(), self.boot_token.encode())

    async def wait_change(self, since_version: int, timeout: float) -> bool:
        """Wait until the version moves past since_version; False on time-out."""
        while self.version == since_version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                return False
        return True

    # -- reads -------------------------------------------------------------------------------

    def tree(self) -> Tree:
        volumes = {name: dict(fields) for name, fields in self._volume_state().items()}
        return {**{root: dict(values) for root, values in self._values.items()}, "volumes": volumes}

    def lookup(self, path: str) -> str | Tree:
        """A value or a directory (nested dict); MetadataError(404) if there is none."""
        node: str | Tree = self.tree()
        for part in split_path(path):
            if not isinstance(node, dict) or part not in node:
                raise MetadataError(404, "no such metadata key")
            node = node[part]
        return node

    @staticmethod
    def etag(node: str | Tree) -> str:
        return hashlib.sha256(json.dumps(node, sort_keys=True).encode()).hexdigest()[:16]

    def keys(self, path: str) -> list[str]:
        node = self.lookup(path)
        if not isinstance(node, dict):
            raise MetadataError(400, "not a directory")
        return listing(node)

    def _writable(self, path: str) -> tuple[str, str]:
        parts = split_path(path)
        if len(parts) != 2 or parts[0] not in WRITABLE_ROOTS:
            raise MetadataError(400, f"set and rm take ROOT/KEY with ROOT one of {', '.join(WRITABLE_ROOTS)}")
        return parts[0], parts[1]
