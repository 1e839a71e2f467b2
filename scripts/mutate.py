"""Mutation testing of the durable core with mutmut: `make mutate ARGS="--module wal"`.

Each module is mutated alone, in a copy of the work tree under build/mutate/<module>/ (mutmut
writes its mutants and results there, never into src/), and each mutant is run against the
fast in-process tests listed for its module below: the tests that should notice when that
module does the wrong thing. Subprocess tests (a real server, the power-cut rig) do not see
mutants (a child process imports the unmutated package), and would take minutes per mutant.

    scripts/mutate --module wal             # run, then print the kill rate and the survivors
    scripts/mutate --module wal --results   # print them again from the last run
    scripts/mutate --module wal --mutant 'pacsgrid.storage.wal.*ǁappend__mutmut_1*'
                                            # only these mutants (names or patterns, as the
                                            # results print them): does a new test kill them?
    scripts/mutate --list                   # the modules and their tests

It is CPU heavy: scripts/mutate runs under `nice -n 19 ionice -c 3`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Module:
    source: str  # the file to mutate
    tests: tuple[str, ...]  # pytest node ids or files that must kill its mutants
    only: tuple[str, ...] = ()  # mutate only these functions (mutmut names, fnmatch), if any


MODULES = {
    "wal": Module(
        "src/pacsgrid/storage/wal.py",
        ("tests/test_site_log.py", "tests/test_durable_core.py"),
        # the write path: a record appended, staged, flushed (by one leader for all) and
        # released; not segment reuse, retirement or clean-up
        (
            "*ǁSiteLogǁappend*",
            "*ǁSiteLogǁstage_open*",
            "*ǁSiteLogǁstaged*",
            "*ǁSiteLogǁwait*",
            "*ǁSiteLogǁ_lead_flush*",
            "*ǁSiteLogǁrelease*",
            "*ǁSiteLogǁnote_written*",
            "*ǁReceiptǁrelease*",
        ),
    ),
    "walfile": Module(
        "src/pacsgrid/storage/walfile.py",
        ("tests/test_site_log.py", "tests/test_durable_core.py"),
    ),
    "filesystem": Module(
        "src/pacsgrid/storage/filesystem.py",
        (
            "tests/test_site_log.py",
            "tests/test_durable_core.py",
            "tests/test_storage_contract.py",
            "tests/test_folder_site.py",
        ),
        # the write path and the checkpoint, not listing, quarantine or health probes
        (
            "*ǁput*",
            "*ǁ_put_logged*",
            "*ǁ_stage*",
            "*ǁ_publish*",
            "*ǁ_write_atomic*",
            "*ǁ_write_named*",
            "*ǁ_ensure_dir*",
            "*ǁ_flush_new_dirs*",
            "*ǁcheckpoint*",
            "*ǁrestore*",
            "*ǁflush_objects*",
            "*x__link_fd*",
            "*x__place*",
        ),
    ),
    "durable": Module(
        "src/pacsgrid/storage/durable.py",
        ("tests/test_site_log.py", "tests/test_durable_core.py", "tests/test_storage_contract.py"),
    ),
    "recovery": Module(
        "src/pacsgrid/archive/recovery.py",
        ("tests/test_site_log.py", "tests/test_archive.py", "tests/test_durable_core.py"),
    ),
    "checkpoint": Module(
        "src/pacsgrid/archive/checkpoint.py",
        ("tests/test_site_log.py", "tests/test_archive.py", "tests/test_durable_core.py"),
    ),
    "commit": Module(
        "src/pacsgrid/index/commit.py", ("tests/test_archive.py", "tests/test_durable_core.py")
    ),
    "header": Module(
        "src/pacsgrid/dicomfile/header.py",
        ("tests/test_header.py", "tests/test_archive.py"),
        # the walk that checks the element structure and finds the pixel data, and the
        # pydicom fallback; not the decoding of the values (character sets)
        (
            "*x__walk__*",
            "*x__element_header__*",
            "*x__zeros_to_end__*",
            "*ǁ_Walkerǁ*",
            "*x__scan_with_pydicom__*",
            "*x__touch__*",
            "*x_scan__*",
        ),
    ),
    "sql_matching": Module(
        "src/pacsgrid/index/sql_matching.py",
        ("tests/test_matching.py", "tests/test_index_contract.py"),
    ),
}

# Tests that need a service mutants cannot reach (PostgreSQL, S3): left out of mutant runs.
DESELECT = "not postgres and not pg and not s3 and not seaweed"


def scratch(name: str) -> Path:
    return REPO / "build" / "mutate" / name


def prepare(name: str, module: Module, without: Sequence[str] = ()) -> Path:
    """A fresh copy of the tracked sources and tests, with the module's mutmut settings
    (`without`: test files to leave out, to see what the others alone kill)."""
    work = scratch(name)
    if work.exists():
        shutil.rmtree(work)
    files = subprocess.run(
        ["git", "ls-files", "src", "tests", "bench", "pyproject.toml"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for rel in files:
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    tests = ", ".join(
        f'"{t}"'
        for t in module.tests
        if (REPO / t.split("::")[0]).exists() and t.split("::")[0] not in without
    )
    if not tests:
        raise SystemExit(f"{name}: no tests left to run (mutmut would run the whole suite)")
    with open(work / "pyproject.toml", "a") as fh:
        fh.write(
            "\n[tool.mutmut]\n"
            'source_paths = ["src"]\n'
            f'only_mutate = ["{module.source}"]\n'
            f'pytest_add_cli_args_test_selection = [{tests}, "-k", "{DESELECT}"]\n'
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
            "use_git_change_detection = false\n"
            # a mutant that makes a loop endless is killed by the time-out: keep it short
            "timeout_multiplier = 3.0\n"
            "timeout_constant = 10.0\n"
        )
    return work


def results(work: Path) -> tuple[dict[str, int], list[str]]:
    """Counts per outcome, and the names of the mutants that survived."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    counts: dict[str, int] = {}
    survived = []
    for line in out.splitlines():
        mutant, sep, status = line.strip().rpartition(": ")
        if not sep:
            continue
        counts[status] = counts.get(status, 0) + 1
        if status == "survived":
            survived.append(mutant)
    return counts, survived


def report(name: str, module: Module, show: bool) -> None:
    work = scratch(name)
    counts, survived = results(work)
    total = sum(n for s, n in counts.items() if s not in ("skipped", "not checked"))
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    rate = 100.0 * killed / total if total else 0.0
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{name} ({module.source}): {killed}/{total} killed ({rate:.1f}%): {detail}")
    for mutant in survived:
        print(f"  survived: {mutant}")
        if show:
            diff = subprocess.run(
                [sys.executable, "-m", "mutmut", "show", mutant],
                cwd=work,
                capture_output=True,
                text=True,
            ).stdout
            print("    " + "\n    ".join(diff.strip().splitlines()[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", choices=sorted(MODULES))
    ap.add_argument("--results", action="store_true", help="report the last run again")
    ap.add_argument("--show", action="store_true", help="print each survivor's diff")
    ap.add_argument("--list", action="store_true", help="list the modules and their tests")
    ap.add_argument(
        "--mutant",
        action="append",
        default=[],
        help="run only this mutant (a name or pattern from the results; repeatable)",
    )
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument(
        "--without", action="append", default=[], help="leave this test file out (repeatable)"
    )
    a = ap.parse_args()
    if a.list or not a.module:
        for name, m in MODULES.items():
            print(f"{name:11} {m.source:38} {' '.join(m.tests)}")
        return
    module = MODULES[a.module]
    if not a.results:
        work = prepare(a.module, module, a.without)
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(a.max_children)]
            + (a.mutant or list(module.only)),
            cwd=work,
            check=False,
        )
    report(a.module, module, a.show)


if __name__ == "__main__":
    main()
