"""The DICOM files tests use, and what an archive should do with each.

With the shared corpus (`../shared/testdata/dicom`, or $PACSGRID_TEST_CORPUS) the expectation
comes from its MANIFEST.tsv, written by people, not by this project. In a user's clone without
it, the tests fall back to the DICOM files that the installed pydicom and pynetdicom packages
carry, classified by pydicom (an independent reader): parseable with the three UIDs and a SOP
class -> accept, media directory -> not an instance, anything else -> reject-or-tolerate.
"""

from __future__ import annotations

import csv
import functools
import os
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


def _classify(path: Path) -> CorpusFile:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            meta = getattr(ds, "file_meta", None)
            if meta is not None and meta.get("MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":
                return CorpusFile(path, "not-an-instance (DICOMDIR)", "", "", "", "")
            for _ in ds.iterall():
                pass
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
