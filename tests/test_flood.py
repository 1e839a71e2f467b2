"""A flood of connections that never associate must not take the DICOM port from real peers.

2,000 TCP connections open and send nothing (from another address, from eight, from the
real peer's own address), and are held; meanwhile a real peer must associate and C-ECHO, and
again right after the flood closes all at once; and no worker may hold a thread per flood
connection. The latencies are measured and reported (bench/flood.py prints them), not
asserted: this machine may be loaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bench.flood import SCENARIOS, echo_seconds, run_scenario, worker_threads
from tests.conftest import Server, dcmtk

CONNECTIONS = 2000
MAX_ASSOCIATIONS = 128  # dicom.max_associations, the default


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("flood") / "archive", workers=2).start()
    yield s
    s.stop()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_real_peer_gets_through_a_flood(
    server: Server, scenario: str, record_property: pytest.RecordProperty
) -> None:
    assert server.proc is not None
    asyncio.run(echo_seconds(server.port))  # every worker has started
    idle_threads = worker_threads(server.proc.pid)
    result = run_scenario(server.port, server.proc.pid, scenario, CONNECTIONS)
    assert result.opened >= CONNECTIONS * 0.9, "the flood itself could not connect"
    assert result.threads <= idle_threads + MAX_ASSOCIATIONS, (
        f"{result.threads} threads in one worker for {result.opened} connections"
    )
    record_property("echo_during_flood_ms", round(result.during * 1000, 1))
    record_property("echo_after_flood_ms", round(result.after * 1000, 1))
    print(
        f"{scenario}: echo during the flood {result.during * 1000:.0f} ms, "
        f"right after {result.after * 1000:.0f} ms, at most {result.threads} threads"
    )
    # and DCMTK, an independent peer, is served too
    echo = dcmtk("echoscu", "-to", "30", "-aec", "PACSGRID", "127.0.0.1", server.port)
    assert echo.returncode == 0, echo.stdout
