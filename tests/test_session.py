"""`async with hub.session(...)`: a listener's slot, expiry and stop, and its `State`, which moves only forward.

In process, with the recording sink of test_heartbeat (our own seam); the wire behaviour of the same paths
is in test_delivery, test_security and test_shutdown.
"""

from __future__ import annotations

import time

import pytest

from diary_ws.backends.memory import MemoryBackend
from diary_ws.broadcaster import Connection, Hub, Limits, State
from diary_ws.errors import TooManyConnections
from diary_ws.protocols import CloseCode
from diary_ws.validation import Notification
from tests.test_heartbeat import RecordingSink
from tests.utils import async_wait_until


def state(conn: Connection) -> State:
    """Read afresh each time (mypy would otherwise keep the first one it saw)."""
    return conn.state


def hub(per_user: int = 10) -> Hub:
    return Hub(MemoryBackend(history_size=100, history_ttl=60), Limits(10, per_user, 100, 1 << 20))


@pytest.mark.anyio
async def test_a_session_takes_its_slot_and_gives_it_back() -> None:
    h = hub()
    await h.start()
    conn = h.session("u", RecordingSink())
    assert state(conn) is State.NEW
    assert h.sizes() == (0, 0)
    async with conn:
        assert state(conn) is State.ATTACHED
        assert h.sizes() == (1, 1)
        await h.listen(conn, None)
        assert state(conn) is State.LIVE
    assert state(conn) is State.GONE
    assert h.sizes() == (0, 0)
    await h.stop()


@pytest.mark.anyio
async def test_a_refused_session_takes_nothing() -> None:
    h = hub(per_user=1)
    await h.start()
    async with h.session("u", RecordingSink()):
        second = h.session("u", RecordingSink())
        with pytest.raises(TooManyConnections):
            async with second:
                pytest.fail("a refused session runs no body")
        assert state(second) is State.REFUSED
        assert h.sizes() == (1, 1)
    assert h.sizes() == (0, 0)
    await h.stop()


@pytest.mark.anyio
async def test_a_close_before_the_handshake_goes_out_after_it_and_alone() -> None:
    h = hub()
    await h.start()
    sink = RecordingSink()
    async with h.session("u", sink) as conn:
        await h.publish(Notification(message="queued during the handshake", user_ids=("u",)))
        conn.close(CloseCode.DISCONNECTED, "disconnected by an operator")
        assert state(conn) is State.CLOSING
        assert h.sizes() == (0, 0)  # out of the registry at once
        conn.close(CloseCode.SERVICE_RESTART, "a second close changes nothing")
        assert sink.sent == []  # nothing before the handshake
        await h.listen(conn, None)
        await async_wait_until(lambda: sink.sent == [f"close {CloseCode.DISCONNECTED}"], 2, "the close frame alone")
    assert state(conn) is State.GONE
    await h.stop()


@pytest.mark.anyio
async def test_the_session_closes_an_expired_token_with_4001() -> None:
    h = hub()
    await h.start()
    sink = RecordingSink()
    async with h.session("u", sink, expires_at=time.time() + 0.05) as conn:
        await h.listen(conn, None)
        await async_wait_until(lambda: sink.sent == [f"close {CloseCode.TOKEN_EXPIRED}"], 3, "the 4001 close")
        assert state(conn) is State.CLOSING
    await h.stop()


@pytest.mark.anyio
async def test_a_connection_never_moves_back() -> None:
    h = hub()
    await h.start()
    async with h.session("u", RecordingSink()) as conn:
        await h.listen(conn, None)
    with pytest.raises(RuntimeError, match="cannot go from GONE to LIVE"):
        conn._move(State.LIVE)
    assert state(conn) is State.GONE
    await h.stop()


@pytest.mark.anyio
async def test_the_status_ids_stay_sorted_and_match_the_registry_through_churn() -> None:
    """`Hub.user_ids` is kept sorted as users come and go (the status reads its first ids without a sort):
    after random joins, second sockets, refusals and leaves it is exactly the registry's users, sorted."""
    import random

    rng = random.Random(7)
    h = Hub(MemoryBackend(history_size=100, history_ttl=60), Limits(1000, 2, 100, 1 << 20))
    await h.start()
    open_: list[Connection] = []
    for _ in range(600):
        if open_ and rng.random() < 0.45:
            open_.pop(rng.randrange(len(open_))).leave()
        else:
            conn = h.session(f"user-{rng.randrange(80)}", RecordingSink())
            try:
                await h._admit(conn)
            except TooManyConnections:
                continue
            open_.append(conn)
        users = sorted({conn.user_id for conn in open_})
        assert h.user_ids() == users
        assert h.user_ids(5) == users[:5]
        assert h.sizes() == (len(users), len(open_))
        status = await h.status(3)
        assert (status["active_user_ids"], status["connected_users"], status["total_connections"]) == (
            users[:3], len(users), len(open_),
        )  # fmt: skip
    await h.stop()
    assert h.user_ids() == []
