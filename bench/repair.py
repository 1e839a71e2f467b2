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
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.synth import Spec, write

REPO = Path(__file__).resolve().parent.parent


def pacsgrid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pacsgrid", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"pacsgrid {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_bytes(root: Path) -> tuple[int, int]:
    n = size = 0
    for p in root.rglob("*.dcm"):
        if ".quarantine" not in p.parts:
            n += 1
            size += p.stat().st_size
    return n, size


def spec_for(objects: int, size: int, seed: str) -> Spec:
    instances = 50
    series = 2
    studies = max(1, -(-objects // (series * instances)))
    return Spec(studies=studies, series=series, instances=instances, size=size, seed=seed)


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def bench_wiped(work: Path, objects: int, size: int, s3: bool) -> dict[str, object]:
    src = work / "synth"
    write(spec_for(objects, size, "bench-repair"), src)  # rounded up to 100 objects
    a, b = work / "site-a", work / "site-b"
    data = work / "archive"
    weed = None
    if s3:
        sys.path.insert(0, str(REPO))
        from tests.seaweedfs import SeaweedFS

        weed = SeaweedFS(work / "weed").start()
        b_url = weed.url(weed.bucket("bench-repair"), "pacs")
    else:
        b_url = b.as_uri()
    opts = ["--data-dir", str(data), "--site", f"a={a.as_uri()}", "--site", f"b={b_url}"]
    opts += ["--copies", "2", "--write-quorum", "2"]
    try:
        t = time.perf_counter()
        proc = pacsgrid("import", *opts, str(src))
        load_s = time.perf_counter() - t
        print(proc.stdout.strip())
        n, nbytes = tree_bytes(a)

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
        else:
            for child in b.iterdir():
                if child.is_dir() and not child.name.startswith("."):
                    shutil.rmtree(child)
        subprocess.run(["sync"], check=True)

        t = time.perf_counter()
        proc = pacsgrid("repair", *opts)
        repair_s = time.perf_counter() - t
        print(proc.stdout.strip())
        if proc.returncode != 0:
            raise RuntimeError(f"repair did not finish cleanly:\n{proc.stdout}\n{proc.stderr}")
        if weed is None:
            rebuilt, _ = tree_bytes(b)
            assert rebuilt == n, (rebuilt, n)

        # The same files with cp -r, then cp -r + sync.
        studies = [p for p in a.iterdir() if p.is_dir() and not p.name.startswith(".")]
        results = {}
        for label, sync in (("cp -r", False), ("cp -r + sync", True)):
            dest = work / f"cp-{'sync' if sync else 'plain'}"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            subprocess.run(["sync"], check=True)
            t = time.perf_counter()
            subprocess.run(["cp", "-r", *map(str, studies), str(dest)], check=True)
            if sync:
                subprocess.run(["sync"], check=True)
            results[label] = time.perf_counter() - t
            shutil.rmtree(dest)
    finally:
        if weed is not None:
            weed.stop()
    mb = nbytes / 1e6
    out: dict[str, object] = {
        "objects": n,
        "megabytes": round(mb, 1),
        "target": "s3 (SeaweedFS)" if s3 else "folder",
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = _free_port()
    log = open(work / "serve.log", "ab")  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pacsgrid",
            "serve",
            *opts,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("serve did not start") from None
                time.sleep(0.2)
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
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        log.close()
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
