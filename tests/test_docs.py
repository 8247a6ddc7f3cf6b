"""The documentation is the user's front door: a short README, pages that link up, every setting, close code
and runnable block accounted for, and the integration guide shipped unchanged."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from diary_ws.settings import SPECS, env_name
from tests.docs import BLOCK_RE, DOCS, FENCE_RE, GUIDE, README, RUNNABLE, doc_pages, doc_paths, named_blocks, page
from tests.utils import ROOT

# The guide as it was handed over (sha256 of docs/websocket-integration-guide.md): it is a contract, so the
# copy must not drift. Its code blocks are run by tests/test_guide.py, test_node_client.py and test_browser.py.
GUIDE_SHA256 = "0ec3d92123a938cf1e874383a4c1a88ba0c82efe68bbe21595951c731e3ed1a4"

# Pages other branches write (README's table of contents links them already). Until they land, a link to
# one of these is allowed to dangle; a link to any other missing page fails.
PENDING_PAGES: set[str] = set()  # pages another branch adds; empty once all have landed
SETTINGS_PAGE = "configuration.md"
CLOSE_CODES_PAGE = "api.md"


def test_the_guide_is_shipped_unchanged() -> None:
    assert hashlib.sha256(GUIDE.read_bytes()).hexdigest() == GUIDE_SHA256


def test_the_readme_is_short_and_shows_the_two_commands() -> None:
    readme = README.read_text()
    assert len(readme.splitlines()) <= 200
    assert "make run" in readme
    assert "make test" in readme


def test_the_readme_links_every_page() -> None:
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", README.read_text()))
    assert {path.name for path in DOCS.glob("*.md")} <= linked
    assert linked >= PENDING_PAGES


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_setting_is_in_the_settings_table(name: str) -> None:
    assert re.search(rf"^\| `{env_name(name)}` \|", page(SETTINGS_PAGE), re.MULTILINE)


@pytest.mark.parametrize("code", [1000, 1008, 1009, 1011, 1012, 1013, 4001, 4003, 4008])
def test_every_close_code_is_documented(code: int) -> None:
    assert re.search(rf"^\| {code} \|", page(CLOSE_CODES_PAGE), re.MULTILINE)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", FENCE_RE.sub("", text), re.MULTILINE)}


@pytest.mark.parametrize("path", doc_paths(), ids=lambda p: p.name)
def test_every_link_resolves(path: Path) -> None:
    text = FENCE_RE.sub("", path.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if resolved.name in PENDING_PAGES and resolved.parent == DOCS and not resolved.exists():
            continue
        assert resolved.exists(), f"{path.name} links to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved.read_text()), f"{path.name} links to {target}: no such heading"


@pytest.mark.parametrize("path", doc_paths(), ids=lambda p: p.name)
def test_no_section_is_empty(path: Path) -> None:
    """A heading followed at once by another heading of the same or a higher level is a section with nothing in it."""
    lines = [line for line in FENCE_RE.sub("text", path.read_text()).splitlines() if line.strip()]
    for line, following in zip(lines, [*lines[1:], "# end"], strict=True):
        if line.startswith("#") and following.startswith("#"):
            level, next_level = len(line) - len(line.lstrip("#")), len(following) - len(following.lstrip("#"))
            assert next_level > level, f"{path.name}: {line!r} is empty"


def test_every_runnable_block_is_named_and_run() -> None:
    """A runnable block carries `<!-- block: NAME -->`, and some test asks for `block("NAME")`."""
    tests_text = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    for path, text in doc_pages():
        named = {body for _name, _lang, body in BLOCK_RE.findall(text)}
        for language, body in FENCE_RE.findall(text):
            if language in RUNNABLE and language != "nginx":  # nginx blocks: verbatim pieces of deploy/nginx/
                assert body in named, f"{path.name}: an unnamed {language} block: {body[:60]!r}"
    for name, (path, _language, _body) in named_blocks().items():
        assert f'block("{name}")' in tests_text, f"{path.name}: no test runs block {name!r}"


def test_every_block_has_a_language() -> None:
    for path, text in doc_pages():
        for language, body in FENCE_RE.findall(text):
            assert language, f"{path.name}: a fenced block without a language: {body[:60]!r}"


@pytest.mark.parametrize("name", [n for n, (_p, lang, _b) in named_blocks().items() if lang == "python"])
def test_python_blocks_compile_as_modules(name: str) -> None:
    """A module-level `await` or a typo is a SyntaxError here, before any server is started."""
    compile(named_blocks()[name][2], name, "exec")
