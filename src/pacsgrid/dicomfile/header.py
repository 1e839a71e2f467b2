"""Read the header of a DICOM dataset without decoding it.

Ingest must index an object and store its bytes exactly as received. pydicom's reader builds a
full `Dataset` (0.5-1.3 ms for a small CT), which is most of the CPU budget of a C-STORE. This
scanner walks the top-level elements once with `struct`, checks that the element structure is
sound to the last byte, keeps the raw values of the attributes in `pacsgrid.model.ATTRIBUTES`,
and decodes only those (character sets through pydicom's codecs).

The element structure is checked everywhere, inside sequences too: every C-STORE, STOW,
import and migration comes through here (`Archive.ingest`), so a dataset whose lengths do not
add up is refused the same way on every path, before anything is written. Pixel data is never
decoded; its fragments are only walked.

When the scanner meets something it does not understand (an unknown VR, say), `scan()` falls
back to pydicom. If pydicom cannot parse the dataset either, the dataset is invalid.
"""

from __future__ import annotations

import io
import mmap
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO, cast

from pydicom.charset import CODES_TO_ENCODINGS, ESC, decode_bytes, python_encoding
from pydicom.datadict import DicomDictionary  # type: ignore[attr-defined]
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence

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


_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


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


Buffer = bytes | mmap.mmap


def scan(data: Buffer | memoryview, transfer_syntax: str, start: int = 0) -> Header:
    """Index values of a dataset (no file meta) in `transfer_syntax`: `data[start:]`, read in
    place (a large dataset is a map of its spill file: see archive/spool.py). Raise
    InvalidDataset."""
    buf = bytes(data) if isinstance(data, memoryview) else data
    if transfer_syntax == DEFLATED_LE:
        try:
            # Inflated in memory: deflate is for small objects (SR, presentation states).
            buf = zlib.decompress(memoryview(buf)[start:], -zlib.MAX_WBITS)
        except zlib.error as e:
            raise InvalidDataset(f"deflated dataset does not inflate: {e}") from None
        start = 0
    implicit = transfer_syntax == IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    try:
        raw, pix_off, pix_len = _walk(buf, implicit, little, start)
        values = _decode(raw, little)
    except ScanError:
        values, pix_off, pix_len = _scan_with_pydicom(buf, implicit, little, start)
    if pix_off >= 0:
        pix_off -= start
    header = Header(transfer_syntax, values, pix_off, pix_len)
    missing = [k for k in REQUIRED_UIDS if not header.values.get(k)]
    if missing:
        raise InvalidDataset(f"missing {', '.join(missing)}", missing_uids=True)
    return header


def _element_header(
    buf: Buffer, pos: int, implicit: bool, little: bool, end: int = -1
) -> tuple[int, str, int, int]:
    """(tag, VR, value length, value offset) of the element at `pos` (in `buf[:end]`).

    Implicit VR: the VR comes from the catalogue of indexed attributes, then from pydicom's
    data dictionary (only SQ matters to the walk); anything unknown is reported as UN.
    """
    if end < 0:
        end = len(buf)
    if pos + 8 > end:
        raise InvalidDataset(f"truncated: {end - pos} byte(s) after the last element")
    tag_s, u16_s, u32_s = _LE if little else _BE
    group, elem = tag_s.unpack_from(buf, pos)
    tag = (group << 16) | elem
    if implicit:
        attr = BY_TAG.get(tag)
        if attr is not None:
            vr = attr.vr
        elif tag == PIXEL_DATA_TAG:
            vr = "OW"
        else:
            vr = "SQ" if tag in _SQ_TAGS else "UN"
        return tag, vr, u32_s.unpack_from(buf, pos + 4)[0], pos + 8
    vr_bytes = buf[pos + 4 : pos + 6]
    if vr_bytes not in _VRS:
        raise ScanError(f"unknown VR {vr_bytes!r} at offset {pos}")
    if vr_bytes in LONG_VRS:
        if pos + 12 > end:
            raise InvalidDataset(f"truncated: the element header at offset {pos} is cut off")
        return tag, _VR_TEXT[vr_bytes], u32_s.unpack_from(buf, pos + 8)[0], pos + 12
    return tag, _VR_TEXT[vr_bytes], u16_s.unpack_from(buf, pos + 6)[0], pos + 8


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _walk(
    buf: Buffer, implicit: bool, little: bool, start: int = 0
) -> tuple[dict[int, tuple[str, bytes]], int, int]:
    """Walk the top-level elements; return wanted raw values and the pixel data position.

    Every element header is checked, sequences and items included, down to the last byte:
    an element, item or fragment that declares more bytes than its container (or the
    dataset) holds is truncation, refused with InvalidDataset. What the walk cannot read
    (an unknown VR: perhaps a mislabelled syntax) raises ScanError and pydicom decides.
    """
    end = len(buf)
    pos = start
    raw: dict[int, tuple[str, bytes]] = {}
    pix_off = pix_len = -1
    last_tag = -1
    walker = _Walker(buf, implicit, little)
    while pos < end:
        if pos + 8 > end and _zeros_to_end(buf, pos):
            break  # trailing zero padding shorter than an element header
        try:
            tag, vr, length, value = _element_header(buf, pos, implicit, little)
        except ScanError:
            if last_tag < 0:
                raise  # the very first element: perhaps the syntax is not what was said
            if _zeros_to_end(buf, pos):
                break  # zero padding at the end of a dataset
            raise InvalidDataset(
                f"not an element at offset {pos - start}, after {_name(last_tag)} (a length "
                "that does not add up, or garbage)"
            ) from None
        if tag <= last_tag:
            if tag == 0 and _zeros_to_end(buf, pos):
                break  # zero padding at the end of a dataset
            raise ScanError(f"tags out of order at offset {pos}")
        last_tag = tag
        if length == UNDEFINED:
            if tag == PIXEL_DATA_TAG:
                pix_off, pix_len = value, UNDEFINED
            pos = walker.undefined(value, end, tag, vr, 1)
            continue
        if value + length > end:
            # The walk was consistent up to here, so this is truncation, not a misread syntax.
            raise InvalidDataset(
                f"truncated: element {_name(tag)} declares {length} bytes, {end - value} remain"
            )
        if tag in BY_TAG:
            raw[tag] = (vr, buf[value : value + length])
        elif tag == CHARSET_TAG:
            raw[tag] = ("CS", buf[value : value + length])
        elif tag == PIXEL_DATA_TAG:
            pix_off, pix_len = value, length
        elif vr == "SQ":
            walker.sequence(value, value + length, tag, 1)
        pos = value + length
    return raw, pix_off, pix_len


def _zeros_to_end(buf: Buffer, pos: int) -> bool:
    """Whether every byte from `pos` on is zero (padding), looked at a megabyte at a time."""
    end = len(buf)
    while pos < end:
        piece = buf[pos : pos + (1 << 20)]
        if piece.count(0) != len(piece):
            return False
        pos += len(piece)
    return True


MAX_DEPTH = 64  # nested sequences; real objects (SR trees included) stay far below


class _Walker:
    """Checks the structure inside sequences: items and their elements, to the last byte."""

    def __init__(self, buf: Buffer, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        self.little = little
        self.tag = struct.Struct("<HH" if little else ">HH")
        self.u32 = struct.Struct("<I" if little else ">I")

    def _item_header(self, pos: int, end: int, what: str) -> tuple[int, int]:
        if pos + 8 > end:
            raise InvalidDataset(f"truncated: {what} runs past the end of its container")
        group, elem = self.tag.unpack_from(self.buf, pos)
        return (group << 16) | elem, self.u32.unpack_from(self.buf, pos + 4)[0]

    def undefined(self, pos: int, end: int, tag: int, vr: str, depth: int) -> int:
        """Skip the value of an undefined-length element (sequence or encapsulated pixels)
        that starts at `pos`; return the offset after its delimiter."""
        if tag == PIXEL_DATA_TAG or (vr in ("OB", "OW") and not self.implicit):
            return self.fragments(pos, end)
        if self.implicit or vr in ("SQ", "UN"):
            # PS3.5 6.2.2: an undefined-length UN is an implicit VR little endian sequence.
            if vr == "UN" and not self.implicit:
                return _Walker(self.buf, True, True).sequence(pos, None, tag, depth, end)
            return self.sequence(pos, None, tag, depth, end)
        raise ScanError(f"undefined length on VR {vr}")

    def sequence(
        self, pos: int, stop: int | None, tag: int, depth: int, end: int | None = None
    ) -> int:
        """Walk the items of a sequence: up to `stop` (defined length), or to its delimiter
        (undefined length, within `end`); return the offset after it."""
        if depth > MAX_DEPTH:
            raise InvalidDataset(f"sequences nested deeper than {MAX_DEPTH}")
        limit = stop if stop is not None else (end if end is not None else len(self.buf))
        while stop is None or pos < stop:
            item, length = self._item_header(pos, limit, f"sequence {_name(tag)}")
            pos += 8
            if item == SEQ_END:
                if stop is None:
                    return pos
                continue  # a delimiter in a defined-length sequence: harmless
            if item != ITEM:
                raise InvalidDataset(
                    f"sequence {_name(tag)} holds {_name(item)} where an item must be"
                )
            if length == UNDEFINED:
                pos = self.elements(pos, None, limit, depth)
            else:
                if pos + length > limit:
                    raise InvalidDataset(
                        f"truncated: an item of {_name(tag)} declares {length} bytes, "
                        f"{limit - pos} remain in its container"
                    )
                self.elements(pos, pos + length, limit, depth)
                pos += length
        return pos

    def elements(self, pos: int, stop: int | None, end: int, depth: int) -> int:
        """Walk the elements of an item: to `stop` (defined length) or its delimiter."""
        buf = self.buf
        limit = stop if stop is not None else end
        while stop is None or pos < stop:
            if stop is None:
                tag, _ = self._item_header(pos, limit, "an item")
                if tag == ITEM_END:
                    return pos + 8
            tag, vr, length, value = _element_header(buf, pos, self.implicit, self.little, limit)
            if length == UNDEFINED:
                pos = self.undefined(value, limit, tag, vr, depth + 1)
                continue
            if value + length > limit:
                raise InvalidDataset(
                    f"truncated: element {_name(tag)} in a sequence item declares {length} "
                    f"bytes, {limit - value} remain in the item"
                )
            if vr == "SQ":
                self.sequence(value, value + length, tag, depth + 1)
            pos = value + length
        return pos

    def fragments(self, pos: int, end: int) -> int:
        """Skip encapsulated pixel data fragments (items of defined length) to the delimiter."""
        while True:
            tag, length = self._item_header(pos, end, "encapsulated pixel data")
            pos += 8
            if tag == SEQ_END:
                return pos
            if tag != ITEM or length == UNDEFINED:
                raise ScanError("bad fragment in encapsulated pixel data")
            pos += length
            if pos > end:
                raise InvalidDataset("truncated: a pixel data fragment runs past the end")


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


_DEFER = 1 << 20  # the pydicom path skips values larger than this in a mapped dataset


def _scan_with_pydicom(
    buf: Buffer, implicit: bool, little: bool, start: int = 0
) -> tuple[dict[str, str], int, int]:
    """The slow, lenient path: let pydicom parse the whole dataset. A mapped (spilled)
    dataset is read in place, its large values (pixel data) skipped, not read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(buf, mmap.mmap):
                buf.seek(start)
                ds = read_dataset(cast(BinaryIO, buf), implicit, little, defer_size=_DEFER)
            else:
                ds = read_dataset(io.BytesIO(memoryview(buf)[start:]), implicit, little)
            _touch(ds)
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
    except InvalidDataset:
        raise
    except Exception as e:  # pydicom raises many types for bad input
        raise InvalidDataset(f"not a parseable DICOM dataset: {type(e).__name__}: {e}") from None
    return values, -1, -1


def _touch(ds: Dataset) -> None:
    """Convert every element, so that a value that does not convert surfaces as an error here,
    and check that every value holds the bytes its length declares: pydicom reads a value cut
    by the end of the dataset (or of the sequence holding it) short, without a word. A value
    pydicom skipped (deferred) was sought past: in a mapped dataset, seeking past its end
    fails."""
    for tag in sorted(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement):
            if raw.value is None and raw.length:
                continue
            held = len(raw.value or b"")
            if raw.length != UNDEFINED and held < raw.length:
                raise InvalidDataset(
                    f"truncated: element {_name(tag)} declares {raw.length} bytes, {held} remain"
                )
        value = ds[tag].value
        if isinstance(value, Sequence):
            for item in value:
                _touch(item)
