"""A TCP proxy for the tests that can cut, refuse or blackhole every connection through it, as a bad network would.

The server stays up while its clients lose their connections, so browser-side resume (EventSource's
Last-Event-ID, the console's ?since=) can be tested against a server that remembers its history; put in
front of Redis, it is the network between the nodes and their broker (tests/chaos.py).

Modes, one at a time:
- `cut()`: reset every open connection; with `hold` new ones wait unanswered until `release()`, with
  `refuse` they are closed as soon as they are accepted until `release()`.
- `blackhole()`: every connection, open or new, has its bytes accepted and read, and nothing is answered or
  forwarded (a peer that went silent, or a dropped route with a stale NAT entry). `heal()` ends it and closes
  the connections it swallowed: the bytes they sent are gone, as on a real network.
- `lose_answers_to(pattern)`: a connection that sends `pattern` gets no byte back from then on, while what it
  sends still arrives (a command that reaches the server whose answer is lost on the way back).
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
        self.refusing = False
        self.blackholed = False
        self._pattern: bytes | None = None
        self._muted: set[socket.socket] = set()  # upstream sockets whose answers are thrown away
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, *, hold: bool = True, refuse: bool = False) -> None:
        """Reset every connection through the proxy; with `hold`, keep new ones waiting until `release()`;
        with `refuse`, close new ones at once until `release()`."""
        with self._lock:
            self.held = hold and not refuse
            self.refusing = refuse
            victims, self._open = self._open, []
        _close_all(victims)

    def release(self) -> None:
        """Forward the connections that waited, and every new one."""
        with self._lock:
            self.held = self.refusing = False
            waiting, self._waiting = self._waiting, []
        for client in waiting:
            self._forward(client)

    def blackhole(self) -> None:
        """From now on read every byte from both sides and deliver none, on open and new connections alike."""
        with self._lock:
            self.blackholed = True

    def heal(self) -> None:
        """End the blackhole: close what it swallowed; new connections are forwarded again."""
        with self._lock:
            self.blackholed = False
            victims, self._open = self._open, []
        _close_all(victims)

    def lose_answers_to(self, pattern: bytes | None) -> None:
        """From now on, lose every answer to a connection that sent `pattern` (None: stop watching)."""
        with self._lock:
            self._pattern = pattern

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
                if self.refusing:
                    client.close()
                    continue
                if self.held:
                    self._waiting.append(client)
                    continue
                if self.blackholed:
                    self._open.append(client)
                    threading.Thread(target=self._pump, args=(client, None), daemon=True).start()
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
        threading.Thread(target=self._pump, args=(client, upstream, upstream), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket | None, upstream: socket.socket | None = None) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                pattern = self._pattern
                if upstream is not None and pattern is not None and pattern in chunk:
                    self._muted.add(upstream)
                if sink is not None and not self.blackholed and source not in self._muted:
                    sink.sendall(chunk)
        for sock in (source, sink):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        source.close()  # the other direction's pump closes the other socket


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@contextlib.contextmanager
def tcp_proxy(target: int) -> Iterator[TcpProxy]:
    """A proxy to port `target` for the length of a `with` block."""
    proxy = TcpProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
