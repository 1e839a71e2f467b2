"""A power-cut run: record the workload once, pick cut points across the write path, check
each, and report.

Cut points are drawn (seeded) phase by phase, so each part of the write path gets its share
whatever its number of operations: a cut falls just before or just after an operation of the
phase. A phase is named after the file an operation touched and what it did to it:

    log append / log flush / log segment   the site's write-ahead log (objects/.wal/)
    staged write / staged fsync / staged name   large objects' files (objects/.wal/data/)
    object write / object fsync / object name / folder fsync   the site's files (objects/)
    index write / index commit                                 the SQLite WAL (its fsync)
    checkpoint                                                 the SQLite database file
    journal                                                    the ingest journal
    other                                                      everything else
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.powercut.archive import DATA, Recording
from tests.powercut.check import Verdict, check_cut
from tests.powercut.history import History, Op
from tests.powercut.model import Model

PHASES = (
    "log append",
    "log flush",
    "log segment",
    "staged write",
    "staged fsync",
    "staged name",
    "object write",
    "object fsync",
    "object name",
    "folder fsync",
    "index write",
    "index commit",
    "checkpoint",
    "journal",
    "other",
)
_SITE = re.compile(rf"^/{DATA}/objects(/|$)")
_LOG = re.compile(rf"^/{DATA}/objects/\.wal(/|$)")
_STAGED = re.compile(rf"^/{DATA}/objects/\.wal/data(/|$)")
# Builds of the archive that skip one flush (skipflush/sitecustomize.py); `{site}` becomes
# the site folder of each run. "log": the fdatasync of the site's write-ahead log, which every
# acknowledgement waits for; "folder": the fsync of a series folder (at a checkpoint).
_SKIPFLUSH = str(Path(__file__).resolve().parent / "skipflush")
SKIP_FLUSH = {
    "log": {"PYTHONPATH": _SKIPFLUSH, "POWERCUT_SKIP_LOG_FLUSH": "{site}"},
    "folder": {"PYTHONPATH": _SKIPFLUSH, "POWERCUT_SKIP_DIR_FSYNC": "{site}"},
}


def phase(op: Op) -> str:
    path = op.path.split(" -> ")[-1]
    if _STAGED.match(path):
        return {"write": "staged write", "fsync": "staged fsync"}.get(op.kind, "staged name")
    if _LOG.match(path):
        return {"write": "log append", "fsync": "log flush"}.get(op.kind, "log segment")
    if _SITE.match(path):
        return {
            "write": "object write",
            "truncate": "object write",
            "fsync": "object fsync",
            "fsyncdir": "folder fsync",
        }.get(op.kind, "object name")
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".sqlite-wal"):
        return "index commit" if op.kind == "fsync" else "index write"
    if name.endswith(".sqlite"):
        return "checkpoint"
    if f"/{DATA}/journal/" in path:
        return "journal"
    return "other"


def choose_cuts(history: History, count: int, seed: int) -> list[tuple[int, str]]:
    """`count` distinct cut points (operations kept, phase), spread over the phases."""
    rng = random.Random(f"{seed}:cuts")
    by_phase: dict[str, list[int]] = {p: [] for p in PHASES}
    for op in history.ops:
        by_phase[phase(op)].append(op.index)
    for ops in by_phase.values():
        rng.shuffle(ops)
    chosen: dict[int, str] = {}
    while len(chosen) < count and any(by_phase.values()):
        for name in PHASES:
            if by_phase[name] and len(chosen) < count:
                index = by_phase[name].pop()
                k = index + rng.randint(0, 1)  # just before or just after the operation
                chosen.setdefault(k, name)
    return sorted(chosen.items())


@dataclass
class Report:
    seed: int
    operations: int
    sent: int
    acknowledged: int
    verdicts: list[Verdict] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def losses(self) -> list[tuple[int, str]]:
        return [(v.index, loss) for v in self.verdicts for loss in v.lost]

    @property
    def half_written(self) -> list[tuple[int, str]]:
        return [(v.index, h) for v in self.verdicts for h in v.half_written]

    @property
    def errors(self) -> list[tuple[int, str]]:
        return [(v.index, v.error) for v in self.verdicts if v.error]

    @property
    def ok(self) -> bool:
        return bool(self.verdicts) and all(v.ok for v in self.verdicts)

    def text(self) -> str:
        tried = Counter(v.phase for v in self.verdicts)
        failed = Counter(v.phase for v in self.verdicts if not v.ok)
        checked = sum(v.acknowledged for v in self.verdicts)
        unindexed = sum(len(v.unindexed) for v in self.verdicts)
        lines = [
            f"power-cut run, seed {self.seed}: {len(self.verdicts)} cut points"
            + (" (interrupted)" if self.interrupted else "")
            + f" in {self.seconds:.0f}s over a history of {self.operations} operations;"
            f" {self.acknowledged} of {self.sent} instances acknowledged",
            "  per phase of the write path (cut points tried, failed):",
            *(f"    {p:<14} {tried[p]:>5} {failed[p]:>5}" for p in PHASES if tried[p]),
            f"  acknowledged instances checked: {checked} (summed over the cut points)",
            f"  losses: {len(self.losses)} (must be 0)",
            f"  half-written objects seen: {len(self.half_written)} (must be 0)",
            f"  archive did not start or answer: {len(self.errors)} (must be 0)",
            f"  complete objects left unindexed by recovery: {unindexed} (must be 0)",
        ]
        for title, items in (
            ("losses", self.losses),
            ("half-written", self.half_written),
            ("unindexed", [(v.index, u) for v in self.verdicts for u in v.unindexed]),
            ("errors", self.errors),
        ):
            for k, what in items[:20]:
                lines.append(f"  {title} at cut {k}: {what}")
        return "\n".join(lines)


def run(
    root: Path,
    *,
    seed: int,
    cuts: int,
    senders: int = 3,
    per_sender: int = 24,
    env: dict[str, str] | None = None,
    keep: bool = False,
    stop_at_first_loss: bool = False,
    progress: Callable[[Verdict, int, int], None] | None = None,
) -> Report:
    """Record the workload under `root`, then check `cuts` cut points (Ctrl-C stops early
    and still returns a report). `env` goes to every archive process (recording and
    recovery): `{site}` in a value is replaced by the site folder of that run."""
    from tests.powercut.archive import record

    started = time.monotonic()
    recording = record(root, seed=seed, senders=senders, per_sender=per_sender, env=env)
    return check(
        recording,
        seed=seed,
        cuts=cuts,
        env=env,
        keep=keep,
        stop_at_first_loss=stop_at_first_loss,
        progress=progress,
        started=started,
    )


def check(
    recording: Recording,
    *,
    seed: int,
    cuts: int,
    env: dict[str, str] | None = None,
    keep: bool = False,
    stop_at_first_loss: bool = False,
    progress: Callable[[Verdict, int, int], None] | None = None,
    started: float | None = None,
) -> Report:
    """Check `cuts` cut points of a recording (see run)."""
    started = time.monotonic() if started is None else started
    history = History.load(recording.history)
    model = Model(history)
    points = choose_cuts(history, cuts, seed)
    report = Report(
        seed,
        len(history),
        len(recording.sent),
        sum(s.mark >= 0 for s in recording.sent),
    )
    work = recording.root / "cuts"
    try:
        for n, (k, name) in enumerate(points, 1):
            verdict = check_cut(
                recording, history, model, k, seed, work, phase=name, env=env, keep=keep
            )
            report.verdicts.append(verdict)
            if progress is not None:
                progress(verdict, n, len(points))
            if stop_at_first_loss and verdict.lost:
                break
    except KeyboardInterrupt:
        report.interrupted = True
    report.seconds = time.monotonic() - started
    return report
