"""qemu-storage-daemon exporting a volume's data region over vhost-user-blk: the anchor
every benchmark row is compared with."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType

from vhost_pv.volume.header import VolumeHeader


class QsdProcess:
    """QEMU's own C backend on the same bytes vhost-pv serves (raw node with offset/size)."""

    def __init__(
        self, volume: Path, header: VolumeHeader, socket: Path, *, queues: int = 1, aio: str = "threads",
        direct: bool = False,
    ) -> None:
        self.socket = socket
        self.log_path = socket.with_suffix(".qsd.log")
        self.cmd = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file0,filename={volume},aio={aio},"
            f"cache.direct={'on' if direct else 'off'}",
            "--blockdev",
            f"driver=raw,node-name=disk0,file=file0,offset={header.data_offset},size={header.capacity}",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={socket},"
            f"writable=on,num-queues={queues}",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> QsdProcess:
        self.socket.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"qemu-storage-daemon failed: {self.log_path.read_text()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.socket.unlink(missing_ok=True)
