"""Large datasets spill to a file while they arrive (dicom.spill_mb), over DIMSE and STOW-RS.

The servers here spill anything above 1 MB, so the test objects are a few MB. What must hold:
an object above the threshold is stored byte for byte and retrieved so (DCMTK storescu and
getscu, STOW-RS and WADO-RS); its spill file is gone after success, after a failure status,
after the peer aborts or drops in the middle; a process killed while a spill file exists
leaves it behind, and the next start-up (or the supervisor, for a worker) removes it, with
nothing of the object visible or indexed; spill files past dicom.spill_max_mb get A700.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from pacsgrid.archive.spool import SpillArea, Spool
from pacsgrid.dicom import dimse, pdu
from pacsgrid.dicomfile import header
from pacsgrid.dicomfile.header import scan
from pacsgrid.dicomfile.part10 import split_part10
from pacsgrid.errors import InvalidDataset
from tests.conftest import Server, dcmtk, getscu_study
from tests.synthetic import uid
from tests.test_bad_input import echo_ok, indexed
from tests.ul_peer import EXPLICIT, RawPeer
from tests.waiting import wait_until
from tests.web_helpers import multipart_body, parse_multipart, start_web

MULTIFRAME = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte Secondary Capture
FRAMES = 48  # of 256x256: 3 MB, three times the threshold
CONFIG = """
[dicom]
spill_mb = 1

[[peers]]
ae_title = 'GETSCU'
host = '127.0.0.1'
port = 9
allow = ['echo', 'store', 'find', 'get']
"""


def big_file(folder: Path, name: str, frames: int = FRAMES) -> Path:
    """A multi-frame object of `frames` 256x256 8-bit frames (UIDs derived from `name`)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = MULTIFRAME
    ds.SOPInstanceUID = uid(name)
    ds.StudyInstanceUID = uid(name + "-study")
    ds.SeriesInstanceUID = uid(name + "-series")
    ds.PatientID = "SPILL"
    ds.PatientName = "Spill^Test"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 256
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.PixelData = bytes((i * 7 + i // 256) % 251 for i in range(256 * 256)) * frames
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MULTIFRAME
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_of(path: Path) -> bytes:
    data = path.read_bytes()
    return data[split_part10(data).dataset_offset :]


def spill_files(server: Server) -> list[Path]:
    folder = server.data_dir / "spill"
    return sorted(folder.iterdir()) if folder.exists() else []


def stored_files(server: Server) -> list[Path]:
    return sorted((server.data_dir / "objects").rglob("*.dcm"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("spill")
    cfg = tmp / "spill.toml"
    cfg.write_text(CONFIG)
    s = Server(tmp / "archive", config=cfg).start()
    yield s
    s.stop()


def store_command(sop_uid: str) -> dimse.Command:
    return {
        dimse.AFFECTED_SOP_CLASS: MULTIFRAME,
        dimse.COMMAND_FIELD: dimse.C_STORE_RQ,
        dimse.MESSAGE_ID: 1,
        dimse.PRIORITY: 0,
        dimse.AFFECTED_SOP_INSTANCE: sop_uid,
        dimse.DATASET_TYPE: dimse.HAS_DATASET,
    }


def associated(port: int) -> RawPeer:
    peer = RawPeer(port, timeout=120)
    ac = peer.associate("SPILLER", [(MULTIFRAME, [EXPLICIT])], max_pdu=65536)
    assert ac is not None and ac.type == pdu.A_ASSOCIATE_AC
    return peer


def send_half(peer: RawPeer, sop_uid: str, dataset: bytes) -> None:
    """The C-STORE command and the first half of its dataset's fragments (none of them the
    last): the archive is left waiting for the rest."""
    cmd = dimse.encode_command(store_command(sop_uid))
    pieces = pdu.encode_pdata(1, cmd, True, 65536)
    fragments = pdu.encode_pdata(1, dataset, False, 65536)
    pieces += fragments[: len(fragments) // 4 * 2]  # (PDU header, data) pairs
    peer.send(b"".join(bytes(p) for p in pieces))


A_ABORT = bytes([pdu.A_ABORT, 0]) + struct.pack(">I", 4) + b"\x00\x00\x00\x00"


# ---------------------------------------------------------------- the spool itself


def fill(area: SpillArea, data: bytes) -> Spool:
    spool = area.spool()
    for i in range(0, len(data), 65536):
        spool.write(data[i : i + 65536])
    return spool


def test_header_scan_reads_a_spilled_dataset_in_place(tmp_path: Path) -> None:
    """Both scan paths (the fast walk and pydicom's) read the spill file's map, a Part 10
    file at its dataset offset too, and find truncation there as in memory."""
    data = big_file(tmp_path, "scan-in-place").read_bytes()
    start = split_part10(data).dataset_offset
    area = SpillArea(tmp_path / "spill", 1 << 20, 1 << 30)
    whole, cut = fill(area, data), fill(area, data[start:-1000])
    try:
        assert whole.spilled and cut.spilled
        mapped = whole.contents()
        assert not isinstance(mapped, bytes)  # a map of the file, not a copy
        want = uid("scan-in-place")
        assert scan(mapped, EXPLICIT, start).sop_instance_uid == want
        assert header._scan_with_pydicom(mapped, False, True, start)[0]["SOPInstanceUID"] == want
        with pytest.raises(InvalidDataset, match="truncated"):
            scan(cut.contents(), EXPLICIT)
        with pytest.raises(InvalidDataset):
            header._scan_with_pydicom(cut.contents(), False, True)
    finally:
        whole.close()
        cut.close()
    assert list(area.folder.iterdir()) == []


def test_sweep_removes_only_files_of_dead_processes(tmp_path: Path) -> None:
    area = SpillArea(tmp_path / "spill", 1 << 20, 1 << 30)
    live = fill(area, b"x" * (2 << 20))
    orphan = area.folder / "999999-left-by-a-dead-process.part"  # nobody holds its lock
    orphan.write_bytes(b"y" * 100)
    try:
        assert area.sweep() == 1
        assert [p.name for p in area.folder.iterdir()] == [
            p.name for p in area.folder.glob(f"{os.getpid()}-*.part")
        ]
        assert live.contents()[:1] == b"x"
    finally:
        live.close()
    assert list(area.folder.iterdir()) == []


# ---------------------------------------------------------------- DIMSE


def test_storescu_large_object_stored_and_retrieved_byte_for_byte(
    server: Server, tmp_path: Path
) -> None:
    path = big_file(tmp_path, "dimse-whole")
    proc = dcmtk("storescu", "-v", "-aec", "PACSGRID", "127.0.0.1", server.port, path)
    assert "Received Store Response (Success)" in proc.stdout, proc.stdout
    assert spill_files(server) == []
    out = tmp_path / "got"
    out.mkdir()
    getscu_study(server.port, uid("dimse-whole-study"), out, check=True)
    (got,) = list(out.iterdir())
    assert dataset_of(got) == dataset_of(path)


def test_malformed_large_object_fails_and_leaves_no_spill_file(
    server: Server, tmp_path: Path
) -> None:
    """A large dataset cut short inside its pixel data: C000, its spill file removed before
    the answer, nothing stored or indexed, the server still serving."""
    sop = uid("dimse-truncated")
    dataset = dataset_of(big_file(tmp_path, "dimse-truncated"))[:-1000]
    before = stored_files(server)
    with associated(server.port) as peer:
        peer.message(1, store_command(sop), dataset, max_pdu=65536)
        rsp = peer.response()
    assert rsp[dimse.STATUS] == dimse.CANNOT_UNDERSTAND, rsp
    assert "truncated" in str(rsp.get(dimse.ERROR_COMMENT, ""))
    assert spill_files(server) == []
    assert not indexed(server, sop)
    assert stored_files(server) == before
    assert echo_ok(server.port)


@pytest.mark.parametrize("how", ["a-abort", "dropped"])
def test_peer_gone_mid_dataset_removes_the_spill_file(
    server: Server, tmp_path: Path, how: str
) -> None:
    sop = uid(f"dimse-{how}")
    dataset = dataset_of(big_file(tmp_path, f"dimse-{how}"))
    with associated(server.port) as peer:
        send_half(peer, sop, dataset)
        wait_until(lambda: spill_files(server), 60, "a spill file for the half-sent dataset")
        if how == "a-abort":
            peer.send(A_ABORT)
    wait_until(
        lambda: not spill_files(server),
        60,
        "the spill file removed once the peer is gone",
        seen=lambda: spill_files(server),
    )
    assert not indexed(server, sop)
    assert echo_ok(server.port)


def test_spill_files_past_their_bound_get_out_of_resources(tmp_path: Path) -> None:
    cfg = tmp_path / "tight.toml"
    cfg.write_text("[dicom]\nspill_mb = 1\nspill_max_mb = 2\n")
    s = Server(tmp_path / "tight", config=cfg).start()
    try:
        sop = uid("dimse-no-room")
        with associated(s.port) as peer:
            peer.message(1, store_command(sop), dataset_of(big_file(tmp_path, "dimse-no-room")))
            rsp = peer.response()
        assert rsp[dimse.STATUS] == dimse.OUT_OF_RESOURCES, rsp
        assert "spill_max_mb" in s.text()
        assert spill_files(s) == []
        assert not indexed(s, sop)
        # A small object takes the in-memory path: still stored.
        small = big_file(tmp_path, "dimse-small-after", frames=2)
        proc = dcmtk("storescu", "-v", "-aec", "PACSGRID", "127.0.0.1", s.port, small)
        assert "Received Store Response (Success)" in proc.stdout, proc.stdout
    finally:
        s.stop()


@pytest.mark.slow
def test_killed_server_leaves_a_spill_file_that_start_up_removes(tmp_path: Path) -> None:
    cfg = tmp_path / "spill.toml"
    cfg.write_text(CONFIG)
    s = Server(tmp_path / "killed", config=cfg).start()
    sop = uid("dimse-killed")
    try:
        peer = associated(s.port)
        try:
            send_half(peer, sop, dataset_of(big_file(tmp_path, "dimse-killed")))
            wait_until(lambda: spill_files(s), 60, "a spill file for the half-sent dataset")
            s.kill()
        finally:
            peer.close()
        assert spill_files(s), "a SIGKILLed process cannot remove its spill file"
        s.start()
        assert spill_files(s) == []
        assert not indexed(s, sop)
        assert stored_files(s) == []
    finally:
        s.stop()


@pytest.mark.slow
def test_killed_worker_spill_file_removed_by_the_supervisor(tmp_path: Path) -> None:
    cfg = tmp_path / "spill.toml"
    cfg.write_text(CONFIG)
    s = Server(tmp_path / "workers", config=cfg, workers=2).start()
    sop = uid("dimse-killed-worker")
    try:
        peer = associated(s.port)
        try:
            send_half(peer, sop, dataset_of(big_file(tmp_path, "dimse-killed-worker")))
            (spilled,) = wait_until(lambda: spill_files(s), 60, "a spill file")
            worker = int(spilled.name.split("-", 1)[0])  # named after its process
            assert s.proc is not None and worker != s.proc.pid
            os.kill(worker, signal.SIGKILL)
            assert peer.closed_by_server(60)
        finally:
            peer.close()
        wait_until(
            lambda: not spill_files(s),
            120,
            "the supervisor's recovery removing the dead worker's spill file",
            seen=lambda: spill_files(s),
        )
        wait_until(lambda: "starting another" in s.text(), 60, "a new worker")
        assert not indexed(s, sop)
        assert stored_files(s) == []
        assert echo_ok(s.port)
    finally:
        s.stop()


# ---------------------------------------------------------------- STOW-RS


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    tmp = tmp_path_factory.mktemp("spillweb")
    cfg = tmp / "spill.toml"
    cfg.write_text(CONFIG)
    s, base = start_web(tmp / "archive", extra=("--config", str(cfg)))
    yield s, base
    s.stop()


def test_stow_large_part_stored_and_retrieved_byte_for_byte(
    web: tuple[Server, str], tmp_path: Path
) -> None:
    server, base = web
    path = big_file(tmp_path, "stow-whole")
    body, ctype = multipart_body([path.read_bytes()])
    r = requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    assert spill_files(server) == []
    url = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    got = requests.get(
        url, headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"}
    )
    assert got.status_code == 200, got.text
    (part,) = parse_multipart(got.headers["Content-Type"], got.content)
    assert part[1].endswith(dataset_of(path))


def test_stow_malformed_large_part_fails_and_leaves_no_spill_file(
    web: tuple[Server, str], tmp_path: Path
) -> None:
    server, base = web
    data = big_file(tmp_path, "stow-truncated").read_bytes()[:-1000]
    body, ctype = multipart_body([data])
    r = requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 409, r.text
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert spill_files(server) == []
    assert not indexed(server, uid("stow-truncated"))


def test_stow_client_gone_mid_part_removes_the_spill_file(
    web: tuple[Server, str], tmp_path: Path
) -> None:
    server, base = web
    body, ctype = multipart_body([big_file(tmp_path, "stow-dropped").read_bytes()])
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = (
            f"POST /dicom-web/studies HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[: len(body) // 2])
        wait_until(lambda: spill_files(server), 60, "a spill file for the half-sent part")
    wait_until(
        lambda: not spill_files(server),
        60,
        "the spill file removed once the client is gone",
        seen=lambda: spill_files(server),
    )
    assert not indexed(server, uid("stow-dropped"))
    assert requests.get(base + "/health").status_code == 200
