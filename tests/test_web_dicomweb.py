"""DICOMweb as a real client sees it: dicomweb-client (PyPI) against `pacsgrid serve`.

The shared corpus is stored with STOW-RS; QIDO-RS at every level is compared with an
independent model of what was stored (tests/oracle.py, built with pydicom); WADO-RS must give
back the stored bytes, metadata must describe each object, frames must be its pixel data.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from tests import oracle
from tests.conftest import Server
from tests.corpus import CorpusFile, accepted, dataset_bytes, pixel_data
from tests.web_helpers import multipart_body, parse_multipart, start_web

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@dataclass
class Loaded:
    server: Server
    base: str
    client: DICOMwebClient
    model: oracle.Model
    stow_failed: dict[str, str]

    @property
    def dicomweb(self) -> str:
        return self.base + "/dicom-web"


def _read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    work = tmp_path_factory.mktemp("dicomweb")
    server, base = start_web(work / "archive")
    client = DICOMwebClient(base + "/dicom-web")
    stored: list[Path] = []
    failed: dict[str, str] = {}
    for f in accepted():
        try:
            client.store_instances([_read(f.path)])
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            # dicomweb-client re-encodes datasets with pydicom, which cannot write a few
            # corpus files: send those as the bytes on disk instead.
            body, ctype = multipart_body([f.path.read_bytes()])
            r = requests.post(
                base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype}
            )
            if r.status_code != 200:
                failed[f.path.name] = f"{e}; raw: {r.status_code} {r.text[:200]}"
                continue
        stored.append(f.path)
    yield Loaded(server, base, client, oracle.build(stored), failed)
    server.stop()


def test_stow_stores_every_valid_corpus_file(loaded: Loaded) -> None:
    assert loaded.stow_failed == {}
    studies = loaded.client.search_for_studies()
    assert {s["0020000D"]["Value"][0] for s in studies} == set(loaded.model.studies)


def test_stow_response_lists_each_instance(loaded: Loaded) -> None:
    files = [f.path.read_bytes() for f in accepted()[:3]] + [b"not dicom at all"]
    body, ctype = multipart_body(files)
    r = requests.post(loaded.dicomweb + "/studies", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 202, r.text
    answer = r.json()
    assert len(answer["00081199"]["Value"]) == 3  # ReferencedSOPSequence
    failed = answer["00081198"]["Value"]  # FailedSOPSequence
    assert len(failed) == 1 and failed[0]["00081197"]["Value"] == [0xC000]


def test_stow_to_a_study_refuses_other_studies(loaded: Loaded) -> None:
    f = accepted()[0]
    body, ctype = multipart_body([f.path.read_bytes()])
    r = requests.post(
        loaded.dicomweb + "/studies/1.2.3.999", data=body, headers={"Content-Type": ctype}
    )
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC122]


def test_qido_studies_by_every_matching_type(loaded: Loaded) -> None:
    m = loaded.model
    some = next(s for s in m.studies.values() if s["PatientName"] and s["StudyDate"])
    cases = {
        "PatientID": (some["PatientID"], "LO"),
        "PatientName": (some["PatientName"][:3] + "*", "PN"),
        "StudyDate": (f"{some['StudyDate'][:4]}0101-{some['StudyDate'][:4]}1231", "DA"),
        "StudyInstanceUID": (",".join(list(m.studies)[:3]), "UI"),
    }
    for key, (value, vr) in cases.items():
        got = loaded.client.search_for_studies(search_filters={key: value})
        uids = {s["0020000D"]["Value"][0] for s in got}
        key_for_oracle = value.replace(",", "\\")
        want = {
            uid
            for uid, st in m.studies.items()
            if oracle.matches(st[key] if key != "StudyInstanceUID" else uid, key_for_oracle, vr)
        }
        assert uids == want, (key, value)


def test_qido_series_and_instances(loaded: Loaded) -> None:
    m = loaded.model
    for study_uid in list(m.studies)[:10]:
        series = loaded.client.search_for_series(study_instance_uid=study_uid)
        want = {k for k, v in m.series.items() if v["StudyInstanceUID"] == study_uid}
        assert {s["0020000E"]["Value"][0] for s in series} == want
        instances = loaded.client.search_for_instances(study_instance_uid=study_uid)
        assert {i["00080018"]["Value"][0] for i in instances} == m.study_instances(study_uid)
        for i in instances:  # AvailableTransferSyntaxUID: what the file on disk says
            path = m.files[i["00080018"]["Value"][0]]
            stored_ts = _read(path).file_meta.get("TransferSyntaxUID")
            if stored_ts:
                assert i["00083002"]["Value"] == [str(stored_ts)], path
    ct = loaded.client.search_for_series(search_filters={"Modality": "CT"})
    assert {s["0020000E"]["Value"][0] for s in ct} == {
        k for k, v in m.series.items() if v["Modality"] == "CT"
    }


def test_qido_limit_offset_and_includefield(loaded: Loaded) -> None:
    everything = loaded.client.search_for_instances()
    assert len(everything) == len(loaded.model.instances)
    page1 = loaded.client.search_for_instances(limit=5, offset=0)
    page2 = loaded.client.search_for_instances(limit=5, offset=5)
    assert len(page1) == len(page2) == 5
    ids = [i["00080018"]["Value"][0] for i in page1 + page2]
    assert len(set(ids)) == 10
    studies = loaded.client.search_for_studies(fields=["StudyDescription", "00100030"], limit=3)
    assert all("00081030" in s and "00100030" in s for s in studies)
    assert all(s["00100010"]["vr"] == "PN" for s in studies)


def test_qido_bad_parameters_are_400(loaded: Loaded) -> None:
    for query in ("limit=-1", "offset=abc", "NoSuchKeyword=1", "Modality=CT", "fuzzymatching=x"):
        r = requests.get(f"{loaded.dicomweb}/studies?{query}")
        assert r.status_code == 400, (query, r.status_code)
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert r.json()["detail"]


def test_wado_instances_are_the_stored_bytes(loaded: Loaded) -> None:
    from pacsgrid.index.sqlite import SqliteIndex

    index = SqliteIndex(loaded.server.data_dir / "index.sqlite")
    try:
        for sop, path in list(loaded.model.files.items()):
            inst = loaded.model.instances[sop]
            r = requests.get(
                f"{loaded.dicomweb}/studies/{inst['StudyInstanceUID']}/series/"
                f"{inst['SeriesInstanceUID']}/instances/{sop}",
                headers={
                    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'
                },
            )
            assert r.status_code == 200, (path, r.text[:200])
            parts = parse_multipart(r.headers["Content-Type"], r.content)
            assert len(parts) == 1
            record = index.instance(sop)
            assert record is not None
            on_disk = (loaded.server.data_dir / "objects" / record.copies[0].key).read_bytes()
            assert parts[0][1] == on_disk, path
            # and what dicomweb-client reads back is the object that was sent
            ds = pydicom.dcmread(io.BytesIO(parts[0][1]), force=True)
            assert str(ds.SOPInstanceUID) == sop
            original = pixel_data(path)
            if original is not None and ds.file_meta.TransferSyntaxUID == _read(path).file_meta.get(
                "TransferSyntaxUID"
            ):
                assert bytes(ds.PixelData) == original, path
    finally:
        index.close()


def test_wado_of_raw_stow_is_byte_identical(tmp_path: Path) -> None:
    """STOW the file bytes as they are; the dataset retrieved in its own syntax is exactly the
    one sent. A fresh archive: the module's archive was loaded through dicomweb-client, which
    re-encodes with pydicom, and a second STOW of the same UID keeps that first object."""
    server, base = start_web(tmp_path / "archive")
    try:
        first: dict[str, CorpusFile] = {}
        for f in accepted():
            first.setdefault(f.sop_uid, f)
        syntaxes = set()
        for f in first.values():
            body, ctype = multipart_body([f.path.read_bytes()])
            r = requests.post(
                base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype}
            )
            assert r.status_code == 200, (f.path, r.text)
            url = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
            got = requests.get(
                url,
                headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"},
            )
            assert got.status_code == 200, got.text
            (part,) = parse_multipart(got.headers["Content-Type"], got.content)
            ts, dataset = dataset_bytes(f.path)
            assert part[1].endswith(dataset), f.path
            syntaxes.add(ts)
        assert len(first) > 20 and len(syntaxes) >= 3, syntaxes
    finally:
        server.stop()


def test_wado_study_and_series_retrieve(loaded: Loaded) -> None:
    study = next(iter(loaded.model.studies))
    datasets = loaded.client.retrieve_study(study)
    assert {str(d.SOPInstanceUID) for d in datasets} == loaded.model.study_instances(study)


def test_metadata_describes_each_instance(loaded: Loaded) -> None:
    for study in list(loaded.model.studies)[:15]:
        meta = loaded.client.retrieve_study_metadata(study)
        assert {m["00080018"]["Value"][0] for m in meta} == loaded.model.study_instances(study)
        for m in meta:
            path = loaded.model.files[m["00080018"]["Value"][0]]
            ds = _read(path)
            if "Rows" in ds:
                assert m["00280010"]["Value"] == [int(ds.Rows)]
            if "PixelData" in ds:
                assert "BulkDataURI" in m["7FE00010"]
            assert "00083002" in m  # AvailableTransferSyntaxUID


def test_frames_are_the_pixel_data(loaded: Loaded) -> None:
    checked = 0
    for sop, path in loaded.model.files.items():
        ds = _read(path)
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if "PixelData" not in ds or ts not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
            continue
        if int(ds.get("BitsAllocated", 8)) < 8:
            continue
        inst = loaded.model.instances[sop]
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        got = loaded.client.retrieve_instance_frames(
            inst["StudyInstanceUID"],
            inst["SeriesInstanceUID"],
            sop,
            frame_numbers=list(range(1, frames + 1)),
            media_types=("application/octet-stream",),
        )
        assert b"".join(got) == bytes(ds.PixelData)[: sum(len(g) for g in got)]
        assert sum(len(g) for g in got) >= len(ds.PixelData) - 1
        checked += 1
    assert checked >= 5


def test_compressed_frames_as_stored(loaded: Loaded) -> None:
    from pydicom.encaps import generate_frames

    checked = 0
    for sop, path in loaded.model.files.items():
        ds = _read(path)
        if "PixelData" not in ds or not ds.file_meta.TransferSyntaxUID.is_compressed:
            continue
        inst = loaded.model.instances[sop]
        url = (
            f"{loaded.dicomweb}/studies/{inst['StudyInstanceUID']}/series/"
            f"{inst['SeriesInstanceUID']}/instances/{sop}/frames/1"
        )
        r = requests.get(
            url,
            headers={
                "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"
            },
        )
        assert r.status_code == 200, (path, r.text[:200])
        (part,) = parse_multipart(r.headers["Content-Type"], r.content)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        first = next(generate_frames(ds.PixelData, number_of_frames=frames))
        assert part[1] == first, path
        checked += 1
    assert checked >= 10


def test_rendered_and_thumbnails_are_images(loaded: Loaded) -> None:
    from PIL import Image

    rendered = 0
    for sop, path in list(loaded.model.files.items()):
        ds = _read(path)
        if "PixelData" not in ds or ds.get("Modality") not in ("CT", "MR"):
            continue
        inst = loaded.model.instances[sop]
        base = (
            f"{loaded.dicomweb}/studies/{inst['StudyInstanceUID']}/series/"
            f"{inst['SeriesInstanceUID']}/instances/{sop}"
        )
        try:
            from pydicom.pixels.processing import apply_modality_lut

            hu = apply_modality_lut(ds.pixel_array, ds)
        except Exception:
            continue  # pydicom cannot decode it either
        if hu.ndim != 2 or hu.min() == hu.max():
            continue
        lo, hi = float(hu.min()), float(hu.max())
        r = requests.get(
            base + "/rendered",
            params={"window": f"{(lo + hi) / 2},{hi - lo}"},
            headers={"Accept": "image/png"},
        )
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(r.content))
        assert img.size == (int(ds.Columns), int(ds.Rows))
        assert len(set(img.tobytes())) > 8  # a picture, not a flat field
        t = requests.get(base + "/thumbnail")
        assert t.headers["Content-Type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(t.content)).size) <= 128
        rendered += 1
    assert rendered >= 10


def test_wado_uri(loaded: Loaded) -> None:
    sop = next(iter(loaded.model.files))
    inst = loaded.model.instances[sop]
    q = (
        f"requestType=WADO&studyUID={inst['StudyInstanceUID']}&seriesUID="
        f"{inst['SeriesInstanceUID']}&objectUID={sop}&contentType=application/dicom"
    )
    r = requests.get(f"{loaded.base}/wado?{q}")
    assert r.status_code == 200 and r.content[128:132] == b"DICM"
    assert requests.get(f"{loaded.base}/wado?requestType=WADO").status_code == 400


def test_unknown_uids_and_bad_requests_are_4xx(loaded: Loaded) -> None:
    d = loaded.dicomweb
    cases = [
        ("GET", f"{d}/studies/1.2.3.4.5.6", {}, b"", 404),
        ("GET", f"{d}/studies/1.2.3/series/4.5/instances/6.7/metadata", {}, b"", 404),
        ("GET", f"{d}/studies/not-a-uid", {}, b"", 400),
        ("POST", f"{d}/studies", {"Content-Type": "application/json"}, b"{}", 415),
        (
            "POST",
            f"{d}/studies",
            {"Content-Type": "multipart/related; type=application/dicom; boundary=x"},
            b"--x\r\nContent-Type: application/dicom\r\n\r\ntruncated",
            400,
        ),
        (
            "POST",
            f"{d}/studies",
            {"Content-Type": "multipart/related; type=application/dicom"},
            b"x",
            400,
        ),
        ("GET", f"{d}/studies", {"Accept": "image/gif"}, b"", 406),
    ]
    for method, url, headers, body, want in cases:
        r = requests.request(method, url, headers=headers, data=body)
        assert r.status_code == want, (method, url, r.status_code, r.text[:200])
        assert json.loads(r.text)["detail"]
    assert requests.get(loaded.base + "/health").status_code == 200  # still serving


def test_oversized_stow_is_413(tmp_path: Path) -> None:
    server, base = start_web(tmp_path / "small", extra=("--config", str(_small_limit(tmp_path))))
    try:
        body, ctype = multipart_body([accepted()[0].path.read_bytes()] * 3)
        r = requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
        assert r.status_code == 413
        assert "limit" in r.json()["detail"]
        assert requests.get(base + "/dicom-web/studies").json() == []
    finally:
        server.stop()


def _small_limit(tmp_path: Path) -> Path:
    cfg = tmp_path / "small.toml"
    cfg.write_text("[http]\nmax_upload = 2000\n")
    return cfg


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[str]:
    """A server with http.max_results = 3 holding five studies; its base URL."""
    from bench.synth import Spec, write

    files = write(Spec(studies=5, series=1, instances=1, size=16, seed="cap"), tmp_path / "src")
    server, base = start_web(tmp_path / "archive", env={"PACSGRID_HTTP_MAX_RESULTS": "3"})
    try:
        body, ctype = multipart_body([p.read_bytes() for p in files])
        r = requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        yield base
    finally:
        server.stop()


def _studies(base: str, query: str) -> tuple[int, str]:
    r = requests.get(f"{base}/dicom-web/studies{query}")
    assert r.status_code == 200, r.text
    return len(r.json()), r.headers.get("Warning", "")


def test_qido_results_capped_with_a_warning(capped: str) -> None:
    """docs/web.md (DICOMweb details): limit/offset capped at http.max_results, with a Warning
    header; fuzzymatching=true is answered with a Warning (no fuzzy matching), false without."""
    count, warning = _studies(capped, "?limit=10")
    assert count == 3 and warning.startswith("299 ") and "limit capped at 3" in warning
    assert _studies(capped, "?limit=2") == (2, "")
    assert _studies(capped, "?limit=3&offset=3") == (2, "")  # the rest, page by page
    count, warning = _studies(capped, "?limit=2&fuzzymatching=true&PatientName=X*")
    assert warning.startswith("299 ") and "fuzzy matching is not supported" in warning
    assert _studies(capped, "?limit=2&fuzzymatching=false") == (2, "")


def test_qido_without_limit_warns_when_it_cuts_the_answer(capped: str) -> None:
    count, warning = _studies(capped, "")
    assert count == 3
    assert warning.startswith("299 ") and "http.max_results" in warning


def _stored(loaded: Loaded, name: str) -> tuple[dict[str, str], Path]:
    (sop, path) = next((s, p) for s, p in loaded.model.files.items() if p.name == name)
    return loaded.model.instances[sop], path


def _instance_url(loaded: Loaded, inst: dict[str, str]) -> str:
    return (
        f"{loaded.dicomweb}/studies/{inst['StudyInstanceUID']}/series/"
        f"{inst['SeriesInstanceUID']}/instances/{inst['SOPInstanceUID']}"
    )


def test_bulkdata_is_the_attribute_value(loaded: Loaded) -> None:
    """WADO-RS bulkdata: a binary attribute's value, as pydicom reads it from the original
    file; the metadata's BulkDataURI leads to it."""
    inst, path = _stored(loaded, "vendor-ct.dcm")  # tests/synthetic.py: a private OB blob
    url = _instance_url(loaded, inst)
    original = _read(path)
    private = next(e for e in original if e.tag.is_private and e.VR == "OB")
    for tag, want in ((0x7FE00010, bytes(original.PixelData)), (int(private.tag), private.value)):
        single = requests.get(f"{url}/bulkdata/{tag:08X}")
        assert single.status_code == 200 and single.content == want, hex(tag)
        multi = requests.get(
            f"{url}/bulkdata/{tag:08X}",
            headers={"Accept": 'multipart/related; type="application/octet-stream"'},
        )
        assert parse_multipart(multi.headers["Content-Type"], multi.content) == [
            ("application/octet-stream", want)
        ]
    meta = requests.get(f"{url}/metadata").json()[0]
    uri = meta["7FE00010"]["BulkDataURI"]
    assert requests.get(uri).content == bytes(original.PixelData)
    assert requests.get(f"{url}/bulkdata/00100010").status_code == 404  # not bulk data
    assert requests.get(f"{url}/bulkdata/7FE0").status_code in (400, 404)


JPEG = "1.2.840.10008.1.2.4.50"  # JPEG Baseline


def test_wado_converts_to_an_uncompressed_syntax_on_request(loaded: Loaded) -> None:
    """docs/web.md: an uncompressed syntax is converted to on request. The pixels sent are those
    pydicom decodes from the original file (RLE is lossless: equal to the last bit), and a
    compressed syntax other than the stored one is refused with 406."""
    import numpy as np

    for name in ("multiframe-rle.dcm", "vendor-ct.dcm"):
        inst, path = _stored(loaded, name)
        original = _read(path)
        for ts in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"):
            r = requests.get(
                _instance_url(loaded, inst),
                headers={
                    "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ts}'
                },
            )
            assert r.status_code == 200, (name, ts, r.text[:200])
            ((ctype, data),) = parse_multipart(r.headers["Content-Type"], r.content)
            assert ctype == "application/dicom"
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.file_meta.TransferSyntaxUID == ts
            assert str(ds.SOPInstanceUID) == inst["SOPInstanceUID"]
            assert np.array_equal(ds.pixel_array, original.pixel_array), (name, ts)
    inst, _ = _stored(loaded, "multiframe-rle.dcm")
    r = requests.get(
        _instance_url(loaded, inst),
        headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JPEG}'},
    )
    assert r.status_code == 406
