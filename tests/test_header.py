"""The fast header scanner agrees with pydicom, and refuses what pydicom cannot read."""

from __future__ import annotations

import io
import mmap
import struct
import tempfile
import warnings
import zlib

import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from pacsgrid.dicomfile.header import (
    UNDEFINED,
    ScanError,
    _decode,
    _scan_with_pydicom,
    _walk,
    scan,
)
from pacsgrid.dicomfile.part10 import build_file_meta, split_part10
from pacsgrid.errors import InvalidDataset
from pacsgrid.model import ATTRIBUTES
from tests.corpus import accepted, corpus
from tests.oracle import text

SYNTAXES = {
    "1.2.840.10008.1.2": (True, True),
    "1.2.840.10008.1.2.1": (False, True),
    "1.2.840.10008.1.2.2": (False, False),
    "1.2.840.10008.1.2.1.99": (False, True),
}


def expected_values(ds: Dataset) -> dict[str, str]:
    """What pydicom reads for the indexed attributes (its warnings about odd values muted)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a in ATTRIBUTES:
            if a.keyword in ds:
                v = text(ds, a.keyword)
                out[a.keyword] = v.rstrip("=") if a.vr == "PN" else v
    return out


@pytest.mark.parametrize("f", accepted(), ids=lambda f: str(f.path.name))
def test_scanner_matches_pydicom_on_the_corpus(f) -> None:  # type: ignore[no-untyped-def]
    data = f.path.read_bytes()
    p10 = split_part10(data)
    header = scan(data[p10.dataset_offset :], p10.transfer_syntax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(f.path, force=True, stop_before_pixels=True)
    assert header.values == expected_values(ds)


@pytest.mark.parametrize(
    "f", [f for f in corpus() if f.expect == "reject-or-tolerate"], ids=lambda f: str(f.path.name)
)
def test_broken_files_are_refused_or_read_like_pydicom(f) -> None:  # type: ignore[no-untyped-def]
    """A broken file either raises InvalidDataset or yields what pydicom reads from it."""
    data = f.path.read_bytes()
    try:
        p10 = split_part10(data)
        header = scan(data[p10.dataset_offset :], p10.transfer_syntax)
    except InvalidDataset as e:
        assert e.reason
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(f.path, force=True, stop_before_pixels=True)
    assert header.values == expected_values(ds)


def encode(ds: Dataset, ts: str) -> bytes:
    implicit, little = SYNTAXES[ts]
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if ts == "1.2.840.10008.1.2.1.99":
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
    return raw


uid = st.from_regex(r"1\.2\.[1-9][0-9]{0,8}(\.[1-9][0-9]{0,8}){0,6}", fullmatch=True).filter(
    lambda u: len(u) <= 64
)
words = st.text(
    alphabet=st.characters(codec="latin-1", exclude_characters="\\^=\x00\r\n\x0c"), max_size=20
).map(str.strip)
names = st.tuples(words, words).map(lambda t: "^".join(t).strip("^"))
dates = st.one_of(
    st.just(""),
    st.dates(min_value=__import__("datetime").date(1900, 1, 1)).map(lambda d: d.strftime("%Y%m%d")),
)
times = st.one_of(st.just(""), st.times().map(lambda t: t.strftime("%H%M%S")))
ints = st.one_of(st.just(""), st.integers(0, 99999).map(str))


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    if draw(st.booleans()):
        ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = draw(uid)
    ds.SOPInstanceUID = draw(uid)
    ds.StudyInstanceUID = draw(uid)
    ds.SeriesInstanceUID = draw(uid)
    for keyword, strategy in (
        ("PatientName", names),
        ("PatientID", words),
        ("StudyDate", dates),
        ("StudyTime", times),
        ("AccessionNumber", words.map(lambda w: w[:16])),
        ("Modality", st.sampled_from(["CT", "MR", "", "US"])),
        ("SeriesNumber", ints),
        ("InstanceNumber", ints),
        ("StudyDescription", words),
        ("ReferringPhysicianName", names),
    ):
        if draw(st.booleans()):
            setattr(ds, keyword, draw(strategy))
    if draw(st.booleans()):
        item = Dataset()
        item.ReferencedSOPClassUID = draw(uid)
        item.ReferencedSOPInstanceUID = draw(uid)
        if draw(st.booleans()):
            inner = Dataset()
            inner.CodeValue = "123"
            item.ConceptNameCodeSequence = Sequence([inner])
        ds.ReferencedImageSequence = Sequence([item] * draw(st.integers(0, 3)))
    if draw(st.booleans()):
        block = ds.private_block(0x0029, "PACSGRID TEST", create=True)
        block.add_new(0x01, "LO", draw(words))
    if draw(st.booleans()):
        ds.Rows = draw(st.integers(1, 4096))
        ds.Columns = draw(st.integers(1, 4096))
        ds.BitsAllocated = 16
        ds.PixelData = bytes(draw(st.integers(0, 64)) * 2)
    return ds


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ds=datasets(), ts=st.sampled_from(sorted(SYNTAXES)))
def test_scanner_matches_pydicom_on_generated_datasets(ds: Dataset, ts: str) -> None:
    raw = encode(ds, ts)
    header = scan(raw, ts)
    implicit, little = SYNTAXES[ts]
    body = zlib.decompress(raw, -zlib.MAX_WBITS) if ts.endswith(".99") else raw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = pydicom.filereader.read_dataset(io.BytesIO(body), implicit, little)
    assert header.values == expected_values(again)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ds=datasets(),
    ts=st.sampled_from(sorted(t for t in SYNTAXES if not t.endswith(".99"))),
    before=st.integers(0, 5),
    mapped=st.booleans(),
)
def test_the_pydicom_path_reads_what_the_scanner_reads(
    ds: Dataset, ts: str, before: int, mapped: bool
) -> None:
    """The lenient path scan() falls back to (an element the scanner does not know) yields the
    same values, from bytes in memory or from a mapped spill file, read from an offset."""
    raw = b"\xee" * before + encode(ds, ts)
    implicit, little = SYNTAXES[ts]
    fast = scan(raw, ts, before).values
    if mapped:
        with tempfile.TemporaryFile() as fh:
            fh.write(raw)
            fh.flush()
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                values, pix_off, pix_len = _scan_with_pydicom(buf, implicit, little, before)
    else:
        values, pix_off, pix_len = _scan_with_pydicom(raw, implicit, little, before)
    assert values == fast
    assert (pix_off, pix_len) == (-1, -1)


@pytest.mark.parametrize("f", accepted(), ids=lambda f: str(f.path.name))
def test_the_pydicom_path_matches_pydicom_on_the_corpus(f) -> None:  # type: ignore[no-untyped-def]
    data = f.path.read_bytes()
    p10 = split_part10(data)
    implicit, little = SYNTAXES.get(p10.transfer_syntax, (False, True))
    if p10.transfer_syntax == "1.2.840.10008.1.2.1.99":
        pytest.skip("deflated: scan() inflates before either path")
    values, _, _ = _scan_with_pydicom(data, implicit, little, p10.dataset_offset)
    assert values == scan(data[p10.dataset_offset :], p10.transfer_syntax).values


def fallback(data: bytes, mapped: bool, start: int = 0) -> tuple[dict[str, str], int, int]:
    """The pydicom path, on bytes in memory or on a mapped spill file holding them."""
    if not mapped:
        return _scan_with_pydicom(data, False, True, start)
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _scan_with_pydicom(buf, False, True, start)


UIDS = {
    "SOPClassUID": "1.2.3",
    "SOPInstanceUID": "1.2.3.4",
    "StudyInstanceUID": "1.2.3.4.5",
    "SeriesInstanceUID": "1.2.3.4.5.6",
}


@pytest.mark.parametrize("mapped", [False, True], ids=["bytes", "mapped"])
def test_the_pydicom_path_reads_values_in_every_shape_pydicom_gives_them(mapped: bool) -> None:
    """pydicom returns bytes for an OB value and for a UN value of 64 KiB or more (a smaller
    UN takes the VR of the data dictionary), a list for a multi-valued CS, IS, DA or TM (the
    first value is kept, as the scanner keeps it), and None for an empty number. Only
    trailing padding is removed, as the scanner removes it. Explicit VR little endian,
    written by hand, read from an offset."""
    elements = [
        (0x0008, 0x0016, b"UI", b"1.2.3\0"),
        (0x0008, 0x0018, b"UI", b"1.2.3.4\0"),
        (0x0008, 0x0020, b"DA", b"20240102\\20240103 "),  # StudyDate
        (0x0008, 0x0030, b"TM", b"101500\\1200"),  # StudyTime
        (0x0008, 0x0050, b"SH", b"ACX\0"),  # AccessionNumber
        (0x0008, 0x0060, b"CS", b" CT \\MR "),  # Modality
        (0x0008, 0x0090, b"PN", b"\0Roe^J"),  # ReferringPhysicianName
        (0x0008, 0x1030, b"UN", b"T\xeate\0" + b" " * 0xFFFF),  # StudyDescription
        (0x0010, 0x0010, b"UN", b"Doe^Jane"),  # PatientName
        (0x0010, 0x0020, b"OB", b"ABX \0\0"),  # PatientID
        (0x0010, 0x0040, b"CS", b""),  # PatientSex
        (0x0018, 0x0015, b"CS", b"\\CHEST "),  # BodyPartExamined
        (0x0020, 0x000D, b"UI", b"1.2.3.4.5\0"),
        (0x0020, 0x000E, b"UI", b"1.2.3.4.5.6\0"),
        (0x0020, 0x0011, b"IS", b" 7 \\8 "),  # SeriesNumber
        (0x0020, 0x0013, b"IS", b""),  # InstanceNumber
        (0x0028, 0x0008, b"IS", b"\\3"),  # NumberOfFrames
        (0x0028, 0x0010, b"US", b""),  # Rows
        (0x0028, 0x0011, b"UN", b"\x00\x02"),  # Columns: US 512
    ]
    data = b"\xee" * 3 + b"".join(_explicit(*e) for e in elements)
    assert fallback(data, mapped, 3) == (
        {
            **UIDS,
            "StudyDate": "20240102",
            "StudyTime": "101500",
            "AccessionNumber": "ACX",
            "Modality": "CT",
            "ReferringPhysicianName": "\x00Roe^J",
            "StudyDescription": "T\u00eate",
            "PatientName": "Doe^Jane",
            "PatientID": "ABX",
            "PatientSex": "",
            "BodyPartExamined": "",
            "SeriesNumber": "7",
            "InstanceNumber": "",
            "NumberOfFrames": "",
            "Rows": "",
            "Columns": "512",
        },
        -1,
        -1,
    )


BIG = (1 << 20) + 2  # more than the pydicom path reads of a mapped dataset: skipped, not read


@pytest.mark.parametrize("mapped", [False, True], ids=["bytes", "mapped"])
def test_the_pydicom_path_skips_large_values_and_refuses_what_does_not_convert(
    mapped: bool,
) -> None:
    """A value larger than a megabyte in a mapped dataset is skipped unread (it is only
    sought past), the elements after it are read; a value further on that pydicom cannot
    convert (a US of three bytes, in a sequence item) refuses the dataset."""
    base = _explicit(0x0008, 0x0016, b"UI", b"1.2.3\0") + _explicit(
        0x0008, 0x0018, b"UI", b"1.2.3.4\0"
    )
    large = _explicit(0x0019, 0x1010, b"OB", b"\x5a" * BIG)
    after = (
        _explicit(0x0020, 0x000D, b"UI", b"1.2.3.4.5\0")
        + _explicit(0x0020, 0x000E, b"UI", b"1.2.3.4.5.6\0")
        + _explicit(0x0020, 0x0011, b"IS", b"7 ")
        + _explicit(0x0028, 0x0010, b"US", b"\x00\x02")
    )
    assert fallback(base + large + after, mapped) == (
        {**UIDS, "SeriesNumber": "7", "Rows": "512"},
        -1,
        -1,
    )
    bad_item = _item(0xFFFE, 0xE000, _explicit(0x0028, 0x0002, b"US", b"\x01\x02\x03"))
    broken = base + large + after + _explicit(0x0040, 0x0275, b"SQ", bad_item)
    with pytest.raises(InvalidDataset, match=r"^not a parseable DICOM dataset: BytesLength"):
        fallback(broken, mapped)


@pytest.mark.parametrize("mapped", [False, True], ids=["bytes", "mapped"])
def test_the_pydicom_path_refuses_a_large_value_cut_by_the_end(mapped: bool) -> None:
    """A large value the dataset holds less of than its length declares: in a mapped dataset
    it is skipped, and seeking past it runs off the end; in memory it is read, too short."""
    cut = _uids() + _explicit(0x0029, 0x1010, b"OB", b"\x5a" * 100, BIG)
    with pytest.raises(InvalidDataset) as e:
        fallback(cut, mapped)
    if mapped:
        assert e.value.reason.startswith("not a parseable DICOM dataset: ValueError: ")
    else:
        assert e.value.reason == f"truncated: element (0029,1010) declares {BIG} bytes, 100 remain"


@pytest.mark.parametrize("mapped", [False, True], ids=["bytes", "mapped"])
def test_a_value_cut_short_is_refused_on_the_pydicom_path(mapped: bool) -> None:
    """pydicom reads a value cut by the end of the dataset, or of the sequence holding it,
    short and says nothing: the pydicom path refuses it, as the scanner does. scan() hands
    these datasets to it for a tag out of order (Modality after the series UID)."""
    base = _uids() + _explicit(0x0008, 0x0060, b"CS", b"CT")
    with pytest.raises(ScanError, match=r"^tags out of order"):
        _walk(base, False, True)
    whole = base + _explicit(0x0040, 0x1001, b"SH", b"RP1 ")
    assert fallback(whole, mapped) == ({**UIDS, "Modality": "CT"}, -1, -1)
    assert scan(whole, "1.2.840.10008.1.2.1").values == {**UIDS, "Modality": "CT"}
    item = _item(0xFFFE, 0xE000, _explicit(0x0008, 0x0100, b"SH", b"T1", 6))
    for data, reason in [
        (whole[:-1], "truncated: element (0040,1001) declares 4 bytes, 3 remain"),
        (
            base + _explicit(0x0040, 0x0275, b"SQ", item),
            "truncated: element (0008,0100) declares 6 bytes, 2 remain",
        ),
    ]:
        with pytest.raises(InvalidDataset) as e:
            fallback(data, mapped)
        assert e.value.reason == reason
        with pytest.raises(InvalidDataset) as e:
            scan(data, "1.2.840.10008.1.2.1")
        assert e.value.reason == reason


def fast_path(data: bytes, ts: str, start: int = 0) -> tuple[dict[str, str], int, int]:
    """The scanner alone, without the fallback: a ScanError fails the test."""
    implicit, little = SYNTAXES.get(ts, (False, True))
    raw, pix_off, pix_len = _walk(data, implicit, little, start)
    return _decode(raw, little), pix_off, pix_len


@pytest.mark.parametrize("f", accepted(), ids=lambda f: str(f.path.name))
def test_the_scanner_alone_reads_the_corpus_and_finds_the_pixel_data(f) -> None:  # type: ignore[no-untyped-def]
    """Every accepted file is read by the scanner itself (sequences and items of undefined
    length, encapsulated fragments), not handed to pydicom; the pixel data it points at are
    the bytes pydicom reads as PixelData (the items of encapsulated pixel data)."""
    data = f.path.read_bytes()
    p10 = split_part10(data)
    if p10.transfer_syntax == "1.2.840.10008.1.2.1.99":
        data = zlib.decompress(data[p10.dataset_offset :], -zlib.MAX_WBITS)
        start = 0
    else:
        start = p10.dataset_offset
    implicit, _ = SYNTAXES.get(p10.transfer_syntax, (False, True))
    if not implicit and not data[start + 4 : start + 6].isalpha():
        # Written in implicit VR although its transfer syntax says explicit (pydicom's
        # SC_rgb_jpeg.dcm): the scanner refuses the mismatch and the fallback, like pydicom,
        # reads it as it was written. That is the only case the fast path may leave to it.
        with pytest.raises(ScanError, match="unknown VR"):
            fast_path(data, p10.transfer_syntax, start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f.path, force=True)
        got = scan(f.path.read_bytes()[p10.dataset_offset :], p10.transfer_syntax).values
        assert got["SOPInstanceUID"] == str(ds.SOPInstanceUID)
        return
    values, pix_off, pix_len = fast_path(data, p10.transfer_syntax, start)
    assert values == scan(f.path.read_bytes()[p10.dataset_offset :], p10.transfer_syntax).values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(f.path, force=True)
    if "PixelData" not in ds:
        assert (pix_off, pix_len) == (-1, -1)
        return
    pixels = ds.PixelData
    encapsulated = pix_len == UNDEFINED
    assert encapsulated == (p10.transfer_syntax not in SYNTAXES)
    assert data[pix_off : pix_off + len(pixels)] == pixels
    if encapsulated:  # the sequence delimiter follows the last fragment
        assert data[pix_off + len(pixels) : pix_off + len(pixels) + 8] == bytes.fromhex(
            "feffdde000000000"
        )
    else:
        assert pix_len == len(pixels)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ds=datasets(), ts=st.sampled_from(sorted(t for t in SYNTAXES if not t.endswith(".99"))))
def test_the_scanner_alone_reads_generated_datasets(ds: Dataset, ts: str) -> None:
    """Sequences and items as pydicom writes them (undefined lengths) and pixel data: the
    scanner reads them itself, and points at the pixel data's value."""
    raw = encode(ds, ts)
    values, pix_off, pix_len = fast_path(raw, ts)
    assert values == scan(raw, ts).values
    if "PixelData" in ds:
        assert raw[pix_off : pix_off + pix_len] == ds.PixelData
    else:
        assert (pix_off, pix_len) == (-1, -1)


def _explicit(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element, written by hand (`length`: declared length)."""
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"UN", b"SQ"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n) + value


def _item(group: int, elem: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHI", group, elem, len(value) if length is None else length) + value


FRAGMENTS = _item(0xFFFE, 0xE000, b"") + _item(0xFFFE, 0xE000, b"\x01\x02\x03\x04")
SEQ_DELIMITER = _item(0xFFFE, 0xE0DD, b"")


def _uids() -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4.5", "1.2.3.4.5.6"
    return encode(ds, "1.2.840.10008.1.2.1")


def test_undefined_lengths_the_scanner_walks_itself() -> None:
    """PS3.5 7.5 and 6.2.2: an undefined-length UN (an implicit VR sequence inside an explicit
    dataset), undefined-length OB and OW values (fragments) and encapsulated pixel data: the
    scanner walks each to its delimiter and finds the pixel data after them."""
    implicit_item = _item(
        0xFFFE, 0xE000, _item(0x0008, 0x0100, b"ABCD") + _item(0xFFFE, 0xE00D, b""), UNDEFINED
    )
    data = (
        _uids()
        + _explicit(0x0029, 0x1010, b"UN", implicit_item + SEQ_DELIMITER, UNDEFINED)
        + _explicit(0x0029, 0x1020, b"OB", FRAGMENTS + SEQ_DELIMITER, UNDEFINED)
        + _explicit(0x0029, 0x1030, b"OW", FRAGMENTS + SEQ_DELIMITER, UNDEFINED)
    )
    pixels_at = len(data) + 12
    data += _explicit(0x7FE0, 0x0010, b"OB", FRAGMENTS + SEQ_DELIMITER, UNDEFINED)
    values, pix_off, pix_len = fast_path(data, "1.2.840.10008.1.2.4.50")
    assert values["SOPInstanceUID"] == "1.2.3.4" and values["SeriesInstanceUID"] == "1.2.3.4.5.6"
    assert (pix_off, pix_len) == (pixels_at, UNDEFINED)


def _code_item(implicit: bool) -> bytes:
    """An item holding a Code Value (0008,0100) "T1", explicit or implicit VR."""
    if implicit:
        return _item(0xFFFE, 0xE000, _item(0x0008, 0x0100, b"T1"))
    return _item(0xFFFE, 0xE000, _explicit(0x0008, 0x0100, b"SH", b"T1"))


@pytest.mark.parametrize("vr", [b"SQ", b"UN"])
def test_a_sequence_without_its_delimiter_ends_with_its_item(vr: bytes) -> None:
    """PS3.5 7.5.2: a sequence of undefined length ends with its own delimiter, inside the
    item that holds it. One whose delimiter is missing runs past the end of that item (of
    defined length): the dataset is truncated there and refused, the sequence named, whatever
    follows the item (the next top-level element, or a stray delimiter of the outer sequence
    that would close it). An undefined-length UN holds an implicit VR sequence (6.2.2)."""
    if vr == b"SQ":  # Scheduled Protocol Code Sequence
        tag, inner_item = (0x0040, 0x0008), _code_item(False)
    else:  # a private element
        tag, inner_item = (0x0029, 0x1010), _code_item(True)
    inner = _explicit(*tag, vr, inner_item, UNDEFINED)
    requested = _explicit(0x0040, 0x1001, b"SH", b"RP1 ")  # Requested Procedure ID

    def dataset(item_value: bytes, stray_delimiter: bool) -> bytes:
        item = _item(0xFFFE, 0xE000, item_value)
        outer = item + (SEQ_DELIMITER if stray_delimiter else b"")
        # Request Attributes Sequence (0040,0275), defined length
        return _uids() + _explicit(0x0040, 0x0275, b"SQ", outer) + requested

    ts = "1.2.840.10008.1.2.1"
    whole = dataset(inner + SEQ_DELIMITER, False)
    assert scan(whole, ts).values == {
        "SOPClassUID": "1.2.3",
        "SOPInstanceUID": "1.2.3.4",
        "StudyInstanceUID": "1.2.3.4.5",
        "SeriesInstanceUID": "1.2.3.4.5.6",
    }
    name = f"({tag[0]:04X},{tag[1]:04X})"
    for stray_delimiter in (False, True):
        with pytest.raises(InvalidDataset) as e:
            scan(dataset(inner, stray_delimiter), ts)
        assert e.value.reason == f"truncated: sequence {name} runs past the end of its container"


def test_fragments_that_are_not_items_go_to_pydicom_and_cut_ones_are_refused() -> None:
    base = _uids()
    pixel = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, UNDEFINED)
    not_item = _item(0xFFFE, 0xE00D, b"\x01\x02\x03\x04")  # an item end where a fragment must be
    with pytest.raises(ScanError, match=r"^bad fragment in encapsulated pixel data$"):
        _walk(base + pixel + FRAGMENTS + not_item + SEQ_DELIMITER, False, True)
    undefined_fragment = _item(0xFFFE, 0xE000, b"", UNDEFINED)
    with pytest.raises(ScanError, match=r"^bad fragment in encapsulated pixel data$"):
        _walk(base + pixel + undefined_fragment + SEQ_DELIMITER, False, True)
    cut = _item(0xFFFE, 0xE000, b"\x01\x02", 4)  # declares 4 bytes, 2 remain
    with pytest.raises(
        InvalidDataset, match=r"^truncated: a pixel data fragment runs past the end$"
    ):
        _walk(base + pixel + cut, False, True)
    # the last fragment ends exactly at the end: no delimiter follows
    with pytest.raises(
        InvalidDataset,
        match=r"^truncated: encapsulated pixel data runs past the end of its container$",
    ):
        _walk(base + pixel + FRAGMENTS, False, True)


@pytest.mark.parametrize("padding", [1, 7, 8, 9, 1000, (1 << 20) + 3])
def test_zero_padding_after_the_last_element_is_ignored(padding: int) -> None:
    data = _uids()
    values, _, _ = fast_path(data + b"\0" * padding, "1.2.840.10008.1.2.1")
    assert values == fast_path(data, "1.2.840.10008.1.2.1")[0]
    with pytest.raises(InvalidDataset):
        scan(data + b"\0" * padding + b"\1", "1.2.840.10008.1.2.1")


ITEM_DELIMITER = _item(0xFFFE, 0xE00D, b"")
EXPLICIT = "1.2.840.10008.1.2.1"
CODE = _explicit(0x0008, 0x0100, b"SH", b"T1")  # Code Value, 10 bytes
REQUESTED = _explicit(0x0040, 0x1001, b"SH", b"RP1 ")  # Requested Procedure ID, 12 bytes


def _request(value: bytes, length: int | None = None) -> bytes:
    """Request Attributes Sequence (0040,0275), explicit VR, defined length, after the UIDs
    and before the Requested Procedure ID (0040,1001)."""
    return _uids() + _explicit(0x0040, 0x0275, b"SQ", value, length) + REQUESTED


def _implicit_uids() -> bytes:
    """The four UIDs in implicit VR little endian, written by hand."""
    return b"".join(
        _item(g, e, v)
        for g, e, v in [
            (0x0008, 0x0016, b"1.2.3\0"),
            (0x0008, 0x0018, b"1.2.3.4\0"),
            (0x0020, 0x000D, b"1.2.3.4.5\0"),
            (0x0020, 0x000E, b"1.2.3.4.5.6\0"),
        ]
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(
            # PS3.5 7.5.1: an item holds at most what its sequence holds; this one declares
            # 22 bytes (its Code Value and the Requested Procedure ID after the sequence) in
            # a sequence of 18 (its own header and the Code Value).
            _request(_item(0xFFFE, 0xE000, CODE, 22)),
            "truncated: an item of (0040,0275) declares 22 bytes, 10 remain in its container",
            id="item-longer-than-its-sequence",
        ),
        pytest.param(
            _request(CODE),  # a sequence holds items, nothing else
            "sequence (0040,0275) holds (0008,0100) where an item must be",
            id="element-where-an-item-must-be",
        ),
        pytest.param(
            # a sequence delimiter has no place in a sequence of defined length (7.5.2); the
            # scanner lets it pass, but still checks what follows it
            _request(SEQ_DELIMITER + CODE),
            "sequence (0040,0275) holds (0008,0100) where an item must be",
            id="element-after-a-stray-sequence-delimiter",
        ),
        pytest.param(
            # the first item (10 bytes) holds a Code Value that declares 6 bytes, 2 remain
            # in it; the next item of the same sequence is whole
            _request(
                _item(0xFFFE, 0xE000, _explicit(0x0008, 0x0100, b"SH", b"T1", 6))
                + _item(0xFFFE, 0xE000, CODE)
            ),
            "truncated: element (0008,0100) in a sequence item declares 6 bytes, 2 remain "
            "in the item",
            id="element-longer-than-its-item",
        ),
        pytest.param(
            _request(_item(0xFFFE, 0xE000, CODE + b"\x01\x02\x03")),  # 3 bytes: no element
            "truncated: 3 byte(s) after the last element",
            id="bytes-after-the-last-element-of-an-item",
        ),
        pytest.param(
            # an item of undefined length ends with its delimiter (7.5.2), here missing: the
            # sequence (defined length) ends after the Code Value
            _request(_item(0xFFFE, 0xE000, CODE, UNDEFINED)),
            "truncated: an item runs past the end of its container",
            id="item-without-its-delimiter",
        ),
        pytest.param(
            # a sequence of defined length in an item: Scheduled Protocol Code Sequence
            # (0040,0008) holding a Code Value where an item must be
            _request(_item(0xFFFE, 0xE000, _explicit(0x0040, 0x0008, b"SQ", CODE))),
            "sequence (0040,0008) holds (0008,0100) where an item must be",
            id="nested-sequence-holding-an-element",
        ),
        pytest.param(
            _uids() + _explicit(0x0040, 0x1001, b"SH", b"RP", 4),
            "truncated: element (0040,1001) declares 4 bytes, 2 remain",
            id="last-element-cut",
        ),
        pytest.param(
            _uids() + b"\x01\x02\x03",
            "truncated: 3 byte(s) after the last element",
            id="bytes-after-the-last-element",
        ),
        pytest.param(
            _uids() + struct.pack("<HH2sH", 0x0040, 0x0275, b"SQ", 0) + b"\0\0",
            f"truncated: the element header at offset {len(_uids())} is cut off",
            id="long-element-header-cut",
        ),
    ],
)
def test_the_scanner_refuses_a_structure_that_does_not_add_up(data: bytes, reason: str) -> None:
    """What the scanner itself refuses, and why (each reason written out by hand): items,
    elements and headers that run past their container, and what is not an item where an
    item must be. These never reach pydicom, which lets some of them pass."""
    with pytest.raises(InvalidDataset) as e:
        scan(data, EXPLICIT)
    assert e.value.reason == reason
    assert not e.value.missing_uids


def test_an_implicit_vr_sequence_is_known_by_its_tag() -> None:
    """Implicit VR: the scanner takes the VR of an element it does not index from the data
    dictionary (PS3.5 7.1.3, annex A), and checks a sequence's items as in explicit VR:
    Request Attributes Sequence (0040,0275), defined length, holding a Code Value where an
    item must be."""
    data = _implicit_uids() + _item(0x0040, 0x0275, _item(0x0008, 0x0100, b"T1"))
    with pytest.raises(InvalidDataset) as e:
        scan(data, "1.2.840.10008.1.2")
    assert e.value.reason == "sequence (0040,0275) holds (0008,0100) where an item must be"


def test_garbage_after_the_elements_is_named_with_its_offset() -> None:
    """Bytes that are not an element after a whole one: their offset is counted from the
    start of the dataset, not of the buffer."""
    data = b"\xee" * 3 + _uids() + b"\x01" * 8  # tag (0101,0101), VR "\x01\x01"
    with pytest.raises(InvalidDataset) as e:
        scan(data, EXPLICIT, 3)
    assert e.value.reason == (
        f"not an element at offset {len(_uids())}, after (0020,000E) (a length that does not "
        "add up, or garbage)"
    )


def test_empty_values_at_the_very_end_are_whole() -> None:
    """An element of zero length ends the dataset with its header (PS3.5 7.1.2): 8 bytes for
    a short VR, 12 for SQ; a sequence of defined length may hold no item, or an empty one."""
    for last in (
        _explicit(0x0040, 0x1001, b"SH", b""),
        _explicit(0x0040, 0x0275, b"SQ", b""),
        _explicit(0x0040, 0x0275, b"SQ", _item(0xFFFE, 0xE000, b"")),
    ):
        assert fast_path(_uids() + last, EXPLICIT) == (UIDS, -1, -1)


def test_a_repeated_element_is_left_to_pydicom() -> None:
    """PS3.5 7.1: an element occurs at most once, in ascending tag order. The scanner does not
    read a dataset that repeats one (it hands it to pydicom, which decides)."""
    data = _uids() + REQUESTED + REQUESTED
    with pytest.raises(ScanError, match=rf"^tags out of order at offset {len(_uids()) + 12}$"):
        _walk(data, False, True)


@pytest.mark.parametrize("padding", [8, 9, 1000])
def test_zero_padding_after_an_implicit_vr_dataset_is_ignored(padding: int) -> None:
    """In implicit VR, eight zero bytes read as an element (0000,0000) of length 0, out of
    order: zero padding to the end is still padding, read by the scanner itself; a nonzero
    byte after it makes it not padding, and the scanner does not end there."""
    data = _implicit_uids()
    implicit = "1.2.840.10008.1.2"
    assert fast_path(data + b"\0" * padding, implicit) == (UIDS, -1, -1)
    with pytest.raises(ScanError, match=rf"^tags out of order at offset {len(data)}$"):
        _walk(data + b"\0" * padding + b"\1", True, True)


def test_a_dataset_in_implicit_vr_under_an_explicit_syntax_is_read_by_pydicom() -> None:
    """A dataset written in implicit VR although its transfer syntax says explicit (as some
    writers do): its first element has no VR where one must be, so the scanner hands it to
    pydicom, which reads it as it was written, from the offset the dataset starts at."""
    data = _implicit_uids()
    with pytest.raises(ScanError, match=r"^unknown VR b'\\x06\\x00' at offset 0$"):
        _walk(data, False, True)
    assert scan(b"\xee" * 3 + data, EXPLICIT, 3).values == UIDS


def _big(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR big endian element, written by hand (PS3.5 7.3)."""
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"UN", b"SQ"):
        return struct.pack(">HH2sHI", group, elem, vr, 0, n) + value
    return struct.pack(">HH2sH", group, elem, vr, n) + value


def test_undefined_lengths_in_big_endian() -> None:
    """Explicit VR big endian (retired, still received): every tag and length, item headers
    and delimiters included, is big endian; an undefined length is FFFFFFFFH (PS3.5 7.5)."""
    item_header = struct.pack(">HHI", 0xFFFE, 0xE000, UNDEFINED)
    delimiters = struct.pack(">HHI", 0xFFFE, 0xE00D, 0) + struct.pack(">HHI", 0xFFFE, 0xE0DD, 0)
    data = (
        _big(0x0008, 0x0016, b"UI", b"1.2.3\0")
        + _big(0x0008, 0x0018, b"UI", b"1.2.3.4\0")
        + _big(0x0020, 0x000D, b"UI", b"1.2.3.4.5\0")
        + _big(0x0020, 0x000E, b"UI", b"1.2.3.4.5.6\0")
        + _big(
            0x0040,
            0x0275,
            b"SQ",
            item_header + _big(0x0008, 0x0100, b"SH", b"T1") + delimiters,
            UNDEFINED,
        )
        + _big(0x0040, 0x1001, b"SH", b"RP1 ")
    )
    pixels_at = len(data) + 12
    data += _big(0x7FE0, 0x0010, b"OW", b"\x01\x02\x03\x04")
    assert fast_path(data, "1.2.840.10008.1.2.2") == (UIDS, pixels_at, 4)


def _nested(depth: int, undefined: bool) -> bytes:
    """`depth` Content Sequences (0040,A730), each in the one item of the one before."""
    inner = b""
    for _ in range(depth):
        if undefined:
            item = _item(0xFFFE, 0xE000, inner + ITEM_DELIMITER, UNDEFINED)
            inner = _explicit(0x0040, 0xA730, b"SQ", item + SEQ_DELIMITER, UNDEFINED)
        else:
            inner = _explicit(0x0040, 0xA730, b"SQ", _item(0xFFFE, 0xE000, inner))
    return _uids() + inner


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_sequences_nest_at_most_64_deep(undefined: bool) -> None:
    """The scanner reads sequences nested 64 deep (the top-level one is the first) and refuses
    deeper ones: a bound on the recursion, far above real objects."""
    assert fast_path(_nested(64, undefined), EXPLICIT) == (UIDS, -1, -1)
    with pytest.raises(InvalidDataset) as e:
        scan(_nested(65, undefined), EXPLICIT)
    assert e.value.reason == "sequences nested deeper than 64"


def test_scan_reads_from_an_offset_in_memory_or_in_a_view() -> None:
    """The pixel data's place is counted from the start of the dataset (the value of
    PixelData: after its 12-byte header), whether the dataset is given as bytes from an
    offset or as a view; the header carries the transfer syntax it was read in."""
    pixels = _explicit(0x7FE0, 0x0010, b"OW", b"\x01\x02\x03\x04")
    data = _uids() + pixels
    for buf, start in ((b"\xee" * 5 + data, 5), (memoryview(data), 0)):
        header = scan(buf, EXPLICIT, start)
        assert header.values == UIDS
        assert (header.pixel_offset, header.pixel_length) == (len(_uids()) + 12, 4)
        assert header.transfer_syntax == EXPLICIT
    header = scan(memoryview(b"\xee" * 5 + data), EXPLICIT, 5)
    assert (header.values, header.pixel_offset) == (UIDS, len(_uids()) + 12)


def test_a_deflated_dataset_that_does_not_inflate_is_refused() -> None:
    with pytest.raises(InvalidDataset) as e:
        scan(b"\xff" * 16, "1.2.840.10008.1.2.1.99")
    assert e.value.reason.startswith("deflated dataset does not inflate: ")


def element_ends(ds: Dataset, ts: str) -> dict[int, int]:
    """Where each top-level element of `ds` ends in its encoding (offset -> tag), found by
    encoding the first k elements with pydicom: a cut at one of these offsets leaves a
    shorter dataset that is whole; a cut anywhere else leaves a truncated one."""
    ends = {0: -1}
    prefix = Dataset()
    for elem in sorted(ds, key=lambda e: e.tag):
        prefix.add(elem)
        ends[len(encode(prefix, ts))] = int(elem.tag)
    return ends


@pytest.mark.slow
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    ds=datasets(),
    ts=st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]),
    cut=st.integers(1, 200),
)
def test_truncated_datasets_are_refused(ds: Dataset, ts: str, cut: int) -> None:
    """PS3.5 7.1: every element holds exactly the bytes its length declares. A dataset cut
    anywhere but between two top-level elements is truncated and must be refused, whatever
    element the cut falls in (pixel data included); one cut between elements is a shorter
    whole dataset and reads as pydicom reads it."""
    raw = encode(ds, ts)
    cut = min(cut, len(raw) - 1)
    truncated = raw[:-cut]
    ends = element_ends(ds, ts)
    if len(truncated) not in ends:
        # A cut inside an element header: test_a_dataset_cut_inside_an_element_header_...
        assume(not _in_last_header(truncated, ends))
        with pytest.raises(InvalidDataset):
            scan(truncated, ts)
        return
    try:
        header = scan(truncated, ts)
    except InvalidDataset as e:
        assert e.missing_uids, e.reason  # cut before the UIDs: a whole dataset without them
        return
    implicit, little = SYNTAXES[ts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = pydicom.filereader.read_dataset(io.BytesIO(truncated), implicit, little)
    assert header.values == expected_values(again)


def _in_last_header(truncated: bytes, ends: dict[int, int]) -> bool:
    """The cut leaves less than a whole element header (8 or 12 bytes) after the last whole
    element."""
    last = max(end for end in ends if end <= len(truncated))
    return len(truncated) - last < 12


def test_a_dataset_cut_inside_an_element_header_is_refused() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.3"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3.5"
    ds.SeriesInstanceUID = "1.2.3.6"
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = bytes(range(8))
    raw = encode(ds, "1.2.840.10008.1.2.1")
    pixel = raw.rindex(b"\xe0\x7f\x10\x00")
    for keep in range(1, 12):  # OW: a 12-byte header
        with pytest.raises(InvalidDataset):
            scan(raw[: pixel + keep], "1.2.840.10008.1.2.1")


def test_missing_uids_are_named() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.3"
    ds.PatientName = "NO^UIDS"
    with pytest.raises(InvalidDataset) as e:
        scan(encode(ds, "1.2.840.10008.1.2.1"), "1.2.840.10008.1.2.1")
    assert e.value.missing_uids
    assert e.value.reason == "missing SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID"


def test_file_meta_round_trip() -> None:
    meta = build_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", "AE1")
    p10 = split_part10(meta + b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00")
    assert (p10.transfer_syntax, p10.sop_instance_uid, p10.source_ae) == (
        "1.2.840.10008.1.2.1",
        "1.2.3.4",
        "AE1",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(meta + b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00"))
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.ImplementationClassUID.startswith("2.25.")


@pytest.mark.parametrize(
    "junk", [b"", b"hello world, not dicom", b"\x00" * 300, b"%PDF-1.4\n" * 40]
)
def test_not_dicom(junk: bytes) -> None:
    with pytest.raises(InvalidDataset):
        p10 = split_part10(junk)
        scan(junk[p10.dataset_offset :], p10.transfer_syntax)
