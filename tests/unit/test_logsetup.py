"""Logging fit for journald (vhost_pv/logsetup.py): with JOURNAL_STREAM naming stderr, records
go to the journal socket (a real datagram socket stands in for it) as native entries with
MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_* and the daemon's structured fields; without the
socket, `<N>`-prefixed lines without timestamps; anywhere else plain lines with timestamps."""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from vhost_pv import logsetup


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if getattr(h, logsetup._OURS, False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def _bare_root() -> None:
    """The root as a fresh process has it: no handlers. pytest adds its capture handlers at
    the start of each test phase (and removes them at its end), so this runs in the test."""
    logging.getLogger().handlers = []


@pytest.fixture
def stderr_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TextIO]:
    """A file standing in for stderr, with JOURNAL_STREAM naming it as systemd does."""
    with open(tmp_path / "stderr", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        yield stream


def _parse(datagram: bytes) -> dict[str, str]:
    """The native protocol: KEY=value lines, or KEY\\n<u64 le length><value>\\n."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line_end = rest.index(b"\n")
        line = rest[:line_end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            rest = rest[line_end + 1:]
        else:
            key = line
            (length,) = struct.unpack("<Q", rest[line_end + 1:line_end + 9])
            value = rest[line_end + 9:line_end + 9 + length]
            assert rest[line_end + 9 + length:line_end + 10 + length] == b"\n"
            rest = rest[line_end + 10 + length:]
        fields[key.decode()] = value.decode()
    return fields


def test_journal_native_protocol(tmp_path: Path, stderr_file: TextIO) -> None:
    journal = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(journal))
        listener.settimeout(5)
        _bare_root()
        assert logsetup.configure(logging.INFO, stream=stderr_file, journal_socket=str(journal)) == "journal"
        log = logging.getLogger("vhost_pv.daemon")
        log.warning("%s: now DANGLING by %s", "vol0", "engine",
                    extra={"volume": "vol0", "source": "engine", "reason": "container-deleted"})
        entry = _parse(listener.recv(65536))
        assert entry["MESSAGE"] == "vol0: now DANGLING by engine"
        assert entry["PRIORITY"] == "4"
        assert entry["SYSLOG_IDENTIFIER"] == "vhost-pv"
        assert entry["LOGGER"] == "vhost_pv.daemon"
        assert entry["CODE_FILE"] == __file__
        assert entry["CODE_LINE"] == str(_line_of('log.warning("%s: now DANGLING by'))
        assert entry["CODE_FUNC"] == "test_journal_native_protocol"
        assert (entry["VOLUME"], entry["SOURCE"], entry["REASON"]) == ("vol0", "engine", "container-deleted")

        log.debug("not at INFO")
        log.error("no extra fields")
        entry = _parse(listener.recv(65536))
        assert entry["MESSAGE"] == "no extra fields" and entry["PRIORITY"] == "3"
        assert not {"VOLUME", "SOURCE", "REASON"} & entry.keys()

        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it broke")
        entry = _parse(listener.recv(65536))
        # A multi-line value goes in the binary form and arrives whole.
        assert entry["MESSAGE"].startswith("it broke\nTraceback") and "RuntimeError: boom" in entry["MESSAGE"]

        logging.getLogger("vhost_pv.x").info("huge " + "x" * 300_000)  # more than a datagram holds
        data, ancillary, _, _ = listener.recvmsg(0, socket.CMSG_SPACE(4))
        fd = int.from_bytes(ancillary[0][2][:4], "little")
        with os.fdopen(fd, "rb") as memfd:  # journald maps it: read it from the start
            memfd.seek(0)
            entry = _parse(memfd.read())
        assert entry["MESSAGE"] == "huge " + "x" * 300_000 and entry["PRIORITY"] == "6"
    stderr_file.seek(0)
    assert stderr_file.read() == ""  # nothing doubled on stderr


def _line_of(text: str) -> int:
    """The line number of the first line of this file containing text."""
    for number, line in enumerate(Path(__file__).read_text().splitlines(), 1):
        if text in line:
            return number
    raise AssertionError(text)


def test_prefixed_lines_without_the_journal_socket(tmp_path: Path, stderr_file: TextIO) -> None:
    _bare_root()
    assert logsetup.configure(logging.DEBUG, stream=stderr_file,
                              journal_socket=str(tmp_path / "absent")) == "prefixed"
    log = logging.getLogger("vhost_pv.daemon")
    log.info("serving vol0")
    log.warning("vol0: now DANGLING")
    log.error("two\nlines")
    log.critical("down")
    log.debug("details")
    stderr_file.seek(0)
    assert stderr_file.read().splitlines() == [
        "<6>vhost_pv.daemon: serving vol0",
        "<4>vhost_pv.daemon: vol0: now DANGLING",
        "<3>vhost_pv.daemon: two",
        "<3>lines",
        "<2>vhost_pv.daemon: down",
        "<7>vhost_pv.daemon: details",
    ]


def test_plain_text_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JOURNAL_STREAM inherited by a process whose stderr goes elsewhere: plain lines."""
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    with open(tmp_path / "stderr", "w+") as stream:
        _bare_root()
        assert logsetup.configure(logging.INFO, stream=stream, journal_socket=str(tmp_path)) == "plain"
        logging.getLogger("vhost_pv.daemon").warning("vol0: now DANGLING")
        stream.seek(0)
        line = stream.read().strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING vhost_pv.daemon: vol0: now DANGLING",
                        line)
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logsetup.stderr_is_journal()


def test_someone_elses_handlers_are_left_alone(tmp_path: Path) -> None:
    """A program embedding the CLI (or pytest) configured logging: configure() leaves its
    handlers in place and adds none (as logging.basicConfig does); its own handler from an
    earlier call is replaced, not doubled."""
    with open(tmp_path / "a", "w+") as first, open(tmp_path / "b", "w+") as second:
        _bare_root()
        assert logsetup.configure(logging.INFO, stream=first) == "plain"
        assert logsetup.configure(logging.INFO, stream=second) == "plain"
        root = logging.getLogger()
        assert len(root.handlers) == 1
        theirs = logging.StreamHandler(first)
        root.addHandler(theirs)
        root.removeHandler(root.handlers[0])
        assert logsetup.configure(logging.DEBUG, stream=second) == "inherited"
        assert root.handlers == [theirs] and root.level == logging.DEBUG
