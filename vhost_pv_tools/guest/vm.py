"""Boot a throw-away QEMU (TCG) guest that runs one shell job and powers off.

The guest is Debian's cloud kernel plus an initramfs built by `scripts/build-guest.sh`
(busybox, fio, virtio modules). A job is a shell script: it is packed as `/job.sh` into a
small second cpio archive appended to the base initramfs, which the kernel unpacks on top of
the first. The guest's `/init` runs it and prints `VHOSTPV-GUEST-EXIT <code>` on the serial
console, which is how the host learns the job's exit code.

The QEMU options for guest memory and vhost-user disks come from the fragments in
`qemu-configs/`, so the command lines documented there are the ones tested. TCG only: KVM
is never requested.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from string import Template
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]
QEMU_CONFIG_DIR = REPO_ROOT / "qemu-configs"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-guest.sh"
QEMU_BINARY = "qemu-system-x86_64"
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet"
EXIT_MARKER = re.compile(r"VHOSTPV-GUEST-EXIT (\d+)")


class GuestError(RuntimeError):
    """The guest image is missing or QEMU could not be started."""


class GuestTimeout(GuestError):
    """The guest did not power off in time; carries what it printed."""

    def __init__(self, message: str, console: str) -> None:
        super().__init__(f"{message}\n--- guest console (tail) ---\n{console[-4000:]}")
        self.console = console


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path


@dataclasses.dataclass(frozen=True)
class VhostUserBlkDisk:
    """A vhost-user-blk disk: QEMU connects to `socket`, served by vhost-pv or any backend."""

    socket: Path
    num_queues: int = 1
    serial: str | None = None
    reconnect: int = 0
    """Seconds between QEMU's attempts to reconnect when the backend goes away (0: never)."""

    def qemu_args(self, chardev_id: str) -> list[str]:
        args = qemu_fragment(
            "vhost-user-blk.args", ID=chardev_id, SOCKET=str(self.socket), QUEUES=str(self.num_queues)
        )
        if self.reconnect:
            where = args.index("-chardev") + 1
            args[where] += f",reconnect={self.reconnect}"
        if self.serial is not None:
            # QEMU's vhost-user-blk has no serial property: GET_ID is answered by the backend.
            raise GuestError("vhost-user-blk disks take their serial from the backend")
        return args


@dataclasses.dataclass(frozen=True)
class GuestResult:
    exit_code: int | None
    """The job's exit code, or None if the guest never reported one (crash, kill)."""
    console: str
    qemu_returncode: int | None

    def section(self, name: str) -> str | None:
        """Text the job printed between `=== BEGIN name ===` and `=== END name ===`."""
        match = re.search(
            rf"^=== BEGIN {re.escape(name)} ===\r?\n(.*?)^=== END {re.escape(name)} ===",
            self.console,
            re.DOTALL | re.MULTILINE,
        )
        return match.group(1).replace("\r\n", "\n") if match else None


def guest_image_dir() -> Path:
    cache = os.environ.get("VHOST_PV_CACHE") or str(Path.home() / ".cache" / "vhost-pv")
    return Path(cache) / "guest"


def ensure_guest_image(outdir: Path | None = None) -> GuestImage:
    """Build the guest image if it is missing or stale (the script decides) and return it."""
    out = outdir or guest_image_dir()
    image = GuestImage(out / "vmlinuz", out / "initramfs.cpio.gz")
    if BUILD_SCRIPT.exists():
        done = subprocess.run([str(BUILD_SCRIPT), str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise GuestError(f"{BUILD_SCRIPT} failed:\n{done.stdout}{done.stderr}")
    if not (image.kernel.exists() and image.initramfs.exists()):
        raise GuestError(f"no guest image in {out}; run scripts/build-guest.sh")
    return image


def qemu_fragment(name: str, **values: str) -> list[str]:
    """Arguments from a `qemu-configs/*.args` file: one `-option value` per line."""
    args: list[str] = []
    for line in (QEMU_CONFIG_DIR / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        args.extend(Template(line).substitute(values).split(maxsplit=1))
    return args


def _job_archive(job: str, directory: Path) -> bytes:
    """An uncompressed newc cpio holding the job as /job.sh, built with the cpio tool."""
    staging = directory / "job-root"
    staging.mkdir()
    script = staging / "job.sh"
    script.write_text(job if job.endswith("\n") else job + "\n")
    script.chmod(0o755)
    done = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        input=b"job.sh\n",
        cwd=staging,
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise GuestError(f"cpio failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


class GuestProcess:
    """A running guest. Use as a context manager: leaving it kills QEMU if still running."""

    def __init__(
        self,
        job: str,
        *,
        disks: Sequence[VhostUserBlkDisk] = (),
        memory_mib: int = 256,
        cpus: int = 1,
        extra_args: Sequence[str] = (),
        image: GuestImage | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.image = image or ensure_guest_image()
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="vhost-pv-guest-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_path = self.workdir / "console.log"
        initrd = self.workdir / "initrd.img"
        with open(initrd, "wb") as out:
            with open(self.image.initramfs, "rb") as base:
                shutil.copyfileobj(base, out)
            # The kernel looks for a following archive only at 4-byte aligned offsets and
            # skips zero bytes between archives.
            out.write(bytes(-out.tell() % 4))
            out.write(_job_archive(job, Path(tempfile.mkdtemp(dir=self.workdir))))
        self.command = [
            QEMU_BINARY,
            "-machine", "q35", "-accel", "tcg", "-cpu", "max",
            "-smp", str(cpus), "-m", f"{memory_mib}M",
            *qemu_fragment("memory.args", MEMORY_MIB=str(memory_mib)),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.console_path}",
            "-kernel", str(self.image.kernel), "-initrd", str(initrd),
            "-append", KERNEL_CMDLINE,
        ]
        for number, disk in enumerate(disks):
            self.command += disk.qemu_args(f"vhostpv{number}")
        self.command += list(extra_args)
        # QEMU keeps its own copy of the descriptor; ours can close right after the start.
        with open(self.workdir / "qemu.stderr", "wb") as stderr:
            try:
                self.process = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT
                )
            except OSError as exc:
                raise GuestError(f"cannot start {QEMU_BINARY}: {exc}") from exc

    def console_so_far(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_output(self) -> str:
        try:
            return (self.workdir / "qemu.stderr").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float = 300) -> GuestResult:
        """Wait for the guest to power off; GuestTimeout (and QEMU killed) if it does not."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestTimeout(f"guest still running after {timeout:.0f} s", self.console_so_far()) from None
        return self._result()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def _result(self) -> GuestResult:
        console = self.console_so_far()
        markers = EXIT_MARKER.findall(console)
        qemu_text = self.qemu_output()
        if qemu_text.strip():
            console += f"\n--- qemu stderr ---\n{qemu_text}"
        return GuestResult(int(markers[-1]) if markers else None, console, self.process.returncode)

    def close(self) -> None:
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_guest(
    job: str,
    *,
    disks: Sequence[VhostUserBlkDisk] = (),
    memory_mib: int = 256,
    cpus: int = 1,
    extra_args: Sequence[str] = (),
    image: GuestImage | None = None,
    workdir: Path | None = None,
) -> GuestProcess:
    return GuestProcess(
        job,
        disks=disks,
        memory_mib=memory_mib,
        cpus=cpus,
        extra_args=extra_args,
        image=image,
        workdir=workdir,
    )


def run_guest(
    job: str,
    *,
    disks: Sequence[VhostUserBlkDisk] = (),
    memory_mib: int = 256,
    cpus: int = 1,
    extra_args: Sequence[str] = (),
    timeout: float = 300,
    image: GuestImage | None = None,
    workdir: Path | None = None,
) -> GuestResult:
    """Boot a guest, run `job`, wait for it to power off and return what happened."""
    started = time.monotonic()
    with start_guest(
        job, disks=disks, memory_mib=memory_mib, cpus=cpus, extra_args=extra_args,
        image=image, workdir=workdir,
    ) as guest:
        result = guest.wait(max(1.0, timeout - (time.monotonic() - started)))
    return result
