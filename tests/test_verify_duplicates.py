"""`pacsgrid verify --folder` on a folder that holds some instances in several files: each
instance is counted once, as the archive holds it once; the copies are counted apart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.synth import Spec, write
from tests.conftest import pacsgrid_cli


@pytest.mark.slow
def test_duplicate_files_count_as_one_instance(tmp_path: Path) -> None:
    tree = tmp_path / "legacy"
    files = write(Spec(studies=1, series=1, instances=3, size=16, seed="dups"), tree / "a")
    data = tmp_path / "archive"
    done = pacsgrid_cli("import", tree, "--data-dir", data)
    assert done.returncode == 0, done.stdout + done.stderr
    copies = tree / "copies"
    copies.mkdir()
    shutil.copy(files[0], copies / "again.dcm")  # the same instance, twice more
    shutil.copy(files[0], copies / "once-more.dcm")
    out = tmp_path / "report"
    verify = pacsgrid_cli("verify", "--data-dir", data, "--folder", tree, "--out", out)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "instances in the source: 3; in the archive: 3" in verify.stdout, verify.stdout
    assert "| duplicate files | 2 |" in verify.stdout, verify.stdout
    assert "PASS" in (out / "verify.md").read_text().splitlines()[0]
