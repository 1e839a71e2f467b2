"""What a run is judged by: the goals, and the table at the top of the results file.

A goal compares pacsgrid's median with a reference: Orthanc, or `cp -r` + `sync` of the same
files (repair, migrate), both measured in the same run; or, for the latency of one C-STORE on
an idle archive, pacsgrid's own figure in the previous results file (the latency is about not
getting worse, and the previous build is not in this run: `make ab` compares builds directly).

Beside each stands the headroom: how many times better the ceiling is than pacsgrid. The
ceiling flushes nothing: DCMTK storescp for DICOM (files written, no fsync, no index), plain
`cp -r` without `sync` (the disk phase, same dataset) for repair and migrate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.samples import CP_SYNC, Sample, Table, fmt

ORTHANC = "Orthanc"
PACSGRID_PG = "pacsgrid-pg"
PREVIOUS = "the previous results file"
LATENCY = "64x64, one at a time"


@dataclass(frozen=True)
class Goal:
    label: str
    phase: str
    scenario: str
    metric: str
    want: float  # subject / reference must be >= want (higher is better) or <= want
    higher: bool = True
    reference: str = ORTHANC  # Orthanc | cp -r + sync | PREVIOUS | pacsgrid
    subject: str = "pacsgrid"  # or pacsgrid-pg: pacsgrid with its index on PostgreSQL


GOALS = (
    # What the write path's group durability (one flush for many objects) must show.
    Goal("ingest 64x64 4 assoc, instances/s >= 1.5x Orthanc", "ingest", "64x64, 4 assoc",
         "instances_per_s", 1.5),
    Goal("ingest 64x64 1 assoc, instances/s >= 1.2x Orthanc", "ingest", "64x64, 1 assoc",
         "instances_per_s", 1.2),
    Goal("ingest 512x512 4 assoc, MB/s >= 1.5x Orthanc", "ingest", "512x512, 4 assoc",
         "mb_per_s", 1.5),
    Goal("repair of a wiped folder site, 64x64, objects/s >= 0.8x cp -r + sync", "repair",
         "64x64", "instances_per_s", 0.8, reference=CP_SYNC),
    Goal("repair of a wiped folder site, 512x512, objects/s >= 0.8x cp -r + sync", "repair",
         "512x512", "instances_per_s", 0.8, reference=CP_SYNC),
    Goal("migrate folder, 64x64, files/s >= 0.7x cp -r + sync", "migrate", "64x64",
         "instances_per_s", 0.7, reference=CP_SYNC),
    Goal("migrate folder, 512x512, files/s >= 0.7x cp -r + sync", "migrate", "512x512",
         "instances_per_s", 0.7, reference=CP_SYNC),
    Goal("C-STORE latency on an idle archive, p50: no worse than the previous results file",
         "latency", LATENCY, "p50_ms", 1.0, higher=False, reference=PREVIOUS),
    Goal("C-STORE latency on an idle archive, p95: no worse than the previous results file",
         "latency", LATENCY, "p95_ms", 1.0, higher=False, reference=PREVIOUS),
    # The index on PostgreSQL (fsync on) against the same pacsgrid on SQLite.
    Goal("ingest 64x64 4 assoc, PostgreSQL index: instances/s >= 0.9x the SQLite index",
         "ingest", "64x64, 4 assoc", "instances_per_s", 0.9, reference="pacsgrid",
         subject=PACSGRID_PG),
    # Earlier goals, kept.
    Goal("ingest 4 assoc, 64x64, instances/s >= 1.2x Orthanc", "ingest", "64x64, 4 assoc",
         "instances_per_s", 1.2),
    Goal("ingest 4 assoc, 512x512, MB/s >= 1.2x Orthanc", "ingest", "512x512, 4 assoc",
         "mb_per_s", 1.2),
    Goal("ingest 1 assoc, 64x64, instances/s >= 1.0x Orthanc", "ingest", "64x64, 1 assoc",
         "instances_per_s", 1.0),
    Goal("ingest 1 assoc, 512x512, MB/s >= 1.0x Orthanc", "ingest", "512x512, 1 assoc",
         "mb_per_s", 1.0),
    Goal("C-MOVE instances/s >= 1.0x Orthanc", "retrieve", "C-MOVE", "instances_per_s", 1.0),
    Goal("C-GET instances/s >= 1.0x Orthanc", "retrieve", "C-GET", "instances_per_s", 1.0),
    Goal("C-FIND PatientID p95 <= Orthanc", "find", "PatientID", "p95_ms", 1.0, higher=False),
    Goal("C-FIND PatientName wildcard p95 <= Orthanc", "find", "PatientName wildcard", "p95_ms",
         1.0, higher=False),
    Goal("C-FIND StudyDate range p95 <= Orthanc", "find", "StudyDate range", "p95_ms", 1.0,
         higher=False),
)  # fmt: skip


@dataclass(frozen=True)
class Previous:
    """pacsgrid's figures in an earlier results file (the reference of the latency goals)."""

    name: str  # file name and date, for the report
    table: Table


def previous_results(folder: Path, plan: str) -> Previous | None:
    """The newest results file of `plan` in `folder` with a latency measurement of pacsgrid.
    Called before this run writes its own file, so a file of the same name still holds the
    day's previous run."""
    best: tuple[str, str, list[Sample]] | None = None
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            data = json.loads(path.read_text())
            meta = data["meta"]
            samples = [Sample(**s) for s in data["samples"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a results file of bench.run
        if meta.get("plan") != plan:
            continue
        if not any(s.phase == "latency" and s.server == "pacsgrid" and s.ok for s in samples):
            continue
        key = (str(meta.get("date", "")), path.name, samples)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        return None
    return Previous(f"{best[1]} ({best[0]})", Table(s for s in best[2] if s.ok))


@dataclass(frozen=True)
class Outcome:
    goal: Goal
    status: str  # met | NOT met | not measured
    ratio: float | None  # pacsgrid / reference
    headroom: float | None  # the ceiling's advantage over pacsgrid (x)


def reference_value(t: Table, goal: Goal, previous: Previous | None) -> float | None:
    if goal.reference == PREVIOUS:
        if previous is None:
            return None
        return previous.table.median(goal.phase, goal.scenario, "pacsgrid", goal.metric)
    return t.median(goal.phase, goal.scenario, goal.reference, goal.metric)


def ceiling(t: Table, phase: str, scenario: str, metric: str) -> tuple[str, float] | None:
    """(name, median) of what flushes nothing, measured in this run, or None."""
    if phase in ("ingest", "latency"):
        v = t.median(phase, scenario, "storescp", metric)
        return None if v is None else ("storescp", v)
    if phase in ("repair", "migrate"):
        v = t.median("disk", f"{scenario} cp -r", "disk", metric)
        return None if v is None else ("cp -r", v)
    return None


def headroom(
    t: Table, phase: str, scenario: str, metric: str, higher: bool, subject: str = "pacsgrid"
) -> float | None:
    mine = t.median(phase, scenario, subject, metric)
    top = ceiling(t, phase, scenario, metric)
    if mine is None or top is None or mine == 0 or top[1] == 0:
        return None
    return top[1] / mine if higher else mine / top[1]


def goal_status(t: Table, previous: Previous | None = None) -> list[Outcome]:
    out = []
    for g in GOALS:
        mine = t.median(g.phase, g.scenario, g.subject, g.metric)
        ref = reference_value(t, g, previous)
        room = headroom(t, g.phase, g.scenario, g.metric, g.higher, g.subject)
        if mine is None or ref is None or ref == 0:
            out.append(Outcome(g, "not measured", None, room))
            continue
        r = mine / ref
        met = r >= g.want if g.higher else r <= g.want
        out.append(Outcome(g, "met" if met else "NOT met", r, room))
    return out


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def goals_section(t: Table, previous: Previous | None) -> list[str]:
    out = [
        "## Goals (medians of this run)",
        "",
        "Ratio: pacsgrid's median / the reference's (Orthanc or cp -r + sync in this run; "
        "pacsgrid-pg, pacsgrid with its index on PostgreSQL, / pacsgrid on SQLite; "
        "for the latency, pacsgrid in the previous results file: "
        + (previous.name if previous else "none has it yet, this run sets the baseline")
        + "). Headroom: how many times better the ceiling, which flushes nothing, is "
        "(storescp; cp -r without sync for repair and migrate).",
        "",
        "| goal | ratio | status | headroom |",
        "|---|---|---|---|",
    ]
    for o in goal_status(t, previous):
        out.append(f"| {o.goal.label} | {_x(o.ratio)} | {o.status} | {_x(o.headroom)} |")
    return [*out, ""]


# ---------------------------------------------------------------- at a glance

Row = tuple[str, str, str, str, str, int, bool]  # label, phase, scenario, metric, unit, digits,
# higher is better


def _rows(t: Table) -> list[Row]:
    rows: list[Row] = [
        ("ingest 64x64, 1 assoc", "ingest", "64x64, 1 assoc", "instances_per_s", "instances/s",
         0, True),
        ("ingest 64x64, 4 assoc", "ingest", "64x64, 4 assoc", "instances_per_s", "instances/s",
         0, True),
        ("ingest 512x512, 1 assoc", "ingest", "512x512, 1 assoc", "mb_per_s", "MB/s", 1, True),
        ("ingest 512x512, 4 assoc", "ingest", "512x512, 4 assoc", "mb_per_s", "MB/s", 1, True),
    ]  # fmt: skip
    for sc in t.scenarios("latency"):
        for q in ("p50", "p95"):
            rows.append((f"C-STORE latency, idle, {q}", "latency", sc, f"{q}_ms", "ms", 2, False))
    for sc in t.scenarios("repair"):
        label = f"repair of a wiped folder site, {sc}"
        rows.append((label, "repair", sc, "instances_per_s", "objects/s", 0, True))
    for sc in t.scenarios("migrate"):
        rows.append((f"migrate folder, {sc}", "migrate", sc, "instances_per_s", "files/s", 0, True))
    for sc in t.scenarios("find"):
        rows.append((f"C-FIND {sc}, p95", "find", sc, "p95_ms", "ms", 2, False))
    for sc in t.scenarios("retrieve"):
        rows.append((sc, "retrieve", sc, "instances_per_s", "instances/s", 0, True))
    return [r for r in rows if t.median(r[1], r[2], "pacsgrid", r[3]) is not None]


def glance_section(t: Table) -> list[str]:
    """One row per headline measurement: pacsgrid, its reference in this run, the ceiling."""
    rows = _rows(t)
    if not rows:
        return []
    out = [
        "## At a glance",
        "",
        "Medians of this run. Reference: Orthanc, or cp -r + sync of the same files for repair "
        "and migrate. Ceiling: what flushes nothing (storescp; cp -r without sync, disk phase). "
        "Headroom: how many times better the ceiling is than pacsgrid. Latencies (ms): lower "
        "is better, so a ratio above 1.00x means pacsgrid is slower.",
        "",
        "| measurement | pacsgrid | reference | pacsgrid / reference | ceiling | headroom |",
        "|---|---|---|---|---|---|",
    ]
    for label, phase, sc, metric, unit, digits, higher in rows:
        mine = t.median(phase, sc, "pacsgrid", metric)
        assert mine is not None
        ref_name = CP_SYNC if phase in ("repair", "migrate") else ORTHANC
        ref = t.median(phase, sc, ref_name, metric)
        top = ceiling(t, phase, sc, metric)
        cells = [
            f"{fmt(mine, digits)} {unit}",
            "-" if ref is None else f"{ref_name}: {fmt(ref, digits)}",
            "-" if ref is None or ref == 0 else f"{mine / ref:.2f}x",
            "-" if top is None else f"{top[0]}: {fmt(top[1], digits)}",
            _x(headroom(t, phase, sc, metric, higher)),
        ]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*out, ""]
