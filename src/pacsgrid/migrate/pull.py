"""`pacsgrid migrate pull --from AET@HOST:PORT`: bring a legacy PACS's studies in over DICOM.

1. Discover the studies (pacsgrid.migrate.discover) and merge them into the study ledger.
2. For each study not done yet, with `--parallel N` associations: list its instances (IMAGE
   level C-FIND), ask the archive which it already holds, and retrieve what is missing: the
   whole study, or only the series with missing instances. C-MOVE sends them to this archive's
   DICOM server (a running `pacsgrid serve`, or the listener `--listen` starts in this
   process); `--get` receives them on the same association instead (C-GET), no listener.
3. Count again: a study is done when the archive holds every instance the source listed
   (wherever it is filed); otherwise it is incomplete and retried, up to `attempts` times in
   this run, then on the next run; after `attempts` runs it is listed as failed.

Every study's outcome is written to the ledger as soon as it is known, so a pull that is
killed resumes with the studies it had not finished; a study complete in the archive is never
retrieved again. `--window 19:00-07:00` retrieves only in those hours and `--max-rate`
paces instances per second, so the legacy system stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pacsgrid.archive import Archive, Caller
from pacsgrid.dicom import dimse
from pacsgrid.dicom.server import DicomServer, listening_socket
from pacsgrid.dicom.status import failure_status
from pacsgrid.errors import ConfigError, PacsgridError
from pacsgrid.migrate.discover import Discovery, discover
from pacsgrid.migrate.legacy import LegacyError, LegacySession, echo
from pacsgrid.migration_ledger import DONE, GAVE_UP, INCOMPLETE, PENDING, StudyEntry
from pacsgrid.model import Level
from pacsgrid.progress import Progress
from pacsgrid.settings import PeerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_KEYS = ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass
class PullOptions:
    since: dt.date | None = None
    until: dt.date | None = None
    window: tuple[dt.time, dt.time] | None = None
    max_rate: float = 0.0  # instances per second, 0 = unlimited
    parallel: int = 1
    use_get: bool = False
    listen: bool = False
    find_limit: int = 0
    attempts: int = 3
    retry_failed: bool = False
    retry_pause: float = 5.0


@dataclass
class PullSummary:
    source: str
    found: int = 0
    already_done: int = 0
    retrieved: int = 0  # studies retrieved (C-MOVE/C-GET issued) in this run
    done: int = 0  # studies complete at the end
    incomplete: list[tuple[str, str]] = field(default_factory=list)  # (study, why)
    failed: list[tuple[str, str]] = field(default_factory=list)  # given up
    instances: int = 0  # instances that arrived in this run
    queries: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0


def source_key(peer: PeerSettings) -> str:
    return f"{peer.ae_title}@{peer.host}:{peer.port}"


_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_window(text: str) -> tuple[dt.time, dt.time]:
    m = _WINDOW.match(text)
    if not m or int(m[1]) > 23 or int(m[3]) > 23 or int(m[2]) > 59 or int(m[4]) > 59:
        raise ConfigError("--window", f"expected HH:MM-HH:MM such as 19:00-07:00, got {text!r}")
    return dt.time(int(m[1]), int(m[2])), dt.time(int(m[3]), int(m[4]))


def in_window(window: tuple[dt.time, dt.time] | None, now: dt.datetime) -> bool:
    if window is None:
        return True
    start, end = window
    t = now.time()
    if start == end:
        return True
    if start < end:
        return start <= t < end
    return t >= start or t < end  # wraps midnight


def seconds_until_open(window: tuple[dt.time, dt.time], now: dt.datetime) -> float:
    start = dt.datetime.combine(now.date(), window[0])
    if start <= now:
        start += dt.timedelta(days=1)
    return (start - now).total_seconds()


def parse_date(text: str, key: str) -> dt.date:
    try:
        return dt.datetime.strptime(text.replace("-", ""), "%Y%m%d").date()
    except ValueError:
        raise ConfigError(key, f"expected a date YYYY-MM-DD or YYYYMMDD, got {text!r}") from None


class RateLimiter:
    """Paces work to `rate` units per second on average (0 = no limit), across tasks."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0

    async def take(self, n: int) -> None:
        if self.rate <= 0 or n <= 0:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(self._next, now)
        self._next = start + n / self.rate
        if start > now:
            await asyncio.sleep(start - now)


class Puller:
    def __init__(
        self,
        archive: Archive,
        peer: PeerSettings,
        opts: PullOptions,
        progress: Progress,
        stop: threading.Event,
    ) -> None:
        self.archive = archive
        self.peer = peer
        self.opts = opts
        self.progress = progress
        self.stop = stop
        self.source = source_key(peer)
        self.our_ae = archive.settings.dicom.ae_title
        self.summary = PullSummary(self.source)
        self.limiter = RateLimiter(opts.max_rate)
        self.caller = Caller(ae_title=peer.ae_title, address=peer.host, via="migrate")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ------------------------------------------------------------------ the whole run
    async def run(self) -> PullSummary:
        started = time.monotonic()
        server: DicomServer | None = None
        if self.opts.listen and not self.opts.use_get:
            server = await self._listen()
        elif not self.opts.use_get:
            await self._check_receiver()
        try:
            discovery = await self._discover()
            todo = await self._merge(discovery)
            self.progress.set_total(len(todo))
            round_ = 0
            while todo and not self.stop.is_set():
                round_ += 1
                if round_ > 1:
                    log.info("retrying %d incomplete studies", len(todo))
                    self.progress.set_total((self.progress.total or 0) + len(todo))
                    await self._sleep(self.opts.retry_pause)
                todo = await self._round(todo)
                todo = [
                    e for e in todo if e.state == INCOMPLETE and e.attempts < self.opts.attempts
                ]
        finally:
            if server is not None:
                await server.shutdown(5.0)
        self.summary.interrupted = self.stop.is_set()
        await self._final_counts(discovery)
        self.summary.seconds = time.monotonic() - started
        return self.summary

    async def _listen(self) -> DicomServer:
        d = self.archive.settings.dicom
        try:
            sock = listening_socket(d.bind, d.port)
        except OSError as e:
            raise ConfigError(
                "dicom.port",
                f"--listen cannot listen on {d.bind}:{d.port}: {e.strerror or e} "
                "(is 'pacsgrid serve' running? then pull without --listen)",
            ) from None
        server = DicomServer(self.archive, sock)
        await server.start()
        log.info("receiving on %s:%d as %s", d.bind, d.port, d.ae_title)
        return server

    async def _check_receiver(self) -> None:
        d = self.archive.settings.dicom
        host = "127.0.0.1" if d.bind in ("0.0.0.0", "::", "") else d.bind
        if not await echo(host, d.port, self.our_ae, d.ae_title):
            raise PacsgridError(
                f"nothing answers C-ECHO as {d.ae_title} on {host}:{d.port}: C-MOVE sends the "
                "studies to the archive's DICOM server; start 'pacsgrid serve' first, or use "
                "--listen (this command receives) or --get (C-GET, no listener)"
            )

    async def _discover(self) -> Discovery:
        async with LegacySession(self.peer, self.our_ae) as session:
            found = await discover(session, self.opts.since, self.opts.until, self.opts.find_limit)
        self.summary.found = len(found.studies)
        self.summary.queries = found.queries
        self.summary.warnings += found.warnings
        log.info(
            "%s: %d studies found with %d C-FIND queries%s",
            self.source,
            len(found.studies),
            found.queries,
            " (sliced by date)" if found.sliced else "",
        )
        return found

    async def _merge(self, discovery: Discovery) -> list[StudyEntry]:
        """Add new studies to the ledger; return those to retrieve in this run."""
        known = {e.study_uid: e for e in await self._call(self.archive.study_ledger, self.source)}
        fresh: list[StudyEntry] = []
        todo: list[StudyEntry] = []
        wanted = (PENDING, INCOMPLETE, GAVE_UP) if self.opts.retry_failed else (PENDING, INCOMPLETE)
        for uid, found in discovery.studies.items():
            entry = known.get(uid)
            if entry is None:
                entry = StudyEntry(uid, found.study_date, found.patient_id, found.count)
                fresh.append(entry)
            elif entry.state == DONE and found.count > entry.expected >= 0:
                # The legacy system received more instances since: retrieve again.
                entry = replace(entry, state=PENDING, expected=found.count)
                fresh.append(entry)
            elif entry.state == GAVE_UP and self.opts.retry_failed:
                entry = replace(entry, attempts=0)
            if entry.state == DONE:
                self.summary.already_done += 1
            elif entry.state in wanted:
                todo.append(entry)
        if fresh:
            await self._call(self.archive.record_studies, self.source, fresh)
        return todo

    async def _round(self, todo: Sequence[StudyEntry]) -> list[StudyEntry]:
        queue: asyncio.Queue[StudyEntry] = asyncio.Queue()
        for e in todo:
            queue.put_nowait(e)
        results: list[StudyEntry] = []
        workers = [
            asyncio.create_task(self._worker(queue, results))
            for _ in range(max(1, min(self.opts.parallel, len(todo))))
        ]
        await asyncio.gather(*workers)
        return results

    async def _worker(self, queue: asyncio.Queue[StudyEntry], results: list[StudyEntry]) -> None:
        session: LegacySession | None = None
        try:
            while not queue.empty() and not self.stop.is_set():
                entry = queue.get_nowait()
                if not await self._wait_window():
                    return
                try:
                    if session is None and not self.opts.use_get:
                        session = LegacySession(self.peer, self.our_ae)
                        await session.open()
                    entry = await self._study(entry, session)
                except LegacyError as e:
                    entry = await self._record(entry, entry.received, str(e), retrieved=False)
                    if session is not None:
                        await session.close()
                    session = None
                results.append(entry)
                self.progress.advance(entry.state)
        finally:
            if session is not None:
                await session.close()

    async def _wait_window(self) -> bool:
        while not in_window(self.opts.window, dt.datetime.now()):
            assert self.opts.window is not None
            pause = seconds_until_open(self.opts.window, dt.datetime.now())
            log.info("outside the window %s-%s; waiting %.0f s", *self.opts.window, pause)
            if not await self._sleep(min(pause, 60.0)):
                return False
        return not self.stop.is_set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early when stopped; False if stopped."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stop.is_set():
                return False
            await asyncio.sleep(min(0.5, deadline - time.monotonic()))
        return not self.stop.is_set()

    # ------------------------------------------------------------------ one study
    async def _study(self, entry: StudyEntry, session: LegacySession | None) -> StudyEntry:
        uid = entry.study_uid
        lister = session or LegacySession(self.peer, self.our_ae)
        if session is None:
            await lister.open()
        try:
            keys = {"StudyInstanceUID": uid, **{k: "" for k in IMAGE_KEYS}}
            listing = await lister.find(Level.IMAGE, keys)
        finally:
            if session is None:
                await lister.close()
        series: dict[str, list[str]] = {}
        classes: set[str] = set()
        seen: set[str] = set()
        for row in listing.rows:
            sop = row.get("SOPInstanceUID", "")
            if sop and sop not in seen:  # one UID may be listed twice (under two patients)
                seen.add(sop)
                series.setdefault(row.get("SeriesInstanceUID", ""), []).append(sop)
                if row.get("SOPClassUID"):
                    classes.add(row["SOPClassUID"])
        uids = [u for us in series.values() for u in us]
        expected = len(uids)
        if not listing.complete or (entry.expected > expected and not uids):
            expected = max(expected, entry.expected)
        have = await self._held(uid, uids)
        if uids and len(have) >= expected:
            return await self._record(entry, len(have), "", expected, retrieved=False)
        missing_series = [s for s, us in series.items() if s and not set(us) <= have]
        whole = not have or not missing_series or len(missing_series) == len(series)
        await self.limiter.take(max(1, expected - len(have)))
        requests = (
            [{"StudyInstanceUID": uid}]
            if whole
            else [{"StudyInstanceUID": uid, "SeriesInstanceUID": s} for s in missing_series]
        )
        level = Level.STUDY if whole else Level.SERIES
        errors: list[str] = []
        for keys in requests:
            if self.opts.use_get:
                result = await self._get(level, keys, sorted(classes))
            else:
                assert session is not None
                result = await session.move(self.our_ae, level, keys)
            if result.status != dimse.SUCCESS:
                errors.append(
                    f"{'C-GET' if self.opts.use_get else 'C-MOVE'} status 0x{result.status:04X}"
                    f" ({result.completed} completed, {result.failed} failed"
                    f"{', ' + result.error if result.error else ''})"
                )
        after = await self._held(uid, uids)
        self.summary.instances += max(0, len(after) - len(have))
        why = "; ".join(errors)
        if len(after) < expected:
            why = f"{len(after)} of {expected} instances arrived" + (f": {why}" if why else "")
        return await self._record(entry, len(after), why, expected, retrieved=True)

    async def _held(self, study_uid: str, uids: list[str]) -> set[str]:
        """Which of the source's instances the archive holds (anywhere); when the source
        listed none, what the archive holds of the study."""
        if uids:
            return await self._call(self.archive.has_instances, uids)
        return await self._call(self.archive.study_sop_uids, study_uid)

    async def _get(self, level: Level, keys: dict[str, str], classes: list[str]) -> Any:
        async def store(sop_class: str, dataset: bytes, ts: str) -> int:
            try:
                await self._call(self._ingest, dataset, ts, sop_class)
            except PacsgridError as e:
                return failure_status(e)[0]
            return dimse.SUCCESS

        async with LegacySession(
            self.peer, self.our_ae, get_classes=classes, on_store=store
        ) as session:
            return await session.get(level, keys)

    def _ingest(self, dataset: bytes, ts: str, sop_class: str) -> None:
        self.archive.ingest(dataset, ts, self.caller, sop_class_uid=sop_class)

    async def _record(
        self,
        entry: StudyEntry,
        received: int,
        error: str,
        expected: int | None = None,
        *,
        retrieved: bool = True,
    ) -> StudyEntry:
        expected = entry.expected if expected is None else expected
        attempts = entry.attempts + (1 if retrieved or error else 0)
        complete = not error and received >= expected and expected >= 0
        state = DONE if complete else INCOMPLETE
        if not complete and attempts >= self.opts.attempts:
            state = GAVE_UP
        if retrieved:
            self.summary.retrieved += 1
        updated = replace(
            entry,
            expected=expected,
            received=received,
            state=state,
            attempts=attempts,
            last_error=error,
        )
        await self._call(self.archive.record_studies, self.source, [updated])
        if error:
            log.warning("study %s: %s", entry.study_uid, error)
        return updated

    async def _final_counts(self, discovery: Discovery) -> None:
        for e in await self._call(self.archive.study_ledger, self.source):
            if e.study_uid not in discovery.studies:
                continue
            if e.state == DONE:
                self.summary.done += 1
            elif e.state == GAVE_UP:
                self.summary.failed.append((e.study_uid, e.last_error))
            else:
                self.summary.incomplete.append((e.study_uid, e.last_error or e.state))


def pull(
    archive: Archive,
    peer: PeerSettings,
    opts: PullOptions,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> PullSummary:
    """Run one pull to the end (or until `stop` is set)."""
    prog = progress or Progress("migrate pull", unit="studies", bar=False)
    puller = Puller(archive, peer, opts, prog, stop or threading.Event())
    try:
        return asyncio.run(puller.run())
    finally:
        if progress is None:
            with contextlib.suppress(Exception):
                prog.close()
