"""The gateway's coalescing paho client writes the same bytes as paho, in fewer writes."""

from __future__ import annotations

import paho.mqtt.client as paho

from gateway.ingest import _CoalescingPaho, _Inbox, _IngestClient
from tests.paho_fake import FakeTlsSocket, connected_client


def _queue_ack_batch(client: paho.Client, published: list[int]) -> None:
    client.on_publish = lambda _c, _u, mid, _rc, _p: published.append(mid)
    for mid in (1, 2, 3):
        client.ack(mid, 1)
    client.publish("bl/v1/dev-1/down/cmd", b"receipt", qos=1)
    client.publish("bl/v1/dev-1/down/cmd", b"fire and forget", qos=0)
    for mid in (4, 5):
        client.ack(mid, 1)


def _write_all(client: paho.Client) -> None:
    for _ in range(1000):
        if not client.want_write():
            return
        client.loop_write()
    raise AssertionError("never finished writing")


def _run(cls: type[paho.Client], limit: int = 1 << 30) -> tuple[FakeTlsSocket, list[int]]:
    published: list[int] = []
    client, sock = connected_client(cls, FakeTlsSocket(limit), manual_ack=True)
    _queue_ack_batch(client, published)
    _write_all(client)
    return sock, published


def test_a_batch_of_pubacks_and_publishes_is_one_write_of_pahos_bytes() -> None:
    plain, plain_published = _run(paho.Client)
    lean, lean_published = _run(_CoalescingPaho)
    assert b"".join(lean.out) == b"".join(plain.out)
    assert len(plain.out) == 7
    # 3 PUBACKs and the QoS 1 publish together; the QoS 0 publish on its own (paho calls
    # on_publish for it once written); then the last 2 PUBACKs together.
    assert [len(chunk) for chunk in lean.out] == [len(b"".join(plain.out[:4])), len(plain.out[4]),
                                                  len(b"".join(plain.out[5:]))]
    assert lean_published == plain_published == [2]


def test_partial_writes_keep_every_byte_in_order() -> None:
    plain, _ = _run(paho.Client)
    for limit in (1, 3, 5, 17):
        lean, published = _run(_CoalescingPaho, limit)
        assert b"".join(lean.out) == b"".join(plain.out), limit
        assert published == [2]


async def test_both_ingest_connections_coalesce() -> None:
    inbox = _Inbox(10, 5, lambda: 0, lambda _message: None)
    client = _IngestClient("localhost", 1, inbox=inbox, read_nap_s=0.01)
    assert type(client._client) is _CoalescingPaho
