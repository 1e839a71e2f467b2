"""What a benchmark run measures: samples, and the table of them the reports are made from.

A Sample is one measurement (one phase, scenario and server, in one round) with its metrics and
whether its correctness checks passed. A Table indexes samples so that every cell of a report
is the median over rounds, with the lowest and highest round beside it.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field


@dataclass
class Sample:
    phase: str  # disk | ingest | load | find | retrieve | repair | migrate | latency
    scenario: str  # e.g. "64x64, 4 assoc", "PatientID", "C-MOVE", "64x64 cp -r", "512x512"
    server: str  # pacsgrid | pacsgrid-pg | Orthanc | storescp | disk | cp -r + sync
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


SERVERS = ("pacsgrid", "pacsgrid-pg", "Orthanc", "storescp")
CP_SYNC = "cp -r + sync"  # the reference of the repair and migrate phases


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
        self.passed: dict[tuple[str, str, str], list[bool]] = defaultdict(list)
        for s in samples:
            if not s.ok:
                self.failed.append(s)
            self.passed[(s.phase, s.scenario, s.server)].append(s.ok)
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
            return fmt(med, digits)
        return f"{fmt(med, digits)} ({fmt(min(v), digits)}-{fmt(max(v), digits)})"

    def checks(self, phase: str, scenario: str, server: str) -> str:
        """How many rounds passed their correctness checks: "3/3 rounds", or "-"."""
        ok = self.passed.get((phase, scenario, server), [])
        return f"{sum(ok)}/{len(ok)} rounds" if ok else "-"

    def ratio(
        self, phase: str, scenario: str, metric: str, other: str, mine: str = "pacsgrid"
    ) -> str:
        a = self.median(phase, scenario, mine, metric)
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


def fmt(x: float, digits: int) -> str:
    return f"{x:,.{digits}f}"
