"""Blocking client for the control socket, used by the CLI and the tests."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vhost_pv.control.wire import (
    ALERTS_FOLLOW,
    CLEAR_OWNER,
    CONTROL_VERSION,
    DANGLING_CLEAR,
    DELETE_FORCE,
    NO_SET_ID,
    SET_ALLOWED_GIDS,
    SET_ALLOWED_UIDS,
    SET_IDS,
    SET_OWNER,
    SET_READ_POLICY,
    SET_RING_FULL_POLICY,
    SET_TTL,
    SET_TTL_ACTION,
    AlertsRequest,
    BindRequest,
    Command,
    ControlHeader,
    DanglingReply,
    DanglingRequest,
    MetaOp,
    MetaRequest,
    ReclaimMode,
    ReclaimRequest,
    ReplyStatus,
    RingOp,
    RingRequest,
    VolumeRequest,
    VolumeSetRequest,
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


def _send_request(sock: socket.socket, command: int, payload: bytes) -> None:
    header = ControlHeader.build(
        {"version": CONTROL_VERSION, "flags": 0, "cmd": command, "seq": next(_seq), "length": len(payload)}
    )
    # The daemon may have answered (e.g. refused us) and closed already: read its reply.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(header + payload)


def _read_reply(sock: socket.socket) -> bytes:
    reply = ControlHeader.parse(_recv_exact(sock, ControlHeader.sizeof()))
    body = _recv_exact(sock, reply.length)
    status = ReplyStatus.parse(body[:4])
    if status != 0:
        raise ControlError(status, body[4:].decode(errors="replace"))
    return body[4:]


def call(path: Path, command: int, payload: bytes = b"", timeout: float = 60.0) -> bytes:
    """Send one command and return the reply payload (raises ControlError on failure)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        _send_request(sock, command, payload)
        return _read_reply(sock)


def stream(path: Path, command: int, payload: bytes = b"") -> Iterator[bytes]:
    """Send one command and yield every reply until the daemon closes (streaming commands)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        _send_request(sock, command, payload)
        while True:
            try:
                yield _read_reply(sock)
            except ControlError as exc:
                if exc.status == 0:  # closed between replies: the stream ended
                    return
                raise


def status(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(call(path, Command.STATUS))
    return result


def persistent_disk_dangling(
    path: Path, volume: str, *, clear: bool = False, reason: str = ""
) -> dict[str, Any]:
    """The Persistent_Disk_Dangling ioctl: returns once the flip is durable and in effect."""
    request = DanglingRequest.build(
        {"volume": volume, "flags": DANGLING_CLEAR if clear else 0, "reason": reason}
    )
    reply = DanglingReply.parse(call(path, Command.PERSISTENT_DISK_DANGLING, request))
    return {
        "volume": volume,
        "state": "dangling" if reply.state == 2 else "attached",
        "changed": bool(reply.changed),
        "generation": reply.generation,
        "dangling_since_ns": reply.dangling_since_ns,
        "flip_ns": reply.flip_ns,
    }


def reclaim(path: Path, volume: str, owner: str, mode: ReclaimMode = ReclaimMode.KEEP) -> dict[str, Any]:
    request = ReclaimRequest.build({"volume": volume, "owner": owner, "mode": int(mode)})
    result: dict[str, Any] = json.loads(call(path, Command.RECLAIM, request, timeout=3600))
    return result


def ring(path: Path, volume: str, op: RingOp) -> dict[str, Any]:
    request = RingRequest.build({"volume": volume, "op": int(op)})
    result: dict[str, Any] = json.loads(call(path, Command.RING, request, timeout=3600))
    return result


def delete(path: Path, volume: str, *, force: bool = False) -> dict[str, Any]:
    request = VolumeRequest.build({"volume": volume, "flags": DELETE_FORCE if force else 0})
    result: dict[str, Any] = json.loads(call(path, Command.DELETE, request))
    return result


def bind(path: Path, volume: str, container: str, *, pid: int = 0) -> dict[str, Any]:
    """Record a volume's owner container (and, without an engine, its init pid)."""
    request = BindRequest.build({"volume": volume, "container": container, "pid": pid})
    result: dict[str, Any] = json.loads(call(path, Command.BIND, request))
    return result


def volume_set(
    path: Path,
    volume: str,
    *,
    ttl_seconds: int | None = None,
    ttl_action: int | None = None,
    read_policy: int | None = None,
    ring_full_policy: int | None = None,
    allowed_uids: Sequence[int] | None = None,
    allowed_gids: Sequence[int] | None = None,
    owner: str | None = None,
    owner_pid: int = 0,
    clear_owner: bool = False,
) -> dict[str, Any]:
    """Change a served volume's settings (None: leave as it is); the reply names each field
    changed with its old and new value. The enums are the header's (TtlAction, ReadPolicy,
    RingFullPolicy)."""
    mask = 0
    fields: dict[str, Any] = {"volume": volume, "read_policy": 0, "ring_full_policy": 0,
                              "ttl_action": 0, "ttl_seconds": 0, "owner": "", "owner_pid": 0}
    for bit, name, value in ((SET_TTL, "ttl_seconds", ttl_seconds),
                             (SET_TTL_ACTION, "ttl_action", ttl_action),
                             (SET_READ_POLICY, "read_policy", read_policy),
                             (SET_RING_FULL_POLICY, "ring_full_policy", ring_full_policy)):
        if value is not None:
            mask |= bit
            fields[name] = int(value)
    for bit, name, ids in ((SET_ALLOWED_UIDS, "allowed_uids", allowed_uids),
                           (SET_ALLOWED_GIDS, "allowed_gids", allowed_gids)):
        listed = list(ids) if ids is not None else []
        if len(listed) > SET_IDS:
            raise ValueError(f"at most {SET_IDS} {name.split('_')[1]} fit, got {len(listed)}")
        if ids is not None:
            mask |= bit
        fields[name] = listed + [NO_SET_ID] * (SET_IDS - len(listed))
    if owner is not None:
        mask |= SET_OWNER
        fields.update(owner=owner, owner_pid=owner_pid)
    if clear_owner:
        mask |= CLEAR_OWNER
    request = VolumeSetRequest.build({**fields, "mask": mask})
    result: dict[str, Any] = json.loads(call(path, Command.VOLUME_SET, request))
    return result


def meta(path: Path, op: MetaOp, vm: str, key: str = "", value: str = "") -> dict[str, Any]:
    """Read or change a VM's metadata (vhost-pv meta)."""
    data = value.encode()
    request = MetaRequest.build({"op": int(op), "value_len": len(data), "vm": vm, "key": key}) + data
    result: dict[str, Any] = json.loads(call(path, Command.META, request))
    return result


def alerts(path: Path, *, follow: bool = False, since_seq: int = 0) -> Iterator[dict[str, Any]]:
    """Recent alerts; with follow, then every new one as it is raised (until interrupted)."""
    request = AlertsRequest.build({"flags": ALERTS_FOLLOW if follow else 0, "since_seq": since_seq})
    bodies = stream(path, Command.ALERTS, request) if follow else iter([call(path, Command.ALERTS, request)])
    for body in bodies:
        for line in body.decode().splitlines():
            if line:
                yield json.loads(line)
