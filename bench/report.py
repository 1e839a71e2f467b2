"""Samples of a run -> the results file: the headline table, the goals, per phase medians,
spread (min-max over rounds) and ratios, the machine and the versions.

Every number in the per-phase tables is the median over rounds of one measurement, with the
lowest and highest round in parentheses. Ratios divide pacsgrid's median by the other's.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.goals import Previous, glance_section, goals_section
from bench.procs import dcmtk_tool, tool_version
from bench.samples import CP_SYNC, SERVERS, Sample, Table

INGEST_METRICS: tuple[tuple[str, str, int], ...] = (
    ("instances/s", "instances_per_s", 0),
    ("MB/s", "mb_per_s", 1),
    ("CPU s per 1,000 instances", "cpu_s_per_1000", 2),
    ("index server CPU s per 1,000 instances", "db_cpu_s_per_1000", 2),
    ("peak RSS (MB)", "peak_rss_mb", 0),
)


def render(samples: list[Sample], meta: dict[str, object], previous: Previous | None = None) -> str:
    """The results file. `previous`: the earlier results file the latency goals compare
    with (bench.goals.previous_results)."""
    t = Table(samples)
    out: list[str] = [f"# pacsgrid benchmark: {meta['date']}", ""]
    out += _summary(meta)
    out += glance_section(t)
    out += goals_section(t, previous)
    if t.scenarios("ingest"):
        out += _ingest(t)
    if t.scenarios("latency"):
        out += _latency(t)
    if t.scenarios("repair"):
        out += _repair(t)
    if t.scenarios("migrate"):
        out += _migrate(t)
    if t.scenarios("find"):
        out += _find(t)
    if t.scenarios("retrieve"):
        out += _retrieve(t)
    if t.scenarios("disk"):
        out += _disk(t)
    if t.scenarios("load"):
        out += _load(t)
    out += _failures(t)
    out += _machine(meta)
    return "\n".join(out) + "\n"


def _summary(meta: dict[str, object]) -> list[str]:
    return [
        f"Plan `{meta['plan']}`, {meta['rounds']} round(s); every server measured in the same "
        "run, alternating (each round rotates the order). Cells: median over rounds "
        "(lowest-highest round). Ratios: pacsgrid's median / the other's median.",
        "",
        f"Command: `{meta['command']}` (what `make bench` / `scripts/bench` run); private "
        f"network namespace: {'yes' if meta.get('network namespace') else 'no'}.",
        "",
        "Every ingest starts a fresh, empty server and first stores 8 warm-up instances over 4 "
        "associations (not timed, counted in the stored-count check; for pacsgrid repeated "
        "until every worker process has accepted an association), so that the timed part is "
        "the steady state rather than each worker's first association.",
        "",
        "Nothing is deleted while the run measures: each measurement's files go to a trash "
        "folder that is emptied at the end (bench/scratch.py: on ext4 without a journal, "
        "creating files right after thousands were deleted costs every server up to a quarter "
        "more CPU). "
        + (
            f"Deleted at once for lack of disk space: {meta['scratch deleted during the run']} "
            "folder(s)."
            if meta.get("scratch deleted during the run")
            else "Deleted at once for lack of disk space: none."
        ),
        "",
        f"Load average before / after the run: {meta.get('loadavg_before')} / "
        f"{meta.get('loadavg_after')} (on a 2-core machine anything above ~0.5 before the run "
        "means other work shared the CPU and the numbers are noisy).",
        "",
    ]


Metric = tuple[str, str, int]  # label, metric key, decimals
MINE = ("pacsgrid", "pacsgrid-pg")  # the index on SQLite and on PostgreSQL
ExtraRow = Callable[[str, list[str]], tuple[str, list[str]]]  # scenario, servers -> row


def _servers(t: Table, phase: str, columns: tuple[str, ...] = SERVERS) -> list[str]:
    return [s for s in columns if any(k[2] == s and k[0] == phase for k in t.values)]


def _metric_table(
    t: Table,
    phase: str,
    intro: list[str],
    first: str,
    metrics: tuple[Metric, ...],
    extra: ExtraRow | None = None,
    columns: tuple[str, ...] = SERVERS,
) -> list[str]:
    """One row per (scenario, metric), one column per server, then pacsgrid's ratios (and
    that of pacsgrid-pg, its index on PostgreSQL, to pacsgrid on SQLite)."""
    servers = _servers(t, phase, columns)
    ratios = [("pacsgrid", o) for o in servers if o not in MINE and "pacsgrid" in servers]
    if set(MINE) <= set(servers):
        ratios.append(MINE[::-1])
    out = [*intro, ""]
    out.append(
        f"| {first} | metric | "
        + " | ".join(servers)
        + "".join(f" | {a}/{b}" for a, b in ratios)
        + " |"
    )
    out.append("|" + "---|" * (2 + len(servers) + len(ratios)))
    for sc in t.scenarios(phase):
        for label, metric, digits in metrics:
            cells = [t.cell(phase, sc, s, metric, digits) for s in servers]
            cells += [t.ratio(phase, sc, metric, b, mine=a) for a, b in ratios]
            out.append(f"| {sc} | {label} | " + " | ".join(cells) + " |")
        if extra is not None:
            label, cells = extra(sc, servers)
            out.append(f"| {sc} | {label} | " + " | ".join(cells + [""] * len(ratios)) + " |")
    return [*out, ""]


def _ingest(t: Table) -> list[str]:
    intro = [
        "## C-STORE ingest (DCMTK storescu, TCP_NODELAY=1)",
        "",
        "N associations = N storescu processes on disjoint quarters of the files. instances/s "
        "and MB/s (file bytes) over the wall time of all storescu processes; CPU = user+system "
        "seconds of the server's whole process tree (children included) during the ingest; "
        "peak RSS = highest sum over the tree. Each measurement starts a fresh, empty server. "
        "pacsgrid-pg is the same pacsgrid with its index on a PostgreSQL server of its own "
        "on the same machine (fsync on, every index commit flushed: see docs/postgresql.md); "
        "its CPU column counts pacsgrid only, the next row PostgreSQL's server. "
        "pacsgrid fsyncs every object and commits its index before answering; Orthanc runs "
        'with its defaults ("SyncStorageArea": true); storescp writes files, no fsync, no index.',
    ]
    return _metric_table(t, "ingest", intro, "scenario", INGEST_METRICS, _counts("ingest", t))


def _counts(phase: str, t: Table) -> ExtraRow:
    """The row that says in how many rounds the server held exactly what was sent."""

    def row(sc: str, servers: list[str]) -> tuple[str, list[str]]:
        cells = []
        for s in servers:
            stored = t.get(phase, sc, s, "stored")
            want = t.get(phase, sc, s, "expected")
            good = sum(1 for a, b in zip(stored, want, strict=True) if a == b)
            cells.append(f"{good}/{len(stored)} rounds exact" if stored else "-")
        return "stored count = sent", cells

    return row


def _latency(t: Table) -> list[str]:
    intro = [
        "## Latency of one C-STORE on an idle archive",
        "",
        "ONE association (pacsgrid.dicom.scu as the client, the same for every server) to a "
        "fresh, empty server after the ingest's warm-up: each instance is sent when the "
        "previous one's response has arrived and a pause has passed (so the server is idle), "
        "and timed from request to response; the first 5 are not timed (200 are in the full "
        "plan). p50/p95/max per round, then the median over rounds. What one modality sending "
        "now and then waits for each image: a write path that waits to flush many objects at "
        "once must not make it longer.",
    ]
    metrics = (
        ("p50 latency (ms)", "p50_ms", 2),
        ("p95 latency (ms)", "p95_ms", 2),
        ("max latency (ms)", "max_ms", 2),
    )
    return _metric_table(t, "latency", intro, "scenario", metrics, _counts("latency", t))


def _checks(phase: str, label: str, t: Table) -> ExtraRow:
    def row(sc: str, servers: list[str]) -> tuple[str, list[str]]:
        return label, [t.checks(phase, sc, s) if s != CP_SYNC else "no check" for s in servers]

    return row


def _against_cp(t: Table, phase: str, intro: list[str], unit: str, check: str) -> list[str]:
    metrics = (
        (unit, "instances_per_s", 0),
        ("MB/s", "mb_per_s", 1),
        ("seconds (wall, start-up included)", "seconds", 2),
        ("of which the command's own work (s)", "work_seconds", 2),
    )
    return _metric_table(
        t, phase, intro, "dataset", metrics, _checks(phase, check, t), ("pacsgrid", CP_SYNC)
    )


def _repair(t: Table) -> list[str]:
    intro = [
        "## Repair of a wiped folder site, against cp -r + sync",
        "",
        "An archive with two folder sites (copies 2, write quorum 2) is loaded once with the "
        "ingest dataset (`pacsgrid import`, not timed). Each round, every object of site b is "
        "removed (its sentinel kept: the volume is ours, its data are lost) and `pacsgrid "
        "repair` rebuilds it: wall time from start until it exits (start-up and the scan of "
        "both sites included; the second row below is the time the command reports for its "
        "copying). Then every copy is checked: the index must record every object as good on "
        "both sites, and every file on b must equal a's byte for byte. In the same round, in "
        "an order that alternates, `cp -r` copies site a's object folders to a fresh folder "
        "and `sync` puts them on disk: the same files made as durable, with no checks.",
    ]
    return _against_cp(t, "repair", intro, "objects/s", "every copy present and correct")


def _migrate(t: Table) -> list[str]:
    intro = [
        "## migrate folder, against cp -r + sync",
        "",
        "`pacsgrid migrate folder` brings the ingest dataset's tree into a fresh archive "
        "(default folder site, SQLite index, default --jobs; an fsync per object and per "
        "index commit): wall time from start until it exits. In the same round, in an order "
        "that alternates, `cp -r` copies the same tree to a fresh folder and `sync` puts it "
        "on disk. The archive must hold every file as an instance afterwards.",
    ]
    return _against_cp(t, "migrate", intro, "files/s", "every file in the archive")


def _find(t: Table) -> list[str]:
    def wrong(sc: str, servers: list[str]) -> tuple[str, list[str]]:
        cells = []
        for s in servers:
            w = t.get("find", sc, s, "wrong_answers")
            q = t.get("find", sc, s, "queries")
            cells.append(f"{int(sum(w))} of {int(sum(q))}" if q else "-")
        return "wrong answers", cells

    intro = [
        "## C-FIND at STUDY level (10,000-instance archive)",
        "",
        "Many queries on ONE association (pacsgrid.dicom.scu as the client, identifiers by "
        "pydicom, the same for both servers), each timed from request to final response "
        "(after 5 untimed warm-up queries); p50/p95 per round, then the median over rounds. "
        "Every answer is checked against the synthetic data: one response per study, exactly "
        "the expected studies.",
    ]
    metrics = (
        ("p50 latency (ms)", "p50_ms", 2),
        ("p95 latency (ms)", "p95_ms", 2),
        ("server CPU ms per query", "cpu_ms_per_query", 2),
        ("responses per query", "responses_per_query", 1),
    )
    return _metric_table(t, "find", intro, "query", metrics, wrong)


def _retrieve(t: Table) -> list[str]:
    intro = [
        "## Retrieve of one 200-instance 512x512 study",
        "",
        "C-MOVE: DCMTK movescu asks the server to send the study to a DCMTK storescp; C-GET: "
        "DCMTK getscu receives it on its own association. Wall time of the movescu/getscu "
        "process; each round's figure is the median of 5 back-to-back retrieves (one takes "
        "about a third of a second), server CPU is over all 5; every instance of every "
        "retrieve checked to have arrived.",
    ]
    metrics = (
        ("instances/s", "instances_per_s", 0),
        ("MB/s", "mb_per_s", 1),
        ("server CPU s per 1,000 instances", "cpu_s_per_1000", 2),
    )
    return _metric_table(t, "retrieve", intro, "operation", metrics)


def _disk(t: Table) -> list[str]:
    out = [
        "## Disk ceiling (same run, same disk)",
        "",
        "`cp -r` of the dataset folder (page cache, no fsync), and write+fsync of each file "
        "(bytes already in memory).",
        "",
        "| what | instances/s | MB/s |",
        "|---|---|---|",
    ]
    for sc in t.scenarios("disk"):
        out.append(
            f"| {sc} | {t.cell('disk', sc, 'disk', 'instances_per_s', 0)} | "
            f"{t.cell('disk', sc, 'disk', 'mb_per_s', 1)} |"
        )
    return [*out, ""]


def _load(t: Table) -> list[str]:
    out = [
        "## Loading the query/retrieve archive (no goal; 4 storescu associations)",
        "",
        "| server | instances | instances/s |",
        "|---|---|---|",
    ]
    for s in SERVERS:
        n = t.get("load", "query archive", s, "stored")
        if n:
            rate = t.cell("load", "query archive", s, "instances_per_s", 0)
            out.append(f"| {s} | {int(n[0]):,} | {rate} |")
    return [*out, ""]


def _failures(t: Table) -> list[str]:
    if not t.failed:
        return ["All correctness checks passed (counts, answers, retrieved instances).", ""]
    out = ["## Failed checks", ""]
    for s in t.failed:
        out.append(f"- round {s.round}, {s.phase} {s.scenario}, {s.server}: {s.note}")
    return [*out, ""]


def _machine(meta: dict[str, object]) -> list[str]:
    out = ["## Machine and versions", ""]
    for k, v in meta.items():
        if k in ("machine", "versions") and isinstance(v, dict):
            out += [f"- {kk}: {vv}" for kk, vv in v.items()]
    return [*out, ""]


# ---------------------------------------------------------------- machine info


def machine_info(work: Path) -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    disk = _run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(work)])
    rotational = "?"
    source = disk.split()[0] if disk else ""
    if source.startswith("/dev/"):
        name = Path(source).name
        for cand in (name, name.rstrip("0123456789")):
            f = Path(f"/sys/block/{cand}/queue/rotational")
            if f.exists():
                rotational = "rotational" if f.read_text().strip() == "1" else "non-rotational"
                break
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "disk (work folder)": f"{disk or '?'} ({rotational})",
        "OS": _os_release(),
    }


def versions(python: str) -> dict[str, str]:
    commit = _run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent)
    # Results of earlier runs (bench/results) are not changes to what is measured.
    dirty = _run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
        cwd=Path(__file__).parent.parent,
    )
    pacsgrid = _run([python, "-c", "import pacsgrid; print(pacsgrid.__version__)"])
    return {
        "pacsgrid": f"{pacsgrid} (commit {commit}{', with local changes' if dirty else ''})",
        "Orthanc": tool_version(["Orthanc", "--version"]),
        "DCMTK": tool_version([dcmtk_tool("storescu"), "--version"]),
        "Python": platform.python_version(),
        "pydicom / pynetdicom": _run(
            [python, "-c", "import pydicom, pynetdicom; "
             "print(pydicom.__version__, '/', pynetdicom.__version__)"]
        ),
    }  # fmt: skip


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()
