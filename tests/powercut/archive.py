"""The archive's workload on the rig, recorded once: `pacsgrid serve` with its data folder
(SQLite index, filesystem site, ingest journal) on the recording filesystem, and several
pynetdicom associations storing synthetic instances with fresh UIDs at the same time.

For every instance the recording keeps the exact dataset bytes sent (pynetdicom sends a file's
dataset as it is on disk, without decoding it) and the mark (history.position) read the moment
its C-STORE response said Success. Halfway the server is stopped cleanly and started again
(a SQLite checkpoint, a shutdown and a start-up recovery inside the history), and from then on
it stages every object in its own file instead of copying it into its log record (the path of
large objects); at the end it is SIGKILLed, and the filesystem unmounted.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage

from bench.synth import Spec, write
from tests.peers import Server
from tests.powercut.history import position
from tests.powercut.mount import Mount

DATA = "archive"  # the data folder's name under the mount point (and in every cut)
SENDER = "MODALITY"
# Checkpoints of the site logs every 2 s instead of 30, so that a recording of ~10 s holds
# several (files and folders flushed, index flushed, log segments reused) among its cuts.
ARCHIVE_ENV = {"PACSGRID_DURABILITY_CHECKPOINT_SECONDS": "2"}
# The second half of the recording stages every object (written once into the log's staging
# folder, the path of large objects) instead of copying it into its log record.
STAGED_ENV = {"PACSGRID_DURABILITY_INLINE_KB": "0"}


@dataclass(frozen=True)
class Sent:
    sop_uid: str
    study_uid: str
    path: str  # the Part 10 file whose dataset was sent
    offset: int  # where its dataset starts
    transfer_syntax: str
    mark: int  # history position when Success arrived; -1: never acknowledged

    def dataset(self) -> bytes:
        return Path(self.path).read_bytes()[self.offset :]


@dataclass
class Recording:
    root: Path
    sent: list[Sent]

    @property
    def history(self) -> Path:
        return self.root / "history.log"

    def save(self) -> None:
        doc = {"sent": [asdict(s) for s in self.sent]}
        (self.root / "recording.json").write_text(json.dumps(doc, indent=1))

    @classmethod
    def load(cls, root: Path) -> Recording:
        doc = json.loads((root / "recording.json").read_text())
        return cls(root, [Sent(**s) for s in doc["sent"]])


def record(
    root: Path,
    *,
    seed: int,
    senders: int = 3,
    per_sender: int = 24,
    env: dict[str, str] | None = None,
) -> Recording:
    """Run the workload on the rig under `root` and return what was sent and acknowledged.

    `env` goes to the server process (e.g. PYTHONPATH of a build that skips a flush);
    `{site}` in a value is replaced by the site's folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    spec = Spec(
        studies=senders,
        series=2,
        instances=per_sender // 2,
        size=64,  # 8 KiB of pixel data: every object spans several 4 KiB blocks
        seed=f"powercut-{seed}-{uuid.uuid4().hex}",  # fresh UIDs on every run
    )
    files = write(spec, root / "src")
    mnt = root / "mnt"
    recording = Recording(root, [])
    with Mount(root / "backing", mnt, root / "history.log"):
        halves = [files[0::2], files[1::2]]
        site = str(mnt / DATA / "objects")
        env = {k: v.replace("{site}", site) for k, v in {**ARCHIVE_ENV, **(env or {})}.items()}
        server = Server(mnt / DATA, workers=2, env=env)
        server.log = root / "serve-recording.log"  # not on the rig: not part of the history
        for n, half in enumerate(halves):
            if n == 1:
                server.env = {**server.env, **STAGED_ENV}
            server.start(timeout=120)
            try:
                recording.sent += _send(server.port, half, senders, recording.history)
            finally:
                if n == len(halves) - 1:
                    server.kill()  # the power cut: nothing after this reaches the disk
                else:
                    server.stop()  # a clean stop: checkpoint, journal closed
    recording.save()
    return recording


def _send(port: int, files: list[Path], senders: int, history: Path) -> list[Sent]:
    """`senders` associations at once, each storing its share of `files`."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's dataset bytes as they are
    out: list[Sent] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(share: list[Path]) -> None:
        try:
            ae = AE(ae_title=SENDER)
            ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
            assoc = ae.associate("127.0.0.1", port, ae_title="PACSGRID")
            if not assoc.is_established:
                raise RuntimeError("the archive refused the association")
            try:
                for path in share:
                    status = assoc.send_c_store(path)
                    acked = "Status" in status and status.Status == 0
                    mark = position(history) if acked else -1
                    with lock:
                        out.append(_sent(path, mark))
            finally:
                assoc.release()
        except BaseException as e:  # reported by the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(files[i::senders],)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _sent(path: Path, mark: int) -> Sent:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    _, offset = split_dataset(path)
    return Sent(
        str(ds.SOPInstanceUID),
        str(ds.StudyInstanceUID),
        str(path),
        offset,
        str(ds.file_meta.TransferSyntaxUID),
        mark,
    )
