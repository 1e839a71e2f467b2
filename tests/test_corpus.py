"""The test corpus covers every class of input, with or without ../shared.

A fresh clone has no ../shared/testdata: then the corpus is pydicom's and pynetdicom's files
plus what tests/synthetic.py writes. Either way, the tests that store, find, retrieve, import
and migrate the corpus meet every class below; this test fails when a class is left empty
(run it with PACSGRID_TEST_CORPUS=/nonexistent to check the fresh-clone corpus).
"""

from __future__ import annotations

import pydicom
import pytest

from tests.corpus import CLASSES, DATASET_MISMATCH, accepted, corpus, in_class, invalid

GOOD = ("plain", "compressed", "non-Latin character set", "multi-frame", "vendor")


@pytest.mark.parametrize("name", CLASSES)
def test_every_input_class_has_files(name: str) -> None:
    files = in_class(name)
    assert files, f"no {name} file in the corpus"
    if name in GOOD:
        assert [f for f in files if f.accepted], f"no {name} file the archive must accept"


def test_expected_statuses_come_from_outside_pacsgrid() -> None:
    """Every file expected to get A900 lacks a required UID as pydicom reads it."""
    for f in invalid():
        if f.status != DATASET_MISMATCH:
            continue
        ds = pydicom.dcmread(f.path, force=True, stop_before_pixels=True)
        uids = [ds.get(k) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
        assert not all(uids), f.path


def test_accepted_files_have_their_uids() -> None:
    for f in accepted():
        assert f.sop_class_uid and f.sop_uid and f.study_uid and f.transfer_syntax, f.path
    assert len({f.path for f in corpus()}) == len(corpus())
