"""The Index contract for the correction log (pacsgrid.correction) on every engine: the order
of corrections, pending ones rolled forward, what they hide and whom studies belong to, the
sources already answered, and the lock that makes one correction at a time.
"""

from __future__ import annotations

import threading
from typing import Any

from pacsgrid.correction import Assign, Correction, Mark, StudyMove, Who
from pacsgrid.index import Index, open_index
from pacsgrid.index.corrections import CorrectionRow, HiddenInstance
from pacsgrid.model import Level
from tests import test_index_contract as contract
from tests.test_index_contract import find, inst
from tests.waiting import wait_until

# The contract's fixtures: every test here runs on SQLite and on PostgreSQL.
engine_url = contract.engine_url
index = contract.index

CT = "1.2.840.10008.5.1.4.1.1.2"


def corr(seq: int, kind: str = "reject", **kw: Any) -> Correction:
    return Correction(seq, kind, "2026-01-01T00:00:00Z", Who(user="admin"), **kw)


def hide(seq: int, *sops: str, study: str = "1.2.3") -> Correction:
    return corr(seq, hide=tuple(Mark(s, seq, study) for s in sops))


def seqs(rows: list[CorrectionRow]) -> list[int]:
    return [r.seq for r in rows]


def test_corrections_are_numbered_listed_newest_first_and_iterated_in_order(
    index: Index,
) -> None:
    assert index.next_correction_seq() == 1
    assert index.corrections() == [] and list(index.iter_corrections()) == []
    for seq in (1, 2, 3):
        assert index.apply_correction(hide(seq, f"1.{seq}")) is True
        assert index.next_correction_seq() == seq + 1
    assert seqs(index.corrections()) == [3, 2, 1]
    assert seqs(index.corrections(limit=1, offset=1)) == [2]
    assert seqs(index.corrections(limit=5, offset=2)) == [1]
    assert seqs(list(index.iter_corrections())) == [1, 2, 3]
    row = index.correction(2)
    assert row is not None and row.doc == hide(2, "1.2")
    assert (row.seq, row.kind, row.state, row.undone_by, row.missing) == (
        2,
        "reject",
        "applied",
        None,
        (),
    )
    assert index.correction(4) is None


def test_iter_corrections_walks_every_correction_across_its_pages(index: Index) -> None:
    """More corrections than one page of the walk (500): each once, in order."""
    for seq in range(1, 503):
        index.add_pending_correction(corr(seq))
    assert seqs(list(index.iter_corrections())) == list(range(1, 503))


def test_pending_correction_is_rolled_forward_once(index: Index) -> None:
    index.add_batch([inst("1.1"), inst("1.2")])
    c = hide(1, "1.1")
    index.add_pending_correction(c)
    assert index.next_correction_seq() == 2  # a pending correction holds its number
    assert index.pending_corrections() == [c]
    row = index.correction(1)
    assert row is not None and row.state == "pending"
    [study] = find(index, Level.STUDY, StudyInstanceUID="1.2.3")
    assert study["NumberOfStudyRelatedInstances"] == "2"  # not applied yet
    assert index.apply_correction(c, missing=["b"]) is True
    assert index.pending_corrections() == []
    row = index.correction(1)
    assert row is not None and (row.state, row.missing) == ("applied", ("b",))
    [study] = find(index, Level.STUDY, StudyInstanceUID="1.2.3")
    assert study["NumberOfStudyRelatedInstances"] == "1"
    assert index.apply_correction(c) is False  # applied already: nothing happens again
    row = index.correction(1)
    assert row is not None and row.missing == ("b",)


def test_corrections_missing_on_sites_listed_oldest_first_until_cleared(index: Index) -> None:
    index.apply_correction(hide(1, "1.1"), missing=["b", "c"])
    index.apply_correction(hide(2, "1.2"))
    index.apply_correction(hide(3, "1.3"), missing=["c"])
    assert seqs(index.corrections(missing_only=True)) == [1, 3]
    assert seqs(index.corrections(limit=1, missing_only=True)) == [1]
    index.set_correction_missing(1, ["c"])
    row = index.correction(1)
    assert row is not None and row.missing == ("c",)
    index.set_correction_missing(1, [])
    assert seqs(index.corrections(missing_only=True)) == [3]
    row = index.correction(1)
    assert row is not None and row.missing == ()


def test_later_corrections_name_what_touches_the_same_subjects_and_is_not_undone(
    index: Index,
) -> None:
    index.apply_correction(hide(1, "1.1"))
    index.apply_correction(hide(2, "1.2"))
    index.apply_correction(corr(3, "undo", undoes=1, show=(Mark("1.1", 1, "1.2.3"),)))
    index.apply_correction(hide(4, "1.2", "1.4"))
    row = index.correction(1)
    assert row is not None and row.undone_by == 3
    # 1 is undone: not listed; 3 touches 1.1 after 0
    assert index.later_corrections(0, ["sop:1.1"]) == [(3, "undo", 1)]
    assert index.later_corrections(1, ["sop:1.1", "sop:1.2"]) == [
        (2, "reject", 0),
        (3, "undo", 1),
        (4, "reject", 0),
    ]
    assert index.later_corrections(2, ["sop:1.2"]) == [(4, "reject", 0)]
    assert index.later_corrections(4, ["sop:1.2", "sop:1.4"]) == []
    assert index.later_corrections(0, ["sop:9.9"]) == []


def test_hidden_instances_listed_newest_correction_first_and_shown_again(index: Index) -> None:
    index.add_batch([inst("1.1"), inst("1.2"), inst("2.1", "2.2", "2.2.1")])
    index.apply_correction(hide(1, "1.1", "9.9", study="1.2.3"))  # 9.9 has not arrived
    index.apply_correction(hide(2, "2.1", study="2.2"))
    one = HiddenInstance("1.1", 1, "1.2.3", "1.2.3.1", CT, True)
    absent = HiddenInstance("9.9", 1, "1.2.3", "", "", False)
    other = HiddenInstance("2.1", 2, "2.2", "2.2.1", CT, True)
    assert index.hidden_instances() == [other, one, absent]
    assert index.hidden_instances(limit=1, offset=1) == [one]
    assert index.hidden_instances(by=1) == [one, absent]
    assert index.hidden_instances(study_uid="2.2") == [other]
    assert index.hiding(["1.1", "1.2", "2.1", "9.9"]) == [
        ("1.1", 1, "1.2.3"),
        ("9.9", 1, "1.2.3"),
        ("2.1", 2, "2.2"),
    ]
    assert index.hiding([]) == []
    # Hidden: left out of what a query counts and of what a retrieve sends.
    [study] = find(index, Level.STUDY, StudyInstanceUID="1.2.3")
    assert study["NumberOfStudyRelatedInstances"] == "1"
    assert find(index, Level.STUDY, StudyInstanceUID="2.2") == []
    assert index.stats().instances == 3  # still stored, and counted as stored
    index.apply_correction(corr(3, "unhide", show=(Mark("1.1", 1, "1.2.3"),)))
    assert index.hidden_instances() == [other, absent]
    assert index.hiding(["1.1"]) == []
    [study] = find(index, Level.STUDY, StudyInstanceUID="1.2.3")
    assert study["NumberOfStudyRelatedInstances"] == "2"


def test_purged_instances_leave_the_index_with_their_copies(index: Index) -> None:
    index.add_batch([inst("1.1", sites=("a", "b")), inst("1.2", sites=("a", "b"))])
    index.apply_correction(hide(1, "1.1"))
    index.apply_correction(corr(2, "purge", purge=(Mark("1.1", 1, "1.2.3"),)))
    assert not index.has_instance("1.1") and index.instance("1.1") is None
    assert index.site_bytes("a") == 100 and index.stats().instances == 1
    assert [p[1] for p in index.copy_pages(0, 10)] == ["1.2", "1.2"]
    [study] = find(index, Level.STUDY, StudyInstanceUID="1.2.3")
    assert study["NumberOfStudyRelatedInstances"] == "1"


def _values(pid: str, name: str) -> dict[str, str]:
    return {
        "PatientID": pid,
        "IssuerOfPatientID": "",
        "PatientName": name,
        "PatientBirthDate": "",
        "PatientSex": "",
    }


def test_study_moved_to_another_patient_answers_with_that_patient(index: Index) -> None:
    index.add_batch(
        [
            inst("1.1", "9.1", "9.1.1", pid="P1"),
            inst("1.2", "9.1", "9.1.1", pid="P1"),
            inst("2.1", "9.2", "9.2.1", pid="P2", name="ROE^RICHARD"),
        ]
    )
    assert index.study_patient("9.1") == _values("P1", "DOE^JANE")
    assert index.patient("P2", "") == _values("P2", "ROE^RICHARD")
    assert index.patient("P2", "OTHER") is None and index.patient("P9", "") is None
    assert index.study_patient("9.9") is None
    move = Assign(
        _values("P2", "ROE^RICHARD^J"),  # the target's name corrected too
        (StudyMove("9.1", _values("P1", "DOE^JANE")),),
    )
    index.apply_correction(corr(1, "move-study", assign=(move,)))
    assert index.study_patient("9.1") == _values("P2", "ROE^RICHARD^J")
    assert index.patient("P2", "") == _values("P2", "ROE^RICHARD^J")
    assert index.patient_studies("P2", "") == ["9.1", "9.2"]  # in the order they arrived
    assert index.patient_studies("P1", "") == []
    patients = {p["PatientID"]: p for p in find(index, Level.PATIENT, PatientID="P*")}
    assert patients["P2"]["NumberOfPatientRelatedStudies"] == "2"
    assert patients["P2"]["NumberOfPatientRelatedInstances"] == "3"
    # Moved to a patient the index did not know: a new patient row.
    back = Assign(_values("P3", "NEW^ONE"), (StudyMove("9.2", _values("P2", "ROE^RICHARD")),))
    index.apply_correction(corr(2, "move-study", assign=(back,)))
    assert index.patient("P3", "") == _values("P3", "NEW^ONE")
    assert index.patient_studies("P3", "") == ["9.2"]
    assert index.patient_studies("P2", "") == ["9.1"]


def test_a_source_is_answered_once_and_remembers_its_correction(index: Index) -> None:
    assert index.source_outcome("hl7:APP|FAC|1") is None
    index.record_source("hl7:APP|FAC|1", "nothing to change")
    index.record_source("hl7:APP|FAC|1", "other")  # a second copy: the first answer stays
    assert index.source_outcome("hl7:APP|FAC|1") == ("nothing to change", None)
    index.apply_correction(corr(1, source="hl7:APP|FAC|2"))
    assert index.source_outcome("hl7:APP|FAC|2") == ("applied", 1)
    assert index.source_outcome("hl7:APP|FAC|3") is None


def test_corrections_lock_is_held_by_one_index_at_a_time(engine_url: str) -> None:
    """Two handles on one index (two processes or nodes): the second waits for the lock
    until the first lets it go."""
    first, second = open_index(engine_url), open_index(engine_url)
    got = threading.Event()
    release = threading.Event()

    def take() -> None:
        with second.corrections_lock():
            got.set()
            release.wait(60)

    try:
        with first.corrections_lock():
            t = threading.Thread(target=take, daemon=True)
            t.start()
            # Not a timing assertion: whatever the wait, the second must not get in.
            assert not got.wait(1.0), "the lock was taken twice"
        wait_until(got.is_set, 60, "the second handle took the lock")
        release.set()
        t.join(60)
        with first.corrections_lock():  # released again by the second
            pass
    finally:
        release.set()
        first.close()
        second.close()


def test_lookups_of_many_instances_reach_every_one_beyond_one_statement(index: Index) -> None:
    """More instances than one statement takes (the engines work in chunks of 500)."""
    sops = [f"1.{i}" for i in range(1201)]
    index.apply_correction(hide(1, *sops))
    index.apply_correction(hide(2, sops[499]))  # the last of the first chunk
    # Every hide row once (their order across the chunks is not part of the contract).
    assert sorted(index.hiding(sops)) == sorted(
        [(s, 1, "1.2.3") for s in sops] + [(sops[499], 2, "1.2.3")]
    )
    assert index.later_corrections(0, [f"sop:{s}" for s in sops]) == [
        (1, "reject", 0),
        (2, "reject", 0),
    ]
