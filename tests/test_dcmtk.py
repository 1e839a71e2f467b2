"""The archive as real DICOM clients see it: DCMTK echoscu, storescu, findscu, movescu, getscu.

One archive is loaded with the whole corpus by storescu (each file in its own transfer syntax);
then every C-FIND level and matching type is compared with an independent model of what was
stored, and every study is retrieved with movescu (to DCMTK storescp) and getscu.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests import oracle
from tests.conftest import Server, StoreSCP, dcmtk, getscu_study, move_study
from tests.corpus import accepted, dataset_bytes, pixel_data
from tests.dcmtk_store import StoreRun, store_with_storescu

pytestmark = pytest.mark.dcmtk

PEERS = ("FINDSCU", "MOVESCU", "GETSCU")


@dataclass
class Loaded:
    server: Server
    scp: StoreSCP
    implicit_scp: StoreSCP  # accepts implicit VR little endian only
    run: StoreRun
    model: oracle.Model
    workdir: Path

    def stored_object(self, sop_uid: str) -> Path:
        from pacsgrid.index.sqlite import SqliteIndex

        index = SqliteIndex(self.server.data_dir / "index.sqlite")
        try:
            record = index.instance(sop_uid)
        finally:
            index.close()
        assert record is not None, sop_uid
        return self.server.data_dir / "objects" / record.copies[0].key


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    work = tmp_path_factory.mktemp("dcmtk")
    scp = StoreSCP(work / "move-destination").start()
    implicit = ("+xi", "+B", "-pm", "-v")
    implicit_scp = StoreSCP(work / "implicit-destination", "IMPLICITSCP", options=implicit).start()
    peers = [a for p in PEERS for a in ("--peer", f"{p}@127.0.0.1:9")]
    server = Server(
        work / "archive",
        args=(
            *peers,
            "--peer",
            f"STORESCP@127.0.0.1:{scp.port}",
            "--peer",
            f"IMPLICITSCP@127.0.0.1:{implicit_scp.port}",
        ),
    ).start()
    run = store_with_storescu(server.port, accepted(), work)
    model = oracle.build(run.stored)
    yield Loaded(server, scp, implicit_scp, run, model, work)
    server.stop()
    scp.stop()
    implicit_scp.stop()


def test_echoscu(loaded: Loaded) -> None:
    proc = dcmtk("echoscu", "-v", "-aec", "PACSGRID", "127.0.0.1", loaded.server.port)
    assert proc.returncode == 0, proc.stdout
    assert "Received Echo Response (Success)" in proc.stdout


def test_storescu_stores_every_valid_file(loaded: Loaded) -> None:
    run = loaded.run
    assert not run.failed, f"the archive refused valid files: {run.failed}"
    sent = set(run.stored) | set(run.unreadable)
    missing = [f.path for f in accepted() if f.path not in sent]
    assert not missing, f"storescu never sent: {missing}"
    # DCMTK itself cannot read a few files of the corpus; the pynetdicom tests store those.
    assert len(run.unreadable) <= len(accepted()) // 10
    from pacsgrid.index.sqlite import SqliteIndex

    index = SqliteIndex(loaded.server.data_dir / "index.sqlite")
    try:
        stats = index.stats()
    finally:
        index.close()
    assert stats.instances == len(loaded.model.instances)
    assert stats.studies == len(loaded.model.studies)
    assert stats.series == len(loaded.model.series)
    print(
        f"\nstorescu: {len(run.stored)} files sent and acknowledged, "
        f"{len(loaded.model.instances)} distinct instances stored, "
        f"{len(run.unreadable)} files DCMTK could not read"
    )


def test_stored_objects_are_the_received_bytes(loaded: Loaded, tmp_path: Path) -> None:
    """The archive stores exactly what storescu sent: the same files sent to DCMTK's own
    storescp in bit-preserving mode arrive with the same dataset bytes as pacsgrid stored.
    (storescu re-encodes some files while sending, so the original files can differ.)"""
    scp = StoreSCP(tmp_path / "reference").start()
    try:
        winners = [f for f in accepted() if f.path in set(loaded.model.files.values())]
        ref_run = store_with_storescu(scp.port, winners, tmp_path, aet="STORESCU")
        reference = received(scp.out)
    finally:
        scp.stop()
    assert not ref_run.failed
    assert set(reference) == set(loaded.model.files)
    identical_to_original = 0
    for sop, path in loaded.model.files.items():
        stored = loaded.stored_object(sop)
        assert dataset_bytes(stored) == dataset_bytes(reference[sop]), path
        assert pixel_data(stored) == pixel_data(path), path
        identical_to_original += dataset_bytes(stored) == dataset_bytes(path)
    print(
        f"\n{len(reference)} stored datasets equal what storescu sent to storescp; "
        f"{identical_to_original} also equal the original file byte for byte"
    )


# ---------------------------------------------------------------- C-FIND


def findscu(
    loaded: Loaded, model: str, level: str, keys: dict[str, str], name: str
) -> list[pydicom.Dataset]:
    out = loaded.workdir / "find" / name
    out.mkdir(parents=True)
    args = [
        model,
        "-X",
        "-od",
        out,
        "-aet",
        "FINDSCU",
        "-aec",
        "PACSGRID",
        "-k",
        f"QueryRetrieveLevel={level}",
    ]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v is not None else k]
    proc = dcmtk("findscu", *args, "127.0.0.1", loaded.server.port)
    assert proc.returncode == 0, proc.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def uids(responses: list[pydicom.Dataset], keyword: str) -> list[str]:
    return [str(r.get(keyword, "")) for r in responses]


def expected(rows: dict[str, dict[str, str]], conditions: dict[str, tuple[str, str]]) -> set[str]:
    """Keys of `rows` whose values match every (value, vr) condition."""
    return {
        uid
        for uid, row in rows.items()
        if all(oracle.matches(row.get(k, ""), v, vr) for k, (v, vr) in conditions.items())
    }


def pick(values: list[str]) -> str:
    return sorted(v for v in values if v)[len([v for v in values if v]) // 2]


def test_find_study_level_every_matching_type(loaded: Loaded) -> None:
    m = loaded.model
    studies = m.studies
    dates = [s["StudyDate"] for s in studies.values() if s["StudyDate"]]
    date = pick(dates)
    lo, hi = sorted(dates)[len(dates) // 4], sorted(dates)[3 * len(dates) // 4]
    three = sorted(studies)[:3]
    name = pick([s["PatientName"] for s in studies.values()])
    pid = pick([s["PatientID"] for s in studies.values()])
    times = [s["StudyTime"].replace(":", "") for s in studies.values() if s["StudyTime"]]
    cases = {
        "universal": {},
        "single_date": {"StudyDate": (date, "DA")},
        "date_range": {"StudyDate": (f"{lo}-{hi}", "DA")},
        "open_range": {"StudyDate": (f"{lo}-", "DA")},
        "uid_list": {"StudyInstanceUID": ("\\".join(three), "UI")},
        "patient_id": {"PatientID": (pid, "LO")},
        "name_prefix": {"PatientName": (name[:3] + "*", "PN")},
        "name_any_case": {"PatientName": (name.lower(), "PN")},
        "name_question_mark": {"PatientName": ("?" + name[1:], "PN")},
        "time_range": {"StudyTime": (f"{pick(times)[:4]}-", "TM")},
    }
    for label, cond in cases.items():
        keys = {k: v for k, (v, _) in cond.items()}
        keys.setdefault("StudyInstanceUID", "")
        rsp = findscu(loaded, "-S", "STUDY", keys, f"study-{label}")
        got = uids(rsp, "StudyInstanceUID")
        assert len(got) == len(set(got)), f"{label}: one response per study"
        assert set(got) == expected(studies, cond), label
        assert all(r.QueryRetrieveLevel == "STUDY" for r in rsp)


def test_find_study_counts_and_modalities(loaded: Loaded) -> None:
    rsp = findscu(
        loaded,
        "-S",
        "STUDY",
        {
            "StudyInstanceUID": "",
            "ModalitiesInStudy": "",
            "NumberOfStudyRelatedSeries": "",
            "NumberOfStudyRelatedInstances": "",
        },
        "counts",
    )
    want = oracle.counts(loaded.model)
    assert len(rsp) == len(loaded.model.studies)
    for r in rsp:
        c = want[r.StudyInstanceUID]
        assert int(r.NumberOfStudyRelatedInstances) == c["n"]
        assert int(r.NumberOfStudyRelatedSeries) == len(c["series"])
        mods = r.get("ModalitiesInStudy")
        got = set() if not mods else ({mods} if isinstance(mods, str) else set(mods))
        assert got == c["mods"], r.StudyInstanceUID
    ct = findscu(
        loaded, "-S", "STUDY", {"StudyInstanceUID": "", "ModalitiesInStudy": "CT"}, "mod-ct"
    )
    assert set(uids(ct, "StudyInstanceUID")) == {k for k, c in want.items() if "CT" in c["mods"]}


def test_find_patient_level(loaded: Loaded) -> None:
    patients = loaded.model.patients
    rsp = findscu(
        loaded,
        "-P",
        "PATIENT",
        {"PatientID": "", "PatientName": "", "NumberOfPatientRelatedStudies": ""},
        "patients",
    )
    assert sorted(uids(rsp, "PatientID")) == sorted(p["PatientID"] for p in patients.values())
    pid = pick([p["PatientID"] for p in patients.values()])
    one = findscu(loaded, "-P", "PATIENT", {"PatientID": pid, "PatientName": ""}, "patient-one")
    assert uids(one, "PatientID") == [pid]
    n_studies = sum(1 for s in loaded.model.studies.values() if s["PatientID"] == pid)
    one = findscu(
        loaded,
        "-P",
        "PATIENT",
        {"PatientID": pid, "NumberOfPatientRelatedStudies": ""},
        "patient-n",
    )
    assert int(one[0].NumberOfPatientRelatedStudies) == n_studies


def test_find_series_and_image_levels(loaded: Loaded) -> None:
    m = loaded.model
    counts = oracle.counts(m)
    study = max(counts, key=lambda s: len(counts[s]["series"]))
    rsp = findscu(
        loaded,
        "-S",
        "SERIES",
        {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": "",
            "Modality": "",
            "NumberOfSeriesRelatedInstances": "",
        },
        "series",
    )
    want = {k for k, v in m.series.items() if v["StudyInstanceUID"] == study}
    assert set(uids(rsp, "SeriesInstanceUID")) == want
    for r in rsp:
        n = sum(1 for i in m.instances.values() if i["SeriesInstanceUID"] == r.SeriesInstanceUID)
        assert int(r.NumberOfSeriesRelatedInstances) == n
    modality = m.series[sorted(want)[0]]["Modality"]
    rsp = findscu(
        loaded, "-S", "SERIES", {"SeriesInstanceUID": "", "Modality": modality}, "series-modality"
    )
    assert set(uids(rsp, "SeriesInstanceUID")) == expected(m.series, {"Modality": (modality, "CS")})
    series_uid = max(
        m.series, key=lambda s: sum(1 for i in m.instances.values() if i["SeriesInstanceUID"] == s)
    )
    rsp = findscu(
        loaded,
        "-S",
        "IMAGE",
        {
            "StudyInstanceUID": m.series[series_uid]["StudyInstanceUID"],
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": "",
            "SOPClassUID": "",
            "InstanceNumber": "",
        },
        "images",
    )
    want = {k for k, v in m.instances.items() if v["SeriesInstanceUID"] == series_uid}
    assert set(uids(rsp, "SOPInstanceUID")) == want
    two = sorted(want)[:2]
    rsp = findscu(loaded, "-S", "IMAGE", {"SOPInstanceUID": "\\".join(two)}, "image-list")
    assert sorted(uids(rsp, "SOPInstanceUID")) == two


def test_find_refused_to_unknown_calling_ae(loaded: Loaded) -> None:
    proc = dcmtk(
        "findscu",
        "-S",
        "-aet",
        "STRANGER",
        "-aec",
        "PACSGRID",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "127.0.0.1",
        loaded.server.port,
    )
    assert proc.returncode != 0
    assert "No Acceptable Presentation Contexts" in proc.stdout
    assert "STRANGER@127.0.0.1 may not find" in loaded.server.text()


# ---------------------------------------------------------------- C-MOVE and C-GET


def received(folder: Path) -> dict[str, Path]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in folder.iterdir():
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
            out[str(ds.SOPInstanceUID)] = p
    return out


def check_retrieved(loaded: Loaded, got: dict[str, Path]) -> int:
    """Same SOP UIDs and pixel data as the originals; same dataset bytes as stored when the
    transfer syntax did not change. Returns how many needed no conversion."""
    same = 0
    for sop, path in got.items():
        assert (
            pixel_data(path) == pixel_data(loaded.model.files[sop])
            or dataset_bytes(path)[0] != dataset_bytes(loaded.stored_object(sop))[0]
        ), sop
        ts_got, body_got = dataset_bytes(path)
        ts_stored, body_stored = dataset_bytes(loaded.stored_object(sop))
        if ts_got == ts_stored:
            assert body_got == body_stored, f"{sop}: bytes changed without a conversion"
            same += 1
    return same


def test_movescu_every_study_to_storescp(loaded: Loaded) -> None:
    total = same = 0
    for study in sorted(loaded.model.studies):
        loaded.scp.clear()
        proc = move_study(loaded.server.port, study)
        assert proc.returncode == 0, proc.stdout
        assert "Received Final Move Response (Success)" in proc.stdout, proc.stdout
        got = received(loaded.scp.out)
        assert set(got) == loaded.model.study_instances(study)
        same += check_retrieved(loaded, got)
        total += len(got)
    assert total == len(loaded.model.instances)
    print(
        f"\nmovescu: {total} instances retrieved in {len(loaded.model.studies)} studies, "
        f"{same} without conversion"
    )


@pytest.mark.slow
def test_getscu_every_study(loaded: Loaded, tmp_path: Path) -> None:
    """getscu proposes a fixed list of storage SOP classes, uncompressed syntaxes first: what
    it cannot take (private classes, compressed data pydicom cannot decode) must come back as
    failed sub-operations, the rest as files."""
    total = failed = 0
    for n, study in enumerate(sorted(loaded.model.studies)):
        out = tmp_path / f"get{n}"
        out.mkdir()
        proc = getscu_study(loaded.server.port, study, out)
        got = received(out)
        assert set(got) <= loaded.model.study_instances(study)
        check_retrieved(loaded, got)
        missing = len(loaded.model.study_instances(study)) - len(got)
        if missing:
            assert f"Number of Failed Suboperations    : {missing}" in proc.stdout, proc.stdout
        failed += missing
        total += len(got)
    assert total >= len(loaded.model.instances) * 0.75
    print(f"\ngetscu: {total} instances retrieved, {failed} reported as failed sub-operations")


@pytest.mark.slow
def test_move_to_an_implicit_only_receiver_converts(loaded: Loaded) -> None:
    """A receiver that takes only implicit VR little endian gets converted copies of what
    pydicom can convert, and failed sub-operations for the rest (e.g. JPEG without a decoder),
    never silence."""
    lossless = {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
    }
    failed_total = 0
    for study in sorted(loaded.model.studies):
        loaded.implicit_scp.clear()
        proc = dcmtk(
            "movescu",
            "-v",
            "-S",
            "-aet",
            "MOVESCU",
            "-aec",
            "PACSGRID",
            "-aem",
            "IMPLICITSCP",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            loaded.server.port,
        )
        got = received(loaded.implicit_scp.out)
        want = loaded.model.study_instances(study)
        assert set(got) <= want
        for sop, path in got.items():
            assert dataset_bytes(path)[0] == "1.2.840.10008.1.2"
            stored_ts = dataset_bytes(loaded.stored_object(sop))[0]
            original = pydicom.dcmread(loaded.model.files[sop], force=True)
            if stored_ts in lossless and "PixelData" in original:
                import numpy as np

                assert np.array_equal(pydicom.dcmread(path).pixel_array, original.pixel_array), sop
        failed_total += len(want - set(got))
        if want - set(got):
            assert (
                "SubOperationsCompleteOneOrMoreFailures" in proc.stdout
                or "OutOfResourcesSubOperations" in proc.stdout
            ), proc.stdout
        else:
            assert "Received Final Move Response (Success)" in proc.stdout, proc.stdout
    # With pylibjpeg installed, pydicom decodes nearly the whole corpus; what it cannot
    # (corrupt or exotic codestreams) was reported above as failed sub-operations.
    assert failed_total <= len(loaded.model.instances) // 10
    print(f"\nmove to an implicit-only receiver: {failed_total} could not be converted")


def test_move_to_unknown_destination_is_refused(loaded: Loaded) -> None:
    study = sorted(loaded.model.studies)[0]
    proc = dcmtk(
        "movescu",
        "-v",
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        "PACSGRID",
        "-aem",
        "NOWHERE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "127.0.0.1",
        loaded.server.port,
    )
    assert "Refused: MoveDestinationUnknown" in proc.stdout, proc.stdout
    assert "'NOWHERE' is not a configured peer" in loaded.server.text()


def test_move_from_unknown_ae_is_refused(loaded: Loaded) -> None:
    study = sorted(loaded.model.studies)[0]
    proc = dcmtk(
        "movescu",
        "-v",
        "-S",
        "-aet",
        "STRANGER",
        "-aec",
        "PACSGRID",
        "-aem",
        "STORESCP",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "127.0.0.1",
        loaded.server.port,
    )
    assert proc.returncode != 0
    assert "No Acceptable Presentation Contexts" in proc.stdout
    assert "STRANGER@127.0.0.1 may not move" in loaded.server.text()
