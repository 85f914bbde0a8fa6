"""MedMNIST ``.npz`` files -> image files + ``labels.csv`` + a datalist with the official split.

MedMNIST (Yang et al., Scientific Data 2023) ships each dataset as one ``.npz`` holding
``{train,val,test}_images`` and ``{train,val,test}_labels``. :func:`import_medmnist` writes

* ``images/<split>/<split>_<index>.png`` (2D grey or RGB, the original 8-bit values, lossless) or
  ``.nii.gz`` (3D, unit voxels, identity affine: MedMNIST keeps no patient geometry);
* ``labels.csv``: ``file, split, index, class, class_name``;
* ``datalist.json``: the same datalist shape the ``dataset`` stage writes (``train`` / ``val`` /
  ``test`` lists of items ``{image, class, patient_id, study_uid, ...}``, ``class_names``), with the
  **official** split kept as it is (it is what published tables are measured on);
* ``import.json``: the source file, its sha256 and the counts.

**Official or not.** The split is called ``official`` (``split.official`` in the datalist) only when the
file's MD5 is the one MedMNIST publishes for that dataset and image size (:data:`OFFICIAL_MD5`, from
``medmnist.INFO``): a re-split, re-saved or otherwise modified file keeps its split but is not
certified as the published one (:func:`official_check`, recorded as ``source.official_check``).

Re-importing the same file into the same folder rewrites nothing (the sha256 in ``import.json``
matches and every file is there). Every file is written atomically. Multi-label datasets
(ChestMNIST) and ordinal regression are not single-label classification and are refused.

Each MedMNIST image counts as its own "patient": the published splits are already separated by
source, and the npz keeps no patient identifiers.

Nothing is allocated on a header's word: every array's ``.npy`` header is read first and checked
against the bytes its member really holds and against the expansion limit of compressed members
(:func:`medpipe.io.expansion_problem`), and labels beyond :data:`MAX_CLASSES` classes are refused, so
a crafted file (an array "of 10^13 values", a class label of 10^9) is a one-line error, not an
exhausted memory.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import SourceError
from medpipe.io import atomic_path, expansion_problem, sha256_file, write_csv_atomic, write_text_atomic

SPLITS = ("train", "val", "test")

#: class names of MedMNIST v2 datasets (from ``medmnist.INFO``), by file stem
CLASS_NAMES: dict[str, dict[int, str]] = {
    "breastmnist": {0: "malignant", 1: "normal, benign"},
    "pneumoniamnist": {0: "normal", 1: "pneumonia"},
    "nodulemnist3d": {0: "benign", 1: "malignant"},
    "adrenalmnist3d": {0: "normal", 1: "hyperplasia"},
    "vesselmnist3d": {0: "vessel", 1: "aneurysm"},
    "synapsemnist3d": {0: "inhibitory synapse", 1: "excitatory synapse"},
    "organamnist": {0: "bladder", 1: "femur-left", 2: "femur-right", 3: "heart", 4: "kidney-left",
                    5: "kidney-right", 6: "liver", 7: "lung-left", 8: "lung-right", 9: "pancreas", 10: "spleen"},
    "bloodmnist": {0: "basophil", 1: "eosinophil", 2: "erythroblast", 3: "immature granulocytes", 4: "lymphocyte",
                   5: "monocyte", 6: "neutrophil", 7: "platelet"},
}
MULTI_LABEL = {"chestmnist"}
#: class labels must lie in 0 .. MAX_CLASSES - 1 (MedMNIST has at most 11 classes)
MAX_CLASSES = 1000

#: MD5 of the published MedMNIST v2/v3 files (``medmnist.INFO``, medmnist 3.0.2): ``{name: {size: md5}}``
OFFICIAL_MD5: dict[str, dict[int, str]] = {
    "pathmnist": {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
                  128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
    "dermamnist": {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
                   128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    "octmnist": {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
                 128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
    "pneumoniamnist": {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
                       128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    "retinamnist": {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
                    128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
    "breastmnist": {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
                    128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
    "bloodmnist": {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
                   128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
    "tissuemnist": {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
                    128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
    "organamnist": {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
                    128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
    "organcmnist": {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
                    128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"},
    "organsmnist": {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
                    128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"},
    "organmnist3d": {28: "a0c5a1ff56af4f155c46d46fbb45a2fe", 64: "58a2205adf14a9d0a189cb06dc78bf10"},
    "nodulemnist3d": {28: "8755a7e9e05a4d9ce80a24c3e7a256f3", 64: "c47c5b7d457bf6332200d2ea6d64ecd8"},
    "adrenalmnist3d": {28: "bbd3c5a5576322bc4cdfea780653b1ce", 64: "17721accfe9fb005146a47d33bc54b2f"},
    "fracturemnist3d": {28: "6aa7b0143a6b42da40027a9dda61302f", 64: "f01d7e6316aedf4210da0da5b7437b42"},
    "vesselmnist3d": {28: "b41fd4f7e7e2feedddb201585ecafa1b", 64: "6bb274a8846e1097066dcd64e2c4520f"},
    "synapsemnist3d": {28: "1235b78a3cd6280881dd7850a78eadb6", 64: "43bd14ebf3af9d3dd072446fedc14d5e"},
}


def official_check(path: Path, name: str, image_size: int) -> dict[str, Any]:
    """Whether ``path`` is the published MedMNIST file of ``name`` at ``image_size`` px, by MD5.

    ``{"md5", "official_md5", "matches"}``: ``official_md5`` is None for a dataset medpipe has no MD5 of, and
    ``matches`` is then False too (an unknown file is never certified).
    """
    import hashlib

    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    expected = OFFICIAL_MD5.get(name, {}).get(int(image_size))
    return {"md5": h.hexdigest(), "official_md5": expected, "matches": expected is not None and h.hexdigest() == expected}


@dataclass(frozen=True)
class ImportSummary:
    out: Path
    datalist: Path
    name: str
    sha256: str  # of the .npz file
    counts: dict[str, int]  # split -> images
    class_counts: dict[str, list[int]]  # split -> images per class
    written: bool  # False: the folder already held this import
    official: bool = False  # the file's MD5 is the published MedMNIST file's (the split is the official one)




def dataset_name(path: Path) -> str:
    """``breastmnist`` from ``breastmnist.npz`` / ``breastmnist_224.npz``."""
    return re.sub(r"_(28|64|128|224)$", "", path.stem.lower())


def _npy_header(fh: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header (versions 1.0 and 2.0), leaving ``fh`` at the data."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    return shape, dtype


def _declared(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``name -> (shape, dtype)`` of every array in the npz, from the ``.npy`` headers alone.

    Raises:
        SourceError: not an npz, an array whose header declares more (or fewer) bytes than its member
            holds, an object array, or a member that would expand beyond the limit.
    """
    import zipfile

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise SourceError(f"{path}: not a readable .npz file ({exc})") from exc
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            problem = expansion_problem(info.file_size, info.compress_size, f"array {name}")
            if problem:
                raise SourceError(f"{path}: {problem}")
            try:
                with zf.open(info) as fh:
                    shape, dtype = _npy_header(fh)
                    header_bytes = fh.tell()
            except Exception as exc:  # noqa: BLE001 - numpy / zipfile raise many types on a bad header
                raise SourceError(f"{path}: array {name} has an unreadable .npy header ({exc})") from exc
            if dtype.hasobject:
                raise SourceError(f"{path}: array {name} holds Python objects, which are never loaded")
            count = 1
            for n in shape:
                count *= int(n)
            declared = count * dtype.itemsize
            holds = info.file_size - header_bytes
            if declared != holds:
                raise SourceError(f"{path}: array {name} declares shape {tuple(shape)} {dtype} ({declared} bytes) "
                                  f"but holds {holds} bytes: corrupt or crafted file")
            out[name] = (tuple(int(n) for n in shape), dtype)
    return out


def _load(path: Path) -> dict[str, np.ndarray]:
    declared = _declared(path)
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in declared]
    if missing:
        raise SourceError(f"{path}: not a MedMNIST file: missing {', '.join(missing)}",
                          hint="MedMNIST .npz files hold {train,val,test}_{images,labels}")
    for s in SPLITS:  # counts agree before anything is loaded
        n_images = declared[f"{s}_images"][0][:1]
        n_labels = declared[f"{s}_labels"][0][:1]
        if n_images != n_labels:
            raise SourceError(f"{path}: {s}_labels has {n_labels[0] if n_labels else 0} entries for "
                              f"{n_images[0] if n_images else 0} images")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k in declared}
    except (OSError, ValueError, MemoryError) as exc:
        raise SourceError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    return arrays


def _labels(path: Path, split: str, labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise SourceError(f"{path}: {split}_labels has shape {y.shape}: multi-label data is not single-label "
                          "classification and cannot be imported")
    if len(y) != n:
        raise SourceError(f"{path}: {split}_labels has {len(y)} entries for {n} images")
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise SourceError(f"{path}: {split}_labels must be non-negative integers (got {y.dtype})")
    if y.size and int(y.max()) >= MAX_CLASSES:
        raise SourceError(f"{path}: {split}_labels holds class {int(y.max())}; medpipe imports labels "
                          f"0 to {MAX_CLASSES - 1} (MedMNIST has at most 11 classes)")
    return y.astype(np.int64)


def _kind(path: Path, images: np.ndarray) -> str:
    """``gray`` (N,H,W), ``rgb`` (N,H,W,3) or ``volume`` (N,D,H,W)."""
    if images.dtype != np.uint8:
        raise SourceError(f"{path}: images are {images.dtype}, MedMNIST images are uint8")
    if images.ndim == 3:
        return "gray"
    if images.ndim == 4 and images.shape[-1] == 3:
        return "rgb"
    if images.ndim == 4:
        return "volume"
    raise SourceError(f"{path}: images of shape {images.shape[1:]} are neither 2D (grey / RGB) nor 3D")


def _encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB" if image.ndim == 3 else "L").save(buf, format="PNG")
    return buf.getvalue()


def _write_volume(image: np.ndarray, target: Path) -> None:
    import nibabel as nib

    # MedMNIST 3D arrays are (D, H, W); NIfTI's first axis varies fastest, so store (W, H, D)
    img = nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 1, 0)), np.eye(4))
    img.header.set_xyzt_units("mm")
    with atomic_path(target) as tmp:
        nib.save(img, str(tmp))


def import_medmnist(npz: Path | str, out: Path | str, *, name: str | None = None) -> ImportSummary:
    """Write the images, ``labels.csv`` and ``datalist.json`` of a MedMNIST file into ``out``.

    Raises:
        SourceError: not a MedMNIST file, multi-label data, or images that are not uint8 2D / 3D.
    """
    npz, out = Path(npz).expanduser().resolve(), Path(out).expanduser().resolve()
    if not npz.is_file():
        raise SourceError(f"{npz}: no such file", hint="give the path of a MedMNIST .npz file")
    name = name or dataset_name(npz)
    if name in MULTI_LABEL:
        raise SourceError(f"{npz}: {name} is multi-label; only single-label MedMNIST datasets can be imported")
    digest = sha256_file(npz)
    stamp = out / "import.json"
    previous: dict[str, Any] = {}
    if stamp.is_file():
        try:
            previous = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}

    arrays = _load(npz)
    labels = {s: _labels(npz, s, arrays[f"{s}_labels"], len(arrays[f"{s}_images"])) for s in SPLITS}
    kind = _kind(npz, arrays["train_images"])
    n_classes = int(max(int(y.max()) for y in labels.values() if y.size)) + 1
    known = CLASS_NAMES.get(name, {})
    class_names = {c: known.get(c, f"class {c}") for c in range(n_classes)}
    ext = ".nii.gz" if kind == "volume" else ".png"

    items: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    rows: list[dict[str, Any]] = []
    for s in SPLITS:
        for i, c in enumerate(labels[s]):
            rel = f"images/{s}/{s}_{i:05d}{ext}"
            case = f"{name}-{s}-{i:05d}"
            items[s].append({"image": str(out / rel), "class": int(c), "patient_id": case, "study_uid": case,
                             "source_split": s, "source_index": i})
            rows.append({"file": rel, "split": s, "index": i, "class": int(c), "class_name": class_names[int(c)]})

    check = official_check(npz, name, int(arrays["train_images"].shape[1]))
    complete = previous.get("sha256") == digest and previous.get("name") == name and \
        previous.get("official_check") == check and \
        all(Path(it["image"]).is_file() for s in SPLITS for it in items[s]) and (out / "datalist.json").is_file()
    if not complete:
        for s in SPLITS:
            images = arrays[f"{s}_images"]
            for i, it in enumerate(items[s]):
                target = Path(it["image"])
                if kind == "volume":
                    _write_volume(images[i], target)
                else:
                    with atomic_path(target) as tmp:
                        tmp.write_bytes(_encode_png(images[i]))
        write_csv_atomic(out / "labels.csv", rows, ["file", "split", "index", "class", "class_name"])
        doc = {
            "channels": ["image"], "class_names": {str(k): v for k, v in class_names.items()},
            "source": {"format": "medmnist", "name": name, "file": str(npz), "sha256": digest, "image_kind": kind,
                       "official_check": check},
            **items, "skipped": [],
            "split": {"official": check["matches"], "counts": {s: len(items[s]) for s in SPLITS}},
        }
        write_text_atomic(out / "datalist.json", json.dumps(doc, indent=1) + "\n")
        write_text_atomic(stamp, json.dumps({"name": name, "file": str(npz), "sha256": digest, "kind": kind,
                                             "official": check["matches"], "official_check": check,
                                             "counts": {s: len(items[s]) for s in SPLITS}}, indent=1) + "\n")
    return ImportSummary(
        out=out, datalist=out / "datalist.json", name=name, sha256=digest, counts={s: len(items[s]) for s in SPLITS},
        class_counts={s: np.bincount(labels[s], minlength=n_classes).tolist() for s in SPLITS},
        written=not complete, official=check["matches"],
    )
