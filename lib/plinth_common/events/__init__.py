"""The platform event bus: CloudEvents over NATS JetStream, a transactional outbox, consumers."""

from plinth_common.events.bus import EventBus, StreamSettings
from plinth_common.events.consumer import (
    ConsumerOptions,
    ConsumerSettings,
    EffectHandler,
    EventConsumer,
    Handler,
    Record,
)
from plinth_common.events.envelope import CloudEvent, event_type_of, new_event
from plinth_common.events.outbox import Outbox, OutboxRelay
from plinth_common.events.tables import create_event_tables, event_tables

__all__ = [
    "CloudEvent",
    "ConsumerOptions",
    "ConsumerSettings",
    "EffectHandler",
    "EventBus",
    "EventConsumer",
    "Handler",
    "Outbox",
    "OutboxRelay",
    "Record",
    "StreamSettings",
    "create_event_tables",
    "event_tables",
    "event_type_of",
    "new_event",
]
