"""What the broadcaster needs of a backend: ids, the retained history, and liveness."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from diary_ws.messages import Message, MessageId


class Replay(NamedTuple):
    """What a `?since=` resume gets: the retained messages for the user, and whether nothing is missing."""

    messages: list[Message]
    recovered: bool


class Backend(Protocol):
    """The small interface the Hub talks to; `memory` is the embedded default."""

    async def start(self) -> None:
        """Connect and start any reader; called once from the app's lifespan."""

    async def stop(self) -> None:
        """Release everything `start` took."""

    def ready(self) -> bool:
        """Whether publishes can be stored now."""

    async def append(self, targets: frozenset[str] | None, render: Callable[[MessageId], bytes]) -> Message:
        """Give the message its id, keep it in the history, and return it."""

    async def replay(self, user_id: str, since: MessageId) -> Replay:
        """The retained messages for `user_id` after `since`, oldest first."""
