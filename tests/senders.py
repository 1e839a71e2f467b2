"""Sending files with DCMTK storescu, one association per call, and telling file by file what
the archive answered (a file counts as stored only when its response said Success)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from pathlib import Path

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
