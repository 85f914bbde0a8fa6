"""Deterministic synthetic multi-parametric brain MR studies with tumour ground truth.

``generate_brain_tumor(out, cases=12, seed=0)`` writes::

    out/
      dicom/<PatientID>/<T1|T1c|T2|FLAIR>/IM0001.dcm ...   single-frame MR Image Storage
      dicom/<PatientID>/SEG/seg.dcm                        DICOM SEG (3 segments) on the FLAIR
      labels.csv                                           one row per case, volumes in mL
      sample.json                                          parameters + per-case info, written last

The same parameters give byte-identical files. ``sample.json`` marks a complete generation:
calling again with the same parameters returns the recorded cases without writing anything.
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
from pydicom.dataset import Dataset

from medpipe.errors import ConfigError, MedpipeError
from medpipe.io import csv_text, write_text_atomic
from medpipe.sample.contrast import SEQUENCES, ScanEffects, render
from medpipe.sample.dicom_writer import (
    GENERATOR_VERSION,
    PROTOCOLS,
    StudyHeader,
    make_uid,
    write_mr_series,
    write_seg,
)
from medpipe.sample.grid import Grid
from medpipe.sample.phantom import EDEMA, ENHANCING, NECROTIC, HeadModel, TumorModel

log = logging.getLogger(__name__)

#: Series numbers in acquisition order (contrast-enhanced T1 last).
SERIES_NUMBERS: dict[str, int] = {"T1": 1, "T2": 2, "FLAIR": 3, "T1c": 4}
SEG_SOURCE_SERIES = "FLAIR"
LABELS_CSV = "labels.csv"
MARKER = "sample.json"
LABEL_COLUMNS: tuple[str, ...] = (
    "patient_id", "study_uid", "has_tumor", "necrotic_ml", "edema_ml", "enhancing_ml", "whole_tumor_ml",
)
_PATIENT_DIR = re.compile(r"^MPS\d{4,}$")
_BASE_DATE = dt.date(2024, 1, 15)


@dataclass(frozen=True)
class BrainTumorParams:
    """Everything that determines the generated files."""

    cases: int = 12
    seed: int = 0
    tumor_fraction: float = 0.7
    matrix: int = 128
    pixel_spacing: float = 1.5
    slices: int = 32
    slice_thickness: float = 4.0

    def __post_init__(self) -> None:
        if self.cases < 1:
            raise ConfigError(f"cases must be at least 1, got {self.cases}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if not 0.0 <= self.tumor_fraction <= 1.0:
            raise ConfigError(f"tumor fraction must be between 0 and 1, got {self.tumor_fraction}")
        self.grid  # noqa: B018 - validates the grid parameters

    @property
    def grid(self) -> Grid:
        return Grid(self.matrix, self.pixel_spacing, self.slices, self.slice_thickness)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        """Canonical text of the parameters, part of every UID."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class CaseInfo:
    """What was written for one case (paths are absolute)."""

    index: int
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    has_tumor: bool
    series_dirs: dict[str, Path]
    series_uids: dict[str, str]
    seg_path: Path | None
    necrotic_ml: float = 0.0
    edema_ml: float = 0.0
    enhancing_ml: float = 0.0
    whole_tumor_ml: float = 0.0
    voxel_counts: dict[str, int] = field(default_factory=dict)

    def to_json(self, root: Path) -> dict[str, Any]:
        data = asdict(self)
        data["series_dirs"] = {k: v.relative_to(root).as_posix() for k, v in self.series_dirs.items()}
        data["seg_path"] = self.seg_path.relative_to(root).as_posix() if self.seg_path else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> CaseInfo:
        data = dict(data)
        data["series_dirs"] = {k: root / v for k, v in data["series_dirs"].items()}
        data["seg_path"] = root / data["seg_path"] if data.get("seg_path") else None
        return cls(**data)


def tumor_case_indices(cases: int, seed: int, tumor_fraction: float) -> frozenset[int]:
    """Which cases carry a tumour: ``round(fraction * cases)`` of them, chosen from the seed.

    With at least two cases and a fraction strictly between 0 and 1, both classes occur.
    """
    n = int(round(tumor_fraction * cases))
    if cases >= 2 and 0.0 < tumor_fraction < 1.0:
        n = min(max(n, 1), cases - 1)
    order = np.random.default_rng([seed, 0x7E57]).permutation(cases)
    return frozenset(int(i) for i in order[:n])


def existing_generation(out: Path, params: BrainTumorParams) -> list[CaseInfo] | None:
    """The cases of a complete earlier generation in ``out`` with the same parameters, else None."""
    marker = out / MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("generator_version") != GENERATOR_VERSION or data.get("parameters") != params.to_dict():
        return None
    try:
        infos = [CaseInfo.from_json(c, out) for c in data["cases"]]
    except (KeyError, TypeError):
        return None
    for info in infos:
        for directory in info.series_dirs.values():
            if len(list(directory.glob("IM*.dcm"))) != params.slices:
                return None
        if info.seg_path is not None and not info.seg_path.is_file():
            return None
    if not (out / LABELS_CSV).is_file():
        return None
    return infos


def generate_brain_tumor(
    out: Path | str,
    cases: int = 12,
    seed: int = 0,
    tumor_fraction: float = 0.7,
    *,
    matrix: int = 128,
    pixel_spacing: float = 1.5,
    slices: int = 32,
    slice_thickness: float = 4.0,
    force: bool = False,
    progress: Callable[[CaseInfo], None] | None = None,
) -> list[CaseInfo]:
    """Write ``cases`` synthetic brain MR studies (T1, T1c, T2, FLAIR + SEG) under ``out``.

    Returns one :class:`CaseInfo` per case. If ``out`` already holds a complete generation
    with the same parameters, nothing is written (unless ``force``) and its cases are
    returned. ``progress`` is called after each case is written.
    """
    out = Path(out)
    params = BrainTumorParams(cases, seed, tumor_fraction, matrix, pixel_spacing, slices, slice_thickness)
    grid = params.grid
    if grid.matrix * grid.pixel_spacing < 170 or grid.slices * grid.spacing_between_slices < 80:
        log.warning(
            "field of view %.0f x %.0f mm does not cover the synthetic head (about 190 x 120 mm)",
            grid.matrix * grid.pixel_spacing, grid.slices * grid.spacing_between_slices,
        )
    if out.exists() and not out.is_dir():
        raise MedpipeError(f"{out} exists and is not a folder", hint="choose a folder for the sample data")
    if not force:
        previous = existing_generation(out, params)
        if previous is not None:
            log.info("%s already holds this sample (%d cases); nothing to do", out, len(previous))
            return previous
    _clear_previous(out)

    with_tumor = tumor_case_indices(cases, seed, tumor_fraction)
    infos: list[CaseInfo] = []
    for index in range(cases):
        info = generate_case(out, params, index, index in with_tumor)
        infos.append(info)
        if progress is not None:
            progress(info)

    write_text_atomic(out / LABELS_CSV, labels_csv(infos))

    marker = {
        "generator": "medpipe.sample.brain_tumor",
        "generator_version": GENERATOR_VERSION,
        "parameters": params.to_dict(),
        "cases": [info.to_json(out) for info in infos],
    }
    write_text_atomic(out / MARKER, json.dumps(marker, indent=2) + "\n")
    return infos


def _clear_previous(out: Path) -> None:
    """Remove what an earlier (different or unfinished) generation left; nothing else."""
    for name in (MARKER, LABELS_CSV):
        (out / name).unlink(missing_ok=True)
    dicom = out / "dicom"
    if dicom.is_dir():
        for child in dicom.iterdir():
            if child.is_dir() and _PATIENT_DIR.match(child.name):
                shutil.rmtree(child)


def labels_csv(infos: list[CaseInfo]) -> str:
    values = [(i.patient_id, i.study_uid, int(i.has_tumor), f"{i.necrotic_ml:.4f}", f"{i.edema_ml:.4f}",
               f"{i.enhancing_ml:.4f}", f"{i.whole_tumor_ml:.4f}") for i in infos]
    return csv_text([dict(zip(LABEL_COLUMNS, v, strict=True)) for v in values], list(LABEL_COLUMNS))


def _demographics(rng: np.random.Generator, study_date: dt.date) -> tuple[str, str, str]:
    """Birth date, sex and age string."""
    age = int(rng.integers(25, 80))
    sex = "F" if rng.random() < 0.5 else "M"
    birth = dt.date(study_date.year - age, 1, 1) - dt.timedelta(days=int(rng.integers(1, 365)))
    age = study_date.year - birth.year - ((study_date.month, study_date.day) < (birth.month, birth.day))
    return birth.strftime("%Y%m%d"), sex, f"{age:03d}Y"


def generate_case(out: Path, params: BrainTumorParams, index: int, has_tumor: bool) -> CaseInfo:
    """Simulate and write one case; see :func:`generate_brain_tumor`."""
    grid = params.grid
    seed = params.seed

    def stream(*tag: int) -> np.random.Generator:
        return np.random.default_rng([seed, index, *tag])

    head = HeadModel(stream(1))
    anatomy = head.sample(grid)
    tumor = TumorModel(stream(2), head, grid).sample(grid, anatomy) if has_tumor else None
    effects = ScanEffects.draw(stream(3))
    points = grid.points()

    number = index + 1
    patient_id = f"MPS{number:04d}"
    study_date = _BASE_DATE + dt.timedelta(days=index)
    birth, sex, age = _demographics(stream(4), study_date)
    key = (params.key(), index)
    study = StudyHeader(
        patient_name=f"Sample^Case{number:04d}",
        patient_id=patient_id,
        patient_birth_date=birth,
        patient_sex=sex,
        patient_age=age,
        study_uid=make_uid(*key, "study"),
        study_date=study_date.strftime("%Y%m%d"),
        study_time="090000",
        accession_number=f"MPSACC{number:04d}",
        study_id="1",
        frame_of_reference_uid=make_uid(*key, "frame-of-reference"),
    )

    case_dir = out / "dicom" / patient_id
    series_dirs: dict[str, Path] = {}
    series_uids: dict[str, str] = {}
    seg_sources: list[Dataset] = []
    for sequence in sorted(SEQUENCES, key=SERIES_NUMBERS.__getitem__):
        s = SEQUENCES.index(sequence)
        pixels = render(sequence, grid, anatomy, tumor, effects, stream(5, s), points)
        series_number = SERIES_NUMBERS[sequence]
        series_uid = make_uid(*key, sequence, "series")
        directory = case_dir / sequence
        written = write_mr_series(
            directory, pixels, grid, study, PROTOCOLS[sequence], series_number, series_uid,
            series_time=f"09{5 * series_number:02d}00", uid_key=(*key, sequence),
        )
        series_dirs[sequence] = directory
        series_uids[sequence] = series_uid
        if sequence == SEG_SOURCE_SERIES:
            seg_sources = written

    labels = tumor.labels if tumor is not None else np.zeros(grid.shape, dtype=np.uint8)
    seg_path = case_dir / "SEG" / "seg.dcm"
    seg_uid = make_uid(*key, "SEG", "series")
    write_seg(
        seg_path, seg_sources, labels, study, series_uid=seg_uid,
        sop_uid=make_uid(*key, "SEG", "instance"), series_time="100000", uid_key=(*key, "SEG"),
    )
    series_uids["SEG"] = seg_uid

    counts = {name: int(np.count_nonzero(labels == value))
              for name, value in (("necrotic", NECROTIC), ("edema", EDEMA), ("enhancing", ENHANCING))}
    ml = {name: round(count * grid.voxel_volume_ml, 4) for name, count in counts.items()}
    whole = sum(counts.values())
    return CaseInfo(
        index=index,
        patient_id=patient_id,
        study_uid=study.study_uid,
        frame_of_reference_uid=study.frame_of_reference_uid,
        has_tumor=has_tumor,
        series_dirs=series_dirs,
        series_uids=series_uids,
        seg_path=seg_path,
        necrotic_ml=ml["necrotic"],
        edema_ml=ml["edema"],
        enhancing_ml=ml["enhancing"],
        whole_tumor_ml=round(whole * grid.voxel_volume_ml, 4),
        voxel_counts={**counts, "whole_tumor": whole},
    )
