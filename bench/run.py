"""Benchmark pacsgrid against Orthanc and DCMTK storescp in one run.

    python -m bench.run                  # the full run: 3 rounds, results in bench/results/
    python -m bench.run --resume         # continue an interrupted run
    python -m bench.run --plan smoke     # seconds: checks the harness, numbers mean nothing

`make bench` (or scripts/bench) installs what is needed first, then runs this.

Order of a run: the datasets are generated (cached under bench/work/data); then, per round,
the disk ceiling, every ingest scenario with the servers in rotated order (each scenario on a
fresh, empty server), the latency of one C-STORE on an idle server (same), then the repair of
a wiped folder site and `pacsgrid migrate folder`, each against `cp -r` + `sync` of the same
files in an order that alternates (bench.durability); then pacsgrid and Orthanc are loaded
with the query and retrieve datasets and, per round, every C-FIND kind and C-MOVE/C-GET, again
in rotated order. `--phases` picks some of disk, ingest, latency, repair, migrate, find,
retrieve. Every measurement is appended to a journal as it completes, so an interrupted run
continues with --resume, and is checked for correctness (counts, answers, every copy); speed
is only reported.

When run as root, the whole benchmark runs in a private network namespace (`unshare --net`)
whose only interface is its own loopback: Orthanc 1.10 and DCMTK 3.6.7 storescp cannot choose
the address they listen on, and there they can only be reached from this benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from bench import clients, disk, netns, scratch
from bench.datasets import FIND_KINDS, PLANS, DataSet, FindQuery, Plan, find_queries, prepare
from bench.durability import (
    AGAINST_CP,
    PACSGRID,
    WipedSite,
    latency_files,
    latency_sample,
    migrate_cp_sample,
    migrate_sample,
)
from bench.goals import goal_status, previous_results
from bench.procs import BenchError, Sampler, stop_on_sigterm
from bench.report import machine_info, render, versions
from bench.samples import CP_SYNC, Sample, Table, percentile
from bench.servers import (
    DEST_AE,
    FIND_AE,
    GET_AE,
    MOVE_AE,
    Destination,
    Orthanc,
    Pacsgrid,
    PacsgridPg,
    Server,
    StoreScp,
)
from bench.synth import StudyInfo, studies
from pacsgrid.progress import Progress

REPO = Path(__file__).resolve().parent.parent
# pacsgrid-pg: pacsgrid with its index on a PostgreSQL server of its own (fsync on).
KINDS = ("pacsgrid", "pacsgrid-pg", "orthanc", "storescp")
PHASES = ("disk", "ingest", "latency", "repair", "migrate", "find", "retrieve")  # run in this order


def rotate(items: list[str], n: int) -> list[str]:
    """The servers in round `n`'s order: every server takes every position in turn."""
    if not items:
        return items
    k = n % len(items)
    return items[k:] + items[:k]


class Journal:
    """Samples of one run, appended as they are measured (JSON lines; the first line is the
    run's configuration, so --resume never mixes two different runs)."""

    def __init__(self, path: Path, config: dict[str, object], resume: bool) -> None:
        self.path = path
        self.samples: dict[tuple[str, str, str, int], Sample] = {}
        header = json.dumps(config, sort_keys=True)
        if resume and path.exists():
            lines = path.read_text().splitlines()
            if lines and lines[0] == header:
                for line in lines[1:]:
                    with contextlib.suppress(ValueError, TypeError):
                        s = Sample.from_json(line)
                        self.samples[s.key] = s
                return
            print(
                "bench: the journal is of another configuration; starting afresh", file=sys.stderr
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + "\n")

    def done(self, key: tuple[str, str, str, int]) -> bool:
        return key in self.samples

    def add(self, s: Sample) -> None:
        self.samples[s.key] = s
        with open(self.path, "a") as fh:
            fh.write(s.to_json() + "\n")


class Runner:
    def __init__(self, args: argparse.Namespace, plan: Plan, data: dict[str, DataSet]) -> None:
        self.args = args
        self.plan = plan
        self.data = data
        self.work: Path = args.work
        self.run_dir = self.work / f"run-{plan.name}"
        self.kinds: list[str] = args.servers
        config = {
            "plan": plan.name,
            "rounds": args.rounds,
            "servers": self.kinds,
            "phases": args.phases,
            "pacsgrid_workers": args.pacsgrid_workers,
        }
        self.journal = Journal(self.run_dir / "journal.jsonl", config, args.resume)
        self.started: list[Server] = []
        self.wiped: dict[str, WipedSite] = {}  # the repair phase's archives, by dataset
        self.progress = Progress("bench", self.total(), unit="measurements", interval=10.0)

    def total(self) -> int:
        r = self.args.rounds
        n = 0
        if "disk" in self.args.phases:
            n += 4 * r
        if "ingest" in self.args.phases:
            n += 4 * r * len(self.kinds)
        qr = [k for k in self.kinds if k != "storescp"]
        if "find" in self.args.phases:
            n += len(FIND_KINDS) * r * len(qr)
        if "retrieve" in self.args.phases:
            n += 2 * r * len(qr)
        if "pacsgrid" in self.kinds:
            for phase in ("repair", "migrate"):
                if phase in self.args.phases:
                    n += len(AGAINST_CP) * r * len(self.plan.copy_sets)
        if "latency" in self.args.phases:
            n += r * len(self.kinds)
        return n

    # ------------------------------------------------------------------ plumbing
    def server(
        self, kind: str, folder: Path, peers: dict[str, Destination] | None = None
    ) -> Server:
        srv: Server
        if kind == "pacsgrid":
            srv = Pacsgrid(folder, peers=peers or {}, workers=self.args.pacsgrid_workers)
        elif kind == "pacsgrid-pg":
            srv = PacsgridPg(folder, peers=peers or {}, workers=self.args.pacsgrid_workers)
        elif kind == "orthanc":
            srv = Orthanc(folder, peers=peers or {})
        else:
            srv = StoreScp(folder)
        return srv

    @contextlib.contextmanager
    def running(self, srv: Server, fresh: bool = True) -> Iterator[Server]:
        srv.start(fresh=fresh)
        self.started.append(srv)
        try:
            yield srv
        finally:
            srv.stop()
            self.started.remove(srv)

    def stop_all(self) -> None:
        for srv in list(self.started):
            srv.stop()
        self.started.clear()

    def measure(
        self, phase: str, scenario: str, server: str, rnd: int, fn: Callable[[], Sample]
    ) -> None:
        key = (phase, scenario, server, rnd)
        if self.journal.done(key):
            self.progress.advance("resumed")
            return
        try:
            s = fn()
        except BenchError as e:
            s = Sample(phase, scenario, server, rnd, ok=False, note=str(e).splitlines()[0])
        self.journal.add(s)
        self.progress.advance("ok" if s.ok else "FAILED")
        shown = ", ".join(f"{k} {v:,.2f}" for k, v in s.metrics.items())
        flag = "" if s.ok else f"  FAILED: {s.note}"
        print(f"round {rnd} {phase:8} {scenario:22} {server:9} {shown}{flag}", file=sys.stderr)

    # ------------------------------------------------------------------ disk + ingest
    def disk_round(self, rnd: int) -> None:
        scratch_dir = self.run_dir / "disk"
        for name in ("small", "large"):
            ds = self.data[name]

            def cp(ds: DataSet = ds, dst: Path = scratch_dir) -> Sample:
                sec = disk.cp_r([ds.root], dst, self.plan.timeout)
                return _rates("disk", f"{ds.label} cp -r", "disk", rnd, ds, sec)

            def fsync(ds: DataSet = ds, dst: Path = scratch_dir) -> Sample:
                sec = disk.write_fsync(ds.files, dst)
                return _rates("disk", f"{ds.label} write+fsync", "disk", rnd, ds, sec)

            self.measure("disk", f"{ds.label} cp -r", "disk", rnd, cp)
            self.measure("disk", f"{ds.label} write+fsync", "disk", rnd, fsync)

    def ingest_round(self, rnd: int) -> None:
        scenarios = [(name, n) for name in ("small", "large") for n in (1, 4)]
        logs, timeout = self.run_dir / "logs", self.plan.timeout
        for i, (name, assoc) in enumerate(scenarios):
            ds = self.data[name]
            scenario = f"{ds.label}, {assoc} assoc"
            for kind in rotate(self.kinds, rnd + i):
                srv = self.server(kind, self.run_dir / f"ingest-{kind}")
                ingest = partial(
                    ingest_sample,
                    ds=ds,
                    warmup=self.data["warmup"],
                    assoc=assoc,
                    scenario=scenario,
                    rnd=rnd,
                    logs=logs,
                    timeout=timeout,
                )
                self.measure("ingest", scenario, srv.name, rnd, partial(self.fresh, srv, ingest))

    def fresh(self, srv: Server, measure: Callable[[Server], Sample]) -> Sample:
        """`measure` on `srv` started fresh and empty; its folder discarded afterwards."""
        try:
            with self.running(srv):
                return measure(srv)
        finally:
            srv.wipe()

    # ------------------------------------------------------------------ durability
    def repair_round(self, rnd: int) -> None:
        """Each copy dataset: a wiped site repaired, and cp -r + sync of the same files, in
        an order that alternates from round to round (bench.durability)."""
        for i, name in enumerate(self.plan.copy_sets):
            if name not in self.wiped:
                self.wiped[name] = WipedSite(
                    self.data[name], self.run_dir, self.plan.timeout, reuse=self.args.resume
                )
            site = self.wiped[name]
            measures = {
                PACSGRID: partial(site.repair_sample, rnd),
                CP_SYNC: partial(site.cp_sample, rnd, self.run_dir / "repair-cp"),
            }
            for who in rotate(list(measures), rnd + i):
                self.measure("repair", site.ds.label, who, rnd, measures[who])

    def migrate_round(self, rnd: int) -> None:
        """Each copy dataset's tree: `pacsgrid migrate folder`, and cp -r + sync of it."""
        for i, name in enumerate(self.plan.copy_sets):
            ds, timeout = self.data[name], self.plan.timeout
            measures = {
                PACSGRID: partial(migrate_sample, ds, self.run_dir / "migrated", rnd, timeout),
                CP_SYNC: partial(migrate_cp_sample, ds, self.run_dir / "migrate-cp", rnd, timeout),
            }
            for who in rotate(list(measures), rnd + i):
                self.measure("migrate", ds.label, who, rnd, measures[who])

    def latency_round(self, rnd: int) -> None:
        """One C-STORE at a time to each server, fresh and empty, in rotated order."""
        ds = self.data["small"]
        scenario = f"{ds.label}, one at a time"
        latency = partial(
            latency_sample,
            files=latency_files(ds, self.plan.latency_instances),
            warmup=self.data["warmup"],
            gap=self.plan.latency_gap,
            scenario=scenario,
            rnd=rnd,
            logs=self.run_dir / "logs",
            timeout=self.plan.timeout,
        )
        for kind in rotate(self.kinds, rnd):
            srv = self.server(kind, self.run_dir / f"latency-{kind}")
            self.measure("latency", scenario, srv.name, rnd, partial(self.fresh, srv, latency))

    # ------------------------------------------------------------------ query + retrieve
    def qr_servers(self) -> list[tuple[Server, StoreScp]]:
        """pacsgrid and Orthanc loaded with the query and retrieve datasets, each with its own
        storescp as C-MOVE destination. Reused by --resume when the count is right."""
        out = []
        files = self.data["query"].files + self.data["retrieve"].files
        for kind in [k for k in self.kinds if k != "storescp"]:
            dest = StoreScp(self.run_dir / f"qr-{kind}-destination", fork=False)
            self._start(dest)
            peers = {ae: Destination(ae, 9) for ae in (FIND_AE, MOVE_AE, GET_AE)} | {
                DEST_AE: Destination(DEST_AE, dest.port)
            }
            srv = self.server(kind, self.run_dir / f"qr-{kind}", peers)
            reuse = self.args.resume and srv.folder.exists()
            self._start(srv, fresh=not reuse)
            if reuse and srv.count() == len(files):
                print(f"bench: reusing the loaded {srv.name} archive", file=sys.stderr)
            else:
                if reuse:
                    srv.stop()
                    self._start(srv, fresh=True)
                run = clients.storescu(
                    srv.port, srv.ae_title, files, 4, self.run_dir / "logs" / f"{srv.name}-load",
                    self.plan.timeout * 4,
                )  # fmt: skip
                stored = srv.count()
                print(
                    f"bench: loaded {srv.name} with {stored} instances in {run.seconds:.1f}s",
                    file=sys.stderr,
                )
                if stored != len(files) or not run.ok:
                    raise BenchError(
                        f"loading {srv.name}: {stored} of {len(files)} stored. {run.failures()}"
                    )
                self.journal.add(
                    Sample(
                        "load",
                        "query archive",
                        srv.name,
                        0,
                        {"stored": stored, "instances_per_s": stored / run.seconds},
                    )
                )
            out.append((srv, dest))
        return out

    def _start(self, srv: Server, fresh: bool = True) -> None:
        srv.start(fresh=fresh)
        self.started.append(srv)

    def find_round(self, rnd: int, loaded: list[tuple[Server, StoreScp]]) -> None:
        queries = find_queries(self.plan.query, self.plan.queries, also=(self.plan.retrieve,))
        for i, kind in enumerate(FIND_KINDS):
            by_name = {srv.name: srv for srv, _ in loaded}
            for name in rotate(list(by_name), rnd + i):
                srv = by_name[name]
                self.measure(
                    "find",
                    kind,
                    name,
                    rnd,
                    functools.partial(self._find, srv, kind, queries[kind], rnd),
                )

    def _find(self, srv: Server, kind: str, queries: list[FindQuery], rnd: int) -> Sample:
        with Sampler(srv.pid) as sampler:
            run = clients.find_batch(srv.port, srv.ae_title, [q.keys for q in queries])
        usage = sampler.usage()
        wrong = 0
        first_wrong = ""
        for q, got, status in zip(queries, run.answers, run.statuses, strict=True):
            if status != 0 or len(got) != len(set(got)) or set(got) != q.expected:
                wrong += 1
                first_wrong = first_wrong or (
                    f"{q.keys}: status 0x{status:04X}, {len(got)} responses "
                    f"({len(set(got))} studies), {len(q.expected)} studies expected"
                )
        ms = [x * 1000 for x in run.latencies]

        s = Sample(
            "find",
            kind,
            srv.name,
            rnd,
            {
                "p50_ms": percentile(ms, 0.5),
                "p95_ms": percentile(ms, 0.95),
                "cpu_ms_per_query": usage.cpu_seconds * 1000 / run.sent,
                "responses_per_query": sum(len(a) for a in run.answers) / len(queries),
                "queries": len(queries),
                "wrong_answers": wrong,
            },
        )
        s.ok, s.note = wrong == 0, first_wrong
        return s

    def retrieve_round(self, rnd: int, loaded: list[tuple[Server, StoreScp]]) -> None:
        ds = self.data["retrieve"]
        study = sorted({s.study_uid for s in _studies(ds)})[0]
        by_name = {srv.name: (srv, dest) for srv, dest in loaded}
        for i, op in enumerate(("C-MOVE", "C-GET")):
            for name in rotate(list(by_name), rnd + i):
                srv, dest = by_name[name]
                self.measure(
                    "retrieve",
                    op,
                    name,
                    rnd,
                    functools.partial(self._retrieve, srv, dest, op, ds, study, rnd),
                )

    def _retrieve(
        self, srv: Server, dest: StoreScp, op: str, ds: DataSet, study: str, rnd: int
    ) -> Sample:
        """The median of `plan.retrieve_repeats` retrieves of the study; CPU over all of them.
        Every retrieve must deliver every instance."""
        n = len(ds.files)
        repeats = self.plan.retrieve_repeats
        out = self.run_dir / "get-out"
        seconds: list[float] = []
        problems: list[str] = []
        cpu = 0.0
        got = 0
        for _ in range(repeats):
            scratch.discard(out)
            dest.clear()
            os.sync()
            with Sampler(srv.pid) as sampler:
                if op == "C-MOVE":
                    run = clients.movescu(
                        srv.port, srv.ae_title, dest.ae_title, study, self.plan.timeout
                    )
                else:
                    run = clients.getscu(srv.port, srv.ae_title, study, out, self.plan.timeout)
            cpu += sampler.usage().cpu_seconds
            got = dest.count() if op == "C-MOVE" else sum(1 for p in out.iterdir() if p.is_file())
            seconds.append(run.seconds)
            if run.returncode != 0:
                tail = " | ".join(run.output.strip().splitlines()[-3:])
                problems.append(f"{op} client exited {run.returncode}: {tail}")
            if got != n:
                problems.append(f"{got} of {n} instances arrived")
            if problems:
                break
        s = _rates("retrieve", op, srv.name, rnd, ds, statistics.median(seconds))
        s.metrics.update(
            cpu_s_per_1000=cpu / (n * len(seconds)) * 1000,
            received=got,
            expected=n,
            repeats=len(seconds),
        )
        s.ok, s.note = not problems, "; ".join(problems)
        scratch.discard(out)
        dest.clear()
        return s


def ingest_sample(
    srv: Server,
    ds: DataSet,
    warmup: DataSet,
    assoc: int,
    scenario: str,
    rnd: int,
    logs: Path,
    timeout: float,
) -> Sample:
    """One ingest measurement on a running, empty server: warm-up (not timed), then `ds` sent
    by `assoc` storescu processes; rates, the server's CPU and peak RSS, the stored count."""
    warm = warmup.files
    srv.warm_up(warm, logs / "warmup")
    os.sync()  # no dirty pages of the previous measurement
    index_pid = srv.index_server_pid()
    with (
        Sampler(srv.pid) as sampler,
        Sampler(index_pid) if index_pid else contextlib.nullcontext() as index_sampler,
    ):
        run = clients.storescu(
            srv.port, srv.ae_title, ds.files, assoc, logs / f"{srv.name}-ingest", timeout
        )
        time.sleep(0.05)  # forked storescp children exit after the association
    usage = sampler.usage()
    stored = srv.count()
    n = len(ds.files)
    sent = n + len(warm)
    s = _rates("ingest", scenario, srv.name, rnd, ds, run.seconds)
    s.metrics.update(
        cpu_s_per_1000=usage.cpu_seconds / n * 1000,
        peak_rss_mb=usage.peak_rss / 1e6,
        stored=stored,
        expected=sent,
    )
    if index_sampler is not None:  # the index's own server (PostgreSQL)
        s.metrics["db_cpu_s_per_1000"] = index_sampler.usage().cpu_seconds / n * 1000
    problems = []
    if not run.ok:
        problems.append(run.failures())
    if stored != sent:
        problems.append(
            f"the server holds {stored} instances, {sent} were sent ({len(warm)} warm-up)"
        )
    s.ok, s.note = not problems, "; ".join(problems)
    return s


def _studies(ds: DataSet) -> Iterator[StudyInfo]:
    return studies(ds.spec)


def _rates(phase: str, scenario: str, server: str, rnd: int, ds: DataSet, sec: float) -> Sample:
    n = len(ds.files)
    return Sample(
        phase,
        scenario,
        server,
        rnd,
        {"seconds": sec, "instances_per_s": n / sec, "mb_per_s": ds.bytes / 1e6 / sec},
    )


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0] if __doc__ else None
    )
    ap.add_argument("--plan", choices=sorted(PLANS), default="full", help="dataset sizes")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument(
        "--servers",
        default=",".join(KINDS),
        help=f"comma-separated subset of {','.join(KINDS)}",
    )
    ap.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work", help="cache and scratch")
    ap.add_argument(
        "--results",
        type=Path,
        help="folder of the results file (default bench/results; bench/work/results for "
        "plans other than full, whose numbers are not worth keeping)",
    )
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run")
    ap.add_argument(
        "--pacsgrid-workers", type=int, default=0, help="pacsgrid worker processes (0: default)"
    )
    ap.add_argument(
        "--netns",
        choices=("auto", "on", "off"),
        default="auto",
        help="run in a private network namespace (auto: when root and possible)",
    )
    args = ap.parse_args(argv)
    args.servers = [s.strip().lower() for s in args.servers.split(",") if s.strip()]
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [s for s in args.servers if s not in KINDS] + [p for p in args.phases if p not in PHASES]
    if bad or args.rounds < 1:
        ap.error(f"unknown server or phase: {', '.join(bad)}" if bad else "--rounds must be >= 1")
    args.servers = [k for k in KINDS if k in args.servers]  # fixed order before rotation
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    code = netns.enter("bench.run", argv, args.netns)
    if code is not None:
        return code
    stop_on_sigterm()
    plan = PLANS[args.plan]
    if args.results is None:
        full = plan.name == "full"
        args.results = REPO / "bench" / "results" if full else args.work / "results"
    args.work.mkdir(parents=True, exist_ok=True)
    meta: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "plan": plan.name,
        "rounds": args.rounds,
        "command": " ".join(["python -m bench.run", shlex.join(argv)]).strip(),
        "network namespace": netns.inside(),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    try:
        data = prepare(plan, args.work)
        runner = Runner(args, plan, data)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    trash = scratch.Trash(runner.run_dir / "trash")
    trash.empty()  # a previous run's, if it was killed: before anything is timed
    scratch.use(trash)
    interrupted = False
    try:
        with runner.progress:
            for rnd in range(1, args.rounds + 1):
                if "disk" in args.phases:
                    runner.disk_round(rnd)
                if "ingest" in args.phases:
                    runner.ingest_round(rnd)
                if "latency" in args.phases:
                    runner.latency_round(rnd)
                if "pacsgrid" in args.servers:
                    if "repair" in args.phases:
                        runner.repair_round(rnd)
                    if "migrate" in args.phases:
                        runner.migrate_round(rnd)
            if {"find", "retrieve"} & set(args.phases) and any(
                k != "storescp" for k in args.servers
            ):
                loaded = runner.qr_servers()
                for rnd in range(1, args.rounds + 1):
                    if "find" in args.phases:
                        runner.find_round(rnd, loaded)
                for rnd in range(1, args.rounds + 1):
                    if "retrieve" in args.phases:
                        runner.retrieve_round(rnd, loaded)
    except KeyboardInterrupt:
        interrupted = True
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        runner.stop_all()
        print("bench: run again with --resume to continue", file=sys.stderr)
        return 1
    finally:
        runner.stop_all()
        scratch.use(None)
        meta["scratch deleted during the run"] = trash.deleted_at_once
        trash.empty()
    if interrupted:
        print("bench: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130
    meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["machine"] = machine_info(args.work)
    meta["versions"] = versions(sys.executable)
    samples = list(runner.journal.samples.values())
    name = meta["date"] if plan.name == "full" else f"{meta['date']}-{plan.name}"
    args.results.mkdir(parents=True, exist_ok=True)
    previous = previous_results(args.results, plan.name)  # before this run's file replaces it
    md = args.results / f"{name}.md"
    md.write_text(render(samples, meta, previous))
    (args.results / f"{name}.json").write_text(
        json.dumps({"meta": meta, "samples": [json.loads(s.to_json()) for s in samples]}, indent=1)
    )
    table = Table(samples)
    for o in goal_status(table, previous):
        ratio = f" ({o.ratio:.2f}x)" if o.ratio is not None else ""
        print(f"  {o.status:13} {o.goal.label}{ratio}")
    print(f"results: {md}")
    if table.failed:
        print(f"bench: {len(table.failed)} measurement(s) failed their checks (see {md})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
