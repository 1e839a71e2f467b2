"""Dashboard and QIDO latency on a large index (default 1,000,000 instances).

    python -m bench.dashboard [--instances 1000000] [--requests 50]

Fills an SQLite index directly with synthetic rows (100 000 studies of 10 instances each by
default, one copy each, through the same `add_batch` the group committer uses; no files are
written: only the index is exercised), starts `pacsgrid serve --http-port` on it and times
each dashboard page and a few QIDO-RS searches: the first request (cold caches) and the median
and p95 of `--requests` more. Progress goes to standard error; results to standard output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from bench.synth import FAMILY, GIVEN, study_date, uid
from tests.peers import Server, free_port

REPO = Path(__file__).resolve().parent.parent


def fill(index_path: Path, instances: int, per_study: int = 10) -> str:
    from pacsgrid.index.base import NewInstance
    from pacsgrid.index.sqlite import SqliteIndex
    from pacsgrid.model import CopyRecord
    from pacsgrid.progress import Progress

    index = SqliteIndex(index_path)
    index.register_site("local")
    studies = instances // per_study
    batch: list[NewInstance] = []
    first_study = ""
    with Progress("fill index", instances, unit="instances", bar=False, interval=5) as progress:
        for st in range(studies):
            p = st // 2
            study_uid = uid("dash", "study", st)
            first_study = first_study or study_uid
            series_uid = uid("dash", "series", st)
            for i in range(per_study):
                sop = uid("dash", "instance", st, i)
                values = {
                    "PatientID": f"P{p:08d}",
                    "PatientName": f"{FAMILY[p % len(FAMILY)]}^{GIVEN[p % len(GIVEN)]}^{p}",
                    "StudyInstanceUID": study_uid,
                    "StudyDate": study_date(st),
                    "AccessionNumber": f"A{st:09d}",
                    "StudyDescription": "CT CHEST",
                    "SeriesInstanceUID": series_uid,
                    "Modality": "CT" if st % 3 else "MR",
                    "SeriesNumber": "1",
                    "SOPInstanceUID": sop,
                    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                    "InstanceNumber": str(i + 1),
                    "Rows": "512",
                    "Columns": "512",
                }
                key = f"{study_uid}/{series_uid}/{sop}.dcm"
                batch.append(
                    NewInstance(
                        values,
                        "1.2.840.10008.1.2.1",
                        525_000,
                        "0" * 64,
                        (CopyRecord("local", key, 525_000, "0" * 64, time.time()),),
                    )
                )
                if len(batch) >= 5000:
                    index.add_batch(batch)
                    for _ in batch:
                        progress.advance("indexed")
                    batch = []
        if batch:
            index.add_batch(batch)
    index.close()
    return first_study


def timed(url: str, n: int) -> tuple[float, float, float]:
    def once() -> float:
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=300) as r:
            r.read()
        return time.perf_counter() - start

    first = once()
    times = sorted(once() for _ in range(n))
    return first * 1000, statistics.median(times) * 1000, times[int(n * 0.95) - 1] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--work", type=Path, default=REPO / "bench/work/dashboard")
    a = ap.parse_args()
    data = a.work / f"data-{a.instances}"
    index_path = data / "index.sqlite"
    marker = data / "filled"
    if not marker.exists():
        data.mkdir(parents=True, exist_ok=True)
        index_path.unlink(missing_ok=True)
        start = time.perf_counter()
        study = fill(index_path, a.instances)
        marker.write_text(study)
        print(
            f"filled {a.instances} instances in {time.perf_counter() - start:.0f}s", file=sys.stderr
        )
    study = marker.read_text()
    from pacsgrid.storage.filesystem import FilesystemSite

    FilesystemSite("local", data / "objects").initialize()  # the (empty) site, healthy
    http = free_port()
    args = ("--log-level", "WARNING")
    server = Server(data, http_port=http, args=args, log=a.work / "serve.log").start(timeout=120)
    try:
        base = f"http://127.0.0.1:{http}"
        pages = [
            ("dashboard: study list", "/"),
            ("dashboard: page 200 of the study list", "/?offset=10000"),
            ("dashboard: patient name search", "/?PatientName=KOWALSKI"),
            (
                "dashboard: modality + date range",
                "/?ModalitiesInStudy=MR&StudyDate=20100101-20100331",
            ),
            ("dashboard: study page", f"/ui/studies/{study}"),
            ("dashboard: sites", "/ui/sites"),
            ("dashboard: jobs", "/ui/jobs"),
            ("QIDO-RS: PatientID", "/dicom-web/studies?PatientID=P00012345"),
            (
                "QIDO-RS: PatientName prefix, limit 25",
                "/dicom-web/studies?PatientName=SMI*&limit=25",
            ),
            ("QIDO-RS: series of a study", f"/dicom-web/studies/{study}/series"),
            ("metrics", "/metrics"),
        ]
        print(f"{a.instances} instances in the index (SQLite); times in ms\n")
        print("| request | first | p50 | p95 |\n|---|---|---|---|")
        for label, path in pages:
            first, p50, p95 = timed(base + path, a.requests)
            print(f"| {label} | {first:.1f} | {p50:.1f} | {p95:.1f} |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
