"""The control commands, one small function each: parse the wire struct, log who asked, call
the service, build the reply. Failures are the service's VhostPvError subclasses (or
InvalidRequest for a request that is wrong in itself); ControlServer turns them into -errno."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from vhost_pv.control.server import Handler, Send
from vhost_pv.control.wire import (
    ALERTS_FOLLOW,
    CLEAR_OWNER,
    DANGLING_CLEAR,
    DELETE_FORCE,
    NO_SET_ID,
    SET_ALL,
    SET_ALLOWED_GIDS,
    SET_ALLOWED_UIDS,
    SET_OWNER,
    SET_READ_POLICY,
    SET_RING_FULL_POLICY,
    SET_TTL,
    SET_TTL_ACTION,
    AlertsRequest,
    BindRequest,
    Command,
    DanglingReply,
    DanglingRequest,
    MetaOp,
    MetaRequest,
    ReclaimMode,
    ReclaimRequest,
    RingOp,
    RingRequest,
    VolumeRequest,
    VolumeSetRequest,
)
from vhost_pv.errors import InvalidRequest, VhostPvError
from vhost_pv.guard.alerts import AlertHub
from vhost_pv.meta.store import MetadataError, MetadataStore
from vhost_pv.service.volumes import HEADER_REASON_LEN, VolumeService, owner_fields
from vhost_pv.sockfile import PeerCredentials
from vhost_pv.volume.header import ReadPolicy, RingFullPolicy, TtlAction
from vhost_pv.volume.settings import NO_OWNER, SettingsChange, SettingsError

# The daemon's log name, whichever module writes: operators (and tests) match on it.
log = logging.getLogger("vhost_pv.daemon")

ALERT_KEEPALIVE_S = 15.0


@dataclasses.dataclass(frozen=True)
class Context:
    """What the commands act on."""

    volumes: VolumeService
    alerts: AlertHub
    metadata: MetadataStore
    status: Callable[[], dict[str, Any]]


async def status(ctx: Context, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
    if payload:
        raise InvalidRequest("STATUS takes no payload")
    return json.dumps(ctx.status()).encode()


async def dangling(ctx: Context, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
    request = DanglingRequest.parse(payload)
    dangling = not request.flags & DANGLING_CLEAR
    # The wire carries 128 bytes of reason, the header keeps 64: refuse what would not
    # fit rather than fail the flip half way or cut a UTF-8 character in two.
    if len(request.reason.encode()) > HEADER_REASON_LEN:
        raise InvalidRequest(f"reason is {len(request.reason.encode())} bytes of UTF-8; "
                             f"the volume header keeps at most {HEADER_REASON_LEN}")
    log.info("control: Persistent_Disk_Dangling %s %s by pid=%d uid=%d (reason: %s)",
             request.volume, "set" if dangling else "clear", peer.pid, peer.uid, request.reason)
    result = await ctx.volumes.set_dangling(request.volume, dangling, request.reason, source="ioctl")
    return bytes(DanglingReply.build(result.to_wire()))


async def reclaim(ctx: Context, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
    request = ReclaimRequest.parse(payload)
    mode = ReclaimMode(request.mode)
    log.info("control: reclaim %s for %s (%s) by pid=%d uid=%d",
             request.volume, request.owner, mode.name.lower(), peer.pid, peer.uid)
    owner = await ctx.volumes.resolve_owner(request.owner, pid=0)
    report = await ctx.volumes.reclaim(request.volume, owner, mode, source="ioctl")
    return json.dumps(report.to_dict()).encode()


async def bind(ctx: Context, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
    request = BindRequest.parse(payload)
    ctx.volumes.get(request.volume)  # an unknown volume is refused before the engine is asked
    owner = await ctx.volumes.resolve_owner(request.container, pid=request.pid)
    await ctx.volumes.bind(request.volume, owner)
    log.info("control: %s bound to %s (name %s, pid %d) by pid=%d uid=%d", request.volume,
             owner.container, owner.name or "-", owner.pid, peer.pid, peer.uid)
    return json.dumps({"volume": request.volume, **owner_fields(owner)}).encode()


def _set_ids(array: Any, what: str) -> tuple[int, ...]:
    """A VOLUME_SET id list: the ids before the first -1, and only -1 after it."""
    values = [int(value) for value in array]
    count = values.index(NO_SET_ID) if NO_SET_ID in values else len(values)
    ids, rest = tuple(values[:count]), values[count:]
    if any(value != NO_SET_ID for value in rest) or any(value < 0 for value in ids):
        raise InvalidRequest(f"{what}: ids are 0 or more, and -1 only after the last one")
    return ids


def _set_enum(kind: type[TtlAction] | type[ReadPolicy] | type[RingFullPolicy], value: int, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise InvalidRequest(f"{what} {value} is not one of "
                             f"{', '.join(f'{m.value} ({m.name.lower()})' for m in kind)}") from None


async def volume_set(ctx: Context, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
    request = VolumeSetRequest.parse(payload)
    mask = request.mask
    if mask & ~SET_ALL:
        raise InvalidRequest(f"unknown VOLUME_SET mask bits {mask & ~SET_ALL:#x}")
    if not mask:
        raise InvalidRequest("VOLUME_SET with an empty mask: nothing to change")
    if mask & SET_OWNER and mask & CLEAR_OWNER:
        raise InvalidRequest("SET_OWNER and CLEAR_OWNER together: set an owner or clear it")
    ctx.volumes.get(request.volume)  # an unknown volume is refused before the engine is asked
    owner = None
    if mask & SET_OWNER:
        owner = owner_fields(await ctx.volumes.resolve_owner(request.owner, pid=request.owner_pid))
    elif mask & CLEAR_OWNER:
        owner = dict(NO_OWNER)
    def given(bit: int, value: Callable[[], Any]) -> Any:
        return value() if mask & bit else None

    try:
        change = SettingsChange(
            ttl_seconds=given(SET_TTL, lambda: request.ttl_seconds),
            ttl_action=given(SET_TTL_ACTION, lambda: _set_enum(TtlAction, request.ttl_action, "ttl_action")),
            read_policy=given(SET_READ_POLICY,
                              lambda: _set_enum(ReadPolicy, request.read_policy, "read_policy")),
            ring_full_policy=given(SET_RING_FULL_POLICY, lambda: _set_enum(
                RingFullPolicy, request.ring_full_policy, "ring_full_policy")),
            allowed_uids=given(SET_ALLOWED_UIDS, lambda: _set_ids(request.allowed_uids, "allowed_uids")),
            allowed_gids=given(SET_ALLOWED_GIDS, lambda: _set_ids(request.allowed_gids, "allowed_gids")),
            owner=owner,
        )
    except SettingsError as exc:
        raise InvalidRequest(str(exc)) from None
    result = await ctx.volumes.update_settings(request.volume, change, source="control")
    log.info("control: settings of %s changed by pid=%d uid=%d: %s (generation %d)", request.volume,
             peer.pid, peer.uid, "; ".join(f"{field} {old!r} → {new!r}" for field, (old, new)
                                           in result.changed.items()) or "nothing changed",
             result.generation)
    return json.dumps(result.to_dict()).encode()


async def ring(ctx: Context, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
    request = RingRequest.parse(payload)
    op = RingOp(request.op)
    result: dict[str, Any]
    if op in (RingOp.LIST, RingOp.DUMP):
        result = await ctx.volumes.ring_listing(request.volume, with_payload=op == RingOp.DUMP)
    elif op == RingOp.REPLAY:
        result = {"replayed": await ctx.volumes.ring_replay(request.volume)}
    else:
        result = {"discarded": await ctx.volumes.ring_discard(request.volume)}
    log.info("control: ring %s %s by pid=%d uid=%d", request.volume, op.name.lower(), peer.pid, peer.uid)
    return json.dumps(result).encode()


async def delete(ctx: Context, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
    request = VolumeRequest.parse(payload)
    force = bool(request.flags & DELETE_FORCE)
    result = await ctx.volumes.delete(request.volume, why="deleted by the administrator", force=force)
    log.warning("control: delete %s by pid=%d uid=%d", request.volume, peer.pid, peer.uid)
    return json.dumps(result.to_dict()).encode()


async def alerts(ctx: Context, payload: bytes, peer: PeerCredentials, send: Send) -> bytes | None:
    request = AlertsRequest.parse(payload)
    backlog = ctx.alerts.history(request.since_seq)
    await send("".join(json.dumps(a.to_dict()) + "\n" for a in backlog).encode())
    if not request.flags & ALERTS_FOLLOW:
        return None
    queue = ctx.alerts.subscribe()
    log.info("control: alert subscriber pid=%d uid=%d", peer.pid, peer.uid)
    try:
        while True:
            try:
                alert = await asyncio.wait_for(queue.get(), ALERT_KEEPALIVE_S)
            except TimeoutError:
                await send(b"")  # keepalive: finds subscribers that went away
                continue
            await send((json.dumps(alert.to_dict()) + "\n").encode())
    except ConnectionError:
        # The normal end of a follow: the client was interrupted or killed.
        log.info("control: alert subscriber pid=%d left", peer.pid)
        return None
    finally:
        ctx.alerts.unsubscribe(queue)


async def meta(ctx: Context, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
    request = MetaRequest.parse(payload)
    value = payload[MetaRequest.sizeof():]
    if len(value) != request.value_len:
        raise InvalidRequest(f"META says {request.value_len} value bytes, sent {len(value)}")
    store = ctx.metadata
    if request.vm != store.vm:
        raise VhostPvError(errno.ENOENT, f"this daemon serves the metadata of VM {store.vm!r}, "
                           f"not {request.vm!r}")
    op = MetaOp(request.op)
    try:
        if op == MetaOp.SET:
            store.set(request.key, value.decode())
            # The key, never the value: secrets must not reach the log.
            log.info("control: meta set %s %s by pid=%d uid=%d",
                     store.vm, request.key, peer.pid, peer.uid)
            result: dict[str, Any] = {"vm": store.vm, "key": request.key, "set": True}
        elif op == MetaOp.REMOVE:
            removed = store.remove(request.key)
            log.info("control: meta rm %s %s by pid=%d uid=%d", store.vm, request.key, peer.pid, peer.uid)
            result = {"vm": store.vm, "key": request.key, "removed": removed}
        elif op == MetaOp.GET:
            node = store.lookup(request.key)
            result = {"vm": store.vm, "key": request.key, "value": node}
        elif op == MetaOp.LIST:
            result = {"vm": store.vm, "key": request.key, "keys": store.keys(request.key)}
        else:
            store.new_boot()
            log.info("control: new boot of VM %s: boot token renewed by pid=%d", store.vm, peer.pid)
            result = {"vm": store.vm, "boot": True}
    except MetadataError as exc:
        code = {404: errno.ENOENT, 413: errno.EFBIG}.get(exc.status, errno.EINVAL)
        raise VhostPvError(code, str(exc)) from None
    except UnicodeDecodeError:
        raise InvalidRequest("metadata values are UTF-8 text") from None
    return json.dumps(result).encode()


def table(ctx: Context) -> dict[Command, Handler]:
    """Every command the control socket serves, bound to ctx."""
    commands = {
        Command.STATUS: status,
        Command.PERSISTENT_DISK_DANGLING: dangling,
        Command.RECLAIM: reclaim,
        Command.RING: ring,
        Command.DELETE: delete,
        Command.ALERTS: alerts,
        Command.BIND: bind,
        Command.META: meta,
        Command.VOLUME_SET: volume_set,
    }
    return {command: functools.partial(handler, ctx) for command, handler in commands.items()}
