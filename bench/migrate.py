"""Migration throughput: `pacsgrid migrate folder` against `cp -r` of the same tree in the same
run, and `pacsgrid migrate pull` from a real Orthanc in instances/s.

    .venv/bin/python -m bench.migrate                      # 3000 files of 256x256 CT
    .venv/bin/python -m bench.migrate --files 600 --pull 300   # a quick look

Everything runs on this machine, on 127.0.0.1 and ports picked here, and stops by itself.
The tree is written by bench.synth (deterministic CT files, explicit VR little endian); both
`cp -r` and the migration read it from the page cache (it was just written), and both write to
the same filesystem, `cp` without fsync, pacsgrid with an fsync per object and per index
commit (that is the price of "acknowledged = durable"). Orthanc, the legacy PACS of the pull,
is Debian's package started with its own config (tests/peers/orthanc.py) and loaded through its
REST API; the pull is timed end to end (discovery, C-MOVE of every study to a running
`pacsgrid serve`, counting), and the rate quoted is the one the command itself reports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import disk, scratch  # noqa: E402
from bench.procs import BenchError, pacsgrid_cli  # noqa: E402
from bench.synth import Spec, write  # noqa: E402


def pacsgrid(*args: str | Path, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return pacsgrid_cli(*args, timeout=timeout)


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def migrate_folder(
    src: Path,
    data: Path,
    timeout: float,
    jobs: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[float, str]:
    """Wall time of `pacsgrid migrate folder` bringing `src` into a fresh archive at `data`
    (its default folder site and SQLite index; the previous one is discarded first), from
    start until it exits, and what it printed. `env`: as bench.procs.pacsgrid_cli."""
    scratch.discard(data)
    os.sync()  # no dirty pages of earlier work
    args: list[str | Path] = ["migrate", "folder", "--data-dir", data, src]
    if jobs is not None:
        args += ["--jobs", str(jobs)]
    start = time.perf_counter()
    run = pacsgrid_cli(*args, timeout=timeout, env=env)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        tail = " | ".join((run.stdout + run.stderr).strip().splitlines()[-3:])
        raise BenchError(f"migrate folder exited {run.returncode}: {tail}")
    return seconds, run.stdout


def bench_folder(work: Path, files: int, size: int, jobs: int) -> dict[str, float]:
    instances = 50
    studies = max(1, files // (2 * instances))
    src = work / "legacy-tree"
    t = time.monotonic()
    write(Spec(studies=studies, series=2, instances=instances, size=size, seed="migrate"), src)
    n, nbytes = tree_size(src)
    print(f"tree: {n} files, {nbytes / 1e6:.0f} MB (written in {time.monotonic() - t:.0f}s)")

    cp_s = disk.cp_r([src], work / "cp-copy", 3600, sync=True)
    data = work / "archive-folder"
    mig_s, output = migrate_folder(src, data, 3600, jobs)
    t = time.monotonic()
    again = pacsgrid("migrate", "folder", "--data-dir", data, src)
    rerun_s = time.monotonic() - t
    assert " 0 read " in again.stdout, again.stdout
    out = {
        "files": n,
        "mb": nbytes / 1e6,
        "cp_seconds": cp_s,
        "cp_files_per_s": n / cp_s,
        "cp_mb_per_s": nbytes / 1e6 / cp_s,
        "migrate_seconds": mig_s,
        "migrate_files_per_s": n / mig_s,
        "migrate_mb_per_s": nbytes / 1e6 / mig_s,
        "ratio_migrate_to_cp": cp_s / mig_s,
        "rerun_seconds": rerun_s,
    }
    print(output.strip())
    print(
        f"cp -r + sync: {cp_s:.1f}s ({n / cp_s:.0f} files/s, {nbytes / 1e6 / cp_s:.0f} MB/s); "
        f"migrate folder: {mig_s:.1f}s ({n / mig_s:.0f} files/s, {nbytes / 1e6 / mig_s:.0f} "
        f"MB/s) = {cp_s / mig_s:.2f} x the speed of cp; unchanged re-run: {rerun_s:.1f}s"
    )
    return out


def bench_pull(work: Path, instances: int, size: int, parallel: list[int]) -> dict[str, float]:
    from tests.peers import Orthanc, Server, free_port

    per_series = 25
    studies = max(1, instances // (2 * per_series))
    src = work / "legacy-pacs-files"
    paths = write(
        Spec(studies=studies, series=2, instances=per_series, size=size, seed="pull"), src
    )
    port = free_port()
    orthanc = Orthanc(work / "orthanc", modalities={"PACSGRID": ("127.0.0.1", port)})
    out: dict[str, float] = {}
    try:
        orthanc.start()
        t = time.monotonic()
        orthanc.upload(paths)
        print(
            f"orthanc: {orthanc.instance_count()} instances loaded in {time.monotonic() - t:.0f}s"
        )
        for p in parallel:
            for mode in ("move", "get"):
                data = work / f"archive-pull-{mode}-{p}"
                shutil.rmtree(data, ignore_errors=True)
                server = Server(data, port=port).start() if mode == "move" else None
                try:
                    t = time.monotonic()
                    args = ["--parallel", str(p), "--port", str(port)]
                    if mode == "get":
                        args.append("--get")
                    run = pacsgrid(
                        "migrate",
                        "pull",
                        "--data-dir",
                        data,
                        "--from",
                        f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                        *args,
                    )
                    wall = time.monotonic() - t
                finally:
                    if server is not None:
                        server.stop()
                if run.returncode != 0:
                    raise SystemExit(f"pull failed:\n{run.stdout}\n{run.stderr[-3000:]}")
                m = re.search(r"(\d+) instances in ([\d.]+)s \(([\d.]+) instances/s\)", run.stdout)
                assert m, run.stdout
                rate = float(m[3])
                out[f"pull_{mode}_parallel{p}_instances_per_s"] = rate
                out[f"pull_{mode}_parallel{p}_wall_seconds"] = wall
                print(
                    f"pull C-{mode.upper()} --parallel {p}: {m[1]} instances in {m[2]}s = "
                    f"{rate:.0f} instances/s (wall {wall:.1f}s incl. start-up)"
                )
    finally:
        orthanc.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "migrate")
    ap.add_argument("--files", type=int, default=3000, help="files in the legacy tree")
    ap.add_argument("--size", type=int, default=256, help="image rows = columns")
    ap.add_argument("--jobs", type=int, default=8, help="migrate folder --jobs")
    ap.add_argument("--pull", type=int, default=1000, help="instances in the legacy PACS")
    ap.add_argument("--parallel", default="1,4", help="pull --parallel values to try")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    numbers = bench_folder(a.work, a.files, a.size, a.jobs)
    if a.pull:
        numbers |= bench_pull(a.work, a.pull, a.size, [int(x) for x in a.parallel.split(",")])
    if a.json:
        a.json.write_text(json.dumps(numbers, indent=2))
    print(json.dumps({k: round(v, 2) for k, v in numbers.items()}))


if __name__ == "__main__":
    main()
