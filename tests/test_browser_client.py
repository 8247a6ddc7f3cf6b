"""The browser client (diary_ws/static/diary-ws.js, served at /api/v1/ws/client.js) in headless Chromium,
through the nginx recipe (deploy/nginx/, run by tests/test_nginx.py's `run_nginx`).

Each scenario is a bad day the client must live through without losing or doubling a message within the
history: a dropped network, a silent line, an expired token, an operator's disconnect, a slow-consumer close,
a restart in Redis mode (history survives) and in memory mode (it does not: `recovered: false` surfaces),
and a proxy that does not pass WebSockets (the EventSource fallback). Every message the tests send has its
id checked against what the page got, in order, each once.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page
from websockets.sync.client import ClientConnection, connect

from tests import test_browser
from tests.docs import GUIDE, block
from tests.jwt_keys import SECRET, claims, sign
from tests.tcp_proxy import TcpProxy, tcp_proxy
from tests.test_browser import MISSING, WAIT, wait_js
from tests.test_nginx import LOCATION_SNIPPET, PREFIX, Nginx, run_nginx
from tests.utils import ROOT, Server, free_port, redis_server, run_server, wait_until

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
# tests/test_browser.py's fixtures (one Chromium per module; a fresh context per test that fails on any page
# error), registered here under their own names, `browser` and `page`.
browser = test_browser.browser
page = test_browser.page

SCRIPT = "/api/v1/ws/client.js"
BEHIND_NGINX = {"root_path": PREFIX, "trusted_proxies": "127.0.0.1"}
FAST = {"backoff": {"base": 100, "cap": 1000}, "openTimeout": 2000}  # seconds, not the defaults' minutes

# Loads the module the way a page would (from the server), wires every event into `window.events` and
# every notification into `window.got`. With `tokens`, the token option is a function that hands them out in
# turn (the last one for ever), and waits while `window.holdTokens` is set.
HARNESS = """async ({script, userId, options, tokens}) => {
    const { DiaryWebSocketClient } = await import(script);
    window.got = [];
    window.events = [];
    window.tokenCalls = 0;
    const settings = { ...options };
    if (tokens) {
        settings.token = async () => {
            window.tokenCalls += 1;
            while (window.holdTokens) await new Promise((resolve) => setTimeout(resolve, 20));
            return tokens[Math.min(window.tokenCalls, tokens.length) - 1];
        };
    }
    const client = new DiaryWebSocketClient(userId, undefined, settings);
    client.onNotification((message) => window.got.push(message));
    for (const type of ["open", "close", "reconnecting", "resume", "missed", "stopped"]) {
        client.addEventListener(type, (event) => window.events.push({ type, ...event.detail }));
    }
    window.client = client;
    await client.connect();
    return client.transport;
}"""


@dataclass
class Stack:
    """diary-ws behind a TCP proxy (the network that can drop) behind the nginx recipe."""

    server: Server
    proxy: TcpProxy
    nginx: Nginx


def send(server: Server, user_id: str, message: str = "hello") -> str:
    """Publish to one user straight to the server (the network in front of it may be down); the id."""
    answer = server.post({"message": message, "user_ids": [user_id]})
    assert answer.status_code == 200, answer.text
    msg_id: str = answer.json()["id"]
    return msg_id


def connections(server: Server, total: int) -> None:
    wait_until(lambda: server.status()["total_connections"] == total, WAIT, f"{total} connections")


def start(
    page: Page, base: str, user_id: str, tokens: list[str] | None = None, page_base: str | None = None, **options: Any
) -> str:
    """Open a page (on `page_base`'s origin, by default `base`'s) that imports the client from `base` and starts
    it for `user_id`; the transport once connected."""
    page.goto(f"{page_base or base}/healthz")
    transport: str = page.evaluate(
        HARNESS, {"script": base + SCRIPT, "userId": user_id, "options": {**FAST, **options}, "tokens": tokens}
    )
    return transport


def got(page: Page, count: int) -> list[str]:
    """The ids of the first `count` notifications the page got, once it has them."""
    ids: list[str] = wait_js(page, "(n) => window.got.length >= n && window.got.slice(0, n).map((m) => m.id)", count)
    return ids


def exactly(page: Page, ids: list[str]) -> None:
    """The page got these notifications, in this order, each once (the newest arrived last: none can follow)."""
    assert got(page, len(ids)) == ids
    assert page.evaluate("window.got.length") == len(ids)
    assert len(set(ids)) == len(ids)


def event(page: Page, kind: str, **detail: Any) -> dict[str, Any]:
    """The first event of `kind` whose detail has `detail`, once there is one."""
    found: dict[str, Any] = wait_js(
        page,
        """([kind, detail]) => window.events.find((e) => e.type === kind &&
            Object.entries(detail).every(([k, v]) => e[k] === v))""",
        [kind, detail],
    )
    return found


def opened(page: Page, count: int) -> None:
    """The client is connected, for the `count`-th time at least."""
    wait_js(page, "(n) => window.client.connections >= n && window.client.isConnected", count)


def stop(page: Page) -> None:
    page.evaluate("window.client.disconnect()")


@contextlib.contextmanager
def present(server: Server, user_id: str, token: str | None = None) -> Iterator[ClientConnection]:
    """A second listener of the same user, straight to the server: the user stays connected (so a message
    sent while the page is away is stored, not a 404) whatever happens to the page's network."""
    with connect(server.listen_url(user_id, f"token={token}" if token else "")) as ws:
        yield ws


@contextlib.contextmanager
def servers(*configs: tuple[Mapping[str, str], int | None]) -> Iterator[list[Server]]:
    """Start several servers at once, (settings, port) each: a start is mostly waiting, and this file's time
    is mostly starts. All stop at the end; if one fails to start, the others stop too."""
    with contextlib.ExitStack() as running:
        managers = [run_server(settings, port=port) for settings, port in configs]
        with ThreadPoolExecutor(len(managers)) as pool:
            futures = [pool.submit(manager.__enter__) for manager in managers]
        for manager, future in zip(managers, futures, strict=True):
            if future.exception() is None:
                running.push(manager.__exit__)
        yield [future.result() for future in futures]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Per-message deflate makes every frame wait in the socket's backlog, so a message over SEND_QUEUE_BYTES
    # overflows it while the socket is still writable: a real 4008 close frame reaches the page.
    settings = {**BEHIND_NGINX, "per_message_deflate": "1", "send_queue_bytes": "1024"}
    with run_server(settings) as server, tcp_proxy(server.port) as proxy:
        with run_nginx(f"127.0.0.1:{proxy.port}") as nginx:
            yield Stack(server, proxy, nginx)
        server.assert_clean_log()


# --- serving the module ----------------------------------------------------------------------------------------


def test_the_module_is_served_with_its_type_cache_and_cors_headers(stack: Stack) -> None:
    url = f"{stack.nginx.http}{SCRIPT}"
    answer = httpx.get(url, headers={"Origin": "https://app.example"})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/javascript; charset=utf-8"
    assert answer.headers["access-control-allow-origin"] == "*"  # ALLOWED_ORIGINS is * by default
    assert answer.headers["cache-control"] == "public, max-age=600"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.content == (ROOT / "diary_ws" / "static" / "diary-ws.js").read_bytes()
    again = httpx.get(url, headers={"If-None-Match": answer.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    assert httpx.head(url).headers["etag"] == answer.headers["etag"]
    refused = httpx.post(url)
    assert (refused.status_code, refused.json()["status"]) == (405, "error")
    # The WebSocket route still owns every other path under /api/v1/ws/, and client.js is a valid user id.
    with connect(stack.server.listen_url("client.js")):
        connections(stack.server, 1)
    connections(stack.server, 0)


def test_only_an_allowed_origin_may_import_it_from_another_origin(page: Page) -> None:
    # localhost and 127.0.0.1 are two origins on one server: the page lives on one and imports from the other.
    port = free_port()
    page_base = f"http://localhost:{port}"
    with servers(({"allowed_origins": page_base}, port), ({"allowed_origins": "http://app.example"}, None)) as (
        server,
        elsewhere,
    ):
        headers = httpx.get(f"{server.http}{SCRIPT}", headers={"Origin": "http://evil.example"}).headers
        assert "access-control-allow-origin" not in headers
        assert headers["vary"] == "Origin"
        # The base URL comes from import.meta.url: the client connects to 127.0.0.1, not to the page's origin.
        assert start(page, server.http, "bc-cors", page_base=page_base) == "websocket"
        connections(server, 1)
        with httpx.stream("GET", f"{server.http}/api/v1/sse/bc-cors", headers={"Origin": page_base}) as stream:
            assert stream.headers["access-control-allow-origin"] == page_base  # for the EventSource fallback
            connections(server, 2)
        first = send(server, "bc-cors")
        exactly(page, [first])
        stop(page)
        connections(server, 0)
        # A server that allows only another origin (on another port, so not the copy the browser has cached).
        page.goto(f"http://localhost:{elsewhere.port}/healthz")
        failure = page.evaluate("(url) => import(url).then(() => 'imported', String)", f"{elsewhere.http}{SCRIPT}")
        assert "Failed to fetch dynamically imported module" in failure


def test_the_types_declare_every_public_member_option_and_event() -> None:
    """diary-ws.d.ts is written by hand (no TypeScript in the toolchain): it must not drift from the module."""
    static = ROOT / "diary_ws" / "static"
    js, dts = (static / "diary-ws.js").read_text(), (static / "diary-ws.d.ts").read_text()
    methods = set(re.findall(r"^  (?:get |async )?([a-zA-Z]\w*)\(", js, re.M)) - {"constructor"}
    fields = set(re.findall(r"^    this\.([a-zA-Z]\w*) =", js, re.M))
    defaults = js[js.index("const DEFAULTS") : js.index("});", js.index("const DEFAULTS"))]
    options = set(re.findall(r"^  (\w+):", defaults, re.M))
    events = set(re.findall(r'_emit\("(\w+)"', js))
    assert {"connect", "disconnect", "onMessage", "onNotification", "lastId"} <= methods
    assert {"isConnected", "messageHandlers", "transport"} <= fields
    assert {"token", "heartbeat", "fallback"} <= options
    assert {"open", "close", "missed", "resume", "stopped"} <= events
    for name in methods | fields:
        assert re.search(rf"^  (readonly )?{name}[(:]", dts, re.M), f"{name} is not declared in the class"
    start = dts.index("interface DiaryClientOptions")
    interface = dts[start : dts.index("\n}", start)]
    for name in options:
        assert re.search(rf"^  {name}\?:", interface, re.M), f"option {name} is not declared"
    start = dts.index("interface DiaryClientEventMap")
    event_map = dts[start : dts.index("\n}", start)]
    for name in events:
        assert re.search(rf"^  {name}: CustomEvent<", event_map, re.M), f"event {name} is not declared"


# --- bad days, through nginx -----------------------------------------------------------------------------------


def test_a_dropped_network_resumes_with_since_and_loses_nothing(stack: Stack, page: Page) -> None:
    user = "bc-drop"
    assert start(page, stack.nginx.http, user) == "websocket"
    with present(stack.server, user):
        connections(stack.server, 2)
        first = send(stack.server, user)
        exactly(page, [first])
        stack.proxy.cut()  # every connection through the network resets; new ones hang until release()
        connections(stack.server, 1)
        event(page, "close", transport="websocket")
        missed = [send(stack.server, user) for _ in range(2)]
        stack.proxy.release()
        opened(page, 2)
        resume = event(page, "resume")
        assert (resume["recovered"], resume["replayed"], resume["since"]) == (True, 2, first)
        last = send(stack.server, user)
        exactly(page, [first, *missed, last])
        # The server never sends an id twice, so the guard is fed directly: a frame it already delivered
        # (as an overlap of a replay with what came live would be) reaches no handler.
        page.evaluate("() => window.client._frame(JSON.stringify(window.got[1]))")
        assert page.evaluate("[window.got.length, window.client.duplicates]") == [4, 1]
    stop(page)
    connections(stack.server, 0)


def test_a_silent_line_is_dropped_by_the_heartbeat_watchdog(stack: Stack, page: Page) -> None:
    user = "bc-quiet"
    start(page, stack.nginx.http, user, heartbeat=1)
    first = send(stack.server, user)
    exactly(page, [first])
    # The server freezes: nginx keeps the page's connection open, and nothing comes down it any more.
    os.kill(stack.server.proc.pid, signal.SIGSTOP)
    try:
        event(page, "close", reason="heartbeat missed")
    finally:
        os.kill(stack.server.proc.pid, signal.SIGCONT)
    opened(page, 2)
    last = send(stack.server, user)
    exactly(page, [first, last])
    stop(page)
    connections(stack.server, 0)


def test_an_operators_disconnect_stops_the_client(stack: Stack, page: Page) -> None:
    user = "bc-banned"
    start(page, stack.nginx.http, user)
    connections(stack.server, 1)
    answer = httpx.delete(f"{stack.nginx.http}/api/v1/ws/users/{user}/connections", timeout=10)
    assert answer.json()["closed"] == 1
    stopped = event(page, "stopped")
    assert (stopped["code"], stopped["byServer"]) == (4003, True)
    connections(stack.server, 0)
    # Stopped for good: no reconnect waits on a timer, and a message for the user finds nobody.
    state = page.evaluate("[window.client.state, window.client._timers.size, window.client.isConnected]")
    assert state == ["stopped", 0, False]
    assert stack.server.post({"message": "anyone?", "user_ids": [user]}).status_code == 404


def test_what_cannot_work_is_refused_at_once(stack: Stack, page: Page) -> None:
    """A fixed token past its exp stops the client (connect() rejects) instead of retrying for ever; a bad user
    id or heartbeat is a TypeError in the constructor, before anything is sent."""
    expired = sign(claims(sub="bc-old", ttl=-60), SECRET, "HS256")
    page.goto(f"{stack.nginx.http}/healthz")
    outcome = page.evaluate(
        """async ({script, token}) => {
            const { DiaryWebSocketClient } = await import(script);
            const refused = (...args) => { try { new DiaryWebSocketClient(...args); } catch (e) { return e.name; } };
            const client = new DiaryWebSocketClient("bc-old", undefined, { token });
            const stopped = await client.connect().then(() => "connected", (error) => [error.code, client.state]);
            return [stopped, refused("a/b"), refused(""), refused("ok", undefined, { heartbeat: 301 })];
        }""",
        {"script": stack.nginx.http + SCRIPT, "token": expired},
    )
    assert outcome == [[4001, "stopped"], "TypeError", "TypeError", "TypeError"]
    assert stack.server.status()["total_connections"] == 0


def test_a_slow_consumer_close_resumes_and_loses_nothing(stack: Stack, page: Page) -> None:
    user = "bc-slow"
    start(page, stack.nginx.http, user, heartbeat=0)
    first = send(stack.server, user)
    exactly(page, [first])
    big = send(stack.server, user, "x" * 2000)  # over SEND_QUEUE_BYTES (1024): the server closes with 4008
    close = event(page, "close", code=4008)
    assert close["reason"] == "slow consumer: reconnect with since"
    reconnecting = event(page, "reconnecting", code=4008)
    assert reconnecting["delay"] <= 1000  # a short jittered delay, not the backoff
    assert reconnecting["since"] == first
    opened(page, 2)
    assert event(page, "resume")["replayed"] == 1  # the big one, from the history
    last = send(stack.server, user)
    exactly(page, [first, big, last])
    stop(page)
    connections(stack.server, 0)


def test_the_eventsource_fallback_when_websockets_are_blocked(stack: Stack, page: Page) -> None:
    # A second nginx from the same recipe, but passing no Upgrade header, as some proxies do.
    recipe = LOCATION_SNIPPET.read_text()
    blocked = recipe.replace("proxy_set_header Upgrade $http_upgrade;", 'proxy_set_header Upgrade "";')
    assert blocked != recipe
    user = "bc-sse"
    with run_nginx(f"127.0.0.1:{stack.proxy.port}", location=blocked) as nginx, present(stack.server, user):
        # From another origin, too: the stream carries the CORS header as the module does.
        assert start(page, nginx.http, user, page_base=f"http://localhost:{nginx.port}{PREFIX}") == "sse"
        connections(stack.server, 2)
        first = send(stack.server, user)
        exactly(page, [first])
        stack.proxy.cut()
        connections(stack.server, 1)
        event(page, "close", transport="sse")
        missed = send(stack.server, user)
        stack.proxy.release()
        opened(page, 2)
        assert event(page, "resume")["recovered"] is True
        last = send(stack.server, user)
        exactly(page, [first, missed, last])
        assert page.evaluate("window.client.transport") == "sse"
        stop(page)
        connections(stack.server, 1)


def test_an_expired_token_is_fetched_anew_and_nothing_is_lost(page: Page) -> None:
    user = "bc-token"
    long = sign(claims(sub=user), SECRET, "HS256")
    with run_server({**BEHIND_NGINX, "jwt_secret": SECRET}) as server, run_nginx(f"127.0.0.1:{server.port}") as nginx:
        short = sign(claims(sub=user, ttl=4), SECRET, "HS256")  # 3 to 4 s: exp is in whole seconds
        start(page, nginx.http, user, tokens=[short, long])
        page.evaluate("window.holdTokens = true")  # the next token waits until the test has sent a message
        assert page.evaluate("window.tokenCalls") == 1, "the short token expired before the page connected"
        with present(server, user, long):
            connections(server, 2)
            first = send(server, user)
            exactly(page, [first])
            close = event(page, "close", code=4001)  # the server closes when the first token's exp passes
            assert close["transport"] == "websocket"
            wait_js(page, "() => window.tokenCalls === 2")  # and the client asks for a new one
            missed = send(server, user)
            page.evaluate("window.holdTokens = false")
            opened(page, 2)
            assert event(page, "resume")["replayed"] == 1
            last = send(server, user)
            exactly(page, [first, missed, last])
        assert page.evaluate("window.tokenCalls") == 2
        stop(page)
        connections(server, 0)
        assert short not in server.log()
        assert long not in server.log()
        server.assert_clean_log()


def test_a_restart_in_memory_mode_surfaces_recovered_false(page: Page) -> None:
    user = "bc-memory"
    port = free_port()
    with run_server(BEHIND_NGINX, port=port) as first_server, run_nginx(f"127.0.0.1:{port}") as nginx:
        start(page, nginx.http, user)
        connections(first_server, 1)
        first = send(first_server, user)
        exactly(page, [first])
        first_server.terminate()
        first_server.assert_clean_log()
        closed = event(page, "close", code=1012)
        hinted = re.search(r"after (\d+) ms", closed["reason"])
        assert hinted is not None
        assert event(page, "reconnecting", code=1012)["delay"] == int(hinted.group(1))  # the delay the server asked
        with run_server(BEHIND_NGINX, port=port) as second_server:
            missed = event(page, "missed")  # the restarted server has no history: the page is told
            assert (missed["recovered"], missed["since"]) == (False, first)
            connections(second_server, 1)
            last = send(second_server, user)
            exactly(page, [first, last])
            assert page.evaluate("window.client.recovered") is False
            stop(page)
            connections(second_server, 0)
            second_server.assert_clean_log()


def test_a_restart_in_redis_mode_loses_and_doubles_nothing(page: Page) -> None:
    user = "bc-redis"
    port = free_port()
    with redis_server() as redis:
        settings = {**BEHIND_NGINX, "broker_url": redis.url}
        # A second node on the same Redis keeps the user present (and takes the sends) while the first restarts.
        with servers((settings, None), (settings, port)) as (other, node), present(other, user):
            with run_nginx(f"127.0.0.1:{port}") as nginx:
                start(page, nginx.http, user)
                connections(other, 2)  # cluster-wide
                first = send(other, user)
                exactly(page, [first])
                node.terminate()
                node.assert_clean_log()
                event(page, "close", code=1012)
                missed = [send(other, user) for _ in range(2)]
                with run_server(settings, port=port) as restarted:
                    opened(page, 2)
                    resume = event(page, "resume")
                    assert (resume["recovered"], resume["replayed"]) == (True, 2)
                    last = send(other, user)
                    exactly(page, [first, *missed, last])
                    assert page.evaluate("window.client.recovered") is True
                    stop(page)
                    connections(other, 1)
                    restarted.assert_clean_log()
            other.assert_clean_log()


# --- the docs and the guide -----------------------------------------------------------------------------------


def run_module(page: Page, base: str, code: str) -> list[str]:
    """Run `code` as a module script in a page on `base`'s origin; the page's console lines, as they come."""
    lines: list[str] = []
    page.on("console", lambda message: lines.append(message.text))
    page.goto(f"{base}/healthz")  # for the origin; Chromium's JSON viewer would not run a module script in it
    script = code.replace("http://localhost:8000", base)
    page.set_content(f"<!doctype html><title>example</title><script type=module>{script}</script>")
    return lines


def logged(page: Page, lines: list[str], text: str) -> None:
    """Wait until the page has logged `text`. Each check makes a call into the page, because the sync API
    hands console events over only while it is in a call."""
    wait_until(lambda: page.evaluate("true") and text in lines, WAIT, f"the page to log {text!r}")


def test_the_docs_example_runs_through_nginx(stack: Stack, page: Page) -> None:
    example = block("browser-client-example")
    assert "onNotification" in example
    connections(stack.server, 0)
    lines = run_module(page, stack.nginx.http, example)
    logged(page, lines, "Listening by websocket")
    sent = stack.server.post({"message": "from the docs"})
    assert sent.status_code == 200
    logged(page, lines, "Notification received: from the docs")


def test_a_page_written_against_the_guide_moves_by_changing_one_line(stack: Stack, page: Page) -> None:
    """The guide's own usage example, cut from its text, runs unchanged once its class is replaced by the one
    import line the docs show."""
    [guide] = [b for b in re.findall(r"```javascript\n(.*?)```", GUIDE.read_text(), re.S) if "class Diary" in b]
    usage = guide[guide.index("// Usage Example") :]
    line = block("browser-client-import-line")
    assert line.startswith("import")
    assert line.count("\n") == 1
    connections(stack.server, 0)
    lines = run_module(page, stack.nginx.http, line + usage)
    connections(stack.server, 1)
    assert stack.server.post({"message": "guide"}).status_code == 200
    logged(page, lines, "Notification received: guide")
