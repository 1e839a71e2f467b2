"""Run the coverage-guided fuzzers (atheris, libFuzzer) and report what they did.

    python -m tests.fuzz.run --seconds 600            # each fuzzer for ten minutes
    python -m tests.fuzz.run --runs 3000 --fuzzer pdu # a CI-sized run of one fuzzer
    make fuzz ARGS="--seconds 600"

Each fuzzer runs in its own process (libFuzzer ends the process it runs in), on a corpus kept
under .cache/fuzz/<fuzzer> (seeded from tests/fuzz/seeds.py the first time, grown by every
run), with crashing inputs written to .cache/fuzz/crashes/<fuzzer>/. The report gives, per
fuzzer, the executions, the corpus size, and the crashes found. A crash is a bug: fix it, then
copy its input to tests/fuzz/crashes/<fuzzer>/ so tests/test_fuzz.py replays it for ever.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "fuzz"
NAMES = ("header", "part10", "pdu", "dimse")


@dataclass
class Report:
    fuzzer: str
    executions: int = 0
    seconds: int = 0
    corpus: int = 0
    crashes: list[Path] = field(default_factory=list)
    returncode: int = 0
    tail: str = ""

    def line(self) -> str:
        crashes = ", ".join(p.name for p in self.crashes) or "none"
        return (
            f"{self.fuzzer:7} {self.executions:>10,} executions in {self.seconds:>4}s, "
            f"corpus {self.corpus:>5}, crashes: {crashes}"
        )


def seed_corpus(fuzzer: str, corpus: Path) -> None:
    """Write the seeds into an empty corpus folder."""
    from tests.fuzz.seeds import seeds

    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    for data in seeds(fuzzer):
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)


def run(
    fuzzer: str,
    *,
    runs: int = 0,
    seconds: int = 0,
    corpus: Path | None = None,
    crashes: Path | None = None,
    timeout: float | None = None,
) -> Report:
    """Run one fuzzer in a child process for `runs` executions or `seconds` seconds."""
    corpus = corpus or CACHE / fuzzer
    crashes = crashes or CACHE / "crashes" / fuzzer
    seed_corpus(fuzzer, corpus)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    args = [
        sys.executable,
        "-m",
        "tests.fuzz.run",
        "--child",
        fuzzer,
        str(corpus),
        f"-artifact_prefix={crashes}/",
        "-max_len=131072",
        "-timeout=20",
        "-rss_limit_mb=3072",
        "-print_final_stats=1",
    ]
    if runs:
        args.append(f"-runs={runs}")
    if seconds:
        args.append(f"-max_total_time={seconds}")
    proc = subprocess.run(
        args,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout or (seconds * 2 + 600 if seconds else 1800),
        env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    out = proc.stderr + proc.stdout
    report = Report(fuzzer, returncode=proc.returncode, tail=out[-3000:])
    done = re.search(r"Done (\d+) runs in (\d+) second", out)
    stat = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    if done:
        report.executions, report.seconds = int(done[1]), int(done[2])
    elif stat:
        report.executions = int(stat[1])
    report.corpus = sum(1 for _ in corpus.iterdir())
    report.crashes = sorted(set(crashes.iterdir()) - before)
    return report


def sockets(sequences: int, seconds: float) -> str:
    """The socket-level fuzzer against a `pacsgrid serve` started in a scratch folder."""
    import tempfile

    from tests.fuzz.sockets import fuzz
    from tests.peers import Server

    with tempfile.TemporaryDirectory(prefix="pacsgrid-fuzz-") as tmp:
        server = Server(Path(tmp) / "archive", args=("--peer", "SOCKFUZZ@127.0.0.1:9")).start()
        try:
            out = fuzz(server.port, sequences=sequences, seconds=seconds, seed=os.getpid())
        finally:
            server.stop()
        tracebacks = server.text().count("Traceback")
    return (
        f"sockets {out.sequences:>10,} PDU sequences ({out.mutated} mutated), "
        f"{len(out.acknowledged)} stores acknowledged and retrievable, "
        f"{tracebacks} tracebacks in the server log"
    )


def child(fuzzer: str, libfuzzer_args: list[str]) -> None:
    """In the child: instrument pacsgrid's decoders and hand the fuzzer to libFuzzer."""
    import warnings

    import atheris

    warnings.simplefilter("ignore")
    with atheris.instrument_imports(include=["pacsgrid"]):
        from tests.fuzz.fuzzers import FUZZERS
    atheris.Setup([sys.argv[0], *libfuzzer_args], FUZZERS[fuzzer])
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2:])
        return 0
    p = argparse.ArgumentParser(description="Fuzz pacsgrid's DICOM decoders (atheris).")
    p.add_argument("--fuzzer", choices=NAMES, action="append", help="default: all")
    p.add_argument("--seconds", type=int, default=0, help="time per fuzzer")
    p.add_argument("--runs", type=int, default=0, help="executions per fuzzer")
    p.add_argument(
        "--sockets",
        type=int,
        default=0,
        metavar="N",
        help="also send N mutated PDU sequences to a server started for it (tests/fuzz/sockets)",
    )
    args = p.parse_args(argv)
    if not args.seconds and not args.runs:
        args.runs = 3000
    reports = []
    for name in args.fuzzer or NAMES:  # each line as soon as its fuzzer is done
        r = run(name, runs=args.runs, seconds=args.seconds)
        reports.append(r)
        print(r.line(), flush=True)
        if r.returncode and not r.crashes:
            print(f"  {r.fuzzer} ended with code {r.returncode}:\n{r.tail}", flush=True)
        for crash in r.crashes:
            print(f"  crash input: {crash}", flush=True)
    if args.sockets:
        print(sockets(args.sockets, args.seconds or 600), flush=True)
    return 1 if any(r.crashes or r.returncode for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
