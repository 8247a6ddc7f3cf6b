"""The contract between the edge and the uvicorn/websockets internals it touches (diary_ws/edge/internals.py).

An upgrade that moves, renames or rewrites any of them fails here, in CI, instead of half-working in
production; and a uvicorn the edge was not checked against runs the stock protocols with one warning.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from diary_ws.edge import internals
from tests.utils import ROOT, START_TIMEOUT, free_port, wait_until

EDGE = ROOT / "diary_ws" / "edge"
# Public API the edge may use without listing it: the server and config types, and uvicorn's typing aliases.
PUBLIC = {"uvicorn:Server", "uvicorn:Config", "uvicorn._types"}


@pytest.mark.parametrize("entry", internals.INTERNALS, ids=lambda e: f"{e.kind}:{e.where.split(':')[1]}")
def test_each_internal_holds_for_the_installed_versions(entry: internals.Internal) -> None:
    problem = internals.check(entry)
    assert problem is None, f"{entry.where} ({entry.why}): {problem}"


def test_the_installed_versions_are_the_checked_ones() -> None:
    assert internals.unsupported() is None


def upstream_imports(path: Path) -> set[str]:
    """Every "module:name" a file imports from uvicorn, websockets or httptools."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UPSTREAM:
            found.update(f"{node.module}:{alias.name}" for alias in node.names)
    return found


UPSTREAM = {"uvicorn", "websockets", "httptools"}


def test_every_upstream_name_the_edge_imports_is_listed() -> None:
    roots = set()
    for entry in internals.INTERNALS:
        module, _, qualified = entry.where.partition(":")
        roots.add(f"{module}:{qualified.split('.')[0]}")
    missing = set()
    for path in sorted(EDGE.glob("*.py")):
        for name in upstream_imports(path):
            if name in PUBLIC or name.split(":")[0] in PUBLIC or name in roots:
                continue
            missing.add(f"{path.name}: {name}")
    assert not missing, f"list these in diary_ws/edge/internals.py: {sorted(missing)}"


def test_an_unchecked_uvicorn_runs_the_stock_protocols_with_one_warning(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    code = (
        "import sys; import diary_ws.edge.internals as edge; edge.UVICORN_CHECKED = ('9.',);"
        "from diary_ws.cli import main; sys.exit(main(['serve']))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    env["DIARY_WS_PORT"] = str(port)
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _healthy(port, proc), START_TIMEOUT, "the fallback server")
        answer = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/ws/notification", json={"message": "hi", "user_ids": ["x"]}, timeout=5
        )
        assert answer.status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    text = log_path.read_text()
    warnings = [line for line in text.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, warnings
    assert "stock protocols" in warnings[0]
    assert "MAX_HTTP_CONNECTIONS" in warnings[0]
    assert "Traceback" not in text


def _healthy(port: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "the server exited"
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
