"""``medpipe score``: DICOM results on the source geometry, idempotent, resumable, failure-isolated.

The models here are untrained tiny UNets (:mod:`tests.scoring_helpers`): what is tested is where the
results land and what the objects say, not accuracy. Positions are checked in world space from the
objects' own headers (``tests.ingested.pixel_lps``), independently of medpipe's geometry code.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medpipe.data.volumes import GridSpec
from medpipe.dicom.frames import FrameGeometry
from medpipe.dicom.sc import render_overlay, source_window
from medpipe.dicom.sr import read_findings_sr
from medpipe.errors import MedpipeError
from medpipe.inference.detection import Finding
from medpipe.inference.package import ModelPackage, PackageError
from medpipe.scoring.engine import ScoreOptions, StudyJob, score
from medpipe.scoring.results import LUNG_WINDOW, ResultWriter
from tests.dicom_checks import dciodvfy_errors, needs_dciodvfy, sr_groups
from tests.dicom_factory import AXIAL, Geometry, ct_gantry_tilt, oblique_iop, pattern, write_series
from tests.ingested import pixel_lps, values_at
from tests.scoring_helpers import tiny_classifier_package, tiny_segmenter_package

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


def test_decision_and_positive_class_of_binary_and_multiclass_probabilities() -> None:
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
    # a hand-edited package that codes only the type: the category comes from the name (KeyError before)
    typed = segment_classes({"classes": {"1": {"name": "tumour", "type": given["type"]}}})[1]
    assert typed == {"name": "tumour", "category": KNOWN_SEGMENT_CODES["tumour"]["category"], "type": given["type"]}


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


# -- the result writer, one study at a time: no ingest, no network ------------------------------------------
# What the reader hands the writer: the catalog entry of the reference series, its grid and the model's
# prediction. Here the grid is the factory's own (voxel [column, row, slice] -> RAS, so slice k of the mask,
# transposed, is source frame k) and the prediction is made by hand: every frame, volume, reference, number
# and file name expected below follows from the arrays written.

W_SHAPE = (8, 6, 5)  # columns, rows, slices
W_GEO = Geometry(origin=(-10.0, -20.0, 30.0))  # axial: pixels 0.8 mm (rows) x 1.1 mm (columns), slices 2.5 mm
#: the results' creation time; DICOM dates and times carry no microseconds
CREATED = datetime.datetime(2026, 3, 4, 10, 15, 30, 654321)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return write_series(tmp_path_factory.mktemp("writer") / "src", pattern(W_SHAPE, seed=3, noise=200), W_GEO,
                        naming="random", patient_id="MRN 7", tag="w", extra={"BodyPartExamined": "CHEST"})


@pytest.fixture(scope="module")
def two_class_package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    return tiny_segmenter_package(tmp_path_factory.mktemp("model2") / "model",
                                  classes={"2": "whole tumour", "5": "oedema"})


def _uids(study: Any) -> list[str]:
    return [study.sop_uids[(k, 0)] for k in range(W_SHAPE[2])]


def _prepared(study: Any, *, order: Any = "slices", keys: list[str] | None = None) -> Any:
    """The prepared study: the catalog lists the source files in reverse, the sidecar (``order``) in slice order."""
    if keys is None:
        keys = [str(study.paths[(k, 0)]) for k in reversed(range(W_SHAPE[2]))]
    return _prep(keys, _uids(study) if order == "slices" else order, study.study_uid, study.series_uid,
                 GridSpec(W_SHAPE, W_GEO.affine()))


def _prep(keys: list[str], order: Any, study_uid: str, series_uid: str, grid: GridSpec | None) -> Any:
    ref = Path("volumes/ct.nii.gz")
    cand = SimpleNamespace(path=ref, label="CT series 1", row=SimpleNamespace(source_keys=keys),
                           sidecar={"SourceSOPInstanceUIDs": order})
    job = StudyJob(patient_id="MRN 7", study_uid=study_uid, candidates=[cand], fingerprint="")
    item = {"reference_volume": ref, "reference_series_uid": series_uid,
            "series_uids": {"CT": series_uid, "PT": "1.2.3.4"}}
    return SimpleNamespace(job=job, item=item, grid=grid, data={"image": "the input"})


def _writer(package: ModelPackage, out: Path, net: Any = None, **options: Any) -> ResultWriter:
    return ResultWriter(package, net, out, ScoreOptions(**options), created=CREATED)


def _folder(study: Any) -> str:
    return f"results/MRN_7/{hashlib.sha1(study.study_uid.encode()).hexdigest()[:8]}"


def _common(study: Any) -> dict[str, Any]:
    """The columns every result row has."""
    return {"patient_id": "MRN 7", "study_uid": study.study_uid, "status": "ok", "reason": "",
            "series_used": f"CT={study.series_uid};PT=1.2.3.4", "reference_series_uid": study.series_uid,
            "results": _folder(study)}


def _series_base(package: ModelPackage) -> int:
    """9000 + a model-dependent offset: 10 x (the id's first 8 hex digits modulo 90)."""
    return 9000 + int(package.id[:8], 16) % 90 * 10


def _seg_frames(seg: pydicom.Dataset) -> dict[tuple[int, str], np.ndarray]:
    """(segment number, source SOP Instance UID) -> the SEG frame."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    out = {}
    for f, fg in zip(seg.pixel_array.reshape(-1, seg.Rows, seg.Columns), seg.PerFrameFunctionalGroupsSequence,
                     strict=True):
        ident = fg.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        (src,) = [s.ReferencedSOPInstanceUID for d in fg.DerivationImageSequence for s in d.SourceImageSequence]
        out[(int(ident[0].ReferencedSegmentNumber), str(src))] = f
    return out


def _map_frames(pm: pydicom.Dataset) -> list[tuple[str, np.ndarray]]:
    """(source SOP Instance UID, values) of each Parametric Map frame."""
    return [(str(s.ReferencedSOPInstanceUID), f)
            for f, fg in zip(pm.pixel_array.reshape(-1, pm.Rows, pm.Columns), pm.PerFrameFunctionalGroupsSequence,
                             strict=True)
            for d in fg.DerivationImageSequence for s in d.SourceImageSequence]


def _map_quantity(pm: pydicom.Dataset) -> str:
    groups = pm.SharedFunctionalGroupsSequence[0]
    mapping = groups.RealWorldValueMappingSequence[0]
    return str(mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeMeaning)


def _check_overlays(out: Path, paths: str, study: Any, slices: tuple[int, ...], values: np.ndarray,
                    outline: np.ndarray | None, *, package: ModelPackage, description: str) -> None:
    """The Secondary Captures ``paths`` are the frames ``slices``, in slice order, with ``values`` drawn over them;
    series number and UIDs as the writer derives them for ``package``."""
    uids = _uids(study)
    assert len(paths.split(";")) == len(slices)
    for n, (path, k) in enumerate(zip(paths.split(";"), slices, strict=True), start=1):
        assert path.endswith(f"/overlay_{n:02d}_sc.dcm")
        sc = pydicom.dcmread(out / path)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == uids[k]
        assert (sc.SeriesNumber, sc.InstanceNumber, sc.DerivationDescription) == (_series_base(package) + 4, n,
                                                                                  description)
        assert sc.SeriesDescription == f"OVERLAY {package.name}"
        assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == (_derived(package, study.series_uid, "SC", "series"),
                                                             _derived(package, study.series_uid, "SC", "instance", n))
        image = study.truth[:, :, k].T
        expected = render_overlay(image, source_window(pydicom.dcmread(study.paths[(k, 0)]), None, image),
                                  np.clip(values[:, :, k].T, 0.0, 1.0), None if outline is None else outline[:, :, k].T)
        np.testing.assert_array_equal(sc.pixel_array, expected, err_msg=path)


def test_writer_segmentation_objects_follow_the_mask(tmp_path: Path, study: Any,
                                                     two_class_package: ModelPackage) -> None:
    """Guards: class -> segment numbers (classes 2 and 5 are segments 1 and 2), each SEG frame on its own source
    frame, volumes in mL (rounded in the row only), series numbers and descriptions, the study folder, the row,
    the probability map clipped to [0, 1] on the source frames, and the explanation's key frames (the three most
    segmented, in slice order)."""
    pkg = two_class_package
    mask = np.zeros(W_SHAPE, np.uint8)
    mask[1:4, 2:5, 1] = 2  # 9 voxels
    mask[2:6, 1:3, 3] = 5  # 8 voxels
    mask[0:2, 0:2, 4] = 2  # 4 voxels; nothing on slices 0 and 2
    n = int(np.prod(W_SHAPE))
    fg = (np.arange(n, dtype=np.float32).reshape(W_SHAPE) / (n - 1)) * 1.4 - 0.2  # -0.2 .. 1.2
    row = _writer(pkg, tmp_path, nifti=True, explain=True).write(_prepared(study), {"mask": mask, "foreground": fg})
    folder = _folder(study)
    # 13 and 8 voxels of 0.8 x 1.1 x 2.5 mm = 2.2 uL: 0.0286 and 0.0176 mL
    assert row == {**_common(study), "whole_tumour_ml": 0.029, "oedema_ml": 0.018,
                   "seg": f"{folder}/seg.dcm", "sr": f"{folder}/sr.dcm", "nifti": f"{folder}/mask.nii.gz",
                   "map": f"{folder}/map_pm.dcm", "preview": f"{folder}/preview.png",
                   "overlays": ";".join(f"{folder}/overlay_{i:02d}_sc.dcm" for i in (1, 2, 3))}
    base, uids = _series_base(pkg), _uids(study)
    seg = pydicom.dcmread(tmp_path / row["seg"])
    assert (seg.SeriesNumber, seg.SeriesDescription, seg.InstanceNumber) == (base + 1, "SEG test segmenter", 1)
    assert (seg.SegmentationType, seg.ContentLabel) == ("BINARY", "MEDPIPE")
    assert seg.ContentDescription == f"test segmenter (model {pkg.version})"
    assert (seg.ContentDate, seg.ContentTime) == ("20260304", "101530")
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (_derived(pkg, study.series_uid, "SEG", "series"),
                                                           _derived(pkg, study.series_uid, "SEG", "instance", 1))
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "whole tumour"), (2, "oedema")]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence] == ["Neoplasm", "Tissue"]
    expected = {(number, uids[k]): (mask[:, :, k] == cls).T
                for number, cls in ((1, 2), (2, 5)) for k in range(W_SHAPE[2]) if (mask[:, :, k] == cls).any()}
    frames = {key: f for key, f in _seg_frames(seg).items() if f.any()}
    assert frames.keys() == expected.keys()
    for key, f in frames.items():
        np.testing.assert_array_equal(f, expected[key], err_msg=str(key))
    sr = pydicom.dcmread(tmp_path / row["sr"])
    assert (sr.SeriesNumber, sr.SeriesDescription) == (base + 2, "SR test segmenter")
    assert sr.SOPInstanceUID == _derived(pkg, study.series_uid, "SR", "instance", 1)
    volumes = {g["121191"][0]: float(g["118565006"][0]) for g in sr_groups(sr)}
    assert volumes == pytest.approx({"1": 13 * 0.0022, "2": 8 * 0.0022}, rel=1e-9)
    img = nib.load(tmp_path / row["nifti"])
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
    np.testing.assert_allclose(img.affine, W_GEO.affine(), atol=1e-5)
    pm = pydicom.dcmread(tmp_path / row["map"])
    assert (pm.SeriesNumber, pm.ContentDescription, _map_quantity(pm)) == (base + 3, "foreground probability",
                                                                           "Probability")
    assert pm.SOPInstanceUID == _derived(pkg, study.series_uid, "PM", "instance", 1)
    maps = dict(_map_frames(pm))
    assert sorted(maps) == sorted(uids)
    for k, uid in enumerate(uids):
        np.testing.assert_allclose(maps[uid], np.clip(fg[:, :, k].T, 0.0, 1.0), atol=1e-6)
    _check_overlays(tmp_path, row["overlays"], study, (1, 3, 4), fg, mask > 0, package=pkg,
                    description="foreground probability over source frame")
    assert (tmp_path / row["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_writer_labelmap_and_the_key_frames_when_nothing_is_segmented(tmp_path: Path, study: Any,
                                                                      two_class_package: ModelPackage) -> None:
    """Guards: ``seg_type="labelmap"``; no NIfTI unless asked; the key frames are the segmented ones, then the most
    probable (mean of the map), not the first in slice order; no map without a foreground prediction."""
    mask = np.zeros(W_SHAPE, np.uint8)
    mask[3, 3, 2] = 5
    fg = np.zeros(W_SHAPE, np.float32)
    for k, p in enumerate((0.5, 0.1, 0.05, 0.2, 0.9)):
        fg[:, :, k] = p
    row = _writer(two_class_package, tmp_path / "a", seg_type="labelmap", explain=True).write(
        _prepared(study), {"mask": mask, "foreground": fg})
    assert "nifti" not in row and (row["whole_tumour_ml"], row["oedema_ml"]) == (0.0, 0.002)
    assert pydicom.dcmread(tmp_path / "a" / row["seg"]).SegmentationType == "LABELMAP"
    # the one segmented frame (2, the least probable), then the two most probable (4, 0)
    _check_overlays(tmp_path / "a", row["overlays"], study, (0, 2, 4), fg, mask > 0, package=two_class_package,
                    description="foreground probability over source frame")
    empty = np.zeros(W_SHAPE, np.uint8)
    row = _writer(two_class_package, tmp_path / "b", explain=True).write(_prepared(study),
                                                                          {"mask": empty, "foreground": fg})
    _check_overlays(tmp_path / "b", row["overlays"], study, (0, 3, 4), fg, empty > 0, package=two_class_package,
                    description="foreground probability over source frame")
    row = _writer(two_class_package, tmp_path / "c", explain=True).write(_prepared(study),
                                                                          {"mask": mask, "foreground": None})
    assert {"map", "overlays"}.isdisjoint(row) and row["seg"].endswith("seg.dcm")


def test_writer_volumes_are_those_of_the_mask_on_its_grid(tmp_path: Path, study: Any,
                                                          two_class_package: ModelPackage) -> None:
    """Guards: the SR's volumes are the mask's on the grid it was predicted on (the numbers in the row), not the
    SEG's on the source frames: a voxel of the coarse grid beyond the last source column counts."""
    coarse = GridSpec((5, 4, 5), W_GEO.affine() @ np.diag([2.0, 2.0, 1.0, 1.0]))  # 2.2 x 1.6 x 2.5 mm = 8.8 uL
    mask = np.zeros(coarse.shape, np.uint8)
    mask[0, 0, 0] = 2  # on source pixels (0..1, 0..1) of frame 0
    mask[4, 0, 0] = 2  # source column 8: beyond the 8 columns of the frames
    prep = _prep([str(study.paths[(n, 0)]) for n in range(W_SHAPE[2])], _uids(study), study.study_uid,
                 study.series_uid, coarse)
    row = _writer(two_class_package, tmp_path).write(prep, {"mask": mask, "foreground": None})
    assert (row["whole_tumour_ml"], row["oedema_ml"]) == (0.018, 0.0)  # 2 x 8.8 uL
    volumes = {g["121191"][0]: float(g["118565006"][0]) for g in sr_groups(pydicom.dcmread(tmp_path / row["sr"]))}
    assert volumes == pytest.approx({"1": 2 * 0.0088, "2": 0.0}, abs=1e-12)


def test_writer_segment_anatomy_and_a_long_model_name(tmp_path: Path, study: Any,
                                                      two_class_package: ModelPackage) -> None:
    """Guards: a class's anatomic region from the package reaches its SEG segment; a model name too long for
    DICOM's 64-character descriptions is cut, not refused (content and series descriptions)."""
    name = "Liver lesion segmentation, multi-phase contrast CT, nnU-Net_residual_encoder_L"  # 78 characters
    classes = {**two_class_package.outputs["classes"]}
    classes["5"] = {**classes["5"], "anatomic_region": LIVER}
    pkg = _with(two_class_package, name=name, outputs={**two_class_package.outputs, "classes": classes})
    mask = np.zeros(W_SHAPE, np.uint8)
    mask[1:3, 1:3, 1:3] = 5
    row = _writer(pkg, tmp_path).write(_prepared(study), {"mask": mask, "foreground": None})
    seg = pydicom.dcmread(tmp_path / row["seg"])
    assert ["AnatomicRegionSequence" in s for s in seg.SegmentSequence] == [False, True]
    assert seg.SegmentSequence[1].AnatomicRegionSequence[0].CodeMeaning == "Liver"
    assert seg.ContentDescription == f"{name} (model {pkg.version})"[:64]
    assert {s.SegmentAlgorithmName for s in seg.SegmentSequence} == {name[:64]}
    assert seg.SeriesDescription == f"SEG {name}"[:64]
    assert pydicom.dcmread(tmp_path / row["sr"]).SeriesDescription == f"SR {name}"[:64]


def test_writer_preview_title_names_the_model(tmp_path: Path, study: Any, two_class_package: ModelPackage,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: the preview is drawn from the written SEG over the source frames, titled with the model's name."""
    from medpipe.report import seg_preview

    calls: list[Any] = []
    real = seg_preview.seg_preview_png

    def spy(seg_path: Path, frames: Any, full: Any, path: Path, *, title: str) -> list[int]:
        calls.append((seg_path, [f.sop_instance_uid for f in frames], title))
        return real(seg_path, frames, full, path, title=title)

    monkeypatch.setattr(seg_preview, "seg_preview_png", spy)
    mask = np.zeros(W_SHAPE, np.uint8)
    mask[2, 2, 2] = 2
    row = _writer(two_class_package, tmp_path).write(_prepared(study), {"mask": mask, "foreground": None})
    assert calls == [(tmp_path / row["seg"], _uids(study),
                      "test segmenter: the written SEG, read back, over its source frames")]


def _with(package: ModelPackage, **changes: Any) -> ModelPackage:
    """The package with some manifest sections replaced (another model id, nothing else changes)."""
    return ModelPackage(package.path, {**package.manifest, **changes})


def test_writer_classification_row_report_and_map(tmp_path: Path, study: Any) -> None:
    """Guards: one probability column per class (6 decimals), the decision and threshold, the SR reporting the
    positive class of a binary model with its code and name, every class of a multi-class one (uncoded classes as
    "Clinical finding", unnamed ones as "class N"), and the Grad-CAM map named after the decided class."""
    pkg = tiny_classifier_package(tmp_path / "clf")
    n = int(np.prod(W_SHAPE))
    cam = np.linspace(0.0, 1.0, n, dtype=np.float32).reshape(W_SHAPE)
    cam[:, :, 1] = 0.99  # the most salient frames: 1, 4, 3
    row = _writer(pkg, tmp_path / "a", explain=True).write(
        _prepared(study), {"probabilities": np.array([0.12345678, 0.87654322]), "map": cam})
    folder = _folder(study)
    assert row == {**_common(study), "no_tumour_probability": 0.123457, "tumour_probability": 0.876543,
                   "decision": "tumour", "threshold": 0.5, "sr": f"{folder}/sr.dcm", "map": f"{folder}/map_pm.dcm",
                   "overlays": ";".join(f"{folder}/overlay_{i:02d}_sc.dcm" for i in (1, 2, 3))}
    base = _series_base(pkg)
    sr = pydicom.dcmread(tmp_path / "a" / row["sr"])
    assert (sr.SeriesNumber, sr.SeriesDescription) == (base + 2, "SR test classifier")
    assert sr.SOPInstanceUID == _derived(pkg, study.series_uid, "SR", "instance", 1)
    (group,) = sr_groups(sr)
    assert (group["112039"], group["121071"], [float(v) for v in group["122157"]]) == (
        ["tumour"], ["108369006"], [0.87654322])
    # the algorithm: the package's name and version, medpipe as its source, the model id and the threshold
    assert (group["111001"], group["111003"], group["122405"]) == (["test classifier"], [pkg.version], ["medpipe"])
    assert group["111002"] == [f"model_sha256={pkg.id}", "threshold=0.5"]
    pm = pydicom.dcmread(tmp_path / "a" / row["map"])
    assert (pm.SeriesNumber, pm.ContentDescription, _map_quantity(pm)) == (base + 3, "Grad-CAM (tumour)", "Saliency")
    assert pm.SOPInstanceUID == _derived(pkg, study.series_uid, "PM", "instance", 1)
    _check_overlays(tmp_path / "a", row["overlays"], study, (1, 3, 4), cam, None, package=pkg,
                    description="Grad-CAM (tumour) over source frame")
    # the positive class is 0: its probability is reported, and the decision follows it; a map without
    # --explain is not written
    zero = _with(pkg, outputs={**pkg.outputs, "positive_class": 0})
    row = _writer(zero, tmp_path / "b").write(_prepared(study), {"probabilities": np.array([0.6, 0.4]), "map": cam})
    assert (row["decision"], "map" in row, "overlays" in row) == ("no tumour", False, False)
    (group,) = sr_groups(pydicom.dcmread(tmp_path / "b" / row["sr"]))
    assert (group["112039"], group["121071"], group["122157"]) == (["no tumour"], ["404684003"], ["0.6"])
    # three classes, one named, none coded: every class reported; the decision is the most probable
    three = _with(pkg, outputs={"class_names": {"1": "cyst"}, "threshold": 0.5})
    row = _writer(three, tmp_path / "c", explain=True).write(
        _prepared(study), {"probabilities": np.array([0.2, 0.3, 0.5]), "map": cam})
    assert pydicom.dcmread(tmp_path / "c" / row["map"]).ContentDescription == "Grad-CAM (2)"  # unnamed: its index
    assert {k: v for k, v in row.items() if k.endswith("probability") or k in ("decision", "threshold")} == {
        "class_0_probability": 0.2, "cyst_probability": 0.3, "class_2_probability": 0.5, "decision": "2",
        "threshold": 0.5}
    groups = sr_groups(pydicom.dcmread(tmp_path / "c" / row["sr"]))
    assert [(g["112039"], g["121071"], g["122157"]) for g in groups] == [
        (["class 0"], ["404684003"], ["0.2"]), (["cyst"], ["404684003"], ["0.3"]),
        (["class 2"], ["404684003"], ["0.5"])]


def test_writer_map_is_resampled_linearly_onto_the_source_frames(tmp_path: Path, study: Any) -> None:
    """Guards: a map on a coarser grid than the source (the classifier's input grid) is interpolated linearly at
    each source pixel (a map linear in space stays exactly linear; nearest neighbour would make steps), and a
    description longer than DICOM's 64 characters is cut, not refused."""
    pkg = tiny_classifier_package(tmp_path / "clf")
    long = "Adenocarcinoma of the lung, stage IIIA, EGFR exon 19 deletion, PD-L1 high"  # 73 characters
    pkg = _with(pkg, outputs={**pkg.outputs, "class_names": {"0": "none", "1": long}})
    coarse = GridSpec((5, 4, 5), W_GEO.affine() @ np.diag([2.0, 2.0, 1.0, 1.0]))  # voxel (i, j, k) = pixel (2j, 2i)
    i, _, k = np.indices(coarse.shape, dtype=np.float32)
    cam = 0.05 + 0.1 * i + 0.1 * k
    grid = _prepared(study).grid
    prep = _prep([str(study.paths[(n, 0)]) for n in range(W_SHAPE[2])], _uids(study), study.study_uid,
                 study.series_uid, coarse)
    row = _writer(pkg, tmp_path, explain=True).write(prep, {"probabilities": np.array([0.1, 0.9]), "map": cam})
    c, _, kk = np.indices(grid.shape, dtype=np.float32)
    fine = 0.05 + 0.05 * c + 0.1 * kk  # column c of the source is i = c / 2 of the map
    pm = pydicom.dcmread(tmp_path / row["map"])
    maps = dict(_map_frames(pm))
    for n, uid in enumerate(_uids(study)):
        np.testing.assert_allclose(maps[uid], fine[:, :, n].T, atol=1e-6)
    description = f"Grad-CAM ({long})"
    assert pm.ContentDescription == description[:64]
    _check_overlays(tmp_path, row["overlays"], study, (2, 3, 4), fine, None, package=pkg,
                    description=f"{description} over source frame"[:64])
    (group,) = sr_groups(pydicom.dcmread(tmp_path / row["sr"]))
    assert group["112039"] == [long[:64]]


MASS = {"scheme": "SCT", "value": "4147007", "meaning": "Mass"}
LIVER = {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}


def _detector(folder: Path, inference: dict[str, Any], outputs: dict[str, Any] | None = None) -> ModelPackage:
    """A detector package's manifest as ``build_detector_package`` writes it (the writer reads no weights); by
    default a liver mass detector (not the nodule / lung codes the SR writer falls back on)."""
    return ModelPackage(folder, {"kind": "detector", "name": "test detector", "members": [], "inputs": {},
                                 "outputs": {"finding": MASS, "finding_site": LIVER} if outputs is None else outputs,
                                 "inference": inference})


def _derived(package: ModelPackage, series_uid: str, what: str, *rest: object) -> str:
    """The UID the writer derives for an object ``what`` made from ``series_uid`` (see OutputIdentity.derived)."""
    from medpipe.dicom.output import derive_uid

    return derive_uid("medpipe.score", package.id, series_uid, what, *rest)


def test_writer_detector_report_csv_and_key_images(tmp_path: Path, study: Any) -> None:
    """Guards: findings at or above the package's report threshold are reported (SR points, diameters and scores
    rounded as in the CSV, labels, the package's codes) and get a key image of the nearest source frame with a
    circle of their diameter; every finding is in findings.csv with its nearest frame; the counts, the highest
    score and the threshold; the UIDs derive from the model and the source series."""
    pkg = _detector(tmp_path / "det", {"report_threshold": 0.59999})
    # slice k lies at z = 30 + 2.5 k; pixel (row r, column c) at x = -10 + 1.1 c, y = -20 + 0.8 r
    findings = [Finding((-10.0 + 1.1 * 4, -20.0 + 0.8 * 3, 35.4), 6.0049, 0.91236),  # slice 2, (3, 4)
                Finding((-10.0, -20.0, 31.0), 3.2, 0.6),  # slice 0 (1 mm away; slice 1 1.5 mm), pixel (0, 0)
                Finding((1.23456, -15.55555, 40.00444), 4.56789, 0.3)]  # slice 4, below the threshold
    # given in another order: numbered by score all the same ("Nodule 2" is one finding in the SR, CSV and image)
    row = _writer(pkg, tmp_path / "a").write(_prepared(study), {"findings": [findings[2], findings[1], findings[0]]})
    folder, uids, base = _folder(study), _uids(study), _series_base(pkg)
    keys = [f"{folder}/finding_01_sc.dcm", f"{folder}/finding_02_sc.dcm"]
    assert row == {**_common(study), "findings": 2, "max_score": 0.9124, "report_threshold": 0.6,
                   "sr": f"{folder}/sr.dcm", "findings_csv": f"{folder}/findings.csv", "key_images": ";".join(keys)}
    report = read_findings_sr(tmp_path / "a" / row["sr"])
    assert [(f.label, f.diameter_mm, f.score) for f in report.findings] == [("Nodule 1", 6.0, 0.9124),
                                                                           ("Nodule 2", 3.2, 0.6)]
    assert [f.center for f in report.findings] == [pytest.approx(findings[0].center_lps),
                                                   pytest.approx(findings[1].center_lps)]
    assert {(f.finding.meaning, f.finding_site.meaning) for f in report.findings} == {("Mass", "Liver")}  # type: ignore[union-attr]
    sr = pydicom.dcmread(tmp_path / "a" / row["sr"])
    assert (sr.SeriesNumber, sr.SeriesDescription) == (base + 2, "SR test detector")
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (_derived(pkg, study.series_uid, "SR", "series"),
                                                         _derived(pkg, study.series_uid, "SR", "instance", 1))
    with open(tmp_path / "a" / row["findings_csv"], newline="") as fh:
        assert list(csv.DictReader(fh)) == [
            {"finding": "1", "x": "-5.6", "y": "-17.6", "z": "35.4", "diameter_mm": "6.0", "score": "0.9124",
             "reported": "True", "frame_sop_instance_uid": uids[2], "key_image": keys[0]},
            {"finding": "2", "x": "-10.0", "y": "-20.0", "z": "31.0", "diameter_mm": "3.2", "score": "0.6",
             "reported": "True", "frame_sop_instance_uid": uids[0], "key_image": keys[1]},
            {"finding": "3", "x": "1.23", "y": "-15.56", "z": "40.0", "diameter_mm": "4.57", "score": "0.3",
             "reported": "False", "frame_sop_instance_uid": uids[4], "key_image": ""}]
    rr, cc = np.mgrid[:6, :8]
    # radius in pixels: half the diameter over the finer pixel spacing (0.8 mm), at least 2; pixels at exactly
    # the radius are inside (Nodule 2: pixels (0, 2) and (2, 0))
    for n, (k, centre, radius, text) in enumerate([(2, (3.0, 4.0), 6.0049 / 2 / 0.8, "Nodule 1: 6.0 mm, score 0.91"),
                                                   (0, (0.0, 0.0), 2.0, "Nodule 2: 3.2 mm, score 0.60")]):
        sc = pydicom.dcmread(tmp_path / "a" / keys[n])
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == uids[k]
        assert (sc.SeriesNumber, sc.InstanceNumber, sc.DerivationDescription) == (base + 4, n + 1, text)
        assert sc.SeriesDescription == "KEY test detector"
        assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == (_derived(pkg, study.series_uid, "SC", "series"),
                                                             _derived(pkg, study.series_uid, "SC", "instance", n + 1))
        disk = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2
        expected = render_overlay(study.truth[:, :, k].T, LUNG_WINDOW, None, disk)
        np.testing.assert_array_equal(sc.pixel_array, expected, err_msg=keys[n])


def test_writer_detector_key_image_of_a_multiframe_source(tmp_path: Path, shared_data: Path) -> None:
    """Guards: on an enhanced multi-frame source (one instance: the real Siemens XA10 file) the key image is the
    frame nearest to the finding (its frame number referenced, its pixels drawn), not the first frame; a series
    of one instance is written for a classifier too."""
    from medpipe.dicom.frames import frame_geometries
    from medpipe.dicom.sc import source_frame

    path = shared_data / "dcm_qa_enh" / "In" / "Siemens" / "XA10" / "6_2.dcm"
    ds = pydicom.dcmread(path)
    frames = frame_geometries([ds])
    k = len(frames) // 2 + 1
    f = frames[k]
    iop = np.asarray(f.orientation)
    # row 5.3, column 7.2 of frame k (off the pixel grid: no pixel lies at exactly the radius)
    centre = np.asarray(f.position) + 5.3 * f.pixel_spacing[0] * iop[3:] + 7.2 * f.pixel_spacing[1] * iop[:3]
    pkg = _detector(tmp_path / "det", {"report_threshold": 0.5})
    prep = _prep([str(path)], [str(ds.SOPInstanceUID)], str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), None)
    with pytest.warns(UserWarning, match="person name"):  # highdicom on the source's one-component names
        row = _writer(pkg, tmp_path).write(prep, {"findings": [Finding(tuple(centre), 10.0, 0.9)]})
    sc = pydicom.dcmread(tmp_path / row["key_images"])
    ref = sc.SourceImageSequence[0]
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedFrameNumber) == (ds.SOPInstanceUID, f.frame_number)
    radius = max(2.0, 10.0 / 2 / min(f.pixel_spacing))
    rr, cc = np.mgrid[:f.rows, :f.columns]
    disk = (rr - 5.3) ** 2 + (cc - 7.2) ** 2 <= radius ** 2
    np.testing.assert_array_equal(sc.pixel_array,
                                  render_overlay(source_frame(ds, f.frame_number), LUNG_WINDOW, None, disk))
    # a classifier's report on the same one-instance series
    clf = tiny_classifier_package(tmp_path / "clf")
    row = _writer(clf, tmp_path / "clf_out").write(prep, {"probabilities": np.array([0.3, 0.7]), "map": None})
    sr = pydicom.dcmread(tmp_path / "clf_out" / row["sr"])
    assert sr.SOPInstanceUID == _derived(clf, str(ds.SeriesInstanceUID), "SR", "instance", 1)
    # its explanation: the overlays name their frames, the most salient three in frame order
    from medpipe.data.volumes import read_grid
    from medpipe.ingest import ingest

    (volume,) = ingest(path, tmp_path / "ingest", workers=1).volumes
    grid = read_grid(tmp_path / "ingest" / volume["volume"])
    ramp = np.broadcast_to(np.linspace(0.1, 0.9, grid.shape[2], dtype=np.float32), grid.shape).copy()
    prep.grid = grid
    row = _writer(clf, tmp_path / "map_out", explain=True).write(prep, {"probabilities": np.array([0.3, 0.7]),
                                                                        "map": ramp})
    pm = pydicom.dcmread(tmp_path / "map_out" / row["map"])
    mean = {int(s.ReferencedFrameNumber): float(f.mean()) for f, fg in zip(
        pm.pixel_array.reshape(-1, pm.Rows, pm.Columns), pm.PerFrameFunctionalGroupsSequence, strict=True)
        for d in fg.DerivationImageSequence for s in d.SourceImageSequence}
    position = {fr.frame_number: i for i, fr in enumerate(frames)}
    salient = sorted(sorted(mean, key=lambda number: -mean[number])[:3], key=lambda number: position[number])
    overlays = [pydicom.dcmread(tmp_path / "map_out" / p).SourceImageSequence[0] for p in row["overlays"].split(";")]
    assert [(o.ReferencedSOPInstanceUID, o.ReferencedFrameNumber) for o in overlays] == [
        (ds.SOPInstanceUID, number) for number in salient]
    # and a segmenter's SEG, SR, preview and explanation on it: the key frames are the segmented ones (class 1)
    # even where the probability map is lower than on the others
    seg_pkg = tiny_segmenter_package(tmp_path / "seg")
    mask = (ramp > 0.5).astype(np.uint8)
    row = _writer(seg_pkg, tmp_path / "seg_out", explain=True).write(prep, {"mask": mask, "foreground": 1 - ramp})
    seg = pydicom.dcmread(tmp_path / "seg_out" / row["seg"])
    assert seg.SOPInstanceUID == _derived(seg_pkg, str(ds.SeriesInstanceUID), "SEG", "instance", 1)
    segmented = {int(s.ReferencedFrameNumber) for fg in seg.PerFrameFunctionalGroupsSequence
                 for d in fg.DerivationImageSequence for s in d.SourceImageSequence}
    assert segmented == {number for number in mean if mean[number] > 0.5}  # the ramp's frames above one half
    assert (tmp_path / "seg_out" / row["preview"]).read_bytes()[:4] == b"\x89PNG"
    key = sorted(sorted(segmented, key=lambda number: mean[number])[:3], key=lambda number: position[number])
    overlays = [pydicom.dcmread(tmp_path / "seg_out" / p).SourceImageSequence[0] for p in row["overlays"].split(";")]
    assert [o.ReferencedFrameNumber for o in overlays] == key


def test_writer_detector_defaults_and_no_findings(tmp_path: Path, study: Any) -> None:
    """Guards: the report threshold is 0.5 when the package names none (a score of 0.5 is reported); a package
    without a finding code reports a "Clinical finding" without a site; no finding gives an "absent" report, an
    empty findings.csv and a highest score of 0."""
    pkg = _detector(tmp_path / "det", {}, outputs={})
    row = _writer(pkg, tmp_path / "a").write(_prepared(study), {"findings": [Finding((-9.0, -19.0, 31.0), 2.0, 0.5)]})
    assert (row["findings"], row["report_threshold"], row["max_score"]) == (1, 0.5, 0.5)
    with open(tmp_path / "a" / row["findings_csv"], newline="") as fh:
        assert [(r["score"], r["reported"]) for r in csv.DictReader(fh)] == [("0.5", "True")]  # at the threshold
    (finding,) = read_findings_sr(tmp_path / "a" / row["sr"]).findings
    assert (finding.finding.meaning, finding.finding_site) == ("Clinical finding", None)  # type: ignore[union-attr]
    # the same study again, into the same folder (a rescoring): replaced, not refused
    row = _writer(pkg, tmp_path / "a").write(_prepared(study), {"findings": []})
    assert row["findings"] == 0 and read_findings_sr(tmp_path / "a" / row["sr"]).findings == []
    row = _writer(pkg, tmp_path / "b").write(_prepared(study), {"findings": []})
    assert {k: row[k] for k in ("findings", "max_score", "report_threshold", "key_images")} == {
        "findings": 0, "max_score": 0.0, "report_threshold": 0.5, "key_images": ""}
    assert read_findings_sr(tmp_path / "b" / row["sr"]).findings == []
    assert (tmp_path / "b" / row["findings_csv"]).read_text().splitlines() == [
        "finding,x,y,z,diameter_mm,score,reported,frame_sop_instance_uid,key_image"]


def test_writer_reads_the_sources_in_the_sidecar_slice_order(tmp_path: Path, study: Any,
                                                             two_class_package: ModelPackage) -> None:
    """Guards: the reference series' headers (no pixels) in the sidecar's slice order, whatever the catalog's
    order; instances the sidecar does not list after the others; the catalog's order without a usable list."""
    writer = _writer(two_class_package, tmp_path)
    uids = _uids(study)
    datasets, keys = writer._sources(_prepared(study))
    assert [d.SOPInstanceUID for d in datasets] == uids
    assert keys == [str(study.paths[(k, 0)]) for k in range(W_SHAPE[2])]
    assert not any("PixelData" in d for d in datasets)
    datasets, _ = writer._sources(_prepared(study, order=[uids[3], uids[1]]))
    assert [d.SOPInstanceUID for d in datasets] == [uids[3], uids[1], uids[4], uids[2], uids[0]]
    for order in (None, [], [uids[0], 7], uids[0]):
        datasets, _ = writer._sources(_prepared(study, order=order))
        assert [d.SOPInstanceUID for d in datasets] == uids[::-1], order
    with pytest.raises(MedpipeError, match=r"^the catalog lists no source files for CT series 1$"):
        writer._sources(_prepared(study, keys=[]))
    lost = _prepared(study)
    lost.item["reference_volume"] = Path("volumes/other.nii.gz")
    with pytest.raises(MedpipeError, match=r"^reference volume volumes/other\.nii\.gz is not among the study's volumes$"):
        writer._sources(lost)


def test_writer_infers_with_the_package_settings(tmp_path: Path, study: Any) -> None:
    """Guards: the segmenter gets the grid, TTA and the package's small-component removal (none: 0), and the
    foreground probability only for an explanation; the classifier gets the package's TTA axes (default: axis
    0; none without TTA), one study per batch; the detector gets the image."""
    prep = _prepared(study)
    calls: list[Any] = []
    probs = np.stack([np.full(W_SHAPE, 0.25, np.float32), np.full(W_SHAPE, 0.75, np.float32)])
    mask = np.ones(W_SHAPE, np.uint8)

    def segment(data: Any, grid: Any, *, tta: bool, min_component_ml: float) -> Any:
        calls.append((data, grid, tta, min_component_ml))
        return SimpleNamespace(mask=mask, probabilities=probs)

    net = SimpleNamespace(segment=segment)
    pkg = tiny_segmenter_package(tmp_path / "seg", min_component_ml=5.0)
    out = _writer(pkg, tmp_path, net, explain=True).infer(prep, True)
    assert calls == [(prep.data, prep.grid, True, 5.0)] and out["mask"] is mask
    assert out["foreground"].dtype == np.float32 and np.all(out["foreground"] == 0.75)
    out = _writer(_with(pkg, inference={}), tmp_path, net).infer(prep, False)
    assert calls[-1][2:] == (False, 0) and out["foreground"] is None

    def predict_proba(dataset: Any, *, tta_axes: Any, batch_size: int) -> np.ndarray:
        calls.append((dataset, tta_axes, batch_size))
        return np.array([[0.4, 0.6]])

    net = SimpleNamespace(predict_proba=predict_proba)
    clf = tiny_classifier_package(tmp_path / "clf")
    for inference, tta, axes in [({"tta_axes": [1, 2]}, True, [1, 2]), ({}, True, [0]), ({"tta_axes": [1]}, False, None)]:
        out = _writer(_with(clf, inference=inference), tmp_path, net).infer(prep, tta)
        assert calls[-1] == ([{"image": "the input"}], axes, 1)
        assert out["map"] is None and out["probabilities"].tolist() == [0.4, 0.6]
    det = _detector(tmp_path / "det", {})
    out = _writer(det, tmp_path, SimpleNamespace(detect=lambda image: [image])).infer(prep, False)
    assert out == {"findings": ["the input"]}


def test_writer_grad_cam_of_the_decided_class_on_the_reference_grid(tmp_path: Path, study: Any) -> None:
    """Guards: the explanation is the Grad-CAM of the decided class, put back on the reference grid through the
    affine MONAI tracks; an input that lost its affine is an error, not a map in the wrong place."""
    import torch
    from monai.data import MetaTensor

    from medpipe.inference.segmentation import probabilities_on_grid
    from medpipe.models.explain import Explainer

    base = tiny_classifier_package(tmp_path / "clf")
    net = base.load_model("cpu")
    torch.manual_seed(0)
    affine = torch.as_tensor(W_GEO.affine() @ np.diag([0.5, 6 / 16, 5 / 8, 1.0]))  # 16 x 16 x 8 over the study
    image = MetaTensor(torch.randn(1, 16, 16, 8), affine=affine)
    # a threshold that decides the less probable class: Grad-CAM's own default is the most probable one
    p1 = float(net.predict_proba([{"image": image}], tta_axes=None, batch_size=1)[0][1])
    decided = 1 if p1 < 0.5 else 0
    pkg = _with(base, outputs={**base.outputs, "threshold": 0.0 if decided == 1 else 1.0})
    prep = SimpleNamespace(**{**vars(_prepared(study)), "data": {"image": image}})
    out = _writer(pkg, tmp_path, net, explain=True).infer(prep, False)
    assert out["map"].shape == W_SHAPE

    def cam(cls: int) -> np.ndarray:
        maps = Explainer(net.nets[0], net.config, ["gradcam"])(image[None], cls)["gradcam"][0]
        return probabilities_on_grid(np.asarray(maps, dtype=np.float32)[None], image.affine, prep.grid)[0]

    np.testing.assert_allclose(out["map"], cam(decided), atol=1e-6)
    assert not np.allclose(out["map"], cam(1 - decided), atol=1e-3)
    prep.data = {"image": torch.randn(1, 16, 16, 8)}
    with pytest.raises(MedpipeError, match=r"^the classifier's eval transforms lost the image geometry \(no affine\); "
                                           r"the Grad-CAM map cannot be put back on the source series$"):
        _writer(pkg, tmp_path, net, explain=True).infer(prep, False)
