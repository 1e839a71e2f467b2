"""Fuzzing, CI-sized: every coverage-guided fuzzer (tests/fuzz/fuzzers.py) runs a few thousand
executions under atheris from its seeds, and every input that once crashed one is replayed.
The long run is `make fuzz ARGS="--seconds 600"` (tests/fuzz/run.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz import run
from tests.fuzz.fuzzers import FUZZERS

CRASHES = Path(__file__).parent / "fuzz" / "crashes"


@pytest.mark.slow
@pytest.mark.parametrize("fuzzer", run.NAMES)
def test_fuzz_target_briefly(fuzzer: str, tmp_path: Path) -> None:
    report = run.run(
        fuzzer, runs=2000, corpus=tmp_path / "corpus", crashes=tmp_path / "crashes", timeout=600
    )
    print(report.line())
    assert not report.crashes, f"{report.line()}\n{report.tail}"
    assert report.returncode == 0, report.tail
    assert report.executions >= 2000


def crash_inputs() -> list[Path]:
    return sorted(p for p in CRASHES.glob("*/*") if p.is_file())


@pytest.mark.parametrize("path", crash_inputs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_inputs_that_once_crashed_are_handled(path: Path) -> None:
    FUZZERS[path.parent.name](path.read_bytes())


@pytest.mark.slow
def test_pdu_sequences_against_the_server(tmp_path: Path) -> None:
    """Mutated PDU sequences on raw sockets; after every batch the server answers C-ECHO and
    gives back every instance it acknowledged (tests/fuzz/sockets.py)."""
    from tests.conftest import Server
    from tests.fuzz.sockets import fuzz

    server = Server(tmp_path / "archive", args=("--peer", "SOCKFUZZ@127.0.0.1:9")).start()
    try:
        outcome = fuzz(server.port, sequences=120, seconds=240, seed=20261204)
        assert outcome.sequences >= 50, "too few sequences ran to mean anything"
        assert outcome.acknowledged, "no store got through: the fuzzer tests nothing"
        print(
            f"{outcome.sequences} sequences ({outcome.mutated} mutated), "
            f"{len(outcome.acknowledged)} acknowledged stores all retrievable"
        )
        assert "Traceback" not in server.text()
    finally:
        server.stop()
