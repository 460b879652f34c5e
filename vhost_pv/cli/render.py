"""What the commands print: the one-line errors on stderr, and results as text or JSON.

Every failing command prints exactly one "vhost-pv: ..." line; results go to stdout, as
indented JSON with --json and as short aligned text otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vhost_pv.humanize import duration, size, suggested_commands

NS_PER_S = 1_000_000_000


def error(message: str) -> None:
    """The one line a failing command prints: "vhost-pv: ..." on stderr."""
    print("vhost-pv: " + " ".join(str(message).splitlines()), file=sys.stderr)


def os_error(exc: OSError, path: object = None) -> str:
    """"PATH: reason" without Python's "[Errno N]" decoration."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where is not None else reason


def as_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def mapping(result: Mapping[str, Any], *, use_json: bool) -> None:
    """A control reply: JSON, or one "key: value" line per field (nested values as JSON)."""
    if use_json:
        as_json(result)
        return
    for key, value in result.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")


def table(info: Mapping[str, Any], *, use_json: bool) -> None:
    """A flat record (a volume header): JSON, or "key  value" lines aligned on the keys."""
    if use_json:
        as_json(info)
        return
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


def alert(item: Mapping[str, Any], *, use_json: bool) -> None:
    """One alert, flushed at once: `alerts --follow` is read live."""
    if use_json:
        print(json.dumps(item), flush=True)
    else:
        print(f"#{item['seq']} {item['severity'].upper():8} {item['kind']:16} "
              f"{item['volume']}: {item['message']}", flush=True)


def ring(path: Path, info: Mapping[str, Any], *, use_json: bool) -> None:
    """A quarantine ring read from its file: its counters, chain check and records."""
    if use_json:
        as_json(info)
        return
    verify = info["verify"]
    print(f"{path}: {info['records']} records, {info['bytes_used']} of {info['area_size']} bytes, "
          f"{info['dropped']} dropped, {info['rejected']} rejected; chain "
          f"{'intact' if verify['ok'] else 'BROKEN: ' + '; '.join(verify['problems'])}")
    for record in info["entries"]:
        print(f"  #{record['seq']:<6} {record['type']:<12} sector {record['sector']:<10} "
              f"{record['length']:>8} bytes  q{record['queue']} conn {record['source']}  "
              f"sha256 {record['payload_sha256'][:16]}")


def dangling_age(header: Mapping[str, Any], now_ns: int) -> str:
    """How long a volume has been dangling ("3m12s"); "-" when it is not."""
    if not header["dangling"]:
        return "-"
    return duration((now_ns - header["dangling_since_ns"]) / NS_PER_S)


def ring_use(ring_stats: Mapping[str, Any]) -> str:
    """"1.2 MiB of 16 MiB, 42 records" of the quarantine ring."""
    records = ring_stats["records"]
    return (f"{size(ring_stats['bytes_used'])} of {size(ring_stats['area_size'])}, "
            f"{records} record{'' if records == 1 else 's'}")


def ttl_left(volume: Mapping[str, Any], now_ns: int) -> str:
    """What the time limit will do and when: "deletes in 9m48s", "alert in 9m48s", "no time
    limit", or for a volume not dangling what it would be ("deletes 10m after dangling")."""
    header = volume["header"]
    ttl = header["ttl_seconds"]
    if not ttl:
        return "no time limit"
    deletes = header["ttl_action"] == "delete"
    if not header["dangling"]:
        return f"{'deletes' if deletes else 'alert'} {duration(ttl)} after dangling"
    guard = volume.get("guard") or {}
    # The guard sets its deadline once the data is sealed; until then it is the header's.
    deadline = guard.get("ttl_deadline_ns") or header["dangling_since_ns"] + ttl * NS_PER_S
    if guard.get("ttl_expired"):
        passed = duration((now_ns - deadline) / NS_PER_S)
        return f"time limit passed {passed} ago ({'deleting' if deletes else 'alert sent'})"
    left = duration((deadline - now_ns) / NS_PER_S)
    return f"deletes in {left}" if deletes else f"alert in {left}"


def status(state: Mapping[str, Any], *, use_json: bool, control: object = None) -> None:
    """A daemon's status reply: its volumes, their frontends and queues; for a dangling volume
    how long, why, its ring, its time limit and the commands to settle it. Text shows times
    and sizes in human units only; --json keeps the raw values (nanoseconds, bytes)."""
    if use_json:
        as_json(state)
        return
    now_ns = time.time_ns()
    print(f"daemon pid {state['pid']}")
    served_set = state.get("served_set")
    if served_set:
        print(f"  served set kept in {served_set['file']} (served again after a restart)")
    if "seccomp" in state:   # the workers' system call filter (kill, log or off)
        print(f"  data-path seccomp filter: {state['seccomp']}")
    for failure in state.get("failed", []):
        print(f"  not served: {failure['path']}: {failure['error']}")
    for volume in state["volumes"]:
        header = volume["header"]
        print(f"  {volume['name']}: {size(header['capacity'])}, state {header['state']}, "
              f"socket {volume['socket']}")
        if header["dangling"]:
            print(f"    dangling for {dangling_age(header, now_ns)}: "
                  f"{header['reason'] or 'no reason given'} (source: {header['dangling_source'] or '-'})")
            print(f"    ring {ring_use(volume['ring'])}; {ttl_left(volume, now_ns)}")
            commands = (volume.get("guard") or {}).get("suggested") or (
                suggested_commands(control, volume["name"]) if control is not None else [])
            for command in commands:
                print(f"    to {command.split()[1]}: {command}")
        binding = vm_binding(header)
        if binding:
            print(f"    bound to VM {binding}")
        connection = volume["connection"]
        if connection is None:
            print("    no frontend attached")
            continue
        print(f"    frontend {frontend_identity(connection)}, attached {attached_for(connection)}, "
              f"queues running {connection['queues_running']}")
        where = frontend_where(connection)
        if where:
            print(f"      {where}")
        for index, queue in enumerate(connection["queues"]):
            print(f"    q{index}: {queue['requests']} requests, {queue['reads']} reads, "
                  f"{queue['writes']} writes, {queue['io_errors']} errors, "
                  f"{queue['bad_requests']} bad, broken={bool(queue['broken'])}")


def volume_options(options: Mapping[str, Any] | None, *, read_only: bool = False) -> str:
    """A volume's own serving options, short: "q2,ro,direct" ("ro" also when its header is
    read-only); "-" from a daemon that does not report them."""
    if options is None:
        return "-"
    parts = [f"q{options['queues']}"]
    if options["read_only"] or read_only:
        parts.append("ro")
    if options["direct"]:
        parts.append("direct")
    return ",".join(parts)
def vm_binding(header: Mapping[str, Any]) -> str:
    """"name vm7, uuid ..., cgroup ..." of a volume's VM binding ("" when any VM may attach)."""
    parts = [f"{label} {header.get(key)}" for key, label in
             (("vm_name", "name"), ("vm_uuid", "uuid"), ("vm_cgroup", "cgroup")) if header.get(key)]
    return ", ".join(parts)


def frontend_identity(connection: Mapping[str, Any]) -> str:
    """Who is attached: "pid 4242 uid 107 gid 107, VM vm7 (uuid ...)"."""
    text = f"pid {connection['pid']} uid {connection['uid']} gid {connection.get('gid', '?')}"
    identity = connection.get("identity") or {}
    if identity.get("vm_name") or identity.get("vm_uuid"):
        vm = identity.get("vm_name") or "(no name)"
        text += f", VM {vm}" + (f" (uuid {identity['vm_uuid']})" if identity.get("vm_uuid") else "")
    return text


def frontend_where(connection: Mapping[str, Any]) -> str:
    """"cgroup /machine.slice/..., exe /usr/bin/qemu-system-x86_64" ("" when unknown)."""
    identity = connection.get("identity") or {}
    parts = [f"{key} {identity[key]}" for key in ("cgroup", "exe") if identity.get(key)]
    return ", ".join(parts)


def attached_for(connection: Mapping[str, Any]) -> str:
    """"3m12s ago" since the frontend attached."""
    since = connection.get("since")
    return f"{duration(max(0.0, time.time() - since))} ago" if since else "at an unknown time"


def frontend_cell(connection: Mapping[str, Any] | None) -> str:
    """`ls`'s FRONTEND column: "none", or who: "attached by vm7 pid 4242" / "attached by pid 4242"."""
    if connection is None:
        return "none"
    vm = (connection.get("identity") or {}).get("vm_name")
    return f"attached by {vm} pid {connection['pid']}" if vm else f"attached by pid {connection['pid']}"


def volume_list(state: Mapping[str, Any], *, use_json: bool) -> None:
    """`vhost-pv ls`: one line per served volume (name, state, dangling age, ring use, time
    limit, frontend); --json is the volumes part of the status, raw."""
    if use_json:
        as_json(state["volumes"])
        return
    now_ns = time.time_ns()
    rows = [("NAME", "STATE", "AGE", "RING", "TTL", "OPTIONS", "FRONTEND")]
    for volume in state["volumes"]:
        header = volume["header"]
        rows.append((volume["name"], header["state"], dangling_age(header, now_ns),
                     ring_use(volume["ring"]), ttl_left(volume, now_ns),
                     volume_options(volume.get("options"), read_only=volume.get("read_only", False)),
                     frontend_cell(volume["connection"])))
    for failure in state.get("failed", []):
        rows.append((Path(failure["path"]).stem, "failed", "-", "-", "-",
                     volume_options(failure.get("options")), failure["error"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(f"{cell:<{widths[i]}}" for i, cell in enumerate(row[:-1])) + "  " + row[-1])
