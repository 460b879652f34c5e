"""Real podman for the container-watcher tests, in a store of its own under a temp dir.

Podman runs as root with runc (crun fails on this kernel's cgroup layout), the cgroupfs
manager (PID 1 is no systemd here), the file events backend and no network. Its rootful
default rlimits exceed this machine's hard limits and root lacks CAP_SYS_RESOURCE, so the
config caps them: without that runc fails with "error setting rlimit". The image is a
busybox rootfs imported with `podman import`: no registry is reachable.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

IMAGE = "localhost/vhost-pv-busybox:test"


class Podman:
    def __init__(self, base: Path) -> None:
        self.base = base
        store = base / "store"
        # Podman refuses a runroot longer than 50 characters: pytest's temp paths can be.
        self.runroot = Path(tempfile.mkdtemp(prefix="vpv-podman-"))
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = min(nofile, 1 << 20) if nofile != resource.RLIM_INFINITY else 1 << 20
        self.conf = base / "containers.conf"
        base.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{store}/tmp/events/events.log"
lock_type = "file"
tmp_dir = "{store}/tmp"
volume_path = "{store}/root/volumes"
[network]
network_config_dir = "{store}/networks"
""")
        self.flags = [
            "--runtime", "runc", "--root", str(store / "root"), "--runroot", str(self.runroot),
            "--tmpdir", str(store / "tmp"), "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--network-config-dir", str(store / "networks"),
        ]
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(["podman", *self.flags, *args], env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout.strip()

    def import_busybox(self) -> None:
        rootfs = self.base / "rootfs.tar"
        busybox = shutil.which("busybox") or "/bin/busybox"
        with tarfile.open(rootfs, "w") as tar:
            for directory in ("bin", "etc", "proc", "sys", "dev", "tmp", "trigger"):
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            tar.add(busybox, "bin/busybox")
            applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
            for applet in applets.stdout.split():
                if applet != "busybox":
                    link = tarfile.TarInfo(f"bin/{applet}")
                    link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                    tar.addfile(link)
        self("import", "--change", 'CMD ["/bin/sh"]', str(rootfs), IMAGE)

    def run(self, name: str, script: str, *, labels: dict[str, str] | None = None,
            trigger: Path | None = None) -> str:
        """A detached container running `sh -c script`; returns its full id. With trigger,
        that host directory is the container's /trigger (a test drops files there)."""
        args = ["run", "-d", "--name", name, "--network", "none", "--stop-timeout", "0"]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        if trigger is not None:
            args += ["-v", f"{trigger}:/trigger"]
        return self(*args, IMAGE, "sh", "-c", script)

    def inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self("inspect", "--type", "container", name))
        return data[0]

    def wait_exited(self, name: str, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while True:
            state = self.inspect(name)["State"]
            if state["Status"] in ("exited", "stopped"):
                return int(state["ExitCode"])
            assert time.monotonic() < deadline, f"{name} still {state['Status']}"
            time.sleep(0.1)

    def service(self, socket: Path) -> PodmanService:
        return PodmanService(self, socket)

    def clean_up(self) -> None:
        self("rm", "-a", "-f", "-t", "0", check=False)

    def close(self) -> None:
        self.clean_up()
        shutil.rmtree(self.runroot, ignore_errors=True)


class PodmanService:
    """`podman system service` on a unix socket: the Docker Engine API the daemon follows."""

    def __init__(self, podman: Podman, socket: Path) -> None:
        self.podman = podman
        self.socket = socket
        self.url = f"unix://{socket}"
        self.log_path = socket.with_suffix(".service.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PodmanService:
        self.socket.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["podman", *self.podman.flags, "system", "service", "--time=0", self.url],
                env=self.podman.env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            assert self.process.poll() is None, f"podman service exited:\n{self.log_path.read_text()}"
            assert time.monotonic() < deadline, "podman service did not create its socket"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> PodmanService:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
