"""Settings: precedence, one-line errors that name the key, docs that cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacsgrid.errors import ConfigError
from pacsgrid.settings import Overrides, describe_settings, load_settings, parse_peer

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pacsgrid.toml"
    p.write_text(text)
    return p


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(Overrides(), environ={})
    assert s.dicom.port == 11112
    assert s.dicom.ae_title == "PACSGRID"
    assert s.data_dir == tmp_path / "pacsgrid-data"
    assert s.database_url == f"sqlite:///{tmp_path / 'pacsgrid-data' / 'index.sqlite'}"
    assert [x.url for x in s.sites] == [(tmp_path / "pacsgrid-data" / "objects").as_uri()]
    assert s.dicom.accept_unknown is True
    assert s.dicom.on_duplicate == "keep"


def test_precedence_file_env_command_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[dicom]\nport = 1000\nae_title = 'FROMFILE'\n")
    s = load_settings(Overrides(config=cfg), environ={})
    assert (s.dicom.port, s.dicom.ae_title) == (1000, "FROMFILE")
    s = load_settings(Overrides(config=cfg), environ={"PACSGRID_DICOM_PORT": "2000"})
    assert (s.dicom.port, s.dicom.ae_title) == (2000, "FROMFILE")
    s = load_settings(
        Overrides(config=cfg, values={"dicom.port": "3000"}),
        environ={"PACSGRID_DICOM_PORT": "2000"},
    )
    assert s.dicom.port == 3000


def test_relative_paths_in_a_config_file_are_relative_to_it(tmp_path: Path) -> None:
    cfg = write(tmp_path, "data_dir = 'data'\n[[sites]]\nname = 'a'\nurl = 'file://vol-a'\n")
    s = load_settings(Overrides(config=cfg), environ={})
    assert s.data_dir == tmp_path / "data"
    assert s.sites[0].url == "file://" + str(tmp_path / "vol-a")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dicom]\nport = 'abc'\n", "dicom.port: must be an integer from 0 to 65535, got 'abc'"),
        ("[dicom]\nport = 70000\n", "dicom.port: must be an integer from 0 to 65535"),
        ("[dicom]\nport = 0\n", "dicom.port: is 0 (no plain DICOM) but dicom.tls_port is not"),
        ("[dicom]\nartim_timeout = 0\n", "dicom.artim_timeout: must be a number from 0.5 to 600"),
        ("[dicom]\nmax_associations = 0\n", "dicom.max_associations: must be an integer from 1"),
        (
            "[dicom]\nmax_associations_per_host = -1\n",
            "dicom.max_associations_per_host: must be an integer from 0",
        ),
        (
            "[[peers]]\nae_title='A'\nhost='h'\naddresses=['10.1.2.0/24', 'ten']\n",
            "peers[0].addresses[1]: expected an address or network such as 10.1.2.0/24, got 'ten'",
        ),
        (
            "[[peers]]\nae_title='A'\nhost='h'\ntls_fingerprint='abc'\n",
            "peers[0].tls_fingerprint: invalid value 'abc'",
        ),
        (
            "[[peers]]\nae_title='A'\nhost='h'\ntls_subject='CN=a'\n",
            "peers[0].tls_subject: a certificate binding needs dicom.tls_port and dicom.tls_ca",
        ),
        (
            "[[peers]]\nae_title='A'\nhost='h'\ntls_subject='just text'\n",
            "peers[0].tls_subject: expected attributes such as CN=ct1,O=Hospital",
        ),
        ("[dicom]\nprot = 104\n", "dicom.prot: unknown setting (did you mean 'port'?)"),
        ("[dicom]\nae_title = 'MUCH_TOO_LONG_TITLE'\n", "dicom.ae_title: must be an AE title"),
        ("[dicom]\non_duplicate = 'merge'\n", "dicom.on_duplicate: must be one of keep, replace"),
        ("[dicom]\naccept_unknown = 'yes'\n", "dicom.accept_unknown: must be true or false"),
        ("[[peers]]\nae_title = 'X'\n", "peers[0].host: is required"),
        (
            "[[peers]]\nae_title='A'\nhost='h'\n[[peers]]\nae_title='A'\nhost='h'\n",
            "peers[1].ae_title: duplicate AE title 'A'",
        ),
        (
            "[[peers]]\nae_title='A'\nhost='h'\nallow=['find','delete']\n",
            "peers[0].allow: 'delete' is not one of",
        ),
        ("[[sites]]\nname='a'\nurl='ftp://x'\n", "sites[0].url: unsupported scheme"),
        (
            "[[sites]]\nname='a'\nurl='/x'\nrole='cache'\n",
            "sites: at least one site must have role 'archive'",
        ),
        ("[replication]\ncopies = 2\n", "replication.copies: asks for 2 copies but only 1"),
        ("[replication]\nwrite_quorum = 2\n", "replication.write_quorum: must not exceed"),
        ("database = 'mysql://x'\n", "database: expected sqlite:///path or a PostgreSQL"),
        ("[dicom\n", "not valid TOML"),
        ("colour = 'blue'\n", "colour: unknown setting"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(Overrides(config=write(tmp_path, text)), environ={})
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dicom\.port: must be an integer"):
        load_settings(Overrides(), environ={"PACSGRID_DICOM_PORT": "many"})
    with pytest.raises(ConfigError, match=r"PACSGRID_DICOM_PROT: unknown setting"):
        load_settings(Overrides(), environ={"PACSGRID_DICOM_PROT": "1"})


def test_peer_shorthand() -> None:
    p = parse_peer("VIEWER@10.0.0.5:104")
    assert (p.ae_title, p.host, p.port) == ("VIEWER", "10.0.0.5", 104)
    assert parse_peer("V6@[::1]:11112").host == "::1"
    for bad in ("VIEWER", "VIEWER@host", "@h:1", "X@h:port", "X@h:99999"):
        with pytest.raises(ConfigError) as e:
            parse_peer(bad)
        assert str(e.value).startswith("--peer")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacsgrid", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("serve", "--port", "abc"), "pacsgrid: config error: --port: must be an integer"),
        (("serve", "--peer", "nonsense"), "pacsgrid: config error: --peer: expected AET@HOST"),
        (("serve", "--prot", "1"), "unrecognized arguments: --prot 1"),
        (("status", "--config", "missing.toml"), "--config: file not found: missing.toml"),
        (("import",), "the following arguments are required: PATH"),
    ],
)
def test_bad_command_line_is_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli(
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "d"),
            cwd=tmp_path,
        )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pacsgrid: config error: dicom.port: cannot listen on 127.0.0.1:{port}")


def test_configuration_reference_is_current() -> None:
    assert (REPO / "docs" / "configuration.md").read_text().strip() == describe_settings().strip()


def test_cli_reference_is_current() -> None:
    from pacsgrid.cli.main import cli_reference

    assert (REPO / "docs" / "cli.md").read_text().strip() == cli_reference().strip()


def test_every_setting_has_help() -> None:
    import dataclasses

    from pacsgrid.settings import LISTS, SECTIONS, Settings

    for cls in (Settings, *SECTIONS.values(), *LISTS.values()):
        for f in dataclasses.fields(cls):
            if cls is Settings and (f.name in SECTIONS or f.name in LISTS):
                continue  # a section: its own fields are checked
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_environment_names_two_word_sections() -> None:
    """PACSGRID_AUDIT_LOG_TARGET is audit_log.target, not audit.log_target."""
    s = load_settings(
        Overrides(),
        environ={"PACSGRID_AUDIT_LOG_TARGET": "off", "PACSGRID_AUDIT_VERIFY_READS": "false"},
    )
    assert s.audit_log.target == "off"
    assert s.audit.verify_reads is False
