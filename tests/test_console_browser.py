"""The console's operator views in headless Chromium, on a two-node Redis cluster: per-user counts summed over
the nodes, the node list, the rates and stalls, and the disconnect button (confirmed first, with the API key).

Screenshots at laptop (1366x768) and phone (390x844) size go to test-artifacts/, as in tests/test_browser.py.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.test_browser import MISSING, WAIT, WAIT_MS, shoot
from tests.test_browser import browser as browser
from tests.test_browser import page as page
from tests.utils import Server, redis_server, run_server, wait_until

with contextlib.suppress(ImportError):  # MISSING says why, and every test skips
    from playwright.sync_api import Dialog, Page, ViewportSize, expect

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

KEY = "console-key-0123456789abcdef0123"
SIZES: dict[str, ViewportSize] = {"laptop": {"width": 1366, "height": 768}, "phone": {"width": 390, "height": 844}}
# Everything an operator looks for, by size: present, visible, and inside the viewport's width.
ELEMENTS = (
    "#count-users", "#count-connections", "#user-list .user", "#user-list .chip-count", "#user-list button.secondary",
    "#rate-publishes", "#rate-deliveries", "#rate-handshakes", "#spark-publishes", "#stall-worst", "#stall-over",
    "#loop-lag", "#loop-name", "#node-list tr", "#api-key", "#send-button", "#listen-button",
)  # fmt: skip


@pytest.fixture
def cluster() -> Iterator[tuple[Server, Server]]:
    """Two nodes on one redis-server, the first with the console on."""
    with (
        redis_server() as redis,
        run_server({"broker_url": redis.url, "api_key": KEY, "console": "1"}) as first,
        run_server({"broker_url": redis.url, "api_key": KEY}) as second,
    ):
        yield first, second
        first.assert_clean_log()
        second.assert_clean_log()


def total(server: Server) -> int:
    answer = server.get("/api/v1/ws/status", headers={"X-API-Key": KEY})
    count: int = answer.json()["total_connections"]
    return count


def overflowing(page: Page) -> list[str]:
    """Elements whose right edge is past the viewport (the page must never scroll sideways)."""
    found: list[str] = page.evaluate(
        """() => [...document.querySelectorAll('body *')]
            .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 0.5)
            .map((e) => e.tagName + (e.id ? '#' + e.id : '') + '.' + e.className)"""
    )
    return found


def closed_with(ws: ClientConnection) -> int | None:
    """The close code the server sent, once the socket has closed (frames before it are skipped)."""
    try:
        for _frame in ws:
            pass
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    return ws.close_code


def test_console_lists_users_nodes_rates_and_disconnects_over_a_cluster(
    cluster: tuple[Server, Server], page: Page
) -> None:
    first, second = cluster
    with ExitStack() as sockets:
        alices = [sockets.enter_context(connect(node.listen_url("alice"))) for node in (first, first, second)]
        sockets.enter_context(connect(second.listen_url("bob")))
        wait_until(lambda: total(first) == 4, WAIT, "four sockets over the two nodes")

        page.set_viewport_size(SIZES["laptop"])
        page.goto(f"{first.http}/api/v1/ws/console")
        expect(page.locator("#status-error")).to_contain_text("401", timeout=WAIT_MS)  # the overview needs the key
        page.fill("#api-key", KEY)
        expect(page.locator("#count-connections")).to_have_text("4", timeout=WAIT_MS)
        expect(page.locator("#count-users")).to_have_text("2")
        # Most sockets first, counted over both nodes.
        expect(page.locator("#user-list .chip-id")).to_have_text(["alice", "bob"])
        expect(page.locator("#user-list .chip-count")).to_have_text(["\u00d73", "\u00d71"])
        expect(page.locator("#node-list tr")).to_have_count(2)
        here = page.locator("#node-list tr", has_text="this node")
        expect(here).to_have_count(1)
        expect(here.locator("td").nth(2)).to_have_text("2")  # alice twice on this node
        expect(page.locator("#node-list tr").nth(1).locator("td").nth(2)).to_have_text("2")  # alice and bob
        expect(page.locator("#node-list tr").first).to_contain_text(re.compile(r"\d+ s ago"))

        for i in range(5):
            assert first.post({"message": f"n{i}"}, headers={"X-API-Key": KEY}).status_code == 200
        expect(page.locator("#rate-publishes")).not_to_have_text(re.compile("^(\u2013|0\\.00)$"), timeout=WAIT_MS)
        expect(page.locator("#rate-deliveries")).not_to_have_text(re.compile("^(\u2013|0\\.00)$"))
        expect(page.locator("#stall-worst")).to_have_text(re.compile(r"^[\d.]+ m?s$"))
        expect(page.locator("#loop-name")).to_have_text(re.compile("^(asyncio|uvloop)$"))
        expect(page.locator("#spark-publishes polyline")).to_have_count(1)

        for size, viewport in SIZES.items():
            page.set_viewport_size(viewport)
            for selector in ELEMENTS:
                expect(page.locator(selector).first).to_be_visible()
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), size
            assert overflowing(page) == [], size
            shoot(page, f"console-operator-{size}.png")

        # Disconnect asks first: dismissed, nothing happens.
        page.set_viewport_size(SIZES["laptop"])
        alice_button = page.locator('#user-list .user[data-user="alice"] button.secondary')
        asked: list[str] = []

        def dismiss(dialog: Dialog) -> None:
            asked.append(dialog.message)
            dialog.dismiss()

        page.once("dialog", dismiss)
        alice_button.click()
        wait_until(lambda: bool(asked), WAIT, "the confirmation")
        assert "Disconnect alice?" in asked[0]
        assert "3 connections" in asked[0]
        assert total(first) == 4

        # Accepted: every socket of alice, on both nodes, closes with 4003; bob stays.
        page.once("dialog", lambda dialog: dialog.accept())
        alice_button.click()
        expect(page.locator("#disconnect-result.ok")).to_have_text(
            "Closed 3 connections of user alice", timeout=WAIT_MS
        )
        assert [closed_with(ws) for ws in alices] == [4003, 4003, 4003]
        expect(page.locator("#user-list .chip-id")).to_have_text(["bob"], timeout=WAIT_MS)
        expect(page.locator("#count-connections")).to_have_text("1")
        assert total(second) == 1


def test_disconnect_without_the_key_says_why(page: Page) -> None:
    with run_server({"console": "1"}) as server, connect(server.listen_url("dora")) as dora:
        page.goto(f"{server.http}/api/v1/ws/console")
        expect(page.locator("#user-list .chip-id")).to_have_text(["dora"], timeout=WAIT_MS)
        page.once("dialog", lambda dialog: dialog.accept())
        page.locator("#user-list .user button.secondary").click()
        expect(page.locator("#disconnect-result.ok")).to_have_text("Closed 1 connection of user dora", timeout=WAIT_MS)
        assert closed_with(dora) == 4003
        server.assert_clean_log()
    key = "another-key-0123456789abcdef0123"
    with run_server({"console": "1", "api_key": key}) as server, connect(server.listen_url("erin")) as erin:
        page.goto(f"{server.http}/api/v1/ws/console")
        page.fill("#api-key", key)
        expect(page.locator("#user-list .chip-id")).to_have_text(["erin"], timeout=WAIT_MS)
        page.fill("#api-key", "wrong-key-0123456789abcdef0123456")
        page.once("dialog", lambda dialog: dialog.accept())
        page.locator("#user-list .user button.secondary").click()
        expect(page.locator("#disconnect-result.error")).to_contain_text("Not disconnected: 401", timeout=WAIT_MS)
        erin.send("still open?")  # receive-only, but a frame proves the socket was not closed
        assert total_open(server, key) == 1
        server.assert_clean_log()


def total_open(server: Server, key: str) -> int:
    count: int = server.get("/api/v1/ws/status", headers={"X-API-Key": key}).json()["total_connections"]
    return count
