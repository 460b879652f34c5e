"""Where log records go, decided once at start (vhost_pv.cli.main calls configure()).

- Under systemd (JOURNAL_STREAM names our stderr, systemd.exec(5)): straight to the journal
  over its native protocol, one datagram per record with MESSAGE, PRIORITY (mapped from the
  level), SYSLOG_IDENTIFIER, CODE_FILE/CODE_LINE/CODE_FUNC, LOGGER, and the structured fields
  the daemon knows (VOLUME=, SOURCE=, REASON=, QUEUE= from a record's `extra=`): `journalctl
  VOLUME=vol0` then finds every line about a volume. If the journal socket is not there
  (a container, an old journald), stderr lines with sd-daemon(3) `<N>` priority prefixes.
  No timestamps either way: the journal stamps every entry itself.
- Anywhere else: plain text with timestamps on stderr.

Written here rather than taken from python-systemd's JournalHandler: that binding needs
libsystemd headers at build time, and the protocol is a few lines (systemd.journal-fields(7),
"Native Journal Protocol" in systemd's documentation).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
from typing import TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "vhost-pv"

# Record attributes (set with `extra=`) that become journal fields of the same name, upper case.
STRUCTURED = ("volume", "source", "reason", "queue")


def priority(level: int) -> int:
    """syslog priority of a logging level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """JOURNAL_STREAM ("device:inode") names the stream's file: systemd connected it to the
    journal. A child whose stderr was redirected elsewhere inherits the variable but not the
    match, so it logs plain text."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (int(device), int(inode)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


def _field(key: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        # Binary form: the name, a newline, the length (64-bit little endian), the value.
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """Records as native journal entries (datagrams on the journal socket)."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatter_or_default().formatException(record.exc_info)
        fields = [
            ("MESSAGE", message),
            ("PRIORITY", str(priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", self.identifier),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
        ]
        for name in STRUCTURED:
            value = getattr(record, name, None)
            if value is not None and value != "":
                fields.append((name.upper(), str(value)))
        return fields

    def formatter_or_default(self) -> logging.Formatter:
        return self.formatter or logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = b"".join(_field(k, v) for k, v in self.fields(record))
            try:
                self._sock.sendto(payload, self.path)
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:  # too big for a datagram: send it as a memfd
                    raise
                self._send_memfd(payload)
        except Exception:
            self.handleError(record)

    def _send_memfd(self, payload: bytes) -> None:
        """What sd_journal_send does for a large entry: the payload in a sealed memfd."""
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            # sendmsg, not socket.send_fds: Python 3.11's drops the address.
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))],
                               0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        super().close()


class PrefixFormatter(logging.Formatter):
    """`<N>logger: message` lines for a stderr the journal reads (sd-daemon(3)): each line of
    a multi-line message gets the prefix, or journald would log the rest at the default."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_OURS = "_vhost_pv_logsetup"
"""Marks the handler configure() installed."""


def configure(level: int, *, stream: TextIO | None = None, journal_socket: str = JOURNAL_SOCKET) -> str:
    """Set up the root logger; returns which way was chosen ("journal", "prefixed", "plain",
    or "inherited" when the root already has handlers of someone else's)."""
    stream = stream or sys.stderr
    root = logging.getLogger()
    # Only a handler this function installed is replaced. Handlers someone else put on the
    # root (a program embedding the CLI, pytest's capture) are theirs: as logging.basicConfig
    # does, the root is then left as it is, but for the level.
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.setLevel(level)
    if root.handlers:
        return "inherited"
    chosen = "plain"
    handler: logging.Handler
    if stderr_is_journal(stream):
        if os.path.exists(journal_socket):
            handler = JournalHandler(journal_socket)
            chosen = "journal"
        else:
            handler = logging.StreamHandler(stream)
            handler.setFormatter(PrefixFormatter("%(name)s: %(message)s"))
            chosen = "prefixed"
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    return chosen
