"""sd_notify: tell systemd we are ready, alive (watchdog) and what we are doing (STATUS=).

The protocol is one datagram to the AF_UNIX socket named in $NOTIFY_SOCKET ('@' = abstract
namespace). Without $NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from typing import Optional


class Notifier:
    def __init__(self, address: Optional[str] = None):
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address = ("\0" + addr[1:]) if addr and addr.startswith("@") else addr
        self.sock: Optional[socket.socket] = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        ok_pid = pid is None or pid == str(os.getpid())
        self.watchdog_interval_s: Optional[float] = int(usec) / 1e6 / 2 if usec and usec.isdigit() and ok_pid else None

    def send(self, **fields: str) -> bool:
        if self.sock is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self.sock.sendto(msg, self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.send(READY="1", **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def status(self, text: str) -> bool:
        return self.send(STATUS=text.replace("\n", " "))

    def stopping(self) -> bool:
        return self.send(STOPPING="1")
