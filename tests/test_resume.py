"""`?since=` resume on one process: replay in order without duplicates, then the control frame, then live."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.utils import Server, async_wait_until, next_frame, run_server


def as_pair(msg_id: str) -> tuple[int, int]:
    ms, seq = msg_id.split("-")
    return int(ms), int(seq)


@pytest.mark.anyio
async def test_missed_messages_are_replayed_in_order_then_resume_then_live(server: Server) -> None:
    async with connect(server.listen_url("alice")) as ws, connect(server.listen_url("bob")):
        first = server.post({"message": "seen", "user_ids": ["alice"]}).json()
        assert (await next_frame(ws))["id"] == first["id"]
    # Alice is away: bob keeps the broadcast deliverable while she is gone.
    async with connect(server.listen_url("bob")):
        missed = [
            server.post({"message": "m1", "user_ids": ["bob"]}).json(),  # not hers
            server.post({"message": "m2"}).json(),  # a broadcast: hers too
        ]
    async with connect(server.listen_url("alice")):
        missed.append(server.post({"message": "m3", "user_ids": ["alice"]}).json())
        missed.append(server.post({"message": "m4", "user_ids": ["alice", "bob"]}).json())
    async with connect(server.listen_url("alice", f"since={first['id']}")) as ws:
        replayed = [await next_frame(ws) for _ in range(3)]
        assert [f["message"] for f in replayed] == ["m2", "m3", "m4"]
        assert [f["id"] for f in replayed] == [m["id"] for m in missed[1:]]
        assert all(f["type"] == "notification" for f in replayed)
        assert await next_frame(ws) == {"type": "resume", "recovered": True, "replayed": 3}
        live = server.post({"message": "live", "user_ids": ["alice"]}).json()
        frame = await next_frame(ws)
        assert (frame["message"], frame["id"]) == ("live", live["id"])


@pytest.mark.anyio
async def test_since_older_than_the_history_is_not_recovered_but_what_is_kept_is_replayed() -> None:
    with run_server({"history_size": "3"}) as srv:
        async with connect(srv.listen_url("alice")):
            ids = [srv.post({"message": f"m{i}", "user_ids": ["alice"]}).json()["id"] for i in range(6)]
        async with connect(srv.listen_url("alice", f"since={ids[0]}")) as ws:
            replayed = [await next_frame(ws) for _ in range(3)]
            assert [f["id"] for f in replayed] == ids[3:]
            assert await next_frame(ws) == {"type": "resume", "recovered": False, "replayed": 3}
        # From the oldest id still kept, nothing is missing.
        async with connect(srv.listen_url("alice", f"since={ids[2]}")) as ws:
            assert [(await next_frame(ws))["id"] for _ in range(3)] == ids[3:]
            assert await next_frame(ws) == {"type": "resume", "recovered": True, "replayed": 3}
        srv.assert_clean_log()


@pytest.mark.anyio
async def test_messages_past_their_ttl_are_not_replayed() -> None:
    with run_server({"history_ttl": "0.3"}) as srv:
        async with connect(srv.listen_url("alice")):
            first = srv.post({"message": "old", "user_ids": ["alice"]}).json()
            assert srv.post({"message": "older", "user_ids": ["alice"]}).status_code == 200

        async def expired() -> bool:
            async with connect(srv.listen_url("alice", f"since={first['id']}")) as ws:
                frame = await next_frame(ws)
                return frame == {"type": "resume", "recovered": False, "replayed": 0}

        assert await async_wait_until(expired, 5, "the history to expire")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "since",
    ["0-0", "1-0", "99999999999999-0"],
    ids=["zero", "before-this-run", "from-the-future"],
)
async def test_unknown_since_is_not_recovered(server: Server, since: str) -> None:
    async with connect(server.listen_url("alice")):
        server.post({"message": "x", "user_ids": ["alice"]})
    async with connect(server.listen_url("alice", f"since={since}")) as ws:
        frame = await next_frame(ws)
        if since == "99999999999999-0":
            assert frame == {"type": "resume", "recovered": False, "replayed": 0}
        else:
            assert frame["message"] == "x"  # what is retained is still replayed
            assert await next_frame(ws) == {"type": "resume", "recovered": False, "replayed": 1}
        # Told it is not recovered, the client still gets what comes live (a `since` the history does not
        # know is no floor: one from the future would otherwise hold back every message).
        live = server.post({"message": "live", "user_ids": ["alice"]}).json()
        assert (await next_frame(ws))["id"] == live["id"]


@pytest.mark.anyio
async def test_without_since_no_control_frame_is_ever_sent(server: Server) -> None:
    async with connect(server.listen_url("alice")) as ws:
        server.post({"message": "plain", "user_ids": ["alice"]})
        assert (await next_frame(ws))["type"] == "notification"


@pytest.mark.anyio
async def test_resume_while_publishing_loses_and_duplicates_nothing(server: Server) -> None:
    """Messages keep coming while the socket replays: each id arrives once, in order, none missing."""
    total = 300
    async with connect(server.listen_url("alice")) as keeper:
        first = server.post({"message": "0", "user_ids": ["alice"]}).json()
        sent: list[str] = [first["id"]]

        async def publish() -> None:
            async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
                for i in range(1, total):
                    answer = await client.post(
                        "/api/v1/ws/notification", json={"message": str(i), "user_ids": ["alice"]}
                    )
                    sent.append(answer.json()["id"])

        publisher = asyncio.create_task(publish())
        await async_wait_until(lambda: len(sent) > 50, 10, "some messages to be published")
        async with connect(server.listen_url("alice", f"since={first['id']}")) as ws:
            got: list[str] = []
            resume: dict[str, Any] | None = None
            while len(got) < total - 1:
                frame = await next_frame(ws)
                if frame["type"] == "resume":
                    resume = frame
                else:
                    got.append(frame["id"])
            await publisher
        assert resume is not None
        assert resume["recovered"] is True
        assert got == sent[1:], "every id after since, once, in order"
        assert [as_pair(i) for i in got] == sorted({as_pair(i) for i in got})
        await keeper.close()


@pytest.mark.anyio
async def test_since_between_the_last_id_and_now_is_recovered(server: Server) -> None:
    # A client that has seen nothing yet resumes from the time it connected: nothing after it was lost.
    async with connect(server.listen_url("alice")):
        sent = server.post({"message": "x", "user_ids": ["alice"]}).json()
    now = f"{time.time_ns() // 1_000_000}-0"
    assert as_pair(now) > as_pair(sent["id"])
    async with connect(server.listen_url("alice", f"since={now}")) as ws:
        assert await next_frame(ws) == {"type": "resume", "recovered": True, "replayed": 0}


@pytest.mark.anyio
@pytest.mark.parametrize("held", [0, 2])
async def test_a_node_whose_reader_is_behind_never_resends_what_the_client_has(held: int) -> None:
    """The client resumes from an id this node's feed has not reached yet (it read it from another node).

    The history it reads is up to date; the node's reader then delivers the older messages live. None of
    them, at or below `since` or the last replayed id, may reach the socket, whether or not a replay found
    any messages.
    """
    from diary_ws.backends.memory import MemoryBackend
    from diary_ws.broadcaster import Hub, Limits
    from diary_ws.messages import Draft, Message, MessageId
    from diary_ws.validation import Notification
    from tests.test_heartbeat import RecordingSink

    hub = Hub(MemoryBackend(history_size=100, history_ttl=60), Limits(10, 10, 100, 1 << 20))
    await hub.start()
    try:
        keeper = await hub.attach("u", RecordingSink())
        await hub.listen(keeper, None)
        ids = [(await hub.publish(Notification(message=f"m{i}", user_ids=("u",)))).id for i in range(5)]
        since = ids[len(ids) - 1 - held]  # `held` messages after since are still in the history to replay
        sink = RecordingSink()
        conn = await hub.attach("u", sink)
        await hub.listen(conn, since)
        # The lagging reader now delivers every message of the feed, from the first.
        for i, msg_id in enumerate(ids):
            await hub.deliver(Message.build(msg_id, None, Draft("notification", f"m{i}", None).render(msg_id)), False)
        later = await hub.publish(Notification(message="live", user_ids=("u",)))
        await async_wait_until(lambda: any('"live"' in t for t in sink.sent), 5, "the live message")
        sent = [orjson.loads(t) for t in sink.sent]
        got = [as_pair(f["id"]) for f in sent if "id" in f]
        assert got == sorted(set(got)), sent  # strictly increasing: no duplicate, no reordering
        assert [MessageId(*p) for p in got] == [*ids[len(ids) - held :], later.id], sent
        # The replay is pulled by the socket's writer, which may first run after "live" was published: then
        # "live" came with the replay (once, in order), and the resume frame counts it.
        resumes = [f for f in sent if f["type"] == "resume"]
        assert len(resumes) == 1
        assert resumes[0]["recovered"] is True
        assert resumes[0]["replayed"] in (held, held + 1)
        await conn.stop()
        await keeper.stop()
    finally:
        await hub.stop()
