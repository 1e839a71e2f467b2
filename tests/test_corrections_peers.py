"""Corrections as real peers see them: `pacsgrid serve` (two DICOM workers, the web face, the
HL7 listener) with DCMTK storescu, findscu, getscu and movescu (to DCMTK storescp), HTTP
clients for QIDO-RS, WADO-RS and the admin API, and HL7 ADT messages sent over TCP with MLLP
framing.

- a rejection note received by C-STORE hides the instances it references from C-FIND, C-MOVE,
  C-GET, QIDO-RS and WADO-RS, and is itself found;
- an ADT^A40 merge makes the merged patient's studies answer under the surviving PatientID,
  and C-GET sends them with that PatientID while the stored files do not change;
- undo (through the admin API) restores the original answers and the original bytes;
- after the index is deleted and `pacsgrid reindex` rebuilds it from the site, the merge and
  the rejection still hold, and an HL7 message sent again is not applied twice;
- HL7 messages are answered in order, AE or AR with a reason when they cannot be applied.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests

from bench import synth
from tests.conftest import Server, StoreSCP, dcmtk, free_port, move_study, pacsgrid_cli
from tests.iocm import Mllp, adt, rejection_note
from tests.web_helpers import multipart_body, parse_multipart, wait_http

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

PEERS = ("FINDSCU", "GETSCU", "MOVESCU")
URL = "00081190"  # RetrieveURL: names the web port, which a restart changes


@dataclass
class Peers:
    server: Server
    scp: StoreSCP
    base: str  # http://127.0.0.1:PORT
    hl7: int  # MLLP port
    files: dict[str, list[Path]]  # PatientID -> files of the patient's study
    work: Path

    @property
    def site(self) -> Path:
        return self.server.data_dir / "objects"


def start(work: Path, scp: StoreSCP) -> tuple[Server, str, int]:
    http, hl7 = free_port(), free_port()
    peers = [a for p in PEERS for a in ("--peer", f"{p}@127.0.0.1:9")]
    server = Server(
        work / "archive",
        workers=2,
        args=(
            *peers,
            "--peer",
            f"STORESCP@127.0.0.1:{scp.port}",
            "--http-port",
            str(http),
            "--hl7-port",
            str(hl7),
        ),
    ).start(timeout=60)
    base = f"http://127.0.0.1:{http}"
    wait_http(base + "/health", server, timeout=60)
    return server, base, hl7


def load(work: Path, patients: int, scp: StoreSCP) -> Peers:
    spec = synth.Spec(studies=patients, series=2, instances=3, size=16, patients=patients)
    paths = synth.write(spec, work / "synth")
    files: dict[str, list[Path]] = {}
    for p in paths:
        files.setdefault(str(read(p).PatientID), []).append(p)
    server, base, hl7 = start(work, scp)
    store(server.port, paths)
    return Peers(server, scp, base, hl7, files, work)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    work = tmp_path_factory.mktemp("corrections")
    scp = StoreSCP(work / "move-destination").start()
    loaded = load(work, 8, scp)
    yield loaded
    loaded.server.stop()
    scp.stop()


def read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def store(port: int, paths: list[Path], aet: str = "MODALITY") -> None:
    proc = dcmtk("storescu", "-aet", aet, "-aec", "PACSGRID", "127.0.0.1", port, *paths)
    assert proc.returncode == 0, proc.stdout


def findscu(p: Peers, level: str, keys: dict[str, str], name: str) -> list[pydicom.Dataset]:
    out = p.work / "find" / name
    out.mkdir(parents=True)
    args: list[str | Path] = ["-S", "-X", "-od", out, "-aet", "FINDSCU", "-aec", "PACSGRID"]
    args += ["-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v else k]
    proc = dcmtk("findscu", *args, "127.0.0.1", p.server.port)
    assert proc.returncode == 0, proc.stdout
    return [read(f) for f in sorted(out.glob("rsp*.dcm"))]


def getscu(p: Peers, level: str, keys: dict[str, str], name: str) -> dict[str, Path]:
    out = p.work / "get" / name
    out.mkdir(parents=True)
    args: list[str | Path] = ["-S", "-od", out, "-aet", "GETSCU", "-aec", "PACSGRID"]
    args += ["-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    proc = dcmtk("getscu", *args, "127.0.0.1", p.server.port)
    assert proc.returncode == 0, proc.stdout
    return {str(read(f).SOPInstanceUID): f for f in out.iterdir()}


def movescu(p: Peers, study: str) -> dict[str, Path]:
    p.scp.clear()
    proc = move_study(p.server.port, study)
    assert "Received Final Move Response (Success)" in proc.stdout, proc.stdout
    return {str(read(f).SOPInstanceUID): f for f in p.scp.files()}


def qido(p: Peers, path: str, **params: str) -> list[dict[str, object]]:
    r = requests.get(p.base + "/dicom-web" + path, params=params, timeout=60)
    assert r.status_code == 200, r.text
    body: list[dict[str, object]] = r.json()
    return body


def tag(item: dict[str, object], t: str) -> str:
    value = item.get(t, {})
    assert isinstance(value, dict)
    values = value.get("Value", [""])
    first = values[0]
    return str(first.get("Alphabetic", "") if isinstance(first, dict) else first)


def uids_of(files: list[Path]) -> set[str]:
    return {str(read(f).SOPInstanceUID) for f in files}


def site_digests(p: Peers) -> dict[str, str]:
    return {
        str(f.relative_to(p.site)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in p.site.rglob("*.dcm")
    }


def snapshot(p: Peers, name: str) -> dict[str, object]:
    """Every answer a client can see: C-FIND at every level, QIDO at every level."""
    out: dict[str, object] = {}
    keys = {
        "PATIENT": ["PatientID", "PatientName", "NumberOfPatientRelatedStudies"],
        "STUDY": ["StudyInstanceUID", "PatientID", "PatientName", "NumberOfStudyRelatedInstances"],
    }
    for level, wanted in keys.items():
        rows = findscu(p, level, dict.fromkeys(wanted, ""), f"{name}-{level}")
        out[level] = sorted(tuple(str(r.get(k, "")) for k in wanted) for r in rows)
    for path in ("/studies", "/series", "/instances"):
        rows = qido(p, path, includefield="all", limit="1000")
        out[path] = sorted(sorted((k, str(v)) for k, v in r.items() if k != URL) for r in rows)
    return out


# ---------------------------------------------------------------- rejection notes


def test_rejection_note_hides_instances_from_find_move_get_qido_and_wado(peers: Peers) -> None:
    study_files = peers.files["P0000000"]
    study = str(read(study_files[0]).StudyInstanceUID)
    rejected_files = study_files[3:]  # the second series
    rejected = uids_of(rejected_files)
    kept = uids_of(study_files[:3])
    series = str(read(rejected_files[0]).SeriesInstanceUID)
    note = rejection_note(peers.work / "notes" / "quality.dcm", rejected_files, "113001")
    store(peers.server.port, [note])
    note_uid = str(read(note).SOPInstanceUID)

    found = findscu(peers, "IMAGE", {"StudyInstanceUID": study, "SOPInstanceUID": ""}, "rej-img")
    assert {str(r.SOPInstanceUID) for r in found} == kept | {note_uid}
    found = findscu(peers, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": ""}, "rej-se")
    assert series not in {str(r.SeriesInstanceUID) for r in found}
    found = findscu(
        peers, "STUDY", {"StudyInstanceUID": study, "NumberOfStudyRelatedInstances": ""}, "rej-st"
    )
    assert [str(r.NumberOfStudyRelatedInstances) for r in found] == ["4"]

    got = getscu(peers, "STUDY", {"StudyInstanceUID": study}, "rej-study")
    assert kept <= set(got) and not rejected & set(got)
    one = sorted(rejected)[0]
    keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": one}
    assert getscu(peers, "IMAGE", keys, "rej-one") == {}
    moved = movescu(peers, study)
    assert kept <= set(moved) and not rejected & set(moved)

    instances = qido(peers, f"/studies/{study}/instances")
    assert {tag(i, "00080018") for i in instances} == kept | {note_uid}
    wado = f"{peers.base}/dicom-web/studies/{study}/series/{series}/instances/{one}"
    assert requests.get(wado, timeout=60).status_code == 404
    r = requests.get(f"{peers.base}/dicom-web/studies/{study}", timeout=60)
    assert r.status_code == 200
    sent = {
        str(read_bytes(body).SOPInstanceUID)
        for _, body in parse_multipart(r.headers["Content-Type"], r.content)
    }
    assert kept <= sent and not rejected & sent

    hidden = requests.get(f"{peers.base}/api/rejected", params={"study": study}, timeout=60)
    assert {h["sop_uid"] for h in hidden.json()} == rejected

    # Undone, the rejected instances are answered and sent again.
    by = hidden.json()[0]["by"]
    r = requests.post(
        peers.base + "/api/corrections/undo",
        json={"correction": by, "reason": "rejected by mistake"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    found = findscu(peers, "IMAGE", {"StudyInstanceUID": study, "SOPInstanceUID": ""}, "rej-undo")
    assert {str(r.SOPInstanceUID) for r in found} == kept | rejected | {note_uid}
    got = getscu(peers, "STUDY", {"StudyInstanceUID": study}, "rej-undo")
    assert kept | rejected <= set(got)


def test_rejection_note_by_stow_hides_instances(peers: Peers) -> None:
    study_files = peers.files["P0000007"]
    study = str(read(study_files[0]).StudyInstanceUID)
    note = rejection_note(peers.work / "notes" / "stow.dcm", study_files[:1], "113039")
    body, ctype = multipart_body([note.read_bytes()])
    r = requests.post(
        f"{peers.base}/dicom-web/studies/{study}",
        data=body,
        headers={"Content-Type": ctype},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    rejected = uids_of(study_files[:1])
    instances = {tag(i, "00080018") for i in qido(peers, f"/studies/{study}/instances")}
    assert not rejected & instances and len(instances) == len(study_files)  # 5 + the note
    found = findscu(peers, "IMAGE", {"StudyInstanceUID": study, "SOPInstanceUID": ""}, "stow")
    assert not rejected & {str(r.SOPInstanceUID) for r in found}


def read_bytes(data: bytes) -> pydicom.Dataset:
    import io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))


# ---------------------------------------------------------------- HL7 merge


def test_adt_a40_merge_answers_under_the_surviving_id_and_get_sends_it(peers: Peers) -> None:
    merged_files, surviving_files = peers.files["P0000001"], peers.files["P0000002"]
    merged_study = str(read(merged_files[0]).StudyInstanceUID)
    digests = site_digests(peers)
    with Mllp(peers.hl7) as hl7:
        ack = hl7.send(
            adt("A40", "MRG-0001", "P0000002", merged_id="P0000001", name="SURVIVOR^SAM")
        )
    assert ack[:2] == ("AA", "MRG-0001"), ack

    found = findscu(peers, "STUDY", {"PatientID": "P0000002", "StudyInstanceUID": ""}, "a40")
    studies = {str(r.StudyInstanceUID) for r in found}
    assert studies == {merged_study, str(read(surviving_files[0]).StudyInstanceUID)}
    assert findscu(peers, "STUDY", {"PatientID": "P0000001"}, "a40-old") == []
    rows = qido(peers, "/studies", PatientID="P0000002")
    assert {tag(r, "00100010") for r in rows} == {"SURVIVOR^SAM"}

    got = getscu(peers, "STUDY", {"StudyInstanceUID": merged_study}, "a40-get")
    assert set(got) == uids_of(merged_files)
    for path in got.values():
        ds = read(path)
        assert (ds.PatientID, str(ds.PatientName)) == ("P0000002", "SURVIVOR^SAM")
        original = ds.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0]
        assert original.PatientID == "P0000001"
    assert site_digests(peers) == digests  # the stored files did not change


# ---------------------------------------------------------------- undo


def test_undo_restores_the_original_answers_and_bytes(peers: Peers) -> None:
    before = snapshot(peers, "undo-before")
    merged_study = str(read(peers.files["P0000004"][0]).StudyInstanceUID)
    original = getscu(peers, "STUDY", {"StudyInstanceUID": merged_study}, "undo-get0")
    with Mllp(peers.hl7) as hl7:
        assert hl7.send(adt("A40", "UNDO-1", "P0000005", merged_id="P0000004"))[0] == "AA"
    r = requests.post(
        peers.base + "/api/corrections/patient",
        json={
            "patient": {"PatientID": "P0000003"},
            "set": {"PatientName": "CORRECTED^CARL", "PatientBirthDate": "19991231"},
            "reason": "registration error",
        },
        timeout=60,
    )
    assert r.status_code == 201, r.text
    update = r.json()["seq"]
    assert snapshot(peers, "undo-changed") != before
    listing = requests.get(peers.base + "/api/corrections", timeout=60).json()
    merge = next(c["seq"] for c in listing if c["source"] == "hl7:ADT1|HOSP|UNDO-1")
    for seq in sorted((merge, update), reverse=True):
        r = requests.post(
            peers.base + "/api/corrections/undo",
            json={"correction": seq, "reason": "entered on the wrong patient"},
            timeout=60,
        )
        assert r.status_code == 201, r.text
    assert snapshot(peers, "undo-after") == before
    again = getscu(peers, "STUDY", {"StudyInstanceUID": merged_study}, "undo-get1")
    assert {k: v.read_bytes() for k, v in again.items()} == {
        k: v.read_bytes() for k, v in original.items()
    }


# ---------------------------------------------------------------- HL7 answers


def test_hl7_messages_are_answered_in_order_with_reasons(peers: Peers) -> None:
    with Mllp(peers.hl7) as hl7:
        first = hl7.send(adt("A08", "ORD-1", "P0000006", name="FIRST^NAME"))
        second = hl7.send(adt("A08", "ORD-2", "P0000006", name="SECOND^NAME", sex="F"))
        assert first[:2] == ("AA", "ORD-1") and second[:2] == ("AA", "ORD-2")
        assert hl7.send(adt("A08", "ORD-2", "P0000006", name="THIRD^NAME"))[0] == "AA"
        assert hl7.send(adt("A08", "ORD-3", "P0000006", birth_date="1970133"))[0] == "AE"
        code, control, text = hl7.send(
            adt("A08", "ORD-4", "P0000006").replace("ADT^A08", "ORU^R01")
        )
        assert (code, control) == ("AR", "ORD-4") and "ORU" in text
        assert hl7.send(adt("A08", "", "P0000006"))[0] == "AR"
        assert hl7.send(b"this is not HL7")[0] == "AR"
        unknown = hl7.send(adt("A08", "ORD-5", "NO-SUCH-PATIENT", name="X^Y"))
        assert unknown[0] == "AA" and "nothing to change" in unknown[2]
        assert hl7.send(adt("A47", "ORD-6", "P0000007", merged_id="P0000006"))[0] == "AE"
    rows = qido(peers, "/studies", PatientID="P0000006")
    assert [(tag(r, "00100010"), tag(r, "00100040")) for r in rows] == [("SECOND^NAME", "F")]
    audit = (peers.server.data_dir / "audit.jsonl").read_text()
    assert "P0000006" not in audit and "SECOND" not in audit  # no patient data in the audit
    assert "SECOND" not in peers.server.text()  # nor in the log


# ---------------------------------------------------------------- rebuild


def test_merge_and_rejection_survive_deleting_the_index_and_reindex(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "move-destination").start()
    p = load(tmp_path, 3, scp)
    try:
        study_files = p.files["P0000000"]
        study = str(read(study_files[0]).StudyInstanceUID)
        rejected = uids_of(study_files[3:])
        note = rejection_note(tmp_path / "notes" / "k.dcm", study_files[3:], "113038")
        store(p.server.port, [note])
        merge = adt("A40", "REB-1", "P0000002", merged_id="P0000001", name="KEPT^KATE")
        with Mllp(p.hl7) as hl7:
            assert hl7.send(merge)[0] == "AA"
        merged_study = str(read(p.files["P0000001"][0]).StudyInstanceUID)
        before = snapshot(p, "reb-before")
        corrections = requests.get(p.base + "/api/corrections", timeout=60).json()
        assert p.server.stop() == 0

        for f in p.server.data_dir.glob("index.sqlite*"):
            f.unlink()
        out = pacsgrid_cli("reindex", "--data-dir", p.server.data_dir, "--jobs", "1")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "2 correction(s) applied from the sites" in out.stdout

        p.server, p.base, p.hl7 = start(tmp_path, scp)
        assert snapshot(p, "reb-after") == before
        after = requests.get(p.base + "/api/corrections", timeout=60).json()
        assert [(c["seq"], c["kind"], c["source"]) for c in after] == [
            (c["seq"], c["kind"], c["source"]) for c in corrections
        ]
        got = getscu(p, "STUDY", {"StudyInstanceUID": study}, "reb-rej")
        assert got and not rejected & set(got)
        got = getscu(p, "STUDY", {"StudyInstanceUID": merged_study}, "reb-merged")
        assert {read(f).PatientID for f in got.values()} == {"P0000002"}
        with Mllp(p.hl7) as hl7:  # sent again after the rebuild: not applied twice
            code, _, text = hl7.send(merge)
        assert code == "AA" and "received before" in text
        assert len(requests.get(p.base + "/api/corrections", timeout=60).json()) == 2
    finally:
        p.server.stop()
        scp.stop()


def test_hl7_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = pacsgrid_cli(
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--hl7-port",
            str(port),
            "--data-dir",
            tmp_path / "d",
            cwd=tmp_path,
        )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pacsgrid: config error: hl7.port: cannot listen on 127.0.0.1:{port}")
