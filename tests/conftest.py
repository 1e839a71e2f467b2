"""Shared fixtures: the real `pacsgrid serve` as a subprocess, DCMTK tools, ports, corpora.

Every server binds 127.0.0.1 on a port picked here; every process a test starts is stopped by
its PID when the test ends; DCMTK runs with TCP_NODELAY=1 (Debian's build leaves Nagle on).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.seaweedfs import SeaweedFS

__all__ = ["free_port"]  # tests import it from here

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench.synth

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


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


def wait_port(
    port: int,
    timeout: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text() if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode}:\n{text[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


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


class Server:
    """`pacsgrid serve` in a subprocess, on 127.0.0.1 and a free port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        workers: int = 1,
        args: tuple[str, ...] = (),
        config: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.workers = workers
        self.args = args
        self.config = config
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{data_dir.name}-serve-{self.port}.log"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "pacsgrid",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--workers",
            str(self.workers),
        ]
        if self.config:
            cmd += ["--config", str(self.config)]
        return cmd + list(self.args)

    def start(self, timeout: float = 30.0) -> Server:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        wait_port(self.port, timeout, self.proc, self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL the server and, with several workers, every worker process too."""
        if self.proc is None:
            return
        pids = _children(self.proc.pid) + [self.proc.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port


def _children(pid: int) -> list[int]:
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            for child in fh.read().split():
                out += _children(int(child)) + [int(child)]
    except OSError:
        pass
    return out


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


class StoreSCP:
    """DCMTK storescp as a C-MOVE destination, writing what it receives to a folder."""

    def __init__(
        self, out: Path, aet: str = "STORESCP", syntaxes: tuple[str, ...] = ("+xa",)
    ) -> None:
        self.out = out
        self.aet = aet
        self.port = free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.log = out.parent / f"storescp-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    require_tool("storescp"),
                    "-aet",
                    aet,
                    "-od",
                    str(out),
                    *syntaxes,
                    "+B",
                    "-pm",
                    "-v",
                    str(self.port),
                ],
                env=DCMTK_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.port, 10, self.proc, self.log)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def clear(self) -> None:
        for p in self.files():
            p.unlink()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "storescp-out")
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
