"""DICOM Part 10 files: split a file into file meta and dataset bytes, and build file meta.

Every object pacsgrid stores is a complete Part 10 file: a 128-byte preamble, "DICM", the file
meta group (explicit VR little endian, with its group length) and the dataset bytes exactly as
they were received. Files that come in from folders may lack the preamble or the meta group
entirely (older archives wrote bare datasets); `split_part10` recognises those too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pacsgrid.dicomfile.header import _VRS, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, LONG_VRS, Buffer
from pacsgrid.errors import InvalidDataset

IMPLEMENTATION_CLASS_UID = "2.25.84055614190599736228397704164628813299"
IMPLEMENTATION_VERSION = "PACSGRID_010"
PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True, slots=True)
class Part10:
    """A Part 10 file seen as meta values plus the offset where the dataset starts."""

    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    source_ae: str
    dataset_offset: int
    has_meta: bool


def split_part10(data: Buffer) -> Part10:
    """Locate the dataset in `data`; raise InvalidDataset when it is not DICOM at all."""
    pos = 0
    if len(data) >= 132 and data[128:132] == b"DICM":
        pos = 132
    elif data[:4] == b"DICM":
        pos = 4
    if data[pos : pos + 2] == b"\x02\x00" and data[pos + 4 : pos + 6] in _VRS:
        return _read_meta(data, pos)
    if pos:
        raise InvalidDataset("DICM marker without a file meta group")
    return Part10(_guess_syntax(data), "", "", "", 0, has_meta=False)


def _read_meta(data: Buffer, pos: int) -> Part10:
    values: dict[int, str] = {}
    end = len(data)
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr not in _VRS:
            raise InvalidDataset(f"file meta element (0002,{elem:04X}) has no valid VR")
        if vr in LONG_VRS:
            if pos + 12 > end:
                raise InvalidDataset("file meta group is truncated")
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8
        if length == 0xFFFFFFFF or pos + length > end:
            raise InvalidDataset("file meta group is truncated")
        if vr in (b"UI", b"AE", b"SH"):
            values[elem] = data[pos : pos + length].decode("ascii", "replace").rstrip("\x00 ")
        pos += length
    ts = values.get(0x0010, "")
    if not ts:
        raise InvalidDataset("file meta has no TransferSyntaxUID")
    return Part10(
        ts,
        values.get(0x0002, ""),
        values.get(0x0003, ""),
        values.get(0x0016, ""),
        pos,
        has_meta=True,
    )


def _guess_syntax(data: Buffer) -> str:
    """A bare dataset: which byte order, and does the first element carry a VR?

    Bare datasets start with a low group (0008 nearly always); anything else is not DICOM.
    """
    if len(data) < 8:
        raise InvalidDataset("too short to be DICOM")
    (le_group,) = struct.unpack_from("<H", data, 0)
    (be_group,) = struct.unpack_from(">H", data, 0)
    explicit = data[4:6] in _VRS
    if 0x0002 < le_group <= 0x0020:
        return EXPLICIT_LE if explicit else IMPLICIT_LE
    if 0x0002 < be_group <= 0x0020 and explicit:
        return EXPLICIT_BE
    raise InvalidDataset("not DICOM: no preamble, no file meta, no plausible first element")


def _element(tag_elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, tag_elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_elem, vr, len(value)) + value


def build_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = ""
) -> bytes:
    """Preamble, DICM and a complete file meta group for a dataset we are about to store."""
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", sop_class_uid.encode("ascii", "replace")),
            _element(0x0003, b"UI", sop_instance_uid.encode("ascii", "replace")),
            _element(0x0010, b"UI", transfer_syntax.encode("ascii")),
            _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii")),
            *(
                (_element(0x0016, b"AE", source_ae.encode("ascii", "replace")),)
                if source_ae
                else ()
            ),
        )
    )
    return PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body
