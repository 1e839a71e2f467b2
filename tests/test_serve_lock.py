"""`pacsgrid serve` holds its archive, with the real server and DCMTK/pynetdicom clients.

- SIGKILL of the supervisor: its DICOM workers stop by themselves (an idle one at once, one
  with an association once that ends); a new `serve` of the archive on the same port waits for
  them, naming them, instead of sharing the port, then serves;
- `pacsgrid restore --force` while `serve` runs is refused with one line naming the server's
  pid, and moves nothing aside; once the server stopped it restores.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import Server, dcmtk, pacsgrid_cli
from tests.test_workers import _workers


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def _wait(what: str, check: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _spawn(server: Server) -> None:
    """Start `server` without waiting for its port (an orphan may still hold it)."""
    server.launch(server.command(), env=server.env)


@pytest.mark.slow
def test_workers_stop_with_a_killed_supervisor_and_never_share_the_port(tmp_path: Path) -> None:
    data = tmp_path / "archive"
    grace = {"PACSGRID_DICOM_SHUTDOWN_GRACE": "60"}
    first = Server(data, workers=2, env=grace).start()
    again = Server(data, port=first.port, workers=1, env=grace)
    again.log = tmp_path / "again.log"  # the same port and folder would share the first's log
    workers = _workers(first, 2)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", first.port, ae_title="PACSGRID")
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assert first.proc is not None
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        first.proc = None
        # The worker without an association stops at once; the other one finishes its
        # association first (dicom.shutdown_grace), and meanwhile holds the archive.
        _wait("an idle worker to stop", lambda: any(_gone(p) for p in workers))
        busy = [p for p in workers if not _gone(p)]
        assert len(busy) == 1, busy
        _spawn(again)
        _wait("the new server to wait for the orphan", lambda: "for them to exit" in again.text())
        log = again.text()
        assert f"pid {busy[0]} (a DICOM worker whose supervisor is gone)" in log, log
        assert again.proc is not None and again.proc.poll() is None, log
        assert "pacsgrid listening on" not in log
        assoc.release()
        _wait("the last worker to stop", lambda: _gone(busy[0]))
        _wait("the new server to listen", lambda: "pacsgrid listening on" in again.text())
        echo = dcmtk("echoscu", "-aec", "PACSGRID", "-aet", "AFTER", "127.0.0.1", again.port)
        assert echo.returncode == 0, echo.stdout
        assert again.proc.poll() is None
        assert "association from AFTER@" in again.text()
    finally:
        if assoc.is_established:
            assoc.abort()
        again.stop()
        first.kill()
        for pid in workers:  # what this test started, should a worker have outlived it
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_restore_is_refused_while_the_archive_is_served(tmp_path: Path) -> None:
    data = tmp_path / "archive"
    server = Server(data, workers=2).start()
    try:
        workers = _workers(server, 2)
        made = pacsgrid_cli("backup", "--data-dir", data)
        assert made.returncode == 0, made.stderr
        backup = Path(made.stdout.split("backup written: ")[1].split()[0])
        refused = pacsgrid_cli("restore", backup, "--force", "--data-dir", data)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line, line
        assert line.startswith("pacsgrid: error: cannot restore the index while the archive is")
        assert server.proc is not None
        assert f"pacsgrid serve pid {server.proc.pid} (workers " in line, line
        assert all(str(w) in line for w in workers), line
        assert not list(data.glob("index.sqlite.before-restore-*")), "moved aside under serve"
    finally:
        server.stop()
    restored = pacsgrid_cli("restore", backup, "--force", "--data-dir", data)
    assert restored.returncode == 0, restored.stderr
    assert list(data.glob("index.sqlite.before-restore-*"))
