"""Seed inputs for the fuzzers: the test corpus (tests/corpus.py: the shared files or
pydicom's and pynetdicom's), small datasets with nested sequences, and valid PDUs and command
sets of every kind, so that mutation starts from inputs that reach deep into each decoder."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from pacsgrid.dicom import dimse, pdu
from tests.fuzz.fuzzers import SYNTAXES

MAX_SEED = 64 * 1024  # larger files slow every mutation down; small ones cover the same code


def _files() -> Iterator[Path]:
    from tests.corpus import corpus

    seen = 0
    for f in corpus():
        if f.path.stat().st_size <= MAX_SEED and seen < 60:
            seen += 1
            yield f.path


def _nested_datasets() -> Iterator[tuple[int, bytes]]:
    """(syntax index, dataset) with sequences in sequences, in every byte order and VR form."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.sequence import Sequence

    code = Dataset()
    code.CodeValue = "113691"
    code.CodingSchemeDesignator = "DCM"
    item = Dataset()
    item.ConceptNameCodeSequence = Sequence([code])
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.6"
    ds.PatientName = "Fuzz^Seed"
    ds.ContentSequence = Sequence([item, item])
    for index, (implicit, little) in enumerate(((True, True), (False, True), (False, False))):
        fp = DicomBytesIO()
        fp.is_implicit_VR = implicit
        fp.is_little_endian = little
        write_dataset(fp, ds)
        yield index, fp.getvalue()


def seeds(fuzzer: str) -> Iterator[bytes]:
    from pacsgrid.dicomfile.part10 import split_part10
    from pacsgrid.errors import InvalidDataset

    if fuzzer in ("header", "part10"):
        for path in _files():
            data = path.read_bytes()
            if fuzzer == "part10":
                yield data
                continue
            try:
                p10 = split_part10(data)
            except InvalidDataset:
                continue
            if p10.transfer_syntax in SYNTAXES:
                yield bytes([SYNTAXES.index(p10.transfer_syntax)]) + data[p10.dataset_offset :]
        for index, dataset in _nested_datasets():
            yield (bytes([index]) + dataset) if fuzzer == "header" else dataset
    elif fuzzer == "pdu":
        contexts = [
            pdu.PresentationContext(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"]),
            pdu.PresentationContext(3, "1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"]),
        ]
        roles = {
            "1.2.840.10008.5.1.4.1.1.2": pdu.RoleSelection("1.2.840.10008.5.1.4.1.1.2", True, True)
        }
        rq = pdu.AssociateRQ("PACSGRID", "FUZZ", contexts, 16384, "1.2.3", "FUZZ_1", roles)
        ac = pdu.AssociateAC(
            "FUZZ", "PACSGRID", contexts, 16384, "1.2.3", "FUZZ_1", list(roles.values())
        )
        yield b"\x00" + pdu.encode_associate_rq(rq)[6:]
        yield b"\x01" + pdu.encode_associate_ac(ac)[6:]
        yield b"\x02" + pdu.encode_associate_rj(pdu.AssociateRJ(1, 1, 3))[6:]
        for piece in pdu.encode_pdata(1, b"\x08\x00\x18\x00UI\x06\x001.2.3\x00" * 4, False, 40):
            if len(piece) > 12:
                yield b"\x03" + bytes(piece)
        header = bytes(pdu.encode_pdata(1, b"abcd", True, 0)[0])
        yield b"\x03" + header[6:] + b"abcd"
    elif fuzzer == "dimse":
        for field in dimse.COMMAND_NAMES:
            yield dimse.encode_command(
                {
                    dimse.AFFECTED_SOP_CLASS: "1.2.840.10008.1.1",
                    dimse.COMMAND_FIELD: field,
                    dimse.MESSAGE_ID: 7,
                    dimse.MESSAGE_ID_RESPONDED: 7,
                    dimse.STATUS: 0xFF00,
                    dimse.ERROR_COMMENT: "seed",
                    dimse.MOVE_DESTINATION: "DEST",
                    dimse.DATASET_TYPE: dimse.NO_DATASET,
                }
            )
        yield struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", 0)
    else:
        raise ValueError(f"unknown fuzzer {fuzzer!r}")
