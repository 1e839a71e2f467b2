"""A modality's storage commitment side, on pynetdicom (DCMTK has no storage commitment tool):
it asks with N-ACTION and receives the N-EVENT-REPORT either on the association it asked on
or on its own listening port, where the archive opens a new association (in the SCP role)."""

from __future__ import annotations

import queue
import ssl
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from tests.conftest import free_port

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"


@dataclass
class Report:
    """One N-EVENT-REPORT-RQ as the modality received it."""

    event_type: int
    transaction_uid: str
    committed: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int]]  # ... and Failure Reason
    calling_ae: str  # who opened the association it came on
    retrieve_ae: str = ""
    how: str = ""  # 'same association' or 'new association'


@dataclass
class ActionResult:
    status: int  # of the N-ACTION-RSP (-1: no response)
    report: Report | None = None  # when it came on the same association
    error_comment: str = ""


def _report(event: Any, how: str) -> Report:
    ds = event.event_information
    committed = [
        (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
        for i in getattr(ds, "ReferencedSOPSequence", [])
    ]
    failed = [
        (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID), int(i.FailureReason))
        for i in getattr(ds, "FailedSOPSequence", [])
    ]
    return Report(
        int(event.event_type),
        str(ds.TransactionUID),
        committed,
        failed,
        str(event.assoc.requestor.ae_title).strip(),
        str(getattr(ds, "RetrieveAETitle", "")),
        how,
    )


def request_dataset(transaction_uid: str, refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


@dataclass
class Modality:
    """`ae_title` listening on `port` (127.0.0.1) for reports on new associations, over TLS
    when `server_tls` is given; `client_tls` for its own associations to the archive."""

    ae_title: str = "MODALITY"
    port: int = field(default_factory=free_port)
    server_tls: ssl.SSLContext | None = None
    client_tls: tuple[ssl.SSLContext, str] | None = None  # context, server hostname
    reports: queue.Queue[Report] = field(default_factory=queue.Queue)
    refusals: list[int] = field(default_factory=list)  # statuses for the first reports
    _server: Any = None

    def listen(self) -> Modality:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        # a new association from the archive proposes the SCP role for itself
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        handlers = [(evt.EVT_N_EVENT_REPORT, self._on_report)]
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self.server_tls,
        )
        return self

    def _on_report(self, event: Any) -> tuple[int, None]:
        """Answer `refusals` in turn (failures: the report is not taken), then success."""
        self.reports.put(_report(event, "new association"))
        return (self.refusals.pop(0) if self.refusals else 0x0000), None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def request(
        self,
        archive_port: int,
        transaction_uid: str,
        refs: list[tuple[str, str]],
        *,
        keep_open: bool,
        timeout: float = 120.0,
        action_type: int = 1,
        dataset: Dataset | None = None,
        instance_uid: str = WELL_KNOWN_INSTANCE,
    ) -> ActionResult:
        """N-ACTION on a new association. `keep_open`: offer to take the report on it (role
        selection: this requestor is SCU and SCP of the commitment class) and wait up to
        `timeout` seconds for it before releasing; otherwise release once answered."""
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.add_requested_context(StorageCommitmentPushModel)
        roles = [build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)]
        same: queue.Queue[Report] = queue.Queue()
        answering: list[Report] = []

        def on_report(event: Any) -> tuple[int, None]:
            answering.append(_report(event, "same association"))
            return 0x0000, None

        def on_pdu_sent(event: Any) -> None:
            """The report counts as received once its N-EVENT-REPORT-RSP is on the wire:
            pynetdicom sends it after `on_report` returns, and releasing before that would
            leave the archive without the answer it waits for."""
            if answering and isinstance(event.pdu, P_DATA_TF):
                same.put(answering.pop())

        tls = None
        if self.client_tls is not None:
            tls = (self.client_tls[0], self.client_tls[1])
        assoc = ae.associate(
            "127.0.0.1",
            archive_port,
            ae_title="PACSGRID",
            ext_neg=roles if keep_open else None,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report), (evt.EVT_PDU_SENT, on_pdu_sent)],
            tls_args=tls,
        )
        if not assoc.is_established:
            raise AssertionError("the archive did not accept the association")
        try:
            status, _ = assoc.send_n_action(
                dataset if dataset is not None else request_dataset(transaction_uid, refs),
                action_type,
                StorageCommitmentPushModel,
                instance_uid,
            )
            result = ActionResult(
                int(status.Status) if "Status" in status else -1,
                error_comment=str(getattr(status, "ErrorComment", "")),
            )
            if keep_open and result.status == 0:
                try:
                    result.report = same.get(timeout=timeout)
                except queue.Empty:
                    result.report = None
            return result
        finally:
            if assoc.is_established:
                assoc.release()

    def next_report(self, timeout: float = 120.0) -> Report:
        """The next report received on a new association (fails after `timeout` s)."""
        try:
            return self.reports.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no report on a new association within {timeout}s") from None
