"""A/B: builds of pacsgrid against each other and a reference, on one scenario.

    python -m bench.ab --build shipped=src --build candidate=/tmp/wt/src
    python -m bench.ab --build a=src --build b=/tmp/wt/src --no-orthanc --size large --assoc 1
    python -m bench.ab --build a=src --build b=/tmp/wt/src --scenario latency
    python -m bench.ab --build a=src --build b=/tmp/wt/src --scenario repair --size large
    python -m bench.ab --build a=src --build b=/tmp/wt/src --index both --no-orthanc

Scenarios (`--scenario`), each measured exactly as the phase of the same name in bench.run:
ingest (default; `--size`, `--assoc`) and latency of one C-STORE on an idle server, with
Orthanc as the reference unless `--no-orthanc`; repair of a wiped folder site and `migrate
folder` (`--size`), with `cp -r` + `sync` of the same files as the reference. `--index
postgres` runs the builds' servers with their index on a PostgreSQL server of their own (as
`pacsgrid-pg` in bench.run, `fsync` on); `--index both` measures each build twice, on SQLite
as NAME and on PostgreSQL as NAME-pg (ingest and latency).

A change meant to make ingest faster is worth keeping only if it beats the code it replaces by
more than one round differs from the next on this machine (up to a third). So the builds (and
Orthanc) are measured in the same run, alternating, every round in a rotated order, each
measurement on a fresh, empty server, nothing deleted until the run ends, exactly as
`bench.run` measures (same datasets, same warm-up, same clients, same checks).

A build is a folder holding the `pacsgrid` package, typically a git worktree's `src/`
(`git worktree add /tmp/wt HEAD`, edit, then `--build mine=/tmp/wt/src`); it runs with this
repository's Python environment. Results: a table on stdout and in `<results>/<date>-ab.md`
(`-ab-2.md`, ... for further runs of the day; default results folder: bench/work/results).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import netns, scratch
from bench.datasets import PLANS, DataSet, Plan, prepare
from bench.durability import (
    WipedSite,
    latency_files,
    latency_sample,
    migrate_cp_sample,
    migrate_sample,
)
from bench.procs import BenchError, stop_on_sigterm
from bench.report import machine_info
from bench.run import REPO, ingest_sample, rotate
from bench.samples import CP_SYNC, Sample
from bench.servers import Orthanc, Pacsgrid, PacsgridPg, Server

ORTHANC = "Orthanc"
SCENARIOS = ("ingest", "latency", "repair", "migrate")
# Per scenario: the main metric (key, column label, decimals, higher is better), a second
# column (key, label, decimals), and the reference contender.
COLUMNS: dict[str, tuple[tuple[str, str, int, bool], tuple[str, str, int], str]] = {
    "ingest": (("instances_per_s", "instances/s", 0, True),
               ("cpu_s_per_1000", "server CPU ms/instance", 2), ORTHANC),
    "latency": (("p50_ms", "p50 ms", 2, False), ("p95_ms", "p95 ms", 2), ORTHANC),
    "repair": (("instances_per_s", "objects/s", 0, True), ("seconds", "seconds", 2), CP_SYNC),
    "migrate": (("instances_per_s", "files/s", 0, True), ("seconds", "seconds", 2), CP_SYNC),
}  # fmt: skip


@dataclass
class Build(Pacsgrid):
    """pacsgrid run from another source folder (first on PYTHONPATH)."""

    src: Path = Path()

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.src)}


@dataclass
class BuildPg(Build, PacsgridPg):
    """A build with its index on a PostgreSQL server of its own (bench.servers.PacsgridPg)."""


def check_build(name: str, src: Path) -> None:
    """Fail before anything is measured if `src` is not what Python would import."""
    out = subprocess.run(
        [sys.executable, "-c", "import pacsgrid, sys; sys.stdout.write(pacsgrid.__file__)"],
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    loaded = Path(out.stdout).resolve() if out.returncode == 0 else None
    if loaded is None or not loaded.is_relative_to(src.resolve()):
        raise BenchError(f"build {name}: {src} does not hold the pacsgrid package that runs")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--build",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="a build: a name and the folder that holds its pacsgrid package (repeatable)",
    )
    ap.add_argument(
        "--scenario", choices=SCENARIOS, default="ingest", help="what is measured (default ingest)"
    )
    ap.add_argument(
        "--orthanc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Orthanc as the reference of ingest and latency (repair and migrate: cp -r + sync)",
    )
    ap.add_argument(
        "--size",
        choices=("small", "large"),
        default="small",
        help="64x64 or 512x512 (ingest, repair, migrate; latency: 64x64)",
    )
    ap.add_argument("--assoc", type=int, default=4, help="concurrent associations (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--plan", choices=sorted(PLANS), default="full", help="dataset sizes")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work", help="cache and scratch")
    ap.add_argument("--results", type=Path, help="folder of the results file")
    ap.add_argument("--netns", choices=("auto", "on", "off"), default="auto")
    ap.add_argument(
        "--index",
        choices=("sqlite", "postgres", "both"),
        default="sqlite",
        help="the builds' index (both: each build on SQLite as NAME and on PostgreSQL as "
        "NAME-pg; ingest and latency)",
    )
    args = ap.parse_args(argv)
    builds: dict[str, Path] = {}
    for spec in args.build or [f"current={REPO / 'src'}"]:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in builds or name == ORTHANC:
            ap.error(f"--build {spec!r}: give NAME=SRC with a new name")
        builds[name] = Path(path).expanduser().resolve()
    args.builds = builds
    if args.rounds < 1 or args.assoc < 1:
        ap.error("--rounds and --assoc must be >= 1")
    if args.index != "sqlite" and args.scenario not in ("ingest", "latency"):
        ap.error("--index postgres and both apply to the ingest and latency scenarios")
    # The contenders measured on a server: name -> (source folder, on PostgreSQL).
    args.servers = {}
    for name, src in builds.items():
        if args.index in ("sqlite", "both"):
            args.servers[name] = (src, False)
        if args.index in ("postgres", "both"):
            args.servers[f"{name}-pg" if args.index == "both" else name] = (src, True)
    return args


def report(
    samples: list[Sample], meta: dict[str, str], names: list[str], scenario: str = "ingest"
) -> str:
    """Markdown: per contender, the median of the scenario's main metric over rounds (each
    round's figure beside it) and of a second one, ratios to the first build and to the
    reference. A failed measurement (a wrong count, a bad copy) is shown and spoils its
    contender."""
    (metric, label, digits, higher), (metric2, label2, digits2), reference = COLUMNS[scenario]
    by: dict[str, list[Sample]] = {n: [] for n in names}
    for s in samples:
        by[s.server].append(s)

    def median(name: str, key: str) -> float:
        values = [s.metrics[key] for s in by[name] if s.ok and key in s.metrics]
        return statistics.median(values) if values else float("nan")

    first = names[0]
    better = "above" if higher else "below"
    lines = [
        f"# pacsgrid A/B: {meta['date']}",
        "",
        f"Command: `{meta['command']}`. {meta['scenario']}, {meta['rounds']} rounds, "
        "alternating (each round rotates the order), a fresh empty server, freshly wiped "
        "site or fresh archive per measurement, nothing deleted until the run ended. Load "
        f"average before / after: {meta['loadavg_before']} / {meta['loadavg_after']}. "
        f"{meta['machine']}. Ratios of "
        f"{label}: {better} 1.00x is better.",
        "",
        f"| contender | {label}, median (rounds) | {label2} | vs {first} | vs {reference} |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        values = [s.metrics[metric] for s in by[n] if s.ok]
        rounds = ", ".join(f"{v:,.{digits}f}" for v in values)
        value = median(n, metric)
        vs_first = f"{value / median(first, metric):.2f}x"
        vs_ref = f"{value / median(reference, metric):.2f}x" if reference in names else ""
        second = median(n, metric2)
        lines.append(
            f"| {n} | {value:,.{digits}f} ({rounds}) | {second:,.{digits2}f} | {vs_first} "
            f"| {vs_ref} |"
        )
    bad = [f"{s.server} round {s.round}: {s.note}" for s in samples if not s.ok]
    fine = "every stored count exact" if scenario in ("ingest", "latency") else "every check passed"
    lines += ["", "Failed checks: " + ("; ".join(bad) if bad else f"none ({fine}).")]
    return "\n".join(lines) + "\n"


class Measure:
    """One measurement of one contender in the chosen scenario, on fresh data every time."""

    def __init__(
        self, args: argparse.Namespace, plan: Plan, data: dict[str, DataSet], run_dir: Path
    ) -> None:
        self.args, self.plan, self.data, self.run_dir = args, plan, data, run_dir
        self.ds = data["small" if args.scenario == "latency" else args.size]
        if args.scenario == "ingest":
            self.label = f"{self.ds.label}, {args.assoc} assoc"
        elif args.scenario == "latency":
            self.label = f"{self.ds.label}, one at a time"
            self.files = latency_files(self.ds, plan.latency_instances)
        else:
            self.label = self.ds.label
        # repair: an archive per build (its own build loads it); cp -r copies the first's.
        self.sites = {
            name: WipedSite(self.ds, run_dir / name, plan.timeout, env=self.env(name))
            for name in args.builds
        }

    def env(self, name: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.args.builds[name])}

    def __call__(self, name: str, rnd: int) -> Sample:
        scenario, timeout = self.args.scenario, self.plan.timeout
        if scenario == "repair":
            site = self.sites[name] if name != CP_SYNC else next(iter(self.sites.values()))
            if name == CP_SYNC:
                return site.cp_sample(rnd, self.run_dir / "cp")
            s = site.repair_sample(rnd)
        elif scenario == "migrate":
            if name == CP_SYNC:
                return migrate_cp_sample(self.ds, self.run_dir / "cp", rnd, timeout)
            migrated = self.run_dir / name / "migrated"
            s = migrate_sample(self.ds, migrated, rnd, timeout, env=self.env(name))
        else:
            return self.on_server(name, rnd)
        s.server = name
        return s

    def on_server(self, name: str, rnd: int) -> Sample:
        srv: Server
        folder = self.run_dir / name
        if name == ORTHANC:
            srv = Orthanc(folder)
        else:
            src, on_pg = self.args.servers[name]
            srv = (BuildPg if on_pg else Build)(folder, name=name, src=src)
        logs, timeout = self.run_dir / "logs", self.plan.timeout
        try:
            srv.start()
            if self.args.scenario == "latency":
                return latency_sample(
                    srv,
                    self.files,
                    self.data["warmup"],
                    self.plan.latency_gap,
                    self.label,
                    rnd,
                    logs,
                    timeout,
                )
            warmup = self.data["warmup"]
            return ingest_sample(
                srv, self.ds, warmup, self.args.assoc, self.label, rnd, logs, timeout
            )
        finally:
            srv.stop()
            srv.wipe()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    code = netns.enter("bench.ab", argv, args.netns)
    if code is not None:
        return code
    stop_on_sigterm()
    plan = PLANS[args.plan]
    results = args.results or args.work / "results"
    run_dir = args.work / "run-ab"
    try:
        for name, src in args.builds.items():
            check_build(name, src)
        data = prepare(plan, args.work)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    measure = Measure(args, plan, data, run_dir)
    reference = COLUMNS[args.scenario][2]
    with_reference = reference == CP_SYNC or args.orthanc
    names = list(args.servers) + ([reference] if with_reference else [])
    what = {"ingest": "ingest", "latency": "C-STORE latency on an idle server"}
    what |= {"repair": "repair of a wiped folder site", "migrate": "migrate folder"}
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m bench.ab", shlex.join(argv)]).strip(),
        "scenario": f"{what[args.scenario]}, {measure.label}",
        "rounds": str(args.rounds),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    trash = scratch.Trash(run_dir / "trash")
    trash.empty()
    scratch.use(trash)
    samples: list[Sample] = []
    metric, unit, digits, _ = COLUMNS[args.scenario][0]
    try:
        for rnd in range(1, args.rounds + 1):
            for name in rotate(names, rnd):
                try:
                    s = measure(name, rnd)
                except BenchError as e:
                    note = str(e).splitlines()[0]
                    s = Sample(args.scenario, measure.label, name, rnd, ok=False, note=note)
                samples.append(s)
                value = s.metrics.get(metric, 0.0)
                flag = "" if s.ok else f"  FAILED: {s.note}"
                shown = f"{value:8,.{digits}f} {unit}"
                print(f"round {rnd} {name:12} {shown}{flag}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for name in args.builds:  # the repair scenario's archives
            scratch.discard(run_dir / name)
        scratch.use(None)
        trash.empty()
    meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info = machine_info(args.work)
    meta["machine"] = ", ".join(f"{k}: {v}" for k, v in list(info.items())[:3])
    md = report(samples, meta, names, args.scenario)
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{meta['date']}-ab.md"
    n = 1
    while out.exists():  # another A/B of the same day: keep it
        n += 1
        out = results / f"{meta['date']}-ab-{n}.md"
    out.write_text(md)
    print(md)
    print(f"results: {out}", file=sys.stderr)
    return 0 if all(s.ok for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
