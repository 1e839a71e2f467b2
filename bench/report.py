"""Samples of a run -> the results file: medians, spread (min-max over rounds), ratios,
the goals we measure against, the machine and the versions.

Every number in the tables is the median over rounds of one measurement, with the lowest and
highest round in parentheses. Ratios divide pacsgrid's median by the other server's median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.procs import dcmtk_tool, tool_version


@dataclass
class Sample:
    phase: str  # disk | ingest | load | find | retrieve
    scenario: str  # e.g. "64x64, 4 assoc", "PatientID", "C-MOVE", "64x64 cp -r"
    server: str  # pacsgrid | Orthanc | storescp | disk
    round: int
    metrics: dict[str, float] = field(default_factory=dict)
    ok: bool = True
    note: str = ""

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.phase, self.scenario, self.server, self.round

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(line: str) -> Sample:
        return Sample(**json.loads(line))


SERVERS = ("pacsgrid", "Orthanc", "storescp")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Table:
    """Samples indexed by (phase, scenario, server) -> metric -> values over rounds."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self.values: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.failed: list[Sample] = []
        for s in samples:
            if not s.ok:
                self.failed.append(s)
            for m, v in s.metrics.items():
                self.values[(s.phase, s.scenario, s.server)][m].append(v)

    def get(self, phase: str, scenario: str, server: str, metric: str) -> list[float]:
        return self.values.get((phase, scenario, server), {}).get(metric, [])

    def median(self, phase: str, scenario: str, server: str, metric: str) -> float | None:
        v = self.get(phase, scenario, server, metric)
        return statistics.median(v) if v else None

    def cell(self, phase: str, scenario: str, server: str, metric: str, digits: int) -> str:
        v = self.get(phase, scenario, server, metric)
        if not v:
            return "-"
        med = statistics.median(v)
        if len(v) == 1:
            return _fmt(med, digits)
        return f"{_fmt(med, digits)} ({_fmt(min(v), digits)}-{_fmt(max(v), digits)})"

    def ratio(self, phase: str, scenario: str, metric: str, other: str) -> str:
        a = self.median(phase, scenario, "pacsgrid", metric)
        b = self.median(phase, scenario, other, metric)
        if a is None or b is None or b == 0:
            return "-"
        return f"{a / b:.2f}x"

    def scenarios(self, phase: str) -> list[str]:
        seen: dict[str, None] = {}
        for p, sc, _ in self.values:
            if p == phase:
                seen[sc] = None
        return list(seen)


def _fmt(x: float, digits: int) -> str:
    return f"{x:,.{digits}f}"


INGEST_METRICS: tuple[tuple[str, str, int], ...] = (
    ("instances/s", "instances_per_s", 0),
    ("MB/s", "mb_per_s", 1),
    ("CPU s per 1,000 instances", "cpu_s_per_1000", 2),
    ("peak RSS (MB)", "peak_rss_mb", 0),
)


def render(samples: list[Sample], meta: dict[str, object]) -> str:
    t = Table(samples)
    out: list[str] = [f"# pacsgrid benchmark: {meta['date']}", ""]
    out += _summary(meta)
    if t.scenarios("ingest"):
        out += _ingest(t)
    if t.scenarios("find"):
        out += _find(t)
    if t.scenarios("retrieve"):
        out += _retrieve(t)
    if t.scenarios("disk"):
        out += _disk(t)
    if t.scenarios("load"):
        out += _load(t)
    out += _targets(t)
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
ExtraRow = Callable[[str, list[str]], tuple[str, list[str]]]  # scenario, servers -> row


def _servers(t: Table, phase: str) -> list[str]:
    return [s for s in SERVERS if any(k[2] == s and k[0] == phase for k in t.values)]


def _metric_table(
    t: Table,
    phase: str,
    intro: list[str],
    first: str,
    metrics: tuple[Metric, ...],
    extra: ExtraRow | None = None,
) -> list[str]:
    """One row per (scenario, metric), one column per server, then pacsgrid's ratios."""
    servers = _servers(t, phase)
    ratios = [o for o in ("Orthanc", "storescp") if o in servers and "pacsgrid" in servers]
    out = [*intro, ""]
    out.append(
        f"| {first} | metric | "
        + " | ".join(servers)
        + "".join(f" | pacsgrid/{o}" for o in ratios)
        + " |"
    )
    out.append("|" + "---|" * (2 + len(servers) + len(ratios)))
    for sc in t.scenarios(phase):
        for label, metric, digits in metrics:
            cells = [t.cell(phase, sc, s, metric, digits) for s in servers]
            cells += [t.ratio(phase, sc, metric, o) for o in ratios]
            out.append(f"| {sc} | {label} | " + " | ".join(cells) + " |")
        if extra is not None:
            label, cells = extra(sc, servers)
            out.append(f"| {sc} | {label} | " + " | ".join(cells + [""] * len(ratios)) + " |")
    return [*out, ""]


def _ingest(t: Table) -> list[str]:
    def counts(sc: str, servers: list[str]) -> tuple[str, list[str]]:
        cells = []
        for s in servers:
            stored = t.get("ingest", sc, s, "stored")
            want = t.get("ingest", sc, s, "expected")
            good = sum(1 for a, b in zip(stored, want, strict=True) if a == b)
            cells.append(f"{good}/{len(stored)} rounds exact" if stored else "-")
        return "stored count = sent", cells

    intro = [
        "## C-STORE ingest (DCMTK storescu, TCP_NODELAY=1)",
        "",
        "N associations = N storescu processes on disjoint quarters of the files. instances/s "
        "and MB/s (file bytes) over the wall time of all storescu processes; CPU = user+system "
        "seconds of the server's whole process tree (children included) during the ingest; "
        "peak RSS = highest sum over the tree. Each measurement starts a fresh, empty server. "
        "pacsgrid fsyncs every object and commits its index before answering; Orthanc runs "
        'with its defaults ("SyncStorageArea": true); storescp writes files, no fsync, no index.',
    ]
    return _metric_table(t, "ingest", intro, "scenario", INGEST_METRICS, counts)


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


TARGETS = (
    # (label, phase, scenario, metric, wanted ratio, higher is better)
    ("ingest 4 assoc, 64x64, instances/s >= 1.2x Orthanc", "ingest", "64x64, 4 assoc",
     "instances_per_s", 1.2, True),
    ("ingest 4 assoc, 512x512, MB/s >= 1.2x Orthanc", "ingest", "512x512, 4 assoc",
     "mb_per_s", 1.2, True),
    ("ingest 1 assoc, 64x64, instances/s >= 1.0x Orthanc", "ingest", "64x64, 1 assoc",
     "instances_per_s", 1.0, True),
    ("ingest 1 assoc, 512x512, MB/s >= 1.0x Orthanc", "ingest", "512x512, 1 assoc",
     "mb_per_s", 1.0, True),
    ("C-MOVE instances/s >= 1.0x Orthanc", "retrieve", "C-MOVE", "instances_per_s", 1.0, True),
    ("C-GET instances/s >= 1.0x Orthanc", "retrieve", "C-GET", "instances_per_s", 1.0, True),
    ("C-FIND PatientID p95 <= Orthanc", "find", "PatientID", "p95_ms", 1.0, False),
    ("C-FIND PatientName wildcard p95 <= Orthanc", "find", "PatientName wildcard", "p95_ms",
     1.0, False),
    ("C-FIND StudyDate range p95 <= Orthanc", "find", "StudyDate range", "p95_ms", 1.0, False),
)  # fmt: skip


def target_status(t: Table) -> list[tuple[str, str, float | None]]:
    """(label, met | NOT met | not measured, ratio) for each goal."""
    out: list[tuple[str, str, float | None]] = []
    for label, phase, sc, metric, want, higher in TARGETS:
        a = t.median(phase, sc, "pacsgrid", metric)
        b = t.median(phase, sc, "Orthanc", metric)
        if a is None or b is None or b == 0:
            out.append((label, "not measured", None))
            continue
        r = a / b
        met = r >= want if higher else r <= want
        out.append((label, "met" if met else "NOT met", r))
    return out


def _targets(t: Table) -> list[str]:
    out = ["## Goals (pacsgrid vs Orthanc, medians of this run)", ""]
    out += ["| goal | ratio | status |", "|---|---|---|"]
    for label, status, r in target_status(t):
        out.append(f"| {label} | {'-' if r is None else f'{r:.2f}x'} | {status} |")
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
