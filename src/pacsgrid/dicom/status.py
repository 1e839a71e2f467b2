"""Exceptions to DIMSE statuses, in one place (PS3.4 annexes B and C, PS3.7 annex C).

Every handler catches what the Archive raises and asks `failure_status` what to answer, so a
given error always produces the same status and ErrorComment whichever service met it.
"""

from __future__ import annotations

from pacsgrid.dicom import dimse
from pacsgrid.errors import (
    AccessDenied,
    ArchiveUnavailable,
    InvalidDataset,
    NotFound,
    StorageError,
    UnknownPeer,
)


def failure_status(exc: BaseException) -> tuple[int, str]:
    """(status, ErrorComment) for an exception raised while serving a request."""
    if isinstance(exc, InvalidDataset):
        status = dimse.DATASET_MISMATCH if exc.missing_uids else dimse.CANNOT_UNDERSTAND
        return status, comment(exc.reason)
    if isinstance(exc, ArchiveUnavailable):
        return dimse.OUT_OF_RESOURCES, comment(str(exc))
    if isinstance(exc, AccessDenied):
        return dimse.REFUSED_NOT_AUTHORIZED, comment(str(exc))
    if isinstance(exc, UnknownPeer):
        return dimse.MOVE_DESTINATION_UNKNOWN, comment(str(exc))
    if isinstance(exc, NotFound | StorageError):
        return dimse.UNABLE_TO_PROCESS, comment(str(exc))
    return dimse.UNABLE_TO_PROCESS, comment(f"internal error: {type(exc).__name__}")


def n_failure_status(exc: BaseException) -> tuple[int, str]:
    """The same for a DIMSE-N request (N-ACTION: PS3.7 annex C)."""
    if isinstance(exc, InvalidDataset):
        return dimse.INVALID_ARGUMENT_VALUE, comment(exc.reason)
    if isinstance(exc, ArchiveUnavailable):
        return dimse.RESOURCE_LIMITATION, comment(str(exc))
    if isinstance(exc, AccessDenied):
        return dimse.REFUSED_NOT_AUTHORIZED, comment(str(exc))
    return dimse.PROCESSING_FAILURE, comment(str(exc) or type(exc).__name__)


def comment(text: str) -> str:
    """An ErrorComment value: LO, at most 64 characters, ASCII, no backslash."""
    clean = text.encode("ascii", "replace").decode().replace("\\", "/")
    return clean if len(clean) <= 64 else clean[:61] + "..."
