"""The ingest journal: closes the gap between "object durable" and "index row committed".

Before an ingest writes its object, it drops a marker (one small file naming the key and the
sites) in `<data_dir>/journal/`; after the index commit the marker is removed. If the process
dies in between, the object may be complete on a site but missing from the index (an orphan).
`pacsgrid serve` replays the journal at start-up: every marked object that exists on a site and
is not indexed is read, checked and indexed, so no orphan stays invisible. Such an object was
never acknowledged; indexing it is what a retry by the sender would have done.

Markers are not fsynced: a process crash keeps them (the page cache survives), and after a
power loss `pacsgrid reindex --reconcile` finds what a lost marker would have pointed to.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Marker:
    path: Path
    key: str
    sites: tuple[str, ...]


class IngestJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def begin(self, key: str, sites: list[str]) -> Path:
        path = self.directory / f"{uuid.uuid4().hex}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps({"key": key, "sites": sites}).encode())
        finally:
            os.close(fd)
        return path

    @staticmethod
    def end(marker: Path) -> None:
        try:
            os.unlink(marker)
        except FileNotFoundError:
            pass

    def pending(self) -> Iterator[Marker]:
        for entry in sorted(self.directory.glob("*.json")):
            try:
                doc = json.loads(entry.read_text())
                yield Marker(entry, str(doc["key"]), tuple(doc["sites"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring unreadable journal marker %s: %s", entry, e)
                self.end(entry)
