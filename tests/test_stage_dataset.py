"""The ``dataset`` stage (channel rules, SEG -> label map, resampling, patient-level split) and the
caching datasets of ``medpipe.data.datasets`` (a changed transform list never reuses a cache)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError

from medpipe.data.datalist import load_datalist
from medpipe.data.splits import split_patients
from medpipe.data.volumes import _in_world_space, read_grid, read_seg
from medpipe.errors import StageError
from medpipe.stage import RunContext
from medpipe.stages.dataset import DatasetParams
from medpipe.stages.dataset import dataset as dataset_stage
from medpipe.stages.ingest import IngestParams
from medpipe.stages.ingest import ingest as ingest_stage
from medpipe.stages.sample import SampleParams
from medpipe.stages.sample import sample as sample_stage

TINY: dict[str, Any] = {"cases": 5, "matrix": 32, "pixel_spacing": 6.0, "slices": 8, "slice_thickness": 16.0}
CHANNELS = ["T1", "T1c", "T2", "FLAIR"]


def make_ctx(root: Path, name: str, artifacts: dict[str, Any], seed: int = 0) -> RunContext:
    stage_dir = root / "stages" / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(root, stage_dir, seed, "cpu", False, False, dict(artifacts), logging.getLogger(f"test.{name}"))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """5 tiny synthetic studies, generated and ingested through the stages."""
    root = tmp_path_factory.mktemp("run")
    arts: dict[str, Any] = {}
    arts.update(sample_stage(make_ctx(root, "00_sample", arts), SampleParams(out=str(root / "sample"), **TINY)).outputs)
    res = ingest_stage(make_ctx(root, "01_ingest", arts), IngestParams(workers=1))
    assert res.metrics["n_volumes"] == 4 * TINY["cases"]
    arts.update(res.outputs)
    sample = json.loads((Path(arts["sample_dir"]) / "sample.json").read_text())
    return {"root": root, "artifacts": arts, "cases": {c["patient_id"]: c for c in sample["cases"]}}


def run_dataset(ingested: dict[str, Any], name: str, ingest_dir: Path | None = None, seed: int = 0,
                **params: Any) -> tuple[dict[str, Any], Any]:
    arts = dict(ingested["artifacts"])
    if ingest_dir is not None:
        arts["ingest_dir"] = str(ingest_dir)
    res = dataset_stage(make_ctx(ingested["root"], name, arts, seed), DatasetParams.model_validate(params))
    return load_datalist(Path(res.outputs["datalist"])), res


def all_items(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["train"] + doc["val"] + doc["test"]


def copy_ingest(ingested: dict[str, Any], dest: Path) -> Path:
    src = Path(ingested["artifacts"]["ingest_dir"])
    shutil.copytree(src, dest)
    return dest


# -- channel rules ----------------------------------------------------------------------------------


def test_channel_rules_pick_the_right_series(ingested: dict[str, Any]) -> None:
    doc, res = run_dataset(ingested, "10_dataset")
    assert doc["channels"] == CHANNELS and doc["reference"] == "FLAIR"
    items = all_items(doc)
    assert len(items) == TINY["cases"] and res.metrics["n_skipped"] == 0
    assert res.metrics["n_train"] + res.metrics["n_val"] + res.metrics["n_test"] == TINY["cases"]
    for it in items:
        truth = ingested["cases"][it["patient_id"]]
        assert it["study_uid"] == truth["study_uid"]
        assert it["series_uids"] == {c: truth["series_uids"][c] for c in CHANNELS}
        assert it["reference_series_uid"] == truth["series_uids"]["FLAIR"]
        for channel, path in zip(CHANNELS, it["image"], strict=True):
            side = json.loads(Path(path).with_name(Path(path).name.replace(".nii.gz", ".json")).read_text())
            assert side["SeriesDescription"] == channel
        assert it["reference_volume"] == it["image"][3]
        assert it["class"] is None and it["label"] is not None


def test_study_missing_a_channel_is_skipped_with_reason(ingested: dict[str, Any], tmp_path: Path) -> None:
    ingest_dir = copy_ingest(ingested, tmp_path / "ingest")
    with sqlite3.connect(ingest_dir / "catalog.sqlite") as db:  # as if MPS0002 had no T2 series
        db.execute("DELETE FROM volumes WHERE patient_id = 'MPS0002' AND series_description = 'T2'")
    doc, res = run_dataset(ingested, "11_dataset", ingest_dir)
    assert res.metrics["n_skipped"] == 1
    (skip,) = doc["skipped"]
    assert skip["patient_id"] == "MPS0002"
    assert skip["reason"].startswith("no series matches channel T2 (")
    assert "MPS0002" not in {it["patient_id"] for it in all_items(doc)}
    assert len(all_items(doc)) == TINY["cases"] - 1


def test_ambiguous_rule_skips_every_study(ingested: dict[str, Any]) -> None:
    with pytest.raises(StageError, match=r"no usable study .*2 series match channel T1 .*'T1'.*'T1c'"):
        run_dataset(ingested, "12_dataset", channels={"T1": {"series_description": "T1"}, "FLAIR": {}},
                    reference="FLAIR", labels=None)


def test_params_are_checked() -> None:
    with pytest.raises(ValidationError, match="reference 'T2' is not one of the channels"):
        DatasetParams.model_validate({"channels": {"T1": {}}, "reference": "T2"})
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        DatasetParams.model_validate({"channels": {"FLAIR": {"series_description": "(flair"}}})
    with pytest.raises(ValidationError, match="fold must be between 0 and folds - 1"):
        DatasetParams.model_validate({"split": {"folds": 3, "fold": 3}})
    with pytest.raises(ValidationError, match="input tag 'png'|does not match any of the expected tags"):
        DatasetParams.model_validate({"labels": {"source": "png"}})


# -- geometry: labels and channels on the reference grid ---------------------------------------------


def test_seg_label_maps_match_ground_truth_on_the_flair_grid(ingested: dict[str, Any]) -> None:
    doc, _ = run_dataset(ingested, "10_dataset")
    assert doc["label_names"] == {"1": "necrotic core", "2": "edema", "3": "enhancing tumor"}
    sample_dir = Path(ingested["artifacts"]["sample_dir"])
    with open(sample_dir / "labels.csv", newline="") as fh:
        csv_rows = {r["patient_id"]: r for r in csv.DictReader(fh)}
    voxel_ml = TINY["pixel_spacing"] ** 2 * TINY["slice_thickness"] / 1000
    for it in all_items(doc):
        truth = ingested["cases"][it["patient_id"]]["voxel_counts"]
        label_img = nib.load(it["label"])
        flair_img = nib.load(it["image"][3])
        assert label_img.shape == flair_img.shape
        np.testing.assert_allclose(label_img.affine, flair_img.affine, atol=1e-6)
        labels = np.asarray(label_img.dataobj)
        assert labels.dtype == np.uint8
        counts = np.bincount(labels.ravel(), minlength=4)
        assert counts[1:].tolist() == [truth["necrotic"], truth["edema"], truth["enhancing"]]
        row = csv_rows[it["patient_id"]]
        assert int(row["has_tumor"]) == int(counts[1:].sum() > 0)
        for value, column in ((1, "necrotic_ml"), (2, "edema_ml"), (3, "enhancing_ml")):
            assert counts[value] * voxel_ml == pytest.approx(float(row[column]), abs=1e-3)
        # independent placement through the SEG's own geometry (world space) gives the same voxels
        ref = read_grid(it["reference_volume"])
        seg = read_seg(str(sample_dir / "dicom" / it["patient_id"] / "SEG" / "seg.dcm"))
        np.testing.assert_array_equal(_in_world_space(seg, ref, [1, 2, 3], {1: 1, 2: 2, 3: 3}), labels)
        if counts[2]:  # and on the image, the oedema is where FLAIR is bright
            flair = flair_img.get_fdata()
            tissue = (flair > np.percentile(flair, 50)) & (labels == 0)
            assert flair[labels == 2].mean() > 1.5 * flair[tissue].mean()


def test_channel_on_another_grid_is_resampled_onto_the_reference(ingested: dict[str, Any], tmp_path: Path) -> None:
    ingest_dir = copy_ingest(ingested, tmp_path / "ingest")
    t1_path = next((ingest_dir / "volumes" / "MPS0001").glob("0001_T1_*.nii.gz"))
    orig = nib.load(t1_path)
    data = orig.get_fdata().astype(np.float32)
    # drop the first column of voxels: the same world positions on a grid one voxel smaller
    shifted = orig.affine @ np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(data[1:], shifted), t1_path)
    doc, _ = run_dataset(ingested, "13_dataset", ingest_dir)
    item = next(it for it in all_items(doc) if it["patient_id"] == "MPS0001")
    out = nib.load(item["image"][0])
    assert Path(item["image"][0]).is_relative_to(ingested["root"] / "stages" / "13_dataset")
    flair = nib.load(item["image"][3])
    assert out.shape == flair.shape
    np.testing.assert_allclose(out.affine, flair.affine, atol=1e-6)
    np.testing.assert_allclose(out.get_fdata()[1:], data[1:], rtol=1e-5, atol=1e-3)
    other = next(it for it in all_items(doc) if it["patient_id"] == "MPS0003")
    assert Path(other["image"][0]).is_relative_to(ingest_dir)  # same grid: used in place, not copied


def test_nifti_label_maps_are_put_on_the_reference_grid(ingested: dict[str, Any], tmp_path: Path) -> None:
    doc, _ = run_dataset(ingested, "10_dataset")
    truth = {it["patient_id"]: np.asarray(nib.load(it["label"]).dataobj) for it in all_items(doc)}
    affine = {it["patient_id"]: nib.load(it["label"]).affine for it in all_items(doc)}
    for pid, lab in truth.items():
        if pid == "MPS0001":  # stored on a grid one voxel smaller, same world positions
            shift = np.eye(4)
            shift[0, 3] = 1
            nib.save(nib.Nifti1Image(lab[1:].astype(np.int16), affine[pid] @ shift), tmp_path / f"{pid}.nii.gz")
        else:
            nib.save(nib.Nifti1Image(lab, affine[pid]), tmp_path / f"{pid}.nii.gz")
    (tmp_path / "MPS0002.nii.gz").unlink()
    doc2, res = run_dataset(ingested, "17_dataset",
                            labels={"source": "nifti", "pattern": str(tmp_path / "{patient_id}.nii.gz")})
    assert [s["patient_id"] for s in doc2["skipped"]] == ["MPS0002"]
    assert doc2["skipped"][0]["reason"].startswith("no label map ")
    for it in all_items(doc2):
        out = np.asarray(nib.load(it["label"]).dataobj)
        expected = truth[it["patient_id"]].copy()
        if it["patient_id"] == "MPS0001":
            assert Path(it["label"]).is_relative_to(ingested["root"] / "stages" / "17_dataset")
            expected[0] = 0  # outside the stored grid
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_allclose(nib.load(it["label"]).affine, affine[it["patient_id"]], atol=1e-6)


def test_csv_class_labels(ingested: dict[str, Any]) -> None:
    doc, _ = run_dataset(ingested, "14_dataset", labels={"source": "csv", "column": "has_tumor",
                                                         "class_names": {0: "no tumour", 1: "tumour"}})
    assert doc["class_names"] == {"0": "no tumour", "1": "tumour"}
    for it in all_items(doc):
        assert it["label"] is None
        assert it["class"] == int(ingested["cases"][it["patient_id"]]["has_tumor"])


# -- splitting ------------------------------------------------------------------------------------------


def test_split_is_by_patient_deterministic_and_stratified() -> None:
    strata = {f"P{i:03d}": int(i % 3 == 0) for i in range(40)}
    a = split_patients(strata, val=0.2, test=0.2, seed=7)
    assert a == split_patients(strata, val=0.2, test=0.2, seed=7)
    assert a != split_patients(strata, val=0.2, test=0.2, seed=8)
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == set(strata)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (24, 8, 8)
    for k in ("val", "test"):  # 14 of 40 are class 1: about 2.8 of every 8
        assert sum(strata[p] for p in a[k]) in (2, 3)


def test_datalist_split_keeps_each_patient_in_one_split(ingested: dict[str, Any]) -> None:
    doc, res = run_dataset(ingested, "15_dataset", split={"val": 0.2, "test": 0.2, "seed": 3})
    owners = {}
    for name in ("train", "val", "test"):
        for it in doc[name]:
            assert owners.setdefault(it["patient_id"], name) == name
    assert (res.metrics["n_val"], res.metrics["n_test"]) == (1, 1)
    again, _ = run_dataset(ingested, "16_dataset", split={"val": 0.2, "test": 0.2, "seed": 3})
    assert again["split"]["patients"] == doc["split"]["patients"]


def test_kfold_partitions_cover_every_patient_once() -> None:
    strata = {f"P{i:03d}": int(i % 4 == 0) for i in range(23)}
    k = 4
    splits = [split_patients(strata, val=0.0, test=0.2, seed=1, folds=k, fold=i) for i in range(k)]
    test = splits[0]["test"]
    assert len(test) == 5 and all(s["test"] == test for s in splits)
    vals = [p for s in splits for p in s["val"]]
    assert sorted(vals) == sorted(set(strata) - set(test))  # every non-test patient validates exactly once
    for s in splits:
        assert set(s["train"]) | set(s["val"]) == set(strata) - set(test)
        assert not set(s["train"]) & set(s["val"])
    with pytest.raises(StageError, match="cannot form 30 folds"):
        split_patients(strata, val=0.0, test=0.2, seed=1, folds=30, fold=0)


# -- caching datasets -----------------------------------------------------------------------------------


def _spec(factor: float) -> list[dict[str, Any]]:
    return [
        {"LoadImaged": {"keys": ["image"]}},
        {"EnsureChannelFirstd": {"keys": ["image"]}},
        {"Orientationd": {"keys": ["image"], "axcodes": "RAS"}},
        {"ScaleIntensityd": {"keys": ["image"], "minv": None, "maxv": None, "factor": factor}},
        {"RandFlipd": {"keys": ["image"], "prob": 0.0, "spatial_axis": 0}},
    ]


def test_disk_cache_is_keyed_by_the_transform_list(ingested: dict[str, Any], tmp_path: Path) -> None:
    from medpipe.data.datasets import cache_folder, make_dataset

    doc, _ = run_dataset(ingested, "10_dataset")
    items = [{"image": it["image"][3], "label": it["label"], "class": None} for it in doc["train"][:2]]
    raw = nib.load(items[0]["image"]).get_fdata()
    cache = tmp_path / "cache"
    assert cache_folder(cache, _spec(1.0)) != cache_folder(cache, _spec(3.0))

    def first(factor: float, mode: str = "disk") -> Any:
        return make_dataset(items, _spec(factor), mode, cache)[0]  # type: ignore[arg-type]

    a = first(1.0)  # computed and written
    assert len(list(cache_folder(cache, _spec(1.0)).glob("*.pt"))) == 1
    np.testing.assert_allclose(a["image"][0].numpy(), raw[::-1] * 2.0, rtol=1e-5)  # RAS: x flipped
    b = first(3.0)  # another list: must not read the factor-1 cache
    np.testing.assert_allclose(b["image"][0].numpy(), raw[::-1] * 4.0, rtol=1e-5)
    ds = make_dataset(items, _spec(1.0), "disk", cache)
    ds._pre_transform = None  # a cache hit must not run the cached transforms again
    a2 = ds[0]  # read back from the cache: same values and metadata as computed
    np.testing.assert_array_equal(a2["image"].numpy(), a["image"].numpy())
    np.testing.assert_allclose(a2["image"].affine.numpy(), a["image"].affine.numpy())
    assert a2["image"].meta["filename_or_obj"] == items[0]["image"]
    assert [op["class"] for op in a2["image"].applied_operations] == ["Orientation", "RandFlipd"]
    assert "label" in a2 and "class" not in a2  # None values are dropped (collate cannot batch them)
    m = first(3.0, "memory")
    np.testing.assert_allclose(m["image"].numpy(), b["image"].numpy())


def test_disk_cache_notices_a_changed_input_file(ingested: dict[str, Any], tmp_path: Path) -> None:
    from medpipe.data.datasets import make_dataset

    doc, _ = run_dataset(ingested, "10_dataset")
    path = tmp_path / "flair.nii.gz"
    shutil.copyfile(doc["train"][0]["image"][3], path)
    items = [{"image": str(path)}]
    before = make_dataset(items, _spec(0.0), "disk", tmp_path / "cache")[0]["image"].numpy()
    img = nib.load(path)
    nib.save(nib.Nifti1Image(img.get_fdata() + 100.0, img.affine), path)
    after = make_dataset(items, _spec(0.0), "disk", tmp_path / "cache")[0]["image"].numpy()
    np.testing.assert_allclose(after, before + 100.0, rtol=1e-5)
