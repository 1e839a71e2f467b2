"""Where pacsgrid's CPU goes per stored instance: py-spy under the 64x64 ingest.

    python -m bench.profile                 # 1 and 4 associations, full-size 64x64 dataset
    python -m bench.profile --assoc 4 --rate 200
    python -m bench.profile --index postgresql  # the index on a PostgreSQL server of its own

pacsgrid runs as `pacsgrid serve` with its defaults (supervisor + one worker per core);
`py-spy record --subprocesses --nonblocking` samples every process of the tree while DCMTK
storescu sends the 64x64 dataset with 1 and then 4 associations, twice:
- `--gil`: only the thread holding the GIL, i.e. Python code running on a CPU ("cpu" mode);
- default: every thread py-spy does not consider idle; on this machine that includes threads
  blocked in fdatasync, fsync, a SQLite commit or a queue ("threads" mode: where the time of
  an ingest goes, waits included).
Samples / rate = seconds, divided by the instances stored: milliseconds per instance. The
server tree's user and system CPU from /proc during the same ingest are shown beside them.
The collapsed stacks (bench/work/profile/<mode>-<N>assoc.txt: open them with speedscope or
flamegraph.pl) are ranked by area of the ingest path (the innermost frame that belongs to a
known area wins), by source line where the samples land, and by pacsgrid function including
what it calls. Results: bench/results/<date>-profile.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import clients, scratch
from bench.datasets import FULL, SMOKE, Plan, folder_name
from bench.procs import BenchError, Sampler, Usage
from bench.report import machine_info, versions
from bench.servers import Pacsgrid, PacsgridPg
from bench.synth import write

REPO = Path(__file__).resolve().parent.parent

# (area, regex on "file:function" of a frame). Checked from the innermost frame outwards: the
# first frame that matches any rule names the area of the sample.
AREAS: tuple[tuple[str, str], ...] = (
    ("storage: fsync of directories", r"storage/filesystem\.py:_fsync_dir$"),
    ("storage: mkdir of new folders", r"storage/filesystem\.py:_ensure_dir$"),
    ("storage: write the object file", r"storage/filesystem\.py:_write_all$"),
    ("storage: create, fdatasync, link the file", r"storage/filesystem\.py:"),
    ("ingest journal (marker files)", r"pacsgrid/journal\.py:"),
    ("index: commit (group commit)", r"pacsgrid/index/"),
    ("header scan (indexed attributes)", r"dicomfile/header\.py:"),
    ("file meta (Part 10 header)", r"dicomfile/part10\.py:"),
    ("SHA-256 and copy bookkeeping", r"pacsgrid/archive\.py:_write_copies$"),
    ("Archive.ingest / _store (rest)", r"pacsgrid/archive\.py:"),
    ("PDU framing, PDV reassembly", r"dicom/(association|pdu)\.py:"),
    ("DIMSE command encode/decode", r"dicom/dimse\.py:"),
    ("C-STORE handler, response", r"dicom/scp\.py:"),
    ("logging", r"logging/"),
    ("thread pool hand-off (futures, queues, locks)", r"(concurrent/futures|threading|queue)\.py:"),
    ("asyncio event loop and socket I/O", r"(asyncio/|selectors\.py:)"),
    ("imports, start-up", r"(<frozen importlib|importlib/)"),
)

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    func: str
    file: str
    line: int = 0

    @property
    def where(self) -> str:
        return f"{_short(self.file)}:{self.func}"


def _short(path: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3."):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "lib/python3." else tail
    return path


def parse_collapsed(text: str) -> list[tuple[list[Frame], int]]:
    """py-spy's raw output: "root;...;leaf count" per line. Process and thread entries
    (not of the form "func (file:line)") are dropped."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for part in stack.split(";"):
            m = FRAME.match(part)
            if m and m.group("file"):
                frames.append(Frame(m.group("func"), m.group("file"), int(m.group("line") or 0)))
        if frames:
            out.append((frames, int(count)))
    return out


def area_of(frames: list[Frame]) -> str:
    for frame in reversed(frames):
        where = frame.where
        for area, pattern in AREAS:
            if re.search(pattern, where):
                return area
    return "other"


MODES = {
    "cpu": ["--gil"],
    "threads": [],
}
MODE_TITLES = {
    "cpu": "Python CPU (py-spy --gil: the thread holding the GIL)",
    "threads": "Thread time (py-spy default: running or blocked in a call, waits included)",
}


@dataclass
class Profile:
    label: str
    mode: str
    instances: int
    seconds: float
    usage: Usage
    rate: int
    samples: list[tuple[list[Frame], int]]
    index_usage: Usage | None = None  # the PostgreSQL server's tree, when it has one

    @property
    def total(self) -> int:
        return sum(n for _, n in self.samples) or 1

    def ms_per_instance(self, count: int) -> float:
        return count / self.rate * 1000 / self.instances

    def by_area(self) -> Counter[str]:
        c: Counter[str] = Counter()
        for frames, n in self.samples:
            c[area_of(frames)] += n
        return c

    def by_line(self) -> Counter[tuple[str, int]]:
        c: Counter[tuple[str, int]] = Counter()
        for frames, n in self.samples:
            c[(frames[-1].where, frames[-1].line)] += n
        return c

    def by_pacsgrid_inclusive(self) -> Counter[str]:
        c: Counter[str] = Counter()
        for frames, n in self.samples:
            for where in {f.where for f in frames if f.where.startswith("pacsgrid/")}:
                c[where] += n
        return c


def record(
    work: Path,
    files: tuple[Path, ...],
    warmup: tuple[Path, ...],
    assoc: int,
    rate: int,
    py_spy: str,
    mode: str,
    index: str = "sqlite",
) -> Profile:
    kind = PacsgridPg if index == "postgresql" else Pacsgrid
    srv = kind(work / f"server-{mode}-{assoc}")
    out = work / f"{mode}-{assoc}assoc.txt"
    srv.start()
    try:
        # Warm-up as in bench.run, before py-spy attaches: the workers' first associations
        # pay lazy imports, which are not the steady state this profile is about.
        srv.warm_up(warmup, work / "logs")
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(srv.pid), "--subprocesses", "--nonblocking"]
            + MODES[mode]
            + ["--rate", str(rate), "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(2.0)  # attached to every process before the first store
        if spy.poll() is not None:
            err = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
            raise BenchError(f"py-spy could not attach: {err.strip()[-500:]}")
        index_pid = srv.index_server_pid()
        sampler_of_index = Sampler(index_pid) if index_pid else None
        with Sampler(srv.pid) as sampler, sampler_of_index or contextlib.nullcontext():
            run = clients.storescu(srv.port, srv.ae_title, files, assoc, work / "logs", 900)
        usage = sampler.usage()
        index_cpu = sampler_of_index.usage() if sampler_of_index else None
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
        stored = srv.count()
    finally:
        srv.stop()
        srv.wipe()
    if not run.ok or stored != len(files) + len(warmup):
        raise BenchError(f"ingest under the profiler: {stored} of {len(files)} stored")
    if not out.exists():
        raise BenchError("py-spy wrote no profile")
    samples = parse_collapsed(out.read_text())
    label = f"64x64, {assoc} assoc" + (", PostgreSQL index" if index == "postgresql" else "")
    return Profile(label, mode, len(files), run.seconds, usage, rate, samples, index_cpu)


def source(where: str, line: int) -> str:
    """The source text of a sampled line (py-spy names files relative to sys.path)."""
    rel = where.rsplit(":", 1)[0]
    for base in sys.path:
        path = Path(base or ".", rel)
        if path.is_file():
            return linecache.getline(str(path), line).strip()
    return ""


def render(profiles: list[Profile], meta: dict[str, object], top: int = 15) -> str:
    lines = [
        f"# Where pacsgrid's ingest time goes: {meta['date']}",
        "",
        "py-spy (`record --subprocesses --nonblocking --rate "
        f"{meta['rate']}`) on `pacsgrid serve` (default workers) while DCMTK storescu "
        "(TCP_NODELAY=1) sends the 64x64 benchmark dataset, in two modes: **cpu** "
        "(`--gil`: Python code running) and **threads** (py-spy's default: every thread it "
        "does not consider idle, which on this machine includes threads blocked in fdatasync, "
        "fsync, a SQLite commit or a queue). ms per instance = samples / rate / instances "
        "stored. User and system CPU of the server's process tree come from /proc during the "
        "same ingest. Produced by `make profile` (bench/profile.py); collapsed stacks in "
        "bench/work/profile/.",
        "",
        f"Load average at the start: {meta['loadavg']} (2 cores: other work on the machine "
        "inflates wall time, and CPU per instance too, though less).",
        "",
        "| run | mode | wall s | instances/s | user CPU ms/instance | system CPU ms/instance "
        "| sampled ms/instance | index server CPU ms/instance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        lines.append(
            f"| {p.label} | {p.mode} | {p.seconds:.1f} | {p.instances / p.seconds:.0f} | "
            f"{p.usage.user_seconds * 1000 / p.instances:.2f} | "
            f"{p.usage.system_seconds * 1000 / p.instances:.2f} | "
            f"{p.ms_per_instance(p.total):.2f} | "
            + (
                f"{p.index_usage.cpu_seconds * 1000 / p.instances:.2f} |"
                if p.index_usage
                else "- |"
            )
        )
    for mode in MODES:
        group = [p for p in profiles if p.mode == mode]
        if not group:
            continue
        lines += ["", f"## {MODE_TITLES[mode]}: by area, ms per instance", ""]
        lines += _area_table(group)
        for p in group:
            lines += ["", f"### {mode}, {p.label}: source lines (top {top})", ""]
            lines += ["| line | code | ms per instance | share |", "|---|---|---|---|"]
            for (where, line), n in p.by_line().most_common(top):
                code = source(where, line).replace("|", "\\|")
                lines.append(
                    f"| `{where}:{line}` | `{code}` | {p.ms_per_instance(n):.3f} | "
                    f"{100 * n / p.total:.1f}% |"
                )
            lines += ["", f"### {mode}, {p.label}: pacsgrid functions with callees (top {top})"]
            lines += ["", "| function | ms per instance | share |", "|---|---|---|"]
            for where, n in p.by_pacsgrid_inclusive().most_common(top):
                lines.append(
                    f"| `{where}` | {p.ms_per_instance(n):.3f} | {100 * n / p.total:.1f}% |"
                )
    lines += ["", "## Machine and versions", ""]
    for k in ("machine", "versions"):
        v = meta.get(k)
        if isinstance(v, dict):
            lines += [f"- {kk}: {vv}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def _area_table(group: list[Profile]) -> list[str]:
    per = [p.by_area() for p in group]
    areas = {a for c in per for a in c}
    order = sorted(
        areas,
        key=lambda a: -max(p.ms_per_instance(c[a]) for p, c in zip(group, per, strict=True)),
    )
    out = ["| area | " + " | ".join(p.label for p in group) + " |"]
    out.append("|---|" + "---|" * len(group))
    for a in order:
        cells = [
            f"{p.ms_per_instance(c[a]):.3f} ({100 * c[a] / p.total:.0f}%)"
            for p, c in zip(group, per, strict=True)
        ]
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--assoc", default="1,4", help="association counts (default 1,4)")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--plan", choices=("full", "smoke"), default="full")
    ap.add_argument(
        "--index",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="where the index lives (postgresql: a server of its own, fsync on)",
    )
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    py_spy = shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if py_spy is None:
        print(
            "bench: py-spy not found: pip install py-spy (scripts/bench installs it)",
            file=sys.stderr,
        )
        return 2
    plan = FULL if args.plan == "full" else SMOKE
    trash = scratch.Trash(args.work / "profile-trash")  # see bench/scratch.py
    scratch.use(trash)
    try:
        return _profile(args, plan, py_spy)
    finally:
        scratch.use(None)
        trash.empty()


def _profile(args: argparse.Namespace, plan: Plan, py_spy: str) -> int:
    work = args.work / "profile"
    scratch.discard(work)  # the previous profile's stacks
    work.mkdir(parents=True)
    files = tuple(write(plan.small, args.work / "data" / folder_name(plan.small)))
    warmup = tuple(write(plan.warmup, args.work / "data" / folder_name(plan.warmup)))
    meta: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "rate": args.rate,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    profiles = []
    try:
        for mode in MODES:
            for n in [int(x) for x in args.assoc.split(",") if x.strip()]:
                p = record(work, files, warmup, n, args.rate, py_spy, mode, args.index)
                print(
                    f"{mode} {p.label}: {p.instances / p.seconds:.0f} instances/s, "
                    f"{p.usage.cpu_seconds * 1000 / p.instances:.2f} ms CPU per instance, "
                    f"{p.total} samples",
                    file=sys.stderr,
                )
                profiles.append(p)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    meta["machine"] = machine_info(args.work)
    meta["versions"] = versions(sys.executable)
    name = str(meta["date"]) if plan.name == "full" else f"{meta['date']}-{plan.name}"
    if args.index == "postgresql":
        name += "-pg"
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{name}-profile.md"
    out.write_text(render(profiles, meta))
    print(f"profile: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
