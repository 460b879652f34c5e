"""argparse types shared by the commands: each refuses a bad value with a one-line reason.

Nothing here loads the C data path: `vhost-pv status` must stay a small client.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from vhost_pv.volume.header import MAX_ALLOWED_IDS, ReadPolicy, RingFullPolicy, TtlAction

MAX_SIZE = 1 << 60
"""Sizes beyond an exbibyte are a typo, and offsets past 2**63 do not fit the file API."""
MAX_ID = (1 << 31) - 1
PID_MAX = 1 << 22
"""The kernel's PID_MAX_LIMIT: no pid is larger."""
MAX_TTL = ((1 << 63) - 1) // 1_000_000_000
"""TTL seconds that still fit a signed 64-bit nanosecond count."""


def size(text: str) -> int:
    """An argparse type: a size such as 4096, 4k, 16M or 1G, at most 1 EiB."""
    # parse_size lives beside the volume code, which loads the C data path: import it only
    # when a command with a size option is actually parsed.
    from vhost_pv.volume.volume import parse_size

    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text}: larger than the 1 EiB maximum")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], with the range in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}..{high}")
        return value

    return parse


def integer(text: str) -> int:
    """An argparse type: an integer (its range is checked elsewhere)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def number(text: str) -> float:
    """An argparse type: a number (its range is checked elsewhere)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number of seconds")
    return value


def text(limit: int, what: str) -> Callable[[str], str]:
    """An argparse type: valid UTF-8 (argv may hold any bytes) of at most `limit` bytes.

    The wire and the header have fixed-size fields; the limit is in bytes, so a reason that
    fits in characters but not in bytes is refused here, never cut inside a character."""

    def parse(value: str) -> str:
        try:
            length = len(value.encode())
        except UnicodeEncodeError:
            raise argparse.ArgumentTypeError(f"{what} is not valid UTF-8") from None
        if length > limit:
            raise argparse.ArgumentTypeError(f"{what} is {length} bytes of UTF-8, at most {limit} fit")
        return value

    return parse


def ids(value: str) -> tuple[int, ...]:
    """An argparse type: a comma-separated list of uids or gids that fits the header."""
    try:
        parsed = tuple(int(part) for part in value.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ids: {value!r}") from None
    if len(parsed) > MAX_ALLOWED_IDS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_ALLOWED_IDS} ids fit in the header, got {len(parsed)}")
    for one in parsed:
        if not 0 <= one <= MAX_ID:
            raise argparse.ArgumentTypeError(f"id {one} is out of range 0..{MAX_ID}")
    return parsed


def http_url(value: str) -> str:
    """An argparse type: an http:// or https:// URL (valid UTF-8)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the URL is not valid UTF-8") from None
    if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"{value}: expected an http:// or https:// URL")
    return value


def host_port(value: str) -> tuple[str, int]:
    """An argparse type: HOST:PORT with a port in 0..65535 (0: any free port, for serving)."""
    host, _, port = value.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value}: expected HOST:PORT, e.g. 127.0.0.1:8169") from None
    if not 0 <= port_number <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: port must be 0..65535")
    return host.strip("[]") or "127.0.0.1", port_number


def socket_path(value: str) -> Path:
    """An argparse type: a path that fits a unix socket address (108 bytes)."""
    try:
        length = len(os.fsencode(value))
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a usable path") from None
    if length >= 108:
        raise argparse.ArgumentTypeError(f"{length} bytes: a unix socket path must be shorter than 108")
    return Path(value)


def choices(kind: type[ReadPolicy] | type[RingFullPolicy] | type[TtlAction]) -> list[str]:
    """The command-line spelling of a header enum's members."""
    return [member.name.lower() for member in kind]


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def ttl(text: str) -> int:
    """An argparse type: a time limit in whole seconds, as 3600, 90s, 15m, 1h or 2d (0: none),
    in the range `vhost-pv create --ttl` accepts (0..MAX_TTL)."""
    value = text.strip().lower()
    unit = _TTL_UNITS.get(value[-1:], 0) if value else 0
    digits = value[:-1] if unit else value
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(
            f"not a time limit: {text!r} (use e.g. 3600, 90s, 15m, 1h, 2d; 0: none)")
    seconds = int(digits) * (unit or 1)
    if seconds > MAX_TTL:
        raise argparse.ArgumentTypeError(f"{text}: more than the {MAX_TTL} s maximum")
    return seconds
