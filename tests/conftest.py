"""Fixtures: real diary-ws servers on free ports. Async tests run on anyio's pytest plugin (asyncio)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.install import Checkout, fresh_checkout
from tests.utils import Server, default_loop, run_server


@pytest.fixture(autouse=True)
def server_loop(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The event loop of this test's servers: a param where the module uses ON_BOTH_LOOPS, else $TEST_LOOP if
    set (`TEST_LOOP=asyncio make test` runs the whole suite on asyncio), else None: the servers' default."""
    name: str | None = getattr(request, "param", None) or os.environ.get("TEST_LOOP") or None
    if name == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed: make install brings it")
    with default_loop(name):
        yield name


@pytest.fixture
def anyio_backend(server_loop: str | None) -> Any:
    """Async tests run on asyncio, or on uvloop where the test is parametrized so: in-process servers follow."""
    return ("asyncio", {"use_uvloop": True}) if server_loop == "uvloop" else "asyncio"


@pytest.fixture
def server(server_loop: str | None) -> Iterator[Server]:
    """A fresh server with default settings, for tests that count sockets or need nobody connected."""
    with run_server() as srv:
        if server_loop is not None:  # parametrized over the loop: make sure the server really runs on it
            assert f'loop="{server_loop}"' in srv.get("/metrics").text
        yield srv
        srv.assert_clean_log()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[Server]:
    """One server for a whole module of tests that use their own user ids."""
    with run_server() as srv:
        yield srv
        srv.assert_clean_log()


@pytest.fixture(scope="session")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Checkout:
    """A copy of this checkout where `make install` has run once, as on a new user's machine (slow: a fresh venv).

    The docs' `make run` blocks run there, never in this checkout, whose .venv the suite itself is using.
    """
    path: Path = tmp_path_factory.mktemp("checkout")
    return fresh_checkout(path)
