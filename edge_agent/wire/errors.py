"""Why a message was rejected. Each subclass carries a stable `reason` code that the
gateway counts and reports in `/api/v1/stats`."""

from __future__ import annotations

from typing import ClassVar


class Rejected(Exception):
    """A message that must not be accepted. `sender` is set when it is known."""

    reason: ClassVar[str] = "rejected"

    def __init__(self, detail: str, *, sender: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.sender = sender

    def __str__(self) -> str:
        who = f" from {self.sender}" if self.sender else ""
        return f"{self.reason}{who}: {self.detail}"


class Malformed(Rejected):
    """Not a well-formed envelope, payload or body."""

    reason = "malformed"


class TooLarge(Rejected):
    """Bigger than the envelope size limit."""

    reason = "too_large"


class UnsupportedAlgorithm(Rejected):
    """The signed header names an algorithm this side does not accept."""

    reason = "bad_algorithm"


class BadSignature(Rejected):
    """The signature does not verify with the sender's registered key."""

    reason = "bad_signature"


class UnknownSender(Rejected):
    """No certificate is registered for the key id."""

    reason = "unknown_sender"


class Revoked(Rejected):
    """The sender's certificate has been revoked."""

    reason = "revoked"


class Expired(Rejected):
    """The sender's certificate is outside its validity period."""

    reason = "expired"


class WrongRole(Rejected):
    """The sender's certificate role may not send this kind of message."""

    reason = "wrong_role"


class TopicMismatch(Rejected):
    """Topic id, key id and payload sender disagree, or the topic kind and payload kind."""

    reason = "topic_mismatch"


class Replayed(Rejected):
    """A (sender, seq) that was already stored: a replay or a redelivery."""

    reason = "replayed"


REASONS: tuple[str, ...] = tuple(
    cls.reason
    for cls in (
        Malformed,
        TooLarge,
        UnsupportedAlgorithm,
        BadSignature,
        UnknownSender,
        Revoked,
        Expired,
        WrongRole,
        TopicMismatch,
        Replayed,
    )
)
