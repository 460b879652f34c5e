"""A stand-in for the service manager's end of sd_notify: a datagram socket the daemon gets
as NOTIFY_SOCKET, and a thread that keeps every message with its arrival time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType


class NotifyListener:
    def __init__(self, path: Path, on_message: Callable[[dict[str, str]], None] | None = None) -> None:
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        """(time.monotonic() at arrival, fields), in order."""
        self._on_message = on_message
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if self._on_message is not None:
                self._on_message(fields)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        """The variables systemd gives a Type=notify service (WATCHDOG_PID is left out: the
        daemon's pid is not known before it starts, and without it any pid is meant)."""
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def with_key(self, key: str, since: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, m) for t, m in self.messages if key in m and t >= since]

    def statuses(self) -> list[str]:
        return [m["STATUS"] for _, m in self.with_key("STATUS")]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0,
                 since: float = 0.0) -> float:
        """Arrival time of the first message with key (= value, if given) after since."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for arrived, message in self.with_key(key, since):
                if value is None or message[key] == value:
                    return arrived
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value or '*'} notification in {timeout} s: {self.messages}")

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self._sock.close()

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
