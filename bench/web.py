"""DICOMweb benchmark: pacsgrid against Orthanc with its DICOMweb plugin, in the same run.

    python -m bench.web [--instances 500] [--size 256] [--qido-instances 10000] [--clients 4]

Measures, for each server, on loopback, with the same synthetic CT data (bench.synth):
- STOW-RS ingest: `--clients` threads each POST batches of `--batch` instances (multipart/related
  application/dicom) until all are stored; instances/s and MB/s over the wall time;
- WADO-RS retrieve: the same threads GET every instance (multipart/related application/dicom,
  stored transfer syntax); instances/s and MB/s;
- QIDO-RS study search latency with `--qido-instances` instances stored (200 studies): 300
  searches (PatientID exact, PatientName prefix wildcard, StudyDate range, AccessionNumber),
  one at a time; p50 and p95 in milliseconds.
Both servers keep their defaults for durability (pacsgrid fsyncs every object and its index
commit; Orthanc's SyncStorageArea is on by default). Results go to standard output (a
Markdown table) and, with --json FILE, to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

import tests.peers as launchers
from bench.synth import Spec, write

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    name: str
    base: str  # DICOMweb root
    program: launchers.Program

    def stop(self) -> None:
        self.program.stop()


def start_pacsgrid(work: Path, workers: int) -> Target:
    http = launchers.free_port()
    args = ("--log-level", "WARNING")
    server = launchers.Server(
        work / "data", workers=workers, http_port=http, args=args, log=work / "pacsgrid.log"
    )
    return Target("pacsgrid", f"http://127.0.0.1:{http}/dicom-web", server.start())


def start_orthanc(work: Path) -> Target:
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if shutil.which("Orthanc") is None or not plugin.exists():
        raise SystemExit("needs Debian's orthanc and orthanc-dicomweb (apt-get install ...)")
    extra = {"Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    orthanc = launchers.Orthanc(work, legacy=False, extra=extra).start()
    return Target("Orthanc", f"http://127.0.0.1:{orthanc.http_port}/dicom-web", orthanc)


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "benchboundary7d1f"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
        for f in files
    )
    return body + f"--{boundary}--\r\n".encode(), (
        f'multipart/related; type="application/dicom"; boundary={boundary}'
    )


def parallel(items: list, clients: int, fn: Callable) -> float:  # type: ignore[type-arg]
    """Run fn(session, item) over items with `clients` threads; return wall seconds."""
    local = threading.local()

    def run(item):  # type: ignore[no-untyped-def]
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = requests.Session()
        fn(s, item)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, items))
    return time.perf_counter() - start


def stow(t: Target, paths: list[Path], clients: int, batch: int) -> dict[str, float]:
    batches = [paths[i : i + batch] for i in range(0, len(paths), batch)]
    total = sum(p.stat().st_size for p in paths)

    def send(s: requests.Session, group: list[Path]) -> None:
        body, ctype = multipart([p.read_bytes() for p in group])
        r = s.post(t.base + "/studies", data=body, headers={"Content-Type": ctype}, timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"{t.name} STOW: {r.status_code} {r.text[:300]}")

    secs = parallel(batches, clients, send)
    return {"instances_s": len(paths) / secs, "mb_s": total / secs / 1e6, "seconds": secs}


def wado(t: Target, uids: list[tuple[str, str, str]], clients: int) -> dict[str, float]:
    got = [0]
    lock = threading.Lock()

    def fetch(s: requests.Session, u: tuple[str, str, str]) -> None:
        r = s.get(
            f"{t.base}/studies/{u[0]}/series/{u[1]}/instances/{u[2]}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
            timeout=300,
        )
        if r.status_code != 200:
            raise RuntimeError(f"{t.name} WADO: {r.status_code} {r.text[:300]}")
        with lock:
            got[0] += len(r.content)

    secs = parallel(uids, clients, fetch)
    return {"instances_s": len(uids) / secs, "mb_s": got[0] / secs / 1e6, "seconds": secs}


def qido(t: Target, spec: Spec, n: int = 300) -> dict[str, float]:
    from bench.synth import FAMILY, study_date

    rng = random.Random(7)
    s = requests.Session()
    times = []
    for i in range(n):
        kind = i % 4
        st = rng.randrange(spec.studies)
        if kind == 0:
            params = {"PatientID": f"P{st % max(1, spec.studies // 2):07d}"}
        elif kind == 1:
            params = {"PatientName": rng.choice(FAMILY)[:3] + "*"}
        elif kind == 2:
            y = study_date(st)[:4]
            params = {"StudyDate": f"{y}0101-{y}0630"}
        else:
            params = {"AccessionNumber": f"A{st:08d}"}
        start = time.perf_counter()
        r = s.get(t.base + "/studies", params=params, headers={"Accept": "application/dicom+json"})
        times.append(time.perf_counter() - start)
        if r.status_code not in (200, 204):
            raise RuntimeError(f"{t.name} QIDO: {r.status_code} {r.text[:200]}")
    times.sort()
    return {
        "p50_ms": statistics.median(times) * 1000,
        "p95_ms": times[int(len(times) * 0.95) - 1] * 1000,
        "queries": n,
    }


def uids_of(paths: list[Path]) -> list[tuple[str, str, str]]:
    import pydicom

    out = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.append((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--size", type=int, default=256, help="image rows/columns (16-bit)")
    ap.add_argument("--qido-instances", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=10, help="instances per STOW request")
    ap.add_argument("--workers", type=int, default=2, help="pacsgrid DICOM workers")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=REPO / "bench/work/web")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    big = Spec(
        studies=max(1, a.instances // 50), series=2, instances=25, size=a.size, seed="web-big"
    )
    small = Spec(
        studies=200, series=5, instances=max(1, a.qido_instances // 1000), size=16, seed="web-qido"
    )
    print(f"generating {big.total} + {small.total} synthetic instances in {a.work}", flush=True)
    big_paths = write(big, a.work / "big")
    small_paths = write(small, a.work / "small")
    big_uids = uids_of(big_paths)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("pacsgrid", "Orthanc"):
        run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=a.work))
        t = start_pacsgrid(run_dir, a.workers) if name == "pacsgrid" else start_orthanc(run_dir)
        try:
            r: dict[str, dict[str, float]] = {}
            print(f"{name}: STOW-RS {len(big_paths)} instances", flush=True)
            r["stow"] = stow(t, big_paths, a.clients, a.batch)
            print(f"{name}: WADO-RS {len(big_uids)} instances", flush=True)
            r["wado"] = wado(t, big_uids, a.clients)
            print(f"{name}: loading {len(small_paths)} instances for QIDO", flush=True)
            r["stow_small"] = stow(t, small_paths, a.clients, 50)
            print(f"{name}: QIDO-RS study searches", flush=True)
            r["qido"] = qido(t, small)
            results[name] = r
        finally:
            t.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
    mb = sum(p.stat().st_size for p in big_paths) / 1e6
    stored = len(small_paths) + len(big_paths)
    lines = [
        f"DICOMweb, {len(big_paths)} CT instances of {a.size}x{a.size} ({mb:.0f} MB), "
        f"{a.clients} clients, STOW batches of {a.batch}; QIDO with {stored} "
        f"instances stored; {os.cpu_count()} cores",
        "",
        "| measure | pacsgrid | Orthanc | ratio |",
        "|---|---|---|---|",
    ]
    for key, label, unit, higher in (
        ("stow.instances_s", "STOW-RS", "instances/s", True),
        ("stow.mb_s", "STOW-RS", "MB/s", True),
        ("wado.instances_s", "WADO-RS", "instances/s", True),
        ("wado.mb_s", "WADO-RS", "MB/s", True),
        ("stow_small.instances_s", "STOW-RS small objects", "instances/s", True),
        ("qido.p50_ms", "QIDO-RS study search p50", "ms", False),
        ("qido.p95_ms", "QIDO-RS study search p95", "ms", False),
    ):
        sec, field = key.split(".")
        p, o = results["pacsgrid"][sec][field], results["Orthanc"][sec][field]
        ratio = p / o if higher else o / p
        lines.append(f"| {label} ({unit}) | {p:.1f} | {o:.1f} | {ratio:.2f}x |")
    lines.append("")
    lines.append(
        "ratio > 1: pacsgrid is faster (throughput: pacsgrid/Orthanc; latency: Orthanc/pacsgrid)"
    )
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
