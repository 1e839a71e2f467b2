"""The deployment a drill runs against, all on this machine: PostgreSQL with a standby under
Patroni, a SeaweedFS cluster, a folder site on a small tmpfs (so that it can be filled and
emptied again without touching a real disk), two `pacsgrid serve` nodes (one of them in a
network namespace, so that it can be cut off) and HAProxy in front of them.

The node in the namespace reaches PostgreSQL and the S3 gateway through HAProxy too: plain TCP
forwards listening on this machine's end of the veth pair, so that nothing else has to listen
beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pacsgrid.deploy import haproxy_config
from pacsgrid.drill.netns import Namespace
from pacsgrid.drill.patroni import PatroniCluster
from pacsgrid.drill.procs import DrillError, Proc, Procs, free_ports
from pacsgrid.drill.seaweed import SeaweedCluster

HOST = "127.0.0.1"
AE_TITLE = "PACSGRID"
CLIENT_AES = ("DRILLSTORE", "DRILLGET", "DRILLFIND")


@dataclass
class Node:
    """One `pacsgrid serve`: `host`:`port` is where HAProxy reaches it."""

    name: str
    host: str
    port: int
    config: Path
    data_dir: Path
    netns: Namespace | None = None
    proc: Proc | None = None


@dataclass
class Options:
    folder_mb: int = 192
    copies: int = 2
    write_quorum: int = 1
    workers: int = 1


@dataclass
class Deployment:
    workdir: Path
    options: Options = field(default_factory=Options)
    procs: Procs = field(default_factory=Procs)
    patroni: PatroniCluster | None = None
    weed: SeaweedCluster | None = None
    netns: Namespace | None = None
    haproxy: Proc | None = None
    port: int = 0  # HAProxy's DICOM port: where the clients connect
    nodes: list[Node] = field(default_factory=list)
    folder: Path | None = None
    mounted: bool = False

    # ------------------------------------------------------------------ start
    def start(self, say: Callable[[str], None] = print) -> Deployment:
        try:
            self._start(say)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, say: Callable[[str], None]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid() % 100000}"
        say("starting etcd and PostgreSQL with a standby under Patroni")
        self.patroni = PatroniCluster(procs=self.procs).start()
        self.patroni.create_db("pacs")
        say("starting SeaweedFS: master, 3 volume servers, filer, S3 gateway")
        self.weed = SeaweedCluster(self.workdir / "seaweedfs", procs=self.procs).start()
        self.weed.bucket("pacs")
        say(f"mounting a {self.options.folder_mb} MB tmpfs for the folder site")
        self.folder = self.workdir / "folder-site"
        self.folder.mkdir(exist_ok=True)
        _run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.options.folder_mb}m", "tmpfs", self.folder]
        )
        self.mounted = True
        say("creating a network namespace for node b")
        self.netns = Namespace(tag).create()
        a_port, b_port, self.port = free_ports(3)
        self.nodes = [
            Node("a", HOST, a_port, self.workdir / "node-a.toml", self.workdir / "node-a"),
            Node(
                "b",
                self.netns.address,
                b_port,
                self.workdir / "node-b.toml",
                self.workdir / "node-b",
                self.netns,
            ),
        ]
        self._write_configs()
        say("starting HAProxy")
        self._start_haproxy()
        for node in self.nodes:
            say(f"starting node {node.name} ({node.host}:{node.port})")
            self.start_node(node)

    def _write_configs(self) -> None:
        assert self.patroni is not None and self.weed is not None and self.netns is not None
        fwd = self.netns.host
        for node in self.nodes:
            inside = node.netns is not None
            hosts = [(fwd if inside else HOST, p) for p in self.patroni.pg_ports]
            endpoint = f"http://{fwd}:{self.weed.s3_port}" if inside else self.weed.endpoint
            peers = "".join(
                f'[[peers]]\nae_title = "{ae}"\nhost = "{HOST}"\nport = 9\n' for ae in CLIENT_AES
            )
            node.config.write_text(
                f'database = "{self.patroni.conninfo("pacs", hosts)}"\n'
                f"{peers}"
                "[replication]\n"
                f"copies = {self.options.copies}\n"
                f"write_quorum = {self.options.write_quorum}\n"
                "probe_interval = 2.0\n"
                "[durability]\n"
                "log_segment_mb = 4\n"
                "[index]\n"
                # C-FIND and retrieves keep answering from the standby while there is no
                # primary (and from the primary while the standby is gone).
                f'read_database = "{self.patroni.conninfo("pacs", hosts, "prefer-standby")}"\n'
                "connect_timeout = 2.0\n"
                "statement_timeout = 10.0\n"
                "[[sites]]\n"
                'name = "folder"\n'
                f'url = "file://{self.folder}"\n'
                'location = "campus"\n'
                "[[sites]]\n"
                'name = "objects"\n'
                f'url = "{self.weed.url("pacs", "archive", endpoint)}"\n'
                'location = "object-store"\n'
            )

    def _start_haproxy(self) -> None:
        exe = shutil.which("haproxy")
        if exe is None:
            raise DrillError("haproxy not found: apt install haproxy")
        assert self.patroni is not None and self.weed is not None and self.netns is not None
        text = haproxy_config(
            [(n.name, n.host, n.port) for n in self.nodes],
            listen=f"{HOST}:{self.port}",
            called_ae=AE_TITLE,
            inter="500ms",
            check_timeout="1s",
            fall=2,
            rise=1,
            stats_socket=str(self.workdir / "haproxy.sock"),
        )
        for port in [*self.patroni.pg_ports, self.weed.s3_port]:
            text += (
                f"\nlisten forward-{port}\n"
                f"    bind {self.netns.host}:{port}\n"
                f"    server local {HOST}:{port}\n"
            )
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(text)
        self.haproxy = self.procs.start(
            Proc("haproxy", [exe, "-db", "-f", cfg], self.workdir / "haproxy.log")
        )
        self.haproxy.wait_port(HOST, self.port, 30)

    # ------------------------------------------------------------------ nodes
    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def start_node(self, node: Node, timeout: float = 120.0) -> None:
        """Start (or restart, on the same port and data) `pacsgrid serve` on `node`."""
        argv: list[str | Path] = [
            sys.executable, "-m", "pacsgrid", "serve", "--config", node.config,
            "--data-dir", node.data_dir, "--bind", node.host, "--port", str(node.port),
            "--workers", str(self.options.workers),
        ]  # fmt: skip
        if node.netns is not None:
            argv = node.netns.argv(argv)
        node.proc = self.procs.start(
            Proc(f"node-{node.name}", argv, self.workdir / f"node-{node.name}.log")
        )
        deadline = time.monotonic() + timeout
        while not _echo(node.host, node.port):
            if not node.proc.running():
                raise DrillError(f"node {node.name} exited:\n{node.proc.tail()}")
            if time.monotonic() > deadline:
                raise DrillError(f"node {node.name} does not answer C-ECHO after {timeout:g}s")
            time.sleep(0.3)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Stop every process the drill started (by PID), unmount, remove the namespace."""
        for node in self.nodes:
            if node.proc is not None:
                node.proc.resume()
        if self.netns is not None:
            with contextlib.suppress(DrillError):
                self.netns.restore()
        self.procs.stop_all()
        if self.patroni is not None:
            self.patroni.stop()
            shutil.rmtree(self.patroni.root, ignore_errors=True)
        if self.mounted and self.folder is not None:
            _run(["umount", self.folder], check=False)
            self.mounted = False
        if self.netns is not None:
            self.netns.delete()


def _run(argv: list[str | Path], check: bool = True) -> None:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise DrillError(f"{' '.join(map(str, argv))}: {proc.stderr.strip()}")


def _echo(host: str, port: int, timeout: float = 5.0) -> bool:
    """A C-ECHO on a new association: the node answers DICOM."""
    from pynetdicom import AE

    ae = AE(ae_title="DRILLSTORE")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    try:
        assoc = ae.associate(host, port, ae_title=AE_TITLE)
    except Exception:
        return False
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()
