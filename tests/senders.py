"""Sending files with DCMTK storescu, one association per call, and telling file by file what
the archive answered (a file counts as stored only when its response said Success)."""

from __future__ import annotations

import warnings
from pathlib import Path

from tests.conftest import dcmtk
from tests.dcmtk_store import StoreRun, parse_output

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
