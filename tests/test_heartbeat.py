"""`?heartbeat=SECONDS`: opt-in {"type": "heartbeat"} frames, in order, never stored, never counted."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from diary_ws.backends.memory import MemoryBackend
from diary_ws.broadcaster import Hub, Limits
from diary_ws.messages import HEARTBEAT_FRAME, Message, MessageId
from diary_ws.protocols import WriteResult
from diary_ws.validation import Notification
from tests.utils import Server, async_wait_until, next_frame

HEARTBEAT = {"type": "heartbeat"}


@pytest.mark.anyio
async def test_heartbeat_frames_come_that_often_and_only_to_the_socket_that_asked(server: Server) -> None:
    async with (
        connect(server.listen_url("beat", "heartbeat=1")) as beating,
        connect(server.listen_url("quiet")) as quiet,
    ):
        started = time.monotonic()
        assert await next_frame(beating, 3) == HEARTBEAT
        assert await next_frame(beating, 3) == HEARTBEAT
        took = time.monotonic() - started
        assert 1.5 < took < 3.5, f"two heartbeats took {took:.2f} s"
        # Two heartbeats have gone to `beating` meanwhile; `quiet` asked for none, so its first frame is the
        # notification (the guide's clients never see a frame they do not know).
        answer = server.post({"message": "hello"}).json()
        assert (answer["sent_count"], answer["total_connections"]) == (2, 2)  # heartbeats count nowhere
        assert (await next_frame(quiet))["message"] == "hello"
        assert (await next_frame(beating))["message"] == "hello"


@pytest.mark.anyio
async def test_heartbeats_are_not_stored(server: Server) -> None:
    async with connect(server.listen_url("store", "heartbeat=1")) as ws:
        assert await next_frame(ws, 3) == HEARTBEAT
        first = server.post({"message": "one"}).json()["id"]
        frame = await next_frame(ws, 3)
        while frame == HEARTBEAT:
            frame = await next_frame(ws, 3)
        assert (frame["id"], frame["message"]) == (first, "one")
        async with connect(server.listen_url("store", "since=1-0")) as again:
            assert (await next_frame(again))["message"] == "one"
            assert await next_frame(again) == {"type": "resume", "recovered": False, "replayed": 1}


@pytest.mark.anyio
async def test_resume_with_heartbeat_replays_first(server: Server) -> None:
    async with connect(server.listen_url("resumer")):
        ids = [server.post({"message": f"m{i}"}).json()["id"] for i in range(3)]
    async with connect(server.listen_url("resumer", f"since={ids[0]}&heartbeat=1")) as ws:
        frames = [await next_frame(ws, 3) for _ in range(4)]
        assert [f.get("message") for f in frames[:2]] == ["m1", "m2"]
        assert frames[2] == {"type": "resume", "recovered": True, "replayed": 2}
        assert frames[3] == HEARTBEAT


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["0", "0.5", "301", "-1", "", "abc", "nan", "1e2", "5&heartbeat=6"])
async def test_bad_heartbeat_is_refused_with_400_json(shared_server: Server, value: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(shared_server.listen_url("hb", f"heartbeat={value}")):
            pass
    response = refused.value.response
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert b"heartbeat" in bytes(response.body)


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["1", "300", "2.5"])
async def test_heartbeat_bounds_are_accepted(shared_server: Server, value: str) -> None:
    async with connect(shared_server.listen_url(f"hb-ok-{value}", f"heartbeat={value}")) as ws:
        assert ws.close_code is None


# --- the Connection's ordered path, in process with a recording sink (our own seam) ------------------------------


class RecordingSink:
    """A Sink that records what it is sent, and can hold the writer on a send as a slow peer would."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    def try_write(self, message: Message) -> WriteResult:
        return WriteResult.LATER

    async def send_text(self, text: str, msg_id: MessageId | None) -> None:
        await self.gate.wait()
        self.sent.append(text)

    async def send_heartbeat(self) -> None:
        await self.gate.wait()
        self.sent.append(HEARTBEAT_FRAME)

    async def close(self, code: int, reason: str) -> None:
        self.sent.append(f"close {code}")

    def stalled(self) -> bool:
        return False

    def abort(self) -> bool:
        return False


def hub() -> Hub:
    return Hub(MemoryBackend(history_size=100, history_ttl=60), Limits(10, 10, 100, 1 << 20))


@pytest.mark.anyio
async def test_a_heartbeat_never_lands_between_replayed_frames() -> None:
    h = hub()
    await h.start()
    keeper = await h.attach("u", RecordingSink())
    await h.listen(keeper, None)
    ids = [(await h.publish(Notification(message=f"m{i}", user_ids=("u",)))).id for i in range(5)]
    sink = RecordingSink()
    sink.gate.clear()  # a slow peer: the replay waits
    conn = await h.attach("u", sink)
    await h.listen(conn, ids[0])
    conn.heartbeat_every(0.02)
    # Heartbeats fall due while the first replayed frame is held up by the peer.
    await async_wait_until(lambda: conn._beat_due, 2, "a heartbeat to fall due during the replay")
    await asyncio.sleep(0.1)  # and five more intervals pass: none of them may queue a second heartbeat
    sink.gate.set()
    for _ in range(20):  # a few turns of the loop let the writer send all it holds; the next tick is 20 ms away
        await asyncio.sleep(0)
    kinds = ["beat" if t == HEARTBEAT_FRAME else "resume" if "resume" in t else "msg" for t in sink.sent]
    assert kinds == ["msg", "msg", "msg", "msg", "resume", "beat"]
    await conn.stop()
    await keeper.stop()
    await h.stop()


@pytest.mark.anyio
async def test_the_heartbeat_timer_ends_with_the_connection() -> None:
    h = hub()
    await h.start()
    sink = RecordingSink()
    conn = await h.attach("u", sink)
    await h.listen(conn, None)
    conn.heartbeat_every(0.01)
    await async_wait_until(lambda: len(sink.sent) >= 2, 2, "two heartbeats")
    await conn.stop()
    count = len(sink.sent)
    assert conn._beat is None
    await asyncio.sleep(0.1)  # a negative check needs a window: ten intervals, in which a live timer would send
    assert len(sink.sent) == count
    await h.stop()
