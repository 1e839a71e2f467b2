"""The DICOM files tests use, and what an archive should do with each.

With the shared corpus (`../shared/testdata/dicom`, or $PACSGRID_TEST_CORPUS; point it at a
folder without MANIFEST.tsv to test as a fresh clone does) the expectation comes from its
MANIFEST.tsv, written by people, not by this project. In a user's clone without it, the tests
fall back to the DICOM files that the installed pydicom and pynetdicom packages carry (pydicom's
character-set samples included), classified by pydicom (an independent reader). Those packages
keep deliberately broken files beside good ones, so "accept" is strict: a Part 10 file with
complete file meta, parsed by pydicom without a single warning, with the three UIDs and a SOP
class, and whose top-level elements all have the even length they declare (not truncated). A
media directory is not an instance; anything else is reject-or-tolerate (the archive may refuse
it or keep it, but must answer and keep serving).

Either way the files tests/synthetic.py writes are added (multi-frame and vendor objects, and
files broken in one known way each), so every input class in `CLASSES` has files with or
without ../shared (tests/test_corpus.py checks it).
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PACSGRID_TEST_CORPUS", REPO.parent / "shared/testdata/dicom"))

ACCEPT = ("accept", "accept-lenient")

# Input classes (a file may be in several). "broken" is every reject-or-tolerate file.
CLASSES = (
    "plain",
    "compressed",
    "non-Latin character set",
    "multi-frame",
    "vendor",
    "DICOMDIR",
    "broken",
    "truncated",
    "bad length",
    "missing UIDs",
    "not DICOM",
)
UNCOMPRESSED = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
)
LATIN = ("", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 100", "ISO 2022 IR 100")
UNICODE = ("ISO_IR 192", "GB18030", "GBK")  # may hold any script: look at the names
DATASET_MISMATCH = "A900"  # docs/dicom.md: a dataset without its SOP Instance, Study or Series UID


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    expect: str  # accept | accept-lenient | not-an-instance (DICOMDIR) | reject-or-tolerate
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    transfer_syntax: str
    # The failure a C-STORE of this file must get when that is known independently of
    # pacsgrid (MANIFEST note, pydicom, or how tests/synthetic.py broke it): "A900", "C000",
    # "failure" (any failure status); "" when not known.
    status: str = ""
    classes: frozenset[str] = frozenset()

    @property
    def accepted(self) -> bool:
        return self.expect in ACCEPT


def shared_available() -> bool:
    return (SHARED / "MANIFEST.tsv").is_file()


@functools.cache
def corpus() -> tuple[CorpusFile, ...]:
    found = _shared() if shared_available() else _fallback()
    return found + _synthetic()


def _shared() -> tuple[CorpusFile, ...]:
    with open(SHARED / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    out = []
    for r in rows:
        if r["expect"] == "expect":
            continue
        ts = r["transfer_syntax_uid"] or "1.2.840.10008.1.2"
        note = r["note"]
        frames = re.search(r"multiframe \((\d+) frames\)", note)
        out.append(
            CorpusFile(
                SHARED / r["path"],
                r["expect"],
                r["sop_class_uid"],
                r["sop_instance_uid"],
                r["study_instance_uid"],
                ts,
                DATASET_MISMATCH if "missing required UID" in note else "",
                _classes(
                    SHARED / r["path"],
                    r["expect"],
                    ts,
                    r["charset"],
                    int(frames.group(1)) if frames else 1,
                    "private tags" in note,
                    truncated="truncated" in note,
                    missing_uids="missing required UID" in note,
                ),
            )
        )
    return tuple(out)


def _non_latin(charset: str, path: Path) -> bool:
    """Text in a character set beyond ASCII and Latin-1: declared so, or Unicode (UTF-8,
    GB18030) with names that Latin-1 cannot write."""
    terms = {term.strip() for term in charset.split("\\")}
    if terms <= set(LATIN):
        return False
    if not terms <= set(LATIN + UNICODE):
        return True
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    names = [str(ds.get(k, "") or "") for k in ("PatientName", "ReferringPhysicianName")]
    return any(not n.isascii() and not _latin1(n) for n in names)


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _classes(
    path: Path,
    expect: str,
    transfer_syntax: str,
    charset: str,
    frames: int,
    private: bool,
    *,
    truncated: bool = False,
    missing_uids: bool = False,
) -> frozenset[str]:
    out = set()
    if expect.startswith("not-an-instance"):
        return frozenset({"DICOMDIR"})
    if expect == "reject-or-tolerate":
        out.add("broken")
    if transfer_syntax and transfer_syntax not in UNCOMPRESSED:
        out.add("compressed")
    if _non_latin(charset, path):
        out.add("non-Latin character set")
    if frames > 1:
        out.add("multi-frame")
    if private:
        out.add("vendor")
    if truncated:
        out.add("truncated")
    if missing_uids:
        out.add("missing UIDs")
    if not out & {"broken", "compressed"}:
        out.add("plain")
    return frozenset(out)


def _synthetic() -> tuple[CorpusFile, ...]:
    import pydicom

    from tests import synthetic

    out = []
    for f in synthetic.files():
        ids = ("", "", "", "")
        if f.expect in ACCEPT:
            ds = pydicom.dcmread(f.path, stop_before_pixels=True)
            ids = (
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                str(ds.StudyInstanceUID),
                str(ds.file_meta.TransferSyntaxUID),
            )
        classes = set(f.classes)
        if f.expect in ACCEPT and "compressed" not in classes:
            classes.add("plain")
        out.append(CorpusFile(f.path, f.expect, *ids, f.status, frozenset(classes)))
    return tuple(out)


def _fallback() -> tuple[CorpusFile, ...]:
    import pydicom
    import pynetdicom

    dirs = [
        Path(pydicom.__file__).parent / "data/test_files",
        Path(pydicom.__file__).parent / "data/charset_files",  # pydicom.data.get_charset_files
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
        return CorpusFile(path, "reject-or-tolerate", "", "", "", "", "", frozenset({"broken"}))

    complaints = _Complaints()
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.addHandler(complaints)
    broken = frozenset({"broken"})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=True)
            meta = getattr(ds, "file_meta", None)
            if meta is not None and meta.get("MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":
                return CorpusFile(
                    path, "not-an-instance (DICOMDIR)", "", "", "", "", "", frozenset({"DICOMDIR"})
                )
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
                return CorpusFile(path, "reject-or-tolerate", "", "", "", "", "", broken)
            uids = [
                str(ds.get(k, "") or "")
                for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
            ]
            ts = (
                str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
                if meta
                else "1.2.840.10008.1.2"
            )
            charset = ds.get("SpecificCharacterSet", "") or ""
            charset = "\\".join(charset) if isinstance(charset, list | tuple) else str(charset)
            frames = str(ds.get("NumberOfFrames", "") or "1")
            private = any(elem.tag.is_private for elem in ds)
    except Exception:
        return CorpusFile(path, "reject-or-tolerate", "", "", "", "", "", broken)
    finally:
        pydicom_log.removeHandler(complaints)
    if all(uids):
        return CorpusFile(
            path,
            "accept",
            uids[0],
            uids[1],
            uids[2],
            ts,
            "",
            _classes(path, "accept", ts, charset, int(frames) if frames.isdigit() else 1, private),
        )
    # Sound in every other respect, pydicom says, but without a required UID: A900.
    missing = uids[0] and not all(uids[1:])
    return CorpusFile(
        path,
        "reject-or-tolerate",
        "",
        "",
        "",
        "",
        DATASET_MISMATCH if missing else "",
        _classes(path, "reject-or-tolerate", ts, charset, 1, private, missing_uids=bool(missing)),
    )


def accepted() -> list[CorpusFile]:
    return [f for f in corpus() if f.accepted]


def invalid() -> list[CorpusFile]:
    return [f for f in corpus() if f.expect == "reject-or-tolerate"]


def in_class(name: str) -> list[CorpusFile]:
    assert name in CLASSES, name
    return [f for f in corpus() if name in f.classes]


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
