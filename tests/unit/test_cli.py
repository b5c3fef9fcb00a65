"""The `bluelight` command line: help everywhere, `pki` on temporary directories, and
bad input answered with one line that says what to do (never a traceback)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from bluelight.cli import cli
from certs.pki import Pki
from edge_agent.cli import run as agent_run
from edge_agent.entry import parse_run


def _walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):  # the groups are loaded lazily
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{name} is listed but cannot be loaded"
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(cli))


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="bluelight")


def _assert_one_line_error(result: Result, hint: str) -> None:
    """Non-zero exit, nothing on stdout, exactly one line on stderr naming what to do."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"want one line of error output, got {len(lines)}:\n{result.stderr}"
    assert hint in lines[0], lines[0]


# -- help -----------------------------------------------------------------------------------


def test_the_tree_has_the_documented_groups() -> None:
    top = {path[0] for path, _ in COMMANDS if len(path) == 1}
    assert {"pki", "broker", "agent", "gateway", "tail"} <= top
    assert {path for path, _ in COMMANDS if path[:1] == ("pki",)} >= {
        ("pki",),
        ("pki", "init"),
        ("pki", "issue"),
        ("pki", "revoke"),
    }


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "bluelight" for p, _ in COMMANDS])
def test_every_command_has_help(path: tuple[str, ...], command: click.Command) -> None:
    assert (command.help or "").strip(), f"'bluelight {' '.join(path)}' has no help text"
    assert command.get_short_help_str().strip()
    for param in command.params:
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"option {param.opts} of 'bluelight {' '.join(path)}' has no help"
    for flag in ("--help", "-h"):
        result = _run(*path, flag)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Usage: bluelight")
        assert (command.help or "").strip().splitlines()[0][:40] in " ".join(result.stdout.split())


# -- pki --------------------------------------------------------------------------------------


def test_pki_init_issue_revoke(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    result = _run("pki", "init", "--dir", str(pki_dir))
    assert result.exit_code == 0, result.output
    assert "PKI created" in result.stdout
    assert (pki_dir / "issued/gateway.crt").is_file()

    result = _run("pki", "issue", "--dir", str(pki_dir), "--role", "device", "--id", "dev-a", "--days", "30")
    assert result.exit_code == 0, result.output
    assert "dev-a" in result.stdout
    cert = x509.load_pem_x509_certificate((pki_dir / "issued/dev-a.crt").read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days == 30

    result = _run("pki", "revoke", "--dir", str(pki_dir), "--id", "dev-a")
    assert result.exit_code == 0, result.output
    assert "revoked dev-a" in result.stdout
    assert Pki(pki_dir).revoked_ids() == {"dev-a"}
    crl = x509.load_pem_x509_crl((pki_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    result = _run("pki", "crl", "--dir", str(pki_dir))
    assert result.exit_code == 0, result.output
    assert "CRL re-signed" in result.stdout


def test_pki_commands_print_no_key_material(tmp_path: Path) -> None:
    pki_dir = str(tmp_path / "pki")
    outputs = [
        _run("pki", "init", "--dir", pki_dir),
        _run("pki", "issue", "--dir", pki_dir, "--role", "officer", "--id", "officer-1"),
        _run("pki", "revoke", "--dir", pki_dir, "--id", "officer-1"),
    ]
    for result in outputs:
        assert result.exit_code == 0, result.output
        assert "BEGIN" not in result.output
        assert "PRIVATE" not in result.output


def test_pki_init_takes_hosts_and_gateway_id(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    result = _run("pki", "init", "--dir", str(pki_dir), "--host", "gw.example", "--gateway-id", "gw-1")
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((pki_dir / "issued/gw-1.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example"]


# -- bad input: one line that says what to do ------------------------------------------------------


@pytest.fixture
def pki_dir(tmp_path: Path) -> str:
    path = tmp_path / "pki"
    Pki(path).init()
    return str(path)


def test_invalid_id(pki_dir: str) -> None:
    _assert_one_line_error(_run("pki", "issue", "--dir", pki_dir, "--role", "device", "--id", "dev/a"), "use 1-64")
    _assert_one_line_error(_run("pki", "revoke", "--dir", pki_dir, "--id", "+"), "use 1-64")


def test_unknown_role(pki_dir: str) -> None:
    _assert_one_line_error(_run("pki", "issue", "--dir", pki_dir, "--role", "chief", "--id", "dev-a"), "device")


def test_missing_dir() -> None:
    for args in (("pki", "init"), ("pki", "issue", "--role", "device", "--id", "x"), ("pki", "revoke", "--id", "x")):
        _assert_one_line_error(_run(*args), "--dir")


def test_issue_and_revoke_on_an_uninitialised_dir(tmp_path: Path) -> None:
    empty = str(tmp_path / "empty")
    _assert_one_line_error(
        _run("pki", "issue", "--dir", empty, "--role", "device", "--id", "dev-a"), "bluelight pki init --dir"
    )
    _assert_one_line_error(_run("pki", "revoke", "--dir", empty, "--id", "dev-a"), "bluelight pki init --dir")
    _assert_one_line_error(_run("pki", "crl", "--dir", empty), "bluelight pki init --dir")


def test_init_twice(pki_dir: str) -> None:
    _assert_one_line_error(_run("pki", "init", "--dir", pki_dir), "use another --dir")


def test_issue_an_id_under_another_role(pki_dir: str) -> None:
    assert _run("pki", "issue", "--dir", pki_dir, "--role", "device", "--id", "dev-a").exit_code == 0
    _assert_one_line_error(
        _run("pki", "issue", "--dir", pki_dir, "--role", "officer", "--id", "dev-a"), "pick another id"
    )


def test_revoke_an_id_never_issued(pki_dir: str) -> None:
    _assert_one_line_error(_run("pki", "revoke", "--dir", pki_dir, "--id", "dev-nobody"), "never issued")


def test_unknown_command() -> None:
    _assert_one_line_error(_run("pki", "explode"), "explode")


def test_init_with_an_invalid_gateway_id_leaves_nothing_behind(tmp_path: Path) -> None:
    """Bad input is refused before anything is written, so the operator can simply
    run the command again with a valid id."""
    pki_dir = tmp_path / "pki"
    _assert_one_line_error(_run("pki", "init", "--dir", str(pki_dir), "--gateway-id", "bad id"), "use 1-64")
    retry = _run("pki", "init", "--dir", str(pki_dir))
    assert retry.exit_code == 0, retry.output


# -- what the agent's process loads ---------------------------------------------------------


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=60)
    return set(out.stdout.split())


def test_agent_commands_do_not_import_the_other_roles() -> None:
    loaded = _modules_after(
        "import sys\nfrom bluelight.cli import cli\nsys.argv = ['bluelight', 'agent', 'run', '--help']\n"
        "try:\n    cli(prog_name='bluelight')\nexcept SystemExit:\n    pass"
    )
    assert "edge_agent.cli" in loaded
    unwanted = {m for m in loaded if m.split(".")[0] in {"gateway", "firmware_sim", "fastapi", "uvicorn", "yaml",
                                                         "sqlite_utils", "numpy"} or m == "bluelight.broker"}
    assert not unwanted, sorted(unwanted)


def test_the_agent_runs_on_its_own_mqtt_client() -> None:
    """An agent loads neither paho-mqtt nor aiomqtt (nor what they import: urllib's HTTP
    stack, uuid): its MQTT client is `edge_agent.mqtt`."""
    loaded = _modules_after("import edge_agent.agent")
    assert "edge_agent.mqtt.client" in loaded
    unwanted = {m for m in loaded if m.split(".")[0] in {"paho", "aiomqtt"}} | ({"http.client", "uuid"} & loaded)
    assert not unwanted, sorted(unwanted)


@pytest.mark.parametrize("verbose", [[], ["-vv", "--verbose"]])
def test_agent_run_does_not_load_click_or_the_pki_audit_log(tmp_path: Path, verbose: list[str]) -> None:
    """`bluelight agent run` goes through the click-free parser (`edge_agent.entry`)."""
    argv = ["bluelight", *verbose, "agent", "run", "--pki", str(tmp_path), "--id", "dev-a", "--broker", "localhost:1"]
    loaded = _modules_after(
        f"import sys\nsys.argv = {argv!r}\nfrom bluelight.entry import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 1, exc.code"
    )
    assert "edge_agent.settings" in loaded  # it got as far as the settings (no CA bundle there)
    assert "click" not in loaded
    agent = _modules_after("import edge_agent.agent")
    unwanted = {"click", "json", "getpass", "tomllib", "certs.auditchain", "certs.auditlog"} & agent
    assert not unwanted, sorted(unwanted)


def test_agent_run_errors_are_the_same_without_click(tmp_path: Path) -> None:
    args = ["agent", "run", "--pki", str(tmp_path), "--id", "dev-a", "--broker", "localhost:1"]
    fast = subprocess.run([sys.executable, "-m", "bluelight", *args], capture_output=True, text=True, timeout=60,
                          check=False)
    slow = _run(*args)
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.exit_code, slow.stdout, slow.stderr)
    assert fast.stderr.startswith("Error: no CA bundle at "), fast.stderr


@pytest.mark.parametrize("args", [
    [],
    ["--pki", "var/pki", "--id", "van-17", "--broker", "localhost:8883"],
    ["--pki=var/pki", "--id=van-17", "--broker=h:1", "--rate", "2.5", "--seed", "7", "--outbox", "x.db"],
    ["--panic-at", "30", "--panic-at=45.5", "--config", "agent.toml", "--rate", "1e1", "--rate", "3"],
    ["--id", "", "--pki", "", "--seed", "1_000", "--rate", "inf"],
])
def test_the_click_free_parser_reads_what_click_reads(args: list[str]) -> None:
    ctx = agent_run.make_context("run", list(args))
    assert parse_run(args) == ctx.params


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["--rate"], ["--rate", "fast"], ["--seed", "1.5"], ["--rate", "-1"], ["--bogus", "1"],
    ["--pk", "x"], ["extra"], ["--", "--id", "x"], ["--id", "x", "-v"],
])
def test_the_click_free_parser_leaves_anything_else_to_click(args: list[str]) -> None:
    assert parse_run(args) is None
