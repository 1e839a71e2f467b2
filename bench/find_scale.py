"""C-FIND at scale: an index bulk-loaded with 1,000,000 instances (50,000 studies), STUDY-level
queries by PatientID, PatientName wildcard and StudyDate range, on SQLite and PostgreSQL.

    python -m bench.find_scale                      # 50,000 studies x 2 series x 10 instances
    python -m bench.find_scale --studies 5000 --queries 100    # a quick run

The rows are written with direct SQL (executemany on SQLite, COPY on PostgreSQL) into the
schema `open_index` creates, with the indexes in place; then each query runs through
`Index.find` (what C-FIND and QIDO call) with a fresh random value each time, and p50/p95 are
reported in milliseconds. PostgreSQL is a real server started here (initdb as the postgres
user, 127.0.0.1, a free port) and removed afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.synth import FAMILY, GIVEN, study_date, uid  # noqa: E402
from pacsgrid.index import Index, Query, open_index, parse_match  # noqa: E402
from pacsgrid.index.filing import attribute_columns  # noqa: E402
from pacsgrid.model import Level  # noqa: E402

SERIES_PER_STUDY = 2
CT = "1.2.840.10008.5.1.4.1.1.2"


def name_of(p: int) -> str:
    return f"{FAMILY[p % len(FAMILY)]}^{GIVEN[(p // len(FAMILY)) % len(GIVEN)]}^{p}"


def rows(
    studies: int, instances_per_series: int
) -> dict[str, tuple[list[str], Iterator[tuple[Any, ...]]]]:
    patients = studies // 2

    def patient_rows() -> Iterator[tuple[Any, ...]]:
        for p in range(patients):
            name = name_of(p)
            yield (
                p + 1,
                f"P{p:07d}\x1f",
                f"P{p:07d}",
                name,
                name.upper(),
                "",
                f"{1940 + p % 60:04d}0{1 + p % 9}15",
                "MF"[p % 2],
                2,
                2 * SERIES_PER_STUDY,
                2 * SERIES_PER_STUDY * instances_per_series,
            )

    def study_rows() -> Iterator[tuple[Any, ...]]:
        for st in range(studies):
            yield (
                st + 1,
                st % patients + 1,
                uid("scale", "study", st),
                study_date(st * 13 + st // 7),
                f"{8 + st % 10:02d}{(st * 7) % 60:02d}00",
                f"A{st:08d}",
                str(st),
                "CT CHEST",
                "WELBY^MARCUS",
                "WELBY^MARCUS",
                "\\CT\\",
                f"\\{CT}\\",
                SERIES_PER_STUDY,
                SERIES_PER_STUDY * instances_per_series,
                0.0,
            )

    def series_rows() -> Iterator[tuple[Any, ...]]:
        pk = 0
        for st in range(studies):
            for se in range(SERIES_PER_STUDY):
                pk += 1
                yield (
                    pk,
                    st + 1,
                    uid("scale", "series", st, se),
                    "CT",
                    str(se + 1),
                    "AXIAL",
                    "",
                    "",
                    "CHEST",
                    instances_per_series,
                )

    def instance_rows() -> Iterator[tuple[Any, ...]]:
        pk = 0
        for series_pk in range(1, studies * SERIES_PER_STUDY + 1):
            for i in range(instances_per_series):
                pk += 1
                yield (
                    pk,
                    series_pk,
                    f"2.25.{series_pk}.{i}",
                    CT,
                    str(i + 1),
                    "",
                    "",
                    "",
                    "512",
                    "512",
                    "1.2.840.10008.1.2.1",
                    525000,
                    f"{pk:064x}",
                    0.0,
                    "",
                )

    def modality_rows() -> Iterator[tuple[Any, ...]]:
        for st in range(studies):
            yield (st + 1, "CT")

    def copy_rows() -> Iterator[tuple[Any, ...]]:
        n = studies * SERIES_PER_STUDY * instances_per_series
        for pk in range(1, n + 1):
            yield (pk, "local", f"k/{pk}.dcm", 525000, f"{pk:064x}", 0.0, "ok", None)

    pcols = ["pk", "patient_key", *attribute_columns(Level.PATIENT)]
    pcols += ["num_studies", "num_series", "num_instances"]
    scols = ["pk", "patient_pk", *attribute_columns(Level.STUDY)]
    scols += ["modalities", "sop_classes", "num_series", "num_instances", "updated_at"]
    secols = ["pk", "study_pk", *attribute_columns(Level.SERIES), "num_instances"]
    icols = ["pk", "series_pk", *attribute_columns(Level.IMAGE)]
    icols += ["transfer_syntax", "size", "sha256", "stored_at", "source_ae"]
    ccols = ["instance_pk", "site", "key", "size", "sha256", "stored_at", "state", "verified_at"]
    return {
        "patient": (pcols, patient_rows()),
        "study": (scols, study_rows()),
        "series": (secols, series_rows()),
        "instance": (icols, instance_rows()),
        "copy": (ccols, copy_rows()),
        "study_modality": (["study_pk", "modality"], modality_rows()),
    }


def load_sqlite(path: Path, studies: int, per_series: int) -> None:
    open_index(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    for table, (cols, it) in rows(studies, per_series).items():
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        conn.executemany(sql, it)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


def load_postgres(url: str, studies: int, per_series: int) -> None:
    import psycopg

    open_index(url).close()
    with psycopg.connect(url) as conn:
        for table, (cols, it) in rows(studies, per_series).items():
            with conn.cursor().copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as cp:
                for row in it:
                    cp.write_row(row)
            if table not in ("copy", "study_modality"):
                conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'), "
                    f"(SELECT max(pk) FROM {table}))"
                )
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def measure(
    index: Index, make: Callable[[random.Random], dict[str, str]], n: int
) -> tuple[float, float, float]:
    rng = random.Random(7)
    times = []
    found = 0
    for _ in range(n):
        keys = make(rng)
        matches = tuple(m for k, v in keys.items() if (m := parse_match(k, v)) is not None)
        t0 = time.perf_counter()
        found += len(list(index.find(Query(Level.STUDY, matches))))
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p50 = statistics.median(times)
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    return p50, p95, found / n


def queries(studies: int) -> dict[str, Callable[[random.Random], dict[str, str]]]:
    patients = studies // 2

    def by_pid(r: random.Random) -> dict[str, str]:
        return {"PatientID": f"P{r.randrange(patients):07d}"}

    def by_name(r: random.Random) -> dict[str, str]:
        p = r.randrange(patients)
        name = name_of(p)
        return {"PatientName": name[: name.rindex("^") + 1 + max(1, len(str(p)) - 1)] + "*"}

    def by_date(r: random.Random) -> dict[str, str]:
        st = r.randrange(studies)  # a week starting on a day that has studies
        start = datetime.datetime.strptime(study_date(st * 13 + st // 7), "%Y%m%d")
        end = start + datetime.timedelta(days=6)
        return {"StudyDate": f"{start:%Y%m%d}-{end:%Y%m%d}"}

    return {
        "PatientID": by_pid,
        "PatientName wildcard": by_name,
        "StudyDate range (7 days)": by_date,
    }


def run_engine(label: str, url: str, studies: int, n: int) -> list[str]:
    index = open_index(url)
    out = []
    try:
        for qname, make in queries(studies).items():
            measure(index, make, min(20, n))  # warm the cache
            p50, p95, avg = measure(index, make, n)
            out.append(f"| {label} | {qname} | {p50:.2f} | {p95:.2f} | {avg:.1f} |")
    finally:
        index.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=50_000)
    ap.add_argument("--instances", type=int, default=10, help="instances per series")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--engines", default="sqlite,postgres")
    a = ap.parse_args()
    total = a.studies * SERIES_PER_STUDY * a.instances
    print(f"index: {total:,} instances, {a.studies:,} studies, {a.studies // 2:,} patients")
    table = [
        "| engine | C-FIND STUDY by | p50 ms | p95 ms | studies/answer |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="pacsgrid-find-scale-") as tmp:
        if "sqlite" in a.engines:
            path = Path(tmp) / "scale.sqlite"
            t0 = time.monotonic()
            load_sqlite(path, a.studies, a.instances)
            size = path.stat().st_size / 1e9
            print(f"sqlite: loaded in {time.monotonic() - t0:.0f}s ({size:.2f} GB)")
            table += run_engine("SQLite", f"sqlite:///{path}", a.studies, a.queries)
        if "postgres" in a.engines:
            from tests.pg import PgCluster

            cluster = PgCluster().init().start()
            try:
                url = cluster.create_db("scale")
                t0 = time.monotonic()
                load_postgres(url, a.studies, a.instances)
                print(f"postgres: loaded in {time.monotonic() - t0:.0f}s")
                table += run_engine("PostgreSQL", url, a.studies, a.queries)
            finally:
                cluster.destroy()
    print("\n".join(table))


if __name__ == "__main__":
    main()
