"""`pacsgrid verify`: prove that what a legacy source holds is in the archive.

Against a folder: every DICOM file is looked up by its SOP Instance UID, the archived object is
read back the way a retrieve reads it (`Archive.read`: a copy whose SHA-256 does not match the
index is never served) and the SHA-256 of its PixelData value is compared with the file's.

Against a PACS: every study (found as `migrate pull` finds them) is listed at IMAGE level and
compared instance by instance; then `sample` random studies among the oldest half are
retrieved end to end: C-GET from the source and `Archive.read` of every copy here, comparing
the pixel data instance by instance.

Findings: missing (in the source, not in the archive), extra (in an archived study, not in the
source's), moved (in the archive, filed under another study), mismatch (pixel data differ, or
a copy cannot be read), conflict (a folder holds different objects under one SOP Instance
UID and the archive holds one of them), unreadable (a source file without UIDs). The report
is a CSV of every finding plus a short Markdown summary; missing or mismatched items make it
a failure.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import io
import logging
import random
import threading
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacsgrid.archive import Archive
from pacsgrid.dicom import dimse
from pacsgrid.dicomfile.header import DEFLATED_LE, EXPLICIT_BE, IMPLICIT_LE, scan
from pacsgrid.dicomfile.part10 import split_part10
from pacsgrid.errors import InvalidDataset, PacsgridError
from pacsgrid.migrate.discover import discover
from pacsgrid.migrate.importer import NotDicom, classify, iter_files, run_parallel
from pacsgrid.migrate.legacy import LegacyError, LegacySession
from pacsgrid.model import Level
from pacsgrid.progress import Progress
from pacsgrid.settings import PeerSettings

log = logging.getLogger(__name__)

FAILING = ("missing", "mismatch")
CONFLICT = "; another file with this SOP Instance UID matches the archived object"


@dataclass(frozen=True)
class Finding:
    kind: str  # missing | extra | moved | mismatch | unreadable | sampled
    study_uid: str
    sop_uid: str
    source_item: str  # file path, or the source AE
    detail: str = ""


@dataclass
class VerifyReport:
    source: str
    studies: int = 0
    instances: int = 0  # distinct instances (SOP Instance UIDs) in the source
    present: int = 0  # of those, in the archive
    skipped: int = 0  # files that are not instances (DICOMDIR, not DICOM)
    duplicates: int = 0  # files holding an instance another file holds too
    sampled: list[str] = field(default_factory=list)  # studies retrieved end to end
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    @property
    def ok(self) -> bool:
        return not self.interrupted and not any(f.kind in FAILING for f in self.findings)


# ---------------------------------------------------------------- pixel data


def pixel_digest(data: bytes | memoryview, transfer_syntax: str | None = None) -> str:
    """SHA-256 of the PixelData value as stored ('' when there is none).

    `transfer_syntax` None: `data` is a Part 10 file (or a bare dataset) read from disk;
    otherwise a dataset received over the network in that syntax."""
    import pydicom
    from pydicom.filereader import read_dataset

    ds: Any
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if transfer_syntax is None:
                ds = pydicom.dcmread(io.BytesIO(bytes(data)), force=True)
            else:
                if transfer_syntax == DEFLATED_LE:  # a raw deflate stream on the wire
                    data = zlib.decompress(bytes(data), -zlib.MAX_WBITS)
                ds = read_dataset(
                    io.BytesIO(bytes(data)),
                    transfer_syntax == IMPLICIT_LE,
                    transfer_syntax != EXPLICIT_BE,
                )
            if "PixelData" not in ds:
                return ""
            value = ds["PixelData"].value
        except Exception as e:  # both sides fail alike on the same bytes
            return f"unparseable ({type(e).__name__})"
    return hashlib.sha256(bytes(value or b"")).hexdigest()


def _archived_pixels(archive: Archive, sop_uid: str) -> tuple[str, str, str]:
    """(study UID, transfer syntax, pixel digest) of the archived object, read as a retrieve
    reads it; raises PacsgridError when it is absent or no copy is readable."""
    record = archive.instance(sop_uid)
    if record is None:
        raise PacsgridError("not in the archive")
    obj = archive.read(record)
    return record.study_uid, obj.transfer_syntax, pixel_digest(obj.data)


# ---------------------------------------------------------------- folders


@dataclass(frozen=True)
class _FileCheck:
    path: str
    sop_uid: str = ""
    study_uid: str = ""
    skipped: bool = False
    finding: Finding | None = None
    matched: bool = False  # the archived object has this file's pixel data


def _check_file(archive: Archive, root: Path, path: Path) -> _FileCheck:
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    data = path.read_bytes()
    try:
        classify(data, path)
        p10 = split_part10(data)
        header = scan(memoryview(data)[p10.dataset_offset :], p10.transfer_syntax)
    except NotDicom:
        return _FileCheck(rel, skipped=True)
    except InvalidDataset as e:
        return _FileCheck(rel, finding=Finding("unreadable", "", "", rel, e.reason))
    sop, study = header.sop_instance_uid, header.study_uid
    if not sop:
        return _FileCheck(rel, finding=Finding("unreadable", study, "", rel, "no SOPInstanceUID"))
    try:
        archived_study, _, archived = _archived_pixels(archive, sop)
    except PacsgridError as e:
        kind = "missing" if str(e) == "not in the archive" else "mismatch"
        return _FileCheck(rel, sop, study, finding=Finding(kind, study, sop, rel, str(e)))
    source = pixel_digest(data)
    if source != archived:
        detail = (
            f"pixel data SHA-256 {source[:16] or 'none'} here, {archived[:16] or 'none'} archived"
        )
        return _FileCheck(rel, sop, study, finding=Finding("mismatch", study, sop, rel, detail))

    if archived_study != study:
        detail = f"filed in study {archived_study}"
        return _FileCheck(
            rel, sop, study, finding=Finding("moved", study, sop, rel, detail), matched=True
        )
    return _FileCheck(rel, sop, study, matched=True)


def verify_folder(
    archive: Archive,
    src: Path,
    *,
    jobs: int = 4,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> VerifyReport:
    report = VerifyReport(str(src.resolve()))
    started = time.monotonic()
    files = list(iter_files([src]))
    prog = progress or Progress("verify", bar=False)
    prog.set_total(len(files))
    by_study: dict[str, set[str]] = {}
    matched: set[str] = set()
    seen: set[str] = set()
    found: set[str] = set()  # in the archive
    root = src.resolve()

    def record(path: Path, fut: Future[_FileCheck]) -> None:
        try:
            check = fut.result()
        except OSError as e:
            check = _FileCheck(str(path), finding=Finding("unreadable", "", "", str(path), str(e)))
        if check.skipped:
            report.skipped += 1
            prog.advance("skipped")
            return
        if check.sop_uid:
            # An instance is counted once however many files of the folder hold it: the
            # archive keeps one object per SOP Instance UID.
            if check.sop_uid in seen:
                report.duplicates += 1
            seen.add(check.sop_uid)
            by_study.setdefault(check.study_uid, set()).add(check.sop_uid)
        if check.matched:
            matched.add(check.sop_uid)
        if check.finding is not None:
            report.findings.append(check.finding)
        if check.sop_uid and (check.finding is None or check.finding.kind != "missing"):
            found.add(check.sop_uid)
        prog.advance(check.finding.kind if check.finding else "ok")

    report.interrupted = run_parallel(
        (p.resolve() for p in files),
        lambda p: _check_file(archive, root, p),
        record,
        jobs=jobs,
        stop=stop or threading.Event(),
        name="verify",
    )
    report.studies = len(by_study)
    report.instances = len(seen)
    report.present = len(found)
    # Two source files with one SOP Instance UID but different pixel data: the archive keeps
    # the first it stored (dicom.on_duplicate). When one of them matches, the others are
    # conflicts within the source, not damage in the archive.
    report.findings = [
        Finding("conflict", f.study_uid, f.sop_uid, f.source_item, f.detail + CONFLICT)
        if f.kind == "mismatch" and f.sop_uid in matched and f.detail.startswith("pixel data")
        else f
        for f in report.findings
    ]
    for study, sops in sorted(by_study.items()):
        for extra in sorted(archive.study_sop_uids(study) - sops):
            report.findings.append(Finding("extra", study, extra, "", "not in the folder"))
    if progress is None:
        prog.close()
    report.seconds = time.monotonic() - started
    return report


# ---------------------------------------------------------------- a PACS


async def _verify_pacs(
    archive: Archive,
    peer: PeerSettings,
    since: dt.date | None,
    until: dt.date | None,
    find_limit: int,
    sample: int,
    parallel: int,
    prog: Progress,
    stop: threading.Event,
    seed: int | None,
) -> VerifyReport:
    source = f"{peer.ae_title}@{peer.host}:{peer.port}"
    report = VerifyReport(source)
    our_ae = archive.settings.dicom.ae_title
    loop = asyncio.get_running_loop()
    async with LegacySession(peer, our_ae) as session:
        found = await discover(session, since, until, find_limit)
    studies = sorted(found.studies.values(), key=lambda s: (s.study_date, s.study_uid))
    report.studies = len(studies)
    prog.set_total(len(studies))
    classes: dict[str, set[str]] = {}
    complete: list[str] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for s in studies:
        queue.put_nowait(s.study_uid)

    async def worker() -> None:
        async with LegacySession(peer, our_ae) as session:
            while not queue.empty() and not stop.is_set():
                study = queue.get_nowait()
                keys = {"StudyInstanceUID": study, "SOPInstanceUID": "", "SOPClassUID": ""}
                listing = await session.find(Level.IMAGE, keys)
                sops = {r["SOPInstanceUID"] for r in listing.rows if r.get("SOPInstanceUID")}
                classes[study] = {r["SOPClassUID"] for r in listing.rows if r.get("SOPClassUID")}
                have = await loop.run_in_executor(None, archive.has_instances, list(sops))
                here = await loop.run_in_executor(None, archive.study_sop_uids, study)
                report.instances += len(sops)
                report.present += len(have)
                for sop in sorted(sops - have):
                    report.findings.append(Finding("missing", study, sop, source))
                for sop in sorted((sops & have) - here):
                    report.findings.append(Finding("moved", study, sop, source, "another study"))
                for sop in sorted(here - sops):
                    report.findings.append(Finding("extra", study, sop, "", "not in the source"))
                if not listing.complete:
                    report.findings.append(
                        Finding(
                            "mismatch",
                            study,
                            "",
                            source,
                            f"the source's instance list is incomplete (status "
                            f"0x{listing.status:04X})",
                        )
                    )
                if sops and sops <= have:
                    complete.append(study)
                prog.advance("ok" if sops <= have else "missing")

    await asyncio.gather(*(worker() for _ in range(max(1, min(parallel, len(studies) or 1)))))
    report.interrupted = stop.is_set()
    dates = {s.study_uid: s.study_date for s in studies}
    old = sorted(complete, key=lambda u: (dates.get(u, ""), u))[: max(1, len(complete) // 2)]
    rng = random.Random(seed)
    for study in rng.sample(old, min(sample, len(old))) if not stop.is_set() else []:
        report.sampled.append(study)
        report.findings += await _end_to_end(archive, peer, study, sorted(classes[study]))
    return report


async def _end_to_end(
    archive: Archive, peer: PeerSettings, study: str, classes: list[str]
) -> list[Finding]:
    """C-GET the study from the source, read it from the archive, compare pixel data."""
    source = f"{peer.ae_title}@{peer.host}:{peer.port}"
    loop = asyncio.get_running_loop()
    received: dict[str, tuple[str, str]] = {}  # sop -> (transfer syntax, pixel digest)

    async def store(sop_class: str, dataset: bytes, ts: str) -> int:
        def digest() -> tuple[str, str]:
            header = scan(dataset, ts)
            return header.sop_instance_uid, pixel_digest(dataset, ts)

        sop, pixels = await loop.run_in_executor(None, digest)
        received[sop] = (ts, pixels)
        return dimse.SUCCESS

    findings: list[Finding] = []
    note = ""
    try:
        async with LegacySession(
            peer, archive.settings.dicom.ae_title, get_classes=classes, on_store=store
        ) as session:
            result = await session.get(Level.STUDY, {"StudyInstanceUID": study})
        if result.status != dimse.SUCCESS:
            note = f"source C-GET status 0x{result.status:04X} ({result.failed} failed)"
    except LegacyError as e:
        note = f"source C-GET failed ({e}); archive copies read only"
    sops = await loop.run_in_executor(None, archive.study_sop_uids, study)
    bad = 0
    for sop in sorted(sops | set(received)):
        try:
            _, ts, pixels = await loop.run_in_executor(None, _archived_pixels, archive, sop)
        except PacsgridError as e:
            findings.append(Finding("mismatch", study, sop, source, f"archive read: {e}"))
            bad += 1
            continue
        theirs = received.get(sop)
        if theirs is not None and theirs[0] == ts and theirs[1] != pixels:
            findings.append(Finding("mismatch", study, sop, source, "pixel data differ"))
            bad += 1
    compared = sum(1 for s in sops if s in received)
    findings.append(
        Finding(
            "sampled",
            study,
            "",
            source,
            f"{len(sops)} instances read from the archive, {compared} compared with the "
            f"source, {bad} bad{'; ' + note if note else ''}",
        )
    )
    return findings


def verify_pacs(
    archive: Archive,
    peer: PeerSettings,
    *,
    since: dt.date | None = None,
    until: dt.date | None = None,
    find_limit: int = 0,
    sample: int = 3,
    parallel: int = 2,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    seed: int | None = None,
) -> VerifyReport:
    started = time.monotonic()
    prog = progress or Progress("verify", unit="studies", bar=False)
    report = asyncio.run(
        _verify_pacs(
            archive,
            peer,
            since,
            until,
            find_limit,
            sample,
            parallel,
            prog,
            stop or threading.Event(),
            seed,
        )
    )
    if progress is None:
        prog.close()
    report.seconds = time.monotonic() - started
    return report


# ---------------------------------------------------------------- the report


def write_report(report: VerifyReport, out: Path) -> tuple[Path, Path]:
    """Write `verify.csv` (every finding) and `verify.md` (the summary) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "verify.csv", out / "verify.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "study_instance_uid", "sop_instance_uid", "source_item", "detail"])
        for f in report.findings:
            w.writerow([f.kind, f.study_uid, f.sop_uid, f.source_item, f.detail])
    counts = Counter(f.kind for f in report.findings)
    verdict = "PASS: nothing is missing" if report.ok else "FAIL"
    if report.interrupted:
        verdict = "INCOMPLETE: interrupted before the end"
    lines = [
        f"# pacsgrid verify: {verdict}",
        "",
        f"- source: `{report.source}`",
        f"- when: {dt.datetime.now().isoformat(timespec='seconds')}, {report.seconds:.1f} s",
        f"- studies: {report.studies}; instances in the source: {report.instances}; "
        f"in the archive: {report.present}",
        "",
        "| finding | count | meaning |",
        "|---|---|---|",
        f"| missing | {counts['missing']} | in the source, not in the archive |",
        f"| mismatch | {counts['mismatch']} | pixel data differ, or no readable copy |",
        f"| moved | {counts['moved']} | in the archive, filed under another study |",
        f"| extra | {counts['extra']} | in an archived study, not in the source |",
        f"| conflict | {counts['conflict']} | the source has other objects under the same "
        "SOP Instance UID; the archive holds one of them |",
        f"| unreadable | {counts['unreadable']} | source files without usable UIDs |",
    ]
    if report.skipped:
        lines.append(f"| skipped | {report.skipped} | DICOMDIR or not DICOM |")
    if report.duplicates:
        lines.append(
            f"| duplicate files | {report.duplicates} | more files holding an instance "
            "already counted (same SOP Instance UID) |"
        )
    if report.sampled:
        lines += ["", "End-to-end retrieves:", ""]
        lines += [f"- `{f.study_uid}`: {f.detail}" for f in report.findings if f.kind == "sampled"]
    bad = [f for f in report.findings if f.kind in FAILING][:20]
    if bad:
        lines += ["", "First problems (all of them in verify.csv):", ""]
        lines += [
            f"- {f.kind} `{f.sop_uid or f.study_uid}` {f.source_item} {f.detail}" for f in bad
        ]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
