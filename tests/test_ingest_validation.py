"""One validation for every ingest path, and decoders that fail cleanly.

A dataset whose element lengths do not add up (a sequence one byte longer than its item,
bytes after the last element) is refused with C000 over DIMSE and counted as failed by
`pacsgrid import`, and nothing is stored either way; DCMTK's dcmdump, an independent reader,
confirms each such file is unreadable. An RLE object whose pixel data makes the Rust decoder
panic is stored (its header is sound) but cannot be converted: C-GET reports a failed
sub-operation and the web answers 406, instead of never answering.
"""

from __future__ import annotations

import asyncio
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage as SC
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from pacsgrid.dicom import dimse
from pacsgrid.dicomfile.part10 import build_file_meta
from tests.conftest import Server, dcmtk, pacsgrid_cli
from tests.test_bad_input import index_count, store_raw
from tests.web_helpers import start_web

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def base_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Lengths^Test"
    ds.PatientID = "LEN1"
    ds.Modality = "OT"
    return ds


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


def inner_sequence_plus_one() -> tuple[Dataset, bytes]:
    """A code sequence inside an item declares one byte more than the item holds."""
    ds = base_dataset()
    code = Dataset()
    code.CodeValue = "113691"
    code.CodingSchemeDesignator = "DCM"
    item = Dataset()
    item.ConceptNameCodeSequence = Sequence([code])
    ds.ContentSequence = Sequence([item])
    raw = encode(ds)
    at = raw.index(struct.pack("<HH", 0x0040, 0xA043)) + 8
    (length,) = struct.unpack_from("<I", raw, at)
    return ds, raw[:at] + struct.pack("<I", length + 1) + raw[at + 4 :]


def trailing_partial_element() -> tuple[Dataset, bytes]:
    """Implicit VR, followed by six bytes of an element header that never ends."""
    ds = base_dataset()
    return ds, encode(ds, implicit=True) + struct.pack("<HH", 0x0099, 0x0012) + b"\x00\x01"


def repeated_fragment() -> tuple[Dataset, bytes]:
    """A stretch of a text value sent twice (a P-DATA fragment repeated): the bytes after
    the value are not an element."""
    ds = base_dataset()
    ds.ImageComments = "x" * 200
    raw = encode(ds)
    at = raw.index(b"x" * 200) + 200
    return ds, raw[:at] + b"x" * 58 + raw[at:]


BROKEN = {
    "repeated-fragment": (repeated_fragment, EXPLICIT, "not an element"),
    "inner-sequence-plus-one": (inner_sequence_plus_one, EXPLICIT, "truncated"),
    "trailing-partial-element": (trailing_partial_element, IMPLICIT, "truncated"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("lengths") / "archive").start()
    yield s
    s.stop()


@pytest.mark.dcmtk
@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_lengths_are_refused_on_every_path(
    server: Server, tmp_path: Path, name: str
) -> None:
    make, ts, why = BROKEN[name]
    ds, dataset = make()
    part10 = tmp_path / f"{name}.dcm"
    part10.write_bytes(build_file_meta(SC, ds.SOPInstanceUID, ts) + dataset)
    dump = dcmtk("dcmdump", part10)
    assert dump.returncode != 0, f"dcmdump reads it, so it is not broken:\n{dump.stdout}"

    before = index_count(server)
    status, comment = asyncio.run(store_raw(server.port, SC, ds.SOPInstanceUID, ts, dataset))
    assert status == dimse.CANNOT_UNDERSTAND, (hex(status), comment)
    assert why in comment
    assert index_count(server) == before

    imported = pacsgrid_cli("import", "--data-dir", tmp_path / "imported", part10)
    assert "failed 1" in imported.stdout + imported.stderr, imported.stdout + imported.stderr
    assert why in imported.stderr


# ---------------------------------------------------------------- a decoder that panics

# Two RLE segments for 16-bit pixels whose second segment makes pylibjpeg-rle index past
# its output (found by random search; the decoder panics instead of raising).
PANIC_FRAME = bytes.fromhex("020000004000000045000000" + "00000000" * 13 + "0be87608e8e105")


def panicking_rle() -> Dataset:
    ds = base_dataset()
    ds.Rows, ds.Columns = 1, 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([PANIC_FRAME])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def test_the_frame_really_panics_the_decoder() -> None:
    from rle.rle import decode_frame

    with pytest.raises(BaseException) as e:
        decode_frame(PANIC_FRAME, 2, 16, "<")
    assert not isinstance(e.value, Exception), "no longer a panic: this test proves nothing"


@pytest.mark.slow
def test_a_panicking_decoder_fails_the_sub_operation_and_the_web_request(tmp_path: Path) -> None:
    ds = panicking_rle()
    server, base = start_web(tmp_path / "panic", extra=("--peer", "GETTER@127.0.0.1:9"))
    try:
        status, comment = asyncio.run(
            store_raw(server.port, SC, ds.SOPInstanceUID, RLELossless, encode(ds))
        )
        assert status == 0, comment

        received: list[str] = []
        ae = AE(ae_title="GETTER")
        ae.dimse_timeout = 60
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(SC, [EXPLICIT])  # not RLE: the archive must convert
        assoc = ae.associate(
            "127.0.0.1",
            server.port,
            ae_title="PACSGRID",
            ext_neg=[build_role(SC, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append("x") or 0)],
        )
        assert assoc.is_established
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ds.StudyInstanceUID
            responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
        finally:
            if assoc.is_established:
                assoc.release()
        final = responses[-1][0]
        assert final is not None and "Status" in final, "the C-GET was never answered"
        assert int(final.Status) == dimse.OUT_OF_RESOURCES_SUBOPS
        assert int(final.NumberOfFailedSuboperations) == 1 and not received

        url = (
            f"{base}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )
        for path, accept in (
            ("/rendered", "image/jpeg"),
            ("/frames/1", "application/octet-stream"),
        ):
            request = urllib.request.Request(url + path, headers={"Accept": accept})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(request, timeout=60)
            assert e.value.code == 406, (path, e.value.code)
            assert e.value.read(), "an empty reply"
        log = server.text()
        assert "PanicException" in log and "Traceback" not in log
    finally:
        server.stop()
