"""Convert a stored dataset to another transfer syntax when a retrieve requester needs it.

Objects are stored as received; conversion happens only on the way out, and only where pydicom
can do it: between the uncompressed syntaxes (implicit/explicit VR, little/big endian),
from deflated, and from compressed syntaxes that pydicom can decode with the installed
plugins (RLE always, with NumPy). Anything else raises `TranscodeError` and the retrieve reports
a failed sub-operation for that instance.

This is the one place pixel data is decoded (`transcode`, and `pixel_array` for the web's
rendered images and frames), so it is the decoder boundary: whatever a decoder raises on
corrupt data becomes `TranscodeError` here. That includes a Rust panic in a plugin
(pylibjpeg-rle raises pyo3's PanicException, a BaseException that `except Exception` lets
through, leaving a WADO reply empty or a C-GET unanswered).
"""

from __future__ import annotations

import io
import warnings
import zlib
from typing import Any

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from pacsgrid.dicomfile.header import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    UNCOMPRESSED,
)


class TranscodeError(Exception):
    """The dataset cannot be converted or its pixel data decoded (a failed sub-operation on
    DIMSE, 406 on the web)."""


_NOT_OURS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _decoder_failure(e: BaseException, what: str) -> TranscodeError:
    """`e`, raised by pydicom or a decoder plugin, as a TranscodeError (or re-raised when it
    is the interpreter's own: Ctrl-C, exit)."""
    if isinstance(e, _NOT_OURS):
        raise e
    return TranscodeError(f"{what}: {type(e).__name__}: {e}")


def pixel_array(ds: Any) -> Any:
    """`ds.pixel_array`, with decoder failures (panics included) as TranscodeError."""
    try:
        return ds.pixel_array
    except BaseException as e:
        raise _decoder_failure(e, "cannot decode the pixel data") from None


def transcode(dataset: bytes | memoryview, source: str, target: str) -> bytes:
    """`dataset` (no file meta) re-encoded from `source` to `target` transfer syntax."""
    if source == target:
        return bytes(dataset)
    if target not in UNCOMPRESSED:
        raise TranscodeError(f"cannot encode to {target}: only uncompressed targets supported")

    data = bytes(dataset)
    if source == DEFLATED_LE:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as e:
            raise TranscodeError(f"deflated data does not inflate: {e}") from None
        source = EXPLICIT_LE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(io.BytesIO(data), source == IMPLICIT_LE, source != EXPLICIT_BE)
            if source not in UNCOMPRESSED:
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = UID(source)
                ds.decompress(generate_instance_uid=False)
                ds.file_meta = None  # type: ignore[assignment]
            if (source == EXPLICIT_BE) != (target == EXPLICIT_BE):
                _swap_words(ds)
            out = DicomBytesIO()
            out.is_little_endian = target != EXPLICIT_BE
            out.is_implicit_VR = target == IMPLICIT_LE
            write_dataset(out, ds)
            return out.getvalue()
    except BaseException as e:  # pydicom and its plugins raise many kinds, panics included
        raise _decoder_failure(e, f"{UID(source).name} to {UID(target).name}") from None


_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_words(ds: object) -> None:
    """pydicom re-encodes numbers in the new byte order but writes OW/OF/OL/OD/OV values as
    the raw bytes they were read as; swap those words so big endian data survives."""
    import numpy as np

    for elem in ds.iterall():  # type: ignore[attr-defined]
        size = _WORD.get(elem.VR)
        if size and isinstance(elem.value, bytes) and len(elem.value) % size == 0:
            dtype = np.dtype(f"u{size}")
            elem.value = np.frombuffer(elem.value, dtype).byteswap().tobytes()
