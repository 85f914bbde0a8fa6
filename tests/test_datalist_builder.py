"""The datalist builder (``medpipe.data.channels``, ``medpipe.data.datalist_builder``) and the read-only
catalog API (``medpipe.catalog.open_catalog``), called directly: no run context, no stage."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medpipe.catalog import ObjectRow, VolumeRow, open_catalog
from medpipe.data.channels import DEFAULT_CHANNELS, ChannelRule, StudySkipped
from medpipe.data.datalist import load_datalist
from medpipe.data.datalist_builder import (
    CsvLabels,
    SegLabels,
    build_items,
    build_study,
    datalist_document,
    write_datalist,
)
from medpipe.errors import CatalogError, MedpipeError
from medpipe.ingest import ingest
from medpipe.sample import generate_brain_tumor

CASES = 4
CHANNELS = ["T1", "T1c", "T2", "FLAIR"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 tiny synthetic studies, generated and ingested by the library."""
    root = tmp_path_factory.mktemp("builder")
    generate_brain_tumor(root / "sample", CASES, seed=2, tumor_fraction=0.75, matrix=32, pixel_spacing=6.0, slices=8,
                         slice_thickness=16.0)
    ingest(root / "sample", root / "ingest", workers=1)
    cases = json.loads((root / "sample" / "sample.json").read_text())["cases"]
    return {"root": root, "ingest": root / "ingest", "cases": {c["patient_id"]: c for c in cases}}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- build_items / build_study ------------------------------------------------------------------------


def test_build_items_of_an_ingest_folder(sample: dict[str, Any], tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    def progress(description: str, total: int) -> Any:
        import contextlib

        @contextlib.contextmanager
        def bar() -> Any:
            seen.append((description, total))
            yield lambda n=1: seen.append(("advance", n))
        return bar()

    res = build_items(sample["ingest"], DEFAULT_CHANNELS, "FLAIR", SegLabels(), work_dir=tmp_path, progress=progress)
    assert res.skipped == [] and len(res.items) == CASES
    assert seen[0] == ("Building the datalist", CASES) and seen.count(("advance", 1)) == CASES
    assert [it["patient_id"] for it in res.items] == sorted(sample["cases"])
    assert set(res.inputs) == {str(sample["ingest"] / "manifest.csv")}
    assert res.label_names == {1: "necrotic core", 2: "edema", 3: "enhancing tumor"}
    for it in res.items:
        truth = sample["cases"][it["patient_id"]]
        assert it["series_uids"] == {c: truth["series_uids"][c] for c in CHANNELS}
        assert it["reference_volume"] == it["image"][3] and Path(it["image"][0]).is_relative_to(sample["ingest"])
        assert Path(it["label"]).is_relative_to(tmp_path / "labels")  # the work folder, not a run folder
        counts = np.bincount(np.asarray(nib.load(it["label"]).dataobj).ravel(), minlength=4)
        vc = truth["voxel_counts"]
        assert counts[1:].tolist() == [vc["necrotic"], vc["edema"], vc["enhancing"]]
        assert res.foreground[(it["patient_id"], it["study_uid"])] == bool(vc["whole_tumor"])
    assert res.strata() == {pid: int(bool(c["voxel_counts"]["whole_tumor"])) for pid, c in sample["cases"].items()}

    # split into a datalist document: by patient, and it reads back as a datalist
    doc = datalist_document(res, channels=CHANNELS, reference="FLAIR", ingest_dir=sample["ingest"], seed=0,
                            val=0.25, test=0.25)
    assert sorted(it["patient_id"] for s in ("train", "val", "test") for it in doc[s]) == sorted(sample["cases"])
    assert (len(doc["val"]), len(doc["test"])) == (1, 1)
    assert doc["label_names"] == {"1": "necrotic core", "2": "edema", "3": "enhancing tumor"}
    write_datalist(tmp_path / "datalist.json", doc)
    assert load_datalist(tmp_path / "datalist.json") == json.loads(json.dumps(doc))


def test_build_study_gives_the_same_item(sample: dict[str, Any], tmp_path: Path) -> None:
    res = build_items(sample["ingest"], DEFAULT_CHANNELS, "FLAIR", SegLabels(), work_dir=tmp_path / "all")
    item = res.items[1]
    one = build_study(sample["ingest"], item["study_uid"], DEFAULT_CHANNELS, "FLAIR", SegLabels(),
                      work_dir=tmp_path / "all")
    assert one.item == item  # same work folder: the label map is reused, not rebuilt
    assert one.foreground == res.foreground[(item["patient_id"], item["study_uid"])]
    # without labels (what scoring does), into another folder
    bare = build_study(sample["ingest"], item["study_uid"], DEFAULT_CHANNELS, "FLAIR", work_dir=tmp_path / "one",
                       patient_id=item["patient_id"])
    assert bare.item == {**item, "label": None} and bare.foreground is None
    assert not (tmp_path / "one").exists()  # nothing to resample, no label map: nothing written
    with pytest.raises(StudySkipped, match=r"^study 1\.2\.3 has no usable 3D volume in "):
        build_study(sample["ingest"], "1.2.3", DEFAULT_CHANNELS, "FLAIR", work_dir=tmp_path)


def test_study_missing_a_channel_is_skipped_with_its_reason(sample: dict[str, Any], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    ingest_dir = tmp_path / "ingest"
    shutil.copytree(sample["ingest"], ingest_dir)
    with sqlite3.connect(ingest_dir / "catalog.sqlite") as db:  # as if MPS0002 had no T2 series
        db.execute("DELETE FROM volumes WHERE patient_id = 'MPS0002' AND series_description = 'T2'")
    db.close()
    with caplog.at_level(logging.WARNING):
        res = build_items(ingest_dir, DEFAULT_CHANNELS, "FLAIR", None, work_dir=tmp_path / "work",
                          log=logging.getLogger("test.builder"))
    (skip,) = res.skipped
    study = sample["cases"]["MPS0002"]["study_uid"]
    reason = "no series matches channel T2 (modality='MR', series_description='(?i)^t2$')"
    assert skip == {"patient_id": "MPS0002", "study_uid": study, "reason": reason}
    assert [it["patient_id"] for it in res.items] == ["MPS0001", "MPS0003", "MPS0004"]
    assert f"study {study} of patient MPS0002 skipped: {reason}" in caplog.text
    with pytest.raises(StudySkipped) as exc:
        build_study(ingest_dir, study, DEFAULT_CHANNELS, "FLAIR", work_dir=tmp_path / "work")
    assert str(exc.value) == reason and isinstance(exc.value, MedpipeError)

    empty = build_items(ingest_dir, {"PD": ChannelRule(series_description="^PD$")}, "PD", work_dir=tmp_path / "work")
    assert empty.items == [] and len(empty.skipped) == CASES
    assert empty.why_empty(ingest_dir) == (f"no usable study in {ingest_dir} ({CASES} skipped; e.g. no series "
                                           "matches channel PD (series_description='^PD$'))")


def test_builder_arguments_and_csv_labels(sample: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(MedpipeError, match="reference 'T2' is not one of the channels"):
        build_items(sample["ingest"], {"T1": ChannelRule()}, "T2", work_dir=tmp_path)
    with pytest.raises(MedpipeError, match="labels.path: no labels CSV given"):
        build_items(sample["ingest"], DEFAULT_CHANNELS, "FLAIR", CsvLabels(source="csv"), work_dir=tmp_path)
    csv_path = sample["root"] / "sample" / "labels.csv"
    res = build_items(sample["ingest"], DEFAULT_CHANNELS, "FLAIR", CsvLabels(source="csv", path=str(csv_path)),
                      work_dir=tmp_path)
    assert list(res.inputs) == [str(csv_path.resolve()), str(sample["ingest"] / "manifest.csv")]
    assert {it["patient_id"]: it["class"] for it in res.items} == {
        pid: int(c["has_tumor"]) for pid, c in sample["cases"].items()}


# -- the read-only catalog ------------------------------------------------------------------------------


def test_catalog_queries_return_typed_rows(sample: dict[str, Any]) -> None:
    case = sample["cases"]["MPS0003"]
    with open_catalog(sample["ingest"]) as cat:
        vols = cat.volumes(study_uid=case["study_uid"])
        assert all(isinstance(v, VolumeRow) for v in vols)
        assert {v.series_description: v.series_uid for v in vols} == {
            c: case["series_uids"][c] for c in CHANNELS}
        assert [v.series_number for v in vols] == sorted(v.series_number or 0 for v in vols)
        assert all(v.dims == (32, 32, 8) for v in vols)
        flair = case["series_uids"]["FLAIR"]
        (seg,) = cat.objects_referencing(flair, modality="SEG")
        assert isinstance(seg, ObjectRow) and seg.referenced_series == (flair,)
        assert seg.series_uid == case["series_uids"]["SEG"] and Path(seg.path).is_file()
        assert cat.objects_referencing(flair, modality="SR") == []
        assert cat.objects_referencing(case["series_uids"]["T1"]) == []
        assert len(cat.objects()) == CASES and cat.objects(study_uid=case["study_uid"]) == [seg]
        series = cat.series(flair)
        assert series is not None and series.series_description == "FLAIR" and series.modality == "MR"
        assert {s.series_uid for s in cat.study_series(case["study_uid"])} == {
            case["series_uids"][c] for c in CHANNELS}
        sources = cat.source_instances(flair)
        (flair_vol,) = [v for v in vols if v.series_uid == flair]
        sidecar = json.loads((sample["ingest"] / flair_vol.sidecar).read_text())
        assert set(sources) == set(sidecar["SourceSOPInstanceUIDs"]) and len(sources) == 8
        assert sorted(sources.values()) == sorted(flair_vol.source_keys)
        assert all(Path(p).is_file() for p in sources.values())
        assert cat.series("1.2.3") is None and cat.source_instances("1.2.3") == {}


def test_catalog_is_opened_read_only(sample: dict[str, Any], tmp_path: Path) -> None:
    ingest_dir = tmp_path / "ingest"
    shutil.copytree(sample["ingest"], ingest_dir)
    path = ingest_dir / "catalog.sqlite"
    before = _sha(path)
    with open_catalog(path) as cat:  # the file or its folder
        n = len(cat.volumes())
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            cat.db.execute("DELETE FROM volumes")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            cat.db.execute("CREATE TABLE extra(a)")
    assert _sha(path) == before
    with open_catalog(ingest_dir) as cat:
        assert len(cat.volumes()) == n > 0

    # a folder without a catalog: one line, and no file appears
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CatalogError) as exc:
        open_catalog(empty)
    assert str(exc.value) == f"{empty} has no catalog.sqlite: run the ingest stage (or 'medpipe ingest') first"
    assert list(empty.iterdir()) == []
    with pytest.raises(CatalogError, match="has no catalog.sqlite"):
        build_items(empty, DEFAULT_CHANNELS, "FLAIR", work_dir=tmp_path / "work")
    assert list(empty.iterdir()) == [] and not (tmp_path / "work").exists()
    with pytest.raises(CatalogError, match="has no catalog.sqlite"):
        open_catalog(tmp_path / "missing" / "catalog.sqlite")
    assert not (tmp_path / "missing").exists()

    # not a catalog, or another layout: one line each
    (empty / "catalog.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(CatalogError, match=r"cannot read the ingest catalog \(file is not a database\)") as exc:
        open_catalog(empty)
    assert "\n" not in str(exc.value)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.close()
    with pytest.raises(CatalogError, match="catalog schema 1, this medpipe reads"):
        open_catalog(other)
