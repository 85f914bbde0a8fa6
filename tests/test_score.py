"""``medpipe score``: DICOM results on the source geometry, idempotent, resumable, failure-isolated.

The models here are untrained tiny UNets (:mod:`tests.scoring_helpers`): what is tested is where the
results land and what the objects say, not accuracy. Positions are checked in world space from the
objects' own headers (``tests.ingested.pixel_lps``), independently of medpipe's geometry code.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medpipe.dicom.frames import FrameGeometry
from medpipe.inference.package import ModelPackage, PackageError
from medpipe.scoring.engine import ScoreOptions, score
from tests.dicom_checks import dciodvfy_errors, needs_dciodvfy
from tests.dicom_factory import AXIAL, Geometry, ct_gantry_tilt, oblique_iop, pattern, write_series
from tests.ingested import pixel_lps, values_at
from tests.scoring_helpers import tiny_segmenter_package

SHAPE = (20, 16, 10)  # columns, rows, slices


def _series(folder: Path, geo: Geometry, *, patient: str, tag: str, modality: str = "CT", seed: int = 0) -> Path:
    write_series(folder / tag, pattern(SHAPE, seed=seed, noise=200), geo, modality=modality, naming="random",
                 instance_numbers="shuffled", patient_id=patient, tag=tag, seed=seed,
                 extra={"BodyPartExamined": "ABDOMEN"})
    return folder / tag


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    return tiny_segmenter_package(tmp_path_factory.mktemp("model") / "model")


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _seg_matches_mask(seg_path: Path, mask_path: Path) -> tuple[int, int]:
    """(pixels compared, pixels that differ) between the SEG frames and the NIfTI mask, in world space."""
    seg = pydicom.dcmread(seg_path)
    img = nib.load(mask_path)
    mask = np.asarray(img.dataobj)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    compared = differ = 0
    shared = seg.SharedFunctionalGroupsSequence[0]
    for f, lps, fg in zip(frames, pixel_lps(seg), seg.PerFrameFunctionalGroupsSequence, strict=True):
        ident = fg.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        seg_no = int(ident[0].ReferencedSegmentNumber)
        truth = values_at(mask, img.affine, lps)
        inside = truth >= 0
        compared += int(inside.sum())
        differ += int(((truth[inside] == seg_no) != (f[inside] > 0)).sum())
    return compared, differ


# -- where the results land ------------------------------------------------------------------------


@pytest.mark.parametrize("geo", [
    Geometry(iop=AXIAL, origin=(-10.0, -20.0, 30.0)),
    ct_gantry_tilt(18.0, 3.0, origin=(5.0, -30.0, 10.0), pixel_spacing=(1.2, 1.2)),
    Geometry(iop=oblique_iop(12.0, -8.0, 20.0), origin=(3.0, 4.0, 5.0), slice_spacing=3.0),
], ids=["axial", "gantry_tilt", "oblique"])
def test_seg_lies_on_the_predicted_mask_in_world_space(tmp_path: Path, package: ModelPackage, geo: Geometry) -> None:
    src = _series(tmp_path / "src", geo, patient="P1", tag="a")
    report = score(src, package, tmp_path / "out", ScoreOptions(nifti=True, cpu_threads=1))
    (row,) = report.rows
    assert row["status"] == "ok", row
    out = tmp_path / "out"
    mask = np.asarray(nib.load(out / row["nifti"]).dataobj)
    assert 0 < mask.sum() < mask.size, "the tiny model should segment part of the image"
    compared, differ = _seg_matches_mask(out / row["seg"], out / row["nifti"])
    assert compared > 0.5 * np.prod(SHAPE)
    # nearest-neighbour sampling of a resampled (tilted) grid can round differently on exact ties only
    assert differ <= (0 if geo.shift == (0.0, 0.0) else 0.002 * compared), (differ, compared)
    seg = pydicom.dcmread(out / row["seg"])
    sources = {str(i.ReferencedSOPInstanceUID)
               for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    written = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in src.iterdir()}
    assert sources == written, "the SEG references every source instance"
    assert seg.FrameOfReferenceUID == pydicom.dcmread(next(src.iterdir())).FrameOfReferenceUID


@needs_dciodvfy
def test_every_object_is_valid_dicom_and_the_sr_volumes_are_the_mask_volumes(tmp_path: Path,
                                                                              package: ModelPackage) -> None:
    src = tmp_path / "src"
    _series(src, Geometry(origin=(-10.0, -20.0, 30.0)), patient="P1", tag="a")
    report = score(src, package, tmp_path / "out", ScoreOptions(nifti=True, explain=True, cpu_threads=1))
    (row,) = report.rows
    out = tmp_path / "out"
    objects = sorted((out / row["results"]).glob("*.dcm"))
    assert {p.name for p in objects} >= {"seg.dcm", "sr.dcm", "map_pm.dcm", "overlay_01_sc.dcm"}
    for path in objects:
        assert dciodvfy_errors(path) == [], path
    img = nib.load(out / row["nifti"])
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    expected = float((np.asarray(img.dataobj) == 1).sum()) * voxel_ml
    assert float(row["whole_tumour_ml"]) == pytest.approx(expected, abs=1e-3)
    import highdicom as hd

    sr = hd.sr.srread(out / row["sr"])
    groups = sr.content.get_planar_roi_measurement_groups() + sr.content.get_volumetric_roi_measurement_groups()
    if not groups:  # TID 1411 groups referencing a segment
        groups = list(sr.content.get_volumetric_roi_measurement_groups(referenced_segment=None))
    values = [m.value for g in groups for m in g.get_measurements()]
    assert values and float(values[0]) == pytest.approx(expected, rel=1e-6)
    seg = pydicom.dcmread(out / row["seg"])
    refs = json.dumps([str(x) for x in sr.CurrentRequestedProcedureEvidenceSequence])
    assert seg.SOPInstanceUID in refs, "the SR cites the SEG as evidence"
    assert (out / row["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_study_same_model_gives_the_same_objects(tmp_path: Path, package: ModelPackage) -> None:
    src = _series(tmp_path / "src", Geometry(), patient="P1", tag="a")
    uids = []
    for name in ("one", "two"):
        report = score(src, package, tmp_path / name, ScoreOptions(cpu_threads=1))
        seg = pydicom.dcmread(tmp_path / name / report.rows[0]["seg"])
        sr = pydicom.dcmread(tmp_path / name / report.rows[0]["sr"])
        uids.append((seg.SeriesInstanceUID, seg.SOPInstanceUID, sr.SOPInstanceUID, seg.SeriesNumber))
        frames = seg.pixel_array
    assert uids[0] == uids[1]
    other = tiny_segmenter_package(tmp_path / "other", seed=1)
    report = score(src, other, tmp_path / "three", ScoreOptions(cpu_threads=1))
    seg3 = pydicom.dcmread(tmp_path / "three" / report.rows[0]["seg"])
    assert seg3.SOPInstanceUID != uids[0][1], "another model gives other objects"
    assert frames.size > 0


# -- resume, failures, kill ----------------------------------------------------------------------------


def _export(folder: Path, n: int) -> Path:
    for i in range(n):
        _series(folder, Geometry(origin=(0.0, 0.0, 10.0 * i)), patient=f"P{i}", tag=f"s{i}", seed=i)
    return folder


def test_rerun_skips_what_is_done_and_rescores_what_changed(tmp_path: Path, package: ModelPackage) -> None:
    src = _export(tmp_path / "src", 3)
    first = score(src, package, tmp_path / "out", ScoreOptions(cpu_threads=1))
    assert first.n_scored == 3 and first.counts == {"ok": 3}
    seg_files = sorted((tmp_path / "out" / "results").rglob("seg.dcm"))
    before = {p: p.stat().st_mtime_ns for p in seg_files}
    again = score(src, package, tmp_path / "out", ScoreOptions(cpu_threads=1))
    assert again.n_scored == 0 and again.n_reused == 3
    assert {p: p.stat().st_mtime_ns for p in seg_files} == before, "nothing rewritten"
    assert [r["study_uid"] for r in again.rows] == [r["study_uid"] for r in first.rows]
    # another model: everything is scored again, beside the first model's rows in the status table
    other = tiny_segmenter_package(tmp_path / "other", seed=3)
    third = score(src, other, tmp_path / "out", ScoreOptions(cpu_threads=1))
    assert third.n_scored == 3


def test_one_bad_study_never_stops_the_others(tmp_path: Path, package: ModelPackage) -> None:
    src = _export(tmp_path / "src", 3)
    _series(src, Geometry(), patient="MR1", tag="mr", modality="MR", seed=9)  # matches no CT rule
    from medpipe.ingest import ingest

    ingest(src, tmp_path / "ingested", workers=1)
    # damage one study's volume after ingest: its reading fails
    volumes = sorted((tmp_path / "ingested" / "volumes" / "P1").glob("*.nii.gz"))
    volumes[0].write_bytes(b"not a nifti file")
    report = score(tmp_path / "ingested", package, tmp_path / "out", ScoreOptions(cpu_threads=1))
    by_patient = {r["patient_id"]: r for r in report.rows}
    assert by_patient["P0"]["status"] == by_patient["P2"]["status"] == "ok"
    assert by_patient["P1"]["status"] == "failed" and "cannot be read" in by_patient["P1"]["reason"]
    assert by_patient["MR1"]["status"] == "skipped" and "CT" in by_patient["MR1"]["reason"]
    assert all("\n" not in r["reason"] for r in report.rows)
    rows = _rows(tmp_path / "out")
    assert {r["patient_id"]: r["status"] for r in rows} == {"P0": "ok", "P1": "failed", "P2": "ok",
                                                            "MR1": "skipped"}
    # failed studies are tried again on the next run; the good ones are not
    again = score(tmp_path / "ingested", package, tmp_path / "out", ScoreOptions(cpu_threads=1))
    assert again.n_scored == 1 and again.n_reused == 3


@pytest.mark.slow
def test_kill_then_rerun_finishes_without_duplicates(tmp_path: Path, package: ModelPackage) -> None:
    src = _export(tmp_path / "src", 6)
    clean = score(src, package, tmp_path / "clean", ScoreOptions(cpu_threads=1))
    assert clean.counts == {"ok": 6}
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medpipe.cli", "score", str(src), "--model", str(package.path), "--out", str(out),
           "--quiet", "--cpu-threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    scored = 0
    while time.time() < deadline and proc.poll() is None:
        db = out / "score_status.sqlite"
        if db.is_file():
            try:
                scored = sqlite3.connect(db).execute("SELECT count(*) FROM scores").fetchone()[0]
            except sqlite3.Error:
                scored = 0
            if scored >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; the test needs a slower run"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= scored < 6, "killed part-way"
    rerun = score(src, package, out, ScoreOptions(cpu_threads=1))
    assert rerun.counts == {"ok": 6} and rerun.n_reused >= 2
    def tree(root: Path) -> set[str]:
        return {str(p.relative_to(root / "results")) for p in (root / "results").rglob("*") if p.is_file()}
    assert tree(out) == tree(tmp_path / "clean"), "the same files, no half-written or extra ones"
    for rel in tree(out):
        if rel.endswith("seg.dcm"):
            a, b = pydicom.dcmread(out / "results" / rel), pydicom.dcmread(tmp_path / "clean" / "results" / rel)
            assert a.SOPInstanceUID == b.SOPInstanceUID and np.array_equal(a.pixel_array, b.pixel_array)
    assert not [p for p in out.rglob("*") if ".medpipe-tmp" in p.name or p.name.startswith(".tmp")]


# -- the model package -------------------------------------------------------------------------------


def test_damaged_package_is_refused_before_loading(tmp_path: Path) -> None:
    pkg = tiny_segmenter_package(tmp_path / "model")
    ModelPackage.load(pkg.path)
    weights = pkg.members[0]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match its sha256"):
        ModelPackage.load(pkg.path)
    with pytest.raises(PackageError, match="not a medpipe model package"):
        ModelPackage.load(tmp_path)


def test_package_id_covers_weights_not_the_card(tmp_path: Path) -> None:
    a = tiny_segmenter_package(tmp_path / "a", seed=0)
    b = tiny_segmenter_package(tmp_path / "b", seed=0)
    c = tiny_segmenter_package(tmp_path / "c", seed=5)
    assert a.id == b.id != c.id
    (a.path / "model_card.md").write_text("edited")
    assert ModelPackage.load(a.path).id == a.id
    card = (b.path / "model_card.md").read_text()
    assert a.id in card and "whole tumour" in card and "Neoplasm" in card


# -- classifiers ------------------------------------------------------------------------------------------


@needs_dciodvfy
def test_classifier_scores_with_probabilities_decision_and_explanation(tmp_path: Path) -> None:
    from tests.scoring_helpers import tiny_classifier_package

    pkg = tiny_classifier_package(tmp_path / "clf")
    src = _export(tmp_path / "src", 2)
    report = score(src, pkg, tmp_path / "out", ScoreOptions(explain=True, cpu_threads=1))
    assert report.counts == {"ok": 2}
    for row in report.rows:
        p0, p1 = float(row["no_tumour_probability"]), float(row["tumour_probability"])
        assert p0 + p1 == pytest.approx(1.0, abs=1e-5)
        assert row["decision"] == ("tumour" if p1 >= 0.5 else "no tumour")
        folder = tmp_path / "out" / row["results"]
        for path in sorted(folder.glob("*.dcm")):
            assert dciodvfy_errors(path) == [], path
        import highdicom as hd

        sr = hd.sr.srread(folder / "sr.dcm")
        text = str(sr)
        assert "Neoplasm" in text and f"{p1:.4f}"[:5] in text
    # the same model, but a threshold that flips the decision: an id of its own, other objects
    strict = tiny_classifier_package(tmp_path / "clf_strict", threshold=0.99)
    assert strict.id != pkg.id
    again = score(src, strict, tmp_path / "strict", ScoreOptions(cpu_threads=1))
    assert all(r["decision"] == "no tumour" or float(r["tumour_probability"]) >= 0.99 for r in again.rows)


def test_a_model_without_dicom_rules_is_refused_with_one_line(tmp_path: Path) -> None:
    pkg = tiny_segmenter_package(tmp_path / "m")
    manifest = json.loads((pkg.path / "model.json").read_text())
    manifest["inputs"]["channel_rules"] = None
    (pkg.path / "model.json").write_text(json.dumps(manifest))
    src = _export(tmp_path / "src", 1)
    with pytest.raises(PackageError, match="no DICOM channel rules"):
        score(src, pkg.path, tmp_path / "out", ScoreOptions(cpu_threads=1))


# -- the real JPEG 2000 CT ----------------------------------------------------------------------------------

ANATOMY = {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"}
ORGANS = {1: ("spleen", "78961009", "Spleen"), 5: ("liver", "10200004", "Liver"), 6: ("stomach", "69695003", "Stomach")}
#: SNOMED CT types of further TotalSegmentator classes in the label map, as TotalSegmentator's own
#: totalsegmentator_snomed_mapping.csv codes them (laterality modifiers aside)
TOTALSEG_TYPES = {"pancreas": "15776009", "adrenal_gland_right": "23451007", "colon": "71854001", "aorta": "15825003",
                  "inferior_vena_cava": "64131007", "portal_vein_and_splenic_vein": "110765007"}


def totalseg_names(label_img: nib.Nifti1Image) -> dict[int, str]:
    """Label value -> TotalSegmentator class name, from the label table in the NIfTI header extension."""
    import re

    text = label_img.header.extensions[0].get_content().decode()
    return {int(k): v for k, v in re.findall(r'<Label Key="(\d+)"[^>]*><!\[CDATA\[([^\]]+)\]\]>', text)}


@needs_dciodvfy
def test_real_ct_with_its_label_map_as_the_prediction(tmp_path: Path, shared_data: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """TotalSegmentator's CT (JPEG 2000, blank UIDs) scored with its own label map as the "prediction", every
    one of the 31 classes in its 20 slices a class of the model: the SEG that score writes must put every voxel
    of every class exactly where the label map has it, with the organs' SNOMED CT codes."""
    from medpipe.data.volumes import read_grid, seg_to_labelmap
    from medpipe.inference.package import FALLBACK_CODE
    from medpipe.scoring import results

    label_img = nib.load(shared_data / "totalseg_ct" / "example_seg_dicom.nii.gz")
    labels = np.asarray(label_img.dataobj)
    names = totalseg_names(label_img)
    values = [int(v) for v in np.unique(labels) if v > 0]
    assert len(values) == 31 and len(names) == 117
    truth = np.zeros(labels.shape, np.uint8)
    for k, value in enumerate(values, start=1):
        truth[labels == value] = k
    classes = {str(k): names[v] for k, v in enumerate(values, start=1)}
    codes = {ORGANS[v][0]: {"category": ANATOMY, "type": {"scheme": "SCT", "value": ORGANS[v][1],
                                                           "meaning": ORGANS[v][2]}} for v in ORGANS}
    pkg = tiny_segmenter_package(tmp_path / "organs", classes=classes, segment_codes=codes)

    def oracle(self: results.ResultWriter, prep, tta):  # type: ignore[no-untyped-def]
        assert read_grid(prep.item["reference_volume"]).same_as(prep.grid)
        assert np.allclose(prep.grid.affine, label_img.affine, atol=1e-3) and prep.grid.shape == truth.shape
        return {"mask": truth.copy(), "foreground": None}

    monkeypatch.setattr(results.ResultWriter, "infer", oracle)
    report = score(shared_data / "totalseg_ct" / "example_ct_dicom", pkg, tmp_path / "out",
                   ScoreOptions(cpu_threads=1))
    (row,) = report.rows
    assert row["status"] == "ok", row
    out = tmp_path / "out"
    for path in (out / row["seg"], out / row["sr"]):
        assert dciodvfy_errors(path) == [], path
    assert row["study_uid"].startswith("no-study-uid-"), "its Study Instance UID is blank: a substitute key, not dropped"
    ingest_dir = out / "ingest"
    (vol_path,) = sorted(ingest_dir.glob("volumes/*/*.nii.gz"))
    sidecar = json.loads(vol_path.with_name(vol_path.name.replace(".nii.gz", ".json")).read_text())
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(out / row["seg"]), copy=False)
    placed = seg_to_labelmap(seg, read_grid(vol_path), sidecar)
    assert np.array_equal(placed.data, truth), "the SEG lands voxel for voxel on the label map, every class"
    segments = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert list(segments) == [names[v] for v in values]
    for name, (value, meaning) in {**{n: (c, m) for n, c, m in ORGANS.values()},
                                   **{n: (c, None) for n, c in TOTALSEG_TYPES.items()}}.items():
        seg_type = segments[name].SegmentedPropertyTypeCodeSequence[0]
        category = segments[name].SegmentedPropertyCategoryCodeSequence[0]
        assert (seg_type.CodingSchemeDesignator, seg_type.CodeValue) == ("SCT", value), name
        assert meaning is None or seg_type.CodeMeaning == meaning
        assert category.CodeValue == ANATOMY["value"], name
    # classes without a known code (vertebrae, ribs, ...) are marked as the generic fallback, not invented
    rib = segments["rib_left_6"].SegmentedPropertyTypeCodeSequence[0]
    assert rib.CodeValue == FALLBACK_CODE["type"]["value"]
    voxel_ml = float(np.prod(label_img.header.get_zooms()[:3])) / 1000
    assert float(row["liver_ml"]) == pytest.approx(float((labels == 5).sum()) * voxel_ml, abs=1e-3)
    assert float(row["aorta_ml"]) == pytest.approx(float((labels == 52).sum()) * voxel_ml, abs=1e-3)


@needs_dciodvfy
def test_labelmap_seg_on_request(tmp_path: Path, package: ModelPackage) -> None:
    src = _series(tmp_path / "src", Geometry(), patient="P1", tag="a")
    report = score(src, package, tmp_path / "out", ScoreOptions(seg_type="labelmap", nifti=True, cpu_threads=1))
    (row,) = report.rows
    seg = pydicom.dcmread(tmp_path / "out" / row["seg"])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    assert dciodvfy_errors(tmp_path / "out" / row["seg"]) == []


# -- the pieces of a result, by hand ------------------------------------------------------------------


def test_decision_of_binary_and_multiclass_probabilities() -> None:
    from medpipe.scoring.results import decision

    # binary: the positive class when its probability reaches the threshold (>=), else the other class
    outputs = {"positive_class": 0, "threshold": 0.7}
    assert decision(np.array([0.75, 0.25]), outputs) == (0, 0.7)
    assert decision(np.array([0.7, 0.3]), outputs) == (0, 0.7)  # at the threshold: positive
    assert decision(np.array([0.65, 0.35]), outputs) == (1, 0.7)
    # defaults: class 1 is positive, threshold 0.5
    assert decision(np.array([0.5, 0.5]), {}) == (1, 0.5)
    assert decision(np.array([0.51, 0.49]), {}) == (0, 0.5)
    # more classes: the most probable, with its probability
    assert decision(np.array([0.2, 0.5, 0.3]), {"threshold": 0.9}) == (1, 0.5)


def test_segment_classes_in_class_order_with_their_codes() -> None:
    from medpipe.inference.package import FALLBACK_CODE, KNOWN_SEGMENT_CODES
    from medpipe.scoring.results import segment_classes

    given = {"category": {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"},
             "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}}
    # keys are JSON strings: "10" must come after "2" (numeric order, not text order)
    classes = segment_classes({"classes": {"10": "tumour", "2": {"name": "hepar", **given}, "3": "blob"}})
    assert list(classes) == [2, 3, 10]
    assert classes[2] == {"name": "hepar", **given}  # the package's own codes win
    assert classes[3] == {"name": "blob", **FALLBACK_CODE}  # unknown name: Tissue
    assert classes[10] == {"name": "tumour", **KNOWN_SEGMENT_CODES["tumour"]}
    assert segment_classes({}) == {}


def _frame(z: float, iop: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
           origin: tuple[float, float] = (0.0, 0.0)) -> FrameGeometry:
    return FrameGeometry(f"1.2.{int(z * 10) + 100}", None, (origin[0], origin[1], z), iop, (0.5, 2.0), 64, 64)  # type: ignore[arg-type]


def test_nearest_frame_and_the_point_on_it() -> None:
    from medpipe.scoring.results import nearest_frame

    frames = [_frame(7.0), _frame(0.0), _frame(4.0, origin=(-10.0, 20.0)), _frame(2.0)]
    # z 4.9: 0.9 mm from z 4 (index 2), 2.1 from z 7; on it: row = dy / row spacing, column = dx / column spacing
    assert nearest_frame(frames, (3.0, 25.0, 4.9)) == (2, ((25.0 - 20.0) / 0.5, (3.0 + 10.0) / 2.0))
    # below the stack: the lowest frame; a point off the grid gives negative indices, not a clamp
    assert nearest_frame(frames, (-1.0, -0.5, -3.0)) == (1, (-1.0, -0.5))
    # above the stack: the first frame of the list (index 0 is a frame like any other)
    assert nearest_frame(frames, (2.0, 1.0, 9.0)) == (0, (1.0 / 0.5, 2.0 / 2.0))
    # a tie (z 1 is 1 mm from z 0 and z 2): the first frame in series order
    assert nearest_frame(frames, (0.0, 0.0, 1.0))[0] == 1
    # an oblique frame: rows along (0, 0.6, 0.8), columns along (1, 0, 0), normal (0, -0.8, 0.6)
    oblique = FrameGeometry("1.2.9", None, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 0.6, 0.8), (0.5, 2.0), 8, 8)  # type: ignore[arg-type]
    below = FrameGeometry("1.2.8", None, (0.0, 0.8, -0.6), (1.0, 0.0, 0.0, 0.0, 0.6, 0.8), (0.5, 2.0), 8, 8)  # type: ignore[arg-type]
    # point = 4 x column direction + 3 x row direction + 0.2 x normal -> 0.2 mm from the first plane, 1.2 from the other
    p = (4.0 * 1.0, 3.0 * 0.6 - 0.2 * 0.8, 3.0 * 0.8 + 0.2 * 0.6)
    i, (r, c) = nearest_frame([below, oblique], p)
    assert i == 1 and (r, c) == pytest.approx((3.0 / 0.5, 4.0 / 2.0))
    # no frame, or a point that is not a number: an error, not index -1 (Python's "last frame")
    from medpipe.errors import MedpipeError

    with pytest.raises(MedpipeError, match=r"^no source frame is near the point \(0\.0, nan, 1\.0\)$"):
        nearest_frame(frames, (0.0, float("nan"), 1.0))
    with pytest.raises(MedpipeError, match="no source frame"):
        nearest_frame([], (0.0, 0.0, 0.0))


def test_study_folder_is_safe_and_stable(tmp_path: Path) -> None:
    import hashlib

    from medpipe.scoring.results import study_folder

    digest = hashlib.sha1(b"1.2.3").hexdigest()[:8]
    assert study_folder(tmp_path, "MRN 42/../x", "1.2.3") == tmp_path / "results" / "MRN_42_.._x" / digest
    assert study_folder(tmp_path, "", "1.2.3") == tmp_path / "results" / "unknown" / digest
    assert study_folder(tmp_path, "A", "1.2.4") != study_folder(tmp_path, "A", "1.2.3")
