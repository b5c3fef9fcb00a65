"""The whole check a receiver runs on one MQTT message, sans-IO: topic, envelope,
sender key, signature, identity agreement, data model. The key lookup is passed in."""

from __future__ import annotations

from typing import Protocol

from edge_agent.wire.envelope import Message, PublicKey, open_envelope
from edge_agent.wire.errors import TopicMismatch
from edge_agent.wire.ids import Role
from edge_agent.wire.model import validate_body
from edge_agent.wire.topics import Topic


class KeyLookup(Protocol):
    """Finds a sender's public key, raising `UnknownSender`, `Revoked`, `Expired` or
    `WrongRole` when it must not be trusted for a message from one of `roles`."""

    def key_for(self, kid: str, roles: frozenset[Role]) -> PublicKey: ...


def verify_message(topic: str, data: bytes, keys: KeyLookup, roles: frozenset[Role]) -> Message:
    """Return the verified `Message` or raise the specific `Rejected` subclass."""
    parsed = Topic.parse(topic)
    envelope = open_envelope(data)
    # Uplink topics carry the sender's id; downlink topics carry the recipient's.
    if parsed.direction == "up" and envelope.kid != parsed.sender:
        raise TopicMismatch(f"key id {envelope.kid!r} published on {parsed.sender!r}'s topic", sender=parsed.sender)
    message = envelope.verify(keys.key_for(envelope.kid, roles))
    if message.sender != envelope.kid:
        raise TopicMismatch(f"payload id {message.sender!r} differs from key id {envelope.kid!r}", sender=envelope.kid)
    if message.kind != parsed.kind:
        raise TopicMismatch(f"payload kind {message.kind!r} sent on a {parsed.kind!r} topic", sender=envelope.kid)
    validate_body(message.kind, message.body)
    return message
