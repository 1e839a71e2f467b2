"""The folder ledger under random histories (Hypothesis): whatever happens to a legacy folder
between passes (files added, rewritten, touched, removed, renamed), each pass reads exactly the
files that are new or changed, reports each removal once, and the archive keeps every instance
it ever stored."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pacsgrid.archive import Archive
from pacsgrid.migrate.folder import migrate_pass
from pacsgrid.settings import Overrides, load_settings

STUDY = generate_uid()
SERIES = generate_uid()


def write_instance(path: Path, sop_uid: str) -> None:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.PatientID = "P1"
    ds.Modality = "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


NAMES = [f"d{i % 3}/f{i}.dcm" for i in range(8)]
OPS = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "rewrite", "touch", "remove", "junk"]), st.sampled_from(NAMES)
        ),
        max_size=6,
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=OPS)
def test_each_pass_reads_exactly_what_changed(history: list[list[tuple[str, str]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "legacy"
        root.mkdir()
        archive = Archive(
            load_settings(Overrides(data_dir=Path(tmp) / "archive"), environ={}), probe_interval=0
        )
        try:
            stored: set[str] = set()  # every UID a pass has seen in the folder
            current: dict[str, str] = {}  # name -> SOP Instance UID ('' for junk)
            tick = 1_000_000_000
            migrate_pass(archive, root)
            for step in history:
                before = set(current)
                changed: set[str] = set()
                for op, name in step:
                    path = root / name
                    tick += 1_000_000_000
                    if op == "remove":
                        if path.exists():
                            path.unlink()
                            del current[name]
                            changed.discard(name)
                        continue
                    if op == "touch" and not path.exists():
                        continue
                    if op in ("add", "rewrite"):
                        current[name] = generate_uid()
                        write_instance(path, current[name])
                    elif op == "junk":
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(os.urandom(64))
                        current[name] = ""
                    os.utime(path, ns=(tick, tick))
                    changed.add(name)
                summary = migrate_pass(archive, root)
                stored |= {uid for uid in current.values() if uid}
                assert summary.read == len(changed), (step, summary)
                assert summary.seen == len(current)
                assert set(summary.removed) == before - set(current)
                assert migrate_pass(archive, root).read == 0  # nothing changed since
                assert archive.has_instances(sorted(stored)) == stored  # never deleted
        finally:
            archive.close()
