"""`bluelight tail`: the live uplink stream, verified and decoded, one line a message.

A plain (not shared) subscription to `bl/v1/+/up/#` with its own client id and a clean
session, so it sees every message without taking any from the gateways' shared
stream. Nothing is stored and nothing is acknowledged beyond MQTT."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

import aiomqtt

from certs.pki import DEFAULT_GATEWAY_ID, Pki
from certs.registry import KeyRegistry
from certs.tls import client_context
from edge_agent.config import parse_hostport
from edge_agent.errors import BluelightError
from edge_agent.wire.errors import Rejected
from edge_agent.wire.ids import SENDING_ROLES
from edge_agent.wire.topics import UP_FILTER
from edge_agent.wire.verify import verify_message
from gateway.core.tail import message_line, rejection_line
from gateway.ingest import backoff

log = logging.getLogger(__name__)

CRL_REFRESH_S = 0.5


class TailError(BluelightError):
    """The stream cannot be read (e.g. the identity may not read uplinks)."""


async def run_tail(
    pki: Pki,
    broker: str,
    identity: str = DEFAULT_GATEWAY_ID,
    *,
    out: Callable[[str], None] = print,
) -> None:
    """Print the verified uplink stream until cancelled; reconnect with backoff."""
    host, port = parse_hostport(broker)
    ident = pki.require().require_identity(identity)
    registry = KeyRegistry(pki)
    tls = client_context(pki, ident)
    client_id = f"{identity}-tail-{secrets.token_hex(4)}"
    attempt = 0
    refreshed = 0.0
    while True:
        client = aiomqtt.Client(
            host, port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5, clean_start=True, tls_context=tls
        )
        try:
            async with client:
                granted = await client.subscribe(UP_FILTER, qos=1)
                if any(getattr(code, "value", code) >= 0x80 for code in granted):
                    raise TailError(f"{identity!r} may not read {UP_FILTER} (the broker said {granted[0]})")
                attempt = 0
                log.info("tail: reading %s on %s as %s", UP_FILTER, broker, client_id)
                async for message in client.messages:
                    now = time.monotonic()
                    if now - refreshed > CRL_REFRESH_S:
                        registry.refresh()
                        refreshed = now
                    topic = message.topic.value
                    payload = message.payload
                    data = payload if isinstance(payload, bytes) else str(payload).encode()
                    try:
                        out(message_line(verify_message(topic, data, registry, SENDING_ROLES)))
                    except Rejected as exc:
                        out(rejection_line(topic, exc))
        except aiomqtt.MqttError as exc:
            delay = backoff(attempt)
            attempt += 1
            log.warning("tail: connection to %s: %s; reconnecting in %.1fs", broker, exc, delay)
            await asyncio.sleep(delay)
