"""The hand-written OpenAPI 3.1 document (`openapi.json`, package data), served with the app's prefix."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import orjson


@functools.cache  # package data never changes while the process runs; parse it once
def _document() -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(resources.files("diary_ws").joinpath("openapi.json").read_bytes())
    return document


def openapi_document(root_path: str = "") -> bytes:
    """The document as JSON, its server URL set to the prefix the app is mounted under (ASGI root_path)."""
    return orjson.dumps({**_document(), "servers": [{"url": root_path or "/"}]})
