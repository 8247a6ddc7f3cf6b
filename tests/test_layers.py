"""The layers of docs/development.md stay as drawn: imports point one way, and the public surface stays put."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import diary_ws

PACKAGE = Path(diary_ws.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def importers_of(target: str) -> set[str]:
    return {mod for mod, deps in MODULES.items() if any(d == target or d.startswith(target + ".") for d in deps)}


def in_edge(module: str) -> bool:
    return module == "diary_ws.edge" or module.startswith("diary_ws.edge.")


def test_only_cli_and_the_edge_import_uvicorn() -> None:
    importers = importers_of("uvicorn")
    assert "diary_ws.cli" in importers
    assert {m for m in importers if m != "diary_ws.cli" and not in_edge(m)} == set()


def test_only_the_edge_imports_uvicorns_protocols() -> None:
    # The edge subclasses them and lists every internal it touches (edge/internals.py); nothing else may lean on them.
    importers = importers_of("uvicorn.protocols")
    assert importers
    assert {m for m in importers if not in_edge(m)} == set()


def environment_reads(path: Path) -> list[str]:
    """What in a file reads the environment itself: a DIARY_WS_ name spelled out (what a look-up needs),
    os.getenv, or os.environ used other than as the argument of a call to one of settings.py's readers."""
    import diary_ws.settings

    readers = {name for name in dir(diary_ws.settings) if not name.startswith("_")}
    tree = ast.parse(path.read_text())
    handed: set[int] = set()  # the os.environ nodes passed straight to a settings reader
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if callee in readers:
                handed.update(id(arg) for arg in node.args)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"DIARY_WS_\w*", node.value):
            found.append(f"line {node.lineno}: the name {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in ("getenv", "environb"):
            found.append(f"line {node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "environ" and id(node) not in handed:
            found.append(f"line {node.lineno}: os.environ read here")
    return found


def test_only_settings_reads_the_environment() -> None:
    """DIARY_WS_* reach the server, the commands and the senders through settings.py only."""
    readers = {mod: found for mod, found in ((module_name(p), environment_reads(p)) for p in PACKAGE.rglob("*.py"))}
    assert readers.pop("diary_ws.settings")  # it does read it
    assert {mod: found for mod, found in readers.items() if found} == {}


def test_only_the_redis_backend_imports_redis_py() -> None:
    importers = importers_of("redis")
    assert "diary_ws.backends.redis.client" in importers
    assert all(m == "diary_ws.backends.redis" or m.startswith("diary_ws.backends.redis.") for m in importers)
    # The scripts are plain strings: readable (and testable) without a Redis client.
    assert "diary_ws.backends.redis.scripts" not in importers


@pytest.mark.parametrize("module", ["diary_ws.broadcaster", "diary_ws.backends", "diary_ws.validation"])
def test_the_core_never_imports_starlette(module: str) -> None:
    offenders = {m for m in importers_of("starlette") if m == module or m.startswith(module + ".")}
    assert not offenders


def test_routes_is_imported_only_from_above() -> None:
    assert {m for m in importers_of("diary_ws.routes") if not in_edge(m)} <= {"diary_ws.app"}


def test_nothing_below_imports_the_app_or_the_cli() -> None:
    assert importers_of("diary_ws.cli") == {"diary_ws.__main__"}
    assert importers_of("diary_ws.app") <= {"diary_ws", "diary_ws.cli"}


def test_the_protocols_are_a_leaf_every_layer_may_import() -> None:
    ours = {d for d in MODULES["diary_ws.protocols"] if d.startswith("diary_ws")}
    assert ours <= {"diary_ws.errors", "diary_ws.messages"}, ours
    assert not {d for d in MODULES["diary_ws.protocols"] if d.split(".")[0] in ("starlette", "uvicorn", "redis")}


def test_each_seam_is_defined_once() -> None:
    """Every Protocol lives in protocols.py, and no other module declares a class of a seam's name."""
    defined: dict[str, list[str]] = {}
    protocols: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                defined.setdefault(node.name, []).append(module_name(path))
                if any(isinstance(base, ast.Name) and base.id == "Protocol" for base in node.bases):
                    protocols.add(module_name(path))
    assert protocols == {"diary_ws.protocols"}
    for name in ("Sink", "SocketControl", "StreamControl", "SharedStore", "Node", "Backend", "PublishResult", "Answer"):
        assert defined.get(name, []) == ["diary_ws.errors" if name == "Answer" else "diary_ws.protocols"], name


def test_leaf_helpers_import_no_other_layer() -> None:
    for leaf in ("diary_ws.errors", "diary_ws.messages", "diary_ws.settings", "diary_ws.deadline"):
        ours = {d for d in MODULES[leaf] if d.startswith("diary_ws")}
        assert ours <= {"diary_ws.errors"}, (leaf, ours)


def test_public_surface() -> None:
    assert sorted(diary_ws.__all__) == [
        "AsyncSender", "DiaryWSError", "Failed", "Hub", "NoListeners", "NobodyListening", "NotStarted", "Notification",
        "Presence", "PublishResult", "Refused", "Sender", "SenderError", "Sent", "Settings", "SharedInMemory",
        "Unavailable", "ValidationError", "__version__", "create_app", "lifespan",
    ]  # fmt: skip
    for name in diary_ws.__all__:
        assert hasattr(diary_ws, name)


def diary_imports(module: str) -> set[str]:
    """`module` and every diary_ws module it imports, transitively (the package `__init__` aside)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(d for d in MODULES.get(current, ()) if d in MODULES and d != "diary_ws")
    return seen


@pytest.mark.parametrize("client", ["diary_ws.client", "diary_ws.sender"])
def test_the_clients_stand_alone(client: str) -> None:
    # Usable from any program: no server stack in the client or in anything of ours it imports.
    reached = diary_imports(client)
    assert client in reached
    for module in reached:
        heavy = {d for d in MODULES[module] if d.split(".")[0] in {"uvicorn", "starlette"}}
        assert not heavy, (module, heavy)
    assert not reached & {"diary_ws.app", "diary_ws.routes", "diary_ws.server", "diary_ws.cli"}
    assert not {m for m in reached if in_edge(m)}


@pytest.mark.parametrize("leaf", ["diary_ws.auth", "diary_ws.ratelimit", "diary_ws.idempotency", "diary_ws.logs"])
def test_security_helpers_are_leaves(leaf: str) -> None:
    ours = {d for d in MODULES[leaf] if d.startswith("diary_ws")}
    assert ours <= {
        "diary_ws.errors",
        "diary_ws.settings",
        "diary_ws.validation",
        "diary_ws.messages",
        "diary_ws.deadline",
        "diary_ws.protocols",
    }, ours
    assert not {d for d in MODULES[leaf] if d.split(".")[0] in ("starlette", "uvicorn")}
