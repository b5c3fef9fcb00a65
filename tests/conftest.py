"""Shared fixtures: a throw-away PKI per test session and a real Mosquitto per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bluelight.broker import BrokerSettings
from certs.pki import Identity, Pki
from edge_agent.wire.ids import Role
from tests.helpers import MosquittoProcess, free_port


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A PKI with the gateway and a few devices and people already issued."""
    p = Pki(tmp_path_factory.mktemp("pki") / "pki")
    p.init()
    for ident in ("dev-a", "dev-b"):
        p.issue(Role.DEVICE, ident)
    p.issue(Role.OFFICER, "officer-1")
    p.issue(Role.OPERATOR, "operator-1")
    return p


@pytest.fixture
def issue(pki: Pki) -> Callable[[Role, str], Identity]:
    """Issue a fresh identity for one test: `issue(Role.DEVICE, "dev-x")`."""

    def _issue(role: Role, identity: str) -> Identity:
        return pki.issue(role, identity)

    return _issue


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A real Mosquitto with mutual TLS, CRL and ACLs on a free port."""
    settings = BrokerSettings(pki_dir=pki.root, port=free_port(), data_dir=tmp_path / "broker")
    proc = MosquittoProcess(settings).start()
    yield proc
    proc.stop()
