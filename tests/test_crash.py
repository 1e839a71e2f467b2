"""Crash safety: SIGKILL the server at random moments while storescu sends.

After every kill and restart, each instance that got a success status is indexed and reads back
with the right SHA-256, and every object visible on the site is complete and indexed (the
ingest journal indexes what was written but not yet committed when the process died).
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from bench.synth import Spec, write
from tests.behind_the_archive import index_of
from tests.conftest import Server, dcmtk, storescu_started

ROUNDS = 10


def acknowledged(output: str) -> set[Path]:
    acked, current = set(), None
    for line in output.splitlines():
        m = re.match(r"^I: Sending file: (.+)$", line)
        if m:
            current = Path(m.group(1))
        elif line.startswith("I: Received Store Response (Success)") and current:
            acked.add(current)
            current = None
    return acked


def sop_uid(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def check_archive(data_dir: Path, acked_uids: set[str]) -> int:
    from pacsgrid.archive import Archive
    from pacsgrid.settings import Overrides, load_settings

    archive = Archive(load_settings(Overrides(data_dir=data_dir), environ={}), probe_interval=0)
    try:
        for uid in acked_uids:
            record = index_of(archive).instance(uid)
            assert record is not None, f"acknowledged {uid} is not indexed"
            archive.read(record)  # raises unless a copy matches the recorded SHA-256
        visible = [
            p
            for p in (data_dir / "objects").rglob("*.dcm")
            if not any(part.startswith(".") for part in p.relative_to(data_dir / "objects").parts)
        ]
        for path in visible:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)  # complete: parses to the end
                uid = str(ds.SOPInstanceUID)
            assert index_of(archive).has_instance(uid), f"orphan object {path}"
        assert index_of(archive).stats().instances == len(visible)
        return len(visible)
    finally:
        archive.close()


@pytest.mark.slow
def test_sigkill_during_storescu(tmp_path: Path) -> None:
    files = write(Spec(studies=6, series=2, instances=25, size=32, seed="crash"), tmp_path / "src")
    uids = {p: sop_uid(p) for p in files}
    rng = random.Random(20261123)
    data_dir = tmp_path / "archive"
    acked_total: set[str] = set()
    port = None
    for round_no in range(ROUNDS):
        workers = 1 + round_no % 2
        server = Server(data_dir, port=port, workers=workers).start()
        port = server.port
        order = files[:]
        rng.shuffle(order)
        sender = storescu_started(port, order)
        time.sleep(rng.uniform(0.3, 1.5))
        server.kill()
        output, _ = sender.communicate(timeout=60)
        acked = {uids[p] for p in acknowledged(output)}
        acked_total |= acked
        # Restart: recovery runs before the port opens; then check what is on disk.
        server = Server(data_dir, port=port, workers=1).start()
        server.stop()
        visible = check_archive(data_dir, acked_total)
        assert visible >= len(acked_total)
    assert acked_total, "storescu never got a success before the kills"
    print(f"\n{ROUNDS} kills; {len(acked_total)} acknowledged instances all intact")


def _visible(data_dir: Path) -> int:
    return sum(1 for _ in (data_dir / "objects").glob("*/*/*.dcm"))


def _wait_for(what: str, check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_worker_killed_mid_store_is_replaced_and_its_store_indexed(tmp_path: Path) -> None:
    """SIGKILL one worker while a store waits for its index commit: the server keeps serving,
    the supervisor starts another worker and indexes the object the dead one had written (never
    acknowledged), without a restart, so no object on the site is left out of the index."""
    from tests.test_workers import _workers

    files = write(Spec(studies=2, series=2, instances=10, size=32, seed="worker"), tmp_path / "src")
    first, second = files[:20], files[20:]
    data_dir = tmp_path / "archive"
    server = Server(data_dir, workers=2).start()
    sender = None
    try:
        before = set(_workers(server, 2))
        stored = dcmtk(
            "storescu",
            "-v",
            "-nh",
            "-aec",
            "PACSGRID",
            "127.0.0.1",
            server.port,
            *first,
            check=True,
        )
        acked = {sop_uid(p) for p in acknowledged(stored.stdout)}
        assert len(acked) == 20
        # Hold the index's write lock (as a long commit of another process would): the next
        # store is written and durable on the site, then waits for its commit.
        lock = os.open(data_dir / "index.sqlite.writelock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            sender = storescu_started(server.port, second, "-aet", "KILLME")
            _wait_for("the blocked store's object", lambda: _visible(data_dir) == 21)
            pattern = r"\[(\d+)\] pacsgrid\.dicom: association from KILLME@\S+ accepted"
            victim = int(_wait_for("the association", lambda: re.search(pattern, server.text()))[1])
            os.kill(victim, signal.SIGKILL)
        finally:
            os.close(lock)  # releases the lock
        output, _ = sender.communicate(timeout=60)
        assert not acknowledged(output), output[-2000:]  # the blocked store never got success
        _wait_for(
            "the supervisor's replay of the dead worker's log and journal",
            lambda: re.search(
                rf"worker pid {victim}: its site logs and ingest journal replayed "
                r"\(\d+ record\(s\), 1 instance\(s\) indexed\)",
                server.text(),
            ),
        )
        after = set(_workers(server, 2))
        assert victim in before and victim not in after and len(after & before) == 1
        assert check_archive(data_dir, acked) == 21  # the 21st object is indexed, not orphaned
        # The sender retries and the archive takes everything, on the new worker too.
        dcmtk("storescu", "-nh", "-aec", "PACSGRID", "127.0.0.1", server.port, *second, check=True)
        assert check_archive(data_dir, acked) == 40
        assert server.proc is not None and server.proc.poll() is None
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
        server.stop()
