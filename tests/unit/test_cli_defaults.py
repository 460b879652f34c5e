"""A host-service layout by default: every command that talks to the daemon finds its
control socket at /run/vhost-pv/control.sock, or where VHOST_PV_CONTROL says (one place
resolves it: vhost_pv/layout.py); `serve` puts its sockets in /run/vhost-pv; `--version`."""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

import pytest

from vhost_pv.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _control_defaults() -> dict[str, object]:
    """The --control default of every command that has the option."""
    defaults = {}
    for name, sub in _subparsers(build_parser()).items():
        sub.populate()  # type: ignore[attr-defined]
        for action in sub._actions:
            if action.dest == "control":
                defaults[name] = action.default
    return defaults


def test_control_defaults_to_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VHOST_PV_CONTROL", raising=False)
    defaults = _control_defaults()
    # serve and every client of the control socket.
    assert {"serve", "status", "ls", "ioctl", "reclaim", "bind", "delete", "alerts", "ring-ctl",
            "meta"} <= defaults.keys()
    assert set(defaults.values()) == {"/run/vhost-pv/control.sock"}
    args = build_parser().parse_args(["status"])
    assert args.control == Path("/run/vhost-pv/control.sock")
    args = build_parser().parse_args(["serve", "vol0.img"])
    assert (args.control, args.socket_dir) == (Path("/run/vhost-pv/control.sock"), "/run/vhost-pv")


def test_control_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOST_PV_CONTROL", "/srv/vpv/ctl.sock")
    assert set(_control_defaults().values()) == {"/srv/vpv/ctl.sock"}
    assert build_parser().parse_args(["ls"]).control == Path("/srv/vpv/ctl.sock")
    assert build_parser().parse_args(["serve", "v.img"]).control == Path("/srv/vpv/ctl.sock")
    # The option still wins.
    assert build_parser().parse_args(["ls", "--control", "/x.sock"]).control == Path("/x.sock")
    # A variable no socket can have is a usage error, as the option would be.
    monkeypatch.setenv("VHOST_PV_CONTROL", "/" + "x" * 200)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["ls"])
    assert exit_.value.code == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"vhost-pv {importlib.metadata.version('vhost-pv')}\n"
