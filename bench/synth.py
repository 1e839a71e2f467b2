"""Deterministic synthetic CT datasets for benchmarks and load tests.

    python -m bench.synth --out /tmp/ct --studies 50 --series 2 --instances 100 --size 64

Every run with the same arguments writes byte-identical files: UIDs derive from the seed and
the position (study, series, instance), pixel data from a seeded generator. Tags are those of a
real CT (patient, study, series, frame of reference, image plane and pixel modules), explicit VR
little endian, so that indexing costs what it costs with real scanners.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

FAMILY = [
    "SMITH",
    "JONES",
    "GARCIA",
    "MULLER",
    "ROSSI",
    "NGUYEN",
    "DUBOIS",
    "KOWALSKI",
    "TANAKA",
    "SILVA",
    "OKAFOR",
    "JANSEN",
]
GIVEN = ["ANNA", "JOHN", "MARIA", "PETER", "LENA", "OMAR", "SOFIA", "HUGO", "MEI", "IVAN"]
MODALITY_DESCRIPTIONS = ["CT CHEST W/O CONTRAST", "CT ABDOMEN PELVIS", "CT HEAD", "CT ANGIO"]


def uid(seed: str, *parts: object) -> str:
    digest = hashlib.sha256("/".join([seed, *map(str, parts)]).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:15], "big"))


@dataclass(frozen=True)
class Spec:
    studies: int = 10
    series: int = 2
    instances: int = 10
    size: int = 64
    seed: str = "pacsgrid"
    patients: int = 0  # 0: one patient per 2 studies

    @property
    def total(self) -> int:
        return self.studies * self.series * self.instances


def study_date(n: int) -> str:
    year = 2005 + (n * 7) % 20
    month = 1 + (n * 5) % 12
    day = 1 + (n * 11) % 28
    return f"{year:04d}{month:02d}{day:02d}"


@dataclass(frozen=True)
class StudyInfo:
    """The study-level keys of one synthetic study: what a C-FIND should find, computed
    without writing (or reading) a single file."""

    number: int
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    instances: int


def patient_name(p: int) -> str:
    return f"{FAMILY[p % len(FAMILY)]}^{GIVEN[(p // len(FAMILY)) % len(GIVEN)]}^{p}"


def studies(spec: Spec) -> Iterator[StudyInfo]:
    patients = spec.patients or max(1, spec.studies // 2)
    for st in range(spec.studies):
        p = st % patients
        yield StudyInfo(
            st,
            uid(spec.seed, "study", st),
            f"P{p:07d}",
            patient_name(p),
            study_date(st),
            spec.series * spec.instances,
        )


def datasets(spec: Spec) -> Iterator[tuple[str, Dataset]]:
    """(relative file name, dataset) for every instance of `spec`."""
    rng = np.random.default_rng(int(hashlib.sha256(spec.seed.encode()).hexdigest()[:8], 16))
    base = rng.integers(0, 1200, size=(spec.size, spec.size), dtype=np.uint16)
    patients = spec.patients or max(1, spec.studies // 2)
    for info in studies(spec):
        st = info.number
        p = st % patients
        name = info.patient_name
        study_uid = info.study_uid
        for se in range(spec.series):
            series_uid = uid(spec.seed, "series", st, se)
            for i in range(spec.instances):
                ds = Dataset()
                ds.SpecificCharacterSet = "ISO_IR 100"
                ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
                ds.SOPClassUID = CTImageStorage
                ds.SOPInstanceUID = uid(spec.seed, "instance", st, se, i)
                ds.StudyDate = study_date(st)
                ds.SeriesDate = ds.StudyDate
                ds.ContentDate = ds.StudyDate
                ds.StudyTime = f"{8 + st % 10:02d}{(st * 7) % 60:02d}00"
                ds.SeriesTime = ds.StudyTime
                ds.ContentTime = ds.StudyTime
                ds.AccessionNumber = f"A{st:08d}"
                ds.Modality = "CT"
                ds.Manufacturer = "PACSGRID SYNTHETIC"
                ds.InstitutionName = "General Hospital"
                ds.ReferringPhysicianName = "WELBY^MARCUS"
                ds.StudyDescription = MODALITY_DESCRIPTIONS[st % len(MODALITY_DESCRIPTIONS)]
                ds.SeriesDescription = f"AXIAL {5 - se % 3}.0"
                ds.PatientName = name
                ds.PatientID = f"P{p:07d}"
                ds.PatientBirthDate = f"{1940 + p % 60:04d}0{1 + p % 9}15"
                ds.PatientSex = "MF"[p % 2]
                ds.BodyPartExamined = "CHEST"
                ds.SliceThickness = "1.25"
                ds.KVP = "120"
                ds.StudyInstanceUID = study_uid
                ds.SeriesInstanceUID = series_uid
                ds.StudyID = str(st)
                ds.SeriesNumber = str(se + 1)
                ds.InstanceNumber = str(i + 1)
                ds.FrameOfReferenceUID = uid(spec.seed, "frame", st)
                ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-i * 1.25:.2f}"]
                ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
                ds.SliceLocation = f"{-i * 1.25:.2f}"
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.Rows = spec.size
                ds.Columns = spec.size
                ds.PixelSpacing = ["0.7", "0.7"]
                ds.BitsAllocated = 16
                ds.BitsStored = 12
                ds.HighBit = 11
                ds.PixelRepresentation = 0
                ds.WindowCenter = "40"
                ds.WindowWidth = "400"
                ds.RescaleIntercept = "-1024"
                ds.RescaleSlope = "1"
                ds.PixelData = (
                    ((base + (st * 31 + se * 7 + i) % 97) % 4096).astype(np.uint16).tobytes()
                )
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = ds.SOPClassUID
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta = meta
                yield f"{st:05d}/{se:02d}/{i:05d}.dcm", ds


def write(spec: Spec, out: Path, on_file: Callable[[Path], None] | None = None) -> list[Path]:
    """Write the dataset tree under `out`; files already there are kept (same bytes).

    A file appears under its final name only once complete (written to a temporary name,
    then renamed), so an interrupted run resumes where it stopped. `on_file` is called after
    each file (progress).
    """
    paths = []
    for rel, ds in datasets(spec):
        path = out / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            ds.save_as(tmp, enforce_file_format=True)
            tmp.rename(path)
        paths.append(path)
        if on_file is not None:
            on_file(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--studies", type=int, default=10)
    ap.add_argument("--series", type=int, default=2)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", default="pacsgrid")
    ap.add_argument("--patients", type=int, default=0, help="0: one patient per 2 studies")
    a = ap.parse_args()
    paths = write(Spec(a.studies, a.series, a.instances, a.size, a.seed, a.patients), a.out)
    print(f"{len(paths)} files under {a.out}")


if __name__ == "__main__":
    main()
