"""Deterministic synthetic chest / upper-abdomen CT studies with organ and lung-nodule ground truth.

These are **phantoms**: every body is built from simple analytic shapes (:mod:`medpipe.sample.chest_phantom`),
not from a patient. ``generate_chest_ct(out, cases=16, seed=0)`` writes::

    out/
      dicom/<PatientID>/CT/IM0001.dcm ...      CT Image Storage, one file per slice, HU via rescale
      dicom/<PatientID>/SEG/seg.dcm            the organs: a multi-segment DICOM SEG (SNOMED CT codes)
      dicom/<PatientID>/SR/nodules.dcm         the nodules: DICOM SR TID 1500, a SCOORD3D point and a
                                               diameter per nodule ("Nodule absent" when there is none)
      nodules.csv                              one row per nodule: centre (patient LPS, mm), diameter, kind
      studies.csv                              one row per study: geometry, nodule count, organ volumes
      sample.json                              parameters + per-study info, written last

What varies between studies (all drawn from the seed): patient size, shape, position on the table
and a few degrees of rotation; the diaphragm, airway, vessel and aorta geometry; slice thickness
(from 1.25, 1.5, 2, 2.5 and 3 mm within the requested range; slices are contiguous); the acquisition:
head-first supine axial, feet-first supine, head-first prone, or axial with a gantry tilt of 10-20
degrees (a sheared stack, which ingest resamples); noise (thinner slices and larger patients are
noisier). Each study has 0-6 nodules of 3-30 mm (solid, or part-solid: a ground-glass sphere with a
solid core), inside the lung, touching the pleura or touching a vessel; ``nodule_free_fraction`` of
the studies have none. The image is the phantom sampled at every pixel centre in world space with
partial-volume edges, blurred by the scanner's point spread (in plane and along the slice profile)
and given correlated noise; the labels are the phantom at the pixel centres, on the same frames.

The same parameters give byte-identical files; ``sample.json`` marks a complete generation, and
calling again with the same parameters returns the recorded studies without writing anything.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from medpipe.dicom.uids import derive_uid
from medpipe.errors import ConfigError, MedpipeError
from medpipe.io import atomic_path, csv_text, write_text_atomic
from medpipe.sample.chest_phantom import ORGANS, ChestModel, Nodule
from medpipe.sample.dicom_writer import MANUFACTURER, StudyHeader, _common_dataset, slice_from_template
from medpipe.workers import process_pool

log = logging.getLogger(__name__)

#: bumped whenever the generated content changes (it is part of every UID)
GENERATOR_VERSION = "1"
MODEL_NAME = "medpipe synthetic chest CT phantom"
_NAMESPACE = "medpipe.sample.chest_ct"
MARKER = "sample.json"
NODULES_CSV = "nodules.csv"
STUDIES_CSV = "studies.csv"
ACQUISITIONS: tuple[str, ...] = ("axial", "feet-first", "prone", "tilted")
THICKNESSES: tuple[float, ...] = (1.25, 1.5, 2.0, 2.5, 3.0)
NODULE_COLUMNS: tuple[str, ...] = ("patient_id", "study_uid", "series_uid", "nodule", "x_mm", "y_mm", "z_mm",
                                   "diameter_mm", "kind", "placement")
_PATIENT_DIR = re.compile(r"^CCT\d{4,}$")
_BASE_DATE = dt.date(2024, 3, 4)
#: the SNOMED CT type (pydicom ``codes.SCT`` keyword) of each organ segment; category "Anatomical Structure"
ORGAN_CODES: dict[str, str] = {
    "Lungs": "Lung", "Airways": "TracheaAndBronchus", "Heart": "Heart", "Aorta": "Aorta", "Liver": "Liver",
    "Spleen": "Spleen", "Kidneys": "Kidney", "Spine": "Spine",
}
#: display colours of the organ segments
ORGAN_COLOURS: dict[str, tuple[int, int, int]] = {
    "Lungs": (86, 180, 233), "Airways": (0, 158, 115), "Heart": (213, 94, 0), "Aorta": (204, 121, 167),
    "Liver": (230, 159, 0), "Spleen": (0, 114, 178), "Kidneys": (240, 228, 66), "Spine": (200, 200, 200),
}


def make_uid(*parts: object) -> str:
    return derive_uid(_NAMESPACE, GENERATOR_VERSION, *parts)


@dataclass(frozen=True)
class ChestCtParams:
    """Everything that determines the generated files."""

    cases: int = 16
    seed: int = 0
    matrix: int = 160
    min_thickness: float = 1.25
    max_thickness: float = 3.0
    nodule_free_fraction: float = 0.2
    max_nodules: int = 6

    def __post_init__(self) -> None:
        if self.cases < 1:
            raise ConfigError(f"cases must be at least 1, got {self.cases}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if not 16 <= self.matrix <= 1024:
            raise ConfigError(f"matrix must be 16-1024 pixels, got {self.matrix}")
        if not 0.5 <= self.min_thickness <= self.max_thickness <= 10.0:
            raise ConfigError(f"slice thickness range must satisfy 0.5 <= min <= max <= 10 mm, got "
                              f"{self.min_thickness}-{self.max_thickness}")
        if not 0.0 <= self.nodule_free_fraction <= 1.0:
            raise ConfigError(f"nodule-free fraction must be between 0 and 1, got {self.nodule_free_fraction}")
        if not 0 <= self.max_nodules <= 6:
            raise ConfigError(f"max nodules must be 0-6, got {self.max_nodules}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class ChestCase:
    """What was written for one study (paths absolute; nodule centres in patient LPS, mm)."""

    index: int
    patient_id: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    acquisition: str
    patient_position: str
    tilt_deg: float
    slice_thickness: float
    pixel_spacing: float
    rows: int
    slices: int
    series_dir: Path
    seg_path: Path
    sr_path: Path
    nodules: list[dict[str, Any]] = field(default_factory=list)
    organ_ml: dict[str, float] = field(default_factory=dict)

    def to_json(self, root: Path) -> dict[str, Any]:
        data = asdict(self)
        for key in ("series_dir", "seg_path", "sr_path"):
            data[key] = getattr(self, key).relative_to(root).as_posix()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> ChestCase:
        data = dict(data)
        for key in ("series_dir", "seg_path", "sr_path"):
            data[key] = root / data[key]
        return cls(**data)


@dataclass(frozen=True)
class ScanGeometry:
    """The slices of one acquisition: orientation, slice centres (file order), pixel size."""

    row: np.ndarray  # (3,) LPS direction of increasing column index
    col: np.ndarray  # (3,) LPS direction of increasing row index
    centres: np.ndarray  # (n, 3) LPS centre of each slice, in instance order
    size: int  # rows = columns
    pixel_spacing: float
    thickness: float
    tilt_deg: float
    position: str  # PatientPosition

    @property
    def iop(self) -> list[float]:
        return [round(float(v), 6) for v in (*self.row, *self.col)]

    def ipp(self, k: int) -> np.ndarray:
        half = (self.size - 1) / 2.0 * self.pixel_spacing
        return self.centres[k] - half * self.row - half * self.col

    def points(self, ks: range) -> np.ndarray:
        """LPS of every pixel centre of slices ``ks``: ``(3, len(ks), rows, columns)`` float32 (from the IPP and
        IOP values written to the files, so the image and the labels are where the headers say)."""
        idx = np.arange(self.size, dtype=np.float64) * self.pixel_spacing
        row = np.asarray(self.iop[:3])
        col = np.asarray(self.iop[3:])
        out = np.empty((3, len(ks), self.size, self.size), dtype=np.float32)
        for n, k in enumerate(ks):
            ipp = np.round(self.ipp(k), 4)
            for a in range(3):
                out[a, n] = ipp[a] + idx[None, :] * row[a] + idx[:, None] * col[a]
        return out


def _acquisitions(params: ChestCtParams) -> list[str]:
    """The acquisition of every study: about 55 % head-first supine axial, the rest feet-first, prone and
    gantry-tilted in turn (each at least once from 4 studies on), in an order drawn from the seed."""
    others = max(3 if params.cases >= 4 else 0, int(round(0.45 * params.cases)))
    kinds = [ACQUISITIONS[1 + i % 3] for i in range(others)] + ["axial"] * (params.cases - others)
    order = np.random.default_rng([params.seed, 0xAC9]).permutation(params.cases)
    return [kinds[int(i)] for i in order]


def nodule_free_indices(params: ChestCtParams) -> frozenset[int]:
    """The studies without nodules: ``round(fraction * cases)`` of them (at least one with and one without
    nodules when there are two or more studies and the fraction lies strictly between 0 and 1)."""
    n = int(round(params.nodule_free_fraction * params.cases))
    if params.cases >= 2 and 0.0 < params.nodule_free_fraction < 1.0:
        n = min(max(n, 1), params.cases - 1)
    order = np.random.default_rng([params.seed, 0x40D]).permutation(params.cases)
    return frozenset(int(i) for i in order[:n])


def scan_geometry(rng: np.random.Generator, model: ChestModel, params: ChestCtParams, acquisition: str
                  ) -> ScanGeometry:
    """Where the slices lie: the field of view follows the patient's size, the stack covers the body frame's
    ``z_range``."""
    choices = [t for t in THICKNESSES if params.min_thickness <= t <= params.max_thickness]
    thickness = float(rng.choice(choices)) if choices else \
        round(float(rng.uniform(params.min_thickness, params.max_thickness)), 2)
    fov = 2.0 * model.half_width + 70.0
    spacing = round(fov / params.matrix, 4)
    tilt = 0.0
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    position = "HFS"
    if acquisition == "feet-first":
        row, position = np.array([-1.0, 0.0, 0.0]), "FFS"
    elif acquisition == "prone":
        row, col, position = np.array([-1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0]), "HFP"
    elif acquisition == "tilted":
        tilt = float(rng.choice([-1.0, 1.0]) * rng.uniform(10.0, 20.0))
        t = np.deg2rad(tilt)
        col = np.array([0.0, np.cos(t), np.sin(t)])
    step = thickness / np.cos(np.deg2rad(tilt))  # table travel per slice: planes `thickness` apart
    z_lo, z_hi = model.origin[2] + model.z_range[0], model.origin[2] + model.z_range[1]
    n = int(round((z_hi - z_lo) / step)) + 1
    zs = z_lo + np.arange(n) * step
    if position in ("HFS", "HFP"):
        zs = zs[::-1]  # head first: the first image is the most superior
    centres = np.stack([np.zeros(n), np.zeros(n), zs], axis=1)
    return ScanGeometry(row, col, centres, params.matrix, spacing, thickness, round(tilt, 3), position)


def existing_generation(out: Path, params: ChestCtParams) -> list[ChestCase] | None:
    """The studies of a complete earlier generation in ``out`` with the same parameters, else None."""
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("generator") != _NAMESPACE or data.get("generator_version") != GENERATOR_VERSION \
            or data.get("parameters") != params.to_dict():
        return None
    try:
        cases = [ChestCase.from_json(c, out) for c in data["cases"]]
    except (KeyError, TypeError):
        return None
    for c in cases:
        if len(list(c.series_dir.glob("IM*.dcm"))) != c.slices or not c.seg_path.is_file() or not c.sr_path.is_file():
            return None
    if not (out / NODULES_CSV).is_file() or not (out / STUDIES_CSV).is_file():
        return None
    return cases


def generate_chest_ct(
    out: Path | str,
    cases: int = 16,
    seed: int = 0,
    *,
    matrix: int = 160,
    min_thickness: float = 1.25,
    max_thickness: float = 3.0,
    nodule_free_fraction: float = 0.2,
    max_nodules: int = 6,
    force: bool = False,
    workers: int = 1,
    progress: Callable[[ChestCase], None] | None = None,
) -> list[ChestCase]:
    """Write ``cases`` synthetic chest CT studies (CT + organ SEG + nodule SR) under ``out``; see the module
    docstring. Nothing is written when ``out`` already holds this generation (unless ``force``).

    ``workers``: processes generating studies at once (the files do not depend on it).
    """
    out = Path(out)
    params = ChestCtParams(cases, seed, matrix, min_thickness, max_thickness, nodule_free_fraction, max_nodules)
    if out.exists() and not out.is_dir():
        raise MedpipeError(f"{out} exists and is not a folder", hint="choose a folder for the sample data")
    if not force:
        previous = existing_generation(out, params)
        if previous is not None:
            log.info("%s already holds this sample (%d studies); nothing to do", out, len(previous))
            return previous
    _clear_previous(out)
    acquisitions = _acquisitions(params)
    without = nodule_free_indices(params)
    infos: list[ChestCase] = []
    jobs = [(out, params, index, acquisitions[index], index not in without) for index in range(cases)]
    pool = process_pool(workers, cases)
    try:
        results = pool.map(_generate_job, jobs) if pool is not None else map(_generate_job, jobs)
        for info in results:
            infos.append(info)
            if progress is not None:
                progress(info)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    rows = [row for i in infos for row in _nodule_rows(i)]
    write_text_atomic(out / NODULES_CSV, csv_text(rows, list(NODULE_COLUMNS)))
    write_text_atomic(out / STUDIES_CSV, studies_csv(infos))
    marker = {"generator": _NAMESPACE, "generator_version": GENERATOR_VERSION, "parameters": params.to_dict(),
              "note": "synthetic phantoms (analytic shapes), not patient data",
              "cases": [i.to_json(out) for i in infos]}
    write_text_atomic(out / MARKER, json.dumps(marker, indent=1) + "\n")
    return infos


def _generate_job(job: tuple[Path, ChestCtParams, int, str, bool]) -> ChestCase:
    return generate_case(*job)


def _clear_previous(out: Path) -> None:
    for name in (MARKER, NODULES_CSV, STUDIES_CSV):
        (out / name).unlink(missing_ok=True)
    dicom = out / "dicom"
    if dicom.is_dir():
        for child in dicom.iterdir():
            if child.is_dir() and _PATIENT_DIR.match(child.name):
                shutil.rmtree(child)


def _nodule_rows(info: ChestCase) -> list[dict[str, Any]]:
    return [{"patient_id": info.patient_id, "study_uid": info.study_uid, "series_uid": info.series_uid,
             "nodule": n["nodule"], "x_mm": n["center_lps"][0], "y_mm": n["center_lps"][1],
             "z_mm": n["center_lps"][2], "diameter_mm": n["diameter_mm"], "kind": n["kind"],
             "placement": n["placement"]} for n in info.nodules]


def studies_csv(infos: list[ChestCase]) -> str:
    columns = ["patient_id", "study_uid", "series_uid", "acquisition", "patient_position", "tilt_deg",
               "slice_thickness_mm", "pixel_spacing_mm", "rows", "slices", "n_nodules",
               *[f"{name.lower()}_ml" for name in ORGANS.values()]]
    rows = [{"patient_id": i.patient_id, "study_uid": i.study_uid, "series_uid": i.series_uid,
             "acquisition": i.acquisition, "patient_position": i.patient_position, "tilt_deg": i.tilt_deg,
             "slice_thickness_mm": i.slice_thickness, "pixel_spacing_mm": i.pixel_spacing, "rows": i.rows,
             "slices": i.slices, "n_nodules": len(i.nodules),
             **{f"{name.lower()}_ml": i.organ_ml.get(name, 0.0) for name in ORGANS.values()}} for i in infos]
    return csv_text(rows, columns)


def _demographics(rng: np.random.Generator, study_date: dt.date) -> tuple[str, str, str]:
    age = int(rng.integers(50, 80))  # lung screening ages
    sex = "F" if rng.random() < 0.5 else "M"
    birth = dt.date(study_date.year - age, 1, 1) - dt.timedelta(days=int(rng.integers(1, 365)))
    age = study_date.year - birth.year - ((study_date.month, study_date.day) < (birth.month, birth.day))
    return birth.strftime("%Y%m%d"), sex, f"{age:03d}Y"


def render_study(model: ChestModel, geo: ScanGeometry, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Stored pixel values (uint16, HU + 1024) and labels of every slice ``(slices, rows, columns)``."""
    from scipy import ndimage

    n = len(geo.centres)
    hu = np.empty((n, geo.size, geo.size), dtype=np.float32)
    labels = np.empty((n, geo.size, geo.size), dtype=np.uint8)
    ramp = float(np.cbrt(geo.pixel_spacing**2 * geo.thickness))
    chunk = max(1, 1_500_000 // (geo.size * geo.size))
    for start in range(0, n, chunk):
        ks = range(start, min(n, start + chunk))
        r = model.render(geo.points(ks), ramp)
        hu[ks.start:ks.stop], labels[ks.start:ks.stop] = r.hu, r.labels
    # the scanner: point spread in plane (~1 mm FWHM) and the slice profile, then correlated quantum noise
    sigma_plane = max(0.45, 0.45 / geo.pixel_spacing)
    hu = ndimage.gaussian_filter(hu, sigma=(0.4, sigma_plane, sigma_plane), mode="nearest")
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), sigma=(0.0, 0.7, 0.7))
    level = (9.0 + 30.0 * (model.scale - 0.9)) * np.sqrt(2.5 / geo.thickness)
    hu += noise * np.float32(level / max(float(noise.std()), 1e-6))
    stored = np.clip(np.rint(hu) + 1024.0, 0, 4095).astype(np.uint16)
    return stored, labels


def study_model(params: ChestCtParams, index: int, acquisition: str, with_nodules: bool
                ) -> tuple[ChestModel, ScanGeometry]:
    """The phantom (with its nodules) and the scan geometry of study ``index``: what its files are made from
    (tests sample the phantom at any point with :meth:`ChestModel.render`)."""

    def stream(*tag: int) -> np.random.Generator:
        return np.random.default_rng([params.seed, index, *tag])

    model = ChestModel.draw(stream(1))
    geo = scan_geometry(stream(2), model, params, acquisition)
    model.table_side = -1.0 if geo.position.endswith("P") else 1.0
    count = int(stream(3).integers(1, params.max_nodules + 1)) if with_nodules and params.max_nodules else 0
    margin = 15.0
    model.place_nodules(stream(4), count, (model.z_range[0] + margin, model.z_range[1] - margin))
    return model, geo


def generate_case(out: Path, params: ChestCtParams, index: int, acquisition: str, with_nodules: bool) -> ChestCase:
    """Simulate and write one study; see :func:`generate_chest_ct`."""

    def stream(*tag: int) -> np.random.Generator:
        return np.random.default_rng([params.seed, index, *tag])

    model, geo = study_model(params, index, acquisition, with_nodules)
    nodules = model.nodules
    stored, labels = render_study(model, geo, stream(5))

    number = index + 1
    patient_id = f"CCT{number:04d}"
    study_date = _BASE_DATE + dt.timedelta(days=index)
    birth, sex, age = _demographics(stream(6), study_date)
    key = (params.key(), index)
    study = StudyHeader(
        patient_name=f"Phantom^Chest{number:04d}", patient_id=patient_id, patient_birth_date=birth, patient_sex=sex,
        patient_age=age, study_uid=make_uid(*key, "study"), study_date=study_date.strftime("%Y%m%d"),
        study_time="083000", accession_number=f"CCTACC{number:04d}", study_id="1",
        frame_of_reference_uid=make_uid(*key, "frame-of-reference"),
        study_description="Synthetic chest CT phantom (medpipe sample data)",
    )
    case_dir = out / "dicom" / patient_id
    series_uid = make_uid(*key, "CT", "series")
    sources = write_ct_series(case_dir / "CT", stored, geo, study, series_uid, uid_key=(*key, "CT"))
    seg_path = case_dir / "SEG" / "seg.dcm"
    _write_organ_seg(seg_path, sources, labels, study, key)
    sr_path = case_dir / "SR" / "nodules.dcm"
    _write_nodule_sr(sr_path, sources, nodules, study, key)
    voxel_ml = geo.pixel_spacing**2 * geo.thickness / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(ORGANS) + 1)
    return ChestCase(
        index=index, patient_id=patient_id, study_uid=study.study_uid, series_uid=series_uid,
        frame_of_reference_uid=study.frame_of_reference_uid, acquisition=acquisition,
        patient_position=geo.position, tilt_deg=geo.tilt_deg, slice_thickness=geo.thickness,
        pixel_spacing=geo.pixel_spacing, rows=geo.size, slices=len(geo.centres), series_dir=case_dir / "CT",
        seg_path=seg_path, sr_path=sr_path,
        nodules=[{"nodule": i, "center_lps": list(n.center_lps), "diameter_mm": n.diameter_mm, "kind": n.kind,
                  "placement": n.placement} for i, n in enumerate(nodules, start=1)],
        organ_ml={name: round(float(counts[v]) * voxel_ml, 3) for v, name in ORGANS.items()},
    )


def write_ct_series(directory: Path, stored: np.ndarray, geo: ScanGeometry, study: StudyHeader, series_uid: str,
                    uid_key: tuple[object, ...]) -> list[Dataset]:
    """One CT Image Storage file per slice (``IM0001.dcm`` in instance order); return their headers."""
    ds = _common_dataset(study, MODEL_NAME, f"chest_ct {GENERATOR_VERSION}")
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.SeriesDescription = f"Chest {geo.thickness:g}mm" + (" tilt" if geo.tilt_deg else "")
    ds.SeriesDate = study.study_date
    ds.SeriesTime = "083500"
    ds.ProtocolName = "Low-dose chest CT"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = geo.position
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.AcquisitionTime = ds.ContentTime = "083500"
    ds.ImageComments = "Synthetic phantom generated by medpipe; not from a patient."
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.KVP = 120
    ds.DataCollectionDiameter = 500
    ds.ReconstructionDiameter = round(geo.size * geo.pixel_spacing, 2)
    ds.GantryDetectorTilt = geo.tilt_deg
    ds.TableHeight = 150
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 40
    ds.ConvolutionKernel = "B"
    ds.PixelSpacing = [geo.pixel_spacing, geo.pixel_spacing]
    ds.ImageOrientationPatient = geo.iop
    ds.SliceThickness = geo.thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = geo.size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = [-600, 40]
    ds.WindowWidth = [1500, 400]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.SOPClassUID = CTImageStorage
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = "083500"
    directory.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(len(geo.centres))))
    written = []
    for k in range(len(geo.centres)):
        sl = slice_from_template(ds, make_uid(*uid_key, "slice", k), k + 1)
        ipp = [round(float(v), 4) for v in geo.ipp(k)]
        sl.ImagePositionPatient = ipp
        sl.SliceLocation = round(ipp[2], 4)
        frame = np.ascontiguousarray(stored[k], dtype="<u2")
        sl.PixelData = frame.tobytes()
        with atomic_path(directory / f"IM{k + 1:0{digits}d}.dcm") as tmp:
            pydicom.dcmwrite(tmp, sl, enforce_file_format=True)
        del sl.PixelData
        written.append(sl)
    return written


def _equipment() -> Any:
    from medpipe.dicom.output import Equipment

    return Equipment(manufacturer=MANUFACTURER, model_name=MODEL_NAME,
                     software_versions=f"chest_ct {GENERATOR_VERSION}", device_serial_number="0",
                     institution_name="medpipe synthetic data")


def _algorithm() -> Any:
    from pydicom.sr.codedict import codes

    from medpipe.dicom.output import AlgorithmSpec

    # the ground truth is the model that made the image; "Deformable Models" (CID 7162) describes it best
    return AlgorithmSpec(name="medpipe synthetic chest CT phantom", family=codes.cid7162.DeformableModels,
                         version=GENERATOR_VERSION, source=MANUFACTURER)


def organ_segment_specs(uid_key: tuple[object, ...] | None = None) -> list[Any]:
    """The SEG segment of each organ (:data:`ORGANS` order): SNOMED CT category "Anatomical Structure" and type."""
    from pydicom.sr.codedict import codes

    from medpipe.dicom.seg import SegmentSpec

    return [SegmentSpec(label=name, category=codes.SCT.AnatomicalStructure, type=getattr(codes.SCT, ORGAN_CODES[name]),
                        color=ORGAN_COLOURS[name], tracking_id=name,
                        tracking_uid=make_uid(*uid_key, "segment", value) if uid_key else None)
            for value, name in ORGANS.items()]


def _write_organ_seg(target: Path, sources: list[Dataset], labels: np.ndarray, study: StudyHeader,
                     key: tuple[object, ...]) -> None:
    from medpipe.dicom.output import OutputIdentity
    from medpipe.dicom.seg import write_seg

    identity = OutputIdentity(series_instance_uid=make_uid(*key, "SEG", "series"),
                              sop_instance_uid=make_uid(*key, "SEG", "instance"), series_number=100,
                              created=dt.datetime.strptime(study.study_date + "090000", "%Y%m%d%H%M%S"),
                              series_description="SEG organs ground truth")
    write_seg(target, sources, labels, organ_segment_specs((*key, "SEG")), _algorithm(), identity,
              equipment=_equipment(), content_label="ORGANS", content_description="Ground truth of the phantom organs")


def _write_nodule_sr(target: Path, sources: list[Dataset], nodules: list[Nodule], study: StudyHeader,
                     key: tuple[object, ...]) -> None:
    from medpipe.dicom.output import OutputIdentity
    from medpipe.dicom.sr import PointFinding, write_findings_sr

    identity = OutputIdentity(series_instance_uid=make_uid(*key, "SR", "series"),
                              sop_instance_uid=make_uid(*key, "SR", "instance"), series_number=101,
                              created=dt.datetime.strptime(study.study_date + "090000", "%Y%m%d%H%M%S"),
                              series_description="SR nodules ground truth")
    findings = [PointFinding(center=n.center_lps, diameter_mm=n.diameter_mm, label=f"Nodule {i}",
                             tracking_uid=make_uid(*key, "nodule", i))
                for i, n in enumerate(nodules, start=1)]
    write_findings_sr(target, sources, findings, _algorithm(), identity, equipment=_equipment())
