"""The benchmark's DICOM clients, the same for every server.

- C-STORE: DCMTK `storescu`, 1 or N processes (one association each) on disjoint parts of
  the files. For the latency of one C-STORE: ONE association (pacsgrid's asyncio SCU, as for
  C-FIND) that sends an instance, waits for its response, pauses, sends the next.
- C-FIND: many queries on ONE association, so that latency is the server's and not process
  start-up. The association layer is pacsgrid's asyncio SCU (`pacsgrid.dicom.scu`: no polling
  reactor, so the client adds next to nothing to a query's latency); identifiers are written
  and read with pydicom, and the answers are checked against what the synthetic data holds.
- C-MOVE with DCMTK `movescu` to a DCMTK `storescp`, C-GET with DCMTK `getscu`.

Every DCMTK process runs with TCP_NODELAY=1.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from bench.procs import BenchError, dcmtk_tool
from tests.peers import DCMTK_ENV

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def echo(port: int, called_ae: str, calling_ae: str = "BENCHECHO", timeout: float = 5.0) -> int:
    """C-ECHO; returns the status (0 = success); raises when nobody answers."""
    from pacsgrid.dicom.scu import connect

    async def run() -> int:
        assoc = await connect(
            "127.0.0.1",
            port,
            calling_ae,
            called_ae,
            [(VERIFICATION, [IMPLICIT_LE])],
            timeout=timeout,
        )
        try:
            return await assoc.c_echo()
        finally:
            await assoc.release()

    return asyncio.run(asyncio.wait_for(run(), timeout))


# ---------------------------------------------------------------- C-STORE


@dataclass
class StoreRun:
    seconds: float
    returncodes: list[int]
    logs: list[Path]

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def failures(self) -> str:
        bad = []
        for rc, log in zip(self.returncodes, self.logs, strict=True):
            if rc != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                bad.append(f"storescu exited {rc}: {' | '.join(tail)}")
        return "; ".join(bad)


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """`parts` contiguous, disjoint slices of `files` (like N modalities, each its studies)."""
    n = len(files)
    return [list(files[i * n // parts : (i + 1) * n // parts]) for i in range(parts)]


def storescu(
    port: int,
    called_ae: str,
    files: Sequence[Path],
    associations: int,
    logdir: Path,
    timeout: float,
) -> StoreRun:
    """Send `files` with `associations` concurrent storescu processes; wall time of the whole."""
    exe = dcmtk_tool("storescu")
    logdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    start = time.perf_counter()
    try:
        for i, part in enumerate(split(files, associations)):
            log = logdir / f"storescu-{i}.log"
            logs.append(log)
            with open(log, "wb") as fh:
                procs.append(
                    subprocess.Popen(
                        [exe, "-nh", "-aet", "BENCHSTORE", "-aec", called_ae, "127.0.0.1"]
                        + [str(port), *map(str, part)],
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        env=DCMTK_ENV,
                    )
                )
        deadline = start + timeout
        for p in procs:
            p.wait(max(0.1, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        raise BenchError(f"storescu did not finish in {timeout:.0f}s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return StoreRun(time.perf_counter() - start, [p.returncode for p in procs], logs)


@dataclass
class StoreLatencyRun:
    latencies: list[float] = field(default_factory=list)  # seconds, one per timed instance
    statuses: list[int] = field(default_factory=list)  # one per timed instance
    sent: int = 0  # instances sent, warm-up included


def store_one_at_a_time(
    port: int,
    called_ae: str,
    files: Sequence[Path],
    gap: float,
    warmup: int = 5,
    timeout: float = 60.0,
) -> StoreLatencyRun:
    """Send `files` on one association, one instance at a time: each timed from the request
    to its response, then a pause of `gap` seconds so that the server is idle when the next
    arrives (what one modality sending now and then sees). The first `warmup` are sent the
    same way and not counted. The files are read (and split into meta and dataset) first."""
    from pacsgrid.dicom.scu import connect
    from pacsgrid.dicomfile.part10 import split_part10

    instances = []
    for path in files:
        data = path.read_bytes()
        meta = split_part10(data)
        if not (meta.sop_class_uid and meta.sop_instance_uid):
            raise BenchError(f"{path}: no SOP class or instance UID in its file meta")
        instances.append((meta, memoryview(data)[meta.dataset_offset :]))
    proposals = sorted({(m.sop_class_uid, m.transfer_syntax) for m, _ in instances})
    if len(proposals) > 128:
        raise BenchError("more than 128 kinds of instance for one association")

    async def run() -> StoreLatencyRun:
        assoc = await connect(
            "127.0.0.1",
            port,
            "BENCHSTORE",
            called_ae,
            [(sop_class, [syntax]) for sop_class, syntax in proposals],
            timeout=timeout,
        )
        out = StoreLatencyRun()
        try:
            for n, (meta, dataset) in enumerate(instances):
                ctx = assoc.context_for(meta.sop_class_uid, [meta.transfer_syntax])
                if ctx is None:
                    raise BenchError(
                        f"{called_ae} refused {meta.sop_class_uid} in {meta.transfer_syntax}"
                    )
                t0 = time.perf_counter()
                # The association's own timeout bounds the wait for the response.
                status, _ = await assoc.c_store(
                    ctx.id, meta.sop_class_uid, meta.sop_instance_uid, dataset
                )
                elapsed = time.perf_counter() - t0
                out.sent += 1
                if n >= warmup:
                    out.latencies.append(elapsed)
                    out.statuses.append(status)
                await asyncio.sleep(gap)
        finally:
            await assoc.release()
        return out

    return asyncio.run(run())


# ---------------------------------------------------------------- C-FIND


@dataclass
class FindRun:
    latencies: list[float] = field(default_factory=list)  # seconds, one per query
    answers: list[list[str]] = field(default_factory=list)  # StudyInstanceUIDs, per query
    statuses: list[int] = field(default_factory=list)  # final status, per query
    sent: int = 0  # queries sent, warm-up included


RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)


def study_identifier(keys: dict[str, str], transfer_syntax: str) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for kw in RETURN_KEYS:
        setattr(ds, kw, "")
    ds.StudyInstanceUID = ""
    for kw, value in keys.items():
        setattr(ds, kw, value)
    buf = DicomBytesIO()
    buf.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    buf.is_little_endian = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wildcards and ranges are not valid PN/DA values
        write_dataset(buf, ds)
    return buf.getvalue()


def find_batch(
    port: int,
    called_ae: str,
    queries: Sequence[dict[str, str]],
    timeout: float = 60.0,
    warmup: int = 5,
) -> FindRun:
    """Run every query at STUDY level on one association; time each from request to final
    response (the client decodes the answers after the clock stops, so that the time is the
    server's and the transport's, not pydicom's). The first `warmup` queries are sent first
    and not counted (the server process that took the association may not have answered a
    query yet)."""
    from pacsgrid.dicom import dimse
    from pacsgrid.dicom.scu import connect

    async def run() -> FindRun:
        assoc = await connect(
            "127.0.0.1",
            port,
            "BENCHFIND",
            called_ae,
            [(STUDY_ROOT_FIND, [EXPLICIT_LE, IMPLICIT_LE])],
            timeout=timeout,
        )
        out = FindRun()
        try:
            ctx = assoc.context_for(STUDY_ROOT_FIND)
            if ctx is None:
                raise BenchError(f"{called_ae} refused Study Root C-FIND from BENCHFIND")
            for n, keys in enumerate([*queries[:warmup], *queries]):
                identifier = study_identifier(keys, ctx.transfer_syntax)
                datasets: list[bytes] = []
                status = -1
                t0 = time.perf_counter()
                async for rsp in assoc.c_find(ctx.id, identifier):
                    status = int(rsp.command.get(dimse.STATUS, -1))
                    if rsp.dataset:
                        datasets.append(bytes(rsp.dataset))
                took = time.perf_counter() - t0  # the answers are decoded after the clock
                out.sent += 1
                if n < min(warmup, len(queries)):
                    continue
                out.latencies.append(took)
                out.answers.append([_study_uid(d, ctx.transfer_syntax) for d in datasets])
                out.statuses.append(status)
        finally:
            await assoc.release()
        return out

    return asyncio.run(run())


def _study_uid(data: bytes, transfer_syntax: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(io.BytesIO(data), transfer_syntax == IMPLICIT_LE, True)
    return str(ds.get("StudyInstanceUID", "")).rstrip("\x00 ")


# ---------------------------------------------------------------- C-MOVE, C-GET


@dataclass
class RetrieveRun:
    seconds: float
    returncode: int
    output: str


def _retrieve_args(calling_ae: str, called_ae: str, study_uid: str, port: int) -> list[str]:
    return [
        "-S",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(port),
    ]


def movescu(
    port: int, called_ae: str, destination_ae: str, study_uid: str, timeout: float
) -> RetrieveRun:
    args = _retrieve_args("BENCHMOVE", called_ae, study_uid, port)
    return _run([dcmtk_tool("movescu"), "-aem", destination_ae, *args], timeout)


def getscu(port: int, called_ae: str, study_uid: str, out: Path, timeout: float) -> RetrieveRun:
    out.mkdir(parents=True, exist_ok=True)
    args = _retrieve_args("BENCHGET", called_ae, study_uid, port)
    return _run([dcmtk_tool("getscu"), "+B", "-od", str(out), *args], timeout)


def _run(cmd: list[str], timeout: float) -> RetrieveRun:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(cmd[0]).name} did not finish in {timeout:.0f}s") from None
    return RetrieveRun(time.perf_counter() - start, proc.returncode, proc.stdout)
