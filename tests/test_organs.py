"""Organ recognition: the chest CT sample's 8-organ SEG -> datalist (label names and SNOMED CT codes) -> model
package -> ``medpipe score``'s multi-segment SEG and its SR of organ volumes.

Two tiny phantom studies (48 x 48 pixels of ~8 mm, 6 mm slices: one head-first axial, one of the other
acquisitions); scoring uses the study's truth as the "prediction" (an oracle in place of the network), so the
SEG and SR can be checked against the truth voxel for voxel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from medpipe.data.channels import ChannelRule
from medpipe.data.datalist_builder import SegLabels, build_items, datalist_document
from medpipe.dicom.anatomy import ANATOMICAL_STRUCTURE, anatomy_codes
from medpipe.sample.chest_ct import ORGAN_CODES, generate_chest_ct
from medpipe.sample.chest_phantom import ORGANS
from tests.dicom_checks import dciodvfy_errors, needs_dciodvfy

TINY = {"matrix": 48, "min_thickness": 6.0, "max_thickness": 6.0}
RULES = {"CT": ChannelRule(modality="CT")}


def _code(seq: Any) -> dict[str, str]:
    c = seq[0]
    return {"scheme": str(c.CodingSchemeDesignator), "value": str(c.CodeValue), "meaning": str(c.CodeMeaning)}


@pytest.fixture(scope="module")
def organs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sample (2 studies), ingested, and its datalist (all studies in train)."""
    from medpipe.ingest import ingest

    root = tmp_path_factory.mktemp("organs")
    cases = generate_chest_ct(root / "sample", cases=2, seed=11, **TINY)
    ingest(root / "sample", root / "ingest", workers=1)
    result = build_items(root / "ingest", RULES, "CT", SegLabels(), work_dir=root / "work")
    doc = datalist_document(result, channels=["CT"], reference="CT", ingest_dir=root / "ingest", seed=0, val=0.0,
                            test=0.0, rules=RULES)
    path = root / "datalist.json"
    path.write_text(json.dumps(doc))
    return {"root": root, "cases": cases, "doc": doc, "datalist": path}


def test_the_sample_seg_codes_are_the_anatomy_table(organs: dict[str, Any]) -> None:
    """One table of organ codes: the sample's truth SEG (written from pydicom's ``codes.SCT``) agrees with it."""
    seg = pydicom.dcmread(organs["cases"][0].seg_path)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == list(ORGANS.values())
    for s in seg.SegmentSequence:
        expected = anatomy_codes(str(s.SegmentLabel))
        assert expected is not None, s.SegmentLabel
        assert _code(s.SegmentedPropertyCategoryCodeSequence) == expected["category"] == ANATOMICAL_STRUCTURE
        assert _code(s.SegmentedPropertyTypeCodeSequence) == expected["type"], s.SegmentLabel
    assert len(ORGAN_CODES) == len(ORGANS)


def test_datalist_carries_each_segments_name_and_codes(organs: dict[str, Any]) -> None:
    doc = organs["doc"]
    seg = pydicom.dcmread(organs["cases"][0].seg_path)
    assert doc["label_names"] == {str(v): n.lower() for v, n in ORGANS.items()}
    assert doc["label_codes"] == {str(int(s.SegmentNumber)): {
        "category": _code(s.SegmentedPropertyCategoryCodeSequence),
        "type": _code(s.SegmentedPropertyTypeCodeSequence)} for s in seg.SegmentSequence}
    from medpipe.data.datalist import load_datalist

    assert load_datalist(organs["datalist"])["label_codes"] == doc["label_codes"]  # the schema accepts it


def _package(folder: Path, datalist: Path, labels: dict[str, Any], segment_codes: dict[str, Any] | None = None) -> Any:
    """A package of an untrained tiny UNet with ``labels`` (a checkpoint's label info) trained on ``datalist``."""
    import torch

    from medpipe.inference.checkpoint import SEGMENTER_FORMAT, SEGMENTER_VERSION, save_checkpoint
    from medpipe.inference.package import build_segmenter_package
    from medpipe.models.segmentation import build_from_config
    from tests.scoring_helpers import CT_EVAL

    cfg = {"name": "unet", "in_channels": 1, "out_channels": 1 + len(labels["classes"]), "channels": [4, 8],
           "strides": [2], "num_res_units": 0, "norm": "instance", "dropout": 0.0}
    torch.manual_seed(0)
    net = build_from_config(cfg)
    ck = folder.parent / f"{folder.name}.pt"
    save_checkpoint(ck, {"format": SEGMENTER_FORMAT, "version": SEGMENTER_VERSION,
                         "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "model": cfg,
                         "labels": labels, "channels": ["CT"], "roi_size": [16, 16, 16], "eval_transforms": CT_EVAL,
                         "sw_batch_size": 4, "overlap": 0.25, "epoch": 0, "val_dice": 0.5, "seed": 0})
    return build_segmenter_package(folder, [ck], datalist, name="organ test", segment_codes=segment_codes)


def test_package_classes_take_the_codes_of_their_labels(organs: dict[str, Any], tmp_path: Path) -> None:
    from medpipe.data.labels import label_info
    from medpipe.inference.package import FALLBACK_CODE, ModelPackage

    doc = organs["doc"]
    info = label_info("multiclass", None, doc["label_names"])
    pkg = ModelPackage.load(_package(tmp_path / "all", organs["datalist"], info).path)
    classes = pkg.outputs["classes"]
    assert {k: c["name"] for k, c in classes.items()} == doc["label_names"]
    for k, c in classes.items():
        assert {"category": c["category"], "type": c["type"]} == doc["label_codes"][k], c["name"]
    card = (pkg.path / "model_card.md").read_text()
    assert "| 5 | liver | Anatomical Structure (91723000) | Liver (10200004) |" in card
    # with held-out metrics (medpipe export): a row per organ, undefined values said so
    from medpipe.inference.package import write_card

    per_label = {"lungs": {"dice": 0.95, "dice_ci95": [0.94, 0.96], "hd95": 3.5, "hd95_ci95": [2.0, 5.0], "n": 4},
                 "airways": {"dice": 0.0, "dice_ci95": [0.0, 0.0], "hd95": None, "hd95_ci95": [None, None], "n": 4}}
    write_card(pkg, {"04_evaluate": {"dice": 0.9, "dice_ci95": [0.8, 0.95], "per_label": per_label}})
    card = (pkg.path / "model_card.md").read_text()
    assert "| lungs | 0.95 [0.94, 0.96] | 3.5 [2, 5] | 4 |" in card and "| airways | 0 [0, 0] | n/a | 4 |" in card
    # a class merged from two labels has no single concept: the fallback, unless the stage's segment_codes names it;
    # segment_codes wins over the labels' codes
    merged = label_info("multiclass", {1: 1, 2: 1, 5: 2}, doc["label_names"])
    own = {"category": ANATOMICAL_STRUCTURE, "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}}
    classes = _package(tmp_path / "merged", organs["datalist"], merged,
                       segment_codes={"liver": {**own, "category": FALLBACK_CODE["category"]}}).outputs["classes"]
    assert classes["1"]["name"] == "lungs + airways" and classes["1"]["type"] == FALLBACK_CODE["type"]
    assert classes["2"]["category"] == FALLBACK_CODE["category"] and classes["2"]["type"] == own["type"]


@needs_dciodvfy
def test_scored_seg_has_a_coded_segment_per_organ_and_the_sr_their_volumes(
        organs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each study scored with its own truth as the prediction: the multi-segment SEG read back is the truth voxel
    for voxel (also on the non-axial acquisition), every segment has its organ's codes, the SR holds every
    organ's volume (the truth's voxel count times the voxel volume) and both objects pass dciodvfy."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medpipe.data.labels import label_info
    from medpipe.data.volumes import read_grid, read_voxels, seg_to_labelmap
    from medpipe.scoring import results
    from medpipe.scoring.engine import ScoreOptions, score

    doc = organs["doc"]
    pkg = _package(tmp_path / "pkg", organs["datalist"], label_info("multiclass", None, doc["label_names"]))
    truth = {it["study_uid"]: it for it in doc["train"]}
    assert len(truth) == 2

    def oracle(self: results.ResultWriter, prep: Any, tta: bool) -> dict[str, Any]:
        item = truth[prep.job.study_uid]
        assert read_grid(item["label"]).same_as(prep.grid)
        return {"mask": read_voxels(item["label"]).astype(np.uint8), "foreground": None}

    monkeypatch.setattr(results.ResultWriter, "infer", oracle)
    out = tmp_path / "out"
    report = score(organs["root"] / "sample", pkg, out, ScoreOptions(cpu_threads=1))
    assert [r["status"] for r in report.rows] == ["ok", "ok"], report.rows
    for row in report.rows:
        item = truth[row["study_uid"]]
        labels = read_voxels(item["label"])
        grid = read_grid(item["label"])
        assert set(np.unique(labels)) == set(range(len(ORGANS) + 1))
        seg_ds = pydicom.dcmread(out / row["seg"])
        assert dciodvfy_errors(out / row["seg"]) == [] and dciodvfy_errors(out / row["sr"]) == []
        for s in seg_ds.SegmentSequence:
            n = str(int(s.SegmentNumber))
            assert str(s.SegmentLabel) == doc["label_names"][n]
            assert _code(s.SegmentedPropertyCategoryCodeSequence) == doc["label_codes"][n]["category"]
            assert _code(s.SegmentedPropertyTypeCodeSequence) == doc["label_codes"][n]["type"]
        sidecar = json.loads(Path(item["reference_volume"].replace(".nii.gz", ".json")).read_text())
        placed = seg_to_labelmap(hd.seg.Segmentation.from_dataset(seg_ds, copy=False), grid, sidecar)
        assert np.array_equal(placed.data, labels), "the SEG lands voxel for voxel on the truth"
        voxel_ml = abs(float(np.linalg.det(grid.affine[:3, :3]))) / 1000.0
        sr = hd.sr.srread(out / row["sr"])
        groups = sr.content.get_volumetric_roi_measurement_groups()
        volumes = {int(g.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber):
                   g.get_measurements(name=codes.SCT.Volume)[0].value for g in groups}
        assert sorted(volumes) == list(ORGANS)
        for value, name in ORGANS.items():
            expected = float((labels == value).sum()) * voxel_ml
            assert float(volumes[value]) == pytest.approx(expected, rel=1e-6), name
            assert float(row[f"{name.lower()}_ml"]) == pytest.approx(expected, abs=1e-3), name


# -- real geometry: TotalSegmentator's CT and its 117-class label map ------------------------------------------


def test_totalseg_label_map_lands_where_it_belongs_through_the_dataset_stage(shared_data: Path, tmp_path: Path) -> None:
    """The real JPEG 2000 CT ingested, its label map given to the ``dataset`` stage as a NIfTI label source, once as
    TotalSegmentator wrote it (on the CT's grid: used as it is) and once stored the way another tool might (axes
    permuted and flipped, its affine saying so: resampled by nearest neighbour onto the CT grid). Both times every
    one of the 31 classes of the 20 slices is on exactly the voxels it labels; the organs sit on their tissue."""
    import logging

    import nibabel as nib

    from medpipe.data.datalist import load_datalist
    from medpipe.data.volumes import read_grid, read_voxels
    from medpipe.ingest import ingest
    from medpipe.stage import RunContext
    from medpipe.stages.dataset import DatasetParams, dataset

    ingest(shared_data / "totalseg_ct" / "example_ct_dicom", tmp_path / "ingest", workers=1)
    src = shared_data / "totalseg_ct" / "example_seg_dicom.nii.gz"
    label = nib.load(src)
    data = np.asarray(label.dataobj)
    ornt = np.array([[2, -1], [0, 1], [1, -1]])  # array axis 0 -> axis 2 reversed, 1 -> 0, 2 -> 1 reversed
    moved = nib.orientations.apply_orientation(data, ornt)
    other = tmp_path / "other" / "labels.nii.gz"
    other.parent.mkdir()
    nib.save(nib.Nifti1Image(moved, label.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)), other)
    assert moved.shape == (512, 20, 512)

    for n, (path, resampled) in enumerate(((src, False), (other, True))):
        stage_dir = tmp_path / "run" / "stages" / f"0{n}_dataset"
        stage_dir.mkdir(parents=True)
        ctx = RunContext(tmp_path / "run", stage_dir, 0, "cpu", False, False, {"ingest_dir": str(tmp_path / "ingest")},
                         logging.getLogger("test.organs"))
        params = DatasetParams.model_validate({"channels": {"CT": {"modality": "CT"}}, "reference": "CT",
                                               "labels": {"source": "nifti", "pattern": str(path)},
                                               "split": {"val": 0.0, "test": 0.0}})
        doc = load_datalist(Path(dataset(ctx, params).outputs["datalist"]))
        (item,) = doc["train"]
        assert (Path(item["label"]) != path) == resampled
        placed = read_voxels(item["label"])
        assert read_grid(item["label"]).same_as(read_grid(item["image"][0]))
        assert np.array_equal(placed, data), "every label on exactly the voxels it labels"
        assert len(np.unique(placed)) == 32
    ct = read_voxels(item["image"][0])
    for value, low, high in ((5, 0, 250), (1, 0, 250), (52, 50, 500)):  # liver, spleen, contrast-filled aorta (HU)
        assert low < float(np.median(ct[placed == value])) < high, value
    assert float(np.median(ct[placed == 32])) > 150  # a vertebra: bone


def test_small_components_per_class_or_over_the_whole_foreground() -> None:
    """A liver (class 1) with a 2-voxel island of kidney (class 2) touching it, and a lone 2-voxel liver island:
    over the whole foreground only the lone island is small (the kidney island is part of the liver's blob); per
    class both are removed and nothing else changes."""
    from medpipe.inference.postprocess import remove_small_components

    mask = np.zeros((12, 12, 12), np.uint8)
    mask[2:8, 2:8, 2:8] = 1
    mask[8, 4:6, 4] = 2  # touches the liver
    mask[10, 10, 9:11] = 1  # alone
    whole, n_whole = remove_small_components(mask, 1.0, 3.0)
    per_class, n_class = remove_small_components(mask, 1.0, 3.0, per_class=True)
    assert n_whole == 1 and int((whole == 2).sum()) == 2 and whole[10, 10, 9] == 0
    assert n_class == 2 and not (per_class == 2).any() and per_class[10, 10, 9] == 0
    assert int((per_class == 1).sum()) == 216 and int((mask == 1).sum()) == 218  # the input is not modified


def test_components_below_a_fraction_of_the_largest_are_removed_too() -> None:
    """Two kidneys of 27 and 18 voxels (a pair: both kept) and a false island of 4 voxels, which is above
    min_ml but below a fifth of the largest kidney; min_ml 0 still removes nothing."""
    from medpipe.inference.postprocess import remove_small_components

    mask = np.zeros((16, 16, 16), np.uint8)
    mask[1:4, 1:4, 1:4] = 7
    mask[8:10, 1:4, 1:4] = 7
    mask[13:15, 13:15, 13] = 7
    kept, n = remove_small_components(mask, 1.0, 2.0, per_class=True, min_fraction=0.2)
    assert n == 1 and int((kept == 7).sum()) == 27 + 18 and kept[13, 13, 13] == 0
    assert remove_small_components(mask, 1.0, 2.0, per_class=True)[1] == 0
    assert remove_small_components(mask, 1.0, 0.0, per_class=True, min_fraction=0.2)[1] == 0
