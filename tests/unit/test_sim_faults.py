"""Fault-injection pieces on their own: the garbage a malformed sender publishes is
rejected with the reason the summary expects, a forged signer fails verification, and
the cut proxy refuses and restores connections."""

from __future__ import annotations

import asyncio
import random

import pytest

from certs.pki import Pki
from certs.registry import KeyRegistry
from certs.signing import load_signer
from edge_agent.wire.envelope import Message, seal
from edge_agent.wire.errors import Rejected
from edge_agent.wire.ids import SENDING_ROLES
from edge_agent.wire.verify import verify_message
from firmware_sim.faults import CutProxy, ForgeableSigner, garbage_payloads, uplink


def test_garbage_is_rejected_for_the_expected_reasons(pki: Pki) -> None:
    keys = KeyRegistry(pki)
    sample = seal(Message("dev-a", 1, 1_700_000_000_000, "telemetry", {"lat": 51.5, "lon": -0.12}),
                  load_signer(pki, "dev-a"))
    payloads = garbage_payloads(7, random.Random(3), sample)
    assert [reason for reason, _ in payloads].count("too_large") == 1
    for reason, data in payloads:
        with pytest.raises(Rejected) as caught:
            verify_message(uplink("dev-a", "telemetry"), data, keys, SENDING_ROLES)
        assert caught.value.reason == reason, (data[:40], caught.value)
    assert garbage_payloads(7, random.Random(3), sample) == payloads  # seeded


def test_a_forged_signer_keeps_the_key_id_but_fails_verification(pki: Pki) -> None:
    keys = KeyRegistry(pki)
    signer = ForgeableSigner(load_signer(pki, "dev-b"))
    message = Message("dev-b", 1, 1_700_000_000_000, "telemetry", {"lat": 51.5, "lon": -0.12})
    topic = uplink("dev-b", "telemetry")
    assert verify_message(topic, seal(message, signer), keys, SENDING_ROLES).seq == 1
    signer.forge()
    assert signer.kid == "dev-b"
    with pytest.raises(Rejected) as caught:
        verify_message(topic, seal(message, signer), keys, SENDING_ROLES)
    assert caught.value.reason == "bad_signature"


async def test_the_cut_proxy_relays_refuses_and_restores() -> None:
    await _cut_proxy_round_trip()


def test_the_cut_proxy_works_on_uvloop() -> None:
    """`bluelight sim run` runs on uvloop, whose transports are not asyncio.Transport."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_cut_proxy_round_trip())


async def _cut_proxy_round_trip() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # the proxy aborts its upstream connection when cut
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, CutProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        await proxy.cut()
        assert await asyncio.wait_for(reader.read(10), 5) == b""  # the live connection is dropped
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", proxy.port)  # refused while cut
        await proxy.restore()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"again")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"again"
        writer.close()
        await writer.wait_closed()
        assert (proxy.cuts, proxy.accepted) == (1, 2)
