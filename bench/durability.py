"""What the archive's durability work must show, measured in the same run as everything else.

- repair: a folder site whose objects were all lost (sentinel kept) is rebuilt by `pacsgrid
  repair` (bench.repair.TwoSites), against `cp -r` of the same files to a fresh folder
  followed by `sync`: the same bytes made just as durable, with no checks at all.
- migrate: `pacsgrid migrate folder` of a dataset tree into a fresh archive (bench.migrate),
  against `cp -r` + `sync` of the same tree.
- latency: one C-STORE at a time on one association to an idle server (bench.clients):
  pacsgrid, Orthanc and storescp, p50/p95 of the round trips.

Each measurement returns a Sample checked for correctness (every copy present and correct,
every file migrated, every instance stored); speed is only reported. In the repair and
migrate phases the "servers" are pacsgrid and cp -r + sync, measured in an order that
alternates from round to round (bench.run).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import clients, disk, scratch
from bench.datasets import DataSet
from bench.migrate import migrate_folder
from bench.procs import BenchError, pacsgrid_status
from bench.repair import TwoSites, tree_bytes
from bench.samples import CP_SYNC, Sample, percentile
from bench.servers import Server
from pacsgrid.dicom.association import AssociationAborted
from pacsgrid.dicom.scu import AssociationRejected

PACSGRID = "pacsgrid"
AGAINST_CP = (PACSGRID, CP_SYNC)  # who the repair and migrate phases measure
LATENCY_WARMUP = 5  # stores on the latency association before the timed ones

# The time a command reports for its own work (after start-up and, for repair, the scan):
# "  200/200 objects in 0.4s (...)" and "  0.5s, 417.9 files/s, ...".
REPAIR_WORK = re.compile(r"(\d+)/\d+ objects in ([\d.]+)s")
MIGRATE_WORK = re.compile(r"^\s*([\d.]+)s, [\d.]+ files/s", re.MULTILINE)


def _sample(
    phase: str, scenario: str, who: str, rnd: int, n: int, nbytes: int, sec: float
) -> Sample:
    return Sample(
        phase,
        scenario,
        who,
        rnd,
        {"seconds": sec, "objects": n, "instances_per_s": n / sec, "mb_per_s": nbytes / 1e6 / sec},
    )


# ---------------------------------------------------------------- repair


@dataclass
class WipedSite:
    """The repair phase's archive for one dataset: loaded once (untimed), then in every round
    site b is wiped and repaired. A marker file names the dataset while the archive holds
    every object on both sites: a resumed run (`reuse`) keeps such an archive, anything else
    (a new run, a repair that failed or was interrupted) loads it afresh."""

    ds: DataSet
    work: Path
    timeout: float
    env: dict[str, str] | None = None
    reuse: bool = False

    def __post_init__(self) -> None:
        self.sites = TwoSites(self.work / f"repair-{self.ds.name}", env=self.env)
        self.objects = 0
        self.bytes = 0
        self._used = False

    @property
    def complete(self) -> Path:
        return self.sites.work / "complete"

    def _mark_complete(self) -> None:
        self.complete.write_text(self.ds.root.name)

    def _is_complete(self) -> bool:
        return self.complete.is_file() and self.complete.read_text() == self.ds.root.name

    def ready(self) -> None:
        """Every object of the dataset on both sites (loaded unless it already is)."""
        fresh = not self._used and not self.reuse
        self._used = True
        if fresh or not self._is_complete():
            self.complete.unlink(missing_ok=True)
            seconds = self.sites.load(self.ds.root, self.timeout * 4)
            self._check("loading the repair archive")
            print(
                f"bench: loaded the {self.ds.label} repair archive (2 copies of "
                f"{len(self.ds.files)} objects) in {seconds:.1f}s",
                file=sys.stderr,
            )
            self._mark_complete()
        if not self.objects:
            self.objects, self.bytes = tree_bytes(self.sites.a)

    def _check(self, what: str) -> None:
        problems = self.sites.check(len(self.ds.files), self.timeout)
        if problems:
            raise BenchError(f"{what}: " + "; ".join(problems))

    def repair_sample(self, rnd: int) -> Sample:
        """Site b wiped (untimed), then the wall time of `pacsgrid repair`; every copy checked
        after it (the index, and b's files byte for byte against a's)."""
        self.ready()
        self.complete.unlink()
        self.sites.wipe_b()
        seconds, output = self.sites.repair(self.timeout)
        s = _sample("repair", self.ds.label, PACSGRID, rnd, self.objects, self.bytes, seconds)
        m = REPAIR_WORK.search(output)
        if m:
            s.metrics["copied"] = int(m[1])
            s.metrics["work_seconds"] = float(m[2])
        problems = self.sites.check(self.objects, self.timeout)
        s.ok, s.note = not problems, "; ".join(problems)
        if s.ok:
            self._mark_complete()
        return s

    def cp_sample(self, rnd: int, dst: Path) -> Sample:
        """`cp -r` of site a's object folders to a fresh folder, then `sync`."""
        self.ready()
        seconds = self.sites.copy_a(dst, self.timeout)
        return _sample("repair", self.ds.label, CP_SYNC, rnd, self.objects, self.bytes, seconds)


# ---------------------------------------------------------------- migrate


def migrate_sample(
    ds: DataSet, data: Path, rnd: int, timeout: float, env: dict[str, str] | None = None
) -> Sample:
    """`pacsgrid migrate folder` of the dataset's tree into a fresh archive at `data`; the
    archive must then hold every instance."""
    seconds, output = migrate_folder(ds.root, data, timeout, env=env)
    s = _sample("migrate", ds.label, PACSGRID, rnd, len(ds.files), ds.bytes, seconds)
    m = MIGRATE_WORK.search(output)
    if m:
        s.metrics["work_seconds"] = float(m[1])
    stored = int(pacsgrid_status("--data-dir", data, env=env)["index"]["instances"])
    scratch.discard(data)
    s.metrics["stored"] = stored
    if stored != len(ds.files):
        s.ok, s.note = (
            False,
            f"the archive holds {stored} instances, {len(ds.files)} files migrated",
        )
    return s


def migrate_cp_sample(ds: DataSet, dst: Path, rnd: int, timeout: float) -> Sample:
    """`cp -r` of the dataset's tree to a fresh folder, then `sync`."""
    seconds = disk.cp_r([ds.root], dst, timeout, sync=True)
    return _sample("migrate", ds.label, CP_SYNC, rnd, len(ds.files), ds.bytes, seconds)


# ---------------------------------------------------------------- latency


def latency_files(ds: DataSet, instances: int) -> tuple[Path, ...]:
    """The files the latency phase sends: LATENCY_WARMUP untimed, then `instances` timed."""
    files = ds.files[: LATENCY_WARMUP + instances]
    if len(files) < LATENCY_WARMUP + instances:
        raise BenchError(
            f"the {ds.label} dataset has fewer than {LATENCY_WARMUP + instances} files"
        )
    return files


def latency_sample(
    srv: Server,
    files: tuple[Path, ...],
    warmup: DataSet,
    gap: float,
    scenario: str,
    rnd: int,
    logs: Path,
    timeout: float,
) -> Sample:
    """On a running, empty server: the ingest's warm-up (bench.run.ingest_sample), then
    `files` one at a time on one association with a pause of `gap` seconds after each
    response; p50/p95 of the timed round trips. Every status must be Success and the server
    must hold every instance sent."""
    srv.warm_up(warmup.files, logs / "warmup")
    os.sync()  # no dirty pages of the warm-up
    try:
        run = clients.store_one_at_a_time(
            srv.port, srv.ae_title, files, gap, LATENCY_WARMUP, timeout
        )
    except (OSError, AssociationAborted, AssociationRejected) as e:
        raise BenchError(f"C-STORE to {srv.name}: {type(e).__name__}: {e}") from e
    ms = [x * 1000 for x in run.latencies]
    stored = srv.count()
    expected = len(files) + len(warmup.files)
    s = Sample(
        "latency",
        scenario,
        srv.name,
        rnd,
        {
            "p50_ms": percentile(ms, 0.5),
            "p95_ms": percentile(ms, 0.95),
            "max_ms": max(ms, default=float("nan")),
            "timed": len(ms),
            "stored": stored,
            "expected": expected,
        },
    )
    problems = []
    failed = [st for st in run.statuses if st != 0]
    if failed:
        problems.append(f"{len(failed)} C-STORE(s) not Success, e.g. 0x{failed[0]:04X}")
    if stored != expected:
        problems.append(f"the server holds {stored} instances, {expected} were sent")
    s.ok, s.note = not problems, "; ".join(problems)
    return s
