"""Convert a stored dataset to another transfer syntax when a retrieve requester needs it.

Objects are stored as received; conversion happens only on the way out, and only where pydicom
can do it: between the uncompressed syntaxes (implicit/explicit VR, little/big endian),
from deflated, and from compressed syntaxes that pydicom can decode with the installed
plugins (RLE always, with NumPy). Anything else raises `TranscodeError` and the retrieve reports
a failed sub-operation for that instance.
"""

from __future__ import annotations

import io
import warnings
import zlib

from pacsgrid.dicom.header import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, UNCOMPRESSED


class TranscodeError(Exception):
    pass


def transcode(dataset: bytes | memoryview, source: str, target: str) -> bytes:
    """`dataset` (no file meta) re-encoded from `source` to `target` transfer syntax."""
    if source == target:
        return bytes(dataset)
    if target not in UNCOMPRESSED:
        raise TranscodeError(f"cannot encode to {target}: only uncompressed targets supported")
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset
    from pydicom.uid import UID

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
                from pydicom.dataset import FileMetaDataset

                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = UID(source)
                ds.decompress()
                ds.file_meta = None  # type: ignore[assignment]
            out = DicomBytesIO()
            out.is_little_endian = target != EXPLICIT_BE
            out.is_implicit_VR = target == IMPLICIT_LE
            write_dataset(out, ds)
            return out.getvalue()
    except Exception as e:  # pydicom and its plugins raise many kinds of errors
        raise TranscodeError(
            f"{UID(source).name} to {UID(target).name}: {type(e).__name__}: {e}"
        ) from None
