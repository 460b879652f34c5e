"""`vhost-pv serve`: run the daemon. The only command that starts it.

This module imports the daemon (and through it the C data path), so it is imported only
when `serve` is chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vhost_pv import layout
from vhost_pv.app import App
from vhost_pv.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, render
from vhost_pv.cli.argtypes import host_port, http_url, ids, integer, number, socket_path
from vhost_pv.config import ConfigError, DaemonConfig
from vhost_pv.control.server import AccessList
from vhost_pv.guard.containers import ReclaimPolicy
from vhost_pv.seccomp import ENV as SECCOMP_ENV
from vhost_pv.seccomp import SeccompMode, default_mode
from vhost_pv.volume.header import HeaderError
from vhost_pv.volume.ring import RingError


def _default(field: str) -> Any:
    """The daemon's default for a DaemonConfig field: declared there, not here."""
    default = {f.name: f.default for f in dataclasses.fields(DaemonConfig)}[field]
    if default is dataclasses.MISSING:
        raise TypeError(f"DaemonConfig.{field} has no plain default")
    return default


# DaemonConfig fields whose option is not "--" + the field name with dashes.
_OPTIONS = {"control_path": "--control", "engine_url": "--engine"}


def _option(field: str) -> str:
    return _OPTIONS.get(field, "--" + field.replace("_", "-"))


def _seccomp(args: argparse.Namespace) -> dict[str, SeccompMode]:
    """--seccomp, else $VHOST_PV_SECCOMP, else DaemonConfig's default (kill)."""
    if args.seccomp:
        return {"seccomp": SeccompMode(args.seccomp)}
    return {"seccomp": default_mode()} if os.environ.get(SECCOMP_ENV) else {}


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    try:
        seccomp = _seccomp(args)
    except ValueError:
        render.error(f"${SECCOMP_ENV}={os.environ[SECCOMP_ENV]!r}: expected one of "
                     + ", ".join(m.value for m in SeccompMode))
        return EXIT_USAGE
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
        engine_grace=args.engine_grace,
        stop_poll=args.stop_poll,
        reclaim_policy=ReclaimPolicy(args.reclaim_policy),
        direct=args.direct,
        vm=args.vm,
        meta_http=args.meta_http,
        meta_socket=Path(args.meta_socket) if args.meta_socket else None,
        meta_policy=Path(args.meta_policy) if args.meta_policy else None,
        metrics=args.metrics,
        peer_timeout=args.peer_timeout,
        worker_stuck_after=args.worker_stuck_after,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        **seccomp,
    )
    try:
        config.validate()
    except ConfigError as exc:
        render.error(exc.describe(_option))
        return EXIT_USAGE
    # Refuse here what would otherwise fail half-way through the start (a log line, then an
    # error without the path) or be silently ignored.
    for option, path in (("--control", config.control_path), ("--meta-socket", config.meta_socket)):
        if path is not None and not path.parent.is_dir():
            render.error(f"{option} {path}: directory {path.parent} does not exist")
            return EXIT_FAILED
    if config.meta_policy is not None:
        from vhost_pv.meta.policy import Policy

        try:
            Policy.load(config.meta_policy)
        except OSError as exc:
            render.error(render.os_error(exc, config.meta_policy))
            return EXIT_FAILED
        except ValueError as exc:  # PolicyError, and a file that is not UTF-8
            render.error(str(exc))
            return EXIT_FAILED
    from vhost_pv.handover import exit_now_if_handed_over, wait_for_turn

    if not wait_for_turn():  # a standby under `vhost-pv supervise` whose turn never came
        return EXIT_OK
    # A volume that cannot be opened does not stop the others: the daemon logs it, alerts
    # and lists it in status (see VolumeService._open_volume).
    try:
        uvloop.run(App(config).run())
    except OSError as exc:
        render.error(render.os_error(exc))
        return EXIT_FAILED
    except (HeaderError, RingError, ValueError) as exc:
        render.error(str(exc))
        return EXIT_FAILED
    exit_now_if_handed_over(EXIT_OK)  # a restart: the next daemon waits for our exit
    return EXIT_OK


def _serve(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve volume files to vhost-user-blk frontends (QEMU, cloud-hypervisor, ...), "
                     "one socket each, and flip a volume to dangling when its owner goes away. "
                     "Runs until SIGTERM or SIGINT.")
    p.epilog = """examples:
  vhost-pv serve --socket-dir /run/vhost-pv --control /run/vhost-pv/control.sock /var/lib/vhost-pv/vol0.img
  vhost-pv serve --socket-dir /run/vhost-pv --control /run/vhost-pv/control.sock --direct --queues 4 \\
      --engine unix:///run/podman/podman.sock --proc-events /var/lib/vhost-pv/*.img
  vhost-pv serve --socket-dir /run/vhost-pv --control /run/vhost-pv/control.sock --state-dir /var/lib/vhost-pv
  vhost-pv serve ... --vm vm7 --meta-http 127.0.0.1:8169 --meta-socket /run/vhost-pv/vm7-meta.sock vol0.img
  vhost-pv serve ... --metrics 127.0.0.1:9477 /var/lib/vhost-pv/*.img"""
    p.add_argument("volumes", nargs="*", metavar="VOLUME",
                   help="volume files (`vhost-pv create`), served with the options below; none: "
                   "start empty, volumes come with `vhost-pv add` (and from --state-dir)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="remember the served volumes and their options in DIR/served.json "
                   "(written on every add and remove) and serve them again at the next start; "
                   "the VOLUMEs given are added to that set")
    p.add_argument("--socket-dir", default=str(layout.RUN_DIR), metavar="DIR",
                   help="where DIR/<volume>.sock are created (mode 0600; default %(default)s)")
    p.add_argument("--control", default=layout.control_path(), type=socket_path, metavar="PATH",
                   help="control socket path (for status, ioctl, reclaim, ...; "
                   f"default ${layout.CONTROL_ENV}, else {layout.DEFAULT_CONTROL})")
    p.add_argument("--queues", type=integer, default=_default("queues"),
                   help="virtqueues offered per volume (default %(default)s; also the default of "
                   "`vhost-pv add`)")
    p.add_argument("--read-only", action="store_true", help="serve the VOLUMEs given here read-only")
    p.add_argument("--direct", action="store_true", help="bypass the host page cache for the "
                   "VOLUMEs given here (O_DIRECT, requests in flight together on an io_uring per queue)")
    p.add_argument("--control-uids", type=ids, metavar="U,..",
                   help="more uids allowed on the control socket (yours always is)")
    p.add_argument("--control-gids", type=ids, metavar="G,..", help="gids allowed on the control socket")
    p.add_argument("--alert-webhook", type=http_url, metavar="URL",
                   help="POST alerts here in Alertmanager's format "
                   "(e.g. http://alertmanager:9093/api/v2/alerts)")
    p.add_argument("--engine", metavar="URL", help="follow this Docker Engine API socket's container "
                   "events (Docker or `podman system service`), e.g. unix:///run/podman/podman.sock")
    p.add_argument("--proc-events", action="store_true",
                   help="watch the owners' init pids through kernel process events")
    p.add_argument("--reconcile-interval", type=number, default=_default("reconcile_interval"),
                   metavar="S",
                   help="look every owner up through the engine this often (default %(default)g)")
    p.add_argument("--engine-grace", type=number, default=_default("engine_grace"), metavar="S",
                   help="with --engine and --proc-events, how long an owner's process exit waits for "
                   "the engine to say whether it was a stop, a removal or a crash (default %(default)g)")
    p.add_argument("--stop-poll", type=number, default=_default("stop_poll"), metavar="S",
                   help="sample the running owners' state this often, so that a stop Podman reports "
                   "in no event is not taken for a crash; 0: never (default %(default)g)")
    p.add_argument("--reclaim-policy", choices=[p.value for p in ReclaimPolicy],
                   default=_default("reclaim_policy").value,
                   help="which containers labelled vhost-pv.reclaim=VOLUME may reclaim it on start "
                   "(default: those running the old owner's image)")
    p.add_argument("--vm", default=_default("vm"), metavar="NAME",
                   help="the VM whose metadata this daemon serves (default %(default)s)")
    p.add_argument("--meta-http", type=host_port, metavar="HOST:PORT",
                   help="serve the HTTP metadata server on this "
                   "loopback address, e.g. 127.0.0.1:8169 (for QEMU user networking to forward the guest's "
                   "169.254.169.254 to)")
    p.add_argument("--meta-socket", metavar="PATH", help="serve the metadata as a virtio-fs file "
                   "system on this vhost-user socket (QEMU: -device vhost-user-fs-pci,tag=metadata)")
    p.add_argument("--meta-policy", metavar="FILE", help="TOML policy: which guest uids/gids may "
                   "read or write which metadata paths (default: secrets/ root only); SIGHUP reloads it")
    p.add_argument("--metrics", type=host_port, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to "
                   "127.0.0.1; the endpoint has no authentication: give another address on purpose)")
    p.add_argument("--peer-timeout", type=number, default=_default("peer_timeout"), metavar="S",
                   help="a new frontend's first message, every message from its first byte, and an "
                   "idle control or metadata HTTP connection get this long (default %(default)g)")
    p.add_argument("--worker-stuck-after", type=number, default=_default("worker_stuck_after"),
                   metavar="S", help="a queue worker inside one request this long is stuck: logged, "
                   "and the service watchdog (WatchdogSec=) is no longer pinged (default %(default)g)")
    p.add_argument("--seccomp", choices=[m.value for m in SeccompMode],
                   help="the system call filter of the data-path worker threads: kill (a forbidden "
                   "call ends the daemon), log (allowed and logged by the kernel's audit, to debug) "
                   f"or off (default ${SECCOMP_ENV}, else {_default('seccomp').value})")
    p.set_defaults(func=cmd_serve)


COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"serve": _serve}
"""The subcommand's arguments, description and examples, added when it is chosen."""
