"""Storage Commitment against the real `pacsgrid serve`: DCMTK's storescu stores as the modality,
pynetdicom asks for commitment (DCMTK has no storage commitment tool) and receives the report,
on the association it asked on or on its own port.

Cases: stored, unknown and mistyped instances get the right committed and failed lists in both
association modes; an instance with a corrupt copy under write_quorum 2 is not committed; a
request survives a crash of the archive between its N-ACTION and its report; a report that
cannot be delivered is retried, given up and listed, and queued again; a malformed request
gets a failure status and a log line, and the server keeps serving.
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel

from tests.commitment_peer import Modality, request_dataset
from tests.conftest import Server, dcmtk, pacsgrid_cli
from tests.corpus import UNCOMPRESSED, CorpusFile, accepted
from tests.waiting import wait_until

pytestmark = pytest.mark.dcmtk

MR = "1.2.840.10008.5.1.4.1.1.4"


def files(n: int) -> list[CorpusFile]:
    """`n` uncompressed instances with distinct UIDs (storescu sends them as they are)."""
    out: dict[str, CorpusFile] = {}
    for f in accepted():
        if f.transfer_syntax in UNCOMPRESSED and f.sop_uid not in out and f.sop_class_uid != MR:
            out[f.sop_uid] = f
    assert len(out) >= n, "the corpus should have enough plain instances"
    return list(out.values())[:n]


def store(port: int, chosen: list[CorpusFile]) -> None:
    """The modality (AE MODALITY) stores with DCMTK's storescu; `-R` proposes exactly the files'
    SOP classes (storescu's default list lacks some, e.g. Segmentation Storage)."""
    proc = dcmtk("storescu", "-R", "-aet", "MODALITY", "-aec", "PACSGRID", "127.0.0.1", port,
                 *[f.path for f in chosen])  # fmt: skip
    assert proc.returncode == 0, proc.stdout


def config(tmp_path: Path, modality: Modality, extra: str = "", allow: str = "") -> Path:
    cfg = tmp_path / "commitment.toml"
    peer = (
        f"[[peers]]\nae_title = '{modality.ae_title}'\nhost = '127.0.0.1'\nport = {modality.port}\n"
    )
    if allow:
        peer += f"allow = {allow}\n"
    cfg.write_text(f"{extra}\n{peer}")
    return cfg


@pytest.fixture
def modality() -> Iterator[Modality]:
    m = Modality()
    yield m
    m.stop()


def refs_of(chosen: list[CorpusFile]) -> list[tuple[str, str]]:
    return [(f.sop_class_uid, f.sop_uid) for f in chosen]


@pytest.mark.slow
@pytest.mark.parametrize("keep_open", [True, False], ids=["same-association", "new-association"])
def test_stored_and_unknown_instances(tmp_path: Path, modality: Modality, keep_open: bool) -> None:
    modality.listen()
    server = Server(tmp_path / "a", config=config(tmp_path, modality), workers=2).start()
    try:
        chosen = files(3)
        store(server.port, chosen)
        stored = refs_of(chosen)
        unknown = (chosen[0].sop_class_uid, "1.2.826.0.1.3680043.8.498.999999")
        mistyped = (MR, chosen[1].sop_uid)  # stored as another SOP class
        result = modality.request(
            server.port, "1.2.826.0.1.3680043.8.498.1", [*stored, unknown, mistyped],
            keep_open=keep_open,
        )  # fmt: skip
        assert result.status == 0x0000
        if keep_open:
            report = result.report
            assert report is not None, "the report should come on the association kept open"
            assert report.calling_ae == "MODALITY"  # the modality's own association
        else:
            assert result.report is None
            report = modality.next_report()
            assert report.calling_ae == "PACSGRID"  # the archive opened it
        assert modality.reports.empty()  # exactly one report
        assert report.transaction_uid == "1.2.826.0.1.3680043.8.498.1"
        assert report.event_type == 2
        assert sorted(report.committed) == sorted(stored)
        assert sorted(report.failed) == sorted([(*unknown, 0x0112), (*mistyped, 0x0119)])
        assert report.retrieve_ae == "PACSGRID"
        # all committed: event type 1
        again = modality.request(server.port, "1.2.826.0.1.3680043.8.498.2", stored,
                                 keep_open=keep_open)  # fmt: skip
        report = again.report if keep_open else modality.next_report()
        assert report is not None and report.event_type == 1 and not report.failed
        # the archive records and audits a report once the modality's N-EVENT-REPORT-RSP is in
        audit = server.data_dir / "audit.jsonl"
        wait_until(
            lambda: audit.read_text().count('"operation":"N-EVENT-REPORT"') == 2,
            60,
            "both reports audited",
            seen=audit.read_text,
        )
        assert audit.read_text().count('"operation":"N-ACTION"') == 2
        status = status_of(server)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "pending 0, sent 2, given up 0" in status.stdout
    finally:
        server.stop()


def status_of(server: Server) -> subprocess.CompletedProcess[str]:
    return pacsgrid_cli("commitment", "status", "--data-dir", server.data_dir)


def flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_a_corrupt_copy_is_not_committed(tmp_path: Path, modality: Modality) -> None:
    extra = (
        "[replication]\ncopies = 2\nwrite_quorum = 2\n"
        f"[[sites]]\nname = 'a'\nurl = '{tmp_path / 'site-a'}'\n"
        f"[[sites]]\nname = 'b'\nurl = '{tmp_path / 'site-b'}'\n"
    )
    server = Server(tmp_path / "a", config=config(tmp_path, modality, extra)).start()
    try:
        chosen = files(2)
        store(server.port, chosen)
        [damaged] = [
            p for p in (tmp_path / "site-b").rglob(f"{chosen[0].sop_uid}.dcm")
            if ".quarantine" not in p.parts
        ]  # fmt: skip
        flip_last_byte(damaged)
        result = modality.request(
            server.port, "1.2.826.0.1.3680043.8.498.3", refs_of(chosen), keep_open=True
        )
        report = result.report
        assert report is not None and report.event_type == 2
        assert report.committed == refs_of(chosen[1:])
        assert report.failed == [(chosen[0].sop_class_uid, chosen[0].sop_uid, 0x0110)]
        # logged once the modality's N-EVENT-REPORT-RSP is in
        why = "1 verified archive copies of the 2 required"
        wait_until(lambda: why in server.text(), 60, "the failure logged", seen=server.text)
        log = server.text()
        assert "does not match its SHA-256" in log and "run 'pacsgrid audit'" in log
    finally:
        server.stop()


@pytest.mark.slow
def test_the_request_survives_a_crash_before_its_report(tmp_path: Path, modality: Modality) -> None:
    """The modality asks and releases while its own port is not listening: the archive cannot
    report and waits to try again. It is killed (SIGKILL) and started again, the modality
    listens now, and the report comes."""
    cfg = config(tmp_path, modality, "[commitment]\nretry_initial = 300\n")
    server = Server(tmp_path / "a", config=cfg, workers=2).start()
    chosen = files(2)
    store(server.port, chosen)
    result = modality.request(server.port, "1.2.826.0.1.3680043.8.498.4", refs_of(chosen),
                              keep_open=False)  # fmt: skip
    assert result.status == 0x0000

    def waiting() -> str:
        out = pacsgrid_cli("commitment", "status", "--data-dir", server.data_dir).stdout
        return out if re.search(r"next attempt in \d+s; last error: cannot open", out) else ""

    seen = wait_until(waiting, 120, "a failed first delivery, waiting for its retry")
    assert "pending: MODALITY transaction 1.2.826.0.1.3680043.8.498.4" in seen
    server.kill()
    modality.listen()
    server.start()
    try:
        report = modality.next_report(timeout=120)
        assert report.transaction_uid == "1.2.826.0.1.3680043.8.498.4"
        assert report.event_type == 1 and sorted(report.committed) == sorted(refs_of(chosen))
        assert modality.reports.empty()
    finally:
        server.stop()


@pytest.mark.slow
def test_a_report_that_cannot_be_delivered_is_given_up_listed_and_retried(
    tmp_path: Path, modality: Modality
) -> None:
    extra = "[commitment]\nmax_attempts = 3\nretry_initial = 0.2\nretry_max = 0.5\n"
    server = Server(tmp_path / "a", config=config(tmp_path, modality, extra)).start()
    try:
        chosen = files(1)
        store(server.port, chosen)
        modality.request(server.port, "1.2.826.0.1.3680043.8.498.5", refs_of(chosen),
                         keep_open=False)  # fmt: skip

        def given_up() -> str:
            out = pacsgrid_cli("commitment", "status", "--data-dir", server.data_dir)
            return out.stdout if out.returncode == 1 else ""

        out = wait_until(given_up, 120, "the report given up after 3 attempts")
        assert "given up 1" in out
        assert "given up after 3 attempts: MODALITY transaction 1.2.826.0.1.3680043.8.498.5" in out
        assert "'pacsgrid commitment retry' queues them again" in out
        wait_until(lambda: "given up after 3 attempt(s)" in server.text(), 60, "the log line")
        modality.listen()
        retry = pacsgrid_cli("commitment", "retry", "--data-dir", server.data_dir)
        assert "queued 1 given-up report(s) again" in retry.stdout
        report = modality.next_report()
        assert report.transaction_uid == "1.2.826.0.1.3680043.8.498.5" and report.event_type == 1
    finally:
        server.stop()


@pytest.mark.slow
def test_a_refused_report_is_retried(tmp_path: Path, modality: Modality) -> None:
    """The modality answers the report with a failure status: not delivered, tried again."""
    extra = "[commitment]\nretry_initial = 0.2\nretry_max = 0.5\n"
    modality.refusals = [0x0110]
    modality.listen()
    server = Server(tmp_path / "a", config=config(tmp_path, modality, extra)).start()
    try:
        chosen = files(1)
        store(server.port, chosen)
        modality.request(server.port, "1.2.826.0.1.3680043.8.498.6", refs_of(chosen),
                         keep_open=False)  # fmt: skip
        first = modality.next_report()  # refused
        report = modality.next_report()  # sent again
        assert first.transaction_uid == report.transaction_uid
        assert report.transaction_uid == "1.2.826.0.1.3680043.8.498.6"
        wait_until(
            lambda: "pending 0, sent 1, given up 0" in status_of(server).stdout,
            60,
            "the report recorded as sent",
        )
    finally:
        server.stop()


@pytest.mark.slow
def test_malformed_requests_get_a_failure_status(tmp_path: Path, modality: Modality) -> None:
    server = Server(tmp_path / "a", config=config(tmp_path, modality)).start()
    try:
        chosen = files(1)
        store(server.port, chosen)
        refs = refs_of(chosen)
        no_transaction = request_dataset("", refs)
        del no_transaction.TransactionUID
        cases = {
            "no Transaction UID": dict(dataset=no_transaction),
            "no references": dict(dataset=request_dataset("1.2.3", [])),
            "an item without its SOP Instance UID": dict(
                dataset=_without_instance(request_dataset("1.2.3", refs))
            ),
            "not a UID": dict(dataset=_with_transaction(request_dataset("1", refs), "1.2.x3")),
        }
        for why, kw in cases.items():
            with warnings.catch_warnings():  # pydicom warns of the UID it is made to send
                warnings.simplefilter("ignore")
                result = modality.request(server.port, "", [], keep_open=False, **kw)  # type: ignore[arg-type]
            assert result.status == 0x0115, why
        assert modality.request(server.port, "1.2.3", refs, keep_open=False,
                                action_type=2).status == 0x0123  # fmt: skip
        assert modality.request(server.port, "1.2.3", refs, keep_open=False,
                                instance_uid="1.2.3.4").status == 0x0112  # fmt: skip
        log = server.text()
        assert "N-ACTION from MODALITY" in log and "refused" in log
        assert pacsgrid_cli(
            "commitment", "status", "--data-dir", server.data_dir
        ).stdout.startswith("storage commitment reports: pending 0, sent 0, given up 0")
        assert dcmtk("echoscu", "-aec", "PACSGRID", "127.0.0.1", server.port).returncode == 0
    finally:
        server.stop()


def _with_transaction(ds: Dataset, value: str) -> Dataset:
    ds["TransactionUID"] = DataElement(
        0x00081195, "UI", value, validation_mode=pydicom_config.IGNORE
    )
    return ds


def _without_instance(ds: Dataset) -> Dataset:
    del ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return ds


def test_only_peers_that_may_store_ask(tmp_path: Path, modality: Modality) -> None:
    server = Server(
        tmp_path / "a", config=config(tmp_path, modality, allow="['echo', 'find']")
    ).start()
    try:
        for ae_title in ("MODALITY", "STRANGER"):  # may not store; not a peer at all
            ae = AE(ae_title=ae_title)
            ae.add_requested_context(StorageCommitmentPushModel)
            assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSGRID")
            try:
                assert not assoc.is_established or not assoc.accepted_contexts
            finally:
                if assoc.is_established:
                    assoc.release()
        log = server.text()
        assert "MODALITY@127.0.0.1 may not commit" in log
        assert "STRANGER@127.0.0.1 may not commit" in log
    finally:
        server.stop()
