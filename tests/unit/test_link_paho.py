"""The link's lean paho client frames and decodes exactly as paho does."""

from __future__ import annotations

import ssl
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.link import _LeanPaho


class _Socket:
    """What paho needs of a non-blocking TLS socket; it takes at most `limit` bytes a send."""

    def __init__(self, limit: int = 1 << 30) -> None:
        self.out: list[bytes] = []
        self.inbox = bytearray()
        self.limit = limit

    def send(self, data: bytes) -> int:
        taken = bytes(data[: self.limit])
        self.out.append(taken)
        return len(taken)

    def recv(self, n: int) -> bytes:
        if not self.inbox:
            raise ssl.SSLWantReadError
        data = bytes(self.inbox[:n])
        del self.inbox[:n]
        return data

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _client(
    cls: type[paho.Client], sock: _Socket | None = None, *, manual_ack: bool = False
) -> tuple[paho.Client, _Socket]:
    """A connected client of class `cls` on a fake socket; writes wait for `loop_write`
    unless paho writes them at once itself."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=paho.MQTTv5, manual_ack=manual_ack)
    client.__class__ = cls
    client.on_socket_register_write = lambda *_: None
    sock = sock or _Socket()
    client._sock = sock  # type: ignore[assignment]
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED
    return client, sock


@pytest.mark.parametrize(
    ("topic", "payload", "qos", "retain"),
    [
        ("bl/v1/dev-1/up/telemetry", b"p" * 300, 1, False),
        ("bl/v1/dev-1/up/status", b"q" * 20_000, 1, True),  # a 3-byte remaining length
        ("bl/v1/dev-1/up/é", b"z", 0, False),
        ("bl/v1/dev-1/up/event", b"", 1, False),  # paho's own path
    ],
)
def test_publish_frames_are_pahos(topic: str, payload: bytes, qos: int, retain: bool) -> None:
    frames = []
    for cls in (paho.Client, _LeanPaho):
        client, sock = _client(cls)
        client.publish(topic, payload, qos, retain)
        client.loop_write()
        frames.append(sock.out)
    assert frames[0] == frames[1]
    assert len(frames[0]) == 1


def test_pubacks_success_fast_failure_by_paho() -> None:
    client, sock = _client(_LeanPaho)
    acks: list[tuple[int, int, bool]] = []

    def on_publish(_c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        acks.append((mid, rc.value, rc.is_failure))

    client.on_publish = on_publish
    mids = [client.publish("bl/v1/dev-1/up/telemetry", b"x" * 50, 1).mid for _ in range(4)]
    sock.inbox += bytes([0x40, 2, 0, mids[0]])  # success, short form
    sock.inbox += bytes([0x40, 3, 0, mids[1], 0x87])  # 135 not authorized
    sock.inbox += bytes([0x40, 4, 0, mids[2], 0, 0])  # success, empty properties
    sock.inbox += bytes([0x40, 2, 0, 200])  # not ours: ignored
    sock.inbox += bytes([0x40, 2, 0, mids[3]])
    while sock.inbox:  # paho reads at most one packet per message in flight per call
        client.loop_read()
    assert acks == [(mids[0], 0, False), (mids[1], 135, True), (mids[2], 0, False), (mids[3], 0, False)]
    assert client._out_messages == {}
    assert client._inflight_messages == 0
