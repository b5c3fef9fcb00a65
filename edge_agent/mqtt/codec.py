"""A sans-IO MQTT 5 codec for the edge agent: client packets to bytes, the server's byte
stream to packets. It covers what an agent needs (CONNECT, QoS 0/1 PUBLISH, PUBACK,
SUBSCRIBE, PINGREQ, DISCONNECT out; CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP,
DISCONNECT in) and nothing else: no QoS 2, no topic aliases, no enhanced authentication.

Section numbers refer to MQTT Version 5.0 (OASIS Standard, 7 March 2019).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ConnAck",
    "Decoder",
    "Disconnect",
    "MAX_VARINT",
    "Packet",
    "PingResp",
    "ProtocolError",
    "PubAck",
    "Publish",
    "SubAck",
    "Will",
    "encode_connect",
    "encode_disconnect",
    "encode_pingreq",
    "encode_puback",
    "encode_publish",
    "encode_subscribe",
    "encode_varint",
]

#: The largest value a variable byte integer holds (§1.5.5).
MAX_VARINT: Final = 268_435_455


class ProtocolError(Exception):
    """The peer sent bytes that are not MQTT 5 as we speak it (malformed packet, unknown type, bad length)."""


@dataclass(frozen=True, slots=True)
class Will:
    """The will message of a CONNECT (§3.1.3.2-3.1.3.4), without will properties."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ValueError(f"will QoS {self.qos}: must be 0, 1 or 2")
        _check_topic_name(self.topic, "will topic")


@dataclass(frozen=True, slots=True)
class ConnAck:
    """CONNACK (§3.2): the server's answer to CONNECT."""

    session_present: bool
    reason: int  # 0 success; >= 0x80 failure
    receive_maximum: int = 65535
    server_keepalive_s: int | None = None
    maximum_packet_size: int | None = None
    reason_string: str | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH (§3.3) from the server; `packet_id` is None at QoS 0."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


@dataclass(frozen=True, slots=True)
class PubAck:
    """PUBACK (§3.4): the server took (reason < 0x80) or refused a QoS 1 PUBLISH."""

    packet_id: int
    reason: int = 0


@dataclass(frozen=True, slots=True)
class SubAck:
    """SUBACK (§3.9): one reason code (granted QoS or failure) per topic filter."""

    packet_id: int
    reasons: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PingResp:
    """PINGRESP (§3.13)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """DISCONNECT (§3.14) from the server; the connection closes after it."""

    reason: int = 0
    reason_string: str | None = None


Packet = ConnAck | Publish | PubAck | SubAck | PingResp | Disconnect

# --- encoders -------------------------------------------------------------------------

_pack_publish_header_1: Final = struct.Struct(">BBH").pack  # first byte, remaining length < 128, topic length
_pack_publish_header_2: Final = struct.Struct(">BBBH").pack  # first byte, 2-byte remaining length, topic length
_pack_packet_id_no_properties: Final = struct.Struct(">HB").pack
_pack_puback_short: Final = struct.Struct(">BBH").pack
_pack_puback_reason: Final = struct.Struct(">BBHB").pack

_PINGREQ: Final = b"\xc0\x00"
_DISCONNECT_NORMAL: Final = b"\xe0\x00"


def encode_varint(value: int) -> bytes:
    """`value` as a variable byte integer (§1.5.5): 1 to 4 bytes, 7 bits each, low bits first."""
    if 0 <= value < 128:
        return bytes((value,))
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"{value} does not fit a variable byte integer (0 to {MAX_VARINT})")
    encoded = bytearray()
    while value >= 128:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def encode_connect(
    client_id: str,
    *,
    keepalive_s: int,
    clean_start: bool,
    session_expiry_s: int = 0,
    receive_maximum: int | None = None,
    will: Will | None = None,
) -> bytes:
    """CONNECT (§3.1) without user name or password; the TLS client certificate authenticates."""
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError(f"keepalive {keepalive_s} s: must be 0 to 65535")
    properties = bytearray()
    if session_expiry_s:
        if not 0 < session_expiry_s <= 0xFFFFFFFF:
            raise ValueError(f"session expiry {session_expiry_s} s: must be 0 to 4294967295")
        properties += b"\x11" + session_expiry_s.to_bytes(4, "big")
    if receive_maximum is not None:
        if not 0 < receive_maximum <= 0xFFFF:
            raise ValueError(f"receive maximum {receive_maximum}: must be 1 to 65535")
        properties += b"\x21" + receive_maximum.to_bytes(2, "big")
    flags = 0x02 if clean_start else 0x00
    payload = _encode_string(client_id, "client id")
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0x00)
        payload += b"\x00" + _encode_string(will.topic, "will topic") + _encode_binary(will.payload, "will payload")
    body = (
        b"\x00\x04MQTT\x05"
        + bytes((flags,))
        + keepalive_s.to_bytes(2, "big")
        + encode_varint(len(properties))
        + properties
        + payload
    )
    return b"\x10" + encode_varint(len(body)) + body


def encode_publish(
    topic: bytes, payload: bytes, packet_id: int, *, qos: int = 1, retain: bool = False, dup: bool = False
) -> bytes:
    """PUBLISH (§3.3) at QoS 0 or 1 without properties. `topic` is a UTF-8 topic name, taken as
    given (no wildcard check: this is the hot path); `packet_id` is not written at QoS 0."""
    topic_length = len(topic)
    if not 0 < topic_length <= 0xFFFF:
        raise ValueError(f"topic of {topic_length} bytes: must be 1 to 65535")
    if qos == 1:
        if not 0 < packet_id <= 0xFFFF:
            raise ValueError(f"packet id {packet_id}: must be 1 to 65535")
        after_topic = _pack_packet_id_no_properties(packet_id, 0)
        remaining_length = topic_length + len(payload) + 5
    elif qos == 0:
        if dup:
            raise ValueError("DUP must be 0 at QoS 0 (MQTT-3.3.1-2)")
        after_topic = b"\x00"
        remaining_length = topic_length + len(payload) + 3
    else:
        raise ValueError(f"QoS {qos} is not supported: 0 or 1")
    first = 0x30 | dup << 3 | qos << 1 | retain
    if remaining_length < 0x80:
        header = _pack_publish_header_1(first, remaining_length, topic_length)
    elif remaining_length < 0x4000:
        header = _pack_publish_header_2(first, remaining_length & 0x7F | 0x80, remaining_length >> 7, topic_length)
    else:
        header = bytes((first,)) + encode_varint(remaining_length) + topic_length.to_bytes(2, "big")
    return b"".join((header, topic, after_topic, payload))


def encode_puback(packet_id: int, reason: int = 0) -> bytes:
    """PUBACK (§3.4); a success has the 4-byte short form, any other reason no properties."""
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet id {packet_id}: must be 1 to 65535")
    if reason == 0:
        return _pack_puback_short(0x40, 2, packet_id)
    if not 0 < reason <= 0xFF:
        raise ValueError(f"reason code {reason}: must be 0 to 255")
    return _pack_puback_reason(0x40, 3, packet_id, reason)


def encode_subscribe(packet_id: int, topic_filter: str, qos: int = 1) -> bytes:
    """SUBSCRIBE (§3.8) to one filter at QoS 0 or 1 (this client does not speak QoS 2);
    no-local, retain-as-published and retain handling all 0."""
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet id {packet_id}: must be 1 to 65535")
    if qos not in (0, 1):
        raise ValueError(f"QoS {qos} is not supported: 0 or 1")
    if not topic_filter:
        raise ValueError("empty topic filter")
    body = packet_id.to_bytes(2, "big") + b"\x00" + _encode_string(topic_filter, "topic filter") + bytes((qos,))
    return b"\x82" + encode_varint(len(body)) + body


def encode_pingreq() -> bytes:
    """PINGREQ (§3.12)."""
    return _PINGREQ


def encode_disconnect(reason: int = 0) -> bytes:
    """DISCONNECT (§3.14); reason 4 asks the server to publish the will."""
    if reason == 0:
        return _DISCONNECT_NORMAL
    if not 0 < reason <= 0xFF:
        raise ValueError(f"reason code {reason}: must be 0 to 255")
    return bytes((0xE0, 1, reason))


def _encode_string(text: str, what: str) -> bytes:
    """A UTF-8 encoded string (§1.5.4): 2-byte length, then the bytes."""
    if "\x00" in text:
        raise ValueError(f"{what} holds U+0000 (MQTT-1.5.4-2)")
    return _encode_binary(text.encode(), what)


def _encode_binary(data: bytes, what: str) -> bytes:
    """Binary data (§1.5.6): 2-byte length, then the bytes."""
    if len(data) > 0xFFFF:
        raise ValueError(f"{what} of {len(data)} bytes: at most 65535")
    return len(data).to_bytes(2, "big") + data


def _check_topic_name(topic: str, what: str) -> None:
    if not topic:
        raise ValueError(f"empty {what}")
    if "+" in topic or "#" in topic:
        raise ValueError(f"{what} {topic!r} holds a wildcard")


# --- decoder --------------------------------------------------------------------------

_PACKET_NAMES: Final = (
    "reserved packet type 0",
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "AUTH",
)

#: Why a packet type cannot come from the server on this connection.
_UNEXPECTED_TYPES: Final = {
    0: "reserved packet type 0",
    1: "CONNECT: a server never sends it to a client",
    5: "PUBREC: QoS 2 is not supported (this client never publishes at QoS 2)",
    6: "PUBREL: QoS 2 is not supported (this client never subscribes at QoS 2)",
    7: "PUBCOMP: QoS 2 is not supported (this client never publishes at QoS 2)",
    8: "SUBSCRIBE: a server never sends it to a client",
    10: "UNSUBSCRIBE: a server never sends it to a client",
    11: "UNSUBACK: this client never sends UNSUBSCRIBE",
    12: "PINGREQ: a server never sends it to a client",
    15: "AUTH: enhanced authentication is not supported (this client sends no authentication method)",
}


def _first_byte_error(first: int) -> str | None:
    """What is wrong with a fixed header's first byte from the server, if anything (§2.1.2-2.1.3)."""
    packet_type, flags = first >> 4, first & 0x0F
    if packet_type in _UNEXPECTED_TYPES:
        return _UNEXPECTED_TYPES[packet_type]
    name = _PACKET_NAMES[packet_type]
    if packet_type != 3:
        return f"{name}: fixed header flags 0x{flags:x}, must be 0" if flags else None
    qos = flags >> 1 & 3
    if qos == 3:
        return f"{name}: QoS 3 (both QoS bits set)"
    if qos == 2:
        return f"{name}: QoS 2 is not supported (this client never subscribes at QoS 2)"
    if qos == 0 and flags & 0x08:
        return f"{name}: DUP flag set at QoS 0 (MQTT-3.3.1-2)"
    return None


#: The error of each possible first byte, None for a valid one: one look-up a packet.
_FIRST_BYTE_ERRORS: Final = tuple(_first_byte_error(first) for first in range(256))

_PROPERTY_BYTE: Final = 1
_PROPERTY_TWO_BYTES: Final = 2
_PROPERTY_FOUR_BYTES: Final = 4
_PROPERTY_VARINT: Final = 5
_PROPERTY_STRING: Final = 6
_PROPERTY_BINARY: Final = 7
_PROPERTY_STRING_PAIR: Final = 8

#: The type of each property by identifier (§2.2.2.2).
_PROPERTY_TYPES: Final = {
    0x01: _PROPERTY_BYTE,  # Payload Format Indicator
    0x02: _PROPERTY_FOUR_BYTES,  # Message Expiry Interval
    0x03: _PROPERTY_STRING,  # Content Type
    0x08: _PROPERTY_STRING,  # Response Topic
    0x09: _PROPERTY_BINARY,  # Correlation Data
    0x0B: _PROPERTY_VARINT,  # Subscription Identifier
    0x11: _PROPERTY_FOUR_BYTES,  # Session Expiry Interval
    0x12: _PROPERTY_STRING,  # Assigned Client Identifier
    0x13: _PROPERTY_TWO_BYTES,  # Server Keep Alive
    0x15: _PROPERTY_STRING,  # Authentication Method
    0x16: _PROPERTY_BINARY,  # Authentication Data
    0x17: _PROPERTY_BYTE,  # Request Problem Information
    0x18: _PROPERTY_FOUR_BYTES,  # Will Delay Interval
    0x19: _PROPERTY_BYTE,  # Request Response Information
    0x1A: _PROPERTY_STRING,  # Response Information
    0x1C: _PROPERTY_STRING,  # Server Reference
    0x1F: _PROPERTY_STRING,  # Reason String
    0x21: _PROPERTY_TWO_BYTES,  # Receive Maximum
    0x22: _PROPERTY_TWO_BYTES,  # Topic Alias Maximum
    0x23: _PROPERTY_TWO_BYTES,  # Topic Alias
    0x24: _PROPERTY_BYTE,  # Maximum QoS
    0x25: _PROPERTY_BYTE,  # Retain Available
    0x26: _PROPERTY_STRING_PAIR,  # User Property
    0x27: _PROPERTY_FOUR_BYTES,  # Maximum Packet Size
    0x28: _PROPERTY_BYTE,  # Wildcard Subscription Available
    0x29: _PROPERTY_BYTE,  # Subscription Identifier Available
    0x2A: _PROPERTY_BYTE,  # Shared Subscription Available
}

#: Properties that may appear more than once in one packet.
_REPEATABLE_PROPERTIES: Final = frozenset({0x0B, 0x26})

_PROPERTY_SESSION_EXPIRY: Final = 0x11
_PROPERTY_SERVER_KEEPALIVE: Final = 0x13
_PROPERTY_REASON_STRING: Final = 0x1F
_PROPERTY_RECEIVE_MAXIMUM: Final = 0x21
_PROPERTY_TOPIC_ALIAS: Final = 0x23
_PROPERTY_MAXIMUM_PACKET_SIZE: Final = 0x27

_PropertyValue = int | str | bytes


def _read_varint(buffer: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """The variable byte integer at `pos` of a packet ending at `end`, and the position after it."""
    value = 0
    for index in range(4):
        if pos >= end:
            raise ProtocolError(f"{what}: truncated variable byte integer")
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << 7 * index
        if byte < 0x80:
            if byte == 0 and index:
                raise ProtocolError(f"{what}: variable byte integer not in its shortest form (MQTT-1.5.5-1)")
            return value, pos
    raise ProtocolError(f"{what}: variable byte integer longer than 4 bytes")


def _read_properties(buffer: bytes, pos: int, end: int, what: str) -> tuple[dict[int, _PropertyValue], int]:
    """The property list at `pos` (§2.2.2) of a packet ending at `end`: the values by
    identifier (a repeatable property keeps its last value) and the position after it."""
    length, pos = _read_varint(buffer, pos, end, f"{what} property length")
    stop = pos + length
    if stop > end:
        raise ProtocolError(f"{what}: property length {length} runs past the end of the packet")
    values: dict[int, _PropertyValue] = {}
    while pos < stop:
        identifier = buffer[pos]
        pos += 1
        property_type = _PROPERTY_TYPES.get(identifier)
        if property_type is None:
            raise ProtocolError(f"{what}: unknown property identifier 0x{identifier:02x}")
        if identifier in values and identifier not in _REPEATABLE_PROPERTIES:
            raise ProtocolError(f"{what}: property 0x{identifier:02x} appears twice")
        value: _PropertyValue
        if property_type <= _PROPERTY_FOUR_BYTES:
            if pos + property_type > stop:
                raise ProtocolError(f"{what}: property 0x{identifier:02x} truncated")
            value = int.from_bytes(buffer[pos : pos + property_type], "big")
            pos += property_type
        elif property_type == _PROPERTY_VARINT:
            value, pos = _read_varint(buffer, pos, stop, f"{what} property 0x{identifier:02x}")
        else:
            value, pos = _read_length_prefixed(buffer, pos, stop, what, identifier)
            if property_type == _PROPERTY_STRING_PAIR:
                value, pos = _read_length_prefixed(buffer, pos, stop, what, identifier)
            if property_type != _PROPERTY_BINARY:
                value = _decode_utf8(value, f"{what}: property 0x{identifier:02x}")
        values[identifier] = value
    return values, pos


def _read_length_prefixed(buffer: bytes, pos: int, stop: int, what: str, identifier: int) -> tuple[bytes, int]:
    """The 2-byte-length-prefixed bytes of a property at `pos`, and the position after them."""
    if pos + 2 > stop:
        raise ProtocolError(f"{what}: property 0x{identifier:02x} truncated")
    after = pos + 2 + (buffer[pos] << 8 | buffer[pos + 1])
    if after > stop:
        raise ProtocolError(f"{what}: property 0x{identifier:02x} runs past the end of the properties")
    return buffer[pos + 2 : after], after


def _decode_utf8(data: bytes, what: str) -> str:
    """A UTF-8 encoded string's text (§1.5.4): well-formed, no U+0000."""
    try:
        text = data.decode()
    except UnicodeDecodeError as error:
        raise ProtocolError(f"{what} is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if "\x00" in text:
        raise ProtocolError(f"{what} holds U+0000 (MQTT-1.5.4-2)")
    return text


def _check_properties_end(pos: int, end: int, what: str) -> None:
    if pos != end:
        raise ProtocolError(f"{what}: {end - pos} unexpected bytes after the properties")


def _read_packet_id(buffer: bytes, pos: int, end: int, what: str) -> int:
    if pos + 2 > end:
        raise ProtocolError(f"{what}: truncated packet identifier")
    packet_id = buffer[pos] << 8 | buffer[pos + 1]
    if not packet_id:
        raise ProtocolError(f"{what}: packet identifier 0 (MQTT-2.2.1-3)")
    return packet_id


def _decode_connack(buffer: bytes, start: int, end: int, first: int) -> ConnAck:
    if end - start < 3:
        raise ProtocolError(
            f"CONNACK: remaining length {end - start}, expected 3 or more (flags, reason code, property length)"
        )
    flags = buffer[start]
    if flags & 0xFE:
        raise ProtocolError(f"CONNACK: acknowledge flags 0x{flags:02x}, bits 7-1 are reserved (MQTT-3.2.2-1)")
    properties, pos = _read_properties(buffer, start + 2, end, "CONNACK")
    _check_properties_end(pos, end, "CONNACK")
    receive_maximum = properties.get(_PROPERTY_RECEIVE_MAXIMUM, 65535)
    maximum_packet_size = properties.get(_PROPERTY_MAXIMUM_PACKET_SIZE)
    server_keepalive_s = properties.get(_PROPERTY_SERVER_KEEPALIVE)
    reason_string = properties.get(_PROPERTY_REASON_STRING)
    assert isinstance(receive_maximum, int)
    assert maximum_packet_size is None or isinstance(maximum_packet_size, int)
    assert server_keepalive_s is None or isinstance(server_keepalive_s, int)
    assert reason_string is None or isinstance(reason_string, str)
    if receive_maximum == 0:
        raise ProtocolError("CONNACK: receive maximum 0 (§3.2.2.3.3)")
    if maximum_packet_size == 0:
        raise ProtocolError("CONNACK: maximum packet size 0 (§3.2.2.3.6)")
    return ConnAck(
        session_present=bool(flags),
        reason=buffer[start + 1],
        receive_maximum=receive_maximum,
        server_keepalive_s=server_keepalive_s,
        maximum_packet_size=maximum_packet_size,
        reason_string=reason_string,
    )


def _decode_publish(buffer: bytes, start: int, end: int, first: int) -> Publish:
    if end - start < 2:
        raise ProtocolError("PUBLISH: truncated topic name length")
    topic_end = start + 2 + (buffer[start] << 8 | buffer[start + 1])
    if topic_end > end:
        raise ProtocolError(f"PUBLISH: topic name of {topic_end - start - 2} bytes runs past the end of the packet")
    if topic_end == start + 2:
        raise ProtocolError("PUBLISH: empty topic name: topic alias not supported")
    topic = _decode_utf8(buffer[start + 2 : topic_end], "PUBLISH: topic name")
    if "+" in topic or "#" in topic:
        raise ProtocolError(f"PUBLISH: topic name {topic!r} holds a wildcard (MQTT-3.3.2-2)")
    qos = first >> 1 & 3
    pos = topic_end
    packet_id: int | None = None
    if qos:
        packet_id = _read_packet_id(buffer, pos, end, "PUBLISH")
        pos += 2
    if pos >= end:
        raise ProtocolError("PUBLISH: truncated property length")
    if buffer[pos]:
        properties, pos = _read_properties(buffer, pos, end, "PUBLISH")
        if _PROPERTY_TOPIC_ALIAS in properties:
            raise ProtocolError("PUBLISH: topic alias not supported (this client allows none)")
    else:
        pos += 1
    return Publish(topic, buffer[pos:end], qos, bool(first & 0x01), bool(first & 0x08), packet_id)


def _decode_puback(buffer: bytes, start: int, end: int, first: int) -> PubAck:
    length = end - start
    packet_id = _read_packet_id(buffer, start, end, "PUBACK")
    if length == 2:
        return PubAck(packet_id)
    if length > 3:
        _check_properties_end(_read_properties(buffer, start + 3, end, "PUBACK")[1], end, "PUBACK")
    return PubAck(packet_id, buffer[start + 2])


def _decode_suback(buffer: bytes, start: int, end: int, first: int) -> SubAck:
    packet_id = _read_packet_id(buffer, start, end, "SUBACK")
    pos = _read_properties(buffer, start + 2, end, "SUBACK")[1]
    if pos == end:
        raise ProtocolError("SUBACK: no reason codes")
    return SubAck(packet_id, tuple(buffer[pos:end]))


_PING_RESPONSE: Final = PingResp()


def _decode_pingresp(buffer: bytes, start: int, end: int, first: int) -> PingResp:
    if end != start:
        raise ProtocolError(f"PINGRESP: remaining length {end - start}, must be 0")
    return _PING_RESPONSE


def _decode_disconnect(buffer: bytes, start: int, end: int, first: int) -> Disconnect:
    if end == start:
        return Disconnect()
    reason_string = None
    if end - start > 1:
        properties, pos = _read_properties(buffer, start + 1, end, "DISCONNECT")
        _check_properties_end(pos, end, "DISCONNECT")
        if _PROPERTY_SESSION_EXPIRY in properties:
            raise ProtocolError("DISCONNECT: a server must not send a session expiry interval (MQTT-3.14.2-2)")
        value = properties.get(_PROPERTY_REASON_STRING)
        assert value is None or isinstance(value, str)
        reason_string = value
    return Disconnect(buffer[start], reason_string)


#: The decoder of each packet type a server may send; `_FIRST_BYTE_ERRORS` rejects the others.
_DECODERS: Final[dict[int, Callable[[bytes, int, int, int], Packet]]] = {
    2: _decode_connack,
    3: _decode_publish,
    4: _decode_puback,
    9: _decode_suback,
    13: _decode_pingresp,
    14: _decode_disconnect,
}


class Decoder:
    """Incremental: feed() any chunk of the byte stream (a TLS record may hold several packets or part of one)."""

    __slots__ = ("_failure", "_max_packet_size", "_needed", "_tail", "_tail_size")

    def __init__(self, max_packet_size: int = 1 << 20) -> None:
        """`max_packet_size` bounds a whole packet, fixed header included (as MQTT's
        Maximum Packet Size does, §3.1.2.11.4)."""
        if max_packet_size < 5:
            raise ValueError(f"maximum packet size {max_packet_size}: at least 5 (the smallest CONNACK)")
        self._max_packet_size = max_packet_size
        #: The chunks of an incomplete packet, kept until `_needed` bytes are there.
        #: A failed decoder keeps one empty chunk, so every later feed takes the slow path and fails.
        self._tail: list[bytes] = []
        self._tail_size = 0
        self._needed = 0
        self._failure: str | None = None

    def feed(self, data: bytes) -> list[Packet]:
        """The whole packets completed by `data`, in order; a partial tail waits for the next call.
        Raises ProtocolError on bytes that are not MQTT 5; the decoder is unusable afterwards."""
        if len(data) == 4 and not self._tail and data[0] == 0x40 and data[1] == 2 and (data[2] or data[3]):
            return [PubAck(data[2] << 8 | data[3])]
        return self._feed_any(data)

    def _feed_any(self, data: bytes) -> list[Packet]:
        if self._failure is not None:
            raise ProtocolError(f"the stream failed earlier: {self._failure}")
        if self._tail:
            self._tail.append(data)
            self._tail_size += len(data)
            if self._tail_size < self._needed:
                return []
            data = b"".join(self._tail)
        try:
            packets, consumed, needed = self._split(data)
        except ProtocolError as error:
            self._failure = str(error)
            self._tail = [b""]
            raise
        if consumed == len(data):
            self._tail = []
            self._tail_size = 0
        else:
            tail = data[consumed:]
            self._tail = [tail]
            self._tail_size = len(tail)
            self._needed = needed
        return packets

    def _split(self, buffer: bytes) -> tuple[list[Packet], int, int]:
        """The whole packets at the start of `buffer`, the bytes they take, and how many bytes
        the incomplete packet after them needs before it is worth another look."""
        packets: list[Packet] = []
        size = len(buffer)
        pos = 0
        while pos < size:
            first = buffer[pos]
            error = _FIRST_BYTE_ERRORS[first]
            if error is not None:
                raise ProtocolError(error)
            index = pos + 1
            if index == size:
                return packets, pos, 2
            byte = buffer[index]
            remaining_length = byte & 0x7F
            shift = 7
            while byte & 0x80:
                if shift == 28:
                    raise ProtocolError(f"{_PACKET_NAMES[first >> 4]}: remaining length longer than 4 bytes")
                index += 1
                if index == size:
                    return packets, pos, index - pos + 1
                byte = buffer[index]
                remaining_length |= (byte & 0x7F) << shift
                shift += 7
            if byte == 0 and shift > 7:
                raise ProtocolError(
                    f"{_PACKET_NAMES[first >> 4]}: remaining length not in its shortest form (MQTT-1.5.5-1)"
                )
            start = index + 1
            end = start + remaining_length
            if end - pos > self._max_packet_size:
                raise ProtocolError(
                    f"{_PACKET_NAMES[first >> 4]}: packet of {end - pos} bytes"
                    f" over the maximum packet size of {self._max_packet_size}"
                )
            if end > size:
                return packets, pos, end - pos
            packets.append(_DECODERS[first >> 4](buffer, start, end, first))
            pos = end
        return packets, pos, 0
