"""PostgreSQL with a standby under Patroni, and the etcd it keeps its leader key in, on one
machine: every process on 127.0.0.1, stopped (or killed) by its PID.

Patroni (Debian's `patroni`) bootstraps the primary with initdb, makes the other node a
streaming replica, and promotes it when the primary's leader key expires in etcd (Debian's
`etcd-server`): `ttl` seconds after the primary died. `synchronous_mode` makes a commit wait
for the standby, so a promotion never loses an acknowledged commit. Small on purpose: 32 MB
shared buffers, one etcd member (production runs three, see docs/postgresql.md).

PostgreSQL refuses to run as root: as root, Patroni runs as the `postgres` user in folders it
owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from pacsgrid.drill.procs import DrillError, Proc, Procs, alive, children, free_ports, signal_all

HOST = "127.0.0.1"
PG_BIN = Path(os.environ.get("PACSGRID_PG_BIN", "/usr/lib/postgresql/15/bin"))


def patroni_missing() -> str:
    """Why Patroni cannot run here ("" when it can)."""
    missing = [p for p in ("patroni", "etcd") if shutil.which(p) is None]
    if missing:
        return f"{' and '.join(missing)} not found: apt install patroni etcd-server"
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL not found in {PG_BIN}: apt install postgresql (or PACSGRID_PG_BIN)"
    if os.getuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no postgres user to run PostgreSQL as (apt install postgresql)"
    return ""


def _owned_dir(prefix: str) -> Path:
    """A fresh folder the postgres user owns (PostgreSQL cannot run as root)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    if os.getuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(d, pw.pw_uid, pw.pw_gid)
    d.chmod(0o700)
    return d


def _yaml(value: Any, indent: int = 0) -> str:
    """The YAML Patroni reads (JSON is YAML: scalars as JSON, mappings as blocks)."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:\n{_yaml(v, indent + 1)}")
            else:
                lines.append(f"{pad}{k}: {json.dumps(v)}")
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(f"{pad}- {json.dumps(v)}" for v in value)
    return pad + json.dumps(value)


class PatroniCluster:
    """`start()` returns once one node is the leader and every other one streams from it."""

    def __init__(
        self,
        nodes: int = 2,
        *,
        ttl: int = 10,
        loop_wait: int = 1,
        retry_timeout: int = 3,
        synchronous: bool = True,
        root: Path | None = None,
        procs: Procs | None = None,
    ) -> None:
        missing = patroni_missing()
        if missing:
            raise DrillError(missing)
        self.root = root or _owned_dir("pacsgrid-patroni-")
        self.procs = procs or Procs()
        self.user = "postgres" if os.getuid() == 0 else None
        self.scope = f"pacsgrid-{os.getpid()}-{time.monotonic_ns() % 100000}"
        ports = free_ports(2 + 2 * nodes)
        self.etcd_port, self.etcd_peer = ports[0], ports[1]
        self.pg_ports = [ports[2 + 2 * i] for i in range(nodes)]
        self.api_ports = [ports[3 + 2 * i] for i in range(nodes)]
        self.dcs = {
            "ttl": ttl,
            "loop_wait": loop_wait,
            "retry_timeout": retry_timeout,
            "maximum_lag_on_failover": 1048576,
            "synchronous_mode": synchronous,
            "postgresql": {
                "use_pg_rewind": True,
                "parameters": {
                    "wal_level": "replica",
                    "hot_standby": "on",
                    "wal_log_hints": "on",
                    "max_wal_senders": 10,
                    "max_replication_slots": 10,
                    "max_connections": 100,
                },
            },
        }
        self.etcd: Proc | None = None
        self.nodes: list[Proc | None] = [None] * nodes

    # ------------------------------------------------------------------ processes
    def start(self, timeout: float = 180.0) -> PatroniCluster:
        try:
            etcd_dir = self.root / "etcd"
            self.etcd = self.procs.start(
                Proc(
                    "etcd",
                    [
                        "etcd",
                        "--name=e0",
                        f"--data-dir={etcd_dir}",
                        f"--listen-client-urls=http://{HOST}:{self.etcd_port}",
                        f"--advertise-client-urls=http://{HOST}:{self.etcd_port}",
                        f"--listen-peer-urls=http://{HOST}:{self.etcd_peer}",
                        f"--initial-advertise-peer-urls=http://{HOST}:{self.etcd_peer}",
                        f"--initial-cluster=e0=http://{HOST}:{self.etcd_peer}",
                        "--quota-backend-bytes=134217728",
                        "--snapshot-count=5000",
                    ],
                    self.root / "etcd.log",
                ),
                last=True,
            )
            self.etcd.wait_port(HOST, self.etcd_port, timeout)
            self.start_node(0)
            self.wait_roles(timeout, replicas=0)
            for i in range(1, len(self.nodes)):
                self.start_node(i)
            self.wait_roles(timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def _config(self, i: int) -> Path:
        folder = self.root / f"pg{i}"
        folder.mkdir(exist_ok=True)
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(folder, pw.pw_uid, pw.pw_gid)
        config = {
            "scope": self.scope,
            "namespace": "/pacsgrid/",
            "name": f"pg{i}",
            "log": {"level": "WARNING"},
            "restapi": {
                "listen": f"{HOST}:{self.api_ports[i]}",
                "connect_address": f"{HOST}:{self.api_ports[i]}",
            },
            "etcd3": {"hosts": f"{HOST}:{self.etcd_port}"},
            "bootstrap": {
                "dcs": self.dcs,
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
                "pg_hba": [
                    f"host replication replicator {HOST}/32 trust",
                    f"host all all {HOST}/32 trust",
                ],
            },
            "postgresql": {
                "listen": f"{HOST}:{self.pg_ports[i]}",
                "connect_address": f"{HOST}:{self.pg_ports[i]}",
                "data_dir": str(folder / "data"),
                "bin_dir": str(PG_BIN),
                "pgpass": str(folder / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "replicator", "password": "replicator"},
                    "rewind": {"username": "postgres", "password": "postgres"},
                },
                "parameters": {
                    "unix_socket_directories": str(folder),
                    "shared_buffers": "32MB",
                    # A drill measures behaviour, not a disk: commits still go through the
                    # WAL and to the standby.
                    "fsync": "off",
                    "full_page_writes": "on",
                },
            },
        }
        path = folder / "patroni.yml"
        path.write_text(_yaml(config) + "\n")
        return path

    def start_node(self, i: int) -> None:
        """Start Patroni on node `i` (again, after a kill: it rejoins as a replica)."""
        config = self._config(i)
        self.nodes[i] = self.procs.start(
            Proc(
                f"patroni{i}",
                ["patroni", config],
                self.root / f"patroni{i}.log",
                cwd=config.parent,
                user=self.user,
                env={"HOME": str(config.parent)},
            )
        )

    def postmaster(self, i: int) -> int:
        try:
            text = (self.root / f"pg{i}" / "data" / "postmaster.pid").read_text()
            return int(text.split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def kill(self, i: int) -> None:
        """SIGKILL node `i`: Patroni, the postmaster and every backend (a machine that died)."""
        proc = self.nodes[i]
        pids = []
        master = self.postmaster(i)
        if master and alive(master):
            pids = [master, *children(master)]
        signal_all(pids, signal.SIGKILL)
        if proc is not None:
            proc.kill()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.nodes[i] = None

    def stop(self) -> None:
        """Stop Patroni on every node (together; each stops its PostgreSQL), then etcd."""
        procs = Procs()
        for proc in self.nodes:
            if proc is not None:
                procs.start_tracking(proc)
        if self.etcd is not None:
            procs.start_tracking(self.etcd, last=True)
        procs.stop_all()
        for i in range(len(self.nodes)):
            master = self.postmaster(i)
            if master and alive(master):  # Patroni was killed before it could stop it
                signal_all([master], signal.SIGQUIT)
            self.nodes[i] = None
        self.etcd = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ state
    def members(self) -> list[dict[str, Any]]:
        """The cluster as Patroni's REST API tells it (from any node that answers).

        A node answers in time on a loaded machine too: a single reading (the leader to
        kill, the leader after a failover) must not come back empty because Patroni, a
        Python program, took a few seconds (a dead node refuses at once)."""
        for i, proc in enumerate(self.nodes):
            if proc is None:
                continue
            url = f"http://{HOST}:{self.api_ports[i]}/cluster"
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(url, timeout=15) as resp,
            ):
                members: list[dict[str, Any]] = json.loads(resp.read())["members"]
                return members
        return []

    def leader(self) -> int | None:
        """The node that is the running primary now."""
        for m in self.members():
            if m.get("role") == "leader" and m.get("state") == "running":
                return int(str(m["name"])[2:])
        return None

    def wait_roles(self, timeout: float, replicas: int | None = None) -> int:
        """Until a leader runs and `replicas` (default: every other started node) stream
        from it; returns the leader.

        In synchronous mode one of them must also be the synchronous standby: Patroni
        names it a loop or two after the replica starts streaming, and until then a
        dead primary is never replaced (only the synchronous standby may be promoted)."""
        want = sum(p is not None for p in self.nodes) - 1 if replicas is None else replicas
        need_sync = bool(self.dcs["synchronous_mode"]) and want > 0
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            for i, proc in enumerate(self.nodes):
                if proc is not None and not proc.running():
                    raise DrillError(f"patroni{i} exited:\n{proc.tail()}")
            seen = self.members()
            lead = [m for m in seen if m.get("role") == "leader" and m.get("state") == "running"]
            streaming = [
                m
                for m in seen
                if m.get("role") in ("replica", "sync_standby")
                and m.get("state") in ("streaming", "running")
                and lead
                and m.get("timeline") == lead[0].get("timeline")  # rewound, following it
            ]
            synced = any(m.get("role") == "sync_standby" for m in streaming)
            if lead and len(streaming) >= want and (synced or not need_sync):
                return int(str(lead[0]["name"])[2:])
            time.sleep(0.2)
        raise DrillError(f"Patroni: no leader with {want} replica(s) after {timeout:g}s: {seen}")

    # ------------------------------------------------------------------ clients
    def conninfo(
        self,
        dbname: str = "postgres",
        hosts: list[tuple[str, int]] | None = None,
        attrs: str = "read-write",
    ) -> str:
        """Every host, `target_session_attrs=read-write`: libpq finds the primary itself
        (`prefer-standby` for reads that may go to the standby)."""
        where = hosts or [(HOST, p) for p in self.pg_ports]
        return (
            f"host={','.join(h for h, _ in where)} port={','.join(str(p) for _, p in where)} "
            f"user=postgres password=postgres dbname={dbname} target_session_attrs={attrs} "
            "connect_timeout=2"
        )

    def create_db(self, name: str, timeout: float = 60.0) -> str:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.conninfo(), autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                return self.conninfo(name)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
