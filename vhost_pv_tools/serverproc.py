"""Run `vhost-pv serve` as a child process: for the demo, the benchmark and the tests.

The daemon runs in its own process exactly as an admin would start it, so whatever drives
it (a QEMU guest, a fake frontend) talks to the real sockets.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class ServerError(RuntimeError):
    """The daemon did not start, or did not stop cleanly."""


class ServerProcess:
    def __init__(
        self,
        volumes: Sequence[Path],
        workdir: Path,
        *,
        queues: int = 1,
        extra_args: Sequence[str] = (),
        start_timeout: float = 15.0,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """env: variables set for the daemon on top of ours (NOTIFY_SOCKET, ...); prefix: a
        command the daemon runs under (e.g. setpriv, to drop privileges)."""
        self.volumes = [Path(v) for v in volumes]
        self.socket_dir = workdir / "sockets"
        self.control = workdir / "control.sock"
        self.log_path = workdir / "vhost-pv.log"
        self.queues = queues
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.env = dict(env or {})
        self.prefix = list(prefix)
        self.process: subprocess.Popen[bytes] | None = None

    def socket_for(self, volume: Path | str) -> Path:
        return self.socket_dir / f"{Path(volume).stem}.sock"

    def serve_args(self) -> list[str]:
        return [
            "serve",
            "--socket-dir", str(self.socket_dir),
            "--control", str(self.control),
            "--queues", str(self.queues),
            *self.extra_args,
            *map(str, self.volumes),
        ]

    def command(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "vhost_pv.cli", *self.serve_args()]

    def start(self) -> Self:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env} if self.env else None)
        self.wait_listening()
        return self

    def wait_listening(self) -> None:
        """Until the control socket accepts and every volume socket file is there."""
        assert self.process is not None
        wanted = [self.control, *(self.socket_for(v) for v in self.volumes)]
        deadline = time.monotonic() + self.start_timeout
        while not (all(p.exists() for p in wanted) and self._control_listening()):
            if self.process.poll() is not None:
                raise ServerError(f"vhost-pv serve exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"vhost-pv serve did not create its sockets:\n{self.log()}")
            time.sleep(0.05)

    def _control_listening(self) -> bool:
        """The socket file appears at bind(), before listen(): only a connect proves it is up.

        The control socket is created after the volume sockets, so once it accepts, they do too.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.control))
            except (ConnectionRefusedError, FileNotFoundError):
                return False
        return True

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 5.0) -> str:
        """The first log line matching `pattern` (a regex), once it is there."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matches {pattern!r}:\n{self.log()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServerError(f"vhost-pv serve ignored SIGTERM:\n{self.log()}") from None
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            code = self.stop()
            if code != 0:
                raise ServerError(f"vhost-pv serve exited with {code}:\n{self.log()}")
        else:
            self.kill()


class SupervisedServer(ServerProcess):
    """`vhost-pv supervise -- serve ...`: the daemon as the supervisor's child, its listening
    sockets kept across restarts. `process` is the supervisor; the daemon is `child_pid`."""

    def __init__(self, volumes: Sequence[Path], workdir: Path, *, standby: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(volumes, workdir, **kwargs)
        self.pid_file = workdir / "supervise.pid"
        self.standby = standby
        self.extra_supervise_args: list[str] = []

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vhost_pv.cli", "supervise", "--pid-file", str(self.pid_file),
                *([] if self.standby else ["--no-standby"]), *self.extra_supervise_args,
                "--", *self.serve_args()]

    def child_pid(self, timeout: float = 30.0) -> int:
        """The daemon's pid, from its own control socket (so: once it answers)."""
        from vhost_pv.control import client

        deadline = time.monotonic() + timeout
        while True:
            try:
                return int(client.status(self.control)["pid"])
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def wait_new_child(self, old: int, timeout: float = 30.0) -> int:
        """The pid of the daemon that replaced `old`, once it answers on the control socket."""
        deadline = time.monotonic() + timeout
        while True:
            pid = self.child_pid(timeout)
            if pid != old:
                return pid
            if time.monotonic() > deadline:
                raise ServerError(f"the daemon was not restarted:\n{self.log()}")
            time.sleep(0.02)

    def kill_child(self) -> int:
        """kill -9 the daemon (not the supervisor); its pid."""
        pid = self.child_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def graceful_restart(self) -> int:
        """SIGUSR2 to the supervisor; the old daemon's pid."""
        pid = self.child_pid()
        os.kill(self.pid, signal.SIGUSR2)
        return pid
