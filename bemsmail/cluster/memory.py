"""The single-node cluster: an in-process bus and an ownership that says this node watches every mailbox."""

from __future__ import annotations

from collections import defaultdict

import structlog

from bemsmail.core.ports import Handler

log = structlog.get_logger(__name__)


class InProcessBus:
    """Delivers each published message to every handler of its topic, in order; one failing handler
    is logged and does not stop the others or the publisher."""

    def __init__(self) -> None:
        self._handlers: defaultdict[str, list[Handler[object]]] = defaultdict(list)

    def subscribe(self, topic: str, handler: Handler[object]) -> None:
        self._handlers[topic].append(handler)

    async def publish(self, topic: str, message: object) -> None:
        for handler in tuple(self._handlers.get(topic, ())):
            try:
                await handler(message)
            except Exception:
                log.exception("bus_handler_failed", topic=topic)


class OwnsEverything:
    """Single node: every mailbox is ours."""

    def owns(self, mailbox: str) -> bool:
        return True
