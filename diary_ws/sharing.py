"""One process per in-memory app: refuse a second worker process that serves the same listening socket.

memory:// keeps the listeners and the history in one process. Several worker processes behind one port
(`uvicorn --workers 2`, gunicorn) would each hold some of the listeners, and a POST would reach only those of
the worker that took it while answering 200. `diary-ws serve` refuses WORKERS > 1 with memory:// itself; a
host's own server is caught here, when each worker's lifespan starts: uvicorn and gunicorn bind the socket in
the parent before the workers start, so every worker already holds it.

Each process that starts an in-memory app claims every TCP or Unix address it listens on, by binding an
abstract Unix socket named after it (Linux). The kernel frees the name when the process ends, however it
ends, so there is no file to clean up; a second process that finds the name taken refuses to start.
Elsewhere (no /proc, no abstract names) the check is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from diary_ws.errors import SharedInMemory

log = logging.getLogger("diary_ws.app")

# The claims of this process, by name, with a count of the apps that hold each. This is process-wide on
# purpose, not app state: the kernel's answer is per process, and two apps in one process (several mounts,
# the test suite) may listen on the same socket without sharing anything that matters.
_claims: dict[bytes, tuple[socket.socket, int]] = {}
SUPPORTED = sys.platform == "linux" and Path("/proc/self/fd").is_dir()


def listening_addresses() -> list[str]:
    """The addresses this process serves, as `tcp:HOST:PORT` or `unix:PATH`, from its open server sockets."""
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if os.readlink(entry).startswith("socket:"):
                address = _listening(int(entry.name))
                if address is not None:
                    found.append(address)
    return sorted(set(found))


def _listening(fd: int) -> str | None:
    """The address of a bound, unconnected stream socket: a server socket, listening or about to.

    Not SO_ACCEPTCONN: uvicorn's workers call listen() on the inherited socket only after their lifespan has
    started, so the first worker's lifespan sees a socket that is bound but not yet listening.
    """
    with socket.socket(fileno=os.dup(fd)) as sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) or sock.type != socket.SOCK_STREAM:
            return None
        name = sock.getsockname()
        try:
            sock.getpeername()
        except OSError:  # not connected: a server socket
            pass
        else:
            return None
        if sock.family == socket.AF_UNIX:
            path = name.decode(errors="replace") if isinstance(name, bytes) else name
            return f"unix:{path}" if path else None
        return f"tcp:{name[0]}:{name[1]}" if name[1] else None


@contextlib.contextmanager
def one_process(addresses: list[str] | None = None) -> Iterator[None]:
    """Hold this process's claim on every listening address while the block runs; SharedInMemory if taken."""
    if not SUPPORTED:
        yield
        return
    held: list[str] = []
    try:
        for address in listening_addresses() if addresses is None else addresses:
            _claim(address)
            held.append(address)
        yield
    finally:
        for address in held:
            _release(address)


def _claim(address: str) -> None:
    name = _name(address)
    if name in _claims:
        sock, count = _claims[name]
        _claims[name] = (sock, count + 1)
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
    except OSError:
        sock.close()
        error = SharedInMemory(address.removeprefix("tcp:"))
        log.error("%s", error.message)  # one clear line before the server's own report of the failed start
        raise error from None
    _claims[name] = (sock, 1)


def _release(address: str) -> None:
    name = _name(address)
    sock, count = _claims[name]
    if count > 1:
        _claims[name] = (sock, count - 1)
    else:
        del _claims[name]
        sock.close()


def _name(address: str) -> bytes:
    """An abstract socket name (a leading NUL byte): short, whatever the address."""
    return b"\0diary-ws-memory:" + hashlib.sha256(address.encode()).hexdigest()[:32].encode()
