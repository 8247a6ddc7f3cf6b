"""LOG_FORMAT over a real server: JSON lines parse one by one and carry their fields; no token is logged."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.utils import Server, async_wait_until, drain_until_closed, next_frame, raw_handshake, run_server

SECRET = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"  # shaped like a JWT


def json_lines(server: Server) -> list[dict[str, Any]]:
    """Every line of the log, each parsed on its own (a line that is not one JSON object fails here)."""
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines
    entries = [orjson.loads(line) for line in lines]
    for entry in entries:
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message"} <= set(entry)
    return entries


async def overflow_a_stalled_peer(server: Server, user_id: str) -> None:
    """Publish big messages to a peer that reads nothing until its backlog overflows (a 4008 close)."""
    stalled = raw_handshake(server.port, f"/api/v1/ws/{user_id}", rcvbuf=4096)
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
        for i in range(400):
            body = {"message": f"{i} " + "x" * 60000, "user_ids": [user_id]}
            answer = await client.post("/api/v1/ws/notification", json=body)
            if answer.status_code == 404 or answer.json()["disconnected_users"]:
                break
    drain_until_closed(stalled, 10)
    stalled.close()


@pytest.mark.anyio
async def test_json_lines_parse_and_carry_the_fields() -> None:
    with run_server({"log_format": "json", "send_queue_size": "4"}) as server:
        async with connect(server.listen_url("log-a", f"token={SECRET}")) as ws:
            answer = server.post({"message": "hello", "type": "task.done"}).json()
            assert (await next_frame(ws))["id"] == answer["id"]
        await overflow_a_stalled_peer(server, "log-slow")
        await async_wait_until(lambda: "slow consumer" in server.log(), 5, "the slow-consumer line")
        server.terminate()

        entries = json_lines(server)
        publish = [e for e in entries if e.get("event") == "publish" and e["id"] == answer["id"]]
        assert len(publish) == 1, "one line per publish"
        line = publish[0]
        assert line["logger"] == "diary_ws.hub"
        assert line["level"] == "info"
        assert (line["type"], line["sent_count"], line["total_connections"], line["dropped"]) == ("task.done", 1, 1, 0)
        assert isinstance(line["duration_ms"], float)
        assert line["duration_ms"] >= 0
        assert answer["id"] in line["message"]  # the text is still there for people who read the message only

        slow = [e for e in entries if e.get("event") == "slow_consumer"]
        assert len(slow) == 1, "one line per slow-consumer close"
        assert (slow[0]["user_id"], slow[0]["close_code"], slow[0]["level"]) == ("log-slow", 4008, "warning")

        handshakes = [e for e in entries if "/api/v1/ws/log-a" in e["message"]]
        assert handshakes
        assert all("token=[redacted]" in e["message"] for e in handshakes)
        assert SECRET not in server.log()
        assert not [e for e in entries if e["level"] in ("error", "critical")]


@pytest.mark.anyio
async def test_text_lines_redact_tokens_too() -> None:
    with run_server() as server:
        async with connect(server.listen_url("log-b", f"since=1-0&token={SECRET}")) as ws:
            assert (await next_frame(ws))["type"] == "resume"
        server.terminate()
        assert "/api/v1/ws/log-b?since=1-0&token=[redacted]" in server.log()
        assert SECRET not in server.log()
        server.assert_clean_log()


def test_a_throttle_writes_one_line_a_second_per_kind_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from diary_ws.logs import Throttle

    now = [100.0]
    throttle = Throttle(interval=1.0, clock=lambda: now[0])
    logger = logging.getLogger("diary_ws.test_throttle")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for i in range(1000):
            throttle.log(logger, logging.WARNING, "refused", "refused connection %d", i)
        throttle.log(logger, logging.WARNING, "emfile", "out of files")  # another kind has its own second
        assert [r.getMessage() for r in caplog.records] == ["refused connection 0", "out of files"]
        now[0] += 1.0
        throttle.log(logger, logging.WARNING, "refused", "refused connection %d", 1000)
    # No event loop here to flush at the second's end: the next line of the kind carries the count.
    assert caplog.records[-1].getMessage() == "refused connection 1000 (and 999 more like it in the last 1 s)"
    assert len(caplog.records) == 3


@pytest.mark.anyio
async def test_a_throttle_flushes_what_it_held_when_the_second_is_over(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from diary_ws.logs import Throttle

    throttle = Throttle(interval=0.2)
    logger = logging.getLogger("diary_ws.test_throttle")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for i in range(50):
            throttle.log(logger, logging.WARNING, "burst", "line %d", i)
        await async_wait_until(lambda: len(caplog.records) == 2, 5, "the held lines' summary")
    assert caplog.records[1].getMessage() == "line 49 (and 48 more like it in the last 0.2 s)"
