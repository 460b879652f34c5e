"""A frontend process that looks like a VM's QEMU to the host: its command line carries
`-name guest=NAME` and `-uuid UUID` as QEMU's does (what vhost_pv.peer_identity reads from
/proc/PID/cmdline), and it can join a cgroup before it connects.

Run as `python -m support.fake_qemu SOCKET [-name guest=N] [-uuid U]`: it attaches to the
vhost-user socket (support.attach.Guest), writes and reads back one block, prints one JSON
line ({"attached": true} or {"attached": false, "error": ...}), then with --hold stays
attached until its stdin closes. VPV_JOIN_CGROUP=DIR in the environment: it first moves
itself into that cgroup (DIR/cgroup.procs), so the cgroup is set before the connect and the
command line stays as QEMU's would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
CGROUP_ROOT = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
    else Path("/sys/fs/cgroup")


def qemu_argv(name: str | None = None, vm_uuid: uuid.UUID | str | None = None) -> list[str]:
    """The QEMU-like options of the fake frontend's command line."""
    argv: list[str] = []
    if name is not None:
        argv += ["-name", f"guest={name},debug-threads=on"]
    if vm_uuid is not None:
        argv += ["-uuid", str(vm_uuid)]
    return argv


def start(socket_path: Path, *, name: str | None = None, vm_uuid: uuid.UUID | str | None = None,
          cgroup: Path | None = None, hold: bool = False,
          extra: Sequence[str] = ()) -> subprocess.Popen[str]:
    """Start the fake QEMU (see the module docstring); read its JSON line with result()."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    if cgroup is not None:
        env["VPV_JOIN_CGROUP"] = str(cgroup)
    argv = [sys.executable, "-m", "support.fake_qemu", str(socket_path), *qemu_argv(name, vm_uuid), *extra]
    if hold:
        argv.append("--hold")
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def result(process: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """The fake QEMU's JSON line (waits for it)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout)
        raise AssertionError(f"fake QEMU printed nothing: {process.stderr.read() if process.stderr else ''}")
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def run(socket_path: Path, **kwargs: Any) -> dict[str, Any]:
    """Attach, do one write and read, detach: the JSON result."""
    process = start(socket_path, **kwargs)
    try:
        outcome = result(process)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return outcome


@contextmanager
def cgroup(name: str) -> Iterator[Path]:
    """A fresh cgroup (unified hierarchy) for a fake QEMU to join; removed afterwards."""
    path = CGROUP_ROOT / name
    path.mkdir()
    try:
        yield path
    finally:
        # Its processes have exited by now (the caller waited for them).
        path.rmdir()


def cgroup_path(path: Path) -> str:
    """The cgroup path /proc/PID/cgroup shows for a cgroup directory."""
    return "/" + str(path.relative_to(CGROUP_ROOT))


def _main(argv: list[str]) -> int:
    join = os.environ.get("VPV_JOIN_CGROUP")
    if join:
        Path(join, "cgroup.procs").write_text(str(os.getpid()))
    from support.attach import Guest, pattern

    socket_path = Path(argv[0])
    try:
        guest = Guest(socket_path, timeout=10.0)
        guest.round_trip(0, pattern(4096, 7))
    except Exception as exc:  # the daemon closing the connection shows up as any of several
        print(json.dumps({"attached": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 0
    print(json.dumps({"attached": True}), flush=True)
    if "--hold" in argv:
        sys.stdin.read()
    guest.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
