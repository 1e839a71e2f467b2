"""A/B: builds of pacsgrid against each other and Orthanc, on one ingest scenario.

    python -m bench.ab --build shipped=src --build candidate=/tmp/wt/src
    python -m bench.ab --build a=src --build b=/tmp/wt/src --no-orthanc --size large --assoc 1

A change meant to make ingest faster is worth keeping only if it beats the code it replaces by
more than one round differs from the next on this machine (up to a third). So the builds (and
Orthanc) are measured in the same run, alternating, every round in a rotated order, each
measurement on a fresh, empty server, nothing deleted until the run ends, exactly as
`bench.run` measures ingest (same datasets, same warm-up, same storescu clients, same checks).

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
from bench.datasets import PLANS, prepare
from bench.procs import BenchError, stop_on_sigterm
from bench.report import machine_info
from bench.run import REPO, ingest_sample, rotate
from bench.samples import Sample
from bench.servers import Orthanc, Pacsgrid, Server

ORTHANC = "Orthanc"


@dataclass
class Build(Pacsgrid):
    """pacsgrid run from another source folder (first on PYTHONPATH)."""

    src: Path = Path()

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.src)}


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
    ap.add_argument("--orthanc", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--size", choices=("small", "large"), default="small", help="64x64 or 512x512")
    ap.add_argument("--assoc", type=int, default=4, help="concurrent associations (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--plan", choices=sorted(PLANS), default="full", help="dataset sizes")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work", help="cache and scratch")
    ap.add_argument("--results", type=Path, help="folder of the results file")
    ap.add_argument("--netns", choices=("auto", "on", "off"), default="auto")
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
    return args


def report(samples: list[Sample], meta: dict[str, str], names: list[str]) -> str:
    """Markdown: per contender, median rate and CPU over rounds, ratios to the first build
    and to Orthanc. A failed measurement (a wrong count) is shown and spoils its contender."""
    by: dict[str, list[Sample]] = {n: [] for n in names}
    for s in samples:
        by[s.server].append(s)

    def median(name: str, metric: str) -> float:
        values = [s.metrics[metric] for s in by[name] if s.ok]
        return statistics.median(values) if values else float("nan")

    first = names[0]
    lines = [
        f"# pacsgrid A/B: {meta['date']}",
        "",
        f"Command: `{meta['command']}`. {meta['scenario']}, {meta['rounds']} rounds, "
        "alternating (each round rotates the order), a fresh empty server per measurement, "
        "nothing deleted until the run ended. Load average before / after: "
        f"{meta['loadavg_before']} / {meta['loadavg_after']}. {meta['machine']}.",
        "",
        f"| contender | instances/s, median (rounds) | server CPU ms/instance | vs {first} "
        f"| vs {ORTHANC} |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        rates = [s.metrics["instances_per_s"] for s in by[n] if s.ok]
        rounds = ", ".join(f"{r:,.0f}" for r in rates)
        rate = median(n, "instances_per_s")
        vs_first = f"{rate / median(first, 'instances_per_s'):.2f}x"
        vs_orthanc = f"{rate / median(ORTHANC, 'instances_per_s'):.2f}x" if ORTHANC in names else ""
        cpu = median(n, "cpu_s_per_1000")
        lines.append(f"| {n} | {rate:,.0f} ({rounds}) | {cpu:.2f} | {vs_first} | {vs_orthanc} |")
    bad = [f"{s.server} round {s.round}: {s.note}" for s in samples if not s.ok]
    lines += [
        "",
        "Failed checks: " + ("; ".join(bad) if bad else "none (every stored count exact)."),
    ]
    return "\n".join(lines) + "\n"


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
    ds = data[args.size]
    scenario = f"{ds.label}, {args.assoc} assoc"
    names = list(args.builds) + ([ORTHANC] if args.orthanc else [])
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m bench.ab", shlex.join(argv)]).strip(),
        "scenario": scenario,
        "rounds": str(args.rounds),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    trash = scratch.Trash(run_dir / "trash")
    trash.empty()
    scratch.use(trash)
    samples: list[Sample] = []
    try:
        for rnd in range(1, args.rounds + 1):
            for name in rotate(names, rnd):
                srv: Server
                folder = run_dir / name
                if name == ORTHANC:
                    srv = Orthanc(folder)
                else:
                    srv = Build(folder, name=name, src=args.builds[name])
                try:
                    srv.start()
                    s = ingest_sample(
                        srv,
                        ds,
                        data["warmup"],
                        args.assoc,
                        scenario,
                        rnd,
                        run_dir / "logs",
                        plan.timeout,
                    )
                except BenchError as e:
                    s = Sample("ingest", scenario, name, rnd, ok=False, note=str(e).splitlines()[0])
                finally:
                    srv.stop()
                    srv.wipe()
                samples.append(s)
                rate = s.metrics.get("instances_per_s", 0.0)
                flag = "" if s.ok else f"  FAILED: {s.note}"
                print(f"round {rnd} {name:12} {rate:8,.0f} instances/s{flag}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        scratch.use(None)
        trash.empty()
    meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info = machine_info(args.work)
    meta["machine"] = ", ".join(f"{k}: {v}" for k, v in list(info.items())[:3])
    md = report(samples, meta, names)
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
