"""A paho client on a fake non-blocking TLS socket: paho's exact bytes, with no broker
(the gateway's coalescing client and the agent's MQTT codec are checked against them)."""

from __future__ import annotations

import ssl

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class FakeTlsSocket:
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


def connected_client(
    cls: type[paho.Client], sock: FakeTlsSocket | None = None, *, manual_ack: bool = False
) -> tuple[paho.Client, FakeTlsSocket]:
    """A connected client of class `cls` on a fake socket; writes wait for `loop_write`
    unless paho writes them at once itself."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=paho.MQTTv5, manual_ack=manual_ack)
    client.__class__ = cls
    client.on_socket_register_write = lambda *_: None
    sock = sock or FakeTlsSocket()
    client._sock = sock  # type: ignore[assignment]
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED
    return client, sock
