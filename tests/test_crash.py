"""Crash safety: SIGKILL the server at random moments while storescu sends.

After every kill and restart, each instance that got a success status is indexed and reads back
with the right SHA-256, and every object visible on the site is complete and indexed (the
ingest journal indexes what was written but not yet committed when the process died).
"""

from __future__ import annotations

import random
import re
import subprocess
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from bench.synth import Spec, write
from tests.conftest import DCMTK_ENV, Server, require_tool

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
            record = archive.index.instance(uid)
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
            assert archive.index.has_instance(uid), f"orphan object {path}"
        assert archive.index.stats().instances == len(visible)
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
        sender = subprocess.Popen(
            [
                require_tool("storescu"),
                "-v",
                "-nh",
                "-aec",
                "PACSGRID",
                "127.0.0.1",
                str(port),
                *map(str, order),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
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
