"""Power cuts of the archive: `pacsgrid serve` runs on the recording filesystem while several
associations store instances; then for many cut points across the write path the archive
starts on what a disk could hold after a power cut there, and every instance acknowledged
before the cut must be found and retrieved byte for byte, with nothing half-written visible
(tests/powercut, docs/powercut.md). The long run is `python -m tests.powercut`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Server, dcmtk
from tests.powercut.history import History
from tests.powercut.model import Model, Policy
from tests.powercut.mount import Mount, fuse_available


@pytest.fixture(autouse=True)
def _fuse() -> None:
    missing = fuse_available()
    if missing:
        pytest.fail(missing)


def test_the_folders_a_new_archive_creates_survive_a_power_cut(tmp_path: Path) -> None:
    """A fresh data folder and a site folder that `serve` creates itself: their names in
    their parents must be durable (fsynced) before anything stored in them is acknowledged;
    otherwise a power cut takes the whole index or site with it."""
    from bench.synth import Spec, write

    files = write(Spec(studies=1, series=1, instances=2, size=16, seed="pc-dirs"), tmp_path / "s")
    mnt = tmp_path / "mnt"
    with Mount(tmp_path / "backing", mnt, tmp_path / "history.log"):
        server = Server(mnt / "data", workers=1, args=("--site", f"a={mnt}/sites/a"))
        server.log = tmp_path / "serve.log"
        server.start(timeout=120)
        try:
            dcmtk("storescu", "-aec", "PACSGRID", "127.0.0.1", server.port, *files, check=True)
        finally:
            server.kill()  # the power cut
    history = History.load(tmp_path / "history.log")
    cut = Model(history).cut(len(history), seed=1, policy=Policy(0.0, "drop"))
    names = set(cut.paths())
    assert {"data", "data/index.sqlite", "sites/a/.pacsgrid-site"} <= names, sorted(names)
    assert sum(n.endswith(".dcm") for n in names) == 2, sorted(names)
