"""Reindex speed: objects/s rebuilding an empty index from a storage site, against reading the
same files with `cat > /dev/null` in the same run.

    python -m bench.reindex                   # 10,000 synthetic CT objects (64x64), both engines
    python -m bench.reindex --objects 2000 --engines sqlite
    python -m bench.reindex --rounds 5        # both engines 5 times, in alternating order: medians

The objects are written once into a filesystem site under --workdir (kept for later runs).
`cat` runs before and after the reindexes (the first may read from disk, the second from the
page cache; both are reported). Reindex uses `pacsgrid.jobs.reindex.Reindexer`, exactly what
`pacsgrid reindex` runs, with one reader process per core. PostgreSQL is a server started
here (tests.pg) with fsync on, as in production; each round reindexes into a fresh database.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import synth  # noqa: E402
from pacsgrid.index import open_index  # noqa: E402
from pacsgrid.jobs.reindex import Reindexer  # noqa: E402
from pacsgrid.progress import Progress  # noqa: E402
from pacsgrid.settings import SiteSettings  # noqa: E402
from pacsgrid.storage import object_key, open_site  # noqa: E402


def populate(site_root: Path, n: int) -> SiteSettings:
    s = SiteSettings(name="bench", url=site_root.resolve().as_uri())
    site = open_site(s)
    site.initialize()
    have = sum(1 for _ in site.list())
    if have >= n:
        return s
    spec = synth.Spec(studies=max(1, n // 100), series=2, instances=50, size=64, seed="reindex")
    t0 = time.monotonic()
    for count, (_, ds) in enumerate(synth.datasets(spec), 1):
        if count > n:
            break
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        key = object_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        site.put(key, [buf.getvalue()])
    print(f"wrote {n} objects in {time.monotonic() - t0:.0f}s")
    return s


def cat_seconds(root: Path) -> tuple[float, int]:
    files = [str(p) for p in root.rglob("*.dcm")]
    size = sum(os.path.getsize(f) for f in files)
    t0 = time.monotonic()
    for i in range(0, len(files), 2000):
        with open(os.devnull, "wb") as null:
            subprocess.run(["cat", *files[i : i + 2000]], stdout=null, check=True)
    return time.monotonic() - t0, size


def reindex_once(url: str, s: SiteSettings, jobs: int) -> tuple[float, int]:
    index = open_index(url)
    try:
        job = Reindexer(
            index, [open_site(s)], [s], jobs=jobs, progress=Progress("reindex", bar=False)
        )
        t0 = time.monotonic()
        report = job.run()
        return time.monotonic() - t0, report.indexed
    finally:
        index.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pacsgrid-bench-reindex"
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--engines", default="sqlite,postgres")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, engines in alternating order")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    site_root = a.workdir / "site"
    s = populate(site_root, a.objects)
    cat1, size = cat_seconds(site_root)
    n = sum(1 for _ in site_root.rglob("*.dcm"))
    engines = [e for e in ("sqlite", "postgres") if e in a.engines]
    seconds: dict[str, list[float]] = {e: [] for e in engines}
    cluster = None
    if "postgres" in engines:
        from tests.pg import PgCluster

        cluster = PgCluster(fsync=True).init().start()  # fsync on, as in production
    try:
        for rnd in range(a.rounds):
            for engine in engines[rnd % len(engines) :] + engines[: rnd % len(engines)]:
                if engine == "sqlite":
                    for p in a.workdir.glob("index.sqlite*"):
                        p.unlink()
                    url = f"sqlite:///{a.workdir / 'index.sqlite'}"
                else:
                    assert cluster is not None
                    url = cluster.create_db("reindex")
                secs, indexed = reindex_once(url, s, a.jobs)
                assert indexed == n, f"{engine}: indexed {indexed} of {n}"
                seconds[engine].append(secs)
                print(f"round {rnd + 1} {engine}: {n / secs:.0f} objects/s", flush=True)
    finally:
        if cluster is not None:
            cluster.destroy()
    cat2, _ = cat_seconds(site_root)
    print(f"{n} objects, {size / 1e6:.0f} MB, {a.jobs} reader processes, {a.rounds} round(s)")
    print("| what | seconds | objects/s | MB/s |")
    print("|---|---|---|---|")
    print(f"| cat > /dev/null (first) | {cat1:.2f} | {n / cat1:.0f} | {size / 1e6 / cat1:.0f} |")
    print(f"| cat > /dev/null (again) | {cat2:.2f} | {n / cat2:.0f} | {size / 1e6 / cat2:.0f} |")
    rates = {}
    for engine, label in (("sqlite", "SQLite"), ("postgres", "PostgreSQL (fsync on)")):
        if engine not in seconds:
            continue
        secs = statistics.median(seconds[engine])
        rates[engine] = n / secs
        spread = f" ({n / max(seconds[engine]):.0f}-{n / min(seconds[engine]):.0f})"
        print(
            f"| reindex into {label}, median | {secs:.2f} | {n / secs:.0f}"
            f"{spread if a.rounds > 1 else ''} | {size / 1e6 / secs:.0f} |"
            f" cat was {secs / min(cat1, cat2):.1f}x faster"
        )
    if len(rates) == 2:
        print(f"PostgreSQL / SQLite: {rates['postgres'] / rates['sqlite']:.2f}x (medians)")


if __name__ == "__main__":
    main()
