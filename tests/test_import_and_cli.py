"""`pacsgrid import`, `pacsgrid status`, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.synth import Spec, write
from tests import synthetic
from tests.conftest import Server, pacsgrid_cli, storescu_started
from tests.corpus import SHARED, accepted, corpus, shared_available
from tests.waiting import wait_until


def pacsgrid(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return pacsgrid_cli(*args, cwd=cwd, timeout=timeout)


def summary_numbers(stdout: str) -> dict[str, int]:
    m = re.search(r"stored (\d+) .*duplicates (\d+), skipped (\d+).*failed (\d+)", stdout)
    assert m, stdout
    return dict(
        zip(("stored", "duplicates", "skipped", "failed"), map(int, m.groups()), strict=True)
    )


@pytest.mark.slow
def test_import_the_corpus_with_junk(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    (junk / "deep" / "er").mkdir(parents=True)
    (junk / "notes.txt").write_text("not an image\n")
    (junk / "deep" / "empty").write_bytes(b"")
    (junk / "deep" / "er" / "random.bin").write_bytes(os.urandom(4096))
    # Without the shared corpus: the fallback files themselves (their folders hold other
    # files); either way the files tests/synthetic.py wrote.
    roots = [SHARED, synthetic.folder()] if shared_available() else [f.path for f in corpus()]
    proc = pacsgrid(
        "import", "--data-dir", str(tmp_path / "d"), *map(str, roots), str(junk), cwd=tmp_path
    )
    n = summary_numbers(proc.stdout)
    files = corpus()
    dicomdirs = sum(1 for f in files if f.expect.startswith("not-an-instance"))
    assert f"{dicomdirs} DICOMDIR" in proc.stdout or dicomdirs == 0
    assert n["skipped"] >= dicomdirs + 3
    # Every valid file went in (stored, or a duplicate of a stored UID); only broken files fail.
    assert n["stored"] + n["duplicates"] >= len(accepted())
    invalid_paths = {str(f.path) for f in files if f.expect == "reject-or-tolerate"}
    failed_paths = re.findall(r"^  failed: (.+?): ", proc.stdout, re.M)
    assert set(failed_paths) <= invalid_paths
    assert n["failed"] == len(failed_paths)
    assert proc.returncode == (1 if n["failed"] else 0)
    status = json.loads(
        pacsgrid("status", "--json", "--data-dir", str(tmp_path / "d"), cwd=tmp_path).stdout
    )
    assert status["index"]["instances"] == n["stored"]
    assert status["sites"][0]["objects"] == n["stored"]
    # Running it again stores nothing new.
    again = summary_numbers(
        pacsgrid("import", "--data-dir", str(tmp_path / "d"), *map(str, roots), cwd=tmp_path).stdout
    )
    assert again["stored"] == 0
    assert again["duplicates"] == n["stored"] + n["duplicates"]


@pytest.mark.slow
def test_import_interrupted_and_resumed(tmp_path: Path) -> None:
    """Ctrl-C while files are in flight: those finish, the rest waits for the next run.

    The interruption is made certain, not raced: the first two files of the source are FIFOs
    that block both reader threads (--jobs 2) until the test writes a DICOM file into each,
    and the test sends SIGINT while they block."""
    src = tmp_path / "src"
    files = write(Spec(studies=10, series=3, instances=10, size=16, seed="import"), src / "data")
    gates = [src / "000-gate-a.dcm", src / "000-gate-b.dcm"]  # sorted first: read first
    extra = write(Spec(studies=1, series=1, instances=2, size=16, seed="gates"), tmp_path / "g")
    for gate in gates:
        os.mkfifo(gate)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacsgrid", "import", "--jobs", "2"]
        + ["--data-dir", str(tmp_path / "d"), str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writers: list[int] = []
    try:
        # Opening a FIFO for writing without blocking succeeds once a reader has it open:
        # then both import threads are inside read_bytes(), and the import cannot finish.
        for gate in gates:
            writers.append(
                wait_until(
                    lambda g=gate: _open_writer(g),  # type: ignore[misc]
                    120,
                    f"the import reading {gate.name}",
                )
            )
        proc.send_signal(signal.SIGINT)
    finally:
        for fd, source in zip(writers, extra, strict=False):
            os.write(fd, source.read_bytes())
            os.close(fd)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted: run the same command again to continue" in out
    first = summary_numbers(out)
    # At most the files in flight were stored: 4 per thread (the two gates among them).
    assert 2 <= first["stored"] <= 8, out
    for gate, source in zip(gates, extra, strict=True):
        gate.unlink()
        gate.write_bytes(source.read_bytes())  # the next run reads them as plain files
    resumed = summary_numbers(
        pacsgrid("import", "--data-dir", str(tmp_path / "d"), str(src), cwd=tmp_path).stdout
    )
    assert first["stored"] + resumed["stored"] == len(files) + len(gates)
    assert resumed["duplicates"] == first["stored"]


def _open_writer(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody reads it yet
        return None


def test_status_text(tmp_path: Path) -> None:
    out = pacsgrid("status", "--data-dir", str(tmp_path / "d"), cwd=tmp_path).stdout
    assert out.startswith("patients 0  studies 0  series 0  instances 0  bytes 0")
    assert "site local [archive, default]" in out and ": up;" in out


def wait_until_stored(db: Path, n: int, timeout: float = 60) -> None:
    """Until the index holds `n` instances (the transfer is under way)."""
    from pacsgrid.index.sqlite import SqliteIndex

    def stored() -> bool:
        if not db.exists():
            return False
        index = SqliteIndex(db)
        try:
            return index.stats().instances >= n
        finally:
            index.close()

    wait_until(stored, timeout, f"{n} instances stored")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_storescu_stops_cleanly(tmp_path: Path, workers: int) -> None:
    """SIGTERM with a short grace period while storescu sends: the association in progress is
    aborted after the grace, every acknowledged instance is indexed, nothing half-written."""
    files = write(
        Spec(studies=6, series=4, instances=50, size=16, seed=f"term{workers}"), tmp_path / "src"
    )
    server = Server(
        tmp_path / "d", workers=workers, env={"PACSGRID_DICOM_SHUTDOWN_GRACE": "0.5"}
    ).start()
    sender = storescu_started(server.port, files)
    wait_until_stored(tmp_path / "d" / "index.sqlite", 20)
    assert server.proc is not None
    started = time.monotonic()
    code = server.stop(signal.SIGTERM, timeout=60)
    took = time.monotonic() - started
    output, _ = sender.communicate(timeout=60)
    assert code == 0, server.text()[-2000:]
    acked = output.count("Received Store Response (Success)")
    log = server.text()
    assert "stopping" in log
    assert 0 < acked < len(files), "the stop should land in the middle of the transfer"
    assert "aborting association with STORESCU" in log
    assert "Traceback" not in log
    from pacsgrid.index.sqlite import SqliteIndex

    index = SqliteIndex(tmp_path / "d" / "index.sqlite")
    try:
        assert index.stats().instances >= acked
    finally:
        index.close()
    incoming = tmp_path / "d" / "objects" / ".incoming"
    assert [p.name for p in incoming.iterdir()] == []
    # storescu either finished or was told to go away: its association ended within the grace
    print(f"\nworkers={workers}: stopped in {took:.1f}s with {acked} instances acknowledged")
