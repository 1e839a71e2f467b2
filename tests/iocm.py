"""Test material for corrections: IOCM rejection notes (built with pydicom, as a modality or
workstation would send them) and HL7 ADT messages."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
    "113000": "Of Interest",  # an ordinary key object selection, not a rejection
}


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def rejection_note(
    out: Path, rejected: list[Path], code: str = "113001", *, sop_uid: str = ""
) -> Path:
    """A Key Object Selection Document titled `code` referencing the instances in the files
    `rejected` (all of one study), in a series of its own; written to `out`."""
    first = read(rejected[0])
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = KOS
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "KO"
    ds.SeriesNumber = "99"
    ds.InstanceNumber = "1"
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate"):
        setattr(ds, keyword, first.get(keyword, ""))
    ds.StudyTime = first.get("StudyTime", "")
    ds.AccessionNumber = first.get("AccessionNumber", "")
    ds.ReferringPhysicianName = ""
    ds.StudyID = first.get("StudyID", "")
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    title = Dataset()
    title.CodeValue = code
    title.CodingSchemeDesignator = "DCM"
    title.CodeMeaning = TITLES[code]
    ds.ConceptNameCodeSequence = Sequence([title])
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    by_series: dict[str, list[Dataset]] = {}
    for path in rejected:
        r = read(path)
        ref = Dataset()
        ref.ReferencedSOPClassUID = r.SOPClassUID
        ref.ReferencedSOPInstanceUID = r.SOPInstanceUID
        by_series.setdefault(str(r.SeriesInstanceUID), []).append(ref)
    series_items = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = Sequence(refs)
        series_items.append(item)
    study_item = Dataset()
    study_item.StudyInstanceUID = first.StudyInstanceUID
    study_item.ReferencedSeriesSequence = Sequence(series_items)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([study_item])
    ds.ContentSequence = Sequence([])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = KOS
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def adt(
    event: str,
    control_id: str,
    patient_id: str,
    *,
    merged_id: str = "",
    name: str = "",
    birth_date: str = "",
    sex: str = "",
    sender: str = "ADT1",
    issuer: str = "",
) -> str:
    """An HL7 v2.5 ADT message (A08, A40 or A47) as a registry sends it."""
    structure = {"A08": "ADT_A01", "A40": "ADT_A39", "A47": "ADT_A30"}[event]
    cx = f"{patient_id}^^^{issuer}^MR" if issuer else f"{patient_id}^^^^MR"
    segments = [
        f"MSH|^~\\&|{sender}|HOSP|PACSGRID|RAD|20240102030405||ADT^{event}^{structure}|"
        f"{control_id}|P|2.5",
        f"EVN|{event}|20240102030405",
        f"PID|1||{cx}||{name}||{birth_date}|{sex}",
    ]
    if merged_id:
        mcx = f"{merged_id}^^^{issuer}^MR" if issuer else f"{merged_id}^^^^MR"
        segments.append(f"MRG|{mcx}")
    return "\r".join(segments) + "\r"


class Mllp:
    """An HL7 sender on one TCP connection: each message framed <VT>...<FS><CR> (MLLP), its
    acknowledgement read up to its own end block, parsed with the hl7 package."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, message: str | bytes) -> tuple[str, str, str]:
        """(MSA-1, MSA-2, MSA-3) of the acknowledgement of `message`."""
        data = message.encode() if isinstance(message, str) else message
        self.sock.sendall(b"\x0b" + data + b"\x1c\r")
        return ack_fields(self.receive())

    def receive(self) -> bytes:
        buf = b""
        while not buf.endswith(b"\x1c\r"):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"connection closed after {buf!r}")
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Mllp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ack_fields(raw: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, MSA-3) of an MLLP-framed acknowledgement, read with the hl7 package."""
    import hl7

    text = raw.decode()
    assert text.startswith("\x0b") and text.endswith("\x1c\r"), repr(text)
    message = hl7.parse(text[1:-2])
    msa = message.segment("MSA")
    return str(msa(1)), str(msa(2)), str(msa(3)) if len(msa) > 3 else ""
