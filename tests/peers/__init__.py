"""The programs tests and benchmarks run as peers, started one way for both.

Each launcher starts its program on 127.0.0.1 and free ports, waits until it answers
(tests.waiting.wait_until, bounded, failing with the end of the program's log), and stops it
by its PID (`stop()`: SIGTERM, then SIGKILL for the tree; `kill()`: SIGKILL at once):

- `Server`: `pacsgrid serve` (tests.peers.pacsgrid)
- `StoreSCP`: DCMTK's storescp (tests.peers.dcmtk)
- `Orthanc`: Debian's Orthanc, a legacy PACS or the archive benchmarked against
  (tests.peers.orthanc)
- `SeaweedFS`: `weed mini`, one S3 server (tests.peers.seaweedfs); `SeaweedCluster`, SeaweedFS
  as master, volume servers, filer and S3 gateway, is the drill's (pacsgrid.drill.seaweed)
- `HAProxy`: in front of pacsgrid nodes (tests.peers.haproxy)
- PostgreSQL: `PgCluster` in tests.pg, and Patroni's `PatroniCluster` (pacsgrid.drill.patroni)

They need nothing of pytest, so the benchmarks (bench/) import them as they are.
"""

from tests.peers.dcmtk import StoreSCP
from tests.peers.haproxy import HAProxy
from tests.peers.orthanc import Orthanc
from tests.peers.pacsgrid import Server
from tests.peers.program import (
    DCMTK_ENV,
    HOST,
    PeerError,
    Program,
    dcmtk_tool,
    free_port,
    free_ports,
)
from tests.peers.seaweedfs import SeaweedCluster, SeaweedFS

__all__ = [
    "DCMTK_ENV",
    "HOST",
    "HAProxy",
    "Orthanc",
    "PeerError",
    "Program",
    "SeaweedCluster",
    "SeaweedFS",
    "Server",
    "StoreSCP",
    "dcmtk_tool",
    "free_port",
    "free_ports",
]
