"""Volumes added and removed while the daemon runs, and the served set that remembers them.

RuntimeVolumes is the one place that serves a volume file as a whole (VolumeService opens
it and starts its guard, FrontendService claims its socket) and stops serving it, at start
(the state directory's set plus the command line) and on `vhost-pv add` / `remove`. With
`serve --state-dir` every change is written to the served set (served_set.py) before the
request is answered, so what a restarted daemon serves is what was served when it stopped.
Nothing here touches another volume: each volume has its own lock, socket, guard and queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vhost_pv.errors import InvalidRequest, VhostPvError, VolumeExists, VolumeNotFound
from vhost_pv.service.options import VolumeOptions
from vhost_pv.service.served_set import ServedEntry, ServedSet, volume_key
from vhost_pv.service.volumes import RemoveResult

if TYPE_CHECKING:
    from vhost_pv.config import DaemonConfig
    from vhost_pv.service.frontends import FrontendService
    from vhost_pv.service.volumes import VolumeService
    from vhost_pv.volume.volume import CreateOptions

# The daemon's log name, whichever module writes: operators (and tests) match on it.
log = logging.getLogger("vhost_pv.daemon")


class RuntimeVolumes:
    def __init__(self, config: DaemonConfig, volumes: VolumeService, frontends: FrontendService) -> None:
        self.config = config
        self.volumes = volumes
        self.frontends = frontends
        self.served_set: ServedSet | None = None
        # One state write at a time, each taking its snapshot once it is its turn: the last
        # write on disk is always the newest set.
        self._save_lock = asyncio.Lock()
        volumes.on_removed = self._forget

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        """Serve the state directory's set, then the command line's volumes not in it (with
        the daemon-wide options), and record the whole as the set. A volume in the set keeps
        its remembered options: the daemon-wide flags are defaults for volumes new to it."""
        plan: list[ServedEntry] = []
        if self.config.state_dir is not None:
            self.served_set = ServedSet.open(self.config.state_dir)
            plan = self.served_set.entries()
            log.info("served set %s: %d volume(s)", self.served_set.path, len(plan))
        known = {entry.path for entry in plan}
        defaults = VolumeOptions.defaults(self.config)
        for path in self.config.volumes:
            key = _known_as(volume_key(path), known)
            if key in known and self.served_set is not None:
                remembered = self.served_set.get(key)
                if remembered != defaults:
                    log.info("%s is in the served set: served with its remembered options (%s), "
                             "not the command line's (%s)", key,
                             remembered.describe() if remembered else "-", defaults.describe())
                continue
            # Named twice on the command line: both go through, and the second is refused
            # as it always was (the volume's flock).
            plan.append(ServedEntry(key if self.served_set is not None else path, defaults))
        for entry in plan:
            served = self.volumes.add(entry.path, entry.options)
            if served is not None:
                self.frontends.serve(served)
        if self.served_set is not None:
            for entry in plan:
                self.served_set.put(entry.path, entry.options)
            self.served_set.save()

    def close(self) -> None:
        if self.served_set is not None:
            self.served_set.close()

    def describe(self) -> dict[str, Any] | None:
        return self.served_set.describe() if self.served_set is not None else None

    # -- add --------------------------------------------------------------------------------

    async def add(self, path: Path, options: VolumeOptions, *,
                  create: CreateOptions | None = None) -> dict[str, Any]:
        """Serve one more volume file (created first, given create); refused with the reason
        (and nothing left behind: no socket file, no lock, no file it created) if it cannot
        be. A volume of the set that failed at start is tried again (its disk came back)."""
        if not path.is_absolute():
            raise InvalidRequest(f"{path}: the daemon needs an absolute path")
        try:
            options.validate()
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        key = volume_key(path)
        self._refuse_duplicate(key)
        if create is not None:
            await self._create(key, create)
        try:
            return await self._serve_added(key, options, created=create is not None)
        except BaseException:
            if create is not None:
                with contextlib.suppress(OSError):
                    key.unlink()
            raise

    @staticmethod
    async def _create(key: Path, create: CreateOptions) -> None:
        from vhost_pv.volume.header import HeaderError
        from vhost_pv.volume.volume import create_volume

        try:
            await asyncio.to_thread(create_volume, key, create)
        except FileExistsError:
            raise VolumeExists(f"{key} exists; refusing to overwrite a volume (add it without "
                               "--create to serve it)") from None
        except (ValueError, HeaderError) as exc:
            raise InvalidRequest(f"{key}: {exc}") from None
        except OSError as exc:
            raise VhostPvError(exc.errno or errno.EIO, f"{key}: cannot create it: "
                               f"{exc.strerror or exc}") from None
        log.info("%s: created (%d MiB data, %d MiB ring)", key, create.size >> 20, create.ring_size >> 20)

    async def _serve_added(self, key: Path, options: VolumeOptions, *, created: bool) -> dict[str, Any]:
        retrying = self._failed_entry(key)
        served = self.volumes.add(key, options, strict=True)
        assert served is not None  # strict: a volume that cannot be served raised
        try:
            self.frontends.serve(served)
        except OSError as exc:
            await self.volumes.withdraw(served.volume.name)
            raise VhostPvError(exc.errno or errno.EIO, f"{served.socket_path}: cannot serve the "
                               f"socket: {exc.strerror or exc}") from None
        if retrying is not None:
            self.volumes.failed.remove(retrying)
        if self.served_set is not None:
            self.served_set.put(key, options)
            try:
                await self._save()
            except OSError as exc:
                # What is served and what a restart would serve must not differ: undo.
                self.served_set.discard(key)
                await self.volumes.withdraw(served.volume.name)
                raise VhostPvError(exc.errno or errno.EIO, f"{self.served_set.path}: cannot record "
                                   f"the volume, not served: {exc.strerror or exc}") from None
        self.volumes.on_change()
        log.info("%s: added (%s), socket %s", served.volume.name, options.describe(), served.socket_path)
        if self.volumes.process_watcher is not None:
            # An owner recorded in the header that exited while nobody served the volume: its
            # exit event is long gone (the engine watcher finds it at its next reconcile).
            await self.volumes.process_watcher.check_alive("add")
        return {"volume": served.volume.name, "path": str(key), "socket": str(served.socket_path),
                "options": options.to_dict(), "read_only": served.read_only, "created": created,
                "remembered": self.served_set is not None}

    def _refuse_duplicate(self, key: Path) -> None:
        """EEXIST for a file served already (whichever name it was given by) and for one whose
        name (its socket) is taken by another served or failed volume."""
        try:
            st = os.stat(key)
        except OSError:
            st = None  # the open says what is wrong with it
        name = key.stem
        for served_name, served in self.volumes.served.items():
            if st is not None:
                mine = os.fstat(served.volume.fd)
                if (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino):
                    raise VolumeExists(f"{key} is already served here as {served_name}")
            if served_name == name:
                raise VolumeExists(f"a volume named {name} is already served here (from "
                                   f"{served.volume.path}): its socket name would clash")
        for failure in self.volumes.failed:
            if Path(failure["path"]).stem == name and volume_key(Path(failure["path"])) != key:
                raise VolumeExists(f"a volume named {name} ({failure['path']}, not served: "
                                   f"{failure['error']}) is in the set; remove it first")

    def _failed_entry(self, key: Path) -> dict[str, Any] | None:
        for failure in self.volumes.failed:
            if volume_key(Path(failure["path"])) == key:
                return failure
        return None

    # -- remove -----------------------------------------------------------------------------

    async def remove(self, name: str, *, force: bool) -> dict[str, Any]:
        """Stop serving a volume (VolumeService.remove), or drop a volume of the set that
        could not be opened; either way the set forgets it. The file stays."""
        if name not in self.volumes.served:
            failure = next((f for f in self.volumes.failed if Path(f["path"]).stem == name), None)
            if failure is None:
                raise VolumeNotFound(f"no volume named {name!r} is served here")
            self.volumes.failed.remove(failure)
            path = Path(failure["path"])
            await self._forget(path)
            log.warning("%s: removed from the served set (it could not be opened: %s)", name,
                        failure["error"])
            return RemoveResult(volume=name, path=path, disconnected=None, failed=True).to_dict()
        result = await self.volumes.remove(name, force=force)
        await self._forget(result.path)
        return result.to_dict()

    async def _forget(self, path: Path) -> None:
        if self.served_set is None or not self.served_set.discard(path):
            return
        try:
            await self._save()
        except OSError as exc:
            # The volume is gone already; the admin must know a restart would bring it back.
            log.error("%s: cannot write the served set without %s: %s; a restart would serve "
                      "it again", self.served_set.path, path, exc.strerror or exc)
            self.volumes.alerts.raise_alert(
                "state-write-failed", path.stem,
                f"{self.served_set.path} could not be updated: a restart would serve {path} again",
                severity="critical", path=str(path), error=str(exc.strerror or exc))
            raise VhostPvError(exc.errno or errno.EIO, f"{path.stem} is no longer served, but "
                               f"{self.served_set.path} could not be updated: a restart would serve "
                               f"it again ({exc.strerror or exc})") from None

    async def _save(self) -> None:
        assert self.served_set is not None
        async with self._save_lock:
            await asyncio.to_thread(self.served_set.save, self.served_set.snapshot())


def _known_as(key: Path, known: set[Path]) -> Path:
    """The set's name for a command-line volume: the same path, or another path to the same
    file (a symlink, /dev/disk/by-id/...), which would otherwise be opened twice and stop the
    start as a volume named twice."""
    if key in known:
        return key
    for path in known:
        try:
            if os.path.samefile(path, key):
                return path
        except OSError:
            continue  # either one missing: the open reports it
    return key
