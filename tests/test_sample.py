"""``medpipe sample brain-tumor``: synthetic brain MR studies with a tumour SEG.

Tiny grids (32x32 pixels of 6 mm, 8 slices of 16 mm: the same 192 x 128 mm field of view as
the default 128x128x32 grid) keep the whole module at a few seconds.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from medpipe.sample import CaseInfo, generate_brain_tumor, tumor_case_indices
from medpipe.sample.brain_tumor import LABEL_COLUMNS
from medpipe.sample.grid import Grid
from tests.dicom_checks import dciodvfy_errors, needs_dciodvfy

TINY = {"matrix": 32, "pixel_spacing": 6.0, "slices": 8, "slice_thickness": 16.0}
SEQUENCES = ("T1", "T1c", "T2", "FLAIR")
VOXEL_ML = 6.0 * 6.0 * 16.0 / 1000.0


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_series(directory: Path) -> list[pydicom.Dataset]:
    """All slices of a series, sorted along the slice normal (never by file name)."""
    datasets = [pydicom.dcmread(p) for p in directory.glob("*.dcm")]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def _labels(info: CaseInfo) -> np.ndarray:
    """Label map (slices, rows, cols) with values 0-3 read back from the SEG with highdicom."""
    import highdicom as hd

    assert info.seg_path is not None
    seg = hd.seg.segread(info.seg_path)
    flair = _read_series(info.series_dirs["FLAIR"])
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in flair],
        segment_numbers=[1, 2, 3],
        assert_missing_frames_are_empty=True,
    )
    labels = np.zeros(masks.shape[:3], dtype=np.uint8)
    for k in range(3):
        labels[masks[..., k] > 0] = k + 1
    return labels


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CaseInfo]]:
    out = tmp_path_factory.mktemp("sample") / "brain"
    return out, generate_brain_tumor(out, cases=2, seed=0, **TINY)


def _tumor_case(infos: list[CaseInfo]) -> CaseInfo:
    return next(i for i in infos if i.has_tumor)


def _free_case(infos: list[CaseInfo]) -> CaseInfo:
    return next(i for i in infos if not i.has_tumor)


def test_layout_and_labels_csv(sample: tuple[Path, list[CaseInfo]]) -> None:
    out, infos = sample
    assert [i.patient_id for i in infos] == ["MPS0001", "MPS0002"]
    assert {i.has_tumor for i in infos} == {True, False}  # both classes with >= 2 cases
    for info in infos:
        for seq in SEQUENCES:
            assert info.series_dirs[seq] == out / "dicom" / info.patient_id / seq
            assert sorted(p.name for p in info.series_dirs[seq].iterdir()) == [f"IM{i:04d}.dcm" for i in range(1, 9)]
        assert info.seg_path == out / "dicom" / info.patient_id / "SEG" / "seg.dcm"
        assert info.seg_path.is_file()
    assert (out / "sample.json").is_file()
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"

    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == LABEL_COLUMNS
    for row, info in zip(rows, infos, strict=True):
        assert row["patient_id"] == info.patient_id
        assert row["study_uid"] == info.study_uid
        assert int(row["has_tumor"]) == int(info.has_tumor)
        assert float(row["whole_tumor_ml"]) == pytest.approx(info.whole_tumor_ml, abs=1e-4)
        parts = sum(float(row[c]) for c in ("necrotic_ml", "edema_ml", "enhancing_ml"))
        assert parts == pytest.approx(float(row["whole_tumor_ml"]), abs=1e-3)

    free = _free_case(infos)
    assert (free.necrotic_ml, free.edema_ml, free.enhancing_ml, free.whole_tumor_ml) == (0, 0, 0, 0)
    tumor = _tumor_case(infos)
    assert 5.0 <= tumor.whole_tumor_ml <= 60.0
    assert min(tumor.necrotic_ml, tumor.edema_ml, tumor.enhancing_ml) > 0


def test_same_seed_gives_identical_bytes_other_seed_differs(
    sample: tuple[Path, list[CaseInfo]], tmp_path: Path
) -> None:
    out, _ = sample
    again = generate_brain_tumor(tmp_path / "again", cases=2, seed=0, **TINY)
    assert _hashes(out) == _hashes(tmp_path / "again")
    assert [i.study_uid for i in again] == [i.study_uid for i in sample[1]]

    other = generate_brain_tumor(tmp_path / "other", cases=2, seed=1, **TINY)
    assert {i.study_uid for i in other}.isdisjoint(i.study_uid for i in sample[1])
    a = pydicom.dcmread(out / "dicom/MPS0001/T1/IM0004.dcm").pixel_array
    b = pydicom.dcmread(tmp_path / "other/dicom/MPS0001/T1/IM0004.dcm").pixel_array
    assert not np.array_equal(a, b)


def test_mr_files_and_geometry(sample: tuple[Path, list[CaseInfo]]) -> None:
    _, infos = sample
    grid = Grid(**TINY)
    for info in infos:
        frames: set[str] = set()
        for seq in SEQUENCES:
            slices = _read_series(info.series_dirs[seq])
            assert len(slices) == 8
            first = slices[0]
            assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
            assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert first.Modality == "MR" and first.SeriesDescription == seq
            assert first.StudyInstanceUID == info.study_uid
            assert first.SeriesInstanceUID == info.series_uids[seq]
            assert str(first.PatientName) == f"Sample^Case{info.index + 1:04d}"
            assert len({ds.SeriesInstanceUID for ds in slices}) == 1
            assert len({ds.SOPInstanceUID for ds in slices}) == 8
            frames |= {ds.FrameOfReferenceUID for ds in slices}

            iop = np.asarray(first.ImageOrientationPatient, float)
            assert np.allclose(iop, [1, 0, 0, 0, 1, 0])
            normal = np.cross(iop[:3], iop[3:])
            positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in slices])
            steps = np.diff(positions, axis=0)
            assert np.allclose(steps, normal * 16.0, atol=1e-3), "positions not evenly spaced along the normal"
            assert np.allclose(positions[0], grid.slice_position(0), atol=1e-3)
            for k, ds in enumerate(slices):
                assert ds.InstanceNumber == k + 1
                assert float(ds.SliceLocation) == pytest.approx(float(np.dot(normal, positions[k])), abs=1e-3)
                assert [float(v) for v in ds.PixelSpacing] == [6.0, 6.0]
                assert float(ds.SliceThickness) == 16.0 and float(ds.SpacingBetweenSlices) == 16.0
                assert float(ds.get("RescaleSlope", 1)) == 1.0 and float(ds.get("RescaleIntercept", 0)) == 0.0
                pixels = ds.pixel_array
                assert pixels.shape == (32, 32) and pixels.dtype in (np.uint16, np.int16)
                assert int(pixels.max()) < 2**ds.BitsStored
        assert frames == {info.frame_of_reference_uid}


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(sample: tuple[Path, list[CaseInfo]]) -> None:
    _, infos = sample
    tumor, free = _tumor_case(infos), _free_case(infos)
    for path in (
        tumor.series_dirs["T1c"] / "IM0004.dcm",
        tumor.series_dirs["FLAIR"] / "IM0001.dcm",
        tumor.seg_path,
        free.seg_path,
    ):
        assert path is not None
        assert dciodvfy_errors(path) == [], path


def test_seg_matches_labels_csv(sample: tuple[Path, list[CaseInfo]]) -> None:
    _, infos = sample
    for info in infos:
        seg = pydicom.dcmread(info.seg_path)
        assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
        assert seg.StudyInstanceUID == info.study_uid
        assert seg.FrameOfReferenceUID == info.frame_of_reference_uid
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Necrotic core", "Edema", "Enhancing tumor"]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series_uids["FLAIR"]
        labels = _labels(info)
        assert labels.shape == (8, 32, 32)
        for value, volume in ((1, info.necrotic_ml), (2, info.edema_ml), (3, info.enhancing_ml)):
            assert np.count_nonzero(labels == value) * VOXEL_ML == pytest.approx(volume, abs=1e-3)
        assert np.count_nonzero(labels) * VOXEL_ML == pytest.approx(info.whole_tumor_ml, abs=1e-3)
    assert not _labels(_free_case(infos)).any()


def test_tumor_is_visible_in_the_expected_sequences(sample: tuple[Path, list[CaseInfo]]) -> None:
    _, infos = sample
    info = _tumor_case(infos)
    labels = _labels(info)
    vol = {seq: np.stack([ds.pixel_array for ds in _read_series(info.series_dirs[seq])]).astype(float)
           for seq in SEQUENCES}
    # Normal brain next to the tumour: a ring of two voxels in-plane around the whole tumour.
    tumor = labels > 0
    ring = ndimage.binary_dilation(tumor, structure=np.ones((1, 5, 5), bool)) & ~tumor
    ring &= vol["T1"] > 0.2 * vol["T1"].max()  # drop air
    edema, necrotic, enhancing = labels == 2, labels == 1, labels == 3
    assert vol["FLAIR"][edema].mean() > 1.3 * vol["FLAIR"][ring].mean()
    assert vol["T2"][edema].mean() > 1.3 * vol["T2"][ring].mean()
    assert vol["T1c"][enhancing].mean() > 1.3 * vol["T1c"][ring].mean()
    assert vol["T1c"][enhancing].mean() > 1.5 * vol["T1c"][necrotic].mean()
    assert vol["T2"][necrotic].mean() > vol["T2"][ring].mean()


def test_tumor_case_selection() -> None:
    for seed in range(20):
        assert len(tumor_case_indices(2, seed, 0.7)) == 1
        assert len(tumor_case_indices(2, seed, 0.05)) == 1
        assert len(tumor_case_indices(2, seed, 0.99)) == 1
    assert len(tumor_case_indices(12, 0, 0.7)) == 8
    assert tumor_case_indices(5, 3, 0.0) == frozenset()
    assert tumor_case_indices(5, 3, 1.0) == frozenset(range(5))
    assert tumor_case_indices(12, 0, 0.7) == tumor_case_indices(12, 0, 0.7)
    assert tumor_case_indices(12, 0, 0.7) != tumor_case_indices(12, 1, 0.7)


def test_default_grid_tumor_volumes() -> None:
    """On the default 128x128x32 grid every tumour is 5-60 mL with all three sub-regions."""
    from medpipe.sample.phantom import HeadModel, TumorModel

    grid = Grid()
    for seed in range(3):
        head = HeadModel(np.random.default_rng([seed, 0, 1]))
        anatomy = head.sample(grid)
        tumor = TumorModel(np.random.default_rng([seed, 0, 2]), head, grid).sample(grid, anatomy)
        counts = np.bincount(tumor.labels.ravel(), minlength=4)
        assert (counts[1:] > 0).all()
        assert 5.0 <= counts[1:].sum() * grid.voxel_volume_ml <= 60.0


def test_complete_output_is_reused_and_changed_parameters_regenerate(tmp_path: Path) -> None:
    out = tmp_path / "s"
    first = generate_brain_tumor(out, cases=2, seed=3, **TINY)
    marker = out / "sample.json"
    stamp = marker.stat().st_mtime_ns
    again = generate_brain_tumor(out, cases=2, seed=3, **TINY)
    assert again == first
    assert marker.stat().st_mtime_ns == stamp  # nothing rewritten

    fewer = generate_brain_tumor(out, cases=1, seed=3, tumor_fraction=1.0, **TINY)
    assert [i.patient_id for i in fewer] == ["MPS0001"]
    assert not (out / "dicom" / "MPS0002").exists(), "stale case of the earlier generation left behind"
    with open(out / "labels.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 1


def test_invalid_parameters_raise_medpipe_error(tmp_path: Path) -> None:
    from medpipe.errors import MedpipeError

    with pytest.raises(MedpipeError):
        generate_brain_tumor(tmp_path / "x", cases=0)
    with pytest.raises(MedpipeError):
        generate_brain_tumor(tmp_path / "x", cases=2, tumor_fraction=1.5)
    with pytest.raises(MedpipeError):
        generate_brain_tumor(tmp_path / "x", cases=2, matrix=4)


def test_cli_brain_tumor(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medpipe.cli import app

    out = tmp_path / "cli"
    args = ["sample", "brain-tumor", str(out), "--cases", "2", "--seed", "5", "--matrix", "32",
            "--pixel-spacing", "6", "--slices", "8", "--slice-thickness", "16"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Wrote 2 cases" in result.output
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in rows] == ["MPS0001", "MPS0002"]
    assert sorted(r["has_tumor"] for r in rows) == ["0", "1"]

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "already holds" in result.output

    result = runner.invoke(app, ["sample", "brain-tumor", str(out), "--tumor-fraction", "1.5"])
    assert result.exit_code != 0
