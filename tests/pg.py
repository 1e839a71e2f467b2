"""Real PostgreSQL servers for tests and benchmarks: initdb, pg_ctl, pg_basebackup (Debian's
postgresql-15), each cluster in a folder of its own, listening on 127.0.0.1 and a free port.
For failover as in production, `PatroniCluster` (Debian's patroni and etcd-server: a primary and
a standby that Patroni promotes by itself), the launcher `pacsgrid drill` uses too
(src/pacsgrid/drill/patroni.py).

initdb refuses to run as root, so the cluster belongs to the `postgres` user and every server
program runs as that user (`runuser`); clients (psycopg, pg_dump) connect over TCP with trust
authentication on loopback. Every process started here is stopped by its PID (the postmaster's,
read from postmaster.pid), never by name.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

from pacsgrid.drill.patroni import PatroniCluster, _owned_dir, patroni_missing
from pacsgrid.drill.procs import alive, children
from tests.peers.program import free_port
from tests.waiting import wait_until

__all__ = ["FAST_FAIL", "PatroniCluster", "PgCluster", "failover_url", "patroni_missing"]

PG_BIN = Path(os.environ.get("PACSGRID_PG_BIN", "/usr/lib/postgresql/15/bin"))


def pg_available() -> bool:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return (PG_BIN / "initdb").exists() and shutil.which("runuser") is not None


def _as_postgres(*cmd: str | Path | int, check: bool = True, timeout: float = 120) -> str:
    argv = ["runuser", "-u", "postgres", "--", *map(str, cmd)]
    if os.getuid() != 0:  # already some user (a developer's machine): run directly
        argv = list(map(str, cmd))
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return proc.stdout


class PgCluster:
    """One PostgreSQL server (a primary, or a streaming replica of one)."""

    def __init__(
        self, root: Path | None = None, port: int | None = None, *, fsync: bool = False
    ) -> None:
        """`root`: a folder of the postgres user's that holds (or will hold) the cluster."""
        if root is None:
            root = _owned_dir("pacsgrid-pg-")
        elif not root.exists():  # a folder of the postgres user's where the caller wants it
            root.mkdir(mode=0o700)
            if os.getuid() == 0:
                pw = pwd.getpwnam("postgres")
                os.chown(root, pw.pw_uid, pw.pw_gid)
        self.root = root
        self.fsync = fsync
        self.data = self.root / "data"
        self.port = port or free_port()
        self.log = self.root / "server.log"
        self.pid: int | None = None

    @classmethod
    def reopen(cls, root: Path) -> PgCluster:
        """The cluster made earlier in `root` (not running), on the port it was given."""
        conf = (root / "data" / "postgresql.auto.conf").read_text()
        ports = [line.split("=")[1] for line in conf.splitlines() if line.startswith("port =")]
        return cls(root, int(ports[-1]))

    # ------------------------------------------------------------------ lifecycle
    def init(self) -> PgCluster:
        _as_postgres(
            PG_BIN / "initdb",
            "-D",
            self.data,
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=en_US.UTF-8" if _has_locale("en_US.utf8") else "--locale=C.UTF-8",
            "--no-sync",
        )
        self._configure()
        return self

    def _configure(self) -> None:
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            "unix_socket_directories = ''",
            "max_connections = 200",
            "wal_level = replica",
            "max_wal_senders = 10",
            "wal_keep_size = 256MB",
            "hot_standby = on",
            "shared_buffers = 128MB",
            "synchronous_commit = on",
        ]
        if not self.fsync:
            # The tests measure behaviour, not a disk: commits still go through the WAL.
            # Benchmarks ask for fsync, as in production.
            conf += ["fsync = off", "full_page_writes = off"]
        with open(self.data / "postgresql.auto.conf", "a") as fh:
            fh.write("\n".join(conf) + "\n")

    def replica(self) -> PgCluster:
        """A streaming replica of this (running) server, not started yet."""
        rep = PgCluster()
        _as_postgres(
            PG_BIN / "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            self.port,
            "-U",
            "postgres",
            "-D",
            rep.data,
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
        )
        # The copied settings name the primary's port; the replica listens on its own.
        with open(rep.data / "postgresql.auto.conf", "a") as fh:
            fh.write(f"port = {rep.port}\n")
        return rep

    def start(self, timeout: float = 60) -> PgCluster:
        _as_postgres(
            PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", int(timeout), "start"
        )
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            argv = [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)]
            return subprocess.run(argv, capture_output=True).returncode == 0

        wait_until(
            ready, timeout, f"postgres on {self.port} ready", seen=lambda: self.text()[-3000:]
        )

    def promote(self) -> None:
        _as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-w", "promote")

    def stop(self) -> None:
        if self.pid is None:
            return
        if alive(self.pid):
            _as_postgres(
                PG_BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False
            )
        self.pid = None

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend it started (a machine that died)."""
        if self.pid is None:
            return
        pids = children(self.pid) + [self.pid]
        for pid in [self.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in pids), 30, "postgres processes gone")
        self.pid = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ clients
    def url(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_db(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def failover_url(primary: PgCluster, replica: PgCluster, dbname: str = "pacs") -> str:
    """The conninfo of a two-host cluster: libpq picks whichever is the primary."""
    return (
        f"host=127.0.0.1,127.0.0.1 port={primary.port},{replica.port} user=postgres "
        f"dbname={dbname} target_session_attrs=read-write"
    )


# Bounded waits for archives under test, so a missing primary shows within seconds.
FAST_FAIL = {"PACSGRID_INDEX_CONNECT_TIMEOUT": "2", "PACSGRID_INDEX_STATEMENT_TIMEOUT": "10"}


def _has_locale(name: str) -> bool:
    try:
        out = subprocess.run(["locale", "-a"], stdout=subprocess.PIPE, text=True).stdout
    except OSError:
        return False
    return name.lower() in out.lower().split()
