"""Blocking client for the control socket, used by the CLI and the tests."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
from pathlib import Path
from typing import Any

from vhost_pv.control.wire import (
    CONTROL_VERSION,
    Command,
    ControlHeader,
    ReplyStatus,
)

_seq = itertools.count(1)


class ControlError(Exception):
    """The daemon refused or failed a command."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} ({os.strerror(-status) if status < 0 else status})")
        self.status = status


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ControlError(0, "control socket closed before the reply was complete")
        data += chunk
    return data


def call(path: Path, command: int, payload: bytes = b"", timeout: float = 30.0) -> bytes:
    """Send one command and return the reply payload (raises ControlError on failure)."""
    seq = next(_seq)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        header = ControlHeader.build(
            {"version": CONTROL_VERSION, "flags": 0, "cmd": command, "seq": seq, "length": len(payload)}
        )
        # The daemon may have answered (e.g. refused us) and closed already: read its reply.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(header + payload)
        reply = ControlHeader.parse(_recv_exact(sock, ControlHeader.sizeof()))
        body = _recv_exact(sock, reply.length)
    status = ReplyStatus.parse(body[:4])
    if status != 0:
        raise ControlError(status, body[4:].decode(errors="replace"))
    return body[4:]


def status(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(call(path, Command.STATUS))
    return result
