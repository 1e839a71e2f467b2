"""The one exception tree of pacsgrid.

Front ends never invent their own error statuses: they catch these and map them in one place
(`pacsgrid.dicom.status` for DIMSE, the web layer for HTTP). Every error carries a message meant
for the person reading the log at 3 a.m., and storage errors carry a hint on what to check.

    PacsgridError
    ├── ConfigError              bad setting; names the key
    ├── InvalidDataset           input we refuse to store (cannot parse, missing UIDs)
    ├── AccessDenied             caller may not do this
    ├── UnknownPeer              e.g. a C-MOVE destination that is not configured
    ├── PeerUnreachable          a peer could not be reached, or did not take what we sent
    ├── NotFound                 no such instance/study in the index
    ├── ArchiveUnavailable       cannot make data durable right now (nothing acknowledged)
    │   ├── QuorumNotMet         too few healthy sites for the write quorum
    │   └── IndexUnavailable     the index database cannot commit
    ├── ArchiveInUse             a running `pacsgrid serve` holds the archive (names its pids)
    ├── DrillError               `pacsgrid drill` could not set up or drive its deployment
    ├── InvalidCorrection        a correction that cannot be made as asked (a value its VR
    │   │                        cannot hold, a patient merged into itself)
    │   └── CorrectionConflict   refused by what the archive holds (an undo that would skip a
    │                            later correction, a new PatientID that is already in use)
    └── StorageError             one site failed one operation
        ├── SiteUnavailable      the site is down (unreachable, unmounted, sentinel missing)
        ├── ObjectMissing        the site is up but does not hold the object
        └── ObjectCorrupt        the bytes read back do not match the recorded SHA-256
"""

from __future__ import annotations


class PacsgridError(Exception):
    """Base of every error pacsgrid raises on purpose."""


class ConfigError(PacsgridError):
    """A setting is wrong. `str()` is one line: the key, then what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class InvalidDataset(PacsgridError):
    """Input that cannot be archived; nothing was written.

    `missing_uids` is true when the bytes parse but lack a UID the archive files objects under:
    DIMSE answers "does not match SOP class" for that, "cannot understand" otherwise.
    """

    def __init__(self, reason: str, *, missing_uids: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing_uids = missing_uids


class AccessDenied(PacsgridError):
    """The caller is not allowed to perform the operation."""


class UnknownPeer(PacsgridError):
    """An AE title that is not configured as a peer (e.g. a C-MOVE destination)."""


class PeerUnreachable(PacsgridError):
    """An outgoing association failed: the peer could not be reached (refused, rejected,
    TLS handshake), or it answered what we sent with a failure status."""


class NotFound(PacsgridError):
    """The index holds nothing that matches."""


class ArchiveUnavailable(PacsgridError):
    """The archive cannot make new data durable right now; nothing was acknowledged."""


class QuorumNotMet(ArchiveUnavailable):
    """Fewer healthy sites than the write quorum asks for."""


class IndexUnavailable(ArchiveUnavailable):
    """The index database did not commit (unreachable, locked for too long, read-only)."""


class ArchiveInUse(PacsgridError):
    """The archive is being served (or restored) and the operation must wait for that to end."""


class DrillError(PacsgridError):
    """`pacsgrid drill` could not set up or drive its own deployment (a program missing, a
    server that did not come up); the archive under test is not to blame."""


class InvalidCorrection(PacsgridError):
    """A correction that cannot be made as asked; nothing was changed."""


class CorrectionConflict(InvalidCorrection):
    """A correction refused because of what the archive holds; nothing was changed."""


class StorageError(PacsgridError):
    """One operation on one storage site failed.

    `hint` tells the operator what to look at (mount point, credentials, free space).
    """

    def __init__(self, site: str, message: str, hint: str = "") -> None:
        text = f"site {site!r}: {message}"
        if hint:
            text += f" (hint: {hint})"
        super().__init__(text)
        self.site = site
        self.hint = hint


class SiteUnavailable(StorageError):
    """The site cannot be used at all right now."""


class ObjectMissing(StorageError):
    """The site is healthy but does not hold the requested object."""


class ObjectCorrupt(StorageError):
    """The object's bytes do not match the SHA-256 recorded for it."""
