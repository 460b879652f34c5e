"""Admin client commands: they talk to a running daemon over its control socket.

status, ls, ioctl, reclaim, bind, set, delete, alerts, ring-ctl and meta; and meta-relay, which QEMU
runs to reach the metadata HTTP server. None of them loads the daemon or its C data path.
"""

from __future__ import annotations

import argparse
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vhost_pv import layout
from vhost_pv.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, render, settings
from vhost_pv.cli.argtypes import PID_MAX, host_port, int_in, socket_path, text
from vhost_pv.control import client
from vhost_pv.control.wire import (
    MAX_CONTROL_PAYLOAD,
    META_KEY_LEN,
    NAME_LEN,
    OWNER_LEN,
    MetaOp,
    MetaRequest,
    ReclaimMode,
    RingOp,
)

# The volume header keeps 64 bytes of reason (vhost_pv/volume/header.py, char reason[64]);
# the control request carries up to 128 (wire.REASON_LEN). The smaller one decides: a longer
# reason would be accepted on the wire and then fail the flip itself.
REASON_BYTES = 64


def control_problem(path: Path, exc: OSError | client.ControlError) -> str:
    """Why talking to the daemon (control socket, or loadgen's vhost-user socket) failed, in
    words an admin can act on."""
    if isinstance(exc, client.ControlError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no socket there (is the daemon running?)"
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied (the control socket is for root and the daemon's uid)"
    if isinstance(exc, TimeoutError):
        return f"{path}: no answer in time (is it the right socket?)"
    if isinstance(exc, ConnectionRefusedError):
        try:
            is_socket = stat.S_ISSOCK(path.stat().st_mode)
        except OSError:
            is_socket = True
        if not is_socket:
            return f"{path}: not a socket"
        return f"{path}: nothing is listening (the daemon is not running)"
    if isinstance(exc, ConnectionError):
        return f"{path}: the daemon closed the connection ({exc.strerror or exc})"
    return render.os_error(exc, path)


def _control_call(args: argparse.Namespace, action: Callable[[], Mapping[str, Any]]) -> int:
    """Run a control-socket action, print its result (JSON or text), map errors to exit 1."""
    try:
        result = action()
    except (OSError, client.ControlError) as exc:
        render.error(control_problem(Path(args.control), exc))
        return EXIT_FAILED
    render.mapping(result, use_json=args.json)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    try:
        state = client.status(Path(args.control))
    except (OSError, client.ControlError) as exc:
        render.error(control_problem(Path(args.control), exc))
        return EXIT_FAILED
    render.status(state, use_json=args.json, control=args.control)
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    try:
        state = client.status(Path(args.control))
    except (OSError, client.ControlError) as exc:
        render.error(control_problem(Path(args.control), exc))
        return EXIT_FAILED
    render.volume_list(state, use_json=args.json)
    return EXIT_OK


def cmd_ioctl(args: argparse.Namespace) -> int:
    control = Path(args.control)
    return _control_call(args, lambda: client.persistent_disk_dangling(
        control, args.volume, clear=args.clear, reason=args.reason))


def cmd_reclaim(args: argparse.Namespace) -> int:
    mode = ReclaimMode.REPLAY if args.replay else ReclaimMode.DISCARD if args.discard else ReclaimMode.KEEP
    control = Path(args.control)
    return _control_call(args, lambda: client.reclaim(control, args.volume, args.owner, mode))


def cmd_bind(args: argparse.Namespace) -> int:
    control = Path(args.control)
    return _control_call(args, lambda: client.bind(control, args.volume, args.container, pid=args.pid))


def cmd_set(args: argparse.Namespace) -> int:
    if not settings.given(args):
        render.error("nothing to change: give at least one of --ttl, --ttl-action, --read-policy, "
                     "--ring-full-policy, --uids, --gids, --owner, --no-owner")
        return EXIT_USAGE
    if args.pid and args.owner is None:
        render.error("--pid goes with --owner")
        return EXIT_USAGE
    control = Path(args.control)
    try:
        result = client.volume_set(
            control, args.volume, ttl_seconds=args.ttl, **settings.enums(args), allowed_uids=args.uids,
            allowed_gids=args.gids, owner=args.owner, owner_pid=args.pid, clear_owner=args.no_owner)
    except (OSError, client.ControlError) as exc:
        render.error(control_problem(control, exc))
        return EXIT_FAILED
    settings.render_result(result, use_json=args.json, now_ns=time.time_ns())
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    control = Path(args.control)
    return _control_call(args, lambda: client.delete(control, args.volume, force=args.force))


def cmd_ring_control(args: argparse.Namespace) -> int:
    control = Path(args.control)
    op = RingOp[args.op.upper()]
    return _control_call(args, lambda: client.ring(control, args.volume, op))


def cmd_meta(args: argparse.Namespace) -> int:
    control = Path(args.control)
    op = MetaOp[{"rm": "REMOVE", "ls": "LIST"}.get(args.op, args.op.upper())]
    if op == MetaOp.SET and args.value is None:
        render.error("meta set needs a VALUE")
        return EXIT_USAGE
    return _control_call(args, lambda: client.meta(control, op, args.vm, args.key or "", args.value or ""))


def cmd_alerts(args: argparse.Namespace) -> int:
    try:
        for alert in client.alerts(Path(args.control), follow=args.follow, since_seq=args.since):
            render.alert(alert, use_json=args.json)
    except BrokenPipeError:
        raise  # our stdout, not the control socket (whose EPIPE the client absorbs): see main()
    except (OSError, client.ControlError) as exc:
        render.error(control_problem(Path(args.control), exc))
        return EXIT_FAILED
    return EXIT_OK


def cmd_meta_relay(args: argparse.Namespace) -> int:
    from vhost_pv.meta.relay import relay

    host, port = args.address
    return relay(host, port)


def _control(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", default=layout.control_path(), type=socket_path, metavar="PATH",
                   help="the daemon's control socket (what `vhost-pv serve --control` was given; "
                   f"default ${layout.CONTROL_ENV}, else {layout.DEFAULT_CONTROL})")


def _json(p: argparse.ArgumentParser, what: str = "the reply as JSON") -> None:
    p.add_argument("--json", action="store_true", help=what)


def _volume(p: argparse.ArgumentParser) -> None:
    p.add_argument("volume", type=text(NAME_LEN, "the volume name"),
                   help="the volume's name: its file name without the extension")


def _status(p: argparse.ArgumentParser) -> None:
    p.description = "Ask a running daemon for its volumes, their frontends and queue counters."
    p.epilog = """examples:
  vhost-pv status --control /run/vhost-pv/control.sock
  vhost-pv status --control /run/vhost-pv/control.sock --json | jq '.volumes[].header.state'"""
    _control(p)
    _json(p, "the whole status as JSON")
    p.set_defaults(func=cmd_status)


def _ls(p: argparse.ArgumentParser) -> None:
    p.description = ("List a running daemon's volumes, one line each: state, how long dangling, "
                     "quarantine ring use, time limit left, frontend attached or not.")
    p.epilog = """examples:
  vhost-pv ls --control /run/vhost-pv/control.sock
  vhost-pv ls --control /run/vhost-pv/control.sock --json | jq '.[] | select(.header.dangling) | .name'"""
    _control(p)
    _json(p, "the volumes part of the status as JSON (raw nanoseconds and bytes)")
    p.set_defaults(func=cmd_ls)


def _ioctl(p: argparse.ArgumentParser) -> None:
    p.description = ("Flip a served volume to dangling (writes go to its quarantine ring) or, "
                     "with --clear, back.")
    p.epilog = """examples:
  vhost-pv ioctl --control /run/vhost-pv/control.sock Persistent_Disk_Dangling vol0 --reason "owner gone"
  vhost-pv ioctl --control /run/vhost-pv/control.sock Persistent_Disk_Dangling vol0 --clear"""
    _control(p)
    p.add_argument("request", choices=["Persistent_Disk_Dangling"], help="the request to send")
    _volume(p)
    p.add_argument("--clear", action="store_true", help="clear the dangling flag instead of setting it")
    p.add_argument("--reason", type=text(REASON_BYTES, "--reason"), default="",
                   help=f"why (recorded in the header and the alerts; at most {REASON_BYTES} bytes)")
    _json(p)
    p.set_defaults(func=cmd_ioctl)


def _reclaim(p: argparse.ArgumentParser) -> None:
    p.description = ("Give a dangling volume to a new owner; its quarantined writes are kept, "
                     "applied (--replay) or dropped (--discard).")
    p.epilog = """examples:
  vhost-pv reclaim --control /run/vhost-pv/control.sock vol0 --owner web-2
  vhost-pv reclaim --control /run/vhost-pv/control.sock vol0 --owner web-2 --replay"""
    _control(p)
    _volume(p)
    p.add_argument("--owner", required=True, type=text(OWNER_LEN, "--owner"),
                   help="the new owning container")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--replay", action="store_true", help="apply the quarantined writes")
    mode.add_argument("--discard", action="store_true", help="drop the quarantined writes")
    _json(p)
    p.set_defaults(func=cmd_reclaim)


def _bind(p: argparse.ArgumentParser) -> None:
    p.description = "Record which container owns a volume; the daemon flips it when that owner goes."
    p.epilog = """examples:
  vhost-pv bind --control /run/vhost-pv/control.sock vol0 --container web-1
  vhost-pv bind --control /run/vhost-pv/control.sock vol0 --container web-1 --pid 4242"""
    _control(p)
    _volume(p)
    p.add_argument("--container", required=True, type=text(OWNER_LEN, "--container"),
                   help="id, id prefix or name (resolved by the engine)")
    p.add_argument("--pid", type=int_in(0, PID_MAX), default=0,
                   help="the owner's init pid, for --proc-events without an engine")
    _json(p)
    p.set_defaults(func=cmd_bind)


def _set(p: argparse.ArgumentParser) -> None:
    p.description = ("Change a served volume's settings live: time limit and its action, read and "
                     "ring-full policies, who may attach, owner. Only what is given changes; the "
                     "header is updated crash-safely and the next request follows it. The output "
                     "shows old → new.")
    p.epilog = """examples:
  vhost-pv set --control /run/vhost-pv/control.sock vol0 --ttl 1h --ttl-action delete
  vhost-pv set --control /run/vhost-pv/control.sock vol0 --read-policy zeros --ring-full-policy overwrite
  vhost-pv set --control /run/vhost-pv/control.sock vol0 --uids 0,107 --gids 107
  vhost-pv set --control /run/vhost-pv/control.sock vol0 --owner web-1   # or --no-owner"""
    _control(p)
    _volume(p)
    settings.add_options(p, owner_help="record this container as the owner (id, id prefix or name, "
                                       "resolved by the engine, as `vhost-pv bind`)")
    p.add_argument("--pid", type=int_in(0, PID_MAX), default=0,
                   help="with --owner: the owner's init pid, for --proc-events without an engine")
    p.set_defaults(func=cmd_set)


def _delete(p: argparse.ArgumentParser) -> None:
    p.description = "Wipe and remove a volume the daemon serves; only a dangling one unless --force."
    p.epilog = """examples:
  vhost-pv delete --control /run/vhost-pv/control.sock vol0"""
    _control(p)
    _volume(p)
    p.add_argument("--force", action="store_true", help="also when it is not dangling")
    _json(p)
    p.set_defaults(func=cmd_delete)


def _alerts(p: argparse.ArgumentParser) -> None:
    p.description = "Print the daemon's alerts (flips, TTL expiries, ring full, ...), oldest first."
    p.epilog = """examples:
  vhost-pv alerts --control /run/vhost-pv/control.sock
  vhost-pv alerts --control /run/vhost-pv/control.sock --follow --json --since 41"""
    _control(p)
    p.add_argument("--follow", action="store_true", help="keep printing new alerts")
    p.add_argument("--since", type=int_in(0, (1 << 64) - 1), default=0, metavar="SEQ",
                   help="only alerts after this sequence number")
    _json(p, "one JSON object per line")
    p.set_defaults(func=cmd_alerts)


def _ring_ctl(p: argparse.ArgumentParser) -> None:
    p.description = ("A served volume's quarantine ring through the daemon: list or dump its "
                     "records, replay them onto the data, or discard them.")
    p.epilog = """examples:
  vhost-pv ring-ctl --control /run/vhost-pv/control.sock list vol0
  vhost-pv ring-ctl --control /run/vhost-pv/control.sock replay vol0 --json"""
    _control(p)
    p.add_argument("op", choices=[op.name.lower() for op in RingOp], help="what to do with the ring")
    _volume(p)
    _json(p)
    p.set_defaults(func=cmd_ring_control)


def _meta(p: argparse.ArgumentParser) -> None:
    p.description = "Read or change what a VM may learn about itself through the metadata servers."
    p.epilog = """examples:
  vhost-pv meta ls --control /run/vhost-pv/control.sock vm0
  vhost-pv meta set --control /run/vhost-pv/control.sock vm0 attributes/role web
  vhost-pv meta get --control /run/vhost-pv/control.sock vm0 instance/id"""
    p.add_argument("op", choices=["get", "set", "rm", "ls", "boot"],
                   help="get/set/rm one key, ls the keys, boot: the VM booted again")
    _control(p)
    p.add_argument("vm", type=text(NAME_LEN, "the VM name"), help="the VM (`vhost-pv serve --vm`)")
    p.add_argument("key", nargs="?", type=text(META_KEY_LEN, "the key"),
                   help="instance/KEY, attributes/KEY, secrets/KEY, volumes/...")
    p.add_argument("value", nargs="?", type=text(MAX_CONTROL_PAYLOAD - MetaRequest.sizeof(), "the value"),
                   help="set: the new value")
    _json(p)
    p.set_defaults(func=cmd_meta)


def _meta_relay(p: argparse.ArgumentParser) -> None:
    p.description = ("Copy stdin/stdout to HOST:PORT, for QEMU's guestfwd=...-cmd: (QEMU runs one "
                     "relay per guest connection to the metadata address).")
    p.epilog = """examples:
  qemu-system-x86_64 ... -netdev user,id=n0,net=169.254.169.0/24,\\
      guestfwd=tcp:169.254.169.254:80-cmd:vhost-pv meta-relay 127.0.0.1:8169"""
    p.add_argument("address", type=host_port, metavar="HOST:PORT",
                   help="the daemon's metadata HTTP server (`vhost-pv serve --meta-http`)")
    p.set_defaults(func=cmd_meta_relay)


COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "status": _status,
    "ls": _ls,
    "ioctl": _ioctl,
    "reclaim": _reclaim,
    "bind": _bind,
    "delete": _delete,
    "set": _set,
    "alerts": _alerts,
    "ring-ctl": _ring_ctl,
    "meta": _meta,
    "meta-relay": _meta_relay,
}
"""Each subcommand's arguments, description and examples, added when it is chosen."""
