"""Fixtures: real diary-ws servers on free ports. Async tests run on anyio's pytest plugin (asyncio)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.install import Checkout, fresh_checkout
from tests.utils import Server, run_server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> Iterator[Server]:
    """A fresh server with default settings, for tests that count sockets or need nobody connected."""
    with run_server() as srv:
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
