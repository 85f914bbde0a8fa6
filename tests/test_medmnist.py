"""``medpipe import medmnist``: the real BreastMNIST file, lossless images, the official split, re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.data.medmnist import import_medmnist
from medpipe.errors import SourceError


@pytest.fixture(scope="module")
def npz(shared_data: Path) -> Path:
    return shared_data / "breastmnist" / "breastmnist.npz"


def test_breastmnist_import_keeps_the_official_split_and_every_pixel(npz: Path, tmp_path: Path) -> None:
    from monai.transforms import LoadImage

    s = import_medmnist(npz, tmp_path / "bm")
    assert s.name == "breastmnist" and s.written
    assert s.counts == {"train": 546, "val": 78, "test": 156}
    assert s.class_counts == {"train": [147, 399], "val": [21, 57], "test": [42, 114]}
    doc = json.loads(s.datalist.read_text())
    assert doc["class_names"] == {"0": "malignant", "1": "normal, benign"}
    # the shared copy was re-saved (labels stored as (N,), not the published (N, 1)): its MD5 is not the published
    # file's, so the split is kept but not certified official
    assert doc["source"]["sha256"] and doc["split"]["official"] is False and not s.official
    check = doc["source"]["official_check"]
    assert check["official_md5"] == "750601b1f35ba3300ea97c75c52ff8f6" and check["matches"] is False
    with np.load(npz) as ref:
        for split in ("train", "val", "test"):
            items = doc[split]
            assert [it["class"] for it in items] == ref[f"{split}_labels"].ravel().tolist()
            assert len({it["patient_id"] for it in items}) == len(items)
            for i in (0, len(items) // 2, len(items) - 1):
                # lossless PNG; MONAI's PIL reader returns (W, H), i.e. the array transposed
                loaded = np.asarray(LoadImage(image_only=True)(items[i]["image"]))
                assert loaded.T.tolist() == ref[f"{split}_images"][i].tolist()
    lines = (tmp_path / "bm" / "labels.csv").read_text().splitlines()
    assert lines[0] == "file,split,index,class,class_name" and len(lines) == 1 + 780


def test_reimport_rewrites_nothing(npz: Path, tmp_path: Path) -> None:
    first = import_medmnist(npz, tmp_path / "bm")
    files = sorted((tmp_path / "bm").rglob("*"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = import_medmnist(npz, tmp_path / "bm")
    assert first.written and not again.written
    assert {f: f.stat().st_mtime_ns for f in sorted((tmp_path / "bm").rglob("*"))} == stamps
    Path(json.loads(first.datalist.read_text())["test"][0]["image"]).unlink()  # a lost file: imported again
    assert import_medmnist(npz, tmp_path / "bm").written


def test_only_the_published_file_is_called_official(npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue: a modified (re-split) npz was marked official. Only a file with the published MD5 is."""
    import hashlib
    import shutil

    import medpipe.data.medmnist as mm

    published = tmp_path / "published" / "breastmnist.npz"
    published.parent.mkdir()
    shutil.copyfile(npz, published)
    md5 = hashlib.md5(published.read_bytes()).hexdigest()
    monkeypatch.setitem(mm.OFFICIAL_MD5, "breastmnist", {28: md5})  # pretend this copy is the published file
    s = import_medmnist(published, tmp_path / "a")
    assert s.official and json.loads(s.datalist.read_text())["split"]["official"] is True
    result = CliRunner().invoke(app, ["import", "medmnist", str(published), "--out", str(tmp_path / "a")])
    assert "split: the official one" in result.output

    with np.load(published) as ref:  # the same images re-split: one validation image moved to train
        arrays = {k: ref[k] for k in ref.files}
    arrays["train_images"] = np.concatenate([arrays["train_images"], arrays["val_images"][:1]])
    arrays["train_labels"] = np.concatenate([arrays["train_labels"], arrays["val_labels"][:1]])
    arrays["val_images"], arrays["val_labels"] = arrays["val_images"][1:], arrays["val_labels"][1:]
    resplit = tmp_path / "resplit" / "breastmnist.npz"
    resplit.parent.mkdir()
    np.savez_compressed(resplit, **arrays)
    r = import_medmnist(resplit, tmp_path / "b")
    doc = json.loads(r.datalist.read_text())
    assert not r.official and doc["split"]["official"] is False and doc["source"]["official_check"]["matches"] is False
    result = CliRunner().invoke(app, ["import", "medmnist", str(resplit), "--out", str(tmp_path / "b")])
    assert "NOT certified official" in result.output
    # a previous import of the same file made before the check is rewritten with the check
    stamp = tmp_path / "b" / "import.json"
    old = json.loads(stamp.read_text())
    old.pop("official_check")
    stamp.write_text(json.dumps(old))
    assert import_medmnist(resplit, tmp_path / "b").written


def _fake(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, **{f"{s}_images": images for s in ("train", "val", "test")},
             **{f"{s}_labels": labels for s in ("train", "val", "test")})
    return path


def test_multi_label_and_foreign_files_are_refused(tmp_path: Path) -> None:
    images = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(SourceError, match="multi-label"):
        import_medmnist(_fake(tmp_path / "x.npz", images, np.zeros((4, 14), np.uint8)), tmp_path / "o")
    with pytest.raises(SourceError, match="multi-label"):
        import_medmnist(_fake(tmp_path / "chestmnist.npz", images, np.zeros((4, 1), np.uint8)), tmp_path / "o")
    np.savez(tmp_path / "other.npz", a=images)
    with pytest.raises(SourceError, match="missing train_images"):
        import_medmnist(tmp_path / "other.npz", tmp_path / "o")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="not a readable"):
        import_medmnist(tmp_path / "junk.npz", tmp_path / "o")


def test_3d_medmnist_becomes_nifti(tmp_path: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(0)
    vols = rng.integers(0, 255, (3, 6, 7, 8), dtype=np.uint8)  # (N, D, H, W)
    s = import_medmnist(_fake(tmp_path / "nodulemnist3d.npz", vols, np.array([[0], [1], [1]], np.uint8)), tmp_path / "o")
    doc = json.loads(s.datalist.read_text())
    assert doc["class_names"] == {"0": "benign", "1": "malignant"}
    img = nib.load(doc["train"][1]["image"])
    assert np.asarray(img.dataobj).transpose(2, 1, 0).tolist() == vols[1].tolist()


def test_cli_import(npz: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["import", "medmnist", str(npz), "--out", str(tmp_path / "bm")])
    assert result.exit_code == 0, result.output
    assert "train 546 (147/399 per class)" in result.output and "datalist.json" in result.output
    bad = CliRunner().invoke(app, ["import", "medmnist", str(tmp_path / "missing.npz"), "--out", str(tmp_path)])
    assert bad.exit_code != 0
