"""The benchmark harness end to end on a tiny dataset: pacsgrid, Orthanc and storescp started,
loaded, queried and retrieved from by the real clients, a wiped site repaired and a tree
migrated by the real `pacsgrid` commands, the results file written.

Asserts correctness only (every count, every answer, every retrieved instance, every repaired
copy), never speed: speed is measured by `make bench` and reported in bench/results/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import scratch
from bench.datasets import PLANS, SMOKE, prepare
from bench.durability import WipedSite
from bench.goals import goal_status, previous_results
from bench.report import render
from bench.run import Runner, parse, rotate
from bench.samples import CP_SYNC, Sample, Table, percentile
from bench.servers import PacsgridPg
from tests.conftest import REPO

pytestmark = [pytest.mark.dcmtk]


@pytest.mark.slow
def test_harness_end_to_end(tmp_path: Path) -> None:
    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        pytest.fail("Orthanc not found: install Debian's orthanc (scripts/test does)")
    options = ["--plan", "smoke", "--rounds", "1", "--results", str(tmp_path / "results")]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", *options, "--work", str(tmp_path / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (result,) = (tmp_path / "results").glob("*-smoke.json")
    samples = [Sample(**s) for s in json.loads(result.read_text())["samples"]]
    assert all(s.ok for s in samples), [s.note for s in samples if not s.ok]
    # Every measurement the progress counts was made, and no other.
    counted = Runner(parse([*options, "--work", str(tmp_path / "count")]), SMOKE, {}).total()
    assert counted == len([s for s in samples if s.phase != "load"])

    by = {(s.phase, s.scenario, s.server): s for s in samples}
    for scenario in ("64x64, 1 assoc", "64x64, 4 assoc", "128x128, 1 assoc", "128x128, 4 assoc"):
        for server in ("pacsgrid", "pacsgrid-pg", "Orthanc", "storescp"):
            m = by[("ingest", scenario, server)].metrics
            assert m["stored"] == m["expected"] > 0, (scenario, server)
            assert m["cpu_s_per_1000"] >= 0 and m["peak_rss_mb"] > 0
    for kind in ("PatientID", "PatientName wildcard", "StudyDate range"):
        for server in ("pacsgrid", "pacsgrid-pg", "Orthanc"):
            m = by[("find", kind, server)].metrics
            assert m["wrong_answers"] == 0 and m["queries"] > 0, (kind, server)
            assert m["responses_per_query"] >= 1
    for op in ("C-MOVE", "C-GET"):
        for server in ("pacsgrid", "pacsgrid-pg", "Orthanc"):
            m = by[("retrieve", op, server)].metrics
            assert m["received"] == m["expected"] == 6, (op, server)
    for scenario in ("64x64 cp -r", "64x64 write+fsync", "128x128 cp -r", "128x128 write+fsync"):
        assert by[("disk", scenario, "disk")].metrics["instances_per_s"] > 0
    for server in ("pacsgrid", "pacsgrid-pg", "Orthanc", "storescp"):
        m = by[("latency", "64x64, one at a time", server)].metrics
        assert m["timed"] == SMOKE.latency_instances and m["stored"] == m["expected"] == 21
        assert 0 < m["p50_ms"] <= m["p95_ms"] <= m["max_ms"], server
    for phase in ("repair", "migrate"):
        for who in ("pacsgrid", CP_SYNC):
            m = by[(phase, "64x64", who)].metrics
            assert m["objects"] == 16 and m["instances_per_s"] > 0, (phase, who)
    assert by[("repair", "64x64", "pacsgrid")].metrics["copied"] == 16
    assert by[("migrate", "64x64", "pacsgrid")].metrics["stored"] == 16

    run = tmp_path / "work" / "run-smoke"
    assert not (run / "trash").exists()  # emptied at the end
    assert not (run / "ingest-pacsgrid").exists()
    assert not (run / "latency-pacsgrid").exists()
    assert not (run / "migrated").exists()
    assert (run / "repair-small" / "complete").is_file()  # kept for --resume

    md = result.with_suffix(".md").read_text()
    assert "Deleted at once for lack of disk space: none." in md
    assert "| pacsgrid/Orthanc | pacsgrid/storescp | pacsgrid-pg/pacsgrid |" in md
    # pacsgrid-pg: the index on its own PostgreSQL server, whose CPU is counted apart.
    assert by[("ingest", "64x64, 4 assoc", "pacsgrid-pg")].metrics["db_cpu_s_per_1000"] > 0
    assert "PostgreSQL index: instances/s >= 0.9x the SQLite index" in md
    ingest_pg = PacsgridPg(tmp_path / "work" / "run-smoke" / "ingest-pacsgrid-pg")
    assert not ingest_pg.cluster_root.exists()  # removed with the measurement
    for heading in ("At a glance", "Goals", "Latency of one C-STORE on an idle archive"):
        assert f"## {heading}" in md
    assert "## Repair of a wiped folder site, against cp -r + sync" in md
    assert "| 64x64 | every copy present and correct | 1/1 rounds | no check |" in md
    assert "| 64x64 | every file in the archive | 1/1 rounds | no check |" in md
    assert "| C-STORE latency, idle, p50 | " in md
    assert "none has it yet, this run sets the baseline" in md
    assert "target" not in md.lower() and "issue" not in md.lower()
    assert "All correctness checks passed" in md

    # --resume measures nothing again: every measurement comes from the journal, the
    # repair archive included (not loaded again).
    again = subprocess.run(
        [sys.executable, "-m", "bench.run", *options, "--work", str(tmp_path / "work"), "--resume"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert "round 1" not in again.stderr and "loaded the" not in again.stderr
    assert "reusing the loaded pacsgrid-pg archive" in again.stderr  # its PostgreSQL too
    assert "none has it yet" not in result.with_suffix(".md").read_text()  # the first run's
    # The loaded archive's PostgreSQL is kept for --resume (outside tmp_path: the postgres
    # user cannot enter it); the test removes it.
    kept = PacsgridPg(tmp_path / "work" / "run-smoke" / "qr-pacsgrid-pg").cluster_root
    assert (kept / "data").is_dir()
    shutil.rmtree(kept)


def test_rotation_puts_every_server_in_every_position() -> None:
    servers = ["pacsgrid", "orthanc", "storescp"]
    orders = [rotate(servers, r) for r in range(3)]
    for position in range(3):
        assert {o[position] for o in orders} == set(servers)
    assert all(sorted(o) == sorted(servers) for o in orders)


def test_report_medians_spread_ratios_and_goals() -> None:
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
    status = {o.goal.label: o.status for o in goal_status(t)}
    assert status["ingest 4 assoc, 64x64, instances/s >= 1.2x Orthanc"] == "met"
    assert status["ingest 64x64 4 assoc, instances/s >= 1.5x Orthanc"] == "NOT met"
    assert status["C-GET instances/s >= 1.0x Orthanc"] == "not measured"
    md = render(samples, {"date": "d", "plan": "p", "rounds": 3, "command": "c"})
    assert "| 64x64, 4 assoc | instances/s | 330 (300-360) | 275 (250-300) | 1.20x |" in md
    assert "| ingest 64x64, 4 assoc | 330 instances/s | Orthanc: 275 | 1.20x | - | - |" in md
    assert "target" not in md.lower()


def test_goals_against_cp_sync_the_previous_results_file_and_the_ceiling(tmp_path: Path) -> None:
    """Repair and migrate are judged against cp -r + sync of the same run, the latency against
    the newest earlier results file of the same plan that has it; the headroom is the
    ceiling (storescp, or cp -r without sync) over pacsgrid."""

    def latency(server: str, p50: float, p95: float) -> Sample:
        return Sample("latency", "64x64, one at a time", server, 1, {"p50_ms": p50, "p95_ms": p95})

    def results(name: str, date: str, plan: str, p50: float) -> None:
        samples = [json.loads(latency("pacsgrid", p50, 2 * p50).to_json())]
        (tmp_path / name).write_text(
            json.dumps({"meta": {"date": date, "plan": plan}, "samples": samples})
        )

    results("2026-01-01.json", "2026-01-01", "full", 1.0)
    results("2026-02-01.json", "2026-02-01", "full", 2.0)  # the newest full run
    results("2026-03-01-smoke.json", "2026-03-01", "smoke", 0.1)  # another plan
    (tmp_path / "2026-04-01.json").write_text(  # newer, but without the latency phase
        json.dumps({"meta": {"date": "2026-04-01", "plan": "full"}, "samples": []})
    )
    (tmp_path / "notes.json").write_text("[1, 2]")
    previous = previous_results(tmp_path, "full")
    assert previous is not None and previous.name == "2026-02-01.json (2026-02-01)"
    assert previous_results(tmp_path / "nowhere", "full") is None

    t = Table(
        [
            latency("pacsgrid", 1.9, 4.4),
            latency("storescp", 0.5, 1.1),
            Sample("repair", "64x64", "pacsgrid", 1, {"instances_per_s": 900.0}),
            Sample("repair", "64x64", CP_SYNC, 1, {"instances_per_s": 1000.0}),
            Sample("migrate", "64x64", "pacsgrid", 1, {"instances_per_s": 600.0}),
            Sample("migrate", "64x64", CP_SYNC, 1, {"instances_per_s": 1000.0}),
            Sample("disk", "64x64 cp -r", "disk", 1, {"instances_per_s": 3600.0}),
        ]
    )
    by = {o.goal.label: o for o in goal_status(t, previous)}
    repair = by["repair of a wiped folder site, 64x64, objects/s >= 0.8x cp -r + sync"]
    assert (repair.status, repair.ratio, repair.headroom) == ("met", 0.9, 4.0)
    migrate = by["migrate folder, 64x64, files/s >= 0.7x cp -r + sync"]
    assert migrate.status == "NOT met" and migrate.ratio == 0.6 and migrate.headroom == 6.0
    p50 = by["C-STORE latency on an idle archive, p50: no worse than the previous results file"]
    assert p50.status == "met" and p50.ratio == pytest.approx(0.95)
    assert p50.headroom == pytest.approx(3.8)  # 1.9 ms against storescp's 0.5
    p95 = by["C-STORE latency on an idle archive, p95: no worse than the previous results file"]
    assert p95.status == "NOT met" and p95.ratio == pytest.approx(1.1)
    assert by["repair of a wiped folder site, 512x512, objects/s >= 0.8x cp -r + sync"].status == (
        "not measured"
    )
    first = {o.goal.label: o.status for o in goal_status(t, None)}
    assert first[p50.goal.label] == "not measured"  # no earlier file: this run is the baseline


def test_phases_are_selectable_and_counted(tmp_path: Path) -> None:
    args = parse(
        ["--plan", "smoke", "--rounds", "2", "--phases", "repair,latency", "--work", str(tmp_path)]
    )
    assert args.phases == ["repair", "latency"]
    # repair: pacsgrid and cp -r + sync per copy dataset; latency: one per server.
    assert Runner(args, SMOKE, {}).total() == 2 * (2 * len(SMOKE.copy_sets) + 4)
    only_dicom = parse(
        ["--plan", "smoke", "--phases", "migrate,latency", "--servers", "orthanc"]
        + ["--work", str(tmp_path / "orthanc-only")]
    )
    # 3 rounds of latency with Orthanc alone; migrate is pacsgrid's: not run.
    assert Runner(only_dicom, SMOKE, {}).total() == 3
    with pytest.raises(SystemExit):
        parse(["--phases", "ingest,replication"])


@pytest.mark.slow
def test_repair_check_finds_a_missing_or_changed_copy_and_a_broken_archive_is_reloaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The repair phase's check is not a formality: a copy on b that differs from a's by one
    byte, or is gone, fails it; after a repair that did not finish, the archive is loaded
    afresh instead of being trusted."""
    ds = prepare(PLANS["smoke"], tmp_path / "work")["small"]
    site = WipedSite(ds, tmp_path, timeout=120)
    s = site.repair_sample(1)
    assert s.ok, s.note
    assert s.metrics["objects"] == len(ds.files) == 16 and s.metrics["copied"] == 16
    assert "loaded the 64x64 repair archive" in capsys.readouterr().err

    victim = sorted(site.sites.b.rglob("*.dcm"))[3]
    original = victim.read_bytes()
    victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert any("differ from a" in p for p in site.sites.check(16, 120))
    victim.unlink()
    assert any("1 object(s) missing on b" in p for p in site.sites.check(16, 120))

    site.complete.unlink()  # as a repair interrupted before its check leaves it
    again = site.repair_sample(2)
    assert again.ok, again.note
    assert "loaded the 64x64 repair archive" in capsys.readouterr().err
    assert victim.read_bytes() == original


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


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["latency", "repair", "migrate"])
def test_ab_takes_the_durability_scenarios(tmp_path: Path, scenario: str) -> None:
    """bench.ab measures a build on the latency, repair and migrate scenarios as bench.run
    does, against cp -r + sync for repair and migrate, every check passed."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--plan", "smoke", "--no-orthanc", "--rounds", "1"]
        + ["--scenario", scenario, "--build", f"a={REPO / 'src'}"]
        + ["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (md,) = (tmp_path / "results").glob("*-ab.md")
    text = md.read_text()
    unit = {"latency": "p50 ms", "repair": "objects/s", "migrate": "files/s"}[scenario]
    assert f"| contender | {unit}, median (rounds) |" in text
    assert "| a | " in text
    assert (f"| {CP_SYNC} | " in text) == (scenario != "latency")
    assert "Failed checks: none" in text
    assert not (tmp_path / "work" / "run-ab" / "a").exists()  # the archives went too


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_scale_loads_an_index_and_every_answer_is_right(engine: str) -> None:
    """bench.scale on a small index: the bulk load gives what filing would (every C-FIND
    answer is checked against the generated rows: no wrong answer), every page answers,
    `status` counts the instances, the ingests store every file; the work folder is
    removed afterwards."""
    # Not tmp_path: the postgres user must be able to enter the folder of its cluster.
    work = Path(tempfile.mkdtemp(prefix="pacsgrid-scale-test-"))
    work.chmod(0o755)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.scale", "--instances", "4000", "--engine", engine]
            + ["--queries", "10", "--requests", "2", "--ingest-rounds", "1"]
            + ["--work", str(work)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        out = proc.stdout
        assert f"{engine}: 4,000 instances" in out
        assert "| `pacsgrid status` (4,000 instances) |" in out
        finds = [line for line in out.splitlines() if line.startswith("| C-FIND ")]
        assert len(finds) == 3
        for line in finds:
            assert line.rstrip().endswith("| 0 |"), line  # no wrong answer
        assert out.count("| dashboard: ") == 7 and out.count("| QIDO-RS: ") == 4
        assert "| ingest 64x64, 4 associations" in out
        assert not (work / engine).exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)
