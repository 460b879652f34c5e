"""Kernel process events (the netlink process connector, through pyroute2): how a volume
notices that its owner's init process exited, with no container engine at all.

This is the one module that imports pyroute2, loaded only with --proc-events (pyroute2
costs ~20 MiB of resident memory). pyroute2 0.9 runs its synchronous sockets on
an event loop of its own: one cannot be created inside a running loop, and its get() loses
datagrams when driven by readiness. So the socket is created and subscribed from a worker
thread (open_exit_socket), and the daemon's loop reads the fd itself, one datagram per
read, and only borrows pyroute2's parser. Every exit in the system arrives here; the reader
only decodes them, and the watcher picks the pids it cares about.
"""

from __future__ import annotations

import asyncio
import logging
import os

from pyroute2 import ProcEventSocket
from pyroute2.netlink.connector.cn_proc import PROC_EVENT_EXIT, ProcEventMarshal

from vhost_pv.guard.processes import ProcessExit

log = logging.getLogger("vhost_pv.procevents")


class ProcessExitSocket:
    """A subscribed process-connector socket: fileno() for the event loop, read() for the
    exits of whole processes (thread exits are left out). Create it with open_exit_socket
    when an event loop is running in this thread."""

    def __init__(self) -> None:
        self._sock = ProcEventSocket()
        try:
            self._sock.bind()
            self._sock.control(listen=True)
        except BaseException:
            self._sock.close()
            raise
        self._fd = int(self._sock.fileno())
        os.set_blocking(self._fd, False)
        self._marshal = ProcEventMarshal()

    def fileno(self) -> int:
        return self._fd

    def read(self) -> list[ProcessExit]:
        """Every exit queued on the socket now (never blocks)."""
        exits: list[ProcessExit] = []
        while True:
            try:
                datagram = os.read(self._fd, 1 << 16)  # one netlink datagram per read
            except BlockingIOError:
                return exits
            for message in self._marshal.parse(datagram):
                if message.get("what") != PROC_EVENT_EXIT:
                    continue
                pid, tgid = message.get("process_pid"), message.get("process_tgid")
                if pid != tgid:
                    continue  # a thread, not a process
                exits.append(ProcessExit(pid=int(pid), status=int(message.get("exit_code"))))

    def close(self) -> None:
        # Closing the socket ends the subscription; no unsubscribe message is needed.
        self._sock.close()


async def open_exit_socket() -> ProcessExitSocket:
    """A ProcessExitSocket, made off the running loop (pyroute2 would start its own there)."""
    return await asyncio.to_thread(ProcessExitSocket)
