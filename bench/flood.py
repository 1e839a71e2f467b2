"""A connection flood against the DICOM port, and the C-ECHO latency of a legitimate peer.

    python -m bench.flood [--connections 2000] [--workers 2] [--rounds 3]

A flood opens `--connections` TCP connections to the DICOM port and sends nothing (half-open
associations: no A-ASSOCIATE-RQ), from one address, from eight, or from the legitimate peer's
own address (127.0.0.2..., 127.0.0.1: all of 127/8 is this machine), and holds them. While it is
held, a peer on 127.0.0.1 associates and sends C-ECHO; then the flood closes all at once, and
the peer echoes again at once. Reported: the echo latency (connect, associate, C-ECHO, release)
during and right after the flood, and the most threads any worker had. Bounded: each
connection attempt and echo has a timeout, and everything is closed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import tree

SCENARIOS = {
    "one address": ["127.0.0.2"],
    "eight addresses": [f"127.0.0.{i}" for i in range(2, 10)],
    "the peer's own address": ["127.0.0.1"],
}


@dataclass
class Result:
    scenario: str
    opened: int
    during: float  # seconds for one echo association while the flood is held
    after: float  # right after the flood's connections all closed
    threads: int  # most threads seen in one worker process during the flood
    errors: list[str] = field(default_factory=list)


def open_flood(
    port: int, count: int, sources: list[str], timeout: float = 5.0
) -> list[socket.socket]:
    """`count` connections to the port, round robin over `sources`, that send nothing."""
    socks = []
    for i in range(count):
        s = socket.socket()
        s.settimeout(timeout)
        try:
            s.bind((sources[i % len(sources)], 0))
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


async def echo_seconds(port: int, timeout: float = 60.0) -> float:
    """Seconds for connect + associate + C-ECHO + release, from 127.0.0.1 (pacsgrid's own
    requestor, so that process start-up is not part of the figure)."""
    from pacsgrid.dicom.scu import connect

    started = time.perf_counter()
    assoc = await connect(
        "127.0.0.1",
        port,
        "FLOODECHO",
        "PACSGRID",
        [("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])],
        timeout=timeout,
    )
    try:
        status = await assoc.c_echo()
    finally:
        await assoc.release()
    if status != 0:
        raise RuntimeError(f"C-ECHO status 0x{status:04X}")
    return time.perf_counter() - started


def worker_threads(pid: int) -> int:
    """The most threads in one process of the server's tree."""
    most = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            most = max(most, len(os.listdir(f"/proc/{p}/task")))
    return most


def run_scenario(port: int, pid: int, name: str, connections: int) -> Result:
    flood = open_flood(port, connections, SCENARIOS[name])
    try:
        threads = worker_threads(pid)
        during = asyncio.run(echo_seconds(port))
        threads = max(threads, worker_threads(pid))
    finally:
        for s in flood:
            s.close()
    after = asyncio.run(echo_seconds(port))
    return Result(name, len(flood), during, after, threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.peers import Server

    with tempfile.TemporaryDirectory(prefix="pacsgrid-flood-") as tmp:
        server = Server(Path(tmp) / "archive", workers=args.workers).start()
        try:
            assert server.proc is not None
            asyncio.run(echo_seconds(server.port))  # warm
            idle = worker_threads(server.proc.pid)
            print(
                f"{args.connections} half-open connections, {args.workers} workers; "
                f"idle: {idle} threads in the largest process"
            )
            for name in SCENARIOS:
                results = [
                    run_scenario(server.port, server.proc.pid, name, args.connections)
                    for _ in range(args.rounds)
                ]
                during = [r.during for r in results]
                after = [r.after for r in results]
                print(
                    f"  from {name:24} opened {min(r.opened for r in results):5}  "
                    f"echo during: median {statistics.median(during) * 1000:7.1f} ms, "
                    f"max {max(during) * 1000:7.1f} ms;  right after: median "
                    f"{statistics.median(after) * 1000:7.1f} ms, max {max(after) * 1000:7.1f} ms;"
                    f"  threads <= {max(r.threads for r in results)}"
                )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
