"""Real-browser tests: Debian's chromium, headless, driven by Playwright for Python.

The browser is the system's `/usr/bin/chromium` (`apt-get install chromium`; .ci/run installs it). Playwright's
own browser downloads are never used. Without chromium or the playwright package these tests skip and say so.
Screenshots of the console go to `test-artifacts/` (gitignored), or to $TEST_ARTIFACTS_DIR.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.sync.client import connect

from tests.docs import GUIDE
from tests.jwt_keys import SECRET, claims, sign
from tests.tcp_proxy import tcp_proxy
from tests.utils import ROOT, Server, free_port, run_server, wait_until

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the skip below says why
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = Path("/usr/bin/chromium")
WAIT = 10.0
WAIT_MS = WAIT * 1000
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / "test-artifacts")


def _missing() -> str | None:
    if sync_playwright is None:
        return "playwright is not installed: pip install -c constraints.txt -e '.[test]' (make install does)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: apt-get install chromium (.ci/run does); no downloaded browser is used"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not errors, errors  # an uncaught exception in the page is a failure, whatever the test saw


def blank_page(page: Page, base: str) -> None:
    """A document on the server's own origin (same-origin for EventSource), with nothing of ours in it."""
    page.goto(f"{base}/healthz")


def wait_js(page: Page, expression: str, arg: Any = None) -> Any:
    """Wait until `expression` (a function of `arg`) is truthy in the page; its value."""
    return page.wait_for_function(expression, arg=arg, timeout=WAIT_MS).json_value()


def connections(server: Server, total: int) -> None:
    wait_until(lambda: server.status()["total_connections"] == total, WAIT, f"{total} connections")


def post_ok(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    answer = server.post(body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


# --- the guide's browser client -----------------------------------------------------------------------------


def guide_class() -> str:
    """The guide's `DiaryWebSocketClient` class, cut from the guide's own text (not a copy that could drift)."""
    [block] = [b for b in re.findall(r"```javascript\n(.*?)```", GUIDE.read_text(), re.S) if "class Diary" in b]
    text: str = block[: block.index("// Usage Example")]
    return text


def test_the_guides_client_class_receives_a_notification_in_a_page(server: Server, page: Page) -> None:
    blank_page(page, server.http)
    page.add_script_tag(content=guide_class())
    page.evaluate(
        """async (base) => {
            window.received = [];
            const client = new DiaryWebSocketClient('123456789', base);
            client.onNotification((message) => window.received.push(message));
            await client.connect();
            window.client = client;
        }""",
        server.ws,
    )
    assert page.evaluate("window.client.isConnected") is True
    connections(server, 1)
    answer = post_ok(server, {"message": "Server maintenance scheduled for tomorrow"})
    assert answer["sent_count"] == 1
    [message] = wait_js(page, "window.received.length && window.received")
    assert message == {
        "type": "notification", "message": "Server maintenance scheduled for tomorrow", "id": answer["id"],
        "sent_at": message["sent_at"],
    }  # fmt: skip
    page.evaluate("window.client.disconnect()")
    connections(server, 0)


# --- EventSource ------------------------------------------------------------------------------------------------

LISTEN = """(url) => {
    window.frames = [];
    window.opened = 0;
    const source = new EventSource(url);
    source.onopen = () => { window.opened += 1; };
    source.onmessage = (event) => {
        window.frames.push({lastEventId: event.lastEventId, frame: JSON.parse(event.data)});
    };
    window.source = source;
}"""


def frames(page: Page, count: int) -> list[dict[str, Any]]:
    """The first `count` frames the page's EventSource got, once it has them."""
    got: list[dict[str, Any]] = wait_js(page, "(n) => window.frames.length >= n && window.frames.slice(0, n)", count)
    return got


def test_eventsource_resumes_by_itself_after_a_server_restart(page: Page) -> None:
    port = free_port()
    with run_server(port=port) as first:
        blank_page(page, first.http)
        page.evaluate(LISTEN, f"{first.http}/api/v1/sse/evelyn")
        connections(first, 1)
        before = post_ok(first, {"message": "before the restart"})
        [got] = frames(page, 1)
        assert got == {"lastEventId": before["id"], "frame": {**got["frame"], "message": "before the restart"}}
        assert first.terminate() < 5  # the stream ends with `retry:`; the page stays open
        first.assert_clean_log()

    with run_server(port=port) as second:
        # Nothing is done in the page: EventSource reconnects by itself, sending Last-Event-ID. The restarted
        # server has forgotten its memory history, so it says `recovered: false` and goes live.
        connections(second, 1)
        resume = frames(page, 2)[1]
        assert resume == {"lastEventId": before["id"], "frame": {"type": "resume", "recovered": False, "replayed": 0}}
        after = post_ok(second, {"message": "after the restart"})
        got = frames(page, 3)[2]
        assert (got["lastEventId"], got["frame"]["message"]) == (after["id"], "after the restart")
        assert page.evaluate("window.opened") == 2
        second.assert_clean_log()


def test_eventsource_resumes_with_last_event_id_from_a_server_that_stays_up(server: Server, page: Page) -> None:
    with tcp_proxy(server.port) as proxy, connect(server.listen_url("frida")):  # frida stays listening elsewhere
        blank_page(page, proxy.http)
        page.evaluate(LISTEN, f"{proxy.http}/api/v1/sse/frida")
        connections(server, 2)
        first = post_ok(server, {"message": "one", "user_ids": ["frida"]})
        frames(page, 1)

        proxy.cut()  # the network drops; the server sees the stream go, the page's EventSource retries
        connections(server, 1)
        missed = [post_ok(server, {"message": text, "user_ids": ["frida"]}) for text in ("two", "three")]
        assert all(answer["sent_count"] == 1 for answer in missed)  # only the WebSocket got them live
        proxy.release()

        replayed = frames(page, 4)[1:]
        assert [(f["lastEventId"], f["frame"].get("message")) for f in replayed[:2]] == [
            (missed[0]["id"], "two"), (missed[1]["id"], "three"),
        ]  # fmt: skip
        assert replayed[2]["frame"] == {"type": "resume", "recovered": True, "replayed": 2}
        live = post_ok(server, {"message": "four", "user_ids": ["frida"]})
        assert frames(page, 5)[4]["lastEventId"] == live["id"]
        assert page.evaluate("window.opened") == 2
        assert first["id"] < missed[0]["id"]


# --- the console ------------------------------------------------------------------------------------------------


def shoot(page: Page, name: str) -> Path:
    """A full-page screenshot kept as a test artifact (never in git)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_console_shows_counts_sends_and_shows_the_feed_with_resume(page: Page) -> None:
    # The console's CSP forbids eval, so the test waits with locator assertions, not wait_for_function.
    with run_server({"console": "1"}) as srv, tcp_proxy(srv.port) as proxy, connect(srv.listen_url("alice")) as alice:
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(f"{proxy.http}/api/v1/ws/console")
        expect(page.locator("#count-users")).to_have_text("1", timeout=WAIT_MS)
        expect(page.locator("#count-connections")).to_have_text("1")
        expect(page.locator("#user-list .chip-id")).to_have_text(["alice"])

        page.fill("#listen-user", "bob")
        page.click("#listen-button")
        expect(page.locator("#feed-state")).to_have_text("Listening as bob.", timeout=WAIT_MS)
        expect(page.locator("#count-connections")).to_have_text("2", timeout=WAIT_MS)
        expect(page.locator("#count-users")).to_have_text("2")
        expect(page.locator("#user-list .chip-id")).to_have_text(["alice", "bob"])

        # Markup in a message is shown as text, never rendered.
        text = "Deploy at 22:00 <img src=x onerror=alert(1)> <b>bold?</b>"
        page.fill("#message", text)
        page.check("#to-all")
        page.click("#send-button")
        expect(page.locator("#send-result")).to_contain_text("Notification sent to 2 users: 2 of 2 connections")
        expect(page.locator("#feed-list .entry")).to_have_count(1, timeout=WAIT_MS)
        expect(page.locator("#feed-list .entry-message")).to_have_text(text)
        expect(page.locator("#feed-list img, #feed-list b")).to_have_count(0)
        sent = alice.recv(timeout=WAIT)
        assert isinstance(sent, str)
        assert orjson.loads(sent)["message"] == text
        expect(page.locator("#last-id")).to_have_text(orjson.loads(sent)["id"])

        # Selecting a user chip targets that user; a bad data field shows a visible error and sends nothing.
        page.click("#user-list .chip >> text=alice")
        expect(page.locator("#to-some")).to_be_checked()
        expect(page.locator("#user-ids")).to_have_value("alice")
        expect(page.locator("#user-ids-field")).not_to_have_class(re.compile("unused"))
        page.click("text=Type and data (optional)")
        page.fill("#data", "{not json")
        page.click("#send-button")
        expect(page.locator("#send-result.error")).to_contain_text("Data is not valid JSON")
        page.fill("#data", "")

        # The network drops under the feed; a message for bob is sent meanwhile (a second bob keeps it stored).
        with connect(srv.listen_url("bob")):
            connections(srv, 3)
            proxy.cut()
            connections(srv, 2)
            expect(page.locator("#feed-state")).to_contain_text("Reconnecting in", timeout=WAIT_MS)
            missed = post_ok(srv, {"message": "sent while you were away", "user_ids": ["bob"]})
            proxy.release()
            # The console backs off about a second, then reconnects with ?since=<last id>.
            expect(page.locator("#feed-list .note")).to_have_text(
                "Resumed: 1 missed notification(s) replayed.", timeout=WAIT_MS * 2
            )
        expect(page.locator("#feed-list .entry-message").first).to_have_text("sent while you were away")
        expect(page.locator("#last-id")).to_have_text(missed["id"])

        page.fill("#message", "Everyone: the console is live")
        page.fill("#type", "release.announced")
        page.fill("#data", '{"version": "1.4.0", "notes": "<script>not run</script>"}')
        page.check("#to-all")
        expect(page.locator("#user-ids-field")).to_have_class(re.compile("unused"))  # greyed out: not used
        page.click("#send-button")
        expect(page.locator("#feed-list .entry")).to_have_count(3, timeout=WAIT_MS)
        expect(page.locator("#feed-list .entry-data").first).to_contain_text('"notes": "<script>not run</script>"')
        expect(page.locator("#count-connections")).to_have_text("2", timeout=WAIT_MS)
        shoot(page, "console-laptop.png")

        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # nothing runs off-screen
        shoot(page, "console-phone.png")
        srv.assert_clean_log()


def test_console_shows_the_servers_error_when_a_send_reaches_nobody(page: Page) -> None:
    with run_server({"console": "1"}) as srv:
        page.goto(f"{srv.http}/api/v1/ws/console")
        expect(page.locator("#count-users")).to_have_text("0", timeout=WAIT_MS)
        expect(page.locator("#users-empty")).to_be_visible()
        page.fill("#message", "hello?")
        page.click("#send-button")
        expect(page.locator("#send-result.error")).to_contain_text("Not sent: 404: ", timeout=WAIT_MS)
        page.fill("#listen-user", "not valid!")
        page.click("#listen-button")
        expect(page.locator("#feed-state.error")).to_contain_text('"not valid!" is not a valid user id')


def test_console_with_api_keys_and_listener_tokens(page: Page) -> None:
    key = "console-key-0123456789abcdef0123"
    with run_server({"console": "1", "api_key": key, "jwt_secret": SECRET}) as srv:
        page.goto(f"{srv.http}/api/v1/ws/console")
        # No key typed yet: the status needs one, and the page says so instead of showing stale numbers.
        expect(page.locator("#status-error")).to_contain_text("Could not read the status: 401", timeout=WAIT_MS)
        page.fill("#api-key", key)
        expect(page.locator("#status-error")).to_be_hidden(timeout=WAIT_MS)
        expect(page.locator("#count-users")).to_have_text("0")

        page.fill("#listen-user", "carol")
        page.click("#listen-button")  # no token: refused, and the page keeps trying and says why
        expect(page.locator("#feed-state.error")).to_contain_text("check the user id and token", timeout=WAIT_MS)
        page.click("#stop-button")
        page.fill("#listen-token", sign(claims(sub="carol"), SECRET, "HS256"))
        page.click("#listen-button")
        expect(page.locator("#feed-state")).to_have_text("Listening as carol.", timeout=WAIT_MS)
        expect(page.locator("#count-connections")).to_have_text("1", timeout=WAIT_MS)

        page.fill("#message", "only with a key")
        page.click("#send-button")
        expect(page.locator("#send-result.ok")).to_contain_text("Notification sent to 1 user", timeout=WAIT_MS)
        expect(page.locator("#feed-list .entry-message")).to_have_text("only with a key", timeout=WAIT_MS)
        assert "token=" not in srv.log().replace("token=[redacted]", "")  # the feed's token is not logged
        srv.assert_clean_log()
