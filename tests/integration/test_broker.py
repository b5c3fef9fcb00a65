"""The broker as a user meets it: mutual TLS only, identities from certificates,
per-identity ACLs, revocation. Real Mosquitto, real certificates, paho as the client."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bluelight.broker import MIN_UPTIME_S
from certs.pki import Identity, Pki
from certs.tls import client_context
from edge_agent.wire.ids import Role
from tests.helpers import MosquittoProcess, SupervisedBroker, wait_for_port

NOT_AUTHORIZED = 135


class Peer:
    """A blocking paho MQTT 5 client for assertions on what the broker allows."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None, client_id: str) -> None:
        self.port = port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if ctx is not None:
            self.client.tls_set_context(ctx)
        self.connack = threading.Event()
        self.connect_rc: ReasonCode | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.received: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, _c: object, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self.connect_rc = rc
        self.connack.set()

    def _on_publish(self, _c: object, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        with self._cond:
            self.pubacks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, _c: object, _u: object, mid: int, rcs: list[ReasonCode], _p: object) -> None:
        with self._cond:
            self.subacks[mid] = rcs
            self._cond.notify_all()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def connect(self) -> Peer:
        self.client.connect("localhost", self.port, keepalive=30)
        self.client.loop_start()
        assert self.connack.wait(5), "no CONNACK"
        assert self.connect_rc is not None
        assert not self.connect_rc.is_failure, self.connect_rc
        return self

    def publish(self, topic: str, payload: bytes = b"x") -> int:
        info = self.client.publish(topic, payload, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.pubacks, 5), "no PUBACK"
            return int(self.pubacks[info.mid].value)

    def publish_ok(self, topic: str, payload: bytes = b"x") -> bool:
        """Accepted: success or "no matching subscribers" (16), not an error (>= 128)."""
        return self.publish(topic, payload) < 128

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.subacks, 5), "no SUBACK"
            return int(self.subacks[mid][0].value)

    def wait_received(self, count: int, timeout: float = 5) -> list[tuple[str, bytes]]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def handshake_refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True if the broker refuses the TLS session (alert, reset or close before data)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(
            raw, server_hostname="localhost"
        ) as tls:
            # TLS 1.3 reports a rejected client certificate on the first read.
            tls.sendall(_mqtt_connect_packet())
            return tls.recv(4) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def _mqtt_connect_packet() -> bytes:
    """A minimal MQTT 3.1.1 CONNECT, to tell an accepted session from a refused one."""
    client_id = b"probe"
    variable = b"\x00\x04MQTT\x04\x02\x00\x1e"
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable + payload
    return b"\x10" + bytes([len(body)]) + body


def test_valid_device_connects_and_gateway_receives(pki: Pki, broker: MosquittoProcess) -> None:
    gateway = Peer(broker.port, client_context(pki, pki.identity("gateway")), "gw-test").connect()
    assert gateway.subscribe("bl/v1/+/up/#") == 1
    device = Peer(broker.port, client_context(pki, pki.identity("dev-a")), "dev-a").connect()
    assert device.publish_ok("bl/v1/dev-a/up/telemetry", b"hello")
    assert ("bl/v1/dev-a/up/telemetry", b"hello") in gateway.wait_received(1)
    device.close()
    gateway.close()


def test_client_without_certificate_is_refused(pki: Pki, broker: MosquittoProcess) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_bundle))
    assert handshake_refused(broker.port, ctx)


def test_client_from_another_ca_is_refused(pki: Pki, broker: MosquittoProcess, tmp_path: Path) -> None:
    rogue = Pki(tmp_path / "rogue")
    rogue.init()
    ident = rogue.issue(Role.DEVICE, "dev-a")
    ctx = ssl.create_default_context(cafile=str(pki.ca_bundle))
    ctx.load_cert_chain(str(ident.chain), str(ident.key))
    assert handshake_refused(broker.port, ctx)


def test_expired_client_is_refused(pki: Pki, broker: MosquittoProcess) -> None:
    ident = pki.issue(
        Role.DEVICE,
        "dev-expired",
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
        validity=dt.timedelta(days=1),
    )
    ctx = ssl.create_default_context(cafile=str(pki.ca_bundle))
    ctx.load_cert_chain(str(ident.chain), str(ident.key))
    assert handshake_refused(broker.port, ctx)


def test_plaintext_is_refused(broker: MosquittoProcess) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw:
        raw.sendall(_mqtt_connect_packet())
        try:
            reply = raw.recv(16)
        except ConnectionResetError:
            reply = b""
    assert not reply.startswith(b"\x20"), "broker answered a plaintext CONNECT with a CONNACK"
    config = (broker.settings.work_dir / "mosquitto.conf").read_text()
    listeners = [line for line in config.splitlines() if line.startswith("listener ")]
    assert listeners == [f"listener {broker.port} 127.0.0.1"]
    assert "require_certificate true" in config
    assert "set_tcp_nodelay true" in config  # alerts are not held back by Nagle's algorithm


def test_device_cannot_publish_or_read_as_another(pki: Pki, broker: MosquittoProcess) -> None:
    gateway = Peer(broker.port, client_context(pki, pki.identity("gateway")), "gw-acl").connect()
    assert gateway.subscribe("bl/v1/+/up/#") == 1
    a = Peer(broker.port, client_context(pki, pki.identity("dev-a")), "dev-a-acl").connect()
    assert a.publish("bl/v1/dev-b/up/telemetry", b"spoof") == NOT_AUTHORIZED
    assert a.publish("bl/v1/dev-a/down/cmd", b"self-command") == NOT_AUTHORIZED
    # Mosquitto may grant a wildcard SUBACK and check read access per message instead:
    # what matters is that nothing of B's, and no other uplink, is ever delivered to A.
    a.subscribe("bl/v1/dev-b/down/#")
    a.subscribe("bl/v1/+/up/#")
    assert a.subscribe("bl/v1/dev-a/down/#") == 1
    assert gateway.publish_ok("bl/v1/dev-b/down/cmd", b"for-b")
    assert gateway.publish_ok("bl/v1/dev-a/down/cmd", b"for-a")
    received = a.wait_received(1)
    assert received == [("bl/v1/dev-a/down/cmd", b"for-a")]
    assert a.publish_ok("bl/v1/dev-a/up/telemetry", b"own")
    got = gateway.wait_received(1)
    assert [t for t, _ in got] == ["bl/v1/dev-a/up/telemetry"], "the spoofed message must never reach the gateway"
    a.close()
    gateway.close()


def test_revocation_refuses_new_connections_and_silences_live_session(pki: Pki, broker: MosquittoProcess) -> None:
    ident: Identity = pki.issue(Role.DEVICE, "dev-revoke-live")
    live = Peer(broker.port, client_context(pki, ident), "dev-revoke-live").connect()
    assert live.publish_ok("bl/v1/dev-revoke-live/up/telemetry")
    pki.revoke("dev-revoke-live")
    broker.reload()
    deadline = time.monotonic() + 5
    while live.publish("bl/v1/dev-revoke-live/up/telemetry") != NOT_AUTHORIZED:
        assert time.monotonic() < deadline, "live session still allowed to publish after revocation"
        time.sleep(0.05)
    live.close()
    assert handshake_refused(broker.port, client_context(pki, ident))


def test_broker_cli_applies_revocation_live(pki: Pki, tmp_path: Path) -> None:
    """`bluelight broker run` watches the CRL: revoking needs no restart of anything."""
    ident = pki.issue(Role.DEVICE, "dev-revoke-cli")
    broker = SupervisedBroker(pki, tmp_path)
    try:
        live = Peer(broker.port, client_context(pki, ident), "dev-revoke-cli").connect()
        assert live.publish_ok("bl/v1/dev-revoke-cli/up/telemetry")
        revoked_at = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "bluelight", "pki", "revoke", "--dir", str(pki.root), "--id", "dev-revoke-cli"],
            check=True, capture_output=True,
        )
        while live.publish("bl/v1/dev-revoke-cli/up/telemetry") != NOT_AUTHORIZED:
            assert time.monotonic() - revoked_at < 5, "revocation not applied by the broker supervisor"
            time.sleep(0.05)
        live.close()
        assert handshake_refused(broker.port, client_context(pki, ident))
    finally:
        broker.stop()


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_broker_cli_restarts_a_mosquitto_that_dies(pki: Pki, tmp_path: Path) -> None:
    """A Mosquitto that crashes (SIGSEGV) under `bluelight broker run` is restarted on the
    same port, and devices connect and publish again."""
    ident = pki.issue(Role.DEVICE, "dev-restart")
    broker = SupervisedBroker(pki, tmp_path)
    supervisor = broker.proc
    try:
        first = _children(supervisor.pid)
        assert len(first) == 1
        peer = Peer(broker.port, client_context(pki, ident), "dev-restart").connect()
        assert peer.publish_ok("bl/v1/dev-restart/up/telemetry")
        peer.close()
        time.sleep(MIN_UPTIME_S + 0.5)  # a crash, not a start that failed
        os.kill(first[0], signal.SIGSEGV)
        deadline = time.monotonic() + 15
        while not (children := _children(supervisor.pid)) or children == first:
            assert supervisor.poll() is None, broker.log()
            assert time.monotonic() < deadline, "mosquitto was not restarted"
            time.sleep(0.1)
        wait_for_port(broker.port)
        again = Peer(broker.port, client_context(pki, ident), "dev-restart").connect()
        assert again.publish_ok("bl/v1/dev-restart/up/telemetry")
        again.close()
        assert "mosquitto died (status -11)" in broker.log()
    finally:
        broker.stop()
