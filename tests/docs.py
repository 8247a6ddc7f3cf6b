"""The documentation as the tests read it: README.md and docs/*.md, their sections and their code blocks.

A runnable block (python, bash, js, nginx) is preceded by `<!-- block: NAME -->`, and a test fetches it by that
name with `block("NAME")`; tests/test_docs.py checks that every runnable block has a name and that some test
asks for it, so a block nobody runs fails the suite. nginx blocks are checked verbatim against deploy/nginx/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from tests.utils import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
GUIDE = DOCS / "websocket-integration-guide.md"  # the original guide, kept byte for byte: a contract, not ours
RUNNABLE = ("python", "bash", "sh", "js", "javascript", "nginx")
BLOCK_RE = re.compile(r"^<!-- block: ([a-z0-9-]+) -->\n```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FENCE_RE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def doc_paths() -> list[Path]:
    """README.md and every docs page but the guide."""
    return [README, *sorted(path for path in DOCS.glob("*.md") if path != GUIDE)]


def doc_pages() -> Iterator[tuple[Path, str]]:
    for path in doc_paths():
        yield path, path.read_text()


def page(name: str) -> str:
    """A docs page by file name (`api.md`), or the README."""
    return (README if name == "README.md" else DOCS / name).read_text()


def section(text: str, heading: str) -> str:
    """The body under a `## heading` (or `### heading`), up to the next heading of the same or a higher level."""
    found = re.search(rf"^(#+) {re.escape(heading)}\n", text, re.MULTILINE)
    assert found, f"no heading {heading!r}"
    level = len(found.group(1))
    rest = text[found.end() :]
    end = re.search(rf"^#{{1,{level}}} ", _outside_fences(rest), re.MULTILINE)
    return rest if end is None else rest[: end.start()]


def _outside_fences(text: str) -> str:
    """`text` with fenced blocks blanked (same length), so a `# comment` in a block is not a heading."""
    return FENCE_RE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def fenced(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE_RE.findall(text) if lang == language]


def named_blocks() -> dict[str, tuple[Path, str, str]]:
    """Every named block: name -> (page, language, text)."""
    found: dict[str, tuple[Path, str, str]] = {}
    for path, text in doc_pages():
        for name, language, body in BLOCK_RE.findall(text):
            assert name not in found, f"block {name!r} is named twice"
            found[name] = (path, language, body)
    return found


def block(name: str) -> str:
    """The text of the block named `name`, wherever it is."""
    return named_blocks()[name][2]
