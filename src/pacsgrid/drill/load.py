"""The drill's DICOM clients (pynetdicom, through HAProxy, as modalities and viewers would):
store clients sending new instances, retrieve clients fetching acknowledged ones by C-GET and
comparing them byte for byte. Every operation's start, end and outcome is recorded; an
instance counts as acknowledged only when its C-STORE response said Success.

Each client is bounded: it stops at the drill's deadline, after `max_instances` stores, or when
told to; every association has ACSE, DIMSE and network timeouts, so a hung node costs a client
seconds, never the drill.
"""

from __future__ import annotations

import random
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pacsgrid.dicomfile.part10 import split_part10

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
TIMEOUT = 15.0  # seconds for any one network step


@dataclass(frozen=True)
class Sent:
    """An acknowledged instance: where it is, and the file it was sent from."""

    study: str
    series: str
    sop: str
    path: Path


@dataclass(frozen=True)
class Outcome:
    kind: str  # "store" or "retrieve"
    started: float
    ended: float
    ok: bool
    detail: str = ""


class Ledger:
    """What the clients did, shared between their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.acked: dict[str, Sent] = {}

    def record(self, outcome: Outcome, sent: Sent | None = None) -> None:
        with self.lock:
            self.outcomes.append(outcome)
            if sent is not None:
                self.acked[sent.sop] = sent

    def pick(self, rng: random.Random) -> Sent | None:
        with self.lock:
            if not self.acked:
                return None
            return rng.choice(list(self.acked.values()))

    def counts(self) -> tuple[int, int, int, int]:
        """Stores ok/failed, retrieves ok/failed so far."""
        with self.lock:
            out = [0, 0, 0, 0]
            for o in self.outcomes:
                out[(0 if o.kind == "store" else 2) + (0 if o.ok else 1)] += 1
            return out[0], out[1], out[2], out[3]


def dataset_bytes(part10: bytes) -> bytes:
    """The dataset of a Part 10 file (without the file meta header)."""
    return part10[split_part10(part10).dataset_offset :]


def make_instances(folder: Path, client: int, seed: int) -> Iterator[Sent]:
    """New CT instances as Part 10 files, 20 a series, 2 series a study, forever."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = 0
    while True:
        study = generate_uid()
        for s in range(2):
            series = generate_uid()
            for i in range(20):
                n += 1
                sop = generate_uid()
                ds = Dataset()
                ds.SOPClassUID = UID(CT_IMAGE)
                ds.SOPInstanceUID = sop
                ds.StudyInstanceUID = study
                ds.SeriesInstanceUID = series
                ds.PatientID = f"DRILL{client:02d}"
                ds.PatientName = f"Drill^Client{client:02d}"
                ds.StudyDate = time.strftime("%Y%m%d")
                ds.Modality = "CT"
                ds.SeriesNumber = s + 1
                ds.InstanceNumber = i + 1
                ds.Rows = ds.Columns = 64
                ds.BitsAllocated = ds.BitsStored = 16
                ds.HighBit = 15
                ds.PixelRepresentation = 0
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.PixelData = rng.integers(0, 4096, (64, 64), dtype=np.uint16).tobytes()
                ds.file_meta = FileMetaDataset()
                ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
                ds.file_meta.MediaStorageSOPInstanceUID = sop
                ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
                path = folder / f"{n:06d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                yield Sent(study, series, sop, path)


def _ae(title: str) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.connection_timeout = 5
    return ae


class Client(threading.Thread):
    def __init__(self, name: str, port: int, ledger: Ledger, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.port = port
        self.ledger = ledger
        self.stop_event = stop
        self.assoc: Any = None

    def close(self) -> None:
        if self.assoc is not None:
            try:
                if self.assoc.is_established:
                    self.assoc.release()
            except Exception:  # the node is gone: nothing to release
                pass
        self.assoc = None

    def pause(self, seconds: float) -> None:
        self.stop_event.wait(seconds)


class StoreClient(Client):
    """C-STOREs one after another, `per_association` on one association (a modality sends a
    study on one), a new one after a failure; an instance that was not acknowledged is sent
    again, as a modality does."""

    per_association = 20

    def __init__(
        self,
        n: int,
        port: int,
        ledger: Ledger,
        stop: threading.Event,
        folder: Path,
        *,
        rate: float,
        max_instances: int,
    ) -> None:
        super().__init__(f"store-{n}", port, ledger, stop)
        self.instances = make_instances(folder / f"client{n}", n, seed=n)
        self.every = 1.0 / rate
        self.max_instances = max_instances

    def run(self) -> None:
        pending: Sent | None = None
        stored = 0
        try:
            while not self.stop_event.is_set() and stored < self.max_instances:
                pending = pending or next(self.instances)
                t0 = time.monotonic()
                ok, detail = self._store(pending)
                self.ledger.record(
                    Outcome("store", t0, time.monotonic(), ok, detail), pending if ok else None
                )
                if ok:
                    stored += 1
                    pending = None
                if not ok or stored % self.per_association == 0:
                    self.close()
                self.pause(max(0.0, self.every - (time.monotonic() - t0)))
        finally:
            self.close()

    def _store(self, sent: Sent) -> tuple[bool, str]:
        try:
            if self.assoc is None or not self.assoc.is_established:
                ae = _ae("DRILLSTORE")
                ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
                self.assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSGRID")
                if not self.assoc.is_established:
                    return False, "association refused or aborted"
            status = self.assoc.send_c_store(sent.path)
        except Exception as e:  # a broken association is an outcome, not a crash
            return False, f"{type(e).__name__}: {e}"
        if not status or "Status" not in status:
            return False, "no response (association broken or timed out)"
        if status.Status != 0:
            return False, f"status 0x{status.Status:04X} {status.get('ErrorComment', '')}"
        return True, ""


class RetrieveClient(Client):
    """C-GETs of acknowledged instances (IMAGE level), each compared byte for byte with the
    file it was sent from."""

    def __init__(
        self, n: int, port: int, ledger: Ledger, stop: threading.Event, *, rate: float
    ) -> None:
        super().__init__(f"retrieve-{n}", port, ledger, stop)
        self.rng = random.Random(1000 + n)
        self.every = 1.0 / rate

    def run(self) -> None:
        while not self.stop_event.is_set():
            sent = self.ledger.pick(self.rng)
            t0 = time.monotonic()
            if sent is not None:
                ok, detail = get_instances(self.port, sent.study, [sent])
                self.ledger.record(Outcome("retrieve", t0, time.monotonic(), ok, detail))
            self.pause(max(0.0, self.every - (time.monotonic() - t0)))


def get_instances(port: int, study: str, instances: list[Sent]) -> tuple[bool, str]:
    """C-GET `instances` (one series, or one instance) and compare each with its file."""
    from pydicom.dataset import Dataset
    from pynetdicom import build_role, evt

    received: dict[str, bytes] = {}

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(
            include_meta=False
        )
        return 0

    query = Dataset()
    query.StudyInstanceUID = study
    if len(instances) == 1:
        query.QueryRetrieveLevel = "IMAGE"
        query.SeriesInstanceUID = instances[0].series
        query.SOPInstanceUID = instances[0].sop
    else:
        query.QueryRetrieveLevel = "SERIES"
        query.SeriesInstanceUID = instances[0].series
    ae = _ae("DRILLGET")
    ae.add_requested_context(STUDY_GET)
    ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
    try:
        assoc = ae.associate(
            "127.0.0.1",
            port,
            ae_title="PACSGRID",
            ext_neg=[build_role(CT_IMAGE, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    if not assoc.is_established:
        return False, "association refused or aborted"
    final = None
    try:
        for status, _ in assoc.send_c_get(query, STUDY_GET):
            if status and "Status" in status:
                final = int(status.Status)
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    finally:
        if assoc.is_established:
            assoc.release()
    if final != 0:
        return False, f"C-GET final status {final if final is None else hex(final)}"
    for sent in instances:
        got = received.get(sent.sop)
        if got is None:
            return False, f"{sent.sop} not retrieved"
        if got != dataset_bytes(sent.path.read_bytes()):
            return False, f"{sent.sop} retrieved with different bytes"
    return True, ""


def find_sops(port: int, study: str, series: str) -> set[str] | None:
    """SOP Instance UIDs a C-FIND (IMAGE level) finds in one series; None if it failed."""
    from pydicom.dataset import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = series
    query.SOPInstanceUID = ""
    ae = _ae("DRILLFIND")
    ae.add_requested_context(STUDY_FIND)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSGRID")
    except Exception:
        return None
    if not assoc.is_established:
        return None
    found: set[str] = set()
    final = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for status, identifier in assoc.send_c_find(query, STUDY_FIND):
                if not status or "Status" not in status:
                    return None
                final = int(status.Status)
                if final in (0xFF00, 0xFF01) and identifier is not None:
                    found.add(str(identifier.SOPInstanceUID))
    except Exception:
        return None
    finally:
        if assoc.is_established:
            assoc.release()
    return found if final == 0 else None
