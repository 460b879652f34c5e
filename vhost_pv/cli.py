"""The `vhost-pv` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vhost_pv.control import client
from vhost_pv.control.server import AccessList
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
from vhost_pv.daemon import ConfigError, Daemon, DaemonConfig
from vhost_pv.guard.containers import ReclaimPolicy
from vhost_pv.volume.header import MAX_ALLOWED_IDS, HeaderError, ReadPolicy, RingFullPolicy, TtlAction
from vhost_pv.volume.ring import RingError, RingReader
from vhost_pv.volume.volume import (
    DEFAULT_RING_SIZE,
    CreateOptions,
    create_volume,
    inspect_header,
    parse_size,
    read_header,
)

EXIT_OK = 0
EXIT_FAILED = 1
"""The operation failed: a missing file, a daemon that refused or is not there, ..."""
EXIT_USAGE = 2
"""The command line itself is wrong (argparse uses 2 as well)."""
EXIT_CHECK = 3
"""It ran, and what it checked is bad: loadgen errors or mismatches, a broken ring chain."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, as a shell reports a SIGINT death (128 + 2)."""

# The volume header keeps 64 bytes of reason (vhost_pv/volume/header.py, char reason[64]);
# the control request carries up to 128 (wire.REASON_LEN). The smaller one decides: a longer
# reason would be accepted on the wire and then fail the flip itself.
REASON_BYTES = 64
MAX_SIZE = 1 << 60
"""Sizes beyond an exbibyte are a typo, and offsets past 2**63 do not fit the file API."""
MAX_ID = (1 << 31) - 1
PID_MAX = 1 << 22
"""The kernel's PID_MAX_LIMIT: no pid is larger."""
MAX_TTL = ((1 << 63) - 1) // 1_000_000_000
"""TTL seconds that still fit a signed 64-bit nanosecond count."""


def _error(message: str) -> None:
    """The one line a failing command prints: "vhost-pv: ..." on stderr."""
    print("vhost-pv: " + " ".join(str(message).splitlines()), file=sys.stderr)


def _os_error(exc: OSError, path: object = None) -> str:
    """"PATH: reason" without Python's "[Errno N]" decoration."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where is not None else reason


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text}: larger than the 1 EiB maximum")
    return size


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], with the range in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}..{high}")
        return value

    return parse


def _integer(text: str) -> int:
    """An argparse type: an integer (its range is checked elsewhere)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _number(text: str) -> float:
    """An argparse type: a number (its range is checked elsewhere)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number of seconds")
    return value


def _text(limit: int, what: str) -> Callable[[str], str]:
    """An argparse type: valid UTF-8 (argv may hold any bytes) of at most `limit` bytes.

    The wire and the header have fixed-size fields; the limit is in bytes, so a reason that
    fits in characters but not in bytes is refused here, never cut inside a character."""

    def parse(text: str) -> str:
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise argparse.ArgumentTypeError(f"{what} is not valid UTF-8") from None
        if size > limit:
            raise argparse.ArgumentTypeError(f"{what} is {size} bytes of UTF-8, at most {limit} fit")
        return text

    return parse


def _ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ids: {text!r}") from None
    if len(ids) > MAX_ALLOWED_IDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_ALLOWED_IDS} ids fit in the header, got {len(ids)}")
    for value in ids:
        if not 0 <= value <= MAX_ID:
            raise argparse.ArgumentTypeError(f"id {value} is out of range 0..{MAX_ID}")
    return ids


def _http_url(text: str) -> str:
    """An argparse type: an http:// or https:// URL (valid UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the URL is not valid UTF-8") from None
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text}: expected an http:// or https:// URL")
    return text


def _host_port(text: str) -> tuple[str, int]:
    """An argparse type: HOST:PORT with a port in 0..65535 (0: any free port, for serving)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected HOST:PORT, e.g. 127.0.0.1:8169") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: port must be 0..65535")
    return host.strip("[]") or "127.0.0.1", number


def _choice(kind: type[ReadPolicy] | type[RingFullPolicy] | type[TtlAction]) -> list[str]:
    return [member.name.lower() for member in kind]


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
        _error(f"{args.path} exists; refusing to overwrite a volume")
        return EXIT_FAILED
    except (ValueError, HeaderError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _error(_os_error(exc, args.path))
        return EXIT_FAILED
    print(f"created {args.path}: {header.capacity >> 20} MiB data, {header.ring_size >> 20} MiB "
          f"quarantine ring, uuid {header.uuid}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        resolution = inspect_header(Path(args.path))
    except HeaderError as exc:
        _error(f"{args.path}: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        _error(_os_error(exc, args.path))
        return EXIT_FAILED
    header = resolution.header
    info = header.to_dict()
    if not resolution.consistent:
        # What a daemon would do on open: serve this state and rewrite both copies to it.
        info["header_copies"] = [p or "valid" for p in resolution.problems]
        info["header_disagreement"] = resolution.disagreement
        print(f"vhost-pv: {args.path}: header copies disagree: {resolution.disagreement}"
              + ("; it would be served dangling" if resolution.forced else ""), file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(key) for key in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _serve_default(field: str) -> Any:
    """The daemon's default for a DaemonConfig field: declared there, not here."""
    default = {f.name: f.default for f in dataclasses.fields(DaemonConfig)}[field]
    if default is dataclasses.MISSING:
        raise TypeError(f"DaemonConfig.{field} has no plain default")
    return default


# DaemonConfig fields whose option is not "--" + the field name with dashes.
_SERVE_OPTIONS = {"control_path": "--control", "engine_url": "--engine"}


def _serve_option(field: str) -> str:
    return _SERVE_OPTIONS.get(field, "--" + field.replace("_", "-"))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    config = DaemonConfig(
        volumes=[Path(p) for p in args.volumes],
        socket_dir=Path(args.socket_dir),
        control_path=Path(args.control),
        queues=args.queues,
        read_only=args.read_only,
        control_access=AccessList(
            uids=frozenset(args.control_uids or ()) | {os.getuid()},
            gids=frozenset(args.control_gids or ()),
        ),
        alert_webhook=args.alert_webhook,
        engine_url=args.engine,
        proc_events=args.proc_events,
        reconcile_interval=args.reconcile_interval,
        reclaim_policy=ReclaimPolicy(args.reclaim_policy),
        direct=args.direct,
        vm=args.vm,
        meta_http=args.meta_http,
        meta_socket=Path(args.meta_socket) if args.meta_socket else None,
        meta_policy=Path(args.meta_policy) if args.meta_policy else None,
        peer_timeout=args.peer_timeout,
    )
    try:
        config.validate()
    except ConfigError as exc:
        _error(exc.describe(_serve_option))
        return EXIT_USAGE
    # Refuse here what would otherwise fail half-way through the start (a log line, then an
    # error without the path) or be silently ignored.
    for option, path in (("--control", config.control_path), ("--meta-socket", config.meta_socket)):
        if path is not None and not path.parent.is_dir():
            _error(f"{option} {path}: directory {path.parent} does not exist")
            return EXIT_FAILED
    if config.meta_policy is not None:
        from vhost_pv.meta.policy import Policy

        try:
            Policy.load(config.meta_policy)
        except OSError as exc:
            _error(_os_error(exc, config.meta_policy))
            return EXIT_FAILED
        except ValueError as exc:  # PolicyError, and a file that is not UTF-8
            _error(str(exc))
            return EXIT_FAILED
    # A volume that cannot be opened does not stop the others: the daemon logs it, alerts
    # and lists it in status (see Daemon._open_volume).
    try:
        uvloop.run(Daemon(config).run())
    except OSError as exc:
        _error(_os_error(exc))
        return EXIT_FAILED
    except (HeaderError, RingError, ValueError) as exc:
        _error(str(exc))
        return EXIT_FAILED
    return EXIT_OK


def _control_problem(path: Path, exc: OSError | client.ControlError) -> str:
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
    return _os_error(exc, path)


def _control_path(text: str) -> Path:
    """An argparse type: a path that fits a unix socket address (108 bytes)."""
    try:
        size = len(os.fsencode(text))
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a usable path") from None
    if size >= 108:
        raise argparse.ArgumentTypeError(f"{size} bytes: a unix socket path must be shorter than 108")
    return Path(text)



def _control_call(args: argparse.Namespace, action: Any) -> int:
    """Run a control-socket action, print its result (JSON or text), map errors to exit 1."""
    try:
        result = action()
    except (OSError, client.ControlError) as exc:
        _error(_control_problem(Path(args.control), exc))
        return EXIT_FAILED
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    return 0


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


def cmd_meta(args: argparse.Namespace) -> int:
    control = Path(args.control)
    op = MetaOp[{"rm": "REMOVE", "ls": "LIST"}.get(args.op, args.op.upper())]
    if op == MetaOp.SET and args.value is None:
        _error("meta set needs a VALUE")
        return EXIT_USAGE
    return _control_call(args, lambda: client.meta(control, op, args.vm, args.key or "", args.value or ""))


def cmd_meta_relay(args: argparse.Namespace) -> int:
    from vhost_pv.meta.relay import relay

    host, port = args.address
    return relay(host, port)


def cmd_delete(args: argparse.Namespace) -> int:
    control = Path(args.control)
    return _control_call(args, lambda: client.delete(control, args.volume, force=args.force))


def cmd_alerts(args: argparse.Namespace) -> int:
    try:
        for alert in client.alerts(Path(args.control), follow=args.follow, since_seq=args.since):
            if args.json:
                print(json.dumps(alert), flush=True)
            else:
                print(f"#{alert['seq']} {alert['severity'].upper():8} {alert['kind']:16} "
                      f"{alert['volume']}: {alert['message']}", flush=True)
    except BrokenPipeError:
        raise  # our stdout, not the control socket (whose EPIPE the client absorbs): see main()
    except (OSError, client.ControlError) as exc:
        _error(_control_problem(Path(args.control), exc))
        return EXIT_FAILED
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
        _error(f"{path}: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        _error(_os_error(exc, path))
        return EXIT_FAILED
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        verify = info["verify"]
        print(f"{path}: {info['records']} records, {info['bytes_used']} of {info['area_size']} bytes, "
              f"{info['dropped']} dropped, {info['rejected']} rejected; chain "
              f"{'intact' if verify['ok'] else 'BROKEN: ' + '; '.join(verify['problems'])}")
        for record in info["entries"]:
            print(f"  #{record['seq']:<6} {record['type']:<12} sector {record['sector']:<10} "
                  f"{record['length']:>8} bytes  q{record['queue']} conn {record['source']}  "
                  f"sha256 {record['payload_sha256'][:16]}")
    for target in dumped:
        print(f"dumped {target}", file=sys.stderr)
    return EXIT_OK if info["verify"]["ok"] else EXIT_CHECK


def cmd_ring_control(args: argparse.Namespace) -> int:
    control = Path(args.control)
    op = RingOp[args.op.upper()]
    return _control_call(args, lambda: client.ring(control, args.volume, op))


def _print_status(status: dict[str, Any]) -> None:
    print(f"daemon pid {status['pid']}")
    for failure in status.get("failed", []):
        print(f"  not served: {failure['path']}: {failure['error']}")
    for volume in status["volumes"]:
        header = volume["header"]
        line = (f"  {volume['name']}: {header['capacity'] >> 20} MiB, state {header['state']}, "
                f"socket {volume['socket']}")
        print(line)
        connection = volume["connection"]
        if connection is None:
            print("    no frontend attached")
            continue
        print(f"    frontend pid {connection['pid']} uid {connection['uid']}, "
              f"queues running {connection['queues_running']}")
        for index, queue in enumerate(connection["queues"]):
            print(f"    q{index}: {queue['requests']} requests, {queue['reads']} reads, "
                  f"{queue['writes']} writes, {queue['io_errors']} errors, "
                  f"{queue['bad_requests']} bad, broken={bool(queue['broken'])}")


def cmd_status(args: argparse.Namespace) -> int:
    try:
        status = client.status(Path(args.control))
    except (OSError, client.ControlError) as exc:
        _error(_control_problem(Path(args.control), exc))
        return EXIT_FAILED
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0


def cmd_loadgen(args: argparse.Namespace) -> int:
    from vhost_pv_tools.loadgen import LoadgenError, run_loadgen

    try:
        result = run_loadgen(
            args.socket, args.rw, args.bs, args.iodepth, args.queues, args.runtime,
            verify=args.verify, backend_pid=args.pid, seed=args.seed, size=args.size,
            rwmix_read=args.rwmixread, event_idx=not args.no_event_idx,
        )
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _error(_control_problem(Path(args.socket), exc))
        return EXIT_FAILED
    except LoadgenError as exc:
        _error(f"{args.socket}: {exc}")
        return EXIT_FAILED
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.ok else EXIT_CHECK


def cmd_demo(args: argparse.Namespace) -> int:
    from vhost_pv_tools.demo import run_demo

    if args.size <= 0 or args.size % 512:
        _error(f"--size {args.size}: the demo volume needs a positive multiple of 512 bytes")
        return EXIT_USAGE
    return run_demo(Path(args.workdir) if args.workdir else None, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhost-pv", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", help="create a volume file")
    p.add_argument("path")
    p.add_argument("--size", type=_size, required=True, help="data region size, e.g. 1G")
    p.add_argument("--ring-size", type=_size, default=DEFAULT_RING_SIZE,
                   help="quarantine ring size (default 16M)")
    p.add_argument("--owner", type=_text(OWNER_LEN, "--owner"), help="owning container id or name")
    p.add_argument("--read-only", action="store_true", help="the guest may only read")
    p.add_argument("--read-policy", choices=_choice(ReadPolicy), default="deny",
                   help="reads while dangling")
    p.add_argument("--ring-full", choices=_choice(RingFullPolicy), default="reject",
                   help="writes while dangling when the ring is full")
    p.add_argument("--ttl", type=_int_in(0, MAX_TTL), default=0,
                   help="seconds dangling before the TTL action")
    p.add_argument("--ttl-action", choices=_choice(TtlAction), default="alert")
    p.add_argument("--allow-uids", type=_ids, help="uids whose frontends may attach "
                   "(default: yours)")
    p.add_argument("--allow-gids", type=_ids, help="gids whose frontends may attach")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("inspect", help="show a volume's header")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="serve volumes to vhost-user-blk frontends")
    p.add_argument("volumes", nargs="+", metavar="VOLUME")
    p.add_argument("--socket-dir", required=True, help="where DIR/<volume>.sock are created")
    p.add_argument("--control", required=True, type=_control_path, help="control socket path")
    p.add_argument("--queues", type=_integer, default=_serve_default("queues"),
                   help="virtqueues offered per volume (default %(default)s)")
    p.add_argument("--read-only", action="store_true", help="serve every volume read-only")
    p.add_argument("--direct", action="store_true", help="bypass the host page cache for data "
                   "(O_DIRECT, requests in flight together on an io_uring per queue)")
    p.add_argument("--control-uids", type=_ids, help="more uids allowed on the control socket")
    p.add_argument("--control-gids", type=_ids, help="gids allowed on the control socket")
    p.add_argument("--alert-webhook", type=_http_url, help="POST alerts here in Alertmanager's format "
                   "(e.g. http://alertmanager:9093/api/v2/alerts)")
    p.add_argument("--engine", metavar="URL", help="follow this Docker Engine API socket's container "
                   "events (Docker or `podman system service`), e.g. unix:///run/podman/podman.sock")
    p.add_argument("--proc-events", action="store_true",
                   help="watch the owners' init pids through kernel process events")
    p.add_argument("--reconcile-interval", type=_number, default=_serve_default("reconcile_interval"),
                   metavar="S",
                   help="look every owner up through the engine this often (default %(default)g)")
    p.add_argument("--reclaim-policy", choices=[p.value for p in ReclaimPolicy],
                   default=_serve_default("reclaim_policy").value,
                   help="which containers labelled vhost-pv.reclaim=VOLUME may reclaim it on start "
                   "(default: those running the old owner's image)")
    p.add_argument("--vm", default=_serve_default("vm"),
                   help="the VM whose metadata this daemon serves")
    p.add_argument("--meta-http", type=_host_port, metavar="HOST:PORT",
                   help="serve the HTTP metadata server on this "
                   "loopback address, e.g. 127.0.0.1:8169 (for QEMU user networking to forward the guest's "
                   "169.254.169.254 to)")
    p.add_argument("--meta-socket", metavar="PATH", help="serve the metadata as a virtio-fs file "
                   "system on this vhost-user socket (QEMU: -device vhost-user-fs-pci,tag=metadata)")
    p.add_argument("--meta-policy", metavar="FILE", help="TOML policy: which guest uids/gids may "
                   "read or write which metadata paths (default: secrets/ root only); SIGHUP reloads it")
    p.add_argument("--peer-timeout", type=_number, default=_serve_default("peer_timeout"), metavar="S",
                   help="a new frontend's first message, every message from its first byte, and an "
                   "idle control or metadata HTTP connection get this long (default %(default)g)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ioctl", help="send an ioctl-style command to a running daemon")
    p.add_argument("--control", required=True, type=_control_path)
    p.add_argument("request", choices=["Persistent_Disk_Dangling"])
    p.add_argument("volume", type=_text(NAME_LEN, "the volume name"), help="volume name (its file stem)")
    p.add_argument("--clear", action="store_true", help="clear the dangling flag instead of setting it")
    p.add_argument("--reason", type=_text(REASON_BYTES, "--reason"), default="",
                   help=f"why (recorded in the header and the alerts; at most {REASON_BYTES} bytes)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ioctl)

    p = sub.add_parser("reclaim", help="give a dangling volume to a new owner")
    p.add_argument("--control", required=True, type=_control_path)
    p.add_argument("volume", type=_text(NAME_LEN, "the volume name"))
    p.add_argument("--owner", required=True, type=_text(OWNER_LEN, "--owner"),
                   help="the new owning container")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--replay", action="store_true", help="apply the quarantined writes")
    mode.add_argument("--discard", action="store_true", help="drop the quarantined writes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reclaim)

    p = sub.add_parser("bind", help="record a volume's owner container")
    p.add_argument("--control", required=True, type=_control_path)
    p.add_argument("volume", type=_text(NAME_LEN, "the volume name"))
    p.add_argument("--container", required=True, type=_text(OWNER_LEN, "--container"),
                   help="id, id prefix or name (resolved by the engine)")
    p.add_argument("--pid", type=_int_in(0, PID_MAX), default=0,
                   help="the owner's init pid, for --proc-events without an engine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bind)

    p = sub.add_parser("meta", help="read or change a VM's metadata")
    p.add_argument("op", choices=["get", "set", "rm", "ls", "boot"])
    p.add_argument("--control", required=True, type=_control_path)
    p.add_argument("vm", type=_text(NAME_LEN, "the VM name"))
    p.add_argument("key", nargs="?", type=_text(META_KEY_LEN, "the key"),
                   help="instance/KEY, attributes/KEY, secrets/KEY, volumes/...")
    p.add_argument("value", nargs="?",
                   type=_text(MAX_CONTROL_PAYLOAD - MetaRequest.sizeof(), "the value"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_meta)

    p = sub.add_parser("meta-relay", help="copy stdin/stdout to HOST:PORT (for QEMU's guestfwd cmd:)")
    p.add_argument("address", type=_host_port, metavar="HOST:PORT")
    p.set_defaults(func=cmd_meta_relay)

    p = sub.add_parser("delete", help="wipe and remove a (dangling) volume")
    p.add_argument("--control", required=True, type=_control_path)
    p.add_argument("volume", type=_text(NAME_LEN, "the volume name"))
    p.add_argument("--force", action="store_true", help="also when it is not dangling")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("alerts", help="show (and follow) the daemon's alerts")
    p.add_argument("--control", required=True, type=_control_path)
    p.add_argument("--follow", action="store_true", help="keep printing new alerts")
    p.add_argument("--since", type=_int_in(0, (1 << 64) - 1), default=0,
                   help="only alerts after this sequence number")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser("ring", help="list / verify / dump a volume file's quarantine ring")
    p.add_argument("path", metavar="VOLUME_FILE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dump", metavar="DIR", help="write each record's payload to DIR")
    p.set_defaults(func=cmd_ring)

    p = sub.add_parser("ring-ctl", help="ring list/dump/replay/discard through a running daemon")
    p.add_argument("--control", required=True, type=_control_path)
    p.add_argument("op", choices=[op.name.lower() for op in RingOp])
    p.add_argument("volume", type=_text(NAME_LEN, "the volume name"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ring_control)

    p = sub.add_parser("status", help="ask a running daemon for its state")
    p.add_argument("--control", required=True, type=_control_path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("loadgen", help="drive a vhost-user-blk socket (any backend) as a frontend")
    p.add_argument("--socket", required=True, type=_control_path, help="the backend's vhost-user socket")
    p.add_argument("--rw", choices=["randread", "randwrite", "read", "write", "randrw"],
                   default="randread")
    p.add_argument("--bs", type=_size, default=4096, help="block size (default 4k)")
    p.add_argument("--iodepth", type=_int_in(1, 256), default=32, help="requests in flight per queue")
    p.add_argument("--queues", type=_int_in(1, 16), default=1, help="virtqueues, one thread each")
    p.add_argument("--runtime", type=_seconds, default=10.0, metavar="S", help="seconds (default 10)")
    p.add_argument("--size", type=_size, help="use only the first SIZE bytes of the disk")
    p.add_argument("--rwmixread", type=_int_in(0, 100), default=50, help="randrw: percent reads (default 50)")
    p.add_argument("--verify", action="store_true", help="write patterns and check every read "
                   "(reads: prefill first; writes: read everything back after)")
    p.add_argument("--seed", type=_int_in(0, (1 << 64) - 1),
                   help="random offsets and patterns (default: random)")
    p.add_argument("--no-event-idx", action="store_true", help="do not negotiate EVENT_IDX")
    p.add_argument("--pid", type=_int_in(1, PID_MAX), help="the backend's pid: report its CPU time per I/O")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_loadgen)

    p = sub.add_parser("demo", help="create a volume, serve it, run fio in a QEMU guest")
    p.add_argument("--workdir", help="where the demo volume lives (default: the cache)")
    p.add_argument("--size", type=_size, default=parse_size("256M"))
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 ok, 1 the operation failed, 2 usage error, 3 a check found problems
    (loadgen, ring), 130 interrupted. Whatever goes wrong is one "vhost-pv: ..." line."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose or os.environ.get("VHOST_PV_DEBUG") else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        result: int = args.func(args)
        # Flush here, not at interpreter exit: a reader that went away must be seen below.
        sys.stdout.flush()
        return result
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `vhost-pv ring VOL | head`: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's own final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        _error("output closed before everything was written (broken pipe)")
        return EXIT_FAILED
    except Exception as exc:  # the last net: a bug is still one line, with details under -v
        logging.getLogger("vhost_pv").debug("unexpected error", exc_info=True)
        _error(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
