"""Test files this suite writes itself, with pydicom: every class of input exists on a fresh
clone (without ../shared), and each broken file is broken in exactly one known way.

Good objects: multi-frame images (native and RLE, several fragments), and a vendor object
(private creator blocks, a private sequence, an OB blob the way vendors keep their headers).
Broken files, each made from a good object: truncated inside a value and inside an element
header, a length that runs past the end, a length that is off by two (the walk misaligns),
missing SOP Instance / Study / Series Instance UIDs, and files that are not DICOM at all.

What the archive must answer for each comes from docs/dicom.md ("Duplicates and untidy data"):
a truncated dataset gets C000 (cannot understand), one without the three UIDs A900. UIDs are
derived from the file name, so every run writes the same files.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CANNOT_UNDERSTAND = "C000"  # docs/dicom.md: unparseable or truncated
DATASET_MISMATCH = "A900"  # docs/dicom.md: missing SOP Instance, Study or Series Instance UID
ANY_FAILURE = "failure"  # refused, with whichever failure status


@dataclass(frozen=True)
class Synthetic:
    path: Path
    expect: str  # as in corpus.CorpusFile
    status: str  # the failure a C-STORE of it must get ("" when it must be stored)
    classes: frozenset[str]
    note: str


def uid(name: str) -> str:
    """A stable UID under 2.25 (a UUID-derived root needs no registration)."""
    return "2.25." + str(int.from_bytes(hashlib.sha256(name.encode()).digest()[:15], "big"))


def _base(name: str, sop_class: str, modality: str) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(name)
    ds.StudyDate = "20210304"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "SYN" + hashlib.sha256(name.encode()).hexdigest()[:8].upper()
    ds.Modality = modality
    ds.PatientName = "Synthétique^Müller"
    ds.PatientID = "SYNTH-" + name.split("-")[0].upper()
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uid(name.split("-")[0] + "-study")
    ds.SeriesInstanceUID = uid(name + "-series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _frames(d: Any, frames: int, rows: int = 16, columns: int = 16) -> None:
    d.SamplesPerPixel = 1
    d.PhotometricInterpretation = "MONOCHROME2"
    d.Rows, d.Columns = rows, columns
    d.BitsAllocated = d.BitsStored = 8
    d.HighBit = 7
    d.PixelRepresentation = 0
    if frames > 1:
        d.NumberOfFrames = frames
    d.PixelData = bytes(
        (i * 7 + f * 31) % 256 for f in range(frames) for i in range(rows * columns)
    )


def _save(ds: Any, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def multiframe_native(out: Path) -> Path:
    """Multi-frame Grayscale Byte Secondary Capture, 4 frames, explicit VR little endian."""
    ds = _base("multiframe-native", "1.2.840.10008.5.1.4.1.1.7.2", "OT")
    _frames(ds, 4)
    return _save(ds, out / "multiframe-native.dcm")


def multiframe_rle(out: Path) -> Path:
    """The same kind of object, 3 frames, RLE Lossless: one fragment per frame."""
    from pydicom.uid import RLELossless

    ds = _base("multiframe-rle", "1.2.840.10008.5.1.4.1.1.7.2", "OT")
    _frames(ds, 3)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    return _save(ds, out / "multiframe-rle.dcm")


def vendor_object(out: Path) -> Path:
    """A CT image the way vendors write them: private creator blocks with text, numbers, an
    OB header blob and a private sequence, next to the standard attributes."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = _base("vendor-ct", "1.2.840.10008.5.1.4.1.1.2", "CT")
    ds.Manufacturer = "ACME MEDICAL"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    _frames(ds, 1, 8, 8)
    csa = ds.private_block(0x0029, "ACME CSA HEADER", create=True)
    csa.add_new(0x08, "CS", "IMAGE NUM 4")
    csa.add_new(0x10, "OB", b"SV10\x04\x03\x02\x01" + bytes(range(56)))
    gems = ds.private_block(0x0043, "ACME_PARM_01", create=True)
    gems.add_new(0x01, "SS", 42)
    gems.add_new(0x02, "LO", "scanner-room-3")
    item = Dataset()
    item.add_new(0x00190010, "LO", "ACME NESTED")
    item.add_new(0x00191001, "DS", "1.5")
    seq = ds.private_block(0x0045, "ACME_SEQ", create=True)
    seq.add_new(0x01, "SQ", Sequence([item, item]))
    return _save(ds, out / "vendor-ct.dcm")


def _elements(data: bytes, start: int) -> list[tuple[int, int, int]]:
    """(tag, offset of the element, offset of its value) of the top-level explicit VR little
    endian elements from `start`, read with struct (the files here have defined lengths)."""
    out = []
    pos = start
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC", b"UR"):
            length = struct.unpack_from("<I", data, pos + 8)[0]
            value = pos + 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            value = pos + 8
        out.append(((group << 16) | elem, pos, value))
        if length == 0xFFFFFFFF:
            break
        pos = value + length
    return out


def _dataset_start(data: bytes) -> int:
    """Offset after the file meta group (0002), found by its group length."""
    (group_length,) = struct.unpack_from("<I", data, 132 + 8)
    return 132 + 12 + group_length


def broken_files(good: Path, out: Path) -> list[Synthetic]:
    """Files broken in one known way each, made from the good object `good`."""
    data = good.read_bytes()
    start = _dataset_start(data)
    elements = {tag: (at, value) for tag, at, value in _elements(data, start)}
    pixel_at, pixel_value = elements[0x7FE00010]
    name_at, _ = elements[0x00100010]
    made = []

    def write(name: str, content: bytes, status: str, note: str, *classes: str) -> None:
        path = out / name
        path.write_bytes(content)
        made.append(
            Synthetic(path, "reject-or-tolerate", status, frozenset({"broken", *classes}), note)
        )

    cut = (pixel_value + len(data)) // 2
    write(
        "broken-truncated-value.dcm",
        data[:cut],
        CANNOT_UNDERSTAND,
        "truncated: PixelData declares more bytes than remain",
        "truncated",
    )
    write(
        "broken-truncated-header.dcm",
        data[: pixel_at + 5],
        CANNOT_UNDERSTAND,
        "truncated inside the PixelData element header",
        "truncated",
    )
    bad = bytearray(data)
    struct.pack_into("<H", bad, name_at + 6, 0xFFF0)  # PatientName: 65,520 bytes, none there
    write(
        "broken-length-past-end.dcm",
        bytes(bad),
        CANNOT_UNDERSTAND,
        "PatientName declares a length that runs past the end of the file",
        "bad length",
    )
    bad = bytearray(data)
    (length,) = struct.unpack_from("<H", bad, name_at + 6)
    struct.pack_into("<H", bad, name_at + 6, length + 2)  # the walk misaligns from here
    write(
        "broken-length-off-by-two.dcm",
        bytes(bad),
        ANY_FAILURE,
        "PatientName's length is two bytes too long: every later element is misread",
        "bad length",
    )
    for missing in (
        ("SOPInstanceUID",),
        ("StudyInstanceUID",),
        ("SeriesInstanceUID",),
        ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"),
    ):
        import pydicom

        ds = pydicom.dcmread(good)
        for keyword in missing:
            delattr(ds, keyword)
        name = "broken-missing-" + "-".join(k.removesuffix("InstanceUID") for k in missing)
        path = out / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made.append(
            Synthetic(
                path,
                "reject-or-tolerate",
                DATASET_MISMATCH,
                frozenset({"broken", "missing UIDs"}),
                f"missing required UID(s): {', '.join(missing)}",
            )
        )
    for name, content in (
        ("not-dicom-text.dcm", b"These are the notes of the radiology department.\n" * 20),
        ("not-dicom-pdf.dcm", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< >>\nendobj\n" * 30),
        ("not-dicom-random.dcm", hashlib.sha256(b"seed").digest() * 64),
    ):
        path = out / name
        path.write_bytes(content)
        made.append(
            Synthetic(
                path,
                "reject-or-tolerate",
                ANY_FAILURE,
                frozenset({"broken", "not DICOM"}),
                "not a DICOM file",
            )
        )
    return made


_folder: Path | None = None


def folder() -> Path:
    """The folder holding the synthetic files (written once per test process)."""
    global _folder
    if _folder is None:
        path = Path(tempfile.mkdtemp(prefix="pacsgrid-synthetic-"))
        atexit.register(shutil.rmtree, path, True)
        _folder = path
    return _folder


def files() -> list[Synthetic]:
    """Every synthetic file, written to `folder()`."""
    out = folder()
    good = [
        Synthetic(
            multiframe_native(out),
            "accept",
            "",
            frozenset({"multi-frame"}),
            "multi-frame, 4 frames, native",
        ),
        Synthetic(
            multiframe_rle(out),
            "accept",
            "",
            frozenset({"multi-frame", "compressed"}),
            "multi-frame, 3 frames, RLE",
        ),
        Synthetic(
            vendor_object(out), "accept", "", frozenset({"vendor"}), "private tags and sequence"
        ),
    ]
    return good + broken_files(good[2].path, out)
