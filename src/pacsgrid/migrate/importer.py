"""`pacsgrid import`: files and folders into the archive, through the same ingest as C-STORE.

Any file names, any nesting. DICOMDIR files and files that are not DICOM at all are skipped and
counted; DICOM files the archive cannot accept are counted as failed, with the reason. The
work runs on a thread pool: parsing holds the GIL, but the writes, fsyncs and index commits do
not, and concurrent stores share index transactions (group commit).

Interrupting (Ctrl-C) stops taking new files, lets those in flight finish and prints the
summary; running the same import again skips what is already stored, so it resumes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pacsgrid.archive import Archive, Caller, IngestResult
from pacsgrid.dicomfile.part10 import split_part10
from pacsgrid.errors import InvalidDataset, PacsgridError
from pacsgrid.progress import Progress

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
IMPORT = Caller(via="import")


@dataclass
class ImportSummary:
    stored: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    bytes: int = 0
    interrupted: bool = False

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class NotDicom(Exception):
    """A file to skip (not DICOM, or a DICOMDIR), with the reason."""


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under `paths`, depth first, in a stable order."""
    for p in paths:
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        elif p.exists():
            yield p
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")


def classify(data: bytes, path: Path) -> None:
    """Raise NotDicom for what import skips rather than fails."""
    if path.name.upper() == "DICOMDIR":
        raise NotDicom("DICOMDIR")
    try:
        p10 = split_part10(data)
    except InvalidDataset as e:
        if "not DICOM" in e.reason or "too short" in e.reason:
            raise NotDicom("not DICOM") from None
        raise
    if p10.sop_class_uid == MEDIA_DIRECTORY_STORAGE:
        raise NotDicom("DICOMDIR")


def import_one(archive: Archive, path: Path, caller: Caller = IMPORT) -> IngestResult:
    data = path.read_bytes()
    classify(data, path)
    return archive.ingest_file(data, caller)


def run_parallel(
    items: Iterable[T],
    work: Callable[[T], R],
    record: Callable[[T, Future[R]], None],
    *,
    jobs: int,
    stop: threading.Event,
    name: str = "import",
) -> bool:
    """Run `work(item)` on a pool of `jobs` threads, calling `record(item, future)` in this
    thread as each finishes (so `record` needs no lock). At most 4 x jobs items are in
    flight. Stops taking new items when `stop` is set or on Ctrl-C, finishes those in
    flight, and returns True if it was interrupted."""
    interrupted = False
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix=name) as pool:
        pending: dict[Future[R], T] = {}
        try:
            for item in items:
                if stop.is_set():
                    interrupted = True
                    break
                while len(pending) >= jobs * 4:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        record(pending.pop(f), f)
                pending[pool.submit(work, item)] = item
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: finishing the %d files in flight", len(pending))
        finally:
            for f in list(pending):
                record(pending.pop(f), f)
    return interrupted


def import_paths(
    archive: Archive,
    paths: list[Path],
    *,
    jobs: int = 8,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> ImportSummary:
    summary = ImportSummary()
    files = list(iter_files(paths))
    prog = progress or Progress("import", len(files), bar=False)
    prog.set_total(len(files))
    stop = stop or threading.Event()

    def record(path: Path, fut: Future[IngestResult]) -> None:
        size = 0
        try:
            size = path.stat().st_size
            result = fut.result()
        except NotDicom as e:
            summary.skipped[str(e)] = summary.skipped.get(str(e), 0) + 1
            prog.advance("skipped")
            return
        except (PacsgridError, OSError) as e:
            summary.failed.append((str(path), str(e)))
            log.warning("import %s failed: %s", path, e)
            prog.advance("failed")
            return
        except Exception as e:  # a bug must not lose the rest of the import
            summary.failed.append((str(path), f"internal error: {type(e).__name__}: {e}"))
            log.exception("import %s failed", path)
            prog.advance("failed")
            return
        if result.outcome == "duplicate":
            summary.duplicates += 1
        else:
            summary.stored += 1
            summary.bytes += size
        prog.advance(result.outcome, size)

    summary.interrupted = run_parallel(
        files, lambda path: import_one(archive, path), record, jobs=jobs, stop=stop
    )
    if progress is None:
        prog.close()
    return summary
