"""`vhost-pv serve` started the way systemd starts it, stderr connected to the journal
(JOURNAL_STREAM naming it) but no journal socket at /run/systemd/journal/socket here: every
line carries its sd-daemon(3) priority prefix and no timestamp (the journal stamps entries
itself). The native protocol is tested against a stand-in socket in tests/unit/test_logsetup.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

from vhost_pv.control import client
from vhost_pv.logsetup import JOURNAL_SOCKET
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20


def test_prefixed_lines_under_the_journal(tmp_path: Path) -> None:
    assert not os.path.exists(JOURNAL_SOCKET), "this test expects no journald on the host"
    volume = tmp_path / "vol0.img"
    create_volume(volume, CreateOptions(size=4 * MiB, ring_size=MiB))
    server = ServerProcess([volume], tmp_path / "run")
    server.log_path.parent.mkdir()
    server.log_path.touch()
    st = os.stat(server.log_path)
    server.env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with server:
        client.persistent_disk_dangling(server.control, "vol0", reason="container-deleted")
        server.wait_log(r"now DANGLING")
    lines = server.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>vhost_pv.daemon: serving ") for line in lines), lines
    flip = "<4>vhost_pv.daemon: vol0: now DANGLING by ioctl (container-deleted)"
    assert any(line.startswith(flip) for line in lines), lines
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), "timestamps in journal lines"
