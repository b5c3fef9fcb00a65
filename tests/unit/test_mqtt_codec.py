"""The agent's MQTT 5 codec: frames as paho frames, decodes whatever the chunking, and
rejects malformed input with a ProtocolError that says what is wrong."""

from __future__ import annotations

from collections.abc import Callable

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.mqtt.codec import (
    MAX_VARINT,
    ConnAck,
    Decoder,
    Disconnect,
    Packet,
    PingResp,
    ProtocolError,
    PubAck,
    Publish,
    SubAck,
    Will,
    encode_connect,
    encode_disconnect,
    encode_pingreq,
    encode_puback,
    encode_publish,
    encode_subscribe,
    encode_varint,
)
from tests.paho_fake import connected_client

_PAHO, _ = connected_client(paho.Client)


def _paho_varint(value: int) -> bytes:
    return bytes(_PAHO._pack_remaining_length(bytearray(), value))


def _frame(first: int, body: bytes) -> bytes:
    """A packet from the server: first byte, remaining length (paho's encoding), body."""
    return bytes((first,)) + _paho_varint(len(body)) + body


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _feed_byte_at_a_time(decoder: Decoder, data: bytes) -> list[Packet]:
    decoded: list[Packet] = []
    for index in range(len(data)):
        decoded += decoder.feed(data[index : index + 1])
    return decoded


def _decode_all(data: bytes, decoder: Decoder | None = None) -> list[Packet]:
    return (decoder or Decoder()).feed(data)


# --- encoders ---------------------------------------------------------------------------

_TOPIC_TEXT = st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="+#\x00"), min_size=1, max_size=40)
_PAYLOAD = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([110, 120, 16_360, 16_400, 20_000]).map(
        lambda n: bytes(range(256)) * (n // 256) + b"x" * (n % 256)
    ),
)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (MAX_VARINT, b"\xff\xff\xff\x7f"),
    ],
)
def test_varint_boundaries_match_the_spec_table(value: int, encoded: bytes) -> None:
    # The table of §1.5.5.
    assert encode_varint(value) == encoded == _paho_varint(value)


@given(st.integers(0, MAX_VARINT))
def test_varint_is_pahos(value: int) -> None:
    assert encode_varint(value) == _paho_varint(value)


@pytest.mark.parametrize("value", [-1, MAX_VARINT + 1])
def test_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="variable byte integer"):
        encode_varint(value)


@settings(deadline=None, max_examples=150)
@given(topic=_TOPIC_TEXT, payload=_PAYLOAD, qos=st.sampled_from([0, 1]), retain=st.booleans())
def test_publish_frames_are_pahos(topic: str, payload: bytes, qos: int, retain: bool) -> None:
    client, sock = connected_client(paho.Client)
    mid = client.publish(topic, payload, qos, retain).mid
    client.loop_write()
    framed = encode_publish(topic.encode(), payload, mid, qos=qos, retain=retain)
    assert framed == b"".join(sock.out)
    expected = Publish(topic, payload, qos, retain, False, mid if qos else None)
    assert _decode_all(framed) == [expected]


def test_publish_dup_flag_and_20k_payload_round_trip() -> None:
    payload = bytes(range(256)) * 78 + b"t" * 32  # 20,000 bytes
    assert len(payload) == 20_000
    framed = encode_publish(b"bl/v1/dev-1/up/status", payload, 65535, qos=1, retain=True, dup=True)
    remaining = 2 + 21 + 2 + 1 + 20_000
    assert framed[:4] == bytes((0x3B,)) + encode_varint(remaining)  # DUP | QoS 1 | RETAIN; 3-byte length
    assert len(encode_varint(remaining)) == 3
    assert framed[4:] == b"\x00\x15bl/v1/dev-1/up/status" + b"\xff\xff" + b"\x00" + payload
    assert _decode_all(framed) == [Publish("bl/v1/dev-1/up/status", payload, 1, True, True, 65535)]


def test_publish_qos0_has_no_packet_id() -> None:
    assert encode_publish(b"a/b", b"hi", 9, qos=0) == b"\x30\x08\x00\x03a/b\x00hi"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qos": 2}, "QoS 2 is not supported"),
        ({"qos": 3}, "QoS 3 is not supported"),
        ({"packet_id": 0}, "packet id 0"),
        ({"packet_id": 65536}, "packet id 65536"),
        ({"topic": b""}, "topic of 0 bytes"),
        ({"topic": b"t" * 65536}, "topic of 65536 bytes"),
        ({"qos": 0, "dup": True}, "DUP must be 0 at QoS 0"),
    ],
)
def test_publish_rejects_what_it_cannot_frame(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"topic": b"a/b", "payload": b"x", "packet_id": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        encode_publish(**arguments)  # type: ignore[arg-type]


def test_connect_bytes_by_hand() -> None:
    framed = encode_connect(
        "dev-1",
        keepalive_s=30,
        clean_start=True,
        session_expiry_s=3600,
        receive_maximum=20,
        will=Will("bl/v1/dev-1/up/status", b"off"),
    )
    expected = (
        b"\x10"  # CONNECT, flags 0 (§3.1.1)
        + b"\x37"  # remaining length 55 = 10 variable header + 8 properties + 37 payload
        + b"\x00\x04MQTT"  # protocol name (§3.1.2.1)
        + b"\x05"  # protocol version 5 (§3.1.2.2)
        + b"\x2e"  # flags: will retain 0x20 | will QoS 1 0x08 | will flag 0x04 | clean start 0x02 (§3.1.2.3)
        + b"\x00\x1e"  # keep alive 30 s (§3.1.2.10)
        + b"\x08"  # property length 8 (§3.1.2.11.1)
        + b"\x11\x00\x00\x0e\x10"  # session expiry interval 3600 s (§3.1.2.11.2)
        + b"\x21\x00\x14"  # receive maximum 20 (§3.1.2.11.3)
        + b"\x00\x05dev-1"  # client identifier (§3.1.3.1)
        + b"\x00"  # will property length 0 (§3.1.3.2)
        + b"\x00\x15bl/v1/dev-1/up/status"  # will topic, 21 bytes (§3.1.3.3)
        + b"\x00\x03off"  # will payload (§3.1.3.4)
    )
    assert len(expected) == 2 + 55
    assert framed == expected


def test_connect_minimal_bytes_by_hand() -> None:
    expected = (
        b"\x10\x12"  # CONNECT, remaining length 18
        + b"\x00\x04MQTT\x05"  # protocol name, version 5
        + b"\x00"  # no clean start, no will
        + b"\x00\x3c"  # keep alive 60 s
        + b"\x00"  # no properties
        + b"\x00\x05dev-1"  # client identifier
    )
    assert encode_connect("dev-1", keepalive_s=60, clean_start=False) == expected


@pytest.mark.parametrize(
    ("clean_start", "session_expiry_s", "receive_maximum", "will"),
    [
        (True, 0, None, None),
        (False, 86_400, 100, Will("bl/v1/dev-9/up/status", b"\xa1" * 300, qos=0, retain=False)),
        (False, 0xFFFFFFFF, 65535, Will("bl/v1/dev-9/up/status", b"", qos=2)),
    ],
)
def test_connect_is_pahos(
    clean_start: bool, session_expiry_s: int, receive_maximum: int | None, will: Will | None
) -> None:
    client, sock = connected_client(paho.Client)
    client._client_id = b"dev-9"
    client._clean_start = clean_start
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if session_expiry_s:
        properties.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    client._connect_properties = properties
    if will is not None:
        client.will_set(will.topic, will.payload, will.qos, will.retain)
    client._send_connect(45)
    client.loop_write()
    assert b"".join(sock.out) == encode_connect(
        "dev-9",
        keepalive_s=45,
        clean_start=clean_start,
        session_expiry_s=session_expiry_s,
        receive_maximum=receive_maximum,
        will=will,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keepalive_s": 65536}, "keepalive"),
        ({"session_expiry_s": 1 << 32}, "session expiry"),
        ({"session_expiry_s": -1}, "session expiry"),
        ({"receive_maximum": 0}, "receive maximum"),
        ({"client_id": "a\x00b"}, "U\\+0000"),
    ],
)
def test_connect_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"client_id": "dev-1", "keepalive_s": 30, "clean_start": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        encode_connect(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("topic", "qos", "match"),
    [("", 1, "empty will topic"), ("a/#", 1, "wildcard"), ("a/+/b", 1, "wildcard"), ("a", 3, "will QoS 3")],
)
def test_will_rejects_bad_fields(topic: str, qos: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Will(topic, b"", qos=qos)


def test_small_packets_are_pahos() -> None:
    client, sock = connected_client(paho.Client)
    mid = client.subscribe("bl/v1/dev-1/down/#", 1)[1]
    assert mid is not None
    client._send_puback(7)
    client._send_pingreq()
    client.disconnect()
    client.loop_write()
    assert sock.out == [
        encode_subscribe(mid, "bl/v1/dev-1/down/#", 1),
        encode_puback(7),
        encode_pingreq(),
        encode_disconnect(),
    ]
    client, sock = connected_client(paho.Client)
    client.disconnect(ReasonCode(PacketTypes.DISCONNECT, identifier=4))
    client.loop_write()
    assert sock.out == [encode_disconnect(4)]


def test_small_packets_by_hand() -> None:
    assert encode_puback(0x1234) == b"\x40\x02\x12\x34"
    assert encode_puback(0x1234, 0x87) == b"\x40\x03\x12\x34\x87"
    # SUBSCRIBE: flags 0b0010, packet id, no properties, filter, options = QoS 0
    assert encode_subscribe(5, "a/#", 0) == b"\x82\x09\x00\x05\x00\x00\x03a/#\x00"
    assert encode_pingreq() == b"\xc0\x00"
    assert encode_disconnect() == b"\xe0\x00"
    assert encode_disconnect(4) == b"\xe0\x01\x04"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: encode_puback(0), "packet id 0"),
        (lambda: encode_puback(1, 256), "reason code 256"),
        (lambda: encode_subscribe(1, "a/#", 2), "QoS 2 is not supported"),
        (lambda: encode_subscribe(0, "a/#"), "packet id 0"),
        (lambda: encode_subscribe(1, ""), "empty topic filter"),
        (lambda: encode_disconnect(-1), "reason code -1"),
    ],
)
def test_small_packets_reject_bad_arguments(call: Callable[[], bytes], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- decoder: well-formed streams -------------------------------------------------------

_PACKET_ID = st.integers(1, 65535)
_REASON_TEXT = st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=20)


@st.composite
def _server_packets(draw: st.DrawFn) -> tuple[bytes, Packet]:
    """One packet a server may send: its bytes and what it decodes to."""
    kind = draw(st.sampled_from(["publish", "puback", "puback-props", "connack", "suback", "ping", "disconnect"]))
    if kind == "publish":
        topic, payload, qos = draw(_TOPIC_TEXT), draw(_PAYLOAD), draw(st.sampled_from([0, 1]))
        retain, dup = draw(st.booleans()), qos == 1 and draw(st.booleans())
        packet_id = draw(_PACKET_ID)
        framed = encode_publish(topic.encode(), payload, packet_id, qos=qos, retain=retain, dup=dup)
        return framed, Publish(topic, payload, qos, retain, dup, packet_id if qos else None)
    if kind == "puback":
        packet_id, reason = draw(_PACKET_ID), draw(st.sampled_from([0, 0x10, 0x80, 0x87, 0x97]))
        return encode_puback(packet_id, reason), PubAck(packet_id, reason)
    if kind == "puback-props":
        packet_id, reason, text = draw(_PACKET_ID), draw(st.sampled_from([0, 0x87])), draw(_REASON_TEXT)
        properties = b"\x1f" + _string(text) + b"\x26" + _string("k") + _string("v")
        body = packet_id.to_bytes(2, "big") + bytes((reason,)) + _paho_varint(len(properties)) + properties
        return _frame(0x40, body), PubAck(packet_id, reason)
    if kind == "connack":
        session_present, reason = draw(st.booleans()), draw(st.sampled_from([0, 0x86, 0x87]))
        receive_maximum = draw(st.none() | st.integers(1, 65535))
        reason_string = draw(st.none() | _REASON_TEXT)
        properties = b"\x22\x00\x0a"  # topic alias maximum: parsed, not kept
        if receive_maximum is not None:
            properties += b"\x21" + receive_maximum.to_bytes(2, "big")
        if reason_string is not None:
            properties += b"\x1f" + _string(reason_string)
        body = bytes((session_present, reason)) + _paho_varint(len(properties)) + properties
        expected = ConnAck(session_present, reason, receive_maximum or 65535, reason_string=reason_string)
        return _frame(0x20, body), expected
    if kind == "suback":
        packet_id, reasons = draw(_PACKET_ID), tuple(draw(st.lists(st.sampled_from([0, 1, 0x80, 0x87]), min_size=1)))
        return _frame(0x90, packet_id.to_bytes(2, "big") + b"\x00" + bytes(reasons)), SubAck(packet_id, reasons)
    if kind == "ping":
        return b"\xd0\x00", PingResp()
    reason, reason_string = draw(st.sampled_from([0, 0x8B, 0x9C])), draw(st.none() | _REASON_TEXT)
    if reason_string is None:
        return (encode_disconnect(reason) if reason else b"\xe0\x00"), Disconnect(reason)
    properties = b"\x1f" + _string(reason_string)
    body = bytes((reason,)) + _paho_varint(len(properties)) + properties
    return _frame(0xE0, body), Disconnect(reason, reason_string)


@settings(deadline=None, max_examples=300)
@given(packets=st.lists(_server_packets(), min_size=1, max_size=8), data=st.data())
def test_any_chunking_gives_the_same_packets(packets: list[tuple[bytes, Packet]], data: st.DataObject) -> None:
    stream = b"".join(framed for framed, _ in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = Decoder()
    decoded: list[Packet] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoded += decoder.feed(stream[start:end])
    assert decoded == [packet for _, packet in packets]
    assert decoder.feed(b"") == []


def test_byte_at_a_time() -> None:
    stream = (
        encode_publish(b"bl/v1/dev-1/down/cmd", b"p" * 20_000, 3)
        + encode_puback(4)
        + b"\xd0\x00"
        + encode_publish(b"x", b"", 1, qos=0)
    )
    assert _feed_byte_at_a_time(Decoder(), stream) == [
        Publish("bl/v1/dev-1/down/cmd", b"p" * 20_000, 1, False, False, 3),
        PubAck(4),
        PingResp(),
        Publish("x", b"", 0, False, False, None),
    ]


def test_puback_forms() -> None:
    decoder = Decoder()
    assert decoder.feed(b"\x40\x02\x12\x34") == [PubAck(0x1234)]  # the fast path
    assert decoder.feed(b"\x40\x03\x00\x05\x87") == [PubAck(5, 0x87)]  # reason, no properties
    assert decoder.feed(b"\x40\x04\x00\x06\x00\x00") == [PubAck(6)]  # reason, empty properties
    assert decoder.feed(b"\x40\x02\x00\x07\x40\x02\x00\x08") == [PubAck(7), PubAck(8)]


def test_four_bytes_completing_a_tail_are_not_taken_for_a_puback() -> None:
    decoder = Decoder()
    assert decoder.feed(b"\x40\x02\x00") == []
    assert decoder.feed(b"\x05\x40\x02\x00") == [PubAck(5)]
    assert decoder.feed(b"\x06") == [PubAck(6)]


def test_connack_properties() -> None:
    properties = (
        b"\x21\x00\x10"  # receive maximum 16
        + b"\x13\x00\x3c"  # server keep alive 60
        + b"\x27\x00\x01\x00\x00"  # maximum packet size 65536
        + b"\x1f"
        + _string("welcome")
        + b"\x12"
        + _string("assigned-id")  # assigned client identifier: parsed, not kept
        + b"\x26"
        + _string("k")
        + _string("v")  # user property
    )
    framed = _frame(0x20, b"\x01\x00" + _paho_varint(len(properties)) + properties)
    assert _decode_all(framed) == [ConnAck(True, 0, 16, 60, 65536, "welcome")]


def test_publish_properties_are_skipped() -> None:
    properties = b"\x02\x00\x00\x00\x3c" + b"\x0b\x80\x01" + b"\x03" + _string("application/cbor")
    body = _string("bl/v1/dev-1/down/alert") + b"\x00\x09" + _paho_varint(len(properties)) + properties + b"payload"
    framed = _frame(0x33, body)
    assert _decode_all(framed) == [Publish("bl/v1/dev-1/down/alert", b"payload", 1, True, False, 9)]


def test_max_packet_size_is_the_whole_packet() -> None:
    at_limit = _frame(0x30, _string("t") + b"\x00" + b"p" * 94)
    assert len(at_limit) == 100
    assert len(_decode_all(at_limit, Decoder(max_packet_size=100))) == 1
    decoder = Decoder(max_packet_size=100)
    with pytest.raises(ProtocolError, match="PUBLISH: packet of 101 bytes over the maximum packet size of 100"):
        decoder.feed(b"\x30\x63")  # rejected from the header alone, before the body arrives


def test_tiny_max_packet_size_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 5"):
        Decoder(max_packet_size=4)


# --- decoder: malformed input -----------------------------------------------------------

_MALFORMED = [
    # packet types a server does not send us
    (b"\x00\x00", "reserved packet type 0"),
    (b"\x10\x00", "CONNECT: a server never sends it"),
    (b"\x50\x02\x00\x01", "PUBREC: QoS 2 is not supported"),
    (b"\x62\x02\x00\x01", "PUBREL: QoS 2 is not supported"),
    (b"\x70\x02\x00\x01", "PUBCOMP: QoS 2 is not supported"),
    (b"\x82\x00", "SUBSCRIBE: a server never sends it"),
    (b"\xa2\x00", "UNSUBSCRIBE: a server never sends it"),
    (b"\xb0\x03\x00\x01\x00", "UNSUBACK: this client never sends UNSUBSCRIBE"),
    (b"\xc0\x00", "PINGREQ: a server never sends it"),
    (b"\xf0\x00", "AUTH: enhanced authentication is not supported"),
    # fixed header flags
    (b"\x21\x03\x00\x00\x00", "CONNACK: fixed header flags 0x1, must be 0"),
    (b"\x42\x02\x00\x01", "PUBACK: fixed header flags 0x2, must be 0"),
    (b"\x92\x04\x00\x01\x00\x00", "SUBACK: fixed header flags 0x2, must be 0"),
    (b"\xd8\x00", "PINGRESP: fixed header flags 0x8, must be 0"),
    (b"\xe1\x00", "DISCONNECT: fixed header flags 0x1, must be 0"),
    (b"\x36\x06\x00\x01a\x00\x01\x00", "PUBLISH: QoS 3"),
    (b"\x34\x06\x00\x01a\x00\x01\x00", "PUBLISH: QoS 2 is not supported"),
    (b"\x38\x04\x00\x01a\x00", "PUBLISH: DUP flag set at QoS 0"),
    # remaining length
    (b"\x30\xff\xff\xff\xff\x01", "PUBLISH: remaining length longer than 4 bytes"),
    (b"\xd0\x80\x00", "PINGRESP: remaining length not in its shortest form"),
    # truncated fields
    (b"\x30\x01\x00", "PUBLISH: truncated topic name length"),
    (b"\x30\x05\x00\x09abc", "PUBLISH: topic name of 9 bytes runs past the end of the packet"),
    (b"\x32\x04\x00\x01a\x00", "PUBLISH: truncated packet identifier"),
    (b"\x30\x03\x00\x01a", "PUBLISH: truncated property length"),
    (b"\x40\x01\x00", "PUBACK: truncated packet identifier"),
    (b"\x20\x02\x00\x00", "CONNACK: remaining length 2, expected 3 or more"),
    (b"\x90\x03\x00\x01\x00", "SUBACK: no reason codes"),
    (b"\xd0\x01\x00", "PINGRESP: remaining length 1, must be 0"),
    # packet identifiers
    (b"\x40\x02\x00\x00", "PUBACK: packet identifier 0"),
    (b"\x32\x06\x00\x01a\x00\x00\x00", "PUBLISH: packet identifier 0"),
    # property lists
    (b"\x40\x05\x00\x01\x00\x05\x00", "PUBACK: property length 5 runs past the end of the packet"),
    (b"\x40\x06\x00\x01\x00\x02\x7f\x00", "PUBACK: unknown property identifier 0x7f"),
    (b"\x40\x06\x00\x01\x00\x02\x02\x00", "PUBACK: property 0x02 truncated"),
    (b"\x40\x07\x00\x01\x00\x03\x1f\x00\x05", "PUBACK: property 0x1f runs past the end of the properties"),
    (b"\x40\x08\x00\x01\x00\x04\x1f\x00\x01\xff", "PUBACK: property 0x1f is not valid UTF-8"),
    (b"\x40\x05\x00\x01\x00\x00\x00", "PUBACK: 1 unexpected bytes after the properties"),
    (b"\x20\x09\x00\x00\x06\x21\x00\x01\x21\x00\x01", "CONNACK: property 0x21 appears twice"),
    (b"\x20\x06\x00\x00\x03\x21\x00\x00", "CONNACK: receive maximum 0"),
    (b"\x20\x08\x00\x00\x05\x27\x00\x00\x00\x00", "CONNACK: maximum packet size 0"),
    (b"\x20\x03\x02\x00\x00", "CONNACK: acknowledge flags 0x02, bits 7-1 are reserved"),
    (b"\x30\x07\x00\x01a\x03\x0b\x80\x00", "PUBLISH property 0x0b: variable byte integer not in its shortest form"),
    (b"\x30\x06\x00\x01a\x01\x0b\x80", "PUBLISH property 0x0b: truncated variable byte integer"),
    (b"\x30\x0a\x00\x01a\x05\x0b\x80\x80\x80\x80\x01", "PUBLISH property 0x0b: variable byte integer longer than 4"),
    (b"\x40\x04\x00\x01\x00\x80", "PUBACK property length: truncated variable byte integer"),
    (b"\xe0\x07\x00\x05\x11\x00\x00\x00\x0a", "DISCONNECT: a server must not send a session expiry interval"),
    # topics
    (b"\x30\x03\x00\x00\x00", "PUBLISH: empty topic name: topic alias not supported"),
    (b"\x30\x07\x00\x01a\x03\x23\x00\x01", "PUBLISH: topic alias not supported"),
    (b"\x30\x05\x00\x02\xc3\x28\x00", "PUBLISH: topic name is not valid UTF-8"),
    (b"\x30\x05\x00\x02\xed\xa0\x00", "PUBLISH: topic name is not valid UTF-8"),  # a UTF-16 surrogate
    (b"\x30\x05\x00\x02a\x00\x00", "PUBLISH: topic name holds U\\+0000"),
    (b"\x30\x05\x00\x02a#\x00", "PUBLISH: topic name 'a#' holds a wildcard"),
]


@pytest.mark.parametrize(("data", "match"), _MALFORMED)
def test_malformed_input_raises_a_specific_protocol_error(data: bytes, match: str) -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolError, match=match):
        decoder.feed(data)
    with pytest.raises(ProtocolError, match="the stream failed earlier"):
        decoder.feed(encode_puback(1))  # not even the fast path answers after a failure


@pytest.mark.parametrize(("data", "match"), _MALFORMED)
def test_malformed_input_fed_byte_at_a_time_after_a_good_packet(data: bytes, match: str) -> None:
    decoder = Decoder()
    assert decoder.feed(b"\xd0\x00") == [PingResp()]
    with pytest.raises(ProtocolError, match=match):
        _feed_byte_at_a_time(decoder, data)
