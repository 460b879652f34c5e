"""Offline volume tools: they work on a volume file directly, with no daemon.

create, inspect, ring, verify and set-file. These use the volume code (and through it the C data path), so
this module is imported only when one of them is chosen.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vhost_pv.cli import EXIT_CHECK, EXIT_FAILED, EXIT_OK, EXIT_USAGE, render, settings
from vhost_pv.cli.argtypes import MAX_TTL, choices, ids, int_in, size, text
from vhost_pv.control.wire import OWNER_LEN
from vhost_pv.volume.header import HeaderError, ReadPolicy, RingFullPolicy, TtlAction
from vhost_pv.volume.ring import RingError, RingReader
from vhost_pv.volume.seal import Progress, SealError, check_seal, read_seal
from vhost_pv.volume.volume import (
    DEFAULT_RING_SIZE,
    CreateOptions,
    create_volume,
    inspect_header,
    read_header,
)


def cmd_create(args: argparse.Namespace) -> int:
    options = CreateOptions(
        size=args.size,
        ring_size=args.ring_size,
        owner=args.owner or "",
        read_only=args.read_only,
        read_policy=ReadPolicy[args.read_policy.upper()],
        ring_full_policy=RingFullPolicy[args.ring_full.upper()],
        ttl_seconds=args.ttl,
        ttl_action=TtlAction[args.ttl_action.upper()],
        allowed_uids=args.allow_uids if args.allow_uids is not None else (os.getuid(),),
        allowed_gids=args.allow_gids or (),
    )
    try:
        header = create_volume(Path(args.path), options)
    except FileExistsError:
        render.error(f"{args.path} exists; refusing to overwrite a volume")
        return EXIT_FAILED
    except (ValueError, HeaderError) as exc:
        render.error(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        render.error(render.os_error(exc, args.path))
        return EXIT_FAILED
    print(f"created {args.path}: {header.capacity >> 20} MiB data, {header.ring_size >> 20} MiB "
          f"quarantine ring, uuid {header.uuid}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        resolution = inspect_header(Path(args.path))
    except HeaderError as exc:
        render.error(f"{args.path}: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        render.error(render.os_error(exc, args.path))
        return EXIT_FAILED
    info = resolution.header.to_dict()
    if not resolution.consistent:
        # What a daemon would do on open: serve this state and rewrite both copies to it.
        info["header_copies"] = [p or "valid" for p in resolution.problems]
        info["header_disagreement"] = resolution.disagreement
        print(f"vhost-pv: {args.path}: header copies disagree: {resolution.disagreement}"
              + ("; it would be served dangling" if resolution.forced else ""), file=sys.stderr)
    render.table(info, use_json=args.json)
    return EXIT_OK


def cmd_ring(args: argparse.Namespace) -> int:
    """Read a volume file's quarantine ring directly (no daemon needed)."""
    path = Path(args.path)
    try:
        header = read_header(path)
        with RingReader(path, header) as reader:
            info = {**reader.stats(), "verify": reader.verify().to_dict(),
                    "entries": [r.to_dict() for r in reader.records()]}
            dumped = reader.dump(Path(args.dump)) if args.dump else []
    except (HeaderError, RingError) as exc:
        render.error(f"{path}: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        render.error(render.os_error(exc, path))
        return EXIT_FAILED
    render.ring(path, info, use_json=args.json)
    for target in dumped:
        print(f"dumped {target}", file=sys.stderr)
    return EXIT_OK if info["verify"]["ok"] else EXIT_CHECK


@contextlib.contextmanager
def _progress_bar(label: str) -> Iterator[Progress | None]:
    """A rich progress bar on stderr when it is a terminal; nothing in a pipe or a log."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bar

    with Bar("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
             TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a volume file's data region against the seal stored at its flip to dangling."""
    path = Path(args.path)
    try:
        header = read_header(path)
        # O_NONBLOCK: a path swapped for a FIFO after the header check must not hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            seal = read_seal(fd, header)
            check = None
            if seal is not None:
                with _progress_bar(f"verifying {path.name}") as progress:
                    check = check_seal(fd, header, seal, progress)
        finally:
            os.close(fd)
    except (HeaderError, SealError) as exc:
        render.error(f"{path}: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        render.error(render.os_error(exc, path))
        return EXIT_FAILED
    # Printing stays outside the try: a closed stdout is main()'s broken pipe, not a volume error.
    if seal is None or check is None:
        info: dict[str, object] = {"path": str(path), "sealed": False, "state": header.state.name.lower()}
        if args.json:
            render.as_json(info)
        else:
            print(f"{path}: no seal (the volume is sealed when it turns dangling); nothing to verify")
        return EXIT_OK
    # The last chunk may be shorter than chunk_size: report what the data region holds.
    ranges = [(offset, min(length, header.capacity - offset)) for offset, length in check.changed_ranges()]
    info = {"path": str(path), "sealed": True, "state": header.state.name.lower(), "root": seal.root,
            "sealed_ns": seal.sealed_ns, "dangling_since_ns": seal.dangling_since_ns,
            "chunk_size": seal.chunk_size, "chunks": len(seal.digests),
            "changed_chunks": check.changed_chunks,
            "changed_ranges": [{"offset": o, "length": n} for o, n in ranges]}
    if args.json:
        render.as_json(info)
    else:
        sealed_at = datetime.datetime.fromtimestamp(seal.sealed_ns / 1e9, datetime.UTC)
        print(f"{path}: sealed {sealed_at:%Y-%m-%d %H:%M:%S} UTC, {len(seal.digests)} chunks of "
              f"{seal.chunk_size >> 10} KiB, root {seal.root[:16]}: "
              + (f"{len(ranges)} chunk(s) CHANGED" if ranges else "unchanged"))
        for offset, length in ranges:
            print(f"  changed: data bytes {offset}..{offset + length - 1} "
                  f"(chunk {offset // seal.chunk_size})")
    return EXIT_CHECK if ranges else EXIT_OK


def cmd_set_file(args: argparse.Namespace) -> int:
    """Change a volume file's settings with no daemon (refused while one serves it)."""
    from vhost_pv.sockfile import AlreadyServed
    from vhost_pv.volume.settings import (
        NO_OWNER,
        SettingsChange,
        SettingsError,
        SettingsRefused,
        apply_offline,
        owner_change,
    )

    if not settings.given(args):
        render.error("nothing to change: give at least one of --ttl, --ttl-action, --read-policy, "
                     "--ring-full-policy, --uids, --gids, --owner, --no-owner")
        return EXIT_USAGE
    path = Path(args.path)
    try:
        change = SettingsChange(
            ttl_seconds=args.ttl, **settings.enums(args), allowed_uids=args.uids, allowed_gids=args.gids,
            owner=owner_change(args.owner) if args.owner is not None else NO_OWNER if args.no_owner else None)
    except SettingsError as exc:
        render.error(str(exc))
        return EXIT_USAGE
    try:
        result = apply_offline(path, change)
    except AlreadyServed as exc:
        render.error(f"{exc.strerror}: change it through that daemon (vhost-pv set --control SOCKET "
                     f"{path.stem} ...)")
        return EXIT_FAILED
    except SettingsRefused as exc:
        render.error(f"{path}: {exc}")
        return EXIT_FAILED
    except (HeaderError, RingError) as exc:
        render.error(f"{path}: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        render.error(render.os_error(exc, path))
        return EXIT_FAILED
    settings.render_result(result.to_dict(), use_json=args.json, now_ns=time.time_ns())
    return EXIT_OK


def _create(p: argparse.ArgumentParser) -> None:
    p.description = ("Create a volume file: a header (twice), the data region the guest sees, "
                     "and the quarantine ring that takes the writes while it is dangling.")
    p.epilog = """examples:
  vhost-pv create /var/lib/vhost-pv/vol0.img --size 10G --owner my-container
  vhost-pv create vol1.img --size 1G --ring-size 64M --read-policy zeros --ttl 3600 --ttl-action delete"""
    p.add_argument("path", help="the new volume file (refused if it exists)")
    p.add_argument("--size", type=size, required=True, help="data region size, e.g. 1G")
    p.add_argument("--ring-size", type=size, default=DEFAULT_RING_SIZE,
                   help="quarantine ring size (default 16M)")
    p.add_argument("--owner", type=text(OWNER_LEN, "--owner"), help="owning container id or name")
    p.add_argument("--read-only", action="store_true", help="the guest may only read")
    p.add_argument("--read-policy", choices=choices(ReadPolicy), default="deny",
                   help="reads while dangling (default %(default)s)")
    p.add_argument("--ring-full", choices=choices(RingFullPolicy), default="reject",
                   help="writes while dangling when the ring is full (default %(default)s)")
    p.add_argument("--ttl", type=int_in(0, MAX_TTL), default=0, metavar="S",
                   help="seconds dangling before the TTL action (default 0: never)")
    p.add_argument("--ttl-action", choices=choices(TtlAction), default="alert",
                   help="what the TTL does when it runs out (default %(default)s)")
    p.add_argument("--allow-uids", type=ids, metavar="U,..", help="uids whose frontends may attach "
                   "(default: yours)")
    p.add_argument("--allow-gids", type=ids, metavar="G,..", help="gids whose frontends may attach")
    p.set_defaults(func=cmd_create)


def _inspect(p: argparse.ArgumentParser) -> None:
    p.description = ("Show a volume file's header. A corrupt or foreign header is refused with what "
                     "is wrong; copies that disagree are reported with the state a daemon would serve.")
    p.epilog = """examples:
  vhost-pv inspect /var/lib/vhost-pv/vol0.img
  vhost-pv inspect /var/lib/vhost-pv/vol0.img --json | jq .state"""
    p.add_argument("path", help="the volume file")
    p.add_argument("--json", action="store_true", help="the header as JSON")
    p.set_defaults(func=cmd_inspect)


def _ring(p: argparse.ArgumentParser) -> None:
    p.description = ("List, verify and dump a volume file's quarantine ring, read from the file "
                     "(no daemon needed). Exit 3 if the hash chain is broken.")
    p.epilog = """examples:
  vhost-pv ring /var/lib/vhost-pv/vol0.img
  vhost-pv ring /var/lib/vhost-pv/vol0.img --dump /tmp/vol0-writes --json"""
    p.add_argument("path", metavar="VOLUME_FILE", help="the volume file")
    p.add_argument("--json", action="store_true", help="counters, chain check and records as JSON")
    p.add_argument("--dump", metavar="DIR", help="write each record's payload to DIR")
    p.set_defaults(func=cmd_ring)


def _verify(p: argparse.ArgumentParser) -> None:
    p.description = ("Check a volume file's data region against the seal taken when it turned "
                     "dangling (no daemon needed; any time, not only at reclaim). Only allocated "
                     "extents are read. Exit 3 if chunks changed, 0 if unchanged or unsealed.")
    p.epilog = """examples:
  vhost-pv verify /var/lib/vhost-pv/vol0.img
  vhost-pv verify /var/lib/vhost-pv/vol0.img --json | jq .changed_ranges"""
    p.add_argument("path", metavar="VOLUME_FILE", help="the volume file")
    p.add_argument("--json", action="store_true", help="the seal and the changed ranges as JSON")
    p.set_defaults(func=cmd_verify)


def _set_file(p: argparse.ArgumentParser) -> None:
    p.description = ("Change a volume file's settings with no daemon: time limit and its action, read "
                     "and ring-full policies, who may attach, owner. Only what is given changes; the "
                     "header is updated crash-safely (a crash leaves the old settings or the new). "
                     "Refused while a daemon serves the file: use `vhost-pv set` then.")
    p.epilog = """examples:
  vhost-pv set-file /var/lib/vhost-pv/vol0.img --ttl 1h --ttl-action delete
  vhost-pv set-file /var/lib/vhost-pv/vol0.img --read-policy zeros --uids 0,107 --no-owner"""
    p.add_argument("path", metavar="VOLUME_FILE", help="the volume file")
    settings.add_options(p, owner_help="record this container id or name as the owner (as it is: "
                                       "no engine is asked; `vhost-pv set` resolves it)")
    p.set_defaults(func=cmd_set_file)


COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "create": _create,
    "inspect": _inspect,
    "ring": _ring,
    "verify": _verify,
    "set-file": _set_file,
}
"""Each subcommand's arguments, description and examples, added when it is chosen."""
