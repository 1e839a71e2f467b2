"""Several worker processes on one port: each new association goes to the least busy worker,
and a stuck worker does not keep associations from being accepted by the others."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from tests.conftest import Server, _children


def _workers(server: Server, n: int) -> list[int]:
    """The worker processes, once each of them accepts associations."""
    assert server.proc is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = {
            int(p) for p in re.findall(r"\[(\d+)\] pacsgrid\.node: worker ready", server.text())
        }
        pids = _children(server.proc.pid)
        if len(pids) == n and set(pids) <= ready:  # `ready` also has workers that died
            return pids
        time.sleep(0.1)
    raise AssertionError(f"expected {n} ready workers: {server.text()[-2000:]}")


def _open(port: int, calling_ae: str, n: int) -> list[Association]:
    """`n` associations, one after the other, each echoed and left open."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    out = []
    for _ in range(n):
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSGRID")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        out.append(assoc)
    return out


def _accepted_by(server: Server, calling_ae: str) -> Counter[int]:
    pattern = rf"\[(\d+)\] pacsgrid\.dicom: association from {calling_ae}@\S+ accepted"
    return Counter(int(pid) for pid in re.findall(pattern, server.text()))


def _wait_accepted(server: Server, calling_ae: str, n: int) -> Counter[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = _accepted_by(server, calling_ae)
        if sum(counts.values()) >= n:
            return counts
        time.sleep(0.05)
    return _accepted_by(server, calling_ae)


def _release(associations: list[Association]) -> None:
    for assoc in associations:
        assoc.release()


def test_new_associations_go_to_the_least_busy_worker(tmp_path: Path) -> None:
    server = Server(tmp_path / "archive", workers=2).start()
    try:
        workers = _workers(server, 2)
        # Four modalities connecting together: two associations per worker, not four on one
        # (asyncio's own accept loop took every pending connection in whichever worker woke
        # first).
        first = _open(server.port, "BALANCE1", 4)
        counts = _wait_accepted(server, "BALANCE1", 4)
        assert sorted(counts.values()) == [2, 2], counts
        assert set(counts) == set(workers)
        # While those stay open, two more: again one each.
        more = _open(server.port, "BALANCE2", 2)
        counts = _wait_accepted(server, "BALANCE2", 2)
        assert sorted(counts.values()) == [1, 1], counts
        _release(first + more)
        # Closed associations no longer count: a fresh burst is split evenly again.
        time.sleep(0.5)
        again = _open(server.port, "BALANCE3", 6)
        counts = _wait_accepted(server, "BALANCE3", 6)
        assert sorted(counts.values()) == [3, 3], counts
        _release(again)
    finally:
        server.stop()


def test_a_stuck_worker_does_not_stop_accepting(tmp_path: Path) -> None:
    server = Server(tmp_path / "archive", workers=2).start()
    stuck = None
    try:
        workers = _workers(server, 2)
        # Warm both workers up, then freeze one that serves nothing: it looks least busy
        # on the board, yet every association is accepted (by the other, after its wait).
        _release(_open(server.port, "WARMUP", 2))
        stuck = workers[0]
        os.kill(stuck, signal.SIGSTOP)
        opened = _open(server.port, "WHILESTUCK", 4)
        counts = _wait_accepted(server, "WHILESTUCK", 4)
        assert counts == Counter({workers[1]: 4}), counts
        _release(opened)
    finally:
        if stuck is not None:
            os.kill(stuck, signal.SIGCONT)
        server.stop()


def test_associations_leave_no_open_files_behind(tmp_path: Path) -> None:
    """Every association has its own thread; what a thread opens for it (index read
    connections, above all) must not stay open after the association is gone."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    server = Server(tmp_path / "archive", workers=1, args=("--peer", "FINDER@127.0.0.1:9")).start()
    try:
        assert server.proc is not None

        def open_files() -> int:
            return len(os.listdir(f"/proc/{server.proc.pid}/fd"))  # type: ignore[union-attr]

        ae = AE(ae_title="FINDER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""

        def one_association() -> None:
            assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSGRID")
            assert assoc.is_established
            statuses = [
                s.Status
                for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            ]
            assert statuses[-1] == 0
            assoc.release()

        for _ in range(3):
            one_association()
        time.sleep(0.5)
        before = open_files()
        for _ in range(40):
            one_association()
        time.sleep(0.5)
        assert open_files() <= before + 2, (before, open_files())
    finally:
        server.stop()
