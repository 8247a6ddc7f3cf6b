"""Installs as a new user meets them: `make run` in a fresh copy of the checkout installs the service and nothing
else, prints no warning, and serves; the start-up error for a missing Redis client says what to run.

The fresh copy (tests/install.py, the `checkout` fixture) builds a virtualenv once per session: slow.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest

from tests.docs import block
from tests.install import INSTALL_WAIT, Checkout, user_env
from tests.utils import ROOT, free_port, wait_until

# httpx is not here: diary_ws.Sender and the client commands run on it, so the service install brings it.
SERVICE_ONLY = {"pytest", "pytest-timeout", "schemathesis", "playwright", "mypy", "ruff"}


def venv_packages(checkout: Checkout) -> set[str]:
    listed = subprocess.run(
        [str(checkout.venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True, text=True, check=True, env=user_env(),
    ).stdout  # fmt: skip
    return {line.split("==")[0].lower() for line in listed.splitlines() if "==" in line}


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def warnings_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.search("warning", line, re.IGNORECASE)]


def test_the_readme_two_commands_are_the_ones_run_here() -> None:
    """The README's first block: `make run` is run below in a fresh checkout; `make test` is what runs this suite
    (.ci/run runs it too)."""
    commands = [line.split("#")[0].strip() for line in block("readme-two-commands").splitlines()]
    assert commands == ["make run", "make test"]


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_WAIT + 120)  # the first test to use the fresh checkout builds its venv
def test_make_run_installs_the_service_only_and_prints_no_warning(checkout: Checkout) -> None:
    assert not warnings_in(checkout.install_output), checkout.install_output  # the install `make run` does
    installed = venv_packages(checkout)
    assert {"diary-ws", "starlette", "uvicorn", "redis", "hiredis"} <= installed
    assert not installed & SERVICE_ONLY, installed & SERVICE_ONLY
    port = free_port()
    log = checkout.path / "make-run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["make", "run"], cwd=checkout.path, env=user_env(DIARY_WS_PORT=str(port)),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: healthy(port) or proc.poll() is not None, 60, "make run to serve", interval=0.1)
        assert proc.poll() is None, log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    output = log.read_text(errors="replace")
    assert "Application startup complete" in output
    assert not warnings_in(output), output


def test_a_missing_redis_client_says_what_to_run_from_a_checkout_and_from_an_index() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    env["DIARY_WS_BROKER_URL"] = "redis://127.0.0.1:6399/0"
    # None in sys.modules: `import redis` raises ImportError and importlib.util.find_spec("redis") is None.
    blocker = "import sys; sys.modules['redis'] = None\nfrom diary_ws.cli import main\nsys.exit(main(['serve']))\n"
    done = subprocess.run(
        [sys.executable, "-c", blocker], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done
    [line] = done.stderr.strip().splitlines()
    assert "DIARY_WS_BROKER_URL" in line
    assert "from a checkout run `make install`" in line
    assert "'.[redis]'" in line
    assert "from a package index, `pip install 'diary-ws[redis]'`" in line
