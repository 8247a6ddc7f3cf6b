"""The README is the user's front door: it must name every setting and every close code the server sends."""

from __future__ import annotations

import re

import pytest

from diary_ws.settings import SPECS, env_name
from tests.utils import ROOT

README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_setting_is_documented(name: str) -> None:
    assert f"`{env_name(name)}`" in README


@pytest.mark.parametrize("code", [1000, 1008, 1009, 1011, 1012, 1013, 4001, 4003, 4008])
def test_every_close_code_is_documented(code: int) -> None:
    assert re.search(rf"^\| {code} \|", README, re.MULTILINE)


def test_the_two_commands_are_shown() -> None:
    assert "make run" in README
    assert "make test" in README
