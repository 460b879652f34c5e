"""The options and the output `vhost-pv set` (through the daemon) and `vhost-pv set-file`
(on a volume file, no daemon) share: one spelling of each setting, one way to show old → new.

Nothing here loads the daemon or the C data path (`set` is a small client)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from vhost_pv.cli.argtypes import choices, ids, text, ttl
from vhost_pv.control.wire import OWNER_LEN
from vhost_pv.humanize import duration
from vhost_pv.volume.header import ReadPolicy, RingFullPolicy, TtlAction

LABELS = {
    "ttl_seconds": "time limit",
    "ttl_action": "ttl action",
    "read_policy": "read policy",
    "ring_full_policy": "ring-full policy",
    "allowed_uids": "allowed uids",
    "allowed_gids": "allowed gids",
    "owner": "owner",
    "owner_name": "owner name",
    "owner_image": "owner image",
    "owner_pid": "owner pid",
    "owner_pid_start": "owner pid start",
}


def add_options(p: argparse.ArgumentParser, *, owner_help: str) -> None:
    """The settings, each optional: what is not given stays as it is."""
    p.add_argument("--ttl", type=ttl, metavar="DURATION",
                   help="time limit while dangling: 3600, 90s, 15m, 1h, 2d (0: none); a limit that "
                        "has already passed acts at once")
    p.add_argument("--ttl-action", choices=choices(TtlAction),
                   help="what the time limit does when it runs out")
    p.add_argument("--read-policy", choices=choices(ReadPolicy),
                   help="what reads of the volume return while it is dangling")
    p.add_argument("--ring-full-policy", "--ring-full", dest="ring_full_policy",
                   choices=choices(RingFullPolicy),
                   help="writes while dangling when the quarantine ring is full")
    p.add_argument("--uids", "--allow-uids", dest="uids", type=ids, metavar="U,..",
                   help='uids whose frontends may attach ("" for none); checked at the next attach, '
                        "an attached frontend stays")
    p.add_argument("--gids", "--allow-gids", dest="gids", type=ids, metavar="G,..",
                   help='gids whose frontends may attach ("" for none)')
    owner = p.add_mutually_exclusive_group()
    owner.add_argument("--owner", type=text(OWNER_LEN, "--owner"), metavar="CONTAINER", help=owner_help)
    owner.add_argument("--no-owner", action="store_true",
                       help="clear the owner: no container's end flips the volume any more")
    p.add_argument("--json", action="store_true", help="the result as JSON")


def given(args: argparse.Namespace) -> bool:
    """Whether the command line names any setting."""
    return any(value is not None for value in (
        args.ttl, args.ttl_action, args.read_policy, args.ring_full_policy, args.uids, args.gids,
        args.owner)) or args.no_owner


def enums(args: argparse.Namespace) -> dict[str, Any]:
    """The policy and action options as the header's enums (None: unchanged)."""
    return {
        "ttl_action": TtlAction[args.ttl_action.upper()] if args.ttl_action else None,
        "read_policy": ReadPolicy[args.read_policy.upper()] if args.read_policy else None,
        "ring_full_policy": RingFullPolicy[args.ring_full_policy.upper()] if args.ring_full_policy else None,
    }


def _shown(field: str, value: Any) -> str:
    if field == "ttl_seconds":
        return duration(value) if value else "none"
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "none"
    if value in ("", 0) and field.startswith("owner"):
        return "none"
    return str(value)


def render_result(result: Mapping[str, Any], *, use_json: bool, now_ns: int) -> None:
    """old → new for each field that changed, then what follows from it."""
    if use_json:
        print(json.dumps(result, indent=2))
        return
    changed: Mapping[str, Mapping[str, Any]] = result["changed"]
    if not changed:
        print(f"{result['volume']}: nothing changed (the settings already are so; "
              f"generation {result['generation']})")
        return
    print(f"{result['volume']}: settings changed (generation {result['generation']})")
    width = max(len(LABELS.get(field, field)) for field in changed)
    for field, values in changed.items():
        print(f"  {LABELS.get(field, field):<{width}}  {_shown(field, values['old'])} → "
              f"{_shown(field, values['new'])}")
    settings = result["settings"]
    deadline = result.get("ttl_deadline_ns")
    if result.get("dangling") and ({"ttl_seconds", "ttl_action"} & set(changed)):
        if deadline is None:
            print("  the volume is dangling with no time limit now")
        elif deadline <= now_ns:
            print(f"  the time limit has passed: {settings['ttl_action']} now")
        else:
            print(f"  {settings['ttl_action']} in {duration((deadline - now_ns) / 1e9)} unless reclaimed")
    if result.get("frontend_attached") and ({"allowed_uids", "allowed_gids"} & set(changed)):
        print("  the attached frontend stays attached; the next attach is checked against the new list")
