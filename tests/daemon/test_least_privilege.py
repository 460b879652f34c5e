"""`vhost-pv serve` as the service unit runs it: an unprivileged uid with no capability but
CAP_NET_ADMIN (setpriv, as AmbientCapabilities=/CapabilityBoundingSet= set it up), on volume
files and directories it owns. It serves I/O to a frontend and follows an owner's exit through
--proc-events. Without CAP_NET_ADMIN, --proc-events is refused with a clear message where
the kernel requires the capability (Linux < 6.6); on newer kernels (this host) the process
connector is open to every uid, and the daemon needs no capability at all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.attach import Guest, pattern
from support.daemon_status import volume_entry, wait_until
from support.nobody import NOBODY, python_for_nobody

from vhost_pv.control import client
from vhost_pv.guard.containers import ProcessWatcher
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerError, ServerProcess

MiB = 1 << 20
UID = GID = NOBODY  # nobody / nogroup
CAP_NET_ADMIN = 12


# MemoryDenyWriteExecute=yes as the kernel enforces it itself (PR_SET_MDWE, Linux 6.3): from
# then on no mapping may be writable and executable, nor become executable. Set first thing
# in the interpreter, before the daemon and everything it loads (numpy, cffi's module, uvloop,
# pyroute2), which then runs as `python -m vhost_pv.cli` would.
_MDWE = (
    "import ctypes, os, runpy, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:\n"  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    "    sys.exit(f'PR_SET_MDWE: {os.strerror(ctypes.get_errno())}')\n"
)
_DENY_WRITE_EXECUTE = _MDWE + (
    "sys.argv = sys.argv[3:]\n"  # [python, -m, vhost_pv.cli] dropped; run_module sets argv[0]
    "runpy.run_module('vhost_pv.cli', run_name='__main__', alter_sys=True)\n"
)


# The interpreter the unprivileged daemon runs, and its environment (support.nobody: the
# checkout is bind-mounted where that uid can reach it if need be); set by `home`.
_python: list[str] = []
_env: dict[str, str] = {}


def _setpriv(*caps: str) -> list[str]:
    """The unit's User=, AmbientCapabilities=, CapabilityBoundingSet=, NoNewPrivileges= and
    MemoryDenyWriteExecute=, without systemd."""
    wanted = ",".join(["-all", *(f"+{cap}" for cap in caps)])
    return ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", f"--inh-caps={wanted}",
            f"--ambient-caps={wanted}", f"--bounding-set={wanted}", "--no-new-privs",
            *_python, "-c", _DENY_WRITE_EXECUTE]


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory the unprivileged uid owns (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="vhost-pv-lp-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        for sub in ("run", "run/sockets", "volumes"):
            (path / sub).mkdir(exist_ok=True)
        for entry in (path / "run", path / "run/sockets", path / "volumes"):
            os.chown(entry, UID, GID)
        with python_for_nobody() as (python, env):
            monkeypatch.setattr(sys.modules[__name__], "_python", [python])
            monkeypatch.setattr(sys.modules[__name__], "_env", env)
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _volume(home: Path, name: str) -> Path:
    path = home / "volumes" / f"{name}.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB))
    os.chown(path, UID, GID)
    return path


def _capabilities(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs"):
            fields[key] = int(value.split()[0], 16 if key.startswith("Cap") else 10)
    return fields


@contextlib.contextmanager
def _owner() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for a container's init."""
    process = subprocess.Popen(["sleep", "1000"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _kernel_at_least(major: int, minor: int) -> bool:
    numbers = platform.release().split("-")[0].split(".")
    return (int(numbers[0]), int(numbers[1])) >= (major, minor)


def _serve_and_follow(home: Path, caps: tuple[str, ...]) -> dict[str, int]:
    """Serve a volume under setpriv with caps, do O_DIRECT I/O through the io_uring, flip it
    through a process event; returns the daemon's uid and capability sets as the kernel shows them."""
    volume = _volume(home, "vol0")
    with _owner() as owner, ServerProcess([volume], home / "run", prefix=_setpriv(*caps), env=_env,
                                          extra_args=["--proc-events", "--direct"]) as server:
        seen = _capabilities(server.pid)
        guest = Guest(server.socket_for(volume))
        try:
            for index in range(8):
                guest.round_trip(index * 8, pattern(4096, index))
        finally:
            guest.close()
        # O_DIRECT reads went through the io_uring, unprivileged.
        totals = volume_entry(server.control, "vol0")["totals"]
        assert totals["async_ios"] >= 8 and totals["io_errors"] == 0, totals
        assert totals["direct_fallbacks"] == 0, totals
        client.bind(server.control, "vol0", "owner", pid=owner.pid)
        os.kill(owner.pid, signal.SIGKILL)
        wait_until(lambda: volume_entry(server.control, "vol0")["header"]["dangling"], 10.0,
                   "the flip by process event", server.log)
        header = volume_entry(server.control, "vol0")["header"]
        assert (header["reason"], header["dangling_source"]) == ("container-crashed", "proc-events")
        assert "Traceback" not in server.log()
    return seen


@pytest.mark.timeout(60)
def test_serves_unprivileged_with_only_net_admin(home: Path) -> None:
    seen = _serve_and_follow(home, ("net_admin",))
    assert seen["Uid"] == UID and seen["NoNewPrivs"] == 1
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert seen[key] == 1 << CAP_NET_ADMIN, (key, hex(seen[key]))


def test_the_write_execute_denial_holds() -> None:
    """What the daemon ran under above refuses a writable and executable mapping (so the
    daemon serving under it shows that it needs none)."""
    probe = _MDWE + (
        "import mmap\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "except PermissionError:\n"
        "    sys.exit(0)\n"
        "sys.exit('a W+X mapping was allowed')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(60)
def test_proc_events_without_net_admin(home: Path) -> None:
    if _kernel_at_least(6, 6):
        # "connector/cn_proc: Allow non-root users access" (Linux 6.6): no capability needed.
        seen = _serve_and_follow(home, ())
        assert seen["CapEff"] == 0 and seen["CapBnd"] == 0
        return
    volume = _volume(home, "vol0")
    server = ServerProcess([volume], home / "run", prefix=_setpriv(), env=_env,
                           extra_args=["--proc-events"])
    with pytest.raises(ServerError, match="exited with 1"):
        server.start()
    assert "--proc-events: the kernel refused the process connector" in server.log()
    assert "CAP_NET_ADMIN" in server.log()


def test_refused_process_connector_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """The message a kernel before 6.6 gets (its EPERM stood in for here)."""
    from vhost_pv.guard import procevents

    async def refused() -> procevents.ProcessExitSocket:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(procevents, "open_exit_socket", refused)

    class NoVolumes:
        def owned_volumes(self) -> list[object]:
            return []

    watcher = ProcessWatcher(NoVolumes())  # type: ignore[arg-type]
    with pytest.raises(PermissionError) as caught:
        asyncio.run(watcher.start())
    assert caught.value.filename == "--proc-events"
    assert "needs CAP_NET_ADMIN" in str(caught.value.strerror)
