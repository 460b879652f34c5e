"""Offline volume tools: they work on a volume file directly, with no daemon.

create, inspect and ring. These use the volume code (and through it the C data path), so
this module is imported only when one of them is chosen.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from vhost_pv.cli import EXIT_CHECK, EXIT_FAILED, EXIT_OK, EXIT_USAGE, render
from vhost_pv.cli.argtypes import MAX_TTL, choices, ids, int_in, size, text
from vhost_pv.control.wire import OWNER_LEN
from vhost_pv.volume.header import HeaderError, ReadPolicy, RingFullPolicy, TtlAction
from vhost_pv.volume.ring import RingError, RingReader
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


COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "create": _create,
    "inspect": _inspect,
    "ring": _ring,
}
"""Each subcommand's arguments, description and examples, added when it is chosen."""
