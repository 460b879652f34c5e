"""Numbers and commands as an administrator reads them: durations, byte counts, and what to
run about a dangling volume. Standard library only, so the guard (alert texts) and the CLI
(status, ls) share one wording without the guard importing the CLI."""

from __future__ import annotations

import re
import shlex

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '1G', '4096' -> bytes (binary units). Here, not beside the volume code (which
    loads the C data path), so that a control client (`vhost-pv add --create`) can take sizes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 4G)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def duration(seconds: float) -> str:
    """A duration in the two largest units that matter: "45s", "3m12s", "2h05m", "3d04h".

    Rounded down to whole seconds (a countdown never shows more time than is left); negative
    durations (a deadline already passed) show as "0s"."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def size(count: int) -> str:
    """A byte count in binary units: "512 B", "1.2 MiB", "16 MiB" (no ".0" on whole numbers)."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        # Compare what will be printed: 1048575 bytes is "1 MiB", not "1024 KiB".
        if round(value, 1) < 1024 or unit == "TiB":
            break
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return f"{text} {unit}"


def suggested_commands(control: object, volume: str) -> list[str]:
    """What an administrator runs about a dangling volume: give it to a new owner (its
    quarantined writes applied), or delete it. The daemon's alerts carry the same lines."""
    where = shlex.quote(str(control))
    name = shlex.quote(volume)
    return [f"vhost-pv reclaim --control {where} {name} --owner NEW_OWNER --replay",
            f"vhost-pv delete --control {where} {name}"]
