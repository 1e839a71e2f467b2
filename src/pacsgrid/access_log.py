"""The audit log: who did what to which study, one JSON line per event.

Written by `Archive` (never by a front end), so a C-STORE and a STOW-RS, a C-FIND and a QIDO-RS
leave the same kind of record. Records go to a file (appended with one `write` per record on an
`O_APPEND` descriptor, so several worker processes can share it without interleaving lines) or
to syslog (facility AUTHPRIV, as the audit trail of a system service). Refused actions are
recorded as well as allowed ones.

A record: {"time": ISO-8601 UTC, "user": web user or "", "ae": calling AE or "", "address":
source address, "via": dimse|web|import|cli, "operation": C-STORE|C-FIND|C-MOVE|C-GET|STOW|
QIDO|WADO|N-ACTION|N-EVENT-REPORT (storage commitment)|admin|login, "outcome":
success|denied|failed, "study": StudyInstanceUID or "", "detail": short text}. Patient
identifiers are never written here, nor to the ordinary log.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("pacsgrid.audit")

OPERATIONS = {
    # (archive operation, front end) -> audit operation name
    ("store", "dimse"): "C-STORE",
    ("store", "web"): "STOW",
    ("find", "dimse"): "C-FIND",
    ("find", "web"): "QIDO",
    ("move", "dimse"): "C-MOVE",
    ("get", "dimse"): "C-GET",
    ("get", "web"): "WADO",
    ("retrieve", "web"): "WADO",
    ("commit", "dimse"): "N-ACTION",  # storage commitment request
    ("report", "dimse"): "N-EVENT-REPORT",  # its report
}


def operation_name(operation: str, via: str) -> str:
    return OPERATIONS.get((operation, via), operation)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    time: str
    user: str
    ae: str
    address: str
    via: str
    operation: str
    outcome: str
    study: str = ""
    detail: str = ""


class AuditLog:
    """Append-only audit trail. `write` never raises: an audit failure is logged loudly, but it
    must not turn an acknowledged store into a failure after the fact."""

    def __init__(self, target: str, path: Path) -> None:
        self.target = target
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._syslog: logging.Logger | None = None
        if target == "file":
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        elif target == "syslog":
            from logging.handlers import SysLogHandler

            handler = SysLogHandler(
                address="/dev/log" if os.path.exists("/dev/log") else ("localhost", 514),
                facility=SysLogHandler.LOG_AUTHPRIV,
            )
            handler.setFormatter(logging.Formatter("pacsgrid-audit: %(message)s"))
            self._syslog = logging.getLogger("pacsgrid.audit.syslog")
            self._syslog.propagate = False
            self._syslog.handlers[:] = [handler]
            self._syslog.setLevel(logging.INFO)

    def write(self, record: AuditRecord) -> None:
        if self.target == "off":
            return
        line = json.dumps(asdict(record), ensure_ascii=False, separators=(",", ":"))
        try:
            if self._fd is not None:
                with self._lock:
                    os.write(self._fd, (line + "\n").encode("utf-8"))
            elif self._syslog is not None:
                self._syslog.info(line)
        except OSError as e:
            log.error("cannot write the audit log %s: %s", self.path, e)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def tail(self, limit: int = 50, *, failures_only: bool = False) -> list[AuditRecord]:
        """The last records of a file audit log, newest first (reads at most the last 1 MB)."""
        if self.target != "file":
            return []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - (1 << 20)))
                chunk = fh.read()
        except OSError:
            return []
        out: list[AuditRecord] = []
        for raw in reversed(chunk.splitlines()[1 if size > (1 << 20) else 0 :]):
            rec = _parse(raw)
            if rec is None or (failures_only and rec.outcome == "success"):
                continue
            out.append(rec)
            if len(out) >= limit:
                break
        return out


def _parse(raw: bytes) -> AuditRecord | None:
    try:
        d = json.loads(raw)
        return AuditRecord(**d)
    except (ValueError, TypeError):
        return None


def now_iso() -> str:
    t = time.time()
    return _second_iso(int(t)) + f".{int(t % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _second_iso(second: int) -> str:
    """The formatted second (every audited store asks; formatting it each time shows up in
    the ingest profile)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
