"""Shared fixtures: the real `pacsgrid serve` as a subprocess, DCMTK tools, ports, corpora.

Every server binds 127.0.0.1 on a free port (the launchers are in tests.peers); every process
a test starts is stopped by its PID when the test ends; DCMTK runs with TCP_NODELAY=1
(Debian's build leaves Nagle on).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import DCMTK_ENV, SeaweedFS, Server, StoreSCP, free_port

# Tests import the launchers they use most from here (all of them are in tests.peers).
__all__ = ["DCMTK_ENV", "Server", "StoreSCP", "free_port"]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench.synth


def pacsgrid_cli(
    *args: str | Path, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a `pacsgrid` command as a user would (same interpreter), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pacsgrid", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's dcmtk (scripts/test does)")
    return path


def dcmtk(
    tool: str, *args: str | Path, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with TCP_NODELAY=1; output (stdout+stderr) in .stdout."""
    cmd = [require_tool(tool), *map(str, args)]
    proc = subprocess.run(
        cmd,
        env=DCMTK_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


def move_study(port: int, study: str, dest: str = "STORESCP") -> subprocess.CompletedProcess[str]:
    """DCMTK movescu asks the archive (AE PACSGRID on `port`) to send one study to `dest`."""
    return dcmtk("movescu", "-v", "-S", "-aet", "MOVESCU", "-aec", "PACSGRID", "-aem", dest,
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                 "127.0.0.1", port)  # fmt: skip


def getscu_study(
    port: int, study_uid: str, out: Path, *, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """DCMTK getscu (AE GETSCU, bit-preserving, study root) of one study into `out`."""
    return dcmtk(
        "getscu",
        "-v",
        "+B",
        "-S",
        "-aet",
        "GETSCU",
        "-aec",
        "PACSGRID",
        "-od",
        out,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        port,
        check=check,
    )


def storescu_started(port: int, files: list[Path], *options: str) -> subprocess.Popen[str]:
    """storescu -v sending `files` in the background (output in .stdout), for tests that
    do something to the server while it sends."""
    return subprocess.Popen(
        [
            require_tool("storescu"),
            "-v",
            "-nh",
            *options,
            "-aec",
            "PACSGRID",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=DCMTK_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def make_server(tmp_path: Path, servers: list[Server]):  # type: ignore[no-untyped-def]
    """make_server(name="a", workers=1, args=(...)) -> a started Server."""

    def make(name: str = "archive", **kw) -> Server:  # type: ignore[no-untyped-def]
        s = Server(tmp_path / name, **kw)
        servers.append(s)
        return s.start()

    return make


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "storescp-out").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the session (tests that stop S3 start their own)."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """One PostgreSQL server for the session (tests.pg.PgCluster), on 127.0.0.1."""
    from tests.pg import PgCluster, pg_available

    if not pg_available():
        pytest.fail("PostgreSQL 15 not found: install Debian's postgresql (scripts/test does)")
    cluster = PgCluster().init().start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_server, request: pytest.FixtureRequest) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh, empty database on the session's server; dropped after the test."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    url: str = pg_server.create_db(name)
    yield url
    pg_server.drop_db(name)
