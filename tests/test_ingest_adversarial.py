"""Adversarial ``medpipe ingest`` tests on synthetic DICOM with a known ground truth.

Every series is written by :mod:`tests.dicom_factory` from an integer array and a geometry worked
out from first principles (the factory's convention is cross-checked against dcm2niix below), and
every output volume is compared with the truth in world space (:func:`assert_world_equal`), so
the output may use any axis order or flips but must put every value at the right place.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medpipe.ingest import IngestReport, ingest
from medpipe.io import TMP_PREFIX
from tests.conftest import find_tool
from tests.dicom_factory import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    Geometry,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    Written,
    assert_world_equal,
    ct_gantry_tilt,
    load_nifti,
    oblique_iop,
    pattern,
    sha256_tree,
    strip_pixel_data,
    truncate_copy,
    uid,
    write_series,
)

SHAPE = (16, 12, 8)  # columns, rows, slices: non-square, so a transpose is caught


# -- helpers -------------------------------------------------------------------------------


def run(src: Path, out: Path, **kw: Any) -> IngestReport:
    kw.setdefault("workers", 1)
    return ingest(src, out, **kw)


def only(report: IngestReport) -> dict[str, Any]:
    assert len(report.volumes) == 1, [(v["part"], v["status"], v["reasons"]) for v in report.volumes]
    return report.volumes[0]


def built(report: IngestReport) -> list[dict[str, Any]]:
    return [v for v in report.volumes if v["status"] != "rejected"]


def sidecar(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    return json.loads((out / row["sidecar"]).read_text())


def rejected_csv(out: Path) -> dict[str, str]:
    with open(out / "rejected.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(set(r) == {"path", "reason"} for r in rows)
    return {r["path"]: r["reason"] for r in rows}


def manifest_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def key(p: Path) -> str:
    return os.path.abspath(p)


def out_slice_order(path: Path, w: Written) -> list[int]:
    """Truth slice index k of each output slice (the slice axis must stay the third axis)."""
    _, affine = load_nifti(path)
    m = np.linalg.inv(affine) @ w.affine
    assert abs(abs(m[2, 2]) - 1) < 1e-3, "the slice axis is not the third output axis"
    n = w.truth.shape[2]
    out_k = [int(round((m @ [0, 0, k, 1])[2])) for k in range(n)]
    return [out_k.index(kk) for kk in range(n)]


def all_sidecar_uids(out: Path, report: IngestReport) -> set[str]:
    uids: set[str] = set()
    for v in built(report):
        for u in sidecar(out, v)["SourceSOPInstanceUIDs"]:
            uids.update(u if isinstance(u, list) else [u])
    return uids


# -- the factory itself agrees with dcm2niix -------------------------------------------------


def test_factory_geometry_matches_dcm2niix(tmp_path: Path) -> None:
    """The truth affine of the factory is the one dcm2niix derives from the files it writes."""
    exe = find_tool("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed")
    w = write_series(tmp_path / "src", pattern(SHAPE), Geometry(iop=oblique_iop(20, -15), slice_sign=-1))
    (tmp_path / "d2n").mkdir()
    subprocess.run([exe, "-z", "n", "-b", "n", "-o", str(tmp_path / "d2n"), str(tmp_path / "src")], check=True,
                   capture_output=True)
    (nii,) = (tmp_path / "d2n").glob("*.nii")
    assert_world_equal(nii, w.truth, w.affine)


# -- 1. slice order never comes from InstanceNumber or file names ---------------------------


@pytest.mark.parametrize(
    ("naming", "numbers", "sign"),
    [("reversed", "shuffled", 1), ("random", "reversed", 1), ("uid", "constant", -1), ("random", "none", -1),
     ("ordered", "shuffled", -1)],
)
def test_slice_order_from_positions(tmp_path: Path, naming: str, numbers: str, sign: int) -> None:
    w = write_series(tmp_path / "src", pattern(SHAPE), Geometry(slice_sign=sign), naming=naming,
                     instance_numbers=numbers, seed=3)
    out = tmp_path / "out"
    report = run(tmp_path / "src", out)
    v = only(report)
    assert (v["status"], v["reasons"]) == ("ok", "")
    assert report.rejected == []
    assert v["n_files"] == SHAPE[2]
    assert_world_equal(out / v["volume"], w.truth, w.affine)
    order = out_slice_order(out / v["volume"], w)
    assert sidecar(out, v)["SourceSOPInstanceUIDs"] == [w.sop_uids[(k, 0)] for k in order]


# -- 2. orientations -----------------------------------------------------------------------


ORIENTATIONS = {
    "axial": (AXIAL, 1),
    "axial-descending": (AXIAL, -1),
    "sagittal": (SAGITTAL, 1),
    "sagittal-descending": (SAGITTAL, -1),
    "coronal": (CORONAL, 1),
    "oblique-20x-20y": (oblique_iop(20, 20), 1),
    "oblique-sagittal-35z-10x": (oblique_iop(-10, 0, 35, SAGITTAL), -1),
    "oblique-coronal-row-flipped": (oblique_iop(0, 25, 0, (-1, 0, 0, 0, 0, -1)), 1),
}


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_orientations(tmp_path: Path, name: str) -> None:
    iop, sign = ORIENTATIONS[name]
    geo = Geometry(iop=iop, slice_sign=sign, origin=(33.3, -71.2, 104.9), pixel_spacing=(0.8, 1.1), slice_spacing=2.5)
    w = write_series(tmp_path / "src", pattern(SHAPE, seed=7), geo, naming="random", instance_numbers="shuffled")
    out = tmp_path / "out"
    v = only(run(tmp_path / "src", out))
    assert v["status"] == "ok", v["reasons"]
    assert v["shape"] == "16x12x8"
    assert v["spacing"] == "1.1x0.8x2.5"
    data = assert_world_equal(out / v["volume"], w.truth, w.affine)
    assert data.shape == SHAPE


# -- 3. transfer syntaxes, signedness, BitsStored -------------------------------------------


SYNTAXES = {
    "explicit-le": ExplicitVRLittleEndian,
    "implicit-le": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls-lossless": JPEGLSLossless,
    "jpeg2000-lossless": JPEG2000Lossless,
}


@pytest.mark.parametrize("signed", [False, True], ids=["uint16", "int16"])
@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_transfer_syntaxes(tmp_path: Path, syntax: str, signed: bool) -> None:
    # openjpeg cannot encode images smaller than 32 pixels (6 resolution levels)
    shape = (40, 32, 4) if syntax == "jpeg2000-lossless" else SHAPE
    stored = pattern(shape, seed=11, dtype=np.int16, base=-3000) if signed else pattern(shape, seed=11)
    w = write_series(tmp_path / "src", stored, Geometry(iop=oblique_iop(0, 0, 15)), transfer_syntax=SYNTAXES[syntax],
                     intercepts=-1024, naming="random", instance_numbers="shuffled")
    out = tmp_path / "out"
    report = run(tmp_path / "src", out)
    v = only(report)
    assert v["status"] == "ok", v["reasons"]
    assert report.rejected == []
    assert_world_equal(out / v["volume"], w.truth, w.affine)


@pytest.mark.parametrize("syntax", ["explicit-le", "implicit-le"])
def test_signed_12_bit_without_sign_extension(tmp_path: Path, syntax: str) -> None:
    """BitsStored 12 signed, high bits left 0: -5 is stored as 0x0FFB and must read back as -5."""
    stored = pattern(SHAPE, seed=5, noise=30, dtype=np.int16, base=-2000)
    stored = np.clip(stored, -2048, 2047).astype(np.int16)
    assert stored.min() < 0
    w = write_series(tmp_path / "src", stored, transfer_syntax=SYNTAXES[syntax], bits_stored=12)
    out = tmp_path / "out"
    v = only(run(tmp_path / "src", out))
    assert v["status"] == "ok", v["reasons"]
    assert_world_equal(out / v["volume"], w.truth, w.affine)


# -- 4. rescale slope / intercept ------------------------------------------------------------


RESCALES = {
    "per-slice-slope-and-intercept": ([0.5 + 0.25 * k for k in range(8)], [-1024 + 10.5 * k for k in range(8)]),
    "per-slice-intercept-only": ([1.0] * 8, [-1000.0 - 3 * k for k in range(8)]),
    "per-slice-slope-only": ([1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 0.125, 1.0], [0.0] * 8),
    "uniform-fractional": ([0.37] * 8, [-12.5] * 8),
    "uniform-integer-ct": ([1.0] * 8, [-1024.0] * 8),
    "uniform-fractional-intercept": ([1.0] * 8, [-0.5] * 8),
}


@pytest.mark.parametrize("signed", [False, True], ids=["uint16", "int16"])
@pytest.mark.parametrize("case", list(RESCALES))
def test_rescale_to_modality_units(tmp_path: Path, case: str, signed: bool) -> None:
    slopes, intercepts = RESCALES[case]
    stored = pattern(SHAPE, seed=2, dtype=np.int16, base=-1500) if signed else pattern(SHAPE, seed=2)
    w = write_series(tmp_path / "src", stored, Geometry(iop=CORONAL), slopes=slopes, intercepts=intercepts,
                     naming="random", instance_numbers="shuffled")
    out = tmp_path / "out"
    v = only(run(tmp_path / "src", out))
    assert v["status"] == "ok", v["reasons"]
    assert_world_equal(out / v["volume"], w.truth, w.affine, rtol=1e-6, atol=1e-6)


# -- 5. two series, junk, and the accounting of every input file -----------------------------


def _two_series_and_junk(src: Path, tmp: Path) -> tuple[Written, Written, dict[str, str]]:
    a = write_series(src, pattern(SHAPE), Geometry(), tag="a", series_number=1, naming="random",
                     instance_numbers="shuffled")
    b = write_series(src / "sub" / "dir", pattern((14, 10, 6), seed=1), Geometry(iop=SAGITTAL, slice_sign=-1),
                     tag="b", series_number=2, modality="MR", naming="uid", transfer_syntax=RLELossless)
    c = write_series(tmp / "elsewhere", pattern((16, 12, 1), seed=9), Geometry(), tag="c", series_number=3)
    junk = {
        "readme.txt": "dicom",
        "empty.dcm": "empty",
        "random.bin": "dicom",
        "sub/truncated.dcm": "truncat",
        "sub/no_pixels.dcm": "pixel",
    }
    (src / "readme.txt").write_text("exported by a PACS\n")
    (src / "empty.dcm").write_bytes(b"")
    (src / "random.bin").write_bytes(np.random.default_rng(0).bytes(3000))
    truncate_copy(c.files[0], src / "sub" / "truncated.dcm", keep_bytes_of_pixel_data=101)
    strip_pixel_data(a.files[0], src / "sub" / "no_pixels.dcm", uid("no pixels"))
    return a, b, junk


@pytest.mark.parametrize("workers", [1, 2])
def test_two_series_and_junk(tmp_path: Path, workers: int) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    a, b, junk = _two_series_and_junk(src, tmp_path)
    report = run(src, out, workers=workers)
    rows = built(report)
    assert len(rows) == 2 and len(report.volumes) == 2
    by_series = {v["series_uid"]: v for v in rows}
    for w in (a, b):
        v = by_series[w.series_uid]
        assert v["status"] == "ok", v["reasons"]
        assert v["n_files"] == len(w.files)
        assert_world_equal(out / v["volume"], w.truth, w.affine)
    # every junk file is listed with a sensible reason
    rejected = rejected_csv(out)
    assert rejected == dict(report.rejected)
    for rel, word in junk.items():
        reason = rejected.get(key(src / rel))
        assert reason, f"{rel} not in rejected.csv"
        assert word in reason.lower(), (rel, reason)
    # every input file is used by a volume or rejected, never both, never neither
    inputs = {key(p) for p in src.rglob("*") if p.is_file()}
    assert set(rejected) <= inputs
    used_uids = all_sidecar_uids(out, report)
    for w in (a, b):
        for p in w.files:
            assert key(p) not in rejected
            assert w.uid_of(p) in used_uids
    assert inputs == set(rejected) | {key(p) for w in (a, b) for p in w.files}
    assert sum(v["n_files"] for v in rows) + len(rejected) == len(inputs) == report.n_files
    # the files on disk agree with the report
    assert [r["series_uid"] for r in manifest_csv(out)] == [v["series_uid"] for v in report.volumes]
    assert (out / "catalog.sqlite").is_file()


# -- 6. missing slices -----------------------------------------------------------------------


@pytest.mark.parametrize(("drop", "sign"), [((4,), 1), ((3, 4), 1), ((2,), -1)])
def test_missing_slice_is_resampled_not_stacked(tmp_path: Path, drop: tuple[int, ...], sign: int) -> None:
    n = 9
    w = write_series(tmp_path / "src", pattern((16, 12, n), seed=4), Geometry(slice_sign=sign, slice_spacing=2.5),
                     drop=drop, naming="random", instance_numbers="shuffled")
    out = tmp_path / "out"
    v = only(run(tmp_path / "src", out))
    assert v["status"] == "warning"
    assert "missing slice" in v["reasons"] and "resampled" in v["reasons"], v["reasons"]
    assert v["n_files"] == n - len(drop)
    side = sidecar(out, v)
    assert side["Resampled"] is True and side["Status"] == "warning"
    assert len(side["SourceSOPInstanceUIDs"]) == n - len(drop)
    # the nominal spacing and the full extent, existing slices exact, the gap linearly interpolated
    data, affine = load_nifti(out / v["volume"])
    assert data.shape == (16, 12, n)
    assert np.isclose(np.linalg.norm(affine[:3, 2]), 2.5, atol=1e-4)
    expect = w.truth.copy()
    lo, hi = min(drop) - 1, max(drop) + 1
    for k in drop:
        f = (k - lo) / (hi - lo)
        expect[:, :, k] = (1 - f) * w.truth[:, :, lo] + f * w.truth[:, :, hi]
    assert_world_equal(out / v["volume"], expect, w.affine, atol=2e-3)


# -- 7. gantry tilt / sheared stacks --------------------------------------------------------


#: name -> (geometry factory, GantryDetectorTilt written or None)
TILTS = {
    "ct-gantry-+15deg": (lambda: ct_gantry_tilt(15.0, 2.0, origin=(-12.0, -10.0, 5.0), pixel_spacing=(1.0, 1.0)), 15.0),
    "ct-gantry--22deg": (lambda: ct_gantry_tilt(-22.0, 2.0, origin=(-12.0, -10.0, 5.0), pixel_spacing=(1.0, 1.0)), -22.0),
    # sheared without a tilted IOP: IPP moves in-plane along both cosines, anisotropic pixels
    "axial-ipp-shifted-both-axes": (lambda: Geometry(origin=(-12.0, -10.0, 5.0), pixel_spacing=(0.8, 1.1),
                                                     slice_spacing=2.0, shift=(0.35, -0.5)), None),
}
TILT_SHAPE = (24, 24, 10)


def _voxel_lps(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    idx = np.indices(shape[:3]).reshape(3, -1).astype(float)
    ras = affine[:3, :3] @ idx + affine[:3, 3:4]
    return (np.diag([-1.0, -1.0, 1.0]) @ ras).T


def _tilted(tmp_path: Path, name: str, stored_of_world: Any, **kw: Any) -> tuple[Written, dict[str, Any], Path]:
    make, tilt = TILTS[name]
    geo = make()
    stored = stored_of_world(geo.world(TILT_SHAPE))
    w = write_series(tmp_path / "src", stored, geo, gantry_tilt=tilt, naming="random", instance_numbers="shuffled", **kw)
    out = tmp_path / "out"
    return w, only(run(tmp_path / "src", out)), out


@pytest.mark.parametrize("name", list(TILTS))
def test_gantry_tilt_structure_lands_in_place(tmp_path: Path, name: str) -> None:
    geo = TILTS[name][0]()
    centre = geo.world(TILT_SHAPE)[12, 11, 5] + np.array([0.3, -0.2, 0.4])  # LPS, off the voxel grid
    sigma = 2.5

    def blob(lps: np.ndarray) -> np.ndarray:
        r2 = np.sum((lps - centre) ** 2, axis=-1)
        return np.round(1000 * np.exp(-r2 / (2 * sigma**2))).astype(np.uint16)

    w, v, out = _tilted(tmp_path, name, blob)
    assert v["status"] == "warning" and "tilt" in v["reasons"], v["reasons"]
    assert sidecar(out, v)["Resampled"] is True
    data, affine = load_nifti(out / v["volume"])
    m = affine[:3, :3]
    gram = m.T @ m
    assert np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4 * gram.max()), "sheared output affine"
    assert np.isclose(np.sqrt(gram[2, 2]), geo.slice_spacing, atol=1e-3), "slice spacing is not the one along the normal"
    # the blob's centroid in the output, in output voxel coordinates, vs its true position
    weights = data.reshape(-1)
    idx = np.indices(data.shape).reshape(3, -1)
    centroid = (idx * weights).sum(axis=1) / weights.sum()
    truth_ras = np.array([-centre[0], -centre[1], centre[2], 1.0])
    truth_idx = (np.linalg.inv(affine) @ truth_ras)[:3]
    assert np.all(np.abs(centroid - truth_idx) < 0.5), (centroid, truth_idx)


def _linear_world(lps: np.ndarray) -> np.ndarray:
    return 500.0 + 7.0 * lps[..., 0] + 3.0 * lps[..., 1] + 11.0 * lps[..., 2]


def _covered(w: Written, lps: np.ndarray) -> np.ndarray:
    """Output voxels whose world position lies between two source slices and inside both of them."""
    geo, n = w.geometry, w.truth.shape[2]
    dist_k = np.array([(geo.ipp(k) - geo.ipp(0)) @ geo.normal for k in range(n)])
    if dist_k[-1] < 0:
        raise AssertionError("tilt geometries here ascend along the normal")
    dist = (lps - geo.ipp(0)) @ geo.normal
    s = np.clip(np.searchsorted(dist_k, dist, side="right") - 1, 0, n - 2)
    ok = (dist >= -1e-6) & (dist <= dist_k[-1] + 1e-6)
    ncol, nrow = w.truth.shape[:2]
    for off in (0, 1):
        rel = lps - np.array([geo.ipp(k) for k in s + off])
        i = rel @ geo.row / geo.pixel_spacing[1]
        j = rel @ geo.col / geo.pixel_spacing[0]
        ok &= (i >= -1e-6) & (i <= ncol - 1 + 1e-6) & (j >= -1e-6) & (j <= nrow - 1 + 1e-6)
    return ok


@pytest.mark.parametrize(
    ("name", "slope", "intercept"),
    [
        pytest.param(name, 1.0, 0.0, id=f"{name}-integer-values")
        for name in TILTS
    ] + [pytest.param(name, 0.5, -0.25, id=f"{name}-scaled-values") for name in TILTS],
)
def test_gantry_tilt_values_follow_world(tmp_path: Path, name: str, slope: float, intercept: float) -> None:
    """Values are a linear function of world position, so linear resampling must reproduce it."""
    w, v, out = _tilted(
        tmp_path, name, lambda lps: np.round((_linear_world(lps) - intercept) / slope).astype(np.uint16),
        slopes=slope, intercepts=intercept,
    )
    assert v["status"] == "warning" and "tilt" in v["reasons"]
    data, affine = load_nifti(out / v["volume"])
    lps = _voxel_lps(affine, data.shape)
    covered = _covered(w, lps)
    assert covered.mean() > 0.6, "the output grid does not overlap the acquired slices"
    err = np.abs(data.reshape(-1) - _linear_world(lps))[covered]
    # stored values are rounded (<= slope / 2 off); linear interpolation of them stays within that
    assert err.max() <= 0.5 * slope + 1e-3, f"max error {err.max():.3f} in world-space values"


# -- 8. mixed series: orientations, sizes, localizers ---------------------------------------


def test_mixed_series_is_split_and_localizers_rejected(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    s = uid("one series uid for everything")
    axial = write_series(src, pattern(SHAPE, seed=1), Geometry(), series_uid=s, tag="axial")
    coronal = write_series(src, pattern((16, 12, 6), seed=2), Geometry(iop=CORONAL, origin=(-5.0, 10.0, 40.0)),
                           series_uid=s, tag="coronal")
    bigger = write_series(src, pattern((20, 14, 5), seed=3), Geometry(origin=(0.0, 0.0, -30.0)), series_uid=s,
                          tag="bigger")
    scouts = [
        write_series(src, pattern((16, 16, 1), seed=4 + i), Geometry(iop=iop, pixel_spacing=(2.0, 2.0)), series_uid=s,
                     tag=f"scout{i}", image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
        for i, iop in enumerate([AXIAL, CORONAL, SAGITTAL])
    ]
    report = run(src, out)
    assert {v["series_uid"] for v in report.volumes} == {s}
    rows = built(report)
    assert len(rows) == 3
    assert len({v["part"] for v in report.volumes}) == len(report.volumes) == 6
    for w in (axial, coronal, bigger):
        (v,) = [r for r in rows if r["n_files"] == len(w.files) and r["shape"].startswith(f"{w.truth.shape[0]}x")]
        assert v["part"] and "split" in v["reasons"]
        assert v["status"] == "ok", v["reasons"]
        assert_world_equal(out / v["volume"], w.truth, w.affine)
        assert set(sidecar(out, v)["SourceSOPInstanceUIDs"]) == set(w.sop_uids.values())
    assert "coronal" in [r for r in rows if r["n_files"] == 6][0]["part"]
    rejected = rejected_csv(out)
    for w in scouts:
        (p,) = w.files
        assert "localizer" in rejected[key(p)].lower()
    assert len(rejected) == 3
    assert sum(1 for v in report.volumes if v["status"] == "rejected" and "localizer" in v["reasons"]) == 3


# -- 9. duplicate SOP instances -------------------------------------------------------------


def test_duplicate_sop_instance_used_once(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    w = write_series(src, pattern(SHAPE), Geometry())
    copies = {w.files[3]: src / "zz_copy.dcm", w.files[5]: src / "aa_copy.dcm"}  # sorts after / before
    for orig, copy in copies.items():
        shutil.copy(orig, copy)
    report = run(src, out)
    v = only(report)
    assert v["status"] == "ok" and v["n_files"] == SHAPE[2]
    assert_world_equal(out / v["volume"], w.truth, w.affine)
    assert sidecar(out, v)["SourceSOPInstanceUIDs"] == [w.sop_uids[(k, 0)] for k in range(SHAPE[2])]
    rejected = rejected_csv(out)
    assert len(rejected) == 2
    for orig, copy in copies.items():
        hits = [r for p, r in rejected.items() if p in (key(orig), key(copy))]
        assert len(hits) == 1 and "duplicate" in hits[0].lower()


# -- 10. too few slices / a single slice ----------------------------------------------------


def test_two_slices_rejected(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    w = write_series(src, pattern((16, 12, 2)), Geometry())
    v = only(run(src, out))
    assert v["status"] == "rejected" and "too few slices" in v["reasons"]
    assert v["volume"] == ""
    assert not list(out.rglob("*.nii*"))
    rejected = rejected_csv(out)
    assert set(rejected) == {key(p) for p in w.files}
    assert all("too few slices" in r for r in rejected.values())


def test_single_slice_is_2d_warning(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    w = write_series(src, pattern((16, 12, 1)), Geometry(iop=oblique_iop(10, 5)))
    v = only(run(src, out))
    assert v["status"] == "warning" and ("2D" in v["reasons"] or "single slice" in v["reasons"]), v["reasons"]
    assert rejected_csv(out) == {}
    assert_world_equal(out / v["volume"], w.truth, w.affine)


# -- 11. 4D --------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_time_series_is_4d_in_temporal_order(tmp_path: Path, modality: str) -> None:
    """MR: only TemporalPositionIdentifier orders time; CT: AcquisitionNumber / AcquisitionTime."""
    extra = (lambda k, t: {"AcquisitionTime": "101700.000000", "AcquisitionNumber": 1}) if modality == "MR" else None
    shape = (16, 12, 6, 3)
    w = write_series(tmp_path / "src", pattern(shape, seed=8), Geometry(iop=SAGITTAL, slice_sign=-1),
                     modality=modality, naming="random", instance_numbers="reversed", extra=extra)
    out = tmp_path / "out"
    v = only(run(tmp_path / "src", out))
    assert v["status"] == "ok", v["reasons"]
    assert v["shape"] == "16x12x6x3"
    assert v["n_files"] == 18
    assert_world_equal(out / v["volume"], w.truth, w.affine)
    order = out_slice_order(out / v["volume"], w)
    assert sidecar(out, v)["SourceSOPInstanceUIDs"] == [[w.sop_uids[(k, t)] for t in range(3)] for k in order]


# -- 12. sources untouched; incremental and interrupted runs --------------------------------


def _two_series(src: Path) -> tuple[Written, Written]:
    a = write_series(src / "a", pattern(SHAPE), Geometry(), tag="a", naming="random")
    b = write_series(src / "b", pattern((14, 10, 6), seed=1), Geometry(iop=SAGITTAL), tag="b", series_number=2)
    (src / "notes.txt").write_text("not dicom\n")
    return a, b


def _outputs(out: Path) -> dict[str, Any]:
    """Everything a user sees in ``out`` except the catalog: texts, and volumes as data + affine."""
    res: dict[str, Any] = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if not p.is_file() or rel.startswith("catalog.sqlite") or ".tmp" in p.name:
            continue
        if p.name.endswith((".nii", ".nii.gz")):
            data, affine = load_nifti(p)
            res[rel] = (data.tobytes(), data.shape, affine.tobytes())
        elif p.suffix == ".png":
            res[rel] = p.read_bytes()
        else:
            res[rel] = p.read_text()
    return res


def test_sources_untouched_and_reruns_incremental(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    a, b = _two_series(src)
    before = sha256_tree(src)
    mtimes = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    r1 = run(src, out)
    assert sha256_tree(src) == before
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == mtimes
    assert (r1.n_read, r1.n_built) == (15, 2)
    first = _outputs(out)

    r2 = run(src, out)
    assert (r2.n_read, r2.n_built) == (0, 0)
    assert _outputs(out) == first

    # a touched file is re-read, and only its series rebuilt (to the same result)
    st = a.files[2].stat()
    os.utime(a.files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    r3 = run(src, out)
    assert (r3.n_read, r3.n_built) == (1, 1)
    assert _outputs(out) == first

    # a new file is the only one read
    (src / "b" / "later.txt").write_text("added later\n")
    r4 = run(src, out)
    assert (r4.n_read, r4.n_built) == (1, 0)
    assert key(src / "b" / "later.txt") in rejected_csv(out)
    assert sha256_tree(src) == {**before, "b/later.txt": sha256_tree(src)["b/later.txt"]}

    # a removed slice: only its series rebuilt, now with a gap; a removed series: its outputs go
    a.paths[(4, 0)].unlink()
    r5 = run(src, out)
    assert (r5.n_read, r5.n_built) == (0, 1)
    va = [v for v in r5.volumes if v["series_uid"] == a.series_uid][0]
    assert va["status"] == "warning" and "missing slice" in va["reasons"]
    b_outputs = [v for v in r5.volumes if v["series_uid"] == b.series_uid][0]
    shutil.rmtree(src / "b")
    r6 = run(src, out)
    assert (r6.n_read, r6.n_built) == (0, 0)
    assert [v["series_uid"] for v in r6.volumes] == [a.series_uid]
    assert not (out / b_outputs["volume"]).exists() and not (out / b_outputs["sidecar"]).exists()
    assert all(not p.startswith(key(src / "b")) for p in rejected_csv(out))


def test_output_inside_source_refused(tmp_path: Path) -> None:
    from medpipe.errors import SourceError

    src = tmp_path / "src"
    write_series(src, pattern(SHAPE), Geometry())
    before = sha256_tree(src)
    with pytest.raises(SourceError):
        run(src, src / "out")
    assert sha256_tree(src) == before and not (src / "out").exists()


def test_same_series_number_and_hostile_patient_id(tmp_path: Path) -> None:
    """Two series that share number and description get two volumes; the patient ID cannot escape out/."""
    src, out = tmp_path / "src", tmp_path / "out"
    hostile = "../../escape/..\\x"
    a = write_series(src, pattern(SHAPE), Geometry(), tag="a", patient_id=hostile)
    b = write_series(src, pattern(SHAPE, seed=1), Geometry(origin=(0.0, 0.0, 200.0)), tag="b", patient_id=hostile)
    report = run(src, out)
    assert len(built(report)) == 2
    assert len({v["volume"] for v in report.volumes}) == 2
    for w, v in zip((a, b), sorted(report.volumes, key=lambda v: v["series_uid"] != a.series_uid)):
        assert v["series_uid"] == w.series_uid
        path = (out / v["volume"]).resolve()
        assert str(path).startswith(str(out.resolve() / "volumes") + os.sep), path
        assert_world_equal(path, w.truth, w.affine)
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}


def test_rerun_after_kill_completes_with_same_outputs(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _two_series(src)
    r1 = run(src, out)
    first = _outputs(out)
    vol = out / built(r1)[0]["volume"]
    # what a killed run leaves: reports missing, a volume missing, half-written temporary files
    (out / "manifest.csv").unlink()
    vol.unlink()
    stale_vol = vol.parent / f"{TMP_PREFIX}k1ll3d.tmp.{vol.name}"
    stale_vol.write_bytes(b"\x1f\x8b half a gzip stream")
    (out / f"{TMP_PREFIX}k1ll3d.tmp.manifest.csv").write_text("series_uid\nhalf")
    r2 = run(src, out)
    assert (r2.n_read, r2.n_built) == (0, 1)
    assert _outputs(out) == first
    assert all(".tmp" not in v["volume"] for v in r2.volumes)
    assert not stale_vol.exists() and not (out / f"{TMP_PREFIX}k1ll3d.tmp.manifest.csv").exists()

    # the catalog lost too: everything re-read and rebuilt, no duplicate volumes
    for p in out.glob("catalog.sqlite*"):
        p.unlink()
    r3 = run(src, out)
    assert (r3.n_read, r3.n_built) == (15, 2)
    assert _outputs(out) == first
    assert len(list(out.rglob("*.nii.gz"))) == 2


def test_interrupted_build_then_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run interrupted after writing one volume (but not its sidecar) is finished by the next run."""
    import medpipe.dicom.volume as volume_mod

    src = tmp_path / "src"
    _two_series(src)
    reference = tmp_path / "reference"
    run(src, reference)
    out = tmp_path / "out"
    real = volume_mod.write_sidecar
    calls = []

    def dying_write_sidecar(path: Path, content: dict[str, Any]) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed between the NIfTI and its sidecar
        real(path, content)

    monkeypatch.setattr(volume_mod, "write_sidecar", dying_write_sidecar)
    with pytest.raises(KeyboardInterrupt):
        run(src, out)
    monkeypatch.setattr(volume_mod, "write_sidecar", real)
    r = run(src, out)
    assert r.n_read == 0 and r.n_built == 1
    assert _outputs(out) == _outputs(reference)


def test_deleted_sidecar_is_restored(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _two_series(src)
    r1 = run(src, out)
    first = _outputs(out)
    (out / built(r1)[0]["sidecar"]).unlink()
    run(src, out)
    assert _outputs(out) == first


# -- 13. zip and DICOMDIR -------------------------------------------------------------------


def test_zip_and_dicomdir_match_folder(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    w = write_series(tmp_path / "src", pattern(SHAPE, seed=12), Geometry(iop=oblique_iop(20, 20)), naming="random",
                     instance_numbers="shuffled")
    folder = only(run(tmp_path / "src", tmp_path / "out_folder"))
    ref_data, ref_affine = load_nifti(tmp_path / "out_folder" / folder["volume"])
    assert_world_equal(tmp_path / "out_folder" / folder["volume"], w.truth, w.affine)

    with zipfile.ZipFile(tmp_path / "export.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for p in w.files:
            z.write(p, f"export/{p.name}")
    fs = FileSet()
    for p in w.files:
        fs.add(p)
    fs.write(tmp_path / "media")

    for src, name in [(tmp_path / "export.zip", "zip"), (tmp_path / "media" / "DICOMDIR", "dicomdir")]:
        out = tmp_path / f"out_{name}"
        report = run(src, out)
        v = only(report)
        assert v["status"] == "ok", (name, v["reasons"])
        assert report.rejected == [] and v["n_files"] == SHAPE[2]
        data, affine = load_nifti(out / v["volume"])
        assert np.array_equal(data, ref_data) and np.allclose(affine, ref_affine, atol=1e-5), name
        assert sidecar(out, v)["SourceSOPInstanceUIDs"] == sidecar(tmp_path / "out_folder", folder)["SourceSOPInstanceUIDs"]

    # the media folder read as a plain folder: same volume, the DICOMDIR itself explained
    report = run(tmp_path / "media", tmp_path / "out_media_folder")
    v = only(report)
    assert np.array_equal(load_nifti(tmp_path / "out_media_folder" / v["volume"])[0], ref_data)
    ((path, reason),) = report.rejected
    assert Path(path).name == "DICOMDIR" and "DICOMDIR" in reason


def test_dicomdir_with_missing_file(tmp_path: Path) -> None:
    """A file listed in the DICOMDIR but gone from the medium is rejected; the gap is not hidden."""
    import pydicom
    from pydicom.fileset import FileSet

    w = write_series(tmp_path / "src", pattern((16, 12, 9), seed=13), Geometry(iop=CORONAL), naming="random")
    fs = FileSet()
    for p in w.files:
        fs.add(p)
    fs.write(tmp_path / "media")
    media_file = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                  for p in (tmp_path / "media").rglob("IM*")}
    gone = media_file[w.sop_uids[(4, 0)]]
    gone.unlink()
    out = tmp_path / "out"
    report = run(tmp_path / "media" / "DICOMDIR", out)
    v = only(report)
    assert v["status"] == "warning" and "missing slice" in v["reasons"]
    assert v["n_files"] == 8
    ((path, reason),) = report.rejected
    assert Path(path).name.upper() == gone.name.upper() and "missing" in reason
    expect = w.truth.copy()
    expect[:, :, 4] = (w.truth[:, :, 3] + w.truth[:, :, 5]) / 2
    assert_world_equal(out / v["volume"], expect, w.affine, atol=2e-3)


# -- 14. the command line -------------------------------------------------------------------


def _cli_app() -> Any:
    from medpipe.cli import app

    return app


def test_cli_ingest_exit_zero_with_rejections(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    app = _cli_app()
    src, out = tmp_path / "src", tmp_path / "out"
    a, b, junk = _two_series_and_junk(src, tmp_path)
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "rejected.csv" in result.output
    assert len(manifest_csv(out)) == 2
    assert {key(src / rel) for rel in junk} <= set(rejected_csv(out))


def test_cli_missing_source_one_line_error_via_app(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    app = _cli_app()
    missing = tmp_path / "no_such_export"
    result = CliRunner().invoke(app, ["ingest", str(missing), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2, result.output  # the error, maybe a hint
    assert "no_such_export" in lines[0] or "does not exist" in lines[0] or "no such" in lines[0].lower()


def test_cli_main_missing_source_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _cli_app()
    from medpipe.cli import main

    missing = tmp_path / "no_such_export"
    with pytest.raises(SystemExit) as exc:
        main(["ingest", str(missing), "--out", str(tmp_path / "out")])
    assert exc.value.code not in (0, None)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert 1 <= len(err) <= 2, err
    assert str(missing) in err[0] and "no such" in err[0].lower()
    assert not (tmp_path / "out").exists()
