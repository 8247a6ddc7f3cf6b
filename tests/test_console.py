"""The console page over HTTP: served only with CONSOLE=1, self-contained, and careful with what it renders.

What it does in a browser is tested in tests/test_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib.resources import files

import httpx
import pytest

from tests.utils import Server, run_server

PAGES = {
    "/api/v1/ws/console": "text/html; charset=utf-8",
    "/api/v1/ws/console/console.js": "text/javascript; charset=utf-8",
    "/api/v1/ws/console/console.css": "text/css; charset=utf-8",
}
STATIC = files("diary_ws").joinpath("static")


@pytest.fixture(scope="module")
def console_server() -> Iterator[Server]:
    with run_server({"console": "1"}) as srv:
        yield srv
        srv.assert_clean_log()


@pytest.mark.parametrize("path", sorted(PAGES))
def test_console_is_a_json_404_when_off(shared_server: Server, path: str) -> None:
    answer = shared_server.get(path)
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/json"
    assert "DIARY_WS_CONSOLE=1" in answer.json()["message"]


@pytest.mark.parametrize("path", sorted(PAGES))
def test_console_files_are_served_when_on(console_server: Server, path: str) -> None:
    answer = console_server.get(path)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == PAGES[path]
    assert answer.headers["x-content-type-options"] == "nosniff"
    csp = answer.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert answer.content


@pytest.mark.parametrize("path", ["/api/v1/ws/console/other.js", "/api/v1/ws/console/..%2Fsettings.py"])
def test_unknown_console_file_is_a_json_404(console_server: Server, path: str) -> None:
    answer = console_server.get(path)
    assert answer.status_code == 404
    assert answer.json()["status"] == "error"


def test_console_post_is_405(console_server: Server) -> None:
    answer = httpx.post(f"{console_server.http}/api/v1/ws/console", timeout=10)
    assert answer.status_code == 405
    assert answer.json()["status"] == "error"


@pytest.mark.parametrize("name", ["console.html", "console.js", "console.css"])
def test_console_loads_nothing_from_elsewhere(name: str) -> None:
    """No CDN, no build step: the page is these three files and nothing else."""
    text = STATIC.joinpath(name).read_text()
    assert not re.search(r"https?://", text), "an absolute URL in the console: it must work offline"
    assert "@import" not in text


def test_console_urls_are_relative_so_root_path_works() -> None:
    html = STATIC.joinpath("console.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]*)"', html) == ["console/console.css", "console/console.js"]
    js = STATIC.joinpath("console.js").read_text()
    assert re.findall(r'fetch\("([^"?]*)', js) == ["status", "notification"]
    assert not re.search(r"[\"'`]/api", js)


def test_console_never_renders_markup_from_data() -> None:
    js = STATIC.joinpath("console.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    assert "textContent" in js
