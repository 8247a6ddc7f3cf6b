"""Every socket lost at once (a proxy restarting, a network blip).

The event loop calls every lost protocol's `connection_lost` in one turn and would wake every handler in the
next: at 18,500 sockets, turns of 300 to 460 ms in which nobody else got anything. A loss now stops the
socket's timers at once and queues the rest, LOST_PER_TURN sockets a turn (`diary_ws.edge.websocket`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from typing import cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from diary_ws.edge import websocket
from diary_ws.edge.websocket import LOST_PER_TURN, DiaryWebSocketProtocol, lose_later
from tests.utils import ON_BOTH_LOOPS, Server, async_wait_until, raw_handshake, wait_until

pytestmark = ON_BOTH_LOOPS

DROPPED = 500


def closes(server: Server, code: str) -> float:
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "diary_ws_websocket_closes_total" and sample.labels.get("code") == code:
                return sample.value
    return 0.0


def test_every_socket_dropped_at_once_is_let_go_and_the_one_left_still_served(server: Server) -> None:
    stays = raw_handshake(server.port, "/api/v1/ws/stays")
    dropped = [raw_handshake(server.port, f"/api/v1/ws/drop-{i}") for i in range(DROPPED)]
    wait_until(lambda: server.status()["total_connections"] == DROPPED + 1, 10, "every socket to register")
    for sock in dropped:
        sock.close()  # a FIN each, no close frame, all at once
    wait_until(lambda: server.status()["total_connections"] == 1, 20, "the dropped sockets to be let go")
    # Every handler ended (the peer left without a close frame: 1005), and nothing was left half gone.
    wait_until(lambda: closes(server, "1005") == DROPPED, 10, "every dropped socket's handler to end")
    assert server.status()["active_user_ids"] == ["stays"]
    answer = server.post({"message": "still here", "user_ids": ["stays"]}).json()
    assert answer["sent_count"] == 1
    stays.settimeout(5)
    deadline = time.monotonic() + 10
    got = b""
    while b"still here" not in got:
        assert time.monotonic() < deadline, f"no message in 10 s: {got!r}"
        chunk = stays.recv(4096)
        assert chunk, "the socket left open was closed"
        got += chunk
    stays.close()


@pytest.mark.anyio
async def test_losses_are_handled_lost_per_turn_in_the_order_they_came() -> None:
    loop = asyncio.get_running_loop()
    turn = [0]
    running = [True]

    def tick() -> None:  # one call a turn of the loop: the turn number the losses are handled in
        turn[0] += 1
        if running[0]:
            loop.call_soon(tick)

    handled: list[tuple[int, int]] = []

    class Lost:
        """A lost socket's protocol, as `lose_later` sees one: its loop, and the rest of its loss to run."""

        def __init__(self, number: int) -> None:
            self.loop = loop
            self.number = number

        def finish_lost(self, exc: Exception | None) -> None:
            assert exc is None
            handled.append((self.number, turn[0]))

    count = 5 * LOST_PER_TURN + 7
    loop.call_soon(tick)
    for number in range(count):
        lose_later(cast(DiaryWebSocketProtocol, Lost(number)), None)
    await async_wait_until(lambda: len(handled) == count, 5, "every loss to be handled")
    running[0] = False
    assert [number for number, _turn in handled] == list(range(count))
    per_turn = Counter(at for _number, at in handled)
    assert max(per_turn.values()) == LOST_PER_TURN
    assert len(per_turn) == math.ceil(count / LOST_PER_TURN)
    assert loop not in websocket._lost  # nothing kept for a loop with nothing left to lose
