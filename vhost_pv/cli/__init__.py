"""The `vhost-pv` command, split by audience.

- serve.py: `serve`, the daemon itself;
- admin.py: clients of a running daemon's control socket (status, ioctl, reclaim, ...);
- offline.py: volume files without a daemon (create, inspect, ring, verify, set-file);
- settings.py: the options and output `set` and `set-file` share;
- tools.py: `loadgen` and `demo`, handed off to vhost_pv_tools;
- render.py: what they print; argtypes.py: how their options are checked.

This module only assembles the parser and runs the chosen command. An audience's module is
imported when one of its commands is chosen, so `vhost-pv status` loads neither the daemon
nor the C data path, and `vhost-pv --help` loads none of them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
"""The operation failed: a missing file, a daemon that refused or is not there, ..."""
EXIT_USAGE = 2
"""The command line itself is wrong (argparse uses 2 as well)."""
EXIT_CHECK = 3
"""It ran, and what it checked is bad: loadgen errors or mismatches, a broken ring chain."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, as a shell reports a SIGINT death (128 + 2)."""

# (subcommand, its audience's module under vhost_pv.cli, one line for `vhost-pv --help`),
# in the order `vhost-pv --help` lists them.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("serve", "serve", "serve volumes to vhost-user-blk frontends"),
    ("supervise", "supervise", "run serve, restart it at once, keep its sockets across restarts"),
    ("status", "admin", "ask a running daemon for its state"),
    ("ls", "admin", "one line per served volume: state, dangling age, ring, time limit"),
    ("add", "admin", "serve one more volume file, with its own options"),
    ("remove", "admin", "stop serving a volume (its file is kept)"),
    ("ioctl", "admin", "flip a served volume to dangling (or back)"),
    ("reclaim", "admin", "give a dangling volume to a new owner"),
    ("bind", "admin", "record a volume's owner container"),
    ("bind-vm", "admin", "bind a volume to the VM whose QEMU may attach"),
    ("delete", "admin", "wipe and remove a (dangling) volume"),
    ("set", "admin", "change a served volume's settings (TTL, policies, uids/gids, owner)"),
    ("alerts", "admin", "show (and follow) the daemon's alerts"),
    ("ring-ctl", "admin", "ring list/dump/replay/discard through a running daemon"),
    ("meta", "admin", "read or change a VM's metadata"),
    ("meta-relay", "admin", "copy stdin/stdout to HOST:PORT (for QEMU's guestfwd cmd:)"),
    ("create", "offline", "create a volume file"),
    ("inspect", "offline", "show a volume file's header"),
    ("ring", "offline", "list / verify / dump a volume file's quarantine ring"),
    ("verify", "offline", "check a volume file's data against its seal"),
    ("set-file", "offline", "change a volume file's settings (no daemon)"),
    ("loadgen", "tools", "drive a vhost-user-blk socket (any backend) as a frontend"),
    ("demo", "tools", "create a volume, serve it, run fio in a QEMU guest"),
)

EPILOG = """commands by audience:
  serve supervise                               the daemon (supervise: restarts keep its sockets)
  status ls add remove ioctl reclaim bind set   a running daemon, through its control socket
  bind-vm delete alerts ring-ctl meta meta-relay
  create inspect ring verify set-file           volume files, no daemon needed
  loadgen demo                                  tools: load generator, end-to-end demo

exit codes: 0 ok, 1 the operation failed, 2 usage error, 3 a check found problems
(loadgen, ring, verify), 130 interrupted. Whatever goes wrong is one "vhost-pv: ..." line on stderr.

examples:
  vhost-pv create /var/lib/vhost-pv/vol0.img --size 10G --owner my-container
  vhost-pv serve --socket-dir /run/vhost-pv --control /run/vhost-pv/control.sock /var/lib/vhost-pv/vol0.img
  vhost-pv status --control /run/vhost-pv/control.sock
  vhost-pv COMMAND --help"""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions to the terminal; keeps text with line breaks (the
    example epilogs, whose command lines must stay whole) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _LazyParser(argparse.ArgumentParser):
    """A subcommand's parser whose arguments are added the first time it is used.

    argparse calls parse_known_args only on the chosen subcommand's parser, so only that
    command's module is imported (see COMMANDS)."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populate(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.populate()
        return super().format_help()

    def format_usage(self) -> str:
        self.populate()
        return super().format_usage()


class _VersionAction(argparse.Action):
    """`vhost-pv --version`: the installed package's version, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("vhost-pv")
        except PackageNotFoundError:  # run from a source tree that was never installed
            found = "unknown (not installed)"
        print(f"{parser.prog} {found}")  # stdout, as argparse's own version action
        parser.exit()


def _populator(command: str, audience: str) -> Callable[[argparse.ArgumentParser], None]:
    def populate(parser: argparse.ArgumentParser) -> None:
        module = importlib.import_module(f"vhost_pv.cli.{audience}")
        configure: Callable[[argparse.ArgumentParser], None] = module.COMMANDS[command]
        configure(parser)

    return populate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhost-pv",
        description="vhost-pv: a vhost-user-blk backend whose volumes turn dangling when their "
        "container goes away.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging (also: VHOST_PV_DEBUG=1 in the environment)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_LazyParser)
    for command, audience, summary in COMMANDS:
        sub.add_parser(command, help=summary, populate=_populator(command, audience),
                       formatter_class=HelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 ok, 1 the operation failed, 2 usage error, 3 a check found problems
    (loadgen, ring), 130 interrupted. Whatever goes wrong is one "vhost-pv: ..." line."""
    from vhost_pv.cli.render import error

    try:
        args = build_parser().parse_args(argv)
        from vhost_pv.logsetup import configure

        # Plain text with timestamps, or the journal's own protocol under systemd.
        configure(logging.DEBUG if args.verbose or os.environ.get("VHOST_PV_DEBUG") else logging.INFO)
        result: int = args.func(args)
        # Flush here, not at interpreter exit: a reader that went away must be seen below.
        sys.stdout.flush()
        return result
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `vhost-pv ring VOL | head`: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's own final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        error("output closed before everything was written (broken pipe)")
        return EXIT_FAILED
    except Exception as exc:  # the last net: a bug is still one line, with details under -v
        logging.getLogger("vhost_pv").debug("unexpected error", exc_info=True)
        error(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_FAILED
