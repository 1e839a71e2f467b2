"""Crash safety: SIGKILL the server, or one of its workers, at a random moment while clients
store; then check what the archive holds against the bytes the clients sent.

Every round stores instances with fresh SOP Instance UIDs, so every store goes down the write
path (none is a duplicate answered from the index). The variants store in different ways:
concurrent associations (pynetdicom and DCMTK storescu), two folder sites with write_quorum 2,
STOW-RS, `dicom.on_duplicate = "replace"` with UIDs re-sent carrying other bytes, and single
workers killed instead of the whole server. Objects alternate between small ones (copied into
their log record) and large ones (above durability.inline_kb: staged). The kill comes, from a
seeded generator, after a random number of acknowledgements plus a random delay, while the
senders are still sending; some variants checkpoint every half second, so kills also land in
checkpoints.

After every kill the server restarts (recovery runs before the port opens; a dead worker's log
is replayed by the supervisor instead) and the archive is checked:

- every acknowledged instance comes back (C-GET, proposing only the transfer syntax it was sent
  in; WADO-RS for STOW) with the dataset the client sent, byte for byte, and so does every copy
  on every site. The bytes after the file meta are compared: the file meta is the archive's
  own (it names the receiving AE and implementation), the dataset is the sender's and must
  come back unchanged. With "replace", the newest acknowledged bytes win, or those of a newer
  store the kill cut off (durable before its answer was sent: recovery keeps it);
- whatever else is stored (a store the kill cut off) is a complete copy of something sent;
- the index agrees with itself and with the sites: per study and per series, the counts C-FIND
  gives at the study and series levels, the instances it finds at the image level, and the
  files on the sites;
- nothing is left over: no temp file in .incoming or beside the objects, no log segment or
  journal of a dead process, no staged file whose segment has moved on; after the last, clean
  stop (a final checkpoint), no staged file at all.

PACSGRID_CRASH_KILLS (kills per variant, default 10) and PACSGRID_CRASH_SEED make longer or
other runs.
"""

from __future__ import annotations

import fcntl
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from bench.synth import Spec, write
from tests.behind_the_archive import index_of
from tests.conftest import Server, dcmtk, free_port, storescu_started
from tests.corpus import dataset_bytes
from tests.waiting import wait_until
from tests.web_helpers import multipart_body, parse_multipart, wait_http

KILLS = int(os.environ.get("PACSGRID_CRASH_KILLS", "10"))
SEED = int(os.environ.get("PACSGRID_CRASH_SEED", "20261205"))
PER_SENDER = 6  # instances each sender is given per round
INLINE_KB = 16  # small objects (~2 KB) go into their record, large ones (~22 KB) are staged
SMALL, LARGE = 24, 104  # rows = columns of the synthetic CT images
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class Variant:
    name: str
    dimse: int = 0  # concurrent pynetdicom associations
    storescu: int = 0  # concurrent DCMTK storescu associations
    stow: int = 0  # concurrent STOW-RS clients
    sites: int = 1  # folder sites, all in the write quorum
    replace: bool = False
    kill: str = "server"  # or "worker": SIGKILL one worker, the supervisor replays it
    workers: int = 1
    checkpoint_seconds: float = 30.0

    @property
    def senders(self) -> int:
        return self.dimse + self.storescu + self.stow


VARIANTS = [
    Variant("associations", dimse=3, storescu=1, workers=2, checkpoint_seconds=0.5),
    Variant("quorum", dimse=2, storescu=1, sites=2),
    Variant("stow", stow=3, checkpoint_seconds=0.5),
    Variant("replace", dimse=2, replace=True, checkpoint_seconds=0.5),
    Variant("worker", dimse=3, kill="worker", workers=2),
]


# ---------------------------------------------------------------- what the clients sent


@dataclass(eq=False)
class Version:
    """One object as a client sent it (a re-sent UID has several)."""

    sop: str
    study: str
    series: str
    path: Path
    dataset: bytes  # the dataset after the file meta: what goes on the wire
    attempted: bool = False  # the client began to send it
    acked: bool = False  # the archive answered success


class Ledger:
    """Every version sent, in sending order per SOP Instance UID, and what was answered."""

    def __init__(self) -> None:
        self.versions: dict[str, list[Version]] = defaultdict(list)
        self.acks = 0
        self._lock = threading.Lock()

    def add(self, path: Path) -> Version:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        ts, data = dataset_bytes(path)
        assert ts == EXPLICIT_LE
        v = Version(
            str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), path, data
        )
        self.versions[v.sop].append(v)
        return v

    def attempt(self, v: Version) -> None:
        v.attempted = True

    def ack(self, v: Version) -> None:
        with self._lock:
            v.acked = True
            self.acks += 1

    def acknowledged(self) -> set[str]:
        return {sop for sop, vs in self.versions.items() if any(v.acked for v in vs)}

    def allowed(self, sop: str) -> list[bytes]:
        """What the archive may hold for `sop`: the newest acknowledged version, or one sent
        after it whose store a kill cut off; with none acknowledged, anything sent."""
        vs = self.versions[sop]
        last = max((i for i, v in enumerate(vs) if v.acked), default=-1)
        return [v.dataset for i, v in enumerate(vs) if i == last or (i > last and v.attempted)]

    def study_of(self, sop: str) -> str:
        return self.versions[sop][0].study


# ---------------------------------------------------------------- senders


def _send_dimse(
    port: int, aet: str, versions: list[Version], ledger: Ledger, opened: dict[str, Any]
) -> None:
    """One pynetdicom association storing `versions` (the files' dataset bytes as they are);
    the association goes into `opened` under `aet`, so that a kill can wake it."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSGRID")
    opened[aet] = assoc
    if not assoc.is_established:
        return
    # pynetdicom leaves the socket open when the peer has reset it (its shutdown() raises
    # before its close()): close it here when done.
    raw = getattr(assoc.dul.socket, "socket", None)
    try:
        for v in versions:
            ledger.attempt(v)
            try:
                status = assoc.send_c_store(v.path)
            except RuntimeError:  # the association is gone
                return
            if "Status" in status and status.Status == 0:
                ledger.ack(v)
            elif not assoc.is_established:
                return
    finally:
        if assoc.is_established:
            assoc.release()
        if raw is not None:
            raw.close()


def _wake(assoc: Any) -> None:
    """The process at the other end was killed: hand the sender the empty response that its
    DIMSE timeout would give it 60 s later (pynetdicom does not wake a sender whose connection
    closes). Never abort from this thread: pynetdicom 3.0's reactor can then end with its
    `_is_paused` flag down while the sender, past its `is_established` check, waits for that
    flag forever. The sender's own thread aborts when it finds no response."""
    if assoc.dimse.msg_queue.empty():
        assoc.dimse.msg_queue.put((None, None))


def _stacks(threads: list[threading.Thread]) -> str:
    """Where each sender still running is stuck (for the failure message)."""
    frames = sys._current_frames()
    return "\n".join(
        f"{t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
        for t in threads
        if t.is_alive() and t.ident in frames
    )


def _send_storescu(port: int, aet: str, versions: list[Version], ledger: Ledger) -> None:
    """One storescu association; its -v output tells file by file what was answered."""
    by_path = {str(v.path): v for v in versions}
    proc = storescu_started(port, [v.path for v in versions], "-aet", aet, "-to", "60")
    assert proc.stdout is not None
    current: Version | None = None
    for line in proc.stdout:
        m = re.match(r"^I: Sending file: (.+)$", line.rstrip("\n"))
        if m:
            current = by_path[m[1]]
            ledger.attempt(current)
        elif line.startswith("I: Received Store Response (Success)") and current is not None:
            ledger.ack(current)
            current = None
    proc.stdout.close()
    proc.wait(60)


def _send_stow(base: str, versions: list[Version], ledger: Ledger) -> None:
    """STOW-RS, two instances per request; a part counts as stored when the answer lists it
    in its ReferencedSOPSequence."""
    for i in range(0, len(versions), 2):
        batch = versions[i : i + 2]
        body, ctype = multipart_body([v.path.read_bytes() for v in batch])
        for v in batch:
            ledger.attempt(v)
        try:
            r = requests.post(
                base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype}, timeout=60
            )
        except requests.RequestException:
            return  # the server is gone
        stored = {
            item["00081155"]["Value"][0] for item in r.json().get("00081199", {}).get("Value", [])
        }
        for v in batch:
            if v.sop in stored:
                ledger.ack(v)


# ---------------------------------------------------------------- a variant's archive


@dataclass
class Rig:
    variant: Variant
    work: Path
    rng: random.Random
    ledger: Ledger = field(default_factory=Ledger)
    port: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)
    server: Server | None = None
    kills: int = 0
    cut_off: int = 0  # stores begun and not answered when a kill came

    @property
    def data_dir(self) -> Path:
        return self.work / "archive"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def site_roots(self) -> list[Path]:
        if self.variant.sites == 1:
            return [self.data_dir / "objects"]
        return [self.work / f"site-{i}" for i in range(self.variant.sites)]

    def config(self) -> Path:
        v = self.variant
        text = (
            f"[durability]\ninline_kb = {INLINE_KB}\nlog_segment_mb = 4\n"
            f"checkpoint_seconds = {v.checkpoint_seconds}\n"
        )
        if v.replace:
            text += '[dicom]\non_duplicate = "replace"\n'
        text += f'[[peers]]\nae_title = "CHECKER"\nhost = "127.0.0.1"\nport = {self.port}\n'
        if v.sites > 1:
            text += f"[replication]\ncopies = {v.sites}\nwrite_quorum = {v.sites}\n"
            for i, root in enumerate(self.site_roots()):
                text += f'[[sites]]\nname = "s{i}"\nurl = "{root.as_uri()}"\nlocation = "l{i}"\n'
        path = self.work / "pacsgrid.toml"
        path.write_text(text)
        return path

    def start(self) -> Server:
        """Start the server; recovery runs before it opens the port."""
        args = ("--http-port", str(self.http)) if self.variant.stow else ()
        self.server = Server(
            self.data_dir,
            port=self.port,
            workers=self.variant.workers,
            config=self.config(),
            args=args,
        ).start(timeout=120)
        if self.variant.stow:
            wait_http(self.base + "/health", self.server, timeout=120)
        if self.variant.workers > 1:
            _ready_workers(self.server, self.variant.workers)
        return self.server

    # ------------------------------------------------------------ one round
    def objects(self, round_no: int) -> list[Version]:
        """Fresh instances for a round (half small, half large, interleaved); with "replace",
        as many again: earlier UIDs re-sent with other bytes."""
        n = PER_SENDER * self.variant.senders
        seed = f"crash-{self.variant.name}-{SEED}-{round_no}"
        out = self.work / f"round-{round_no}"
        small = write(Spec(1, 2, n // 4, SMALL, seed + "-small"), out / "small")
        large = write(Spec(1, 1, 2 * (n // 4), LARGE, seed + "-large"), out / "large")
        earlier = sorted(sop for sop, vs in self.ledger.versions.items() if vs[-1].attempted)
        fresh = [self.ledger.add(p) for pair in zip(small, large, strict=True) for p in pair]
        if not self.variant.replace:
            return fresh
        again = []
        for i, sop in enumerate(self.rng.sample(earlier, min(len(earlier), n // 2))):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(self.ledger.versions[sop][-1].path)
            ds.ImageComments = f"round {round_no} " + "x" * self.rng.randrange(0, 64)
            path = out / "again" / f"{i:04d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            again.append(self.ledger.add(path))
        mixed = fresh + again
        self.rng.shuffle(mixed)
        return mixed

    def kill_round(self, round_no: int) -> set[str]:
        """Send a round's objects from every sender at once; SIGKILL the server (or the worker
        that serves the first association) after a random number of acknowledgements and a
        random delay; let the senders end, restart. Returns the studies the round stored to."""
        v = self.variant
        assert self.server is not None
        versions = self.objects(round_no)
        shares = [versions[i :: v.senders] for i in range(v.senders)]
        aets = [f"R{round_no}S{i}" for i in range(v.senders)]
        jobs: list[Callable[[], None]] = []
        opened: dict[str, Any] = {}  # pynetdicom associations by calling AE title
        for i, share in enumerate(shares):
            if i < v.dimse:
                jobs.append(
                    lambda a=aets[i], s=share: _send_dimse(self.port, a, s, self.ledger, opened)
                )
            elif i < v.dimse + v.storescu:
                jobs.append(lambda a=aets[i], s=share: _send_storescu(self.port, a, s, self.ledger))
            else:
                jobs.append(lambda s=share: _send_stow(self.base, s, self.ledger))
        acks_before = self.ledger.acks
        after = self.rng.randint(1, len(versions) // 2)
        delay = self.rng.uniform(0.0, 0.02)
        threads = [threading.Thread(target=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        wait_until(
            lambda: (
                self.ledger.acks - acks_before >= after or not any(t.is_alive() for t in threads)
            ),
            180,
            f"{after} acknowledgement(s) in round {round_no}",
            every=0.001,  # a round of small STOW-RS requests can be over within milliseconds
            seen=lambda: self.server.text()[-2000:] if self.server else "",
        )
        time.sleep(delay)  # the random moment (not a wait for anything)
        # Then the first moment a store is under way, while the senders still send: on a fast
        # machine the random delay alone could fall between two stores (or after the last)
        # in every round, and the kills would miss the write path.
        give_up = time.monotonic() + 10
        while (
            time.monotonic() < give_up
            and any(t.is_alive() for t in threads)
            and not any(x.attempted and not x.acked for x in versions)
        ):
            time.sleep(0.001)
        if v.kill == "worker":
            victim = self._worker_of(aets[0])
            os.kill(victim, signal.SIGKILL)
        else:
            self.server.kill()
        self.kills += 1
        # Wake the dead associations on every pass until their senders end: a sender whose
        # association was accepted just before the kill registers it only once `associate()`
        # returns, and a sender handed an empty response may start one more store before its
        # reactor has seen the connection close. In a worker kill, only the victim's
        # associations are woken, once their worker is known from its log (a sender whose
        # association no worker logged ends by itself, at its DIMSE timeout).
        deadline = time.monotonic() + 240
        workers: dict[str, int] = {}  # the worker of each association, once its log says
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            for aet, assoc in list(opened.items()):
                if v.kill == "worker" and aet not in workers:
                    found = self._accepted_by(aet)
                    if found is None:
                        continue
                    workers[aet] = found
                if v.kill != "worker" or workers[aet] == victim:
                    _wake(assoc)
            for t in threads:
                t.join(0.05)
        assert not any(t.is_alive() for t in threads), (
            "a sender did not end after the kill:\n" + _stacks(threads)
        )
        if v.kill == "worker":
            wait_until(
                lambda: re.search(
                    rf"worker pid {victim}: its site logs and ingest journal replayed",
                    self.server.text() if self.server else "",
                ),
                120,
                f"the supervisor's replay of worker {victim}",
            )
            _ready_workers(self.server, v.workers)
        else:
            self.start()
        self.cut_off += sum(1 for x in versions if x.attempted and not x.acked)
        return {x.study for x in versions}

    def _accepted_by(self, aet: str) -> int | None:
        """The worker whose log says it accepted `aet`'s association, if it says so yet."""
        pattern = rf"\[(\d+)\] pacsgrid\.dicom: association from {aet}@\S+ accepted"
        found = re.search(pattern, self.server.text() if self.server else "")
        return int(found[1]) if found else None

    def _worker_of(self, aet: str) -> int:
        pattern = rf"\[(\d+)\] pacsgrid\.dicom: association from {aet}@\S+ accepted"
        found = wait_until(
            lambda: re.search(pattern, self.server.text() if self.server else ""),
            60,
            f"the worker that accepted {aet}",
        )
        return int(found[1])

    # ------------------------------------------------------------ checks
    def check(self, studies: set[str]) -> None:
        """Everything the module docstring promises, on the running server; `studies`: those
        to retrieve (the round's, and those of re-sent UIDs)."""
        on_sites = [self._site_contents(root) for root in self.site_roots()]
        index = _find_all(self.port)
        indexed = {
            sop: (st, se)
            for st, series in index.items()
            for se, sops in series.items()
            for sop in sops
        }
        union: dict[str, tuple[str, str]] = {}
        for site in on_sites:
            union.update({sop: (st, se) for sop, (st, se, _) in site.items()})
        assert set(indexed) == set(union), (
            f"index and sites differ: only indexed {sorted(set(indexed) - set(union))[:5]}, "
            f"only on sites {sorted(set(union) - set(indexed))[:5]}"
        )
        assert indexed == union, "an instance is indexed under another study or series"
        acked = self.ledger.acknowledged()
        missing = acked - set(indexed)
        assert not missing, f"{len(missing)} acknowledged instance(s) lost: {sorted(missing)[:5]}"
        for root, site in zip(self.site_roots(), on_sites, strict=True):
            for sop, (_, _, data) in site.items():
                assert data in self.ledger.allowed(sop), f"{root}: {sop} holds other bytes"
            lacking = acked - set(site)
            assert not lacking, f"{root} lacks acknowledged {sorted(lacking)[:5]}"
        retrieved = self._retrieve(studies, index)
        for sop, data in retrieved.items():
            assert data in self.ledger.allowed(sop), f"{sop} retrieved with other bytes"
        want = {sop for sop in indexed if self.ledger.study_of(sop) in studies}
        assert set(retrieved) == want, f"retrieve missed {sorted(want - set(retrieved))[:5]}"
        self._no_leftovers()

    def _site_contents(self, root: Path) -> dict[str, tuple[str, str, bytes]]:
        """SOP UID -> (study, series, dataset bytes) of every object file on a site; fails on
        anything else beside them (a temp file, a file that does not parse)."""
        found: dict[str, tuple[str, str, bytes]] = {}
        incoming = sorted(p.name for p in (root / ".incoming").iterdir())
        assert incoming == [], f"temp files left in {root}/.incoming: {incoming}"
        for study in root.iterdir():
            if study.name.startswith("."):
                continue
            for series in study.iterdir():
                for f in series.iterdir():
                    assert f.suffix == ".dcm" and not f.name.startswith("."), f"left over: {f}"
                    ts, data = dataset_bytes(f)  # a torn file fails here or below
                    assert ts == EXPLICIT_LE, f
                    assert f.stem in self.ledger.versions, f"unknown object {f}"
                    sop = f.stem
                    v = self.ledger.versions[sop][0]
                    assert (study.name, series.name) == (v.study, v.series), f
                    found[sop] = (study.name, series.name, data)
        return found

    def _retrieve(
        self, studies: set[str], index: dict[str, dict[str, set[str]]]
    ) -> dict[str, bytes]:
        if self.variant.stow:
            return _wado(self.base, {st: index[st] for st in studies if st in index})
        out: dict[str, bytes] = {}
        for st in sorted(studies):
            if st in index:
                out.update(_c_get(self.port, st))
        return out

    def _no_leftovers(self) -> None:
        """No segment, staged file or journal of a dead process is left behind."""
        from pacsgrid.storage.walfile import lock_file, read_header

        for root in self.site_roots():
            wal = root / ".wal"
            for seg in sorted(wal.glob("*.seg")) + sorted(wal.glob("*.new")):
                fd = lock_file(seg)
                if fd is None:
                    continue  # a live process holds it
                try:
                    nonce = read_header(fd)[0]
                finally:
                    os.close(fd)
                assert seg.suffix == ".seg" and nonce == 0, f"{seg} left by a dead process"
            for staged in sorted((wal / "data").glob("*")) if (wal / "data").exists() else []:
                stem, nonce = staged.name.split("-")[:2]
                assert _header_nonce(wal / f"{stem}.seg") == int(nonce, 16), (
                    f"orphan staged file {staged}"
                )
        for journal in sorted((self.data_dir / "journal").glob("*")):
            fd = os.open(journal, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process's journal
            finally:
                os.close(fd)
            raise AssertionError(f"journal of a dead process left: {journal}")

    def final_check(self) -> set[str]:
        """After a clean stop (its final checkpoint): no staged file, no journal, and the index
        counts what the sites hold."""
        from pacsgrid.archive import Archive
        from pacsgrid.settings import Overrides, load_settings

        assert self.server is not None
        assert self.server.stop() == 0, self.server.text()[-3000:]
        for root in self.site_roots():
            staged = sorted((root / ".wal" / "data").glob("*"))
            assert staged == [], f"staged files left after the checkpoint: {staged[:5]}"
        assert sorted((self.data_dir / "journal").glob("*")) == []
        self._no_leftovers()
        sops = set().union(*(self._site_contents(r) for r in self.site_roots()))
        settings = load_settings(
            Overrides(data_dir=self.data_dir, config=self.config()), environ={}
        )
        archive = Archive(settings, probe_interval=0)
        try:
            assert index_of(archive).stats().instances == len(sops)
        finally:
            archive.close()
        return sops


def _header_nonce(segment: Path) -> int:
    from pacsgrid.storage.walfile import read_header

    try:
        fd = os.open(segment, os.O_RDONLY)
    except FileNotFoundError:
        return -1
    try:
        return read_header(fd)[0]
    finally:
        os.close(fd)


def _ready_workers(server: Server, n: int) -> list[int]:
    from tests.test_workers import _workers

    return _workers(server, n)


# ---------------------------------------------------------------- C-FIND, C-GET, WADO-RS


def _find(assoc: Any, **keys: str) -> list[Any]:
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Model

    query = Dataset()
    for k, value in keys.items():
        setattr(query, k, value)
    out = []
    for status, identifier in assoc.send_c_find(query, Model):
        assert status and status.Status in (0x0000, 0xFF00, 0xFF01), status
        if status.Status != 0:
            out.append(identifier)
    return out


def _find_all(port: int) -> dict[str, dict[str, set[str]]]:
    """study -> series -> SOP UIDs, as C-FIND finds them level by level; the counts the study
    and series levels give must match what the levels below find."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Model

    ae = AE(ae_title="CHECKER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(Model)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSGRID")
    assert assoc.is_established
    out: dict[str, dict[str, set[str]]] = {}
    try:
        for st in _find(
            assoc, QueryRetrieveLevel="STUDY", StudyInstanceUID="", NumberOfStudyRelatedInstances=""
        ):
            study = str(st.StudyInstanceUID)
            out[study] = {}
            for se in _find(
                assoc,
                QueryRetrieveLevel="SERIES",
                StudyInstanceUID=study,
                SeriesInstanceUID="",
                NumberOfSeriesRelatedInstances="",
            ):
                series = str(se.SeriesInstanceUID)
                sops = {
                    str(i.SOPInstanceUID)
                    for i in _find(
                        assoc,
                        QueryRetrieveLevel="IMAGE",
                        StudyInstanceUID=study,
                        SeriesInstanceUID=series,
                        SOPInstanceUID="",
                    )
                }
                assert int(se.NumberOfSeriesRelatedInstances) == len(sops), (study, series)
                out[study][series] = sops
            total = sum(len(s) for s in out[study].values())
            assert int(st.NumberOfStudyRelatedInstances) == total, study
    finally:
        assoc.release()
    return out


def _c_get(port: int, study: str) -> dict[str, bytes]:
    """C-GET of a study, taking CT images in explicit VR little endian only (the syntax they
    were sent in): SOP UID -> the dataset bytes as they arrived."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Model

    received: dict[str, bytes] = {}

    def store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(
            include_meta=False
        )
        return 0

    ae = AE(ae_title="CHECKER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(Model)
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="PACSGRID",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        statuses = [s.Status for s, _ in assoc.send_c_get(query, Model) if s]
    finally:
        assoc.release()
    assert statuses and statuses[-1] == 0, (study, statuses)
    return received


def _wado(base: str, index: dict[str, dict[str, set[str]]]) -> dict[str, bytes]:
    """WADO-RS of every instance, as stored (transfer-syntax=*): SOP UID -> dataset bytes."""
    out: dict[str, bytes] = {}
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    for study, series in index.items():
        for se, sops in series.items():
            for sop in sops:
                r = requests.get(
                    f"{base}/dicom-web/studies/{study}/series/{se}/instances/{sop}",
                    headers={"Accept": accept},
                    timeout=60,
                )
                assert r.status_code == 200, (sop, r.status_code, r.text[:300])
                ((_, part),) = parse_multipart(r.headers["Content-Type"], r.content)
                out[sop] = _dataset_of(part)
    return out


def _dataset_of(part10: bytes) -> bytes:
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh = io.BytesIO(part10)
    read_preamble(fh, force=True)
    meta = _read_file_meta_info(fh)
    assert str(meta.TransferSyntaxUID) == EXPLICIT_LE
    return fh.read()


# ---------------------------------------------------------------- the tests


@pytest.fixture
def raw_sends(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """pynetdicom sends a file's dataset bytes as they are (no decoding and re-encoding)."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    yield


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_kills_during_ingest_lose_no_acknowledged_byte(
    variant: Variant, tmp_path: Path, raw_sends: None
) -> None:
    rng = random.Random(f"{SEED}-{variant.name}")
    rig = Rig(variant, tmp_path, rng)
    try:
        rig.start()
        for round_no in range(KILLS):
            rig.check(rig.kill_round(round_no))
        acked = rig.ledger.acknowledged()
        kept = rig.final_check() - acked
    finally:
        if rig.server is not None:
            rig.server.kill()
    assert rig.kills == KILLS and acked
    assert rig.cut_off > 0, "no kill ever cut a store off: the kills missed the write path"
    print(
        f"\n{variant.name}: {rig.kills} kills; {len(acked)} acknowledged instances intact; "
        f"{rig.cut_off} stores cut off by a kill, {len(kept)} of their UIDs kept (durable "
        "before the answer)"
    )


@pytest.mark.slow
def test_a_worker_killed_mid_store_is_replaced_and_its_store_indexed(tmp_path: Path) -> None:
    """SIGKILL one worker while a store waits for its index commit: the server keeps serving,
    the supervisor starts another worker and indexes the object the dead one had written (never
    acknowledged), without a restart, so no object on the site is left out of the index."""
    files = write(Spec(studies=2, series=2, instances=10, size=32, seed="worker"), tmp_path / "src")
    first, second = files[:20], files[20:]
    data_dir = tmp_path / "archive"
    server = Server(data_dir, workers=2).start()
    sender: subprocess.Popen[str] | None = None
    try:
        before = set(_ready_workers(server, 2))
        stored = dcmtk(
            "storescu",
            "-v",
            "-nh",
            "-aec",
            "PACSGRID",
            "127.0.0.1",
            server.port,
            *first,
            check=True,
        )
        acked = {_sop(p) for p in _acknowledged(stored.stdout)}
        assert len(acked) == 20
        # Hold the index's write lock (as a long commit of another process would): the next
        # store is written and durable on the site, then waits for its commit.
        lock = os.open(data_dir / "index.sqlite.writelock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            sender = storescu_started(server.port, second, "-aet", "KILLME")
            wait_until(lambda: _visible(data_dir) == 21, 60, "the blocked store's object")
            pattern = r"\[(\d+)\] pacsgrid\.dicom: association from KILLME@\S+ accepted"
            victim = int(wait_until(lambda: re.search(pattern, server.text()), 60, "KILLME")[1])
            os.kill(victim, signal.SIGKILL)
        finally:
            os.close(lock)  # releases the lock
        output, _ = sender.communicate(timeout=60)
        assert not _acknowledged(output), output[-2000:]  # the blocked store never got success
        wait_until(
            lambda: re.search(
                rf"worker pid {victim}: its site logs and ingest journal replayed "
                r"\(\d+ record\(s\), 1 instance\(s\) indexed\)",
                server.text(),
            ),
            60,
            "the supervisor's replay of the dead worker's log and journal",
        )
        after = set(_ready_workers(server, 2))
        assert victim in before and victim not in after and len(after & before) == 1
        assert _indexed_visible(data_dir, acked) == 21  # the 21st object is indexed
        # The sender retries and the archive takes everything, on the new worker too.
        dcmtk("storescu", "-nh", "-aec", "PACSGRID", "127.0.0.1", server.port, *second, check=True)
        assert _indexed_visible(data_dir, acked) == 40
        assert server.proc is not None and server.proc.poll() is None
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
        server.stop()


def _acknowledged(output: str) -> set[Path]:
    acked, current = set(), None
    for line in output.splitlines():
        m = re.match(r"^I: Sending file: (.+)$", line)
        if m:
            current = Path(m.group(1))
        elif line.startswith("I: Received Store Response (Success)") and current:
            acked.add(current)
            current = None
    return acked


def _sop(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _visible(data_dir: Path) -> int:
    return sum(1 for _ in (data_dir / "objects").glob("*/*/*.dcm"))


def _indexed_visible(data_dir: Path, acked_uids: set[str]) -> int:
    """Every acknowledged instance is indexed and reads back; every visible object is
    indexed; returns how many are visible."""
    from pacsgrid.archive import Archive
    from pacsgrid.settings import Overrides, load_settings

    archive = Archive(load_settings(Overrides(data_dir=data_dir), environ={}), probe_interval=0)
    try:
        for uid in acked_uids:
            record = index_of(archive).instance(uid)
            assert record is not None, f"acknowledged {uid} is not indexed"
            archive.read(record)
        visible = list((data_dir / "objects").glob("*/*/*.dcm"))
        for path in visible:
            assert index_of(archive).has_instance(path.stem), f"orphan object {path}"
        assert index_of(archive).stats().instances == len(visible)
        return len(visible)
    finally:
        archive.close()
