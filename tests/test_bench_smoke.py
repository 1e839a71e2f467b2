"""The benchmark harness end to end on a tiny dataset: pacsgrid, Orthanc and storescp started,
loaded, queried and retrieved from by the real clients, the results file written.

Asserts correctness only (every count, every answer, every retrieved instance), never speed:
speed is measured by `make bench` and reported in bench/results/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import scratch
from bench.report import Sample, Table, percentile, render, target_status
from bench.run import rotate
from tests.conftest import REPO

pytestmark = [pytest.mark.dcmtk]


@pytest.mark.slow
def test_harness_end_to_end(tmp_path: Path) -> None:
    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        pytest.fail("Orthanc not found: install Debian's orthanc (scripts/test does)")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--plan",
            "smoke",
            "--rounds",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--results",
            str(tmp_path / "results"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (result,) = (tmp_path / "results").glob("*-smoke.json")
    samples = [Sample(**s) for s in json.loads(result.read_text())["samples"]]
    assert all(s.ok for s in samples), [s.note for s in samples if not s.ok]

    by = {(s.phase, s.scenario, s.server): s for s in samples}
    for scenario in ("64x64, 1 assoc", "64x64, 4 assoc", "128x128, 1 assoc", "128x128, 4 assoc"):
        for server in ("pacsgrid", "Orthanc", "storescp"):
            m = by[("ingest", scenario, server)].metrics
            assert m["stored"] == m["expected"] > 0, (scenario, server)
            assert m["cpu_s_per_1000"] >= 0 and m["peak_rss_mb"] > 0
    for kind in ("PatientID", "PatientName wildcard", "StudyDate range"):
        for server in ("pacsgrid", "Orthanc"):
            m = by[("find", kind, server)].metrics
            assert m["wrong_answers"] == 0 and m["queries"] > 0, (kind, server)
            assert m["responses_per_query"] >= 1
    for op in ("C-MOVE", "C-GET"):
        for server in ("pacsgrid", "Orthanc"):
            m = by[("retrieve", op, server)].metrics
            assert m["received"] == m["expected"] == 6, (op, server)
    for scenario in ("64x64 cp -r", "64x64 write+fsync", "128x128 cp -r", "128x128 write+fsync"):
        assert by[("disk", scenario, "disk")].metrics["instances_per_s"] > 0

    assert not (tmp_path / "work" / "run-smoke" / "trash").exists()  # emptied at the end
    assert not (tmp_path / "work" / "run-smoke" / "ingest-pacsgrid").exists()

    md = result.with_suffix(".md").read_text()
    assert "Deleted at once for lack of disk space: none." in md
    assert "| pacsgrid/Orthanc | pacsgrid/storescp |" in md
    assert "## Goals (pacsgrid vs Orthanc" in md
    assert "All correctness checks passed" in md


def test_rotation_puts_every_server_in_every_position() -> None:
    servers = ["pacsgrid", "orthanc", "storescp"]
    orders = [rotate(servers, r) for r in range(3)]
    for position in range(3):
        assert {o[position] for o in orders} == set(servers)
    assert all(sorted(o) == sorted(servers) for o in orders)


def test_report_medians_spread_ratios_and_targets() -> None:
    samples = [
        Sample("ingest", "64x64, 4 assoc", "pacsgrid", r, {"instances_per_s": v})
        for r, v in enumerate((300.0, 360.0, 330.0), 1)
    ] + [
        Sample("ingest", "64x64, 4 assoc", "Orthanc", r, {"instances_per_s": v})
        for r, v in enumerate((250.0, 300.0, 275.0), 1)
    ]
    t = Table(samples)
    assert t.cell("ingest", "64x64, 4 assoc", "pacsgrid", "instances_per_s", 0) == "330 (300-360)"
    assert t.ratio("ingest", "64x64, 4 assoc", "instances_per_s", "Orthanc") == "1.20x"
    status = {label: s for label, s, _ in target_status(t)}
    assert status["ingest 4 assoc, 64x64, instances/s >= 1.2x Orthanc"] == "met"
    assert status["C-GET instances/s >= 1.0x Orthanc"] == "not measured"
    md = render(samples, {"date": "d", "plan": "p", "rounds": 3, "command": "c"})
    assert "| 64x64, 4 assoc | instances/s | 330 (300-360) | 275 (250-300) | 1.20x |" in md


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile(list(map(float, range(101))), 0.95) == pytest.approx(95.0)
    assert percentile([7.0], 0.95) == 7.0


def test_trash_renames_during_the_run_and_deletes_when_space_is_short(tmp_path: Path) -> None:
    """A measurement's files are renamed away (no inode freed) while the run lasts; with too
    little free disk they are deleted at once, and counted."""
    data = tmp_path / "server"
    (data / "study").mkdir(parents=True)
    (data / "study" / "a.dcm").write_bytes(b"x")
    inode = (data / "study" / "a.dcm").stat().st_ino
    trash = scratch.Trash(tmp_path / "trash")
    scratch.use(trash)
    try:
        scratch.discard(data)
        scratch.discard(tmp_path / "never-existed")
    finally:
        scratch.use(None)
    assert not data.exists()
    (kept,) = trash.root.iterdir()
    assert (kept / "study" / "a.dcm").stat().st_ino == inode
    assert trash.deleted_at_once == 0
    trash.empty()
    assert not trash.root.exists()

    short = scratch.Trash(tmp_path / "trash2", min_free=1 << 62)
    data.mkdir()
    short.discard(data)
    assert not data.exists() and not any(short.root.iterdir())
    assert short.deleted_at_once == 1

    data.mkdir()
    scratch.discard(data)  # outside a run: deleted
    assert not data.exists()


@pytest.mark.slow
def test_ab_measures_every_build_alternately_and_checks_counts(tmp_path: Path) -> None:
    """bench.ab: two builds (here both this tree), each round in a rotated order, every
    stored count checked, the table written; a folder without pacsgrid is refused up front."""
    src = REPO / "src"
    base = [sys.executable, "-m", "bench.ab", "--plan", "smoke", "--no-orthanc"]
    base += ["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    proc = subprocess.run(
        [*base, "--rounds", "2", "--build", f"a={src}", "--build", f"b={src}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    order = [line.split()[2] for line in proc.stderr.splitlines() if line.startswith("round ")]
    assert order == ["b", "a", "a", "b"]
    (md,) = (tmp_path / "results").glob("*-ab.md")
    text = md.read_text()
    assert "| a | " in text and "| b | " in text and "| 1.00x |" in text
    assert "Failed checks: none (every stored count exact)." in text
    assert not (tmp_path / "work" / "run-ab" / "trash").exists()

    refused = subprocess.run(
        [*base, "--rounds", "1", "--build", f"x={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1
    assert "does not hold the pacsgrid package" in refused.stderr
