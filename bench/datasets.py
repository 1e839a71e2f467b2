"""What a benchmark run sends: the synthetic datasets (bench.synth) and the C-FIND queries.

Datasets are generated once and cached under the work folder, in a folder named after their
spec, so a changed spec makes a new folder and an interrupted generation resumes. The expected
answer of every query is computed from the spec (bench.synth.studies), not asked of a server.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.synth import Spec, StudyInfo, studies, write
from pacsgrid.progress import Progress

WARMUP = Spec(studies=1, series=1, instances=8, size=64, seed="bench-warmup")


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    name: str
    small: Spec  # ingest, 64x64
    large: Spec  # ingest, 512x512
    query: Spec  # the C-FIND archive
    retrieve: Spec  # the C-MOVE/C-GET study
    queries: int  # C-FIND queries per kind, per server, per round
    timeout: float  # seconds any single measurement may take
    # Stored (4 associations, not timed) into every fresh server before an ingest is timed, so
    # that what is measured is the steady state, not a worker's first association (lazy
    # imports, caches); counted in the stored-count check.
    warmup: Spec = WARMUP
    # Each retrieve measurement is the median of this many back-to-back retrieves of the
    # study: one 200-instance retrieve takes a third of a second, too short to measure once.
    retrieve_repeats: int = 1
    # The repair and migrate phases: each of these datasets (names as in `prepare`) is
    # repaired onto a wiped site and migrated, each time against `cp -r` + `sync` of it.
    copy_sets: tuple[str, ...] = ("small", "large")
    # The latency phase: this many instances of the small dataset, one at a time on one
    # association, with this pause (seconds) after each response so the archive is idle.
    latency_instances: int = 200
    latency_gap: float = 0.05


FULL = Plan(
    "full",
    small=Spec(studies=20, series=2, instances=50, size=64, seed="bench-small"),
    large=Spec(studies=5, series=2, instances=50, size=512, seed="bench-large"),
    query=Spec(studies=500, series=2, instances=10, size=64, seed="bench-query"),
    retrieve=Spec(studies=1, series=1, instances=200, size=512, seed="bench-retrieve"),
    queries=200,
    timeout=900.0,
    retrieve_repeats=5,
)

# CI-sized: every code path of the full run, in seconds. Checks correctness, not speed.
SMOKE = Plan(
    "smoke",
    small=Spec(studies=2, series=2, instances=4, size=64, seed="smoke-small"),
    large=Spec(studies=1, series=2, instances=3, size=128, seed="smoke-large"),
    query=Spec(studies=12, series=1, instances=2, size=64, seed="smoke-query"),
    retrieve=Spec(studies=1, series=1, instances=6, size=128, seed="smoke-retrieve"),
    queries=5,
    timeout=120.0,
    copy_sets=("small",),
    latency_instances=8,
    latency_gap=0.01,
)

PLANS = {p.name: p for p in (FULL, SMOKE)}


@dataclass(frozen=True)
class DataSet:
    name: str
    spec: Spec
    root: Path
    files: tuple[Path, ...]
    bytes: int

    @property
    def label(self) -> str:
        return f"{self.spec.size}x{self.spec.size}"


def folder_name(spec: Spec) -> str:
    s = spec
    return f"{s.seed}-{s.studies}x{s.series}x{s.instances}-{s.size}px-p{s.patients}"


def prepare(plan: Plan, work: Path) -> dict[str, DataSet]:
    """Generate (or find cached) the plan's four datasets."""
    specs = {"small": plan.small, "large": plan.large, "query": plan.query}
    specs["retrieve"] = plan.retrieve
    specs["warmup"] = plan.warmup
    total = sum(s.total for s in specs.values())
    out = {}
    with Progress("datasets", total, unit="files", interval=5.0) as progress:
        for name, spec in specs.items():
            root = work / "data" / folder_name(spec)
            files = write(spec, root, lambda p: progress.advance("ready"))
            out[name] = DataSet(
                name, spec, root, tuple(files), sum(p.stat().st_size for p in files)
            )
    return out


# ---------------------------------------------------------------- C-FIND queries


@dataclass(frozen=True)
class FindQuery:
    keys: dict[str, str]
    expected: frozenset[str]  # StudyInstanceUIDs


FIND_KINDS = ("PatientID", "PatientName wildcard", "StudyDate range")


def find_queries(spec: Spec, n: int, also: tuple[Spec, ...] = ()) -> dict[str, list[FindQuery]]:
    """`n` queries of each kind, cycling over every value the archive holds: one patient's
    ID, a "FAMILY^GIVEN*" name prefix, one year of StudyDate. `also`: other datasets in the
    same archive (their studies are expected in the answers too)."""
    info = list(studies(spec))
    for other in also:
        info += studies(other)
    by_kind: dict[str, list[FindQuery]] = {}

    pids = sorted({s.patient_id for s in info})
    by_kind["PatientID"] = _cycle(
        (FindQuery({"PatientID": p}, _where(info, lambda s, p=p: s.patient_id == p)) for p in pids),
        n,
    )
    prefixes = sorted({s.patient_name.rsplit("^", 1)[0] for s in info})
    by_kind["PatientName wildcard"] = _cycle(
        (
            FindQuery(
                {"PatientName": f"{pre}*"},
                _where(info, lambda s, pre=pre: s.patient_name.upper().startswith(pre.upper())),
            )
            for pre in prefixes
        ),
        n,
    )
    years = sorted({s.study_date[:4] for s in info})
    by_kind["StudyDate range"] = _cycle(
        (
            FindQuery(
                {"StudyDate": f"{y}0101-{y}1231"},
                _where(info, lambda s, y=y: f"{y}0101" <= s.study_date <= f"{y}1231"),
            )
            for y in years
        ),
        n,
    )
    return by_kind


def _where(info: list[StudyInfo], pred: object) -> frozenset[str]:
    assert callable(pred)
    return frozenset(s.study_uid for s in info if pred(s))


def _cycle(queries: Iterable[FindQuery], n: int) -> list[FindQuery]:
    pool = list(queries)
    return list(itertools.islice(itertools.cycle(pool), n))
