"""Running this checkout's code as the unprivileged uid 65534 (nobody), for the tests that
check what a process without privileges may do: a client the control socket must refuse, a
daemon serving with only the unit's capabilities.

The checkout may be out of that uid's reach (a clone under /root, mode 0700): then it is
bind-mounted read-only under a directory anyone may enter, and imported from there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
# What the probe imports: the C data path too, so the whole package is within reach.
_PROBE = "import vhost_pv._native, vhost_pv.control.client"


def _imports(python: str, env: dict[str, str]) -> bool:
    try:
        probe = subprocess.run([python, "-c", _PROBE], user=NOBODY, group=NOBODY, extra_groups=[],
                               env=env, cwd="/", capture_output=True, timeout=60, check=False)
    except (PermissionError, FileNotFoundError):
        return False
    return probe.returncode == 0


def _found(root: Path) -> tuple[str, dict[str, str]] | None:
    """An interpreter uid 65534 can run with the checkout at root: the venv's, else the system
    python3 with the venv's site-packages on the path (the venv's may live below a directory
    only root can enter, e.g. /root/.pyenv)."""
    def moved(path: Path) -> Path:
        return root / path.relative_to(REPO) if path.is_relative_to(REPO) else path

    site = [str(moved(Path(p))) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(root), *site])}
    for python in (str(moved(Path(sys.executable))), "/usr/bin/python3"):
        if _imports(python, env):
            return python, env
    return None


@contextlib.contextmanager
def python_for_nobody() -> Iterator[tuple[str, dict[str, str]]]:
    """(interpreter, environment) with which uid 65534 imports this checkout's vhost_pv."""
    assert os.getuid() == 0, "these tests run as root: they start processes as another uid"
    found = _found(REPO)
    if found is not None:
        yield found
        return
    scratch = Path(tempfile.mkdtemp(prefix="vhost-pv-nobody-", dir="/tmp"))
    os.chmod(scratch, 0o755)
    mounted = scratch / "repo"
    mounted.mkdir()
    try:
        subprocess.run(["mount", "--bind", "-o", "ro", str(REPO), str(mounted)], check=True)
        found = _found(mounted)
        assert found is not None, f"uid {NOBODY} cannot import vhost_pv, not even from {mounted}"
        yield found
    finally:
        subprocess.run(["umount", "-l", str(mounted)], check=False, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
