"""Read the header of a DICOM dataset without decoding it.

Ingest must index an object and store its bytes exactly as received. pydicom's reader builds a
full `Dataset` (0.5-1.3 ms for a small CT), which is most of the CPU budget of a C-STORE. This
scanner walks the top-level elements once with `struct`, checks that the element structure is
sound to the last byte, keeps the raw values of the attributes in `pacsgrid.model.ATTRIBUTES`,
and decodes only those (character sets through pydicom's codecs).

When the scanner meets something it does not understand, `scan()` falls back to pydicom. If
pydicom cannot parse the dataset either, the dataset is invalid.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

from pydicom.charset import CODES_TO_ENCODINGS, ESC, decode_bytes, python_encoding
from pydicom.filereader import read_dataset

from pacsgrid.errors import InvalidDataset
from pacsgrid.model import BY_TAG, REQUIRED_UIDS

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE)

LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
TEXT_VRS = frozenset(("SH", "LO", "LT", "ST", "UT", "UC", "PN"))
CHARSET_TAG = 0x00080005
PIXEL_DATA_TAG = 0x7FE00010
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)


_LE = (struct.Struct("<HH"), struct.Struct("<H"), struct.Struct("<I"))
_BE = (struct.Struct(">HH"), struct.Struct(">H"), struct.Struct(">I"))
_VR_TEXT = {vr: vr.decode() for vr in _VRS}


class ScanError(Exception):
    """The fast scanner cannot read this; the pydicom path decides."""


@dataclass(frozen=True, slots=True)
class Header:
    """Indexed attribute values (decoded text, '' when present but empty) and pixel data place."""

    transfer_syntax: str
    values: dict[str, str]
    pixel_offset: int = -1  # offset of the PixelData value in the scanned bytes, -1 if none
    pixel_length: int = -1  # -1 when absent, UNDEFINED for encapsulated

    def get(self, keyword: str) -> str:
        return self.values.get(keyword, "")

    @property
    def sop_instance_uid(self) -> str:
        return self.values.get("SOPInstanceUID", "")

    @property
    def sop_class_uid(self) -> str:
        return self.values.get("SOPClassUID", "")

    @property
    def study_uid(self) -> str:
        return self.values.get("StudyInstanceUID", "")

    @property
    def series_uid(self) -> str:
        return self.values.get("SeriesInstanceUID", "")


def scan(data: bytes | memoryview, transfer_syntax: str) -> Header:
    """Index values of a dataset (no file meta) in `transfer_syntax`; raise InvalidDataset."""
    buf = bytes(data) if isinstance(data, memoryview) else data
    if transfer_syntax == DEFLATED_LE:
        try:
            buf = zlib.decompress(buf, -zlib.MAX_WBITS)
        except zlib.error as e:
            raise InvalidDataset(f"deflated dataset does not inflate: {e}") from None
    implicit = transfer_syntax == IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    try:
        raw, pix_off, pix_len = _walk(buf, implicit, little)
        values = _decode(raw, little)
    except ScanError:
        values, pix_off, pix_len = _scan_with_pydicom(buf, implicit, little)
    header = Header(transfer_syntax, values, pix_off, pix_len)
    missing = [k for k in REQUIRED_UIDS if not header.values.get(k)]
    if missing:
        raise InvalidDataset(f"missing {', '.join(missing)}", missing_uids=True)
    return header


def _element_header(
    buf: bytes, pos: int, implicit: bool, little: bool
) -> tuple[int, str, int, int]:
    """(tag, VR, value length, value offset) of the element at `pos`.

    Implicit VR: the VR of an indexed attribute comes from the catalogue; anything else is
    reported as SQ (only the length matters to a walker that skips it).
    """
    end = len(buf)
    if pos + 8 > end:
        raise ScanError("truncated element header")
    tag_s, u16_s, u32_s = _LE if little else _BE
    group, elem = tag_s.unpack_from(buf, pos)
    tag = (group << 16) | elem
    if implicit:
        attr = BY_TAG.get(tag)
        vr = attr.vr if attr else ("OW" if tag == PIXEL_DATA_TAG else "SQ")
        return tag, vr, u32_s.unpack_from(buf, pos + 4)[0], pos + 8
    vr_bytes = buf[pos + 4 : pos + 6]
    if vr_bytes not in _VRS:
        raise ScanError(f"unknown VR {vr_bytes!r} at offset {pos}")
    if vr_bytes in LONG_VRS:
        if pos + 12 > end:
            raise ScanError("truncated element header")
        return tag, _VR_TEXT[vr_bytes], u32_s.unpack_from(buf, pos + 8)[0], pos + 12
    return tag, _VR_TEXT[vr_bytes], u16_s.unpack_from(buf, pos + 6)[0], pos + 8


def _skip_undefined(buf: bytes, pos: int, tag: int, vr: str, implicit: bool, little: bool) -> int:
    """Skip the value of an undefined-length element (sequence or encapsulated pixels)."""
    if tag == PIXEL_DATA_TAG or (vr in ("OB", "OW") and not implicit):
        return _skip_encapsulated(buf, pos, little)
    if implicit or vr in ("SQ", "UN"):
        # PS3.5 6.2.2: an undefined-length UN is an implicit VR little endian sequence.
        return _skip_sequence(buf, pos, implicit or vr == "UN", little)
    raise ScanError(f"undefined length on VR {vr}")


def _walk(
    buf: bytes, implicit: bool, little: bool
) -> tuple[dict[int, tuple[str, bytes]], int, int]:
    """Walk the top-level elements; return wanted raw values and the pixel data position."""
    end = len(buf)
    pos = 0
    raw: dict[int, tuple[str, bytes]] = {}
    pix_off = pix_len = -1
    last_tag = -1
    while pos < end:
        if pos + 8 > end and not any(buf[pos:]):
            break  # trailing zero padding shorter than an element header
        tag, vr, length, value = _element_header(buf, pos, implicit, little)
        if tag <= last_tag:
            if tag == 0 and not any(buf[pos : pos + 64]):
                break  # zero padding at the end of a dataset
            raise ScanError(f"tags out of order at offset {pos}")
        last_tag = tag
        if length == UNDEFINED:
            if tag == PIXEL_DATA_TAG:
                pix_off, pix_len = value, UNDEFINED
            pos = _skip_undefined(buf, value, tag, vr, implicit, little)
            continue
        if value + length > end:
            # The walk was consistent up to here, so this is truncation, not a misread syntax.
            raise InvalidDataset(
                f"truncated: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} "
                f"bytes, {end - value} remain"
            )
        if tag in BY_TAG:
            raw[tag] = (vr, buf[value : value + length])
        elif tag == CHARSET_TAG:
            raw[tag] = ("CS", buf[value : value + length])
        elif tag == PIXEL_DATA_TAG:
            pix_off, pix_len = value, length
        pos = value + length
    return raw, pix_off, pix_len


def _skip_sequence(buf: bytes, pos: int, implicit: bool, little: bool) -> int:
    """Skip an undefined-length sequence starting at `pos`; return the offset after it."""
    u32 = "<I" if little else ">I"
    tag_fmt = "<HH" if little else ">HH"
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise ScanError("sequence runs past the end")
        group, elem = struct.unpack_from(tag_fmt, buf, pos)
        tag = (group << 16) | elem
        (length,) = struct.unpack_from(u32, buf, pos + 4)
        pos += 8
        if tag == SEQ_END:
            return pos
        if tag != ITEM:
            raise ScanError(f"expected an item tag at offset {pos - 8}")
        if length == UNDEFINED:
            pos = _skip_item_elements(buf, pos, implicit, little)
        else:
            pos += length
            if pos > end:
                raise ScanError("item runs past the end")


def _skip_item_elements(buf: bytes, pos: int, implicit: bool, little: bool) -> int:
    """Skip the elements of an undefined-length item up to and including its delimiter."""
    end = len(buf)
    tag_fmt = "<HH" if little else ">HH"
    while True:
        if pos + 8 > end:
            raise ScanError("item runs past the end")
        group, elem = struct.unpack_from(tag_fmt, buf, pos)
        if (group << 16) | elem == ITEM_END:
            return pos + 8
        _, vr, length, value = _element_header(buf, pos, implicit, little)
        if implicit:
            vr = "SQ"  # inside an item only the structure matters
        if length == UNDEFINED:
            pos = _skip_undefined(buf, value, 0, vr, implicit, little)
        else:
            pos = value + length
            if pos > end:
                raise ScanError("element runs past the end")


def _skip_encapsulated(buf: bytes, pos: int, little: bool) -> int:
    """Skip encapsulated pixel data fragments (items of defined length) to the delimiter."""
    u32 = "<I" if little else ">I"
    tag_fmt = "<HH" if little else ">HH"
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise ScanError("encapsulated pixel data runs past the end")
        group, elem = struct.unpack_from(tag_fmt, buf, pos)
        tag = (group << 16) | elem
        (length,) = struct.unpack_from(u32, buf, pos + 4)
        pos += 8
        if tag == SEQ_END:
            return pos
        if tag != ITEM or length == UNDEFINED:
            raise ScanError("bad fragment in encapsulated pixel data")
        pos += length
        if pos > end:
            raise ScanError("pixel data fragment runs past the end")


# ---------------------------------------------------------------- value decoding


def _decode(raw: dict[int, tuple[str, bytes]], little: bool) -> dict[str, str]:
    charset = raw.get(CHARSET_TAG)
    encodings = _encodings(charset[1]) if charset else None
    out: dict[str, str] = {}
    for tag, (vr, value) in raw.items():
        attr = BY_TAG.get(tag)
        if attr is None:
            continue
        out[attr.keyword] = decode_value(vr, value, encodings, little)
    return out


def decode_value(vr: str, value: bytes, encodings: list[str] | None, little: bool = True) -> str:
    """One attribute value as text: strings stripped of padding, numbers as decimal text."""
    if vr == "US":
        if len(value) < 2:
            return ""
        return str(struct.unpack_from("<H" if little else ">H", value)[0])
    if vr in TEXT_VRS and encodings and (not value.isascii() or b"\x1b" in value):
        text = _decode_text(value, encodings, vr)
    else:
        text = value.decode("latin-1") if not value.isascii() else value.decode("ascii")
    if vr == "UI":
        text = text.rstrip("\x00 ").strip()
    else:
        text = (
            text.rstrip("\x00 ").lstrip(" ")
            if vr not in ("LT", "ST", "UT")
            else text.rstrip("\x00 ")
        )
    if vr == "PN":
        text = text.rstrip("=")
    if vr in ("CS", "IS", "DA", "TM") and "\\" in text:
        # Multi-valued where the index keeps one value (e.g. Modality): keep the first.
        text = text.split("\\")[0].strip()
    return text


def _decode_text(value: bytes, encodings: list[str], vr: str) -> str:
    """Decode text in a SpecificCharacterSet without pydicom's warnings (one per instance in
    the log is noise): plain codecs with replacement characters, and pydicom's ISO 2022
    code-extension logic only when every escape sequence in the value is one it knows."""
    if b"\x1b" not in value:
        return value.decode(encodings[0], errors="replace")
    known = set(CODES_TO_ENCODINGS)
    escapes = [ESC + frag for frag in value.split(ESC)[1:]]
    if not all(any(e.startswith(code) for code in known) for e in escapes):
        return value.decode(encodings[0], errors="replace")
    delims = {0x5E, 0x3D} if vr == "PN" else {0x5C}
    try:
        return str(decode_bytes(value, encodings, delims))
    except (UnicodeError, LookupError):
        return value.decode(encodings[0], errors="replace")


def _encodings(value: bytes) -> list[str]:
    """Python codecs for a SpecificCharacterSet value; unknown terms fall back to latin-1."""
    terms = [t.strip() for t in value.decode("ascii", "replace").split("\\")]
    if not terms:
        return ["iso8859"]
    if terms[0] == "":
        terms[0] = "ISO_IR 6"
    codecs = []
    for term in terms:
        codec = python_encoding.get(term) or python_encoding.get(
            term.replace("-", "_").replace("ISO IR", "ISO_IR")
        )
        codecs.append(codec or "latin_1")
    return codecs


def _scan_with_pydicom(buf: bytes, implicit: bool, little: bool) -> tuple[dict[str, str], int, int]:
    """The slow, lenient path: let pydicom parse the whole dataset."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(io.BytesIO(buf), implicit, little)
            values: dict[str, str] = {}
            for tag, attr in BY_TAG.items():
                if tag not in ds:
                    continue
                elem = ds[tag]
                v = elem.value
                if v is None:
                    values[attr.keyword] = ""
                elif isinstance(v, bytes):
                    values[attr.keyword] = v.decode("latin-1").rstrip("\x00 ")
                elif (
                    attr.vr in ("CS", "IS", "DA", "TM")
                    and not isinstance(v, str)
                    and hasattr(v, "__iter__")
                ):
                    values[attr.keyword] = str(next(iter(v), "")).strip()
                else:
                    values[attr.keyword] = str(v).rstrip("\x00 ").strip()
            # Touch every element so that truncation anywhere surfaces as an error here.
            for _elem in ds.iterall():
                pass
    except Exception as e:  # pydicom raises many types for bad input
        raise InvalidDataset(f"not a parseable DICOM dataset: {type(e).__name__}: {e}") from None
    return values, -1, -1
