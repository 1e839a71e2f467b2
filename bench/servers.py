"""The servers under test, started and stopped the same way: pacsgrid, Orthanc, DCMTK storescp.

Each one gets a fresh folder, a free port, loopback only (see bench.run for the private
network namespace that keeps Orthanc and storescp, which cannot choose their bind address,
off every other interface), and a log file. `count()` asks the server itself how many instances
it holds: pacsgrid's `status`, Orthanc's REST API, the files storescp wrote. Starting and
stopping them is the tests' launchers' (tests.peers); what is the benchmark's own is here:
the C-ECHO and the quiet CPU a server must reach before it is measured, its warm-up.
"""

from __future__ import annotations

import hashlib
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tests.peers as launchers
from bench import clients, scratch
from bench.procs import BenchError, pacsgrid_status, tree, wait_idle

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
    """Base: a server program with a data folder, a DICOM port and a log."""

    folder: Path
    name: str = ""
    ae_title: str = ""
    services: frozenset[str] = frozenset({"store"})
    port: int = field(default_factory=launchers.free_port)
    program: launchers.Program | None = None

    @property
    def log(self) -> Path:
        return self.folder.with_name(self.folder.name + ".log")

    @property
    def pid(self) -> int:
        assert self.program is not None, "server not started"
        return self.program.pid

    def launcher(self) -> launchers.Program:
        """The program, configured in the (new) folder, not started yet."""
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        """What the server's environment adds (None: nothing)."""
        return None

    def start(self, fresh: bool = True, timeout: float = 60.0) -> Server:
        if fresh:
            scratch.discard(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.program = self.launcher()
        try:
            self.program.start(timeout)
            self.wait_ready(timeout)
        except (launchers.PeerError, AssertionError) as e:
            raise BenchError(f"{self.name} did not start: {e}") from None
        wait_idle(self.pid)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until a C-ECHO succeeds (the port alone may be bound before anyone accepts)."""
        assert self.program is not None

        def echo() -> bool:
            try:
                return clients.echo(self.port, self.ae_title) == 0
            except Exception:  # not ready yet
                return False

        self.program.wait_ready(echo, timeout, "answers C-ECHO")

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
        if self.program is not None:
            self.program.stop(timeout=30)
            self.program = None

    def count(self) -> int:
        raise NotImplementedError

    def index_server_pid(self) -> int | None:
        """The process (tree) of a database server the server's index lives in, if any."""
        return None

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

    def launcher(self) -> launchers.Server:
        peers = [f"{p.ae_title}@{p.host}:{p.port}" for p in self.peers.values()]
        return launchers.Server(
            self.data_dir,
            port=self.port,
            workers=self.workers,
            args=tuple(a for p in peers for a in ("--peer", p)),
            python=self.python,
            env=self.env(),
            log=self.log,
        )

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
class PacsgridPg(Pacsgrid):
    """pacsgrid with its index on PostgreSQL: a PostgreSQL server of its own (tests.pg, on
    127.0.0.1 and a free port) with `fsync` on, as in production. It starts before pacsgrid
    and stops after it; `wipe` removes it. Its folder is named after the server's (the
    postgres user may not enter that one), so that --resume finds it again."""

    def __post_init__(self) -> None:
        self.name = self.name or "pacsgrid-pg"
        super().__post_init__()
        self._cluster: Any = None

    @property
    def cluster_root(self) -> Path:
        """Next to the server's folder, or in the temporary folder when the postgres user
        cannot get there (a root-only folder above it)."""
        parent = self.folder.resolve().parent
        above = [p for p in (parent, *parent.parents) if p.exists()]
        if all(p.stat().st_mode & stat.S_IXOTH for p in above):
            return parent / f"{self.folder.name}-postgres"
        digest = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"pacsgrid-bench-pg-{digest}"

    @property
    def database(self) -> str:
        assert self._cluster is not None, "PostgreSQL not started"
        return f"host=127.0.0.1 port={self._cluster.port} user=postgres dbname=pacs"

    def start(self, fresh: bool = True, timeout: float = 60.0) -> Server:
        from tests.pg import PgCluster

        if fresh:
            self._drop_cluster()
        if self._cluster is None and (self.cluster_root / "data").exists():
            self._cluster = PgCluster.reopen(self.cluster_root)
        if self._cluster is None:
            self.cluster_root.parent.mkdir(parents=True, exist_ok=True)
            self._cluster = PgCluster(self.cluster_root, fsync=True).init().start()
            self._cluster.create_db("pacs")
        elif self._cluster.pid is None:
            self._cluster.start()
        return super().start(fresh, timeout)

    def launcher(self) -> launchers.Server:
        program = super().launcher()
        program.args = (*program.args, "--database", self.database)
        return program

    def stop(self) -> None:
        super().stop()
        if self._cluster is not None:
            self._cluster.stop()

    def wipe(self) -> None:
        super().wipe()
        self._drop_cluster()

    def _drop_cluster(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
        scratch.discard(self.cluster_root)

    def count(self) -> int:
        status = pacsgrid_status(
            "--data-dir", self.data_dir, "--database", self.database, python=self.python
        )
        return int(status["index"]["instances"])

    def index_server_pid(self) -> int | None:
        return None if self._cluster is None else self._cluster.pid


@dataclass
class Orthanc(Server):
    """Debian's Orthanc with its defaults (SQLite index, files on local disk, fsync of each
    file: "SyncStorageArea" is true by default), loopback ports, and the benchmark's clients
    as DicomModalities."""

    peers: dict[str, Destination] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or "Orthanc"
        self.ae_title = "ORTHANC"
        self.services = frozenset({"store", "find", "move", "get"})

    def launcher(self) -> launchers.Orthanc:
        return launchers.Orthanc(
            self.folder,
            aet=self.ae_title,
            modalities={p.ae_title: (p.host, p.port) for p in self.peers.values()},
            legacy=False,
            dicom_port=self.port,
            log=self.log,
        )

    def _orthanc(self) -> launchers.Orthanc:
        assert isinstance(self.program, launchers.Orthanc), "Orthanc not started"
        return self.program

    def count(self) -> int:
        return self._orthanc().instance_count()

    def version(self) -> str:
        return str(self._orthanc().get("/system").get("Version", "?"))


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

    def launcher(self) -> launchers.StoreSCP:
        options = ("+B", "--fork") if self.fork else ("+B",)
        return launchers.StoreSCP(
            self.out, self.ae_title, port=self.port, options=options, log=self.log
        )

    def files(self) -> list[Path]:
        return [p for p in self.out.rglob("*") if p.is_file()] if self.out.exists() else []

    def count(self) -> int:
        return len(self.files())

    def clear(self) -> None:
        scratch.discard(self.out)
        self.out.mkdir()
