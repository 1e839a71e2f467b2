"""Outgoing objects with corrected attribute values (PS3.3 C.12.1, Original Attributes).

A stored object never changes; when its study is corrected (pacsgrid.correction), a retrieve
sends a re-encoded copy: the corrected values in the main dataset, and the values they replace
kept in an item of the Original Attributes Sequence (0400,0561) with the reason CORRECT, when
and by which system, so a receiver can tell what was changed. The copy is in the stored
transfer syntax; compressed pixel data is copied as it is, never decoded. Objects of studies
without a correction are sent as stored and never come here.
"""

from __future__ import annotations

import io
import warnings
import zlib
from collections.abc import Mapping
from copy import deepcopy
from datetime import UTC, datetime

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from pacsgrid.dicomfile.header import DEFLATED_LE, EXPLICIT_BE, IMPLICIT_LE

UTF8 = "ISO_IR 192"


class CoercionError(Exception):
    """The dataset cannot be read or written back (it is then not sent)."""


def coerce(
    dataset: bytes | memoryview,
    transfer_syntax: str,
    values: Mapping[str, str],
    *,
    system: str,
    now: datetime | None = None,
) -> bytes:
    """`dataset` (no file meta) with the attributes of `values` (keyword -> value) set, in the
    same transfer syntax; the dataset as it is when nothing differs."""
    ds = parse(dataset, transfer_syntax)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            changed = _apply(ds, values, system, now or datetime.now(UTC))
            if not changed:
                return bytes(dataset)
            out = DicomBytesIO()
            out.is_little_endian = transfer_syntax != EXPLICIT_BE
            out.is_implicit_VR = transfer_syntax == IMPLICIT_LE
            write_dataset(out, ds)
            body = out.getvalue()
    except Exception as e:  # pydicom raises many kinds of errors on odd datasets
        raise CoercionError(f"cannot re-encode the dataset: {type(e).__name__}: {e}") from None
    if transfer_syntax == DEFLATED_LE:
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = packer.compress(body) + packer.flush()
    return body


def parse(dataset: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """The whole dataset (no file meta) as pydicom reads it, inflated first when deflated;
    CoercionError when it cannot be read."""
    data = bytes(dataset)
    if transfer_syntax == DEFLATED_LE:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as e:
            raise CoercionError(f"deflated dataset does not inflate: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(
                io.BytesIO(data), transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE
            )
    except Exception as e:  # pydicom raises many kinds of errors on broken datasets
        raise CoercionError(f"cannot read the dataset: {type(e).__name__}: {e}") from None
    return ds


def _apply(ds: Dataset, values: Mapping[str, str], system: str, now: datetime) -> bool:
    """Set `values` in `ds`; record what they replace. False when nothing differs."""
    _fit_character_set(ds, values)
    old = Dataset()
    changed = False
    for keyword, value in values.items():
        elem = ds.data_element(keyword) if keyword in ds else None
        current = "" if elem is None or elem.value is None else str(elem.value)
        if current == value and (elem is not None or not value):
            continue
        if elem is not None:
            old.add(deepcopy(elem))
        setattr(ds, keyword, value)
        changed = True
    if not changed:
        return False
    item = Dataset()
    item.AttributeModificationDateTime = now.strftime("%Y%m%d%H%M%S.%f+0000")
    item.ModifyingSystem = system[:64]
    item.SourceOfPreviousValues = ""
    item.ReasonForTheAttributeModification = "CORRECT"
    item.ModifiedAttributesSequence = Sequence([old])
    history = ds.get("OriginalAttributesSequence")
    earlier = list(history) if history else []
    ds.OriginalAttributesSequence = Sequence([*earlier, item])
    return True


def _fit_character_set(ds: Dataset, values: Mapping[str, str]) -> None:
    """Declare UTF-8 when the dataset's character set cannot hold a new value; every text of
    the dataset is then decoded with the old set and written as UTF-8."""
    text = [v for v in values.values() if not v.isascii()]
    if not text:
        return
    declared = ds.get("SpecificCharacterSet") or ""
    encodings = convert_encodings(declared) if declared else ["ascii"]  # the default: ASCII
    if len(encodings) == 1:
        try:
            for v in text:
                v.encode(encodings[0])
            return
        except (UnicodeEncodeError, LookupError):
            pass
    ds.decode()
    ds.SpecificCharacterSet = UTF8
