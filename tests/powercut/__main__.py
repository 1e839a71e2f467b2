"""The long power-cut run (make powercut ARGS="--cuts 1000 --seed 7"), and re-checking one cut.

    python -m tests.powercut --cuts 300 --seed 7           record once, check 300 cut points
    python -m tests.powercut --skip-flush --cuts 40        the same on a build that skips a flush
    python -m tests.powercut --recording DIR --seed 7 --cut 1234   one cut again, folder kept

Needs root (it mounts a FUSE filesystem). Prints a line per cut point, then the report; Ctrl-C
or SIGTERM stops after the cut point in progress and still prints the report. Exits 0 only
when no acknowledged instance was lost, nothing half-written was seen and the archive started
on every cut. The work folder (recording and failing cuts) is kept when something failed or
with --keep, so any cut can be checked again from (recording, seed, cut index).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import stop_on_sigterm
from tests.powercut.archive import Recording
from tests.powercut.check import Verdict, check_cut
from tests.powercut.history import History
from tests.powercut.model import Model
from tests.powercut.mount import fuse_available
from tests.powercut.run import SKIP_FLUSH, check, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.powercut", description=__doc__)
    ap.add_argument("--cuts", type=int, default=300, help="cut points to check (default 300)")
    ap.add_argument(
        "--seed",
        type=int,
        default=7,
        help="seed of the cut points and of what each cut keeps (default 7)",
    )
    ap.add_argument("--senders", type=int, default=3, help="concurrent associations (3)")
    ap.add_argument("--per-sender", type=int, default=24, help="instances each sends (24)")
    ap.add_argument("--work", type=Path, help="work folder (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder and every cut")
    ap.add_argument(
        "--skip-flush",
        choices=sorted(SKIP_FLUSH),
        help="run a build that skips one flush: the site log's (log) or a series folder's "
        "(folder); the run must then report losses",
    )
    ap.add_argument("--recording", type=Path, help="check cuts of an earlier run's work folder")
    ap.add_argument("--cut", type=int, help="with --recording: check this one cut point")
    a = ap.parse_args(argv)
    missing = fuse_available()
    if missing:
        print(f"powercut: {missing}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    env = SKIP_FLUSH[a.skip_flush] if a.skip_flush else None
    seen: list[float] = []

    def progress(v: Verdict, n: int, total: int) -> None:
        seen.append(time.monotonic())
        eta = (seen[-1] - seen[0]) / max(1, len(seen) - 1) * (total - n)
        print(
            f"[{n}/{total}] cut {v.index} ({v.phase}, {v.policy}): {v.acknowledged} "
            f"acknowledged, {len(v.lost)} lost, {len(v.half_written)} half-written, "
            f"{len(v.unindexed)} unindexed{', ' + v.error[:200] if v.error else ''}"
            f"  (eta {eta:.0f}s)",
            flush=True,
        )

    if a.recording is not None and a.cut is not None:
        recording = Recording.load(a.recording)
        history = History.load(recording.history)
        v = check_cut(
            recording,
            history,
            Model(history),
            a.cut,
            a.seed,
            a.recording / "cuts",
            env=env,
            keep=True,
        )
        progress(v, 1, 1)
        for what in (*v.lost, *v.half_written, *v.unindexed):
            print(f"  {what}")
        print(f"  state and serve.log: {a.recording / 'cuts' / f'cut-{a.cut}'}")
        return 0 if v.ok else 1
    if a.recording is not None:
        work = a.recording
        report = check(
            Recording.load(work),
            seed=a.seed,
            cuts=a.cuts,
            env=env,
            keep=a.keep,
            progress=progress,
        )
    else:
        work = a.work or Path(tempfile.mkdtemp(prefix="powercut-"))
        print(f"recording the workload under {work} ...", flush=True)
        try:
            report = run(
                work,
                seed=a.seed,
                cuts=a.cuts,
                senders=a.senders,
                per_sender=a.per_sender,
                env=env,
                keep=a.keep,
                progress=progress,
            )
        except KeyboardInterrupt:
            print(f"interrupted while recording; nothing checked (work folder: {work})")
            return 130
    print(report.text())
    ok = report.ok
    if ok and not a.keep and a.recording is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(
            f"work folder kept: {work} (re-check a cut: --recording {work} --seed {a.seed} --cut K)"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
