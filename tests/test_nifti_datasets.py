"""NIfTI datasets (nnU-Net v2, Decathlon, CSV) -> checked datalists; the datalist format and its validation."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.data.datalist import datalist_schema, load_datalist
from medpipe.data.nifti_datasets import import_nifti_dataset, read_source
from medpipe.errors import SourceError, StageError
from tests.nifti_cases import CHANNELS, SHAPE, affine, lesion_plan, make_csv, make_msd, make_nnunet

SCHEMA = Path(__file__).resolve().parents[1] / "medpipe" / "data" / "datalist.schema.json"


def _all(doc: dict) -> list[dict]:
    return [*doc["train"], *doc["val"], *doc["test"]]


# -- nnU-Net v2 ---------------------------------------------------------------------------------------------


def test_nnunet_dataset_becomes_a_split_datalist_without_copies(tmp_path: Path) -> None:
    src = make_nnunet(tmp_path, n=8)
    out = tmp_path / "out"
    s = import_nifti_dataset("nnunet", src, out, val=0.25, test=0.25, seed=1)
    assert s.channels == CHANNELS and s.reference == "FLAIR" and s.label_names == {1: "edema", 2: "core"}
    assert s.counts == {"train": 4, "val": 2, "test": 2} and not s.skipped and not s.resampled
    doc = load_datalist(s.datalist)  # validated on read
    assert doc["channels"] == CHANNELS and doc["label_names"] == {"1": "edema", "2": "core"}
    items = _all(doc)
    assert sorted(it["case_id"] for it in items) == [f"synth_{i:03d}" for i in range(8)]
    for it in items:  # the source files themselves, channel order as declared
        assert it["image"] == [str(src / "imagesTr" / f"{it['case_id']}_{c:04d}.nii.gz") for c in range(2)]
        assert it["label"] == str(src / "labelsTr" / f"{it['case_id']}.nii.gz")
        assert it["reference_volume"] == it["image"][0]
        assert it["has_foreground"] == lesion_plan(8)[int(it["case_id"][-3:])]
    assert not (out / "images").exists()
    # stratified by label presence: the two lesion-free cases are not both in one split
    assert all(sum(not it["has_foreground"] for it in doc[s]) <= 1 for s in ("train", "val", "test"))
    assert json.loads((out / "import.json").read_text())["counts"] == s.counts


def test_undeclared_label_values_missing_channels_and_non_overlapping_grids_skip_the_case(tmp_path: Path) -> None:
    src = make_nnunet(tmp_path, n=8)
    bad = src / "labelsTr" / "synth_001.nii.gz"
    data = np.asarray(nib.load(bad).dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, affine()), str(bad))
    (src / "imagesTr" / "synth_002_0001.nii.gz").unlink()
    far = src / "imagesTr" / "synth_004_0001.nii.gz"
    img = nib.load(far)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine(origin=(500.0, 500.0, 500.0))), str(far))
    s = import_nifti_dataset("nnunet", src, tmp_path / "out", val=0.2, test=0.2)
    reasons = {sk["case_id"]: sk["reason"] for sk in s.skipped}
    assert set(reasons) == {"synth_001", "synth_002", "synth_004"}
    assert "value(s) [7] that are not declared labels (0=background, 1=edema, 2=core)" in reasons["synth_001"]
    assert "synth_002_0001.nii.gz does not exist" in reasons["synth_002"]
    assert "channel T1c does not overlap the FLAIR image" in reasons["synth_004"]
    assert sum(s.counts.values()) == 5
    doc = load_datalist(s.datalist)
    assert {sk["case_id"] for sk in doc["skipped"]} == set(reasons)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.pop("channel_names"), "channel_names must map channel indices to names"),
    (lambda d: d.update(file_ending=".png"), "file_ending '.png': medpipe imports NIfTI"),
    (lambda d: d.update(labels={"background": 0, "tumour": -1}), "labels['tumour'] must be a non-negative integer"),
    (lambda d: d.update(channel_names={"0": "FLAIR", "2": "T1c"}), "must number the channels 0..1"),
])
def test_a_broken_dataset_json_is_one_line_naming_the_key(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    src = make_nnunet(tmp_path, n=2)
    doc = json.loads((src / "dataset.json").read_text())
    mutate(doc)
    (src / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(SourceError) as exc:
        read_source("nnunet", src)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_region_based_nnunet_labels_are_imported_as_values(tmp_path: Path) -> None:
    src = make_nnunet(tmp_path, n=4)
    doc = json.loads((src / "dataset.json").read_text())
    doc["labels"] = {"background": 0, "whole": [1, 2], "core": [2]}
    (src / "dataset.json").write_text(json.dumps(doc))
    source = read_source("nnunet", src)
    assert source.label_names == {0: "background", 1: "label 1", 2: "label 2"} and len(source.notes) == 2


# -- Decathlon -------------------------------------------------------------------------------------------------


def test_msd_4d_images_are_split_into_channels(tmp_path: Path) -> None:
    src = make_msd(tmp_path, n=6)
    out = tmp_path / "out"
    s = import_nifti_dataset("msd", src, out, val=0.2, test=0.2)
    assert s.channels == CHANNELS and s.label_names == {1: "edema", 2: "core"} and sum(s.counts.values()) == 6
    doc = load_datalist(s.datalist)
    for it in _all(doc):
        four_d = np.asarray(nib.load(src / "imagesTr" / f"{it['case_id']}.nii.gz").dataobj)
        assert len(it["image"]) == 2 and all(Path(p).is_relative_to(out / "images") for p in it["image"])
        for c, path in enumerate(it["image"]):
            img = nib.load(path)
            assert img.shape == SHAPE and np.allclose(img.affine, affine())
            assert np.array_equal(np.asarray(img.dataobj), four_d[..., c])
    raw = json.loads(s.datalist.read_text())  # paths inside the output folder are stored relative (movable)
    assert not Path(raw["train"][0]["image"][0]).is_absolute()


# -- CSV ------------------------------------------------------------------------------------------------------


def test_csv_cases_resample_other_grids_and_say_so_and_keep_patients_together(tmp_path: Path) -> None:
    path = make_csv(tmp_path, n=8)
    out = tmp_path / "out"
    s = import_nifti_dataset("csv", path, out, label_names={1: "edema", 2: "core"}, val=0.25, test=0.25)
    assert s.channels == CHANNELS and len(s.resampled) == 8
    assert s.resampled[0] == "c00: T1c resampled onto the FLAIR grid (trilinear)"
    doc = load_datalist(s.datalist)
    assert doc["resampled"] == s.resampled
    for it in _all(doc):
        t1c = nib.load(it["image"][1])
        assert t1c.shape == SHAPE and np.allclose(t1c.affine, affine())  # on the FLAIR grid now
        assert Path(it["image"][0]) == (tmp_path / "csv_data" / f"{it['case_id']}_flair.nii.gz")
    for pid in {it["patient_id"] for it in _all(doc)}:
        assert len({sp for sp in ("train", "val", "test") for it in doc[sp] if it["patient_id"] == pid}) == 1
    # the resampled T1c keeps the coarse image's values where its voxels are (the lesion core stays bright)
    it = next(it for it in _all(doc) if it["has_foreground"])
    core = np.asarray(nib.load(it["label"]).dataobj) == 2
    t1c = np.asarray(nib.load(it["image"][1]).dataobj)
    assert t1c[core].mean() > t1c[~core & (t1c > 50)].mean() + 40


def test_csv_without_label_names_names_the_values_found(tmp_path: Path) -> None:
    s = import_nifti_dataset("csv", make_csv(tmp_path, n=6, coarse_t1c=False), tmp_path / "out", val=0.25, test=0.25)
    assert s.label_names == {1: "label 1", 2: "label 2"} and not s.resampled


@pytest.mark.parametrize(("text", "message"), [
    ("FLAIR,label\na.nii.gz,b.nii.gz\n", "needs a case_id column"),
    ("case_id,label\nx,b.nii.gz\n", "no channel column"),
    ("case_id,FLAIR\nx,a.nii.gz\nx,b.nii.gz\n", "line 3: case 'x' is listed twice"),
    ("case_id,FLAIR,T1c\nx,a.nii.gz,\n", "line 2 (case x): no path in column(s) T1c"),
])
def test_csv_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.csv"
    path.write_text(text)
    with pytest.raises(SourceError) as exc:
        read_source("csv", path)
    assert message in str(exc.value)


def test_import_cli_commands(tmp_path: Path) -> None:
    src = make_nnunet(tmp_path, n=6)
    result = CliRunner().invoke(app, ["import", "nnunet", str(src), "--out", str(tmp_path / "o"), "--test", "0.2",
                                      "--label-names", "1=oedema,2=core"])
    assert result.exit_code == 0, result.output
    assert "6 cases" in result.output and "labels 1=oedema, 2=core" in result.output
    assert load_datalist(tmp_path / "o" / "datalist.json")["label_names"] == {"1": "oedema", "2": "core"}
    bad = CliRunner().invoke(app, ["import", "csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o2")])
    assert bad.exit_code != 0
    names = CliRunner().invoke(app, ["import", "nnunet", str(src), "--out", str(tmp_path / "o3"), "--label-names",
                                     "edema"])
    assert names.exit_code == 2 and "--label-names: 'edema' is not VALUE=NAME" in names.output


# -- the datalist format --------------------------------------------------------------------------------------


def test_the_committed_json_schema_is_the_models_schema() -> None:
    assert json.loads(SCHEMA.read_text()) == datalist_schema(), (
        "regenerate medpipe/data/datalist.schema.json from medpipe.data.datalist.datalist_schema()")


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(doc))
    return path


def test_datalist_problems_name_the_item(tmp_path: Path) -> None:
    a = tmp_path / "a.nii.gz"
    a.write_bytes(b"x")
    doc = {
        "channels": ["FLAIR", "T1c"],
        "train": [{"image": [str(a), str(a)], "label": "a.nii.gz", "patient_id": "P1"},
                  {"image": [str(a)], "label": None, "patient_id": "P2"},
                  {"image": [str(a), "missing.nii.gz"], "patient_id": "P3"}],
        "val": [{"image": [str(a), str(a)], "patient_id": "P1"}],
        "test": [],
    }
    with pytest.raises(StageError) as exc:
        load_datalist(_write(tmp_path, doc))
    lines = str(exc.value).splitlines()
    p = tmp_path / "datalist.json"
    assert lines == [
        f"datalist {p}: train[1] (patient P2): image: 1 file(s) for the 2 channels ['FLAIR', 'T1c']",
        f"datalist {p}: train[2] (patient P3): image[1]: {tmp_path / 'missing.nii.gz'} does not exist",
        f"datalist {p}: val[0] (patient P1): patient P1 is also in the train split; a patient's cases must stay in "
        "one split (or results leak between splits)",
    ]


@pytest.mark.parametrize(("item", "message"), [
    ({"label": "x"}, "train[0] (patient P1).image: Field required"),
    ({"image": [], "label": "x"}, "train[0] (patient P1).image"),
    ({"image": "a.nii.gz", "class": -1}, "train[0] (patient P1).class: Input should be greater than or equal to 0"),
])
def test_schema_problems_name_the_item(tmp_path: Path, item: dict, message: str) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    path = _write(tmp_path, {"train": [{**item, "patient_id": "P1"}], "val": [], "test": []})
    with pytest.raises(StageError) as exc:
        load_datalist(path)
    assert message in str(exc.value)


def test_ingested_nifti_files_get_a_reason_and_the_route_that_works(tmp_path: Path) -> None:
    """Issue: 'no usable study in ... (0 skipped)' with no reason when NIfTI files went through ingest."""
    import shutil

    from medpipe.data.channels import DEFAULT_CHANNELS
    from medpipe.data.datalist_builder import build_items
    from medpipe.ingest import ingest

    src = make_nnunet(tmp_path, n=1)
    folder = tmp_path / "nifti_files"
    folder.mkdir()
    for f in (src / "imagesTr").glob("*.nii.gz"):
        shutil.copy(f, folder / f.name)
    ingest(folder, tmp_path / "ingested")
    result = build_items(tmp_path / "ingested", {"FLAIR": DEFAULT_CHANNELS["FLAIR"]}, "FLAIR", None,
                         work_dir=tmp_path / "w")
    text = result.why_empty(tmp_path / "ingested")
    assert not result.items and "2 skipped" in text
    assert "came from NIfTI files, which carry no patient, study or series description" in text
    assert "medpipe import nnunet|msd|csv" in text and "\n" not in text
