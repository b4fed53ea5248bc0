"""Loopback ports: a free one, and waiting until something listens on one."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    port: int, timeout: float = 10.0, *, alive: Callable[[], bool] | None = None
) -> bool:
    """Poll until 127.0.0.1:port accepts a connection (True), `timeout` passes
    or `alive()` says the process that should listen has gone (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1),
        ):
            return True
        time.sleep(0.05)
    return False
