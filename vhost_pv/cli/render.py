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
        connection = volume["connection"]
        if connection is None:
            print("    no frontend attached")
            continue
        print(f"    frontend pid {connection['pid']} uid {connection['uid']}, "
              f"queues running {connection['queues_running']}")
        for index, queue in enumerate(connection["queues"]):
            print(f"    q{index}: {queue['requests']} requests, {queue['reads']} reads, "
                  f"{queue['writes']} writes, {queue['io_errors']} errors, "
                  f"{queue['bad_requests']} bad, broken={bool(queue['broken'])}")


def volume_list(state: Mapping[str, Any], *, use_json: bool) -> None:
    """`vhost-pv ls`: one line per served volume (name, state, dangling age, ring use, time
    limit, frontend); --json is the volumes part of the status, raw."""
    if use_json:
        as_json(state["volumes"])
        return
    now_ns = time.time_ns()
    rows = [("NAME", "STATE", "AGE", "RING", "TTL", "FRONTEND")]
    for volume in state["volumes"]:
        header = volume["header"]
        rows.append((volume["name"], header["state"], dangling_age(header, now_ns),
                     ring_use(volume["ring"]), ttl_left(volume, now_ns),
                     "attached" if volume["connection"] is not None else "none"))
    for failure in state.get("failed", []):
        rows.append((Path(failure["path"]).stem, "failed", "-", "-", "-", failure["error"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(f"{cell:<{widths[i]}}" for i, cell in enumerate(row[:-1])) + "  " + row[-1])
