"""A fan-out to many sockets pauses for the event loop between chunks, and still keeps every promise.

In process, with the real Hub and memory backend and sinks that record what they are handed: the pause is
the behaviour under test, so it is observed directly (what another task sees while a fan-out is under
way), never timed.
"""

from __future__ import annotations

import asyncio

import pytest

from diary_ws.backends.memory import MemoryBackend
from diary_ws.broadcaster import FANOUT_CHUNK, Hub, Limits
from diary_ws.messages import Message, MessageId
from diary_ws.protocols import WriteResult
from diary_ws.validation import Notification
from tests.utils import async_wait_until

SOCKETS = FANOUT_CHUNK * 3 + 17  # several chunks and a ragged last one


class CountingSink:
    """Takes every frame at once, as a socket with room in its buffer does, and remembers the ids."""

    def __init__(self) -> None:
        self.ids: list[MessageId] = []

    def try_write(self, message: Message) -> WriteResult:
        self.ids.append(message.id)
        return WriteResult.WROTE

    async def send_text(self, text: str, msg_id: MessageId | None) -> None:
        if msg_id is not None:  # a replayed message; the resume control frame has none
            self.ids.append(msg_id)

    async def send_heartbeat(self) -> None:
        """Not used here."""

    async def close(self, code: int, reason: str) -> None:
        """Not used here."""

    def stalled(self) -> bool:
        return False

    def abort(self) -> bool:
        return False


async def hub_with(sockets: int) -> tuple[Hub, list[CountingSink]]:
    hub = Hub(MemoryBackend(history_size=1000, history_ttl=60), Limits(sockets + 10, 4, 256, 1 << 20))
    await hub.start()
    sinks = [CountingSink() for _ in range(sockets)]
    for i, sink in enumerate(sinks):
        await hub.listen(await hub.attach(f"u{i}", sink), None)
    return hub, sinks


@pytest.mark.anyio
async def test_a_big_fan_out_lets_other_tasks_run_before_it_ends() -> None:
    hub, sinks = await hub_with(SOCKETS)
    seen_mid_way: list[int] = []

    async def probe() -> None:
        seen_mid_way.append(sum(1 for s in sinks if s.ids))

    publishing = asyncio.create_task(hub.publish(Notification(message="big", user_ids=None)))
    await asyncio.sleep(0)  # the publish starts and runs until its first pause
    await probe()
    result = await publishing
    assert result.sent_count == SOCKETS
    assert 0 < seen_mid_way[0] < SOCKETS, "the probe ran while the fan-out was under way"
    assert all(len(s.ids) == 1 for s in sinks)


@pytest.mark.anyio
async def test_concurrent_fan_outs_keep_id_order_on_every_socket() -> None:
    hub, sinks = await hub_with(SOCKETS)
    results = await asyncio.gather(*(hub.publish(Notification(message=f"m{i}", user_ids=None)) for i in range(5)))
    ids = [r.id for r in results]
    assert ids == sorted(ids)
    for sink in sinks:
        assert sink.ids == ids


@pytest.mark.anyio
async def test_a_socket_that_resumes_during_a_pause_gets_the_message_once() -> None:
    hub, _sinks = await hub_with(SOCKETS)
    before = (await hub.publish(Notification(message="before", user_ids=("u0",)))).id
    late = CountingSink()

    async def resume_mid_way() -> None:
        # A second socket of the last user: the fan-out reaches that user after the pause, so the live path
        # meets a socket whose replay already had the message.
        conn = await hub.attach(f"u{SOCKETS - 1}", late)
        await hub.listen(conn, before)

    publishing = asyncio.create_task(hub.publish(Notification(message="during", user_ids=None)))
    await asyncio.sleep(0)
    await resume_mid_way()  # attaches and reads the history while the fan-out is paused
    during = (await publishing).id
    await async_wait_until(lambda: during in late.ids, 2, "the late socket to get the message")
    await asyncio.sleep(0)  # anything still queued for it runs now
    assert late.ids.count(during) == 1


@pytest.mark.anyio
async def test_a_socket_that_leaves_during_a_pause_is_skipped() -> None:
    hub, sinks = await hub_with(SOCKETS)
    last = next(c for c in hub.connections() if c.user_id == f"u{SOCKETS - 1}")
    publishing = asyncio.create_task(hub.publish(Notification(message="leaving", user_ids=None)))
    await asyncio.sleep(0)
    hub.drop(last)  # it goes while the fan-out is paused, before its turn
    result = await publishing
    assert sinks[-1].ids == []
    assert result.total_connections == SOCKETS - 1  # gone before its turn: no longer a target
    assert result.disconnected_users == 0
    assert result.sent_count == SOCKETS - 1
