"""What the commands print: the one-line errors on stderr, and results as text or JSON.

Every failing command prints exactly one "vhost-pv: ..." line; results go to stdout, as
indented JSON with --json and as short aligned text otherwise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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


def status(state: Mapping[str, Any], *, use_json: bool) -> None:
    """A daemon's status reply: its volumes, their frontends and queues."""
    if use_json:
        as_json(state)
        return
    print(f"daemon pid {state['pid']}")
    for failure in state.get("failed", []):
        print(f"  not served: {failure['path']}: {failure['error']}")
    for volume in state["volumes"]:
        header = volume["header"]
        print(f"  {volume['name']}: {header['capacity'] >> 20} MiB, state {header['state']}, "
              f"socket {volume['socket']}")
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
