"""The servers under test, started and stopped the same way: pacsgrid, Orthanc, DCMTK storescp.

Each one gets a fresh folder, a port picked here, loopback only (see bench.run for the private
network namespace that keeps Orthanc and storescp, which cannot choose their bind address,
off every other interface), and a log file. `count()` asks the server itself how many instances
it holds: pacsgrid's `status`, Orthanc's REST API, the files storescp wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import clients, scratch
from bench.procs import (
    DCMTK_ENV,
    BenchError,
    check_alive,
    dcmtk_tool,
    free_port,
    pacsgrid_status,
    stop_process,
    tree,
    wait_idle,
    wait_port,
)

# AE titles of the benchmark's clients: every server knows them as peers.
FIND_AE = "BENCHFIND"
MOVE_AE = "BENCHMOVE"
GET_AE = "BENCHGET"
STORE_AE = "BENCHSTORE"
DEST_AE = "STORESCP"  # the C-MOVE destination (a DCMTK storescp per server)


@dataclass
class Destination:
    """Where a C-MOVE sends: AE title, host, port."""

    ae_title: str
    port: int
    host: str = "127.0.0.1"


@dataclass
class Server:
    """Base: a server process with a data folder, a DICOM port and a log."""

    folder: Path
    name: str = ""
    ae_title: str = ""
    services: frozenset[str] = frozenset({"store"})
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.folder.with_name(self.folder.name + ".log")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def prepare(self) -> None:
        """Write configuration files into the (new) folder."""

    def start(self, fresh: bool = True, timeout: float = 60.0) -> Server:
        if fresh:
            scratch.discard(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prepare()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env()
            )
        wait_port(self.port, timeout, self.proc, self.log)
        self.wait_ready(timeout)
        wait_idle(self.pid)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until a C-ECHO succeeds (the port alone may be bound before anyone accepts)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            check_alive(self.proc, self.log)
            try:
                if clients.echo(self.port, self.ae_title) == 0:
                    return
            except Exception as e:  # not ready yet
                last = e
            time.sleep(0.1)
        raise BenchError(f"{self.name} does not answer C-ECHO after {timeout:.0f}s: {last}")

    def warmed(self) -> bool:
        """Whether every process that serves associations has served one (see warm_up)."""
        return True

    def warm_up(self, files: Sequence[Path], logdir: Path, tries: int = 10) -> None:
        """Store `files` over 4 associations, again (as duplicates) until `warmed()`: a
        server's first association per process may pay one-time costs (lazy imports) that
        are not what an ingest benchmark is after."""
        for _ in range(tries):
            run = clients.storescu(self.port, self.ae_title, files, 4, logdir, 120)
            if not run.ok:
                raise BenchError(f"warm-up of {self.name} failed: {run.failures()}")
            if self.warmed():
                return
        raise BenchError(f"{self.name}: some worker never took a warm-up association")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def count(self) -> int:
        raise NotImplementedError

    def wipe(self) -> None:
        scratch.discard(self.folder)
        self.log.unlink(missing_ok=True)


@dataclass
class Pacsgrid(Server):
    peers: dict[str, Destination] = field(default_factory=dict)
    workers: int = 0  # 0: pacsgrid's default (one per CPU core, at least two)
    python: str = sys.executable

    def __post_init__(self) -> None:
        self.name = self.name or "pacsgrid"
        self.ae_title = "PACSGRID"
        self.services = frozenset({"store", "find", "move", "get"})

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def command(self) -> list[str]:
        cmd = [
            self.python,
            "-m",
            "pacsgrid",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
        ]
        for p in self.peers.values():
            cmd += ["--peer", f"{p.ae_title}@{p.host}:{p.port}"]
        if self.workers:
            cmd += ["--workers", str(self.workers)]
        return cmd

    def warmed(self) -> bool:
        """Every worker process has logged an accepted storage association (log lines carry
        the process id: "[pid] pacsgrid.dicom: association from BENCHSTORE@... accepted").
        If that log line changes, warm_up fails loudly rather than measuring cold workers."""
        workers = [pid for pid in tree(self.pid) if pid != self.pid] or [self.pid]
        text = self.log.read_text(errors="replace")
        return all(
            f"[{pid}] pacsgrid.dicom: association from {STORE_AE}@" in text for pid in workers
        )

    def count(self) -> int:
        status = pacsgrid_status("--data-dir", self.data_dir, env=self.env(), python=self.python)
        return int(status["index"]["instances"])


@dataclass
class Orthanc(Server):
    """Debian's Orthanc with its defaults (SQLite index, files on local disk, fsync of each
    file: "SyncStorageArea" is true by default), loopback ports, and the benchmark's clients
    as DicomModalities."""

    peers: dict[str, Destination] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.name = self.name or "Orthanc"
        self.ae_title = "ORTHANC"
        self.services = frozenset({"store", "find", "move", "get"})

    @property
    def config(self) -> Path:
        return self.folder / "orthanc.json"

    def prepare(self) -> None:
        storage = self.folder / "storage"
        storage.mkdir(exist_ok=True)
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomModalities": {
                p.ae_title.lower(): [p.ae_title, p.host, p.port] for p in self.peers.values()
            },
            "Plugins": [],
        }
        self.config.write_text(json.dumps(cfg, indent=2))

    def env(self) -> dict[str, str]:
        # Orthanc's DICOM layer is DCMTK: without TCP_NODELAY=1 Debian's build leaves Nagle's
        # algorithm on and every C-FIND answer waits ~40 ms for a delayed ACK.
        return DCMTK_ENV

    def command(self) -> list[str]:
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(exe).exists():
            raise BenchError("Orthanc not found: install Debian's orthanc (scripts/bench does)")
        return [exe, str(self.config)]

    def _get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=60) as r:
            return json.loads(r.read())

    def count(self) -> int:
        stats = self._get("/statistics")
        assert isinstance(stats, dict)
        return int(stats["CountInstances"])

    def version(self) -> str:
        info = self._get("/system")
        assert isinstance(info, dict)
        return str(info.get("Version", "?"))


@dataclass
class StoreScp(Server):
    """DCMTK storescp: receives and writes files (bit-preserving, no index, no fsync); one
    forked process per association so that 4 associations run side by side. The ceiling."""

    fork: bool = True

    def __post_init__(self) -> None:
        self.name = self.name or "storescp"
        self.ae_title = self.ae_title or DEST_AE

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def prepare(self) -> None:
        self.out.mkdir(exist_ok=True)

    def command(self) -> list[str]:
        cmd = [dcmtk_tool("storescp"), "-aet", self.ae_title, "-od", str(self.out), "+B"]
        if self.fork:
            cmd.append("--fork")
        return [*cmd, str(self.port)]

    def env(self) -> dict[str, str]:
        return DCMTK_ENV

    def files(self) -> list[Path]:
        return [p for p in self.out.rglob("*") if p.is_file()] if self.out.exists() else []

    def count(self) -> int:
        return len(self.files())

    def clear(self) -> None:
        scratch.discard(self.out)
        self.out.mkdir()
