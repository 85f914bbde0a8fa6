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


@dataclass(frozen=True)
class ImportSummary:
    out: Path
    datalist: Path
    name: str
    sha256: str  # of the .npz file
    counts: dict[str, int]  # split -> images
    class_counts: dict[str, list[int]]  # split -> images per class
    written: bool  # False: the folder already held this import




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

    complete = previous.get("sha256") == digest and previous.get("name") == name and \
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
            "source": {"format": "medmnist", "name": name, "file": str(npz), "sha256": digest, "image_kind": kind},
            **items, "skipped": [],
            "split": {"official": True, "counts": {s: len(items[s]) for s in SPLITS}},
        }
        write_text_atomic(out / "datalist.json", json.dumps(doc, indent=1) + "\n")
        write_text_atomic(stamp, json.dumps({"name": name, "file": str(npz), "sha256": digest, "kind": kind,
                                             "counts": {s: len(items[s]) for s in SPLITS}}, indent=1) + "\n")
    return ImportSummary(
        out=out, datalist=out / "datalist.json", name=name, sha256=digest, counts={s: len(items[s]) for s in SPLITS},
        class_counts={s: np.bincount(labels[s], minlength=n_classes).tolist() for s in SPLITS},
        written=not complete,
    )
