"""Which presentation contexts the archive accepts (SCP side of association negotiation).

- Verification: C-ECHO.
- Query/Retrieve (Patient Root, Study Root, and the retired Patient/Study Only): C-FIND,
  C-MOVE, C-GET.
- Storage Commitment Push Model: N-ACTION (pacsgrid.dicom.commitment), for the peers that may
  ask for it (operation "commit", see `Archive.may`).
- Every other abstract syntax that is not a known non-storage service (worklist, MPPS, ...) is
  treated as a storage SOP class, including private and unknown UIDs: an archive that refuses
  an unfamiliar image has lost it.

Storage accepts any transfer syntax the DICOM standard defines, taking the requestor's first
choice, so the bytes are stored as they were encoded. Contexts for an operation the caller may
not perform are rejected ("user rejection"); the log says who and what.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.sop_class import uid_to_service_class

from pacsgrid.dicom import pdu
from pacsgrid.dicom.association import AcceptedContext
from pacsgrid.dicomfile.header import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from pacsgrid.dicomfile.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from pacsgrid.model import Level

log = logging.getLogger("pacsgrid.dicom")

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Push Model SOP Class

PATIENT_ROOT, STUDY_ROOT, PATIENT_STUDY_ONLY = "patient", "study", "patient-study"
QR_MODELS: dict[str, tuple[str, str]] = {
    "1.2.840.10008.5.1.4.1.2.1.1": ("find", PATIENT_ROOT),
    "1.2.840.10008.5.1.4.1.2.1.2": ("move", PATIENT_ROOT),
    "1.2.840.10008.5.1.4.1.2.1.3": ("get", PATIENT_ROOT),
    "1.2.840.10008.5.1.4.1.2.2.1": ("find", STUDY_ROOT),
    "1.2.840.10008.5.1.4.1.2.2.2": ("move", STUDY_ROOT),
    "1.2.840.10008.5.1.4.1.2.2.3": ("get", STUDY_ROOT),
    "1.2.840.10008.5.1.4.1.2.3.1": ("find", PATIENT_STUDY_ONLY),
    "1.2.840.10008.5.1.4.1.2.3.2": ("move", PATIENT_STUDY_ONLY),
    "1.2.840.10008.5.1.4.1.2.3.3": ("get", PATIENT_STUDY_ONLY),
}
MODEL_LEVELS = {
    PATIENT_ROOT: (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
    STUDY_ROOT: (Level.STUDY, Level.SERIES, Level.IMAGE),
    PATIENT_STUDY_ONLY: (Level.PATIENT, Level.STUDY),
}
QR_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)


def service_of(abstract_syntax: str) -> str:
    """echo, find, move, get, store, commit, or unsupported."""
    if abstract_syntax == VERIFICATION:
        return "echo"
    if abstract_syntax == STORAGE_COMMITMENT:
        return "commit"
    if abstract_syntax in QR_MODELS:
        return QR_MODELS[abstract_syntax][0]
    cls = uid_to_service_class(abstract_syntax).__name__
    if cls in ("StorageServiceClass", "ServiceClass"):  # ServiceClass: unknown/private UID
        return "store"
    return "unsupported"


def _known_syntax(uid: str) -> bool:
    return bool(UID(uid).is_transfer_syntax) or uid == DEFLATED_LE


@dataclass
class Negotiated:
    ac: pdu.AssociateAC
    contexts: dict[int, AcceptedContext]
    refused: list[str] = field(default_factory=list)  # human-readable, for the log


def negotiate(
    rq: pdu.AssociateRQ, may: Callable[[str], bool], *, our_ae: str, max_pdu: int
) -> Negotiated:
    results: list[pdu.PresentationContext] = []
    accepted: dict[int, AcceptedContext] = {}
    roles: list[pdu.RoleSelection] = []
    refused: list[str] = []
    role_replied: set[str] = set()
    for pc in rq.contexts:
        service = service_of(pc.abstract_syntax)
        role = rq.roles.get(pc.abstract_syntax)
        requestor_scu = role.scu_role if role else True
        requestor_scp = role.scp_role if role else False
        if service == "unsupported":
            results.append(pdu.PresentationContext(pc.id, result=pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED))
            continue
        needed = service
        if service == "store" and requestor_scp and not requestor_scu:
            needed = "get"  # a storage context only for receiving our C-GET sub-operations
        if not may(needed):
            results.append(pdu.PresentationContext(pc.id, result=pdu.USER_REJECTION))
            refused.append(f"{needed} ({pc.abstract_syntax})")
            continue
        if service == "store":
            choice = next((ts for ts in pc.transfer_syntaxes if _known_syntax(ts)), None)
        else:
            choice = next((ts for ts in QR_SYNTAXES if ts in pc.transfer_syntaxes), None)
        if choice is None:
            results.append(
                pdu.PresentationContext(pc.id, result=pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED)
            )
            continue
        results.append(pdu.PresentationContext(pc.id, pc.abstract_syntax, [choice]))
        accepted[pc.id] = AcceptedContext(
            pc.id, pc.abstract_syntax, choice, scu=requestor_scu, scp=requestor_scp
        )
        if role is not None and pc.abstract_syntax not in role_replied:
            roles.append(pdu.RoleSelection(pc.abstract_syntax, role.scu_role, role.scp_role))
            role_replied.add(pc.abstract_syntax)
    ac = pdu.AssociateAC(
        rq.called_ae or our_ae,
        rq.calling_ae,
        results,
        max_pdu,
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION,
        roles,
    )
    return Negotiated(ac, accepted, refused)
