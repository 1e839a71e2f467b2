"""Sending files with DCMTK storescu, one association per call, and telling file by file what
the archive answered (a file counts as stored only when its response said Success)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import dcmtk
from tests.dcmtk_store import StoreRun, parse_output
from tests.waiting import wait_until

Sent = StoreRun


def storescu(port: int, paths: list[Path], aet: str = "MODALITY", timeout: float = 120) -> Sent:
    """One association (storescu run) sending `paths`, with bounded DCMTK timeouts."""
    run = StoreRun()
    proc = dcmtk(
        "storescu",
        "-v",
        "-nh",
        "-aet",
        aet,
        "-aec",
        "PACSGRID",
        "-to",
        "20",
        "-ta",
        "20",
        "-td",
        "20",
        "127.0.0.1",
        port,
        *paths,
        timeout=timeout,
    )
    run.output = proc.stdout
    parse_output(proc.stdout, paths, run)
    return run


def sop_uid(path: Path) -> str:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.SOPInstanceUID)


def send_while(
    send: Callable[[], Sent], started: Callable[[], bool], event: Callable[[], None]
) -> Sent:
    """Run `send` on a thread; once `started()` is true (the sending is under way, or it
    already ended), run `event` (a kill, say); then wait for `send` to end. The event always
    happens, and always before this returns, so what comes next finds it done."""
    result: list[Sent] = []
    sender = threading.Thread(target=lambda: result.append(send()))
    sender.start()
    try:
        wait_until(lambda: started() or not sender.is_alive(), 120, "the association under way")
    finally:
        event()
        sender.join(300)
    assert result, "the sender did not finish"
    return result[0]


def _study_query(study: str) -> Any:
    from pydicom.dataset import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    return query


def c_move(
    port: int, study: str, destination: str, aet: str = "MOVER", tls_args: Any = None
) -> list[tuple[Any, Any]]:
    """C-MOVE one study with pynetdicom (Study Root); every (status, identifier) response."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as Model

    ae = AE(ae_title=aet)
    ae.add_requested_context(Model)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSGRID", tls_args=tls_args)
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(_study_query(study), destination, Model))
    finally:
        assoc.release()


def c_get(
    port: int, study: str, storage: list[str], aet: str = "MOVER", tls_args: Any = None
) -> tuple[list[tuple[Any, Any]], dict[str, bytes]]:
    """C-GET one study with pynetdicom (Study Root), taking the `storage` SOP classes only:
    every (status, identifier) response, and what arrived (SOP UID -> Part 10 bytes)."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Model

    received: dict[str, bytes] = {}

    def store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(
            include_meta=True
        )
        return 0

    ae = AE(ae_title=aet)
    ae.add_requested_context(Model)
    for sop_class in storage:
        ae.add_requested_context(sop_class)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="PACSGRID",
        ext_neg=[build_role(c, scp_role=True) for c in storage],
        evt_handlers=[(evt.EVT_C_STORE, store)],
        tls_args=tls_args,
    )
    assert assoc.is_established
    try:
        return list(assoc.send_c_get(_study_query(study), Model)), received
    finally:
        assoc.release()
