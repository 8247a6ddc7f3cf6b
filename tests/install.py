"""A fresh copy of the checkout with `make install` run in it: what `make run` gives a new user."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.utils import ROOT

INSTALL_WAIT = 600.0  # a cold pip cache downloads every wheel


@dataclass(frozen=True)
class Checkout:
    path: Path
    install_output: str  # everything `make install` printed

    @property
    def venv(self) -> Path:
        return self.path / ".venv"


def copy_checkout(dest: Path) -> Path:
    """What a clean clone holds (tracked files, plus new ones git does not ignore), without .venv and friends."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def pip_env(env: dict[str, str]) -> dict[str, str]:
    """The environment without the machine's pip.conf.

    This machine's pip.conf lists local file:// indexes that hold only some projects, and pip prints a WARNING
    for every project one of them lacks: lines about the machine, not about `make run`. Without the file pip
    uses PyPI (and PIP_* variables still apply), as on a user's machine.
    """
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def user_env(**extra: str) -> dict[str, str]:
    """A new user's shell: no DIARY_WS_* settings, no active virtualenv, pip without this machine's config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIARY_WS_", "VIRTUAL_ENV"))}
    return pip_env({**env, **extra})


def fresh_checkout(dest: Path) -> Checkout:
    path = copy_checkout(dest)
    done = subprocess.run(
        ["make", "install"], cwd=path, env=user_env(), capture_output=True, text=True, timeout=INSTALL_WAIT
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return Checkout(path, output)
