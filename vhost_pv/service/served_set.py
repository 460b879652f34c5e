"""The served set: which volume files the daemon serves, with which options, kept in
`serve --state-dir DIR` so that a restarted daemon (crash, upgrade, reboot) serves the same
set without anyone adding them again.

The file is DIR/served.json, JSON with a version field:

    {"version": 1, "volumes": [{"path": "/var/lib/vhost-pv/vol0.img",
                                "options": {"queues": 2, "read_only": false, "direct": true}}]}

Every change is written whole and atomically: a temporary file beside it is written and
fsync'ed, renamed over the old one, and the directory fsync'ed, so after a crash at any point
the file is either the old set or the new one, never a mix or a torn write. A file that
exists but cannot be read as a served set (a damaged disk, a hand edit gone wrong) is an
error: serving nothing in its place would silently take every VM's disk away.

One daemon per state directory: DIR/served.lock is flock'ed (holding the pid) for the
daemon's life, so a second daemon cannot overwrite the first one's set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

from vhost_pv.service.options import VolumeOptions

STATE_FILE = "served.json"
LOCK_FILE = "served.lock"
STATE_VERSION = 1


class StateFileError(ValueError):
    """The state file exists but is not a served set this build can read."""


class StateDirBusy(OSError):
    """Another daemon holds the state directory."""


@dataclasses.dataclass(frozen=True)
class ServedEntry:
    path: Path
    options: VolumeOptions

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "options": self.options.to_dict()}


def volume_key(path: Path) -> Path:
    """How the set names a volume file: its absolute path, symlinks kept (a /dev/disk/by-id
    link must stay the link, not whichever /dev/sdX it points to today)."""
    return Path(os.path.abspath(path))


def encode(entries: list[ServedEntry]) -> bytes:
    document = {"version": STATE_VERSION, "volumes": [entry.to_dict() for entry in entries]}
    return (json.dumps(document, indent=2) + "\n").encode()


def decode(data: bytes, where: Path) -> list[ServedEntry]:
    """The entries of a state file's bytes; StateFileError saying what is wrong."""

    def bad(why: str) -> StateFileError:
        return StateFileError(f"{where}: not a usable served-volume state ({why}); fix it, or move "
                              "it away to start with an empty set")

    try:
        document = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise bad("not a JSON object")
    version = document.get("version")
    if version != STATE_VERSION:
        raise bad(f"version {version!r}, this build reads version {STATE_VERSION}")
    volumes = document.get("volumes")
    if not isinstance(volumes, list):
        raise bad("no list of volumes")
    entries: list[ServedEntry] = []
    seen: set[Path] = set()
    for index, item in enumerate(volumes):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            raise bad(f"volume #{index} has no path")
        path = Path(item["path"])
        if not path.is_absolute():
            raise bad(f"volume #{index}: {path} is not an absolute path")
        if path in seen:
            raise bad(f"{path} is listed twice")
        try:
            options = VolumeOptions.from_dict(item.get("options"))
        except (TypeError, ValueError) as exc:
            raise bad(f"{path}: {exc}") from None
        seen.add(path)
        entries.append(ServedEntry(path, options))
    return entries


def write_atomically(path: Path, data: bytes) -> None:
    """Replace path with data: temp file, fsync, rename, fsync of the directory."""
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    os.close(fd)
    try:
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # the rename itself is durable only once the directory is
    finally:
        os.close(dir_fd)


class ServedSet:
    """The set in memory (insertion order kept: volumes come back in the order they were
    added) and its file. Mutate with put/discard, then save()."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE
        self._entries: dict[Path, VolumeOptions] = {}
        self._lock_fd = -1
        # save() runs in a worker thread (fsync off the event loop); one write at a time.
        self._write_lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path) -> ServedSet:
        """Lock the state directory (creating it, mode 0700) and read the set; an absent
        file is an empty set. StateDirBusy if another daemon has it, StateFileError if the
        file is damaged."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        served = cls(state_dir)
        served._lock()
        try:
            served._load()
        except BaseException:
            served.close()
            raise
        return served

    def _lock(self) -> None:
        lock_path = self.state_dir / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise StateDirBusy(errno.EBUSY, f"state directory {self.state_dir} is in use by "
                               f"another vhost-pv daemon ({who})") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _load(self) -> None:
        # A temp file left by a daemon killed mid-write is not the state (the rename never
        # happened); we hold the lock, so nobody else is writing it.
        with contextlib.suppress(FileNotFoundError):
            self.path.with_name(self.path.name + ".tmp").unlink()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        self._entries = {entry.path: entry.options for entry in decode(data, self.path)}

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- the set ----------------------------------------------------------------------------

    def entries(self) -> list[ServedEntry]:
        return [ServedEntry(path, options) for path, options in self._entries.items()]

    def get(self, path: Path) -> VolumeOptions | None:
        return self._entries.get(volume_key(path))

    def put(self, path: Path, options: VolumeOptions) -> None:
        self._entries[volume_key(path)] = options

    def discard(self, path: Path) -> bool:
        return self._entries.pop(volume_key(path), None) is not None

    def snapshot(self) -> bytes:
        """The file's content for the set as it is now (taken on the event loop)."""
        return encode(self.entries())

    def save(self, data: bytes | None = None) -> None:
        """Write the set (or a snapshot of it) atomically; blocking (fsync)."""
        if data is None:
            data = self.snapshot()
        with self._write_lock:
            write_atomically(self.path, data)

    def describe(self) -> dict[str, Any]:
        return {"dir": str(self.state_dir), "file": str(self.path), "volumes": len(self._entries)}
