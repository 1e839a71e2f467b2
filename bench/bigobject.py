"""Memory and speed of one large object stored over DIMSE and over STOW-RS.

    nice -n 19 python -m bench.bigobject [--frames 1024] [--small 400] [--src PATH]

Writes a synthetic multi-frame object once (by default 1024 frames of 1024x1024 8-bit: 1 GiB,
kept in --cache), then, each on a fresh `pacsgrid serve` of one process (DICOM and web):

- dimse: DCMTK storescu sends it on one association;
- stow: one STOW-RS POST of it, streamed from the file;
- small: --small objects of 64x64 on one association (the in-memory path).

While each runs, the server's VmRSS and RssAnon (/proc/<pid>/status) are sampled every 10 ms;
the report gives their peaks above the idle server, and the rate in MB/s (object bytes over the
client's wall time). `--src` runs another checkout's pacsgrid (its `src` folder), for the
numbers before a change. Bounded: every client has a time-out, every server is stopped.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tests.peers as launchers
from bench.procs import dcmtk_tool, tree_cpu

_FRAME = 1024
_TIMEOUT = 1800.0  # one store, on a loaded machine


@dataclass
class Result:
    phase: str
    megabytes: float
    seconds: float
    peak_rss_mb: float  # above the idle server
    peak_anon_mb: float
    server_cpu: float  # CPU seconds of the server process while it ran
    ok: bool

    @property
    def rate(self) -> float:
        return self.megabytes / self.seconds if self.seconds else 0.0


def _memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes; zeros once the process is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon


class Sampler:
    """Peak VmRSS and RssAnon of one process, sampled in a thread until `stop`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = _memory(pid)
        self.peak = self.base
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.01):
            rss, anon = _memory(self.pid)
            self.peak = (max(self.peak[0], rss), max(self.peak[1], anon))

    def stop(self) -> tuple[float, float]:
        self._done.set()
        self._thread.join()
        return (self.peak[0] - self.base[0]) / 2**20, (self.peak[1] - self.base[1]) / 2**20


def _uid(n: int) -> str:
    return f"2.25.{4242424242 + n}"


def big_object(path: Path, frames: int) -> Path:
    """A Multi-frame Grayscale Byte Secondary Capture of `frames` 1024x1024 frames, explicit
    VR little endian, written frame by frame (never whole in memory)."""
    if path.exists() and path.stat().st_size > frames * _FRAME * _FRAME:
        return path
    from io import BytesIO

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
    ds.SOPInstanceUID = _uid(frames)
    ds.StudyInstanceUID = _uid(frames + 1)
    ds.SeriesInstanceUID = _uid(frames + 2)
    ds.PatientID = "BIGOBJECT"
    ds.PatientName = "Big^Object"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = _FRAME
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    head = BytesIO()
    ds.save_as(head, enforce_file_format=True)
    size = frames * _FRAME * _FRAME
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(head.getvalue())
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size))
        row = bytes(range(256)) * (_FRAME // 256)
        for f in range(frames):
            fh.write((row[f % 256 :] + row[: f % 256]) * _FRAME)
    tmp.rename(path)
    return path


def small_objects(folder: Path, count: int) -> list[Path]:
    from bench.synth import Spec, write

    if folder.exists() and len(list(folder.rglob("*.dcm"))) == count:
        return sorted(folder.rglob("*.dcm"))
    shutil.rmtree(folder, ignore_errors=True)
    return write(Spec(studies=1, series=1, instances=count, size=64), folder)


def server_started(data_dir: Path, src: str) -> launchers.Server:
    """A started `pacsgrid serve` of one process with DICOM and web; `src` first on
    PYTHONPATH when given. Uploads up to 16 GiB."""
    config = data_dir.parent / f"{data_dir.name}.toml"
    config.write_text("[http]\nmax_upload = 17179869184\n")
    return launchers.Server(
        data_dir,
        workers=1,
        config=config,
        http_port=launchers.free_port(),
        env={"PYTHONPATH": src} if src else None,
        log=data_dir.parent / f"{data_dir.name}.log",
    ).start(timeout=120.0)


def storescu(port: int, files: list[Path]) -> bool:
    proc = subprocess.run(
        [dcmtk_tool("storescu"), "-aec", "PACSGRID", "127.0.0.1", str(port), *map(str, files)],
        env=launchers.DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
    )
    return proc.returncode == 0 and "Failed" not in proc.stdout + proc.stderr


def stow(port: int, path: Path) -> bool:
    """One POST of `path` as the only part, streamed from the file in 1 MB blocks."""
    boundary = "bigobjectboundary"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = path.stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=_TIMEOUT)
    try:
        conn.putrequest("POST", "/dicom-web/studies")
        conn.putheader(
            "Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}'
        )
        conn.putheader("Content-Length", str(len(head) + size + len(tail)))
        conn.putheader("Accept", "application/dicom+json")
        conn.endheaders()
        conn.send(head)
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                conn.send(block)
        conn.send(tail)
        rsp = conn.getresponse()
        rsp.read()
        return rsp.status == 200
    finally:
        conn.close()


def measure(phase: str, work: Path, src: str, files: list[Path]) -> Result:
    data_dir = work / phase
    server = server_started(data_dir, src)
    try:
        assert server.http_port
        sampler = Sampler(server.pid)
        cpu = sum(tree_cpu(server.pid))
        started = time.perf_counter()
        ok = stow(server.http_port, files[0]) if phase == "stow" else storescu(server.port, files)
        seconds = time.perf_counter() - started
        cpu = sum(tree_cpu(server.pid)) - cpu
        rss, anon = sampler.stop()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    megabytes = sum(f.stat().st_size for f in files) / 2**20
    return Result(phase, megabytes, seconds, rss, anon, cpu, ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=1024, help="1024x1024 frames (1 MiB each)")
    ap.add_argument("--small", type=int, default=400, help="64x64 objects for the small phase")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pacsgrid-big")
    ap.add_argument("--src", default="", help="the src folder of the pacsgrid to measure")
    ap.add_argument("--phases", default="dimse,stow,small")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    big = big_object(args.cache / f"big-{args.frames}.dcm", args.frames)
    small = small_objects(args.cache / f"small-{args.small}", args.small)
    work = Path(tempfile.mkdtemp(prefix="bigobject-", dir=args.cache))
    results = []
    try:
        for phase in args.phases.split(","):
            files = small if phase == "small" else [big]
            r = measure(phase, work, args.src, files)
            results.append(r)
            per = (
                f" ({len(files) / r.seconds:.0f} objects/s, server CPU "
                f"{1000 * r.server_cpu / len(files):.2f} ms each)"
                if len(files) > 1
                else f" (server CPU {r.server_cpu:.1f} s)"
            )
            print(
                f"{r.phase:6} {r.megabytes:8.1f} MB {r.seconds:7.2f} s {r.rate:7.1f} MB/s{per}  "
                f"peak RSS +{r.peak_rss_mb:7.1f} MB  RssAnon +{r.peak_anon_mb:7.1f} MB"
                + ("" if r.ok else "  FAILED"),
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(
            json.dumps([{**asdict(r), "rate": r.rate} for r in results], indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
