"""medpipe ingest against reference conversions of real scanner data (``../shared/data``).

* ``dcm_qa``: Siemens mosaic EPI in axial / coronal / sagittal, ascending / descending /
  interleaved, JPEG lossless and JPEG 2000; ``Ref/`` made by dcm2niix's maintainers.
* ``dcm_qa_enh``: enhanced multi-frame (Philips field map with two frame types, Siemens XA10 SMS).
* ``totalseg_ct``: a de-identified JPEG 2000 CT whose label map must share its grid.
* pydicom's own test files: every one ingested or rejected with a reason, never a crash.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medpipe.catalog import split_keys
from medpipe.ingest import ingest
from tests.conftest import DATA, find_tool, world_compare


def _ref_series_number(ref: Path) -> int:
    return int(re.search(r"_(\d+)(_e\d.*)?\.nii$", ref.name).group(1))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def dcm_qa(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("dcm_qa")
    return ingest(shared_data / "dcm_qa" / "In", out, workers=2), out


@pytest.fixture(scope="module")
def dcm_qa_enh(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("dcm_qa_enh")
    return ingest(shared_data / "dcm_qa_enh" / "In", out, workers=1), out


def _dicom_volumes(report, out: Path) -> dict[int, list[nib.Nifti1Image]]:
    vols: dict[int, list[nib.Nifti1Image]] = {}
    for v in report.volumes:
        if v["volume"] and v["modality"]:
            vols.setdefault(int(v["series_number"]), []).append(nib.load(out / v["volume"]))
    return vols


def _matches(img: nib.Nifti1Image, ref: nib.Nifti1Image) -> bool:
    try:
        mapped = world_compare(img.get_fdata(), img.affine, ref.get_fdata(), ref.affine)
    except AssertionError:
        return False
    r = ref.get_fdata()
    return mapped.shape == r.shape and np.allclose(mapped, r, rtol=1e-6, atol=1e-2)


@pytest.mark.parametrize("name", [p.name for p in sorted((DATA / "dcm_qa" / "Ref").glob("*.nii"))] or ["none"])
def test_dcm_qa_reference(dcm_qa, shared_data: Path, name: str) -> None:
    report, out = dcm_qa
    ref_path = shared_data / "dcm_qa" / "Ref" / name
    ref = nib.load(ref_path)
    candidates = _dicom_volumes(report, out).get(_ref_series_number(ref_path), [])
    assert any(_matches(img, ref) for img in candidates), f"no medpipe volume reproduces {name}"
    # same array layout as dcm2niix, not just the same voxels in world space
    assert any(np.allclose(img.affine, ref.affine, atol=1e-3) for img in candidates)


def test_dcm_qa_all_series_ok(dcm_qa) -> None:
    report, _ = dcm_qa
    dicom = [v for v in report.volumes if v["modality"]]
    assert len(dicom) == 21
    assert all(v["status"] == "ok" for v in dicom), [(v["series_description"], v["reasons"]) for v in dicom]
    # the PDF and notes in the folder are explained, not silently skipped
    reasons = dict(report.rejected)
    assert any(p.endswith(".pdf") and "not a DICOM" in r for p, r in reasons.items())


def test_dcm_qa_enh_reference(dcm_qa_enh, shared_data: Path) -> None:
    report, out = dcm_qa_enh
    vols = _dicom_volumes(report, out)
    refs = ["Philips_WIP_B0_NS_801_e1.nii", "Philips_WIP_B0_NS_801_e2_fieldmaphz.nii", "Siemens_REST1_w_SMS_PF7-8_6.nii"]
    for name in refs:  # the other Ref volumes have no input in this copy of dcm_qa_enh
        ref_path = shared_data / "dcm_qa_enh" / "Ref" / name
        ref = nib.load(ref_path)
        assert any(_matches(img, ref) for img in vols.get(_ref_series_number(ref_path), [])), name


def test_enhanced_split_and_4d(dcm_qa_enh) -> None:
    report, out = dcm_qa_enh
    philips = [v for v in report.volumes if v["series_number"] == 801]
    assert len(philips) == 2 and all("split" in v["reasons"] for v in philips)
    siemens = [v for v in report.volumes if v["series_number"] == 6]
    assert siemens[0]["shape"] == "64x64x6x4"
    side = json.loads((out / siemens[0]["sidecar"]).read_text())
    uids = side["SourceSOPInstanceUIDs"]
    assert len(uids) == 6 and all(len(t) == 4 for t in uids)
    assert side["SourceFrameNumbers"][0] == [1, 1, 1, 1]


def test_totalseg_ct_lands_on_label_grid(shared_data: Path, tmp_path: Path) -> None:
    """JPEG 2000 CT with blanked UIDs (de-identified): same grid as its label map, HU values."""
    report = ingest(shared_data / "totalseg_ct" / "example_ct_dicom", tmp_path, workers=1)
    (ct_row,) = [v for v in report.volumes if v["modality"] == "CT"]
    assert ct_row["status"] == "warning" and "no Series Instance UID" in ct_row["reasons"]
    ct = nib.load(tmp_path / ct_row["volume"])
    label = nib.load(shared_data / "totalseg_ct" / "example_seg_dicom.nii.gz")
    assert ct.shape == label.shape
    assert np.allclose(ct.affine, label.affine, atol=1e-4)
    data = ct.get_fdata()
    assert data.min() == -1024 and data.max() > 1000  # HU: rescale intercept applied
    # the label map's body classes sit where the CT shows tissue, not air
    body = np.asarray(label.dataobj) > 0
    assert body.sum() > 1000 and np.median(data[body]) > -200
    # Guards: a flipped or transposed CT (the median check above passes after any flip or transpose). Every
    # sampled labelled voxel's value equals the DICOM pixel at its world position, found from first principles
    # (each file's IPP / IOP / PixelSpacing and pydicom's decoded pixels, not medpipe's geometry code).
    import pydicom

    files = [pydicom.dcmread(f) for f in sorted((shared_data / "totalseg_ct" / "example_ct_dicom").iterdir())]
    ipp = np.array([[float(v) for v in f.ImagePositionPatient] for f in files])
    iop = np.array([float(v) for v in files[0].ImageOrientationPatient])
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    dr, dc = (float(v) for v in files[0].PixelSpacing)
    pixels = [f.pixel_array * float(f.RescaleSlope) + float(f.RescaleIntercept) for f in files]
    rng = np.random.default_rng(0)
    idx = np.argwhere(body)[rng.choice(int(body.sum()), 3000, replace=False)]
    ras = (label.affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    for (i, j, k), p in zip(idx, lps, strict=True):
        f = int(np.argmin(np.abs((p - ipp) @ normal)))
        assert abs((p - ipp[f]) @ normal) < 1e-3
        col = int(round((p - ipp[f]) @ row_cos / dc))
        row = int(round((p - ipp[f]) @ col_cos / dr))
        assert data[i, j, k] == pixels[f][row, col], (i, j, k)


def _pydicom_test_folders() -> list[Path]:
    """Real DICOM shipped with pydicom (``data/test_files``) and pydicom-data (``data_store/data``).

    (``pydicom.data.get_testdata_files`` would try to download more: never call it offline.)
    """
    from pydicom.data.data_manager import DATA_ROOT

    folders = [Path(DATA_ROOT) / "test_files"]
    try:
        import data_store  # the pydicom-data package

        folders.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return folders


@pytest.mark.parametrize("folder", _pydicom_test_folders(), ids=lambda p: p.parent.name)
def test_pydicom_test_files_never_crash(folder: Path, tmp_path: Path) -> None:
    """Every file of pydicom's real test data is used by a volume or rejected with a reason."""
    files = {str(p) for p in folder.rglob("*") if p.is_file()}
    report = ingest(folder, tmp_path / "out", workers=2)
    used: set[str] = set()
    for v in report.volumes:
        if v["status"] != "rejected":
            used |= set(split_keys(v["files"]))
    rejected = {p for p, _ in report.rejected}
    assert used | rejected == files
    assert not used & rejected
    assert all(r.strip() for _, r in report.rejected)
    assert len(used) > 5
    with open(tmp_path / "out" / "rejected.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["path"] for r in rows} == rejected


def test_sources_are_never_modified(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "dcm_qa_enh" / "In"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.rglob("*") if p.is_file()}
    ingest(src, tmp_path, workers=1)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.rglob("*") if p.is_file()}
    assert before == after


def _dcm2niix(src: Path, out: Path) -> list[Path]:
    exe = find_tool("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install -e '.[dev]')")
    out.mkdir()
    subprocess.run([exe, "-z", "n", "-b", "n", "-o", str(out), "-f", "%s_%d", str(src)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return sorted(out.glob("*.nii"))


@pytest.mark.parametrize("case", ["totalseg_ct/example_ct_dicom", "dcm_qa/In/Orientation/sag/sagint36"])
def test_same_voxels_as_live_dcm2niix(shared_data: Path, tmp_path: Path, case: str) -> None:
    src = shared_data / case
    (ref_path,) = _dcm2niix(src, tmp_path / "d2n")
    report = ingest(src, tmp_path / "mp", workers=1)
    (row,) = [v for v in report.volumes if v["modality"]]
    ours, ref = nib.load(tmp_path / "mp" / row["volume"]), nib.load(ref_path)
    mapped = world_compare(ours.get_fdata(), ours.affine, ref.get_fdata(), ref.affine)
    assert np.array_equal(mapped, ref.get_fdata())


def test_sample_series_match_live_dcm2niix(tmp_path: Path) -> None:
    from medpipe.sample import generate_brain_tumor

    generate_brain_tumor(tmp_path / "sample", cases=1, seed=5, matrix=48, pixel_spacing=4.0, slices=12,
                         slice_thickness=10.0)
    refs = _dcm2niix(tmp_path / "sample" / "dicom", tmp_path / "d2n")
    report = ingest(tmp_path / "sample", tmp_path / "mp", workers=1)
    ours = [v for v in report.volumes if v["volume"]]
    assert len(ours) == 4 and len(refs) >= 4  # dcm2niix also converts the SEG
    for v in ours:
        img = nib.load(tmp_path / "mp" / v["volume"])
        assert any(_matches(img, nib.load(r)) for r in refs), v["series_description"]
