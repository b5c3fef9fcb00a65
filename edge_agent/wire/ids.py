"""Identities: the id in a certificate's CN, in topics and in the envelope's key id."""

from __future__ import annotations

import re
from enum import StrEnum

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class InvalidId(ValueError):
    """An identity that cannot be used in a topic or certificate."""


class Role(StrEnum):
    """The role carried in a certificate's OU and enforced by broker and gateway."""

    DEVICE = "device"
    OFFICER = "officer"
    OPERATOR = "operator"
    INSTALLER = "installer"
    ADMIN = "admin"
    GATEWAY = "gateway"


#: Roles whose identities publish under `bl/v1/<id>/up/...`.
SENDING_ROLES = frozenset({Role.DEVICE, Role.OFFICER})


def check_id(value: str) -> str:
    """Return `value` if it is a valid identity: 1-64 of `A-Z a-z 0-9 . _ -`, not
    starting with punctuation (so never `/`, `+`, `#`, `$` or whitespace)."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise InvalidId(
            f"invalid id {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value
