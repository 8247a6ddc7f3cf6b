"""A TCP proxy for the tests that can cut every connection through it, as a flaky network would.

The server stays up while its clients lose their connections, so browser-side resume (EventSource's
Last-Event-ID, the console's ?since=) can be tested against a server that remembers its history.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target`. `cut()` drops every open connection; while `held`,
    new connections wait unanswered (as on a dead network) until `release()` forwards them."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._waiting: list[socket.socket] = []
        self.held = False
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, *, hold: bool = True) -> None:
        """Reset every connection through the proxy; with `hold`, keep new ones waiting until `release()`."""
        with self._lock:
            self.held = hold
            victims, self._open = self._open, []
        for sock in victims:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def release(self) -> None:
        """Forward the connections that waited, and every new one."""
        with self._lock:
            self.held = False
            waiting, self._waiting = self._waiting, []
        for client in waiting:
            self._forward(client)

    def close(self) -> None:
        self._listener.close()
        self.cut(hold=False)
        for sock in self._waiting:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.accepted += 1
                if self.held:
                    self._waiting.append(client)
                    continue
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open += [client, upstream]
        threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    source.close()  # the other direction's pump closes the other socket


@contextlib.contextmanager
def tcp_proxy(target: int) -> Iterator[TcpProxy]:
    """A proxy to port `target` for the length of a `with` block."""
    proxy = TcpProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
