"""The event bus: subsystems emit, every negotiated client receives."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from qmpd.qmp.encode import encode_message
from qmpd.qmp.session import event_message

if TYPE_CHECKING:
    from qmpd.metrics import Metrics
    from qmpd.schema import Schema

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """A client connection as the bus sees it."""

    #: Whether it wants events pretty-printed (encoded once for all such sinks).
    pretty: bool

    def send_event(self, plain: bytes, pretty: bytes | None) -> None: ...


class EventBus:
    """Delivers events, encoded once, to every subscribed sink in emit order."""

    def __init__(
        self, metrics: Metrics | None = None, schema: Schema | None = None
    ) -> None:
        self.sinks: set[EventSink] = set()
        self.metrics = metrics
        self.schema = schema  # when set, event data is checked against it

    def subscribe(self, sink: EventSink) -> None:
        self.sinks.add(sink)

    def unsubscribe(self, sink: EventSink) -> None:
        self.sinks.discard(sink)

    def rehearse(self, name: str, data: dict[str, Any] | None = None) -> bytes:
        """The event encoded as :meth:`emit` encodes it, sent nowhere and
        counted nowhere: code about to emit in a hurry (a migration source's
        downtime) runs the encoder warm."""
        return encode_message(event_message(name, data))

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        if self.schema is not None:
            problems = self.schema.validate_event(name, data)
            if problems:
                log.error("event %s carries data outside its schema: %s", name, problems)
        msg = event_message(name, data)
        if self.metrics is not None:
            self.metrics.events.labels(name).inc()
        plain = encode_message(msg)
        pretty: bytes | None = None
        for sink in list(self.sinks):
            if sink.pretty and pretty is None:
                pretty = encode_message(msg, pretty=True)
            sink.send_event(plain, pretty)
