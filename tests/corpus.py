"""The DICOM files tests use, and what an archive should do with each.

With the shared corpus (`../shared/testdata/dicom`, or $PACSGRID_TEST_CORPUS) the expectation
comes from its MANIFEST.tsv, written by people, not by this project. In a user's clone without
it, the tests fall back to the DICOM files that the installed pydicom and pynetdicom packages
carry, classified by pydicom (an independent reader). Those packages keep deliberately broken
files beside good ones, so "accept" is strict: a Part 10 file with complete file meta, parsed by
pydicom without a single warning, with the three UIDs and a SOP class, and whose top-level
elements all have the even length they declare (not truncated). A media directory is not an
instance; anything else is reject-or-tolerate (the archive may refuse it or keep it, but must
answer and keep serving).
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PACSGRID_TEST_CORPUS", REPO.parent / "shared/testdata/dicom"))

ACCEPT = ("accept", "accept-lenient")


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    expect: str  # accept | accept-lenient | not-an-instance (DICOMDIR) | reject-or-tolerate
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    transfer_syntax: str

    @property
    def accepted(self) -> bool:
        return self.expect in ACCEPT


def shared_available() -> bool:
    return (SHARED / "MANIFEST.tsv").is_file()


@functools.cache
def corpus() -> tuple[CorpusFile, ...]:
    if shared_available():
        with open(SHARED / "MANIFEST.tsv", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        return tuple(
            CorpusFile(
                SHARED / r["path"],
                r["expect"],
                r["sop_class_uid"],
                r["sop_instance_uid"],
                r["study_instance_uid"],
                r["transfer_syntax_uid"] or "1.2.840.10008.1.2",
            )
            for r in rows
            if r["expect"] != "expect"
        )
    return _fallback()


def _fallback() -> tuple[CorpusFile, ...]:
    import pydicom
    import pynetdicom

    dirs = [
        Path(pydicom.__file__).parent / "data/test_files",
        Path(pynetdicom.__file__).parent / "tests/dicom_files",
    ]
    out = []
    for d in dirs:
        for path in sorted(d.rglob("*")):
            if path.is_file() and path.suffix.lower() in (".dcm", "") and path.stat().st_size:
                out.append(_classify(path))
    return tuple(out)


class _Complaints(logging.Handler):
    """Collects what pydicom logs at WARNING and above while one file is read."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


META_KEYS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")


def _whole(ds: object) -> bool:
    """Every top-level element with a defined length holds that many bytes, and it is even:
    pydicom reads a truncated last element silently, DCMTK and pacsgrid refuse it."""
    for raw in getattr(ds, "_dict", {}).values():
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if length is None or not isinstance(value, bytes):
            continue
        if length == 0xFFFFFFFF:
            if getattr(raw, "tag", 0) == 0x7FE00010 and not _fragments_even(value):
                return False
            continue
        if len(value) != length or length % 2:
            return False
    return True


def _fragments_even(value: bytes) -> bool:
    """Encapsulated pixel data: every item (offset table, fragments) has an even length."""
    pos = 0
    while pos + 8 <= len(value):
        group, elem, length = struct.unpack_from("<HHI", value, pos)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return True
        if (group, elem) != (0xFFFE, 0xE000) or length % 2:
            return False
        pos += 8 + length
    return pos == len(value)


# Broken on purpose in ways that neither pydicom nor the checks above notice.
KNOWN_BROKEN = {
    "693_J2KI.dcm": "group length (7FE0,0000) declares 105,406 bytes, the file holds 1,564",
}


def _classify(path: Path) -> CorpusFile:
    import pydicom

    if path.name in KNOWN_BROKEN:
        return CorpusFile(path, "reject-or-tolerate", "", "", "", "")

    complaints = _Complaints()
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.addHandler(complaints)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=True)
            meta = getattr(ds, "file_meta", None)
            if meta is not None and meta.get("MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":
                return CorpusFile(path, "not-an-instance (DICOMDIR)", "", "", "", "")
            whole = _whole(ds)
            for _ in ds.iterall():
                pass
            strict = (
                whole
                and not caught
                and not complaints.records
                and getattr(ds, "preamble", None) is not None
                and meta is not None
                and all(meta.get(k) for k in META_KEYS)
            )
            if not strict:
                return CorpusFile(path, "reject-or-tolerate", "", "", "", "")
            uids = [
                str(ds.get(k, "") or "")
                for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
            ]
            ts = (
                str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
                if meta
                else "1.2.840.10008.1.2"
            )
    except Exception:
        return CorpusFile(path, "reject-or-tolerate", "", "", "", "")
    finally:
        pydicom_log.removeHandler(complaints)
    if all(uids):
        return CorpusFile(path, "accept", uids[0], uids[1], uids[2], ts)
    return CorpusFile(path, "reject-or-tolerate", "", "", "", "")


def accepted() -> list[CorpusFile]:
    return [f for f in corpus() if f.accepted]


def invalid() -> list[CorpusFile]:
    return [f for f in corpus() if f.expect == "reject-or-tolerate"]


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes after the file meta) of a Part 10 file, located by
    pydicom rather than by pacsgrid's own reader."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, force=True)
        meta = _read_file_meta_info(fh)
        return str(meta.get("TransferSyntaxUID", "")), fh.read()


def pixel_data(path: Path) -> bytes | None:
    """The raw PixelData value (encapsulated or native) of a file, as pydicom reads it."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
    if "PixelData" not in ds:
        return None
    return bytes(ds["PixelData"].value)
