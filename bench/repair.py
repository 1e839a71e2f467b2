"""Repair benchmarks: rebuilding a wiped site, and a site coming back after an outage.

    python -m bench.repair --objects 5000 --size 128            # folder sites
    python -m bench.repair --objects 5000 --size 128 --s3       # the wiped site is S3 (SeaweedFS)

1. Wiped site. An archive with two sites (copies 2, write quorum 2) is loaded with synthetic CT
   objects (bench/synth.py, `pacsgrid import`). Every object of site b is deleted (its sentinel
   is kept), then `pacsgrid repair` rebuilds it; its wall time gives objects/s and MB/s. In the
   same run, `cp -r` copies the same files (site a's object folders) to a fresh folder, and
   `cp -r` + `sync` too: repair fsyncs every file and its folder, plain cp does not.
2. Site back. `pacsgrid serve` runs with copies 2, write quorum 1 and a 1-second probe; site b
   is unmounted (renamed, an empty folder in its place) while `--outage-objects` objects are
   stored through `pacsgrid import`, so each lands on a only with a copy queued in the outbox.
   b is put back at t0; t1 is when the index shows every object with 2 good copies. The time
   is detection (at most one probe interval, 30 s by default) plus the rebuild.

Numbers only: nothing here asserts a speed. Other processes on the machine change them.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import disk, scratch
from bench.procs import BenchError, pacsgrid_cli, pacsgrid_status
from bench.synth import Spec, write
from tests.peers import Server

REPO = Path(__file__).resolve().parent.parent
QUARANTINE = ".quarantine"


def pacsgrid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = pacsgrid_cli(*args, timeout=3600, env={**os.environ, **(env or {})})
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"pacsgrid {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_bytes(root: Path) -> tuple[int, int]:
    n = size = 0
    for p in root.rglob("*.dcm"):
        if QUARANTINE not in p.parts:
            n += 1
            size += p.stat().st_size
    return n, size


def spec_for(objects: int, size: int, seed: str) -> Spec:
    instances = 50
    series = 2
    studies = max(1, -(-objects // (series * instances)))
    return Spec(studies=studies, series=series, instances=instances, size=size, seed=seed)


@dataclass
class TwoSites:
    """An archive under `work` with two sites, a and b, each holding every object (copies 2,
    write quorum 2), driven through the `pacsgrid` command line: loaded with `import`, site
    b's objects wiped, rebuilt with `repair`, every copy checked afterwards.

    `b_url`: site b elsewhere (an S3 bucket) instead of the folder work/site-b. `env`: the
    environment of every pacsgrid command (bench.ab runs another build's)."""

    work: Path
    b_url: str = ""
    env: dict[str, str] | None = None

    @property
    def a(self) -> Path:
        return self.work / "site-a"

    @property
    def b(self) -> Path:
        return self.work / "site-b"

    @property
    def data(self) -> Path:
        return self.work / "archive"

    def options(self) -> list[str]:
        b_url = self.b_url or self.b.as_uri()
        opts = ["--data-dir", str(self.data), "--site", f"a={self.a.as_uri()}"]
        return [*opts, "--site", f"b={b_url}", "--copies", "2", "--write-quorum", "2"]

    def run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """`pacsgrid ARGS` on this archive; a non-zero exit is a BenchError."""
        proc = pacsgrid_cli(*args, *self.options(), timeout=timeout, env=self.env)
        if proc.returncode != 0:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            raise BenchError(f"pacsgrid {args[0]} exited {proc.returncode}: {tail}")
        return proc

    def load(self, src: Path, timeout: float) -> float:
        """Seconds `pacsgrid import` takes to store every file under `src` on both sites of a
        fresh archive (the previous one, if any, is discarded first)."""
        for folder in (self.a, self.b, self.data):
            scratch.discard(folder)
        start = time.perf_counter()
        self.run("import", str(src), timeout=timeout)
        return time.perf_counter() - start

    def object_folders(self, site: Path) -> list[Path]:
        """The top folders of a folder site that hold objects (not the sentinel, not the
        temp and quarantine folders, whose names start with a dot)."""
        return sorted(p for p in site.iterdir() if p.is_dir() and not p.name.startswith("."))

    def wipe_b(self) -> None:
        """Every object of folder site b gone (bench.scratch: renamed away during a run), its
        sentinel kept: the volume is ours, its data are lost. Flushed to disk, untimed."""
        for folder in self.object_folders(self.b):
            scratch.discard(folder)
        os.sync()

    def repair(self, timeout: float) -> tuple[float, str]:
        """Wall time of `pacsgrid repair` from start until it exits (start-up, the scan of
        both sites and every copy included), and what it printed."""
        os.sync()  # no dirty pages of earlier work
        start = time.perf_counter()
        proc = self.run("repair", timeout=timeout)
        return time.perf_counter() - start, proc.stdout

    def copy_a(self, dst: Path, timeout: float) -> float:
        """Seconds `cp -r` of site a's object folders into a fresh `dst`, then `sync`: the
        same files as the repair writes, made as durable without any checks."""
        return disk.cp_r(self.object_folders(self.a), dst, timeout, sync=True)

    def check(self, expected: int, timeout: float) -> list[str]:
        """What is wrong after a repair: the index must record `expected` good copies on each
        site, and every object file of site a must be on site b with the same bytes (and b
        must hold nothing else). Empty when every copy is present and correct."""
        problems = []
        status = pacsgrid_status(*self.options(), timeout=timeout, env=self.env)
        for site in status["index"]["sites"]:
            if site["objects"] != expected or site["bad"]:
                problems.append(
                    f"the index records {site['objects']} copies on site {site['site']} "
                    f"({site['bad']} bad), {expected} expected"
                )
        a, b = _objects(self.a), _objects(self.b)
        if a != b:
            problems.append(f"{len(a - b)} object(s) missing on b, {len(b - a)} extra on b")
        differ = [r for r in sorted(a & b) if not filecmp.cmp(self.a / r, self.b / r, False)]
        if differ:
            problems.append(f"{len(differ)} object(s) on b differ from a, e.g. {differ[0]}")
        if len(a) != expected:
            problems.append(f"site a holds {len(a)} objects, {expected} expected")
        return problems


def _objects(site: Path) -> set[str]:
    return {
        str(p.relative_to(site))
        for p in site.rglob("*.dcm")
        if not p.relative_to(site).parts[0].startswith(".")
    }


def bench_wiped(work: Path, objects: int, size: int, s3: bool) -> dict[str, object]:
    src = work / "synth"
    write(spec_for(objects, size, "bench-repair"), src)  # rounded up to 100 objects
    weed = None
    archive = TwoSites(work)
    if s3:
        sys.path.insert(0, str(REPO))
        from tests.peers import SeaweedFS

        weed = SeaweedFS(work / "weed").start()
        archive.b_url = weed.url(weed.bucket("bench-repair"), "pacs")
    try:
        load_s = archive.load(src, 3600)
        n, nbytes = tree_bytes(archive.a)

        # Wipe every object of b (the sentinel stays: the volume is ours, its data is gone).
        if weed is not None:
            client = weed.client()
            keys = []
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket="bench-repair", Prefix="pacs/"
            ):
                keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".dcm")]
            for i in range(0, len(keys), 1000):
                client.delete_objects(
                    Bucket="bench-repair",
                    Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
                )
            os.sync()
        else:
            archive.wipe_b()

        repair_s, output = archive.repair(3600)
        print(output.strip())
        if weed is None:
            problems = archive.check(n, 600)
            if problems:
                raise RuntimeError("after the repair: " + "; ".join(problems))

        # The same files with cp -r, then cp -r + sync.
        results = {}
        for label, sync in (("cp -r", False), ("cp -r + sync", True)):
            dest = work / f"cp-{'sync' if sync else 'plain'}"
            results[label] = disk.cp_r(archive.object_folders(archive.a), dest, 3600, sync)
    finally:
        if weed is not None:
            weed.stop()
    mb = nbytes / 1e6
    out: dict[str, object] = {
        "objects": n,
        "megabytes": round(mb, 1),
        "wiped site": "s3 (SeaweedFS)" if s3 else "folder",
        "load_seconds": round(load_s, 2),
        "repair_seconds": round(repair_s, 2),
        "repair_objects_per_s": round(n / repair_s, 1),
        "repair_mb_per_s": round(mb / repair_s, 1),
    }
    for label, secs in results.items():
        out[f"{label} seconds"] = round(secs, 2)
        out[f"{label} objects_per_s"] = round(n / secs, 1)
        out[f"{label} mb_per_s"] = round(mb / secs, 1)
        out[f"repair time / {label} time"] = round(repair_s / secs, 2)
    return out


def count_complete(index_path: Path) -> tuple[int, int]:
    import sqlite3

    db = sqlite3.connect(index_path, timeout=30)
    try:
        total = db.execute("SELECT count(*) FROM instance").fetchone()[0]
        full = db.execute(
            "SELECT count(*) FROM instance i WHERE (SELECT count(*) FROM copy c WHERE "
            "c.instance_pk = i.pk AND c.state = 'ok') >= 2"
        ).fetchone()[0]
        return int(total), int(full)
    finally:
        db.close()


def bench_site_back(work: Path, objects: int, size: int, probe: float) -> dict[str, object]:
    src = work / "synth-outage"
    write(spec_for(objects, size, "bench-outage"), src)
    a, b = work / "site-a", work / "site-b"
    data = work / "archive"
    opts = ["--data-dir", str(data), "--site", f"a={a.as_uri()}", "--site", f"b={b.as_uri()}"]
    opts += ["--copies", "2", "--write-quorum", "1"]
    env = {"PACSGRID_REPLICATION_PROBE_INTERVAL": str(probe)}
    server = Server(data, args=tuple(opts[2:]), env=env, log=work / "serve.log").start()
    try:
        away = b.with_name("site-b-unmounted")
        b.rename(away)
        b.mkdir()
        proc = pacsgrid("import", *opts, str(src), env=env)
        print(proc.stdout.strip())
        total, full = count_complete(data / "index.sqlite")
        t0 = time.perf_counter()
        b.rmdir()
        away.rename(b)
        deadline = time.monotonic() + 3600
        while full < total and time.monotonic() < deadline:
            time.sleep(0.2)
            total, full = count_complete(data / "index.sqlite")
        t1 = time.perf_counter()
    finally:
        server.stop(timeout=120)
    return {
        "objects_stored_during_outage": total,
        "complete_after": full,
        "probe_interval_s": probe,
        "seconds_from_site_back_to_rebuilt": round(t1 - t0, 2),
        "objects_per_s_while_rebuilding": round(total / max(t1 - t0, 1e-9), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--objects", type=int, default=5000)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (16-bit)")
    ap.add_argument("--outage-objects", type=int, default=2000)
    ap.add_argument("--probe", type=float, default=1.0, help="probe interval of serve (s)")
    ap.add_argument("--s3", action="store_true", help="the wiped site is an S3 bucket")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "repair")
    ap.add_argument("--skip-outage", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    results: dict[str, object] = {
        "machine": f"{os.cpu_count()} cores; other processes may be running",
        "wiped_site": bench_wiped(args.work / "wiped", args.objects, args.size, args.s3),
    }
    if not args.skip_outage:
        results["site_back"] = bench_site_back(
            args.work / "outage", args.outage_objects, args.size, args.probe
        )
    print(json.dumps(results, indent=2))
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
