"""`vhost-pv supervise`: run `vhost-pv serve` under a minimal service manager that keeps its
listening sockets across restarts (vhost_pv/supervisor.py). For hosts without systemd."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path

from vhost_pv.cli import EXIT_USAGE, render
from vhost_pv.cli.argtypes import integer, number


def cmd_supervise(args: argparse.Namespace) -> int:
    from vhost_pv.supervisor import Supervisor, SupervisorOptions, child_argv

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        render.error("supervise: name the command to run, e.g. `vhost-pv supervise -- serve ...`")
        return EXIT_USAGE
    options = SupervisorOptions(fdstore_max=args.fdstore_max, stop_timeout=args.stop_timeout,
                                watchdog=args.watchdog,
                                pid_file=Path(args.pid_file) if args.pid_file else None,
                                standby=not args.no_standby)
    return asyncio.run(Supervisor(child_argv(command), options).run())


def _supervise(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run a vhost-pv command (serve) as a child and restart it at once whenever it exits, "
        "keeping its listening sockets (an fd store and socket passing, as systemd's "
        "FileDescriptorStoreMax= and LISTEN_FDS) so frontends never find the sockets closed. "
        "SIGUSR2 restarts the child gracefully with the code installed now (an upgrade); "
        "SIGHUP is passed on; SIGTERM/SIGINT stop the child, then the supervisor.")
    p.epilog = """examples:
  vhost-pv supervise --pid-file /run/vhost-pv/supervise.pid -- serve --socket-dir /run/vhost-pv \\
      --control /run/vhost-pv/control.sock /var/lib/vhost-pv/vol0.img
  kill -USR2 "$(cat /run/vhost-pv/supervise.pid)"     # after installing a new build: restart it"""
    p.add_argument("--fdstore-max", type=integer, default=512, metavar="N",
                   help="fds the store keeps at most (default %(default)s)")
    p.add_argument("--stop-timeout", type=number, default=30.0, metavar="S",
                   help="SIGKILL a child still running this long after SIGTERM (default %(default)g)")
    p.add_argument("--watchdog", type=number, metavar="S",
                   help="expect WATCHDOG=1 from the child at least every S seconds (SIGABRT otherwise)")
    p.add_argument("--pid-file", metavar="PATH", help="write the supervisor's pid here (for kill -USR2)")
    p.add_argument("--no-standby", action="store_true",
                   help="keep no warm standby (the next daemon, started and waiting for its turn: it "
                   "takes over in milliseconds instead of a cold start's second; costs one idle process)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the vhost-pv command to run, e.g. serve ...")
    p.set_defaults(func=cmd_supervise)


COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"supervise": _supervise}
