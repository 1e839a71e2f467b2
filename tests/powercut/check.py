"""One cut, checked: write its survivor state to a plain folder, start the archive on it
(recovery runs at start-up), and look at what it serves and what is on its disk.

- Lost: an instance acknowledged before the cut that C-FIND does not find or C-GET does not
  return byte for byte as sent (dataset bytes, same transfer syntax).
- Half-written: anything visible that is not complete: a file in the site's listing that does
  not parse or does not match the SHA-256 the index records for it, an index row without a
  readable object (C-GET failed it), a retrieved instance that differs from what was sent,
  a file in the listing that is not an object.
- Unindexed: a complete object in the listing that the index does not know (never
  acknowledged: its ingest journal line did not survive; `pacsgrid reindex --reconcile` adopts
  it). Reported, not a failure.

The archive is reached as a user would: `pacsgrid serve`, C-FIND and C-GET. Only the
half-written check reads the site folder and the SQLite file directly.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests.peers import Server, free_port
from tests.powercut.archive import ARCHIVE_ENV, DATA, Recording, Sent
from tests.powercut.history import History
from tests.powercut.model import Model

CHECKER = "POWERCUT"


@dataclass
class Verdict:
    index: int  # operations before the cut
    phase: str
    policy: str
    acknowledged: int = 0  # instances acknowledged before the cut (all checked)
    lost: list[str] = field(default_factory=list)
    half_written: list[str] = field(default_factory=list)
    unindexed: list[str] = field(default_factory=list)
    error: str = ""  # the archive did not start or answer

    @property
    def ok(self) -> bool:
        # Every complete object on a site was written after its log record was flushed, so
        # recovery must index it: one left unindexed is a recovery bug too.
        return not (self.lost or self.half_written or self.unindexed or self.error)


def check_cut(
    recording: Recording,
    history: History,
    model: Model,
    k: int,
    seed: int,
    work: Path,
    *,
    phase: str = "",
    env: dict[str, str] | None = None,
    keep: bool = False,
) -> Verdict:
    """Check the cut after the first `k` operations; its folder is removed unless it failed
    or `keep`. `env` goes to the archive (the same build as the recording)."""
    cut = model.cut(k, seed)
    verdict = Verdict(k, phase, str(cut.policy))
    folder = work / f"cut-{k}"
    if folder.exists():
        shutil.rmtree(folder)
    cut.materialize(folder)
    sent = {s.sop_uid: s for s in recording.sent}
    acked = [s for s in recording.sent if s.mark >= 0 and history.index_at(s.mark) <= k]
    verdict.acknowledged = len(acked)
    data = folder / DATA
    server = Server(
        data,
        workers=1,
        args=("--peer", f"{CHECKER}@127.0.0.1:{free_port()}"),
        env={
            k: v.replace("{site}", str(data / "objects"))
            for k, v in {**ARCHIVE_ENV, **(env or {})}.items()
        },
    )
    server.log = folder / "serve.log"
    try:
        server.start(timeout=120)
        found, retrieved, failed = _query_and_retrieve(server.port)
    except Exception as e:  # did not start, or stopped answering
        verdict.error = f"{type(e).__name__}: {str(e)[-1500:]}"
        return verdict
    finally:
        server.stop()
    for s in acked:
        if s.sop_uid not in found:
            verdict.lost.append(f"{s.sop_uid}: acknowledged, not found by C-FIND")
        elif s.sop_uid not in retrieved:
            verdict.lost.append(f"{s.sop_uid}: acknowledged, found, not retrieved by C-GET")
    for uid, (ts, data_bytes) in retrieved.items():
        origin = sent.get(uid)
        if origin is None or (ts, data_bytes) != (origin.transfer_syntax, origin.dataset()):
            what = "lost" if origin in acked else "half_written"
            getattr(verdict, what).append(f"{uid}: C-GET returned other bytes than were sent")
    acked_uids = {s.sop_uid for s in acked}
    verdict.half_written += [  # an acknowledged one C-GET failed is listed as lost above
        f"{uid}: indexed, C-GET failed it" for uid in failed if uid not in acked_uids
    ]
    _check_site(data, sent, verdict)
    if verdict.ok and not keep:
        shutil.rmtree(folder)
    return verdict


def _query_and_retrieve(
    port: int,
) -> tuple[dict[str, str], dict[str, tuple[str, bytes]], list[str]]:
    """Every instance the archive finds (sop -> study), every one C-GET returns
    (sop -> (transfer syntax, dataset bytes)), and those C-GET reported as failed."""
    retrieved: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        retrieved[event.request.AffectedSOPInstanceUID] = (
            str(event.context.transfer_syntax),
            bytes(event.encoded_dataset(include_meta=False)),
        )
        return 0

    ae = AE(ae_title=CHECKER)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="PACSGRID",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        raise RuntimeError("the archive refused the checker's association")
    found: dict[str, str] = {}
    failed: list[str] = []
    try:
        studies = [r.StudyInstanceUID for r in _find(assoc, "STUDY", StudyInstanceUID="")]
        for study in studies:
            for r in _find(assoc, "IMAGE", StudyInstanceUID=study, SOPInstanceUID=""):
                found[str(r.SOPInstanceUID)] = str(study)
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = study
            final = None
            for status, ident in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
                if status and status.Status not in (0xFF00, 0xFF01):
                    final = (status, ident)
            if final is None:
                raise RuntimeError(f"C-GET of {study} got no final response")
            status, ident = final
            if status.Status != 0 and ident is not None and "FailedSOPInstanceUIDList" in ident:
                uids = ident.FailedSOPInstanceUIDList
                failed += [uids] if isinstance(uids, str) else [str(u) for u in uids]
            elif status.Status != 0:
                failed.append(f"study {study} (C-GET status 0x{status.Status:04X})")
    finally:
        assoc.release()
    return found, retrieved, failed


def _find(assoc: object, level: str, **keys: str) -> list[Dataset]:
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    out = []
    for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):  # type: ignore[attr-defined]
        if not status:
            raise RuntimeError("C-FIND got no response")
        if status.Status in (0xFF00, 0xFF01) and ident is not None:
            out.append(ident)
        elif status.Status != 0:
            raise RuntimeError(f"C-FIND failed: 0x{status.Status:04X}")
    return out


def _check_site(data: Path, sent: dict[str, Sent], verdict: Verdict) -> None:
    """Every file in the site's listing is a complete object the index records with its
    SHA-256; every copy the index records is such a file."""
    site = data / "objects"
    recorded = _index_copies(data / "index.sqlite")
    seen = set()
    for path in sorted(site.rglob("*")) if site.exists() else ():
        rel = path.relative_to(site)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue  # the sentinel, .incoming (temp files), .quarantine: not in the listing
        key = str(rel)
        seen.add(key)
        body = path.read_bytes()
        digest = hashlib.sha256(body).hexdigest()
        if not key.endswith(".dcm"):
            verdict.half_written.append(f"{key}: a leftover in the listing")
        elif key in recorded:
            if recorded[key] != digest:
                verdict.half_written.append(f"{key}: does not match its SHA-256 in the index")
        elif _complete(body, sent):
            verdict.unindexed.append(key)
        else:
            verdict.half_written.append(f"{key}: incomplete, and not in the index")
    for key in recorded.keys() - seen:
        verdict.half_written.append(f"{key}: in the index, not on the site")


def _index_copies(db: Path) -> dict[str, str]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT key, sha256 FROM copy"))
    finally:
        conn.close()


def _complete(body: bytes, sent: dict[str, Sent]) -> bool:
    """A Part 10 file that parses to the end and holds a dataset exactly as it was sent."""
    from io import BytesIO

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(BytesIO(body))
            ds.PixelData  # noqa: B018 (reads to the end)
    except Exception:
        return False
    origin = sent.get(str(ds.get("SOPInstanceUID", "")))
    return origin is not None and body.endswith(origin.dataset())
