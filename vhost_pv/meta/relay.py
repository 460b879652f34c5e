"""`vhost-pv meta-relay HOST:PORT`: copies one connection between stdin/stdout and a TCP
address. QEMU user networking runs it once per guest connection with
`guestfwd=tcp:169.254.169.254:80-cmd:vhost-pv meta-relay 127.0.0.1:8169`, so the guest's
metadata requests reach the loopback-only metadata server (a `tcp:` guestfwd would open a
single connection when QEMU starts and carry every guest connection over it)."""

from __future__ import annotations

import os
import selectors
import socket


def relay(host: str, port: int, stdin: int = 0, stdout: int = 1) -> int:
    """Copy until both directions are closed; returns an exit code."""
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        os.write(2, f"vhost-pv meta-relay: cannot reach {host}:{port}: {exc}\n".encode())
        return 1
    sock.settimeout(None)
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ, "in")
    selector.register(sock, selectors.EVENT_READ, "sock")
    open_ends = 2
    with sock:
        while open_ends:
            for key, _ in selector.select():
                if key.data == "in":
                    data = os.read(stdin, 1 << 16)
                    if not data:
                        selector.unregister(stdin)
                        sock.shutdown(socket.SHUT_WR)
                        open_ends -= 1
                    else:
                        sock.sendall(data)
                else:
                    data = sock.recv(1 << 16)
                    if not data:
                        selector.unregister(sock)
                        open_ends -= 1
                        if open_ends:  # the server is done: so is the guest's connection
                            return 0
                    else:
                        os.write(stdout, data)
    return 0
