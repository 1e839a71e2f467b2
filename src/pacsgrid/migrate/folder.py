"""`pacsgrid migrate folder SRC`: mirror a legacy archive folder into the archive, pass by pass.

Each pass walks SRC and compares every file with the folder ledger (pacsgrid.migration_ledger):
a file whose size and mtime are those recorded is not read again; a new or changed file is read,
hashed (SHA-256) and ingested through the same path as C-STORE (pacsgrid.migrate.importer), and
its outcome recorded. Files the archive refused are listed with the reason and not retried until
they change (or `--retry-failed`). Files that disappeared from SRC are reported as removed; their
instances stay in the archive, which never deletes. `--every 4h` repeats passes until stopped:
the last pass after the legacy system stops writing is the cutover.

The ledger is written in batches while the pass runs, so an interrupted pass (Ctrl-C, SIGTERM, a
crash) resumes where it stopped: what was ingested but not yet in the ledger is simply found to
be a duplicate next time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from pacsgrid.archive import Archive, Caller
from pacsgrid.errors import ConfigError, PacsgridError
from pacsgrid.migrate.importer import NotDicom, classify, run_parallel
from pacsgrid.migration_ledger import DUPLICATE, FAILED, REMOVED, SKIPPED, STORED, FileEntry
from pacsgrid.progress import Progress

log = logging.getLogger(__name__)

MIGRATE = Caller(via="migrate")
FLUSH_EVERY = 256  # ledger rows per transaction while a pass runs


@dataclass
class PassSummary:
    source: str
    seen: int = 0  # files in the source folder
    unchanged: int = 0  # not read: same size and mtime as recorded
    read: int = 0  # new or changed files read in this pass
    stored: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this pass
    failed_before: int = 0  # failures of earlier passes whose files did not change
    removed: list[str] = field(default_factory=list)  # gone from the source in this pass
    changed: list[str] = field(default_factory=list)  # read again because size/mtime changed
    same_content: int = 0  # of those, files whose bytes turned out unchanged (touched)
    bytes: int = 0  # bytes read
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def files_per_second(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


@dataclass(frozen=True)
class _Candidate:
    rel: str
    path: Path
    size: int
    mtime_ns: int
    previous: FileEntry | None


def source_key(src: Path) -> str:
    """The ledger a folder uses: its absolute, resolved path."""
    return str(src.resolve())


def _walk(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(relative path, path, stat) of every regular file under root, in a stable order."""
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError as e:
                log.warning("cannot stat %s: %s", path, e)
                continue
            if not os.path.isfile(path):
                continue
            yield path.relative_to(root).as_posix(), path, st


def _process(archive: Archive, c: _Candidate) -> FileEntry:
    """Read, hash and ingest one file; the ledger entry that records the outcome."""
    data = c.path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    prev = c.previous
    if prev is not None and prev.sha256 == digest and prev.state != FAILED:
        # Touched but not changed (mtime moved, same bytes): nothing to ingest.
        return FileEntry(
            c.rel, len(data), c.mtime_ns, digest, prev.sop_uid, prev.state, prev.reason
        )
    try:
        classify(data, c.path)
        result = archive.ingest_file(data, MIGRATE)
    except NotDicom as e:
        return FileEntry(c.rel, len(data), c.mtime_ns, digest, "", SKIPPED, str(e))
    except PacsgridError as e:
        return FileEntry(c.rel, len(data), c.mtime_ns, digest, "", FAILED, str(e))
    reason = ""
    if (
        result.outcome == "duplicate"
        and prev is not None
        and prev.sop_uid == result.sop_instance_uid
    ):
        reason = (
            "changed in the source, same SOP Instance UID: the archive keeps the object it "
            "stored first (dicom.on_duplicate = keep)"
        )
    state = DUPLICATE if result.outcome == "duplicate" else STORED
    return FileEntry(c.rel, len(data), c.mtime_ns, digest, result.sop_instance_uid, state, reason)


def migrate_pass(
    archive: Archive,
    src: Path,
    *,
    jobs: int = 8,
    retry_failed: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> PassSummary:
    """One pass over `src`: ingest new and changed files, record everything in the ledger."""
    if not src.is_dir():
        raise ConfigError("SRC", f"not a folder: {src}")
    stop = stop or threading.Event()
    source = source_key(src)
    summary = PassSummary(source)
    started = time.monotonic()
    ledger = archive.folder_ledger(source)
    seen: set[str] = set()
    todo: list[_Candidate] = []
    for rel, path, st in _walk(src):
        seen.add(rel)
        prev = ledger.get(rel)
        if (
            prev is not None
            and prev.state != REMOVED
            and prev.unchanged(st.st_size, st.st_mtime_ns)
            and not (retry_failed and prev.state == FAILED)
        ):
            summary.unchanged += 1
            if prev.state == FAILED:
                summary.failed_before += 1
            continue
        if prev is not None and prev.state != REMOVED:
            summary.changed.append(rel)
        todo.append(_Candidate(rel, path, st.st_size, st.st_mtime_ns, prev))
    summary.seen = len(seen)

    gone = [
        FileEntry(e.path, e.size, e.mtime_ns, e.sha256, e.sop_uid, REMOVED, f"was {e.state}")
        for rel, e in ledger.items()
        if rel not in seen and e.state != REMOVED
    ]
    if gone:
        archive.record_files(source, gone)
        summary.removed = [e.path for e in gone]
        for e in gone:
            log.warning(
                "%s: removed from the source; %s stays in the archive",
                e.path,
                e.sop_uid or "(no instance)",
            )

    prog = progress or Progress("migrate folder", bar=False)
    prog.set_total(len(todo))
    batch: list[FileEntry] = []

    def record(c: _Candidate, fut: Future[FileEntry]) -> None:
        try:
            entry = fut.result()
        except OSError as e:  # unreadable file: a failure with the reason, not a crash
            entry = FileEntry(c.rel, c.size, c.mtime_ns, "", "", FAILED, f"cannot read: {e}")
        except Exception as e:  # a bug must not lose the rest of the pass
            log.exception("migrating %s failed", c.path)
            entry = FileEntry(
                c.rel, c.size, c.mtime_ns, "", "", FAILED, f"internal error: {type(e).__name__}"
            )
        summary.read += 1
        summary.bytes += entry.size
        prev = c.previous
        if prev is not None and prev.state not in (FAILED, REMOVED) and prev.sha256 == entry.sha256:
            summary.same_content += 1
        elif entry.state == STORED:
            summary.stored += 1
        elif entry.state == DUPLICATE:
            summary.duplicates += 1
        elif entry.state == SKIPPED:
            summary.skipped[entry.reason] = summary.skipped.get(entry.reason, 0) + 1
        elif entry.state == FAILED:
            summary.failed.append((c.rel, entry.reason))
            log.warning("%s: failed: %s", c.rel, entry.reason)
        prog.advance(entry.state, entry.size)
        batch.append(entry)
        if len(batch) >= FLUSH_EVERY:
            archive.record_files(source, batch)
            batch.clear()

    try:
        summary.interrupted = run_parallel(
            todo, lambda c: _process(archive, c), record, jobs=jobs, stop=stop, name="migrate"
        )
    finally:
        if batch:
            archive.record_files(source, batch)
        if progress is None:
            prog.close()
    summary.seconds = time.monotonic() - started
    return summary


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str, key: str = "--every") -> float:
    """'4h', '30m', '90s', '1d' or plain seconds -> seconds."""
    m = _DURATION.match(text)
    if not m or float(m[1]) <= 0:
        raise ConfigError(key, f"expected a duration such as 30m, 4h or 1d, got {text!r}")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
