"""DaemonConfig is the one place of the daemon's defaults and of their range checks.

`vhost-pv serve` takes its defaults from DaemonConfig's fields and reports validate()'s
ConfigError in its option names; App refuses a bad config before it touches anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from vhost_pv import cli
from vhost_pv._native import lib
from vhost_pv.app import App
from vhost_pv.config import ConfigError, DaemonConfig
from vhost_pv.control.wire import NAME_LEN
from vhost_pv.guard.containers import ReclaimPolicy


def config(tmp_path: Path, **changes: Any) -> DaemonConfig:
    return DaemonConfig(volumes=[tmp_path / "vol.img"], socket_dir=tmp_path,
                        control_path=tmp_path / "control.sock", **changes)


def serve_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["serve", "--socket-dir", str(tmp_path), "--control", str(tmp_path / "c.sock"),
            *extra, str(tmp_path / "vol.img")]


def test_defaults_are_valid(tmp_path: Path) -> None:
    config(tmp_path).validate()


@pytest.mark.parametrize(("field", "value"), [
    ("queues", 0),
    ("queues", 17),
    ("reconcile_interval", 0.0),
    ("reconcile_interval", float("nan")),
    ("engine_grace", 0.0),
    ("stop_poll", -0.5),
    ("stop_poll", float("nan")),
    ("peer_timeout", -1.0),
    ("peer_timeout", float("inf")),
    ("vm", "x" * (NAME_LEN + 1)),
    ("vm", "bad\udcffname"),  # what a non-UTF-8 argv byte becomes
    ("engine_url", "http://localhost:2375"),
    ("meta_policy", Path("policy.toml")),
])
def test_validate_names_the_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, **{field: value}).validate()
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_validate_accepts_the_limits(tmp_path: Path) -> None:
    config(tmp_path, queues=lib.VPV_MAX_QUEUES, vm="v" * NAME_LEN, engine_url="unix:///run/x.sock",
           meta_policy=tmp_path / "p.toml", meta_socket=tmp_path / "m.sock").validate()
    config(tmp_path, stop_poll=0.0).validate()  # 0: never sample the owners' state


def test_describe_uses_the_callers_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, meta_policy=tmp_path / "p.toml").validate()
    assert str(caught.value) == "meta_policy: applies to the metadata file system: give meta_socket too"
    assert caught.value.describe(str.upper) == (
        "META_POLICY: applies to the metadata file system: give META_SOCKET too")


def test_daemon_refuses_a_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        App(config(tmp_path, queues=0))
    assert not (tmp_path / "control.sock").exists()


def test_cli_defaults_come_from_daemon_config(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(serve_args(tmp_path))
    fields = {f.name: f.default for f in dataclasses.fields(DaemonConfig)}
    assert args.queues == fields["queues"]
    assert args.reconcile_interval == fields["reconcile_interval"]
    assert (args.engine_grace, args.stop_poll) == (fields["engine_grace"], fields["stop_poll"])
    assert args.peer_timeout == fields["peer_timeout"]
    assert args.vm == fields["vm"]
    assert ReclaimPolicy(args.reclaim_policy) == fields["reclaim_policy"]


def test_cli_follows_a_changed_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default is read from DaemonConfig, not written again in the parser."""
    field = DaemonConfig.__dataclass_fields__["peer_timeout"]
    monkeypatch.setattr(field, "default", 7.5)
    args = cli.build_parser().parse_args(serve_args(tmp_path))
    assert args.peer_timeout == 7.5


@pytest.mark.parametrize(("extra", "message"), [
    (["--queues", "17"], f"--queues: 17 is out of range 1..{lib.VPV_MAX_QUEUES}"),
    (["--peer-timeout", "0"], "--peer-timeout: 0.0 is not a positive number of seconds"),
    (["--engine", "http://x"], "--engine: http://x: expected unix:///path/to/engine.sock"),
    (["--vm", "x" * 200], f"--vm: 200 bytes of UTF-8, at most {NAME_LEN} fit"),
    (["--meta-policy", "p.toml"],
     "--meta-policy: applies to the metadata file system: give --meta-socket too"),
])
def test_cli_reports_validate_in_option_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert cli.main(serve_args(tmp_path, *extra)) == cli.EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == [f"vhost-pv: {message}"]
