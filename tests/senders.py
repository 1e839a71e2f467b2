"""Sending files with DCMTK storescu and telling, file by file, what the archive answered."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import dcmtk

SENDING = re.compile(r"^I: Sending file: (.+)$")


@dataclass
class Sent:
    acked: list[Path] = field(default_factory=list)  # success status received
    failed: dict[Path, str] = field(default_factory=dict)  # failure status, or never sent
    output: str = ""


def storescu(port: int, paths: list[Path], aet: str = "MODALITY", timeout: float = 120) -> Sent:
    """One association (storescu run) sending `paths`; a file counts as stored only when
    its C-STORE response said Success."""
    out = Sent()
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
    out.output = proc.stdout
    current: Path | None = None
    for line in proc.stdout.splitlines():
        m = SENDING.match(line)
        if m:
            current = Path(m.group(1))
            continue
        if current is not None and line.startswith("I: Received Store Response"):
            if "(Success)" in line:
                out.acked.append(current)
            else:
                out.failed[current] = line
            current = None
        elif current is not None and line.startswith("E: Store Failed"):
            out.failed[current] = line
            current = None
    done = set(out.acked) | set(out.failed)
    for p in paths:
        if p not in done:
            out.failed[p] = "not sent (association failed)"
    return out


def sop_uid(path: Path) -> str:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.SOPInstanceUID)
