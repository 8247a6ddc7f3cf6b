"""deploy/diary-ws.service, checked by systemd's own tools where they are installed.

`systemd-analyze verify` loads the unit as systemd would (unknown or misspelt directives, bad values, a missing
ExecStart binary) and `systemd-analyze security --offline` scores its sandbox. The unit's ExecStart is pointed
at this test's own `diary-ws` (the only path that changes). Running the unit needs systemd as PID 1, which a
test machine or container does not have, so this is a static check.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import ROOT

UNIT = ROOT / "deploy" / "diary-ws.service"
ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not found (apt-get install systemd): the unit is not verified"
)


def rendered(tmp: Path, text: str | None = None) -> Path:
    diary_ws = Path(sys.executable).parent / "diary-ws"
    assert diary_ws.exists()
    unit = tmp / "diary-ws.service"
    unit.write_text((text or UNIT.read_text()).replace("/opt/diary-ws/bin/diary-ws", str(diary_ws)))
    return unit


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


@needs_systemd
def test_the_unit_verifies_cleanly(tmp_path: Path) -> None:
    done = analyze("verify", str(rendered(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert not done.stderr.strip(), done.stderr  # not even a warning


@needs_systemd
def test_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a bad sandbox value is reported (on stderr; verify still exits 0 for it)."""
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=sometimes")
    done = analyze("verify", str(rendered(tmp_path, broken)))
    assert "Failed to parse protect system value" in done.stderr


@needs_systemd
def test_the_sandbox_scores_ok(tmp_path: Path) -> None:
    done = analyze("security", "--offline=yes", str(rendered(tmp_path)))
    assert done.returncode == 0, done.stderr
    found = re.search(r"Overall exposure level for diary-ws\.service: ([\d.]+)", done.stdout)
    assert found, done.stdout
    assert float(found.group(1)) <= 2.0, done.stdout  # systemd calls 0-2 "OK"; a default unit scores 9.6


def test_the_unit_runs_what_the_docs_install_and_keeps_its_secrets_out_of_the_environment() -> None:
    unit = UNIT.read_text()
    assert "ExecStart=/opt/diary-ws/bin/diary-ws serve" in unit
    assert "DynamicUser=yes" in unit
    assert "Environment=DIARY_WS_API_KEY_FILE=%d/api-keys" in unit  # the credential's path, not the key
    assert not re.search(r"^Environment=DIARY_WS_(API_KEY|JWT_SECRET)=", unit, re.MULTILINE)
    assert "SystemCallFilter=~@privileged" in unit
    assert "@resources" not in unit  # diary-ws raises its own open-file limit at start (setrlimit)
