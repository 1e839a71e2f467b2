"""Migration ledgers: what the archive knows about each item of a source it migrates from.

A ledger row exists per source item (a file of a legacy folder, a study of a legacy PACS) and
says what happened to it, so that each pass of a migration moves only what is new or changed,
failures are listed with their reason instead of being retried forever, and the final report
compares source and archive item by item. Rows live in the index (tables `folder_ledger` and
`study_ledger`, see pacsgrid.index.schema) and are written through `Archive`.

A `source` names the ledger: the absolute path of a folder, or ``AET@HOST:PORT`` of a PACS.
"""

from __future__ import annotations

from dataclasses import dataclass

# Folder ledger states
STORED = "stored"  # ingested (new in the archive)
DUPLICATE = "duplicate"  # its SOP Instance UID was already in the archive
SKIPPED = "skipped"  # DICOMDIR or not DICOM: nothing to migrate (reason says which)
FAILED = "failed"  # the archive refused it (reason says why); not retried until it changes
REMOVED = "removed"  # was in the source, is gone now; its instance stays in the archive

# Study ledger states
PENDING = "pending"  # found in the source, not (completely) retrieved yet
DONE = "done"  # received >= expected
INCOMPLETE = "incomplete"  # retrieved, but fewer instances arrived than expected; retried
GAVE_UP = "failed"  # incomplete after the maximum number of attempts; listed, not retried


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a legacy folder: its identity on disk and what became of it."""

    path: str  # relative to the source folder, '/' separated
    size: int
    mtime_ns: int
    sha256: str
    sop_uid: str
    state: str
    reason: str = ""
    updated_at: float = 0.0

    def unchanged(self, size: int, mtime_ns: int) -> bool:
        """Whether a file with this size and mtime is the one this entry describes."""
        return self.size == size and self.mtime_ns == mtime_ns


@dataclass(frozen=True, slots=True)
class StudyEntry:
    """One study of a legacy PACS: how many instances it has there, how many arrived here."""

    study_uid: str
    study_date: str = ""
    patient_id: str = ""
    expected: int = 0  # instances in the source (-1: the source did not say)
    received: int = 0  # of the source's instances, how many the archive holds
    state: str = PENDING
    attempts: int = 0
    last_error: str = ""
    updated_at: float = 0.0
