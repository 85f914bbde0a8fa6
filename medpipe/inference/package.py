"""Model packages: a trained model as a self-contained folder that scores raw DICOM with no run present.

::

    model/
      model.json       what the model is and needs (below); its sha256 over canonical JSON is the model id
      weights/         the checkpoint(s), one per ensemble member (``torch.load(weights_only=True)``)
      model_card.md    human-readable: data, splits, metrics with CIs, version, intended use
      metrics.json     held-out metrics found in the run (written by ``medpipe export``)

``model.json`` holds: ``kind`` (``segmenter`` / ``classifier`` / ``detector``); ``members`` (weight files and their
sha256); the network configuration; the inputs (channel names, the DICOM channel selection rules of
the ``dataset`` stage that fed training, the reference channel, the eval transforms, patch size);
the outputs (segmenter: classes with coded concepts, SNOMED CT category and type; classifier: class
names, positive class and decision threshold; detector: the finding's codes); inference settings (TTA; detector:
resampling, sliding window, score and NMS thresholds); and the training record
(pipeline, seed, datalist sha256, split sizes, validation metric, medpipe version, git commit).

The **model id** is the sha256 of ``model.json`` in canonical form (sorted keys, no spaces). Because
``model.json`` lists every weight file's sha256, the id changes whenever anything that changes the
outputs changes; the model card and held-out metrics can be rewritten without changing it. Every
output of ``medpipe score`` cites the id, and new DICOM UIDs are derived from it.

Loading (:meth:`ModelPackage.load`) checks every weight file against its sha256 before any tensor
is read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from medpipe.errors import MedpipeError
from medpipe.io import atomic_path, sha256_file, write_text_atomic

PACKAGE_FORMAT = "medpipe-model"
PACKAGE_VERSION = 1
MANIFEST = "model.json"

Kind = Literal["segmenter", "classifier", "detector"]

#: SNOMED CT codes (scheme, value, meaning) of the segment types medpipe knows by name (with the organs of
#: :mod:`medpipe.dicom.anatomy`); others fall back to :data:`FALLBACK_CODE` and should be given in
#: ``segment_codes`` of the training stage, or come with the labels (a DICOM SEG's segments).
MORPHOLOGICALLY_ABNORMAL = {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Abnormal Structure"}
TISSUE = {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"}
KNOWN_SEGMENT_CODES: dict[str, dict[str, dict[str, str]]] = {
    "whole tumour": {"category": MORPHOLOGICALLY_ABNORMAL,
                     "type": {"scheme": "SCT", "value": "108369006", "meaning": "Neoplasm"}},
    "tumour": {"category": MORPHOLOGICALLY_ABNORMAL,
               "type": {"scheme": "SCT", "value": "108369006", "meaning": "Neoplasm"}},
    "enhancing tumor": {"category": MORPHOLOGICALLY_ABNORMAL,
                        "type": {"scheme": "SCT", "value": "108369006", "meaning": "Neoplasm"}},
    "necrotic core": {"category": MORPHOLOGICALLY_ABNORMAL,
                      "type": {"scheme": "SCT", "value": "6574001", "meaning": "Necrosis"}},
    "edema": {"category": MORPHOLOGICALLY_ABNORMAL,
              "type": {"scheme": "SCT", "value": "79654002", "meaning": "Edema"}},
}
FALLBACK_CODE = {"category": TISSUE, "type": TISSUE}


class CodeSpec(BaseModel):
    """A coded concept ``{scheme, value, meaning}`` (e.g. SNOMED CT: ``{scheme: SCT, value: "108369006",
    meaning: Neoplasm}``)."""

    model_config = ConfigDict(extra="forbid")
    scheme: str = Field(min_length=1, max_length=16)
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)


class SegmentCodes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: CodeSpec
    type: CodeSpec


class PackageOptions(BaseModel):
    """What the training stages' ``package:`` parameter sets on the model package they write."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=64, description="model name in outputs; None: <run>/<stage>")
    tta: bool = Field(False, description="flip test-time augmentation when the model scores")
    intended_use: str | None = Field(None, description="for the model card")


class SegmenterPackageOptions(PackageOptions):
    min_component_ml: float | None = Field(None, ge=0.0, le=1e6, description="remove predicted foreground "
                                                                            "components below this volume (mL)")
    components: Literal["foreground", "class"] = Field(
        "foreground", description="min_component_ml applies to components of the whole foreground (tumour "
                                  "sub-regions) or of each class on its own (organs)")
    min_component_fraction: float | None = Field(
        None, ge=0.0, lt=1.0, description="with min_component_ml: also remove components below this fraction of "
                                          "the largest one of the same class (or foreground)")
    segment_codes: dict[str, SegmentCodes] | None = Field(
        None, description="class name -> SNOMED CT category and type (default: medpipe's table of known names)")


class ClassifierPackageOptions(PackageOptions):
    tta_axes: list[Annotated[int, Field(ge=0, le=2)]] = Field(default_factory=lambda: [0], description="axes flipped when tta is on")
    positive_class: int = Field(1, ge=0, description="binary: the class the decision is about")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="binary: positive when its probability >= this")
    class_codes: dict[str, CodeSpec] | None = Field(None, description="class index -> finding code for the SR")


class PackageError(MedpipeError):
    """A model folder that is missing, damaged or not a medpipe model package."""


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def model_id(manifest: dict[str, Any]) -> str:
    """sha256 (hex) of the manifest in canonical form: the identity every output cites."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def segment_code(name: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"category": code, "type": code}`` for a class name: what ``given`` names wins (a hand-edited package may
    give only one of the two); the rest comes from the known tables."""
    from medpipe.dicom.anatomy import anatomy_codes

    if given and {"category", "type"} <= given.keys():
        return given
    known = KNOWN_SEGMENT_CODES.get(name.strip().lower()) or anatomy_codes(name) or FALLBACK_CODE
    return {**known, **(given or {})}


def class_label_codes(labels: dict[str, Any], label_codes: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Class index -> the coded concepts of the one label value it stands for (``labels``: a checkpoint's
    :func:`~medpipe.data.labels.label_info`; ``label_codes``: a datalist's, label value -> codes, from the
    SEG the labels came from). Classes merged from several values, and ``whole_tumor``'s, get none."""
    if not label_codes or labels.get("target") != "multiclass":
        return {}
    mapping = {int(k): int(v) for k, v in (labels.get("label_map") or {}).items()} or \
        {int(c): int(c) for c in labels["classes"]}
    values: dict[int, list[int]] = {}
    for value, cls in mapping.items():
        if cls > 0:
            values.setdefault(cls, []).append(value)
    return {str(cls): label_codes[str(vs[0])] for cls, vs in values.items()
            if len(vs) == 1 and str(vs[0]) in label_codes}


@dataclass
class ModelPackage:
    """A loaded-from-disk model package (manifest only; :meth:`load_model` loads the networks)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return model_id(self.manifest)

    @property
    def kind(self) -> Kind:
        return cast(Kind, self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.name)

    @property
    def version(self) -> str:
        """A short version string for DICOM (software versions, algorithm version): the id's first 16 hex."""
        return self.id[:16]

    @property
    def members(self) -> list[Path]:
        return [self.path / m["file"] for m in self.manifest["members"]]

    @property
    def inputs(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.manifest["inputs"])

    @property
    def outputs(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.manifest["outputs"])

    @property
    def inference(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.manifest.get("inference") or {})

    @classmethod
    def load(cls, path: Path | str) -> ModelPackage:
        """Read and check a package folder (manifest, every weight file's sha256).

        Raises:
            PackageError: one line naming what is wrong.
        """
        folder = Path(path).expanduser()
        if folder.is_file() and folder.name == MANIFEST:
            folder = folder.parent
        man_path = folder / MANIFEST
        if not man_path.is_file():
            hint = ("a training run's model folder is stages/NN_train_*/model; `medpipe export RUN_DIR --out DIR` "
                    "copies it")
            raise PackageError(f"{folder}: no {MANIFEST}; not a medpipe model package", hint=hint)
        try:
            manifest = json.loads(man_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PackageError(f"{man_path}: cannot be read ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
            raise PackageError(f"{man_path}: not a medpipe model manifest")
        if int(manifest.get("version", 0)) > PACKAGE_VERSION:
            raise PackageError(f"{man_path}: written by a newer medpipe (format {manifest.get('version')})")
        for m in manifest.get("members") or []:
            f = folder / m["file"]
            if not f.is_file():
                raise PackageError(f"{folder}: weight file {m['file']} is missing")
            if sha256_file(f) != m["sha256"]:
                raise PackageError(f"{folder}: weight file {m['file']} does not match its sha256 in {MANIFEST} "
                                   "(changed or damaged); export the model again")
        if not manifest.get("members"):
            raise PackageError(f"{man_path}: lists no weight files")
        return cls(folder.resolve(), manifest)

    def load_model(self, device: str = "cpu", amp: bool = False) -> Any:
        """The networks, once: a :class:`SegmentationModel`, :class:`ClassificationModel` or :class:`DetectionModel`."""
        if self.kind == "detector":
            from medpipe.inference.detection import DetectionModel

            return DetectionModel.load(self.members[0], device)
        if self.kind == "segmenter":
            from medpipe.inference.segmentation import SegmentationModel

            return SegmentationModel.load(self.members, device, amp)
        from medpipe.inference.classification import ClassificationModel

        return ClassificationModel.load(self.members, device, amp)


def write_package(folder: Path, *, kind: Kind, name: str, checkpoints: list[Path], network: dict[str, Any],
                  inputs: dict[str, Any], outputs: dict[str, Any], inference: dict[str, Any],
                  training: dict[str, Any]) -> ModelPackage:
    """Write a package into ``folder`` (replacing one there): copies the checkpoints, writes the manifest and card.

    The weight files are copied under their member index (``weights/member0.pt``, ...), so the manifest
    (and the id) depends on their content, not on where training put them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights").mkdir(exist_ok=True)
    members = []
    for i, ck in enumerate(checkpoints):
        rel = f"weights/member{i}.pt"
        with atomic_path(folder / rel) as tmp:
            shutil.copyfile(ck, tmp)
        members.append({"file": rel, "sha256": sha256_file(folder / rel)})
    for stale in sorted((folder / "weights").glob("member*.pt")):
        if stale.name not in {Path(m["file"]).name for m in members}:
            stale.unlink()
    manifest = {
        "format": PACKAGE_FORMAT, "version": PACKAGE_VERSION, "kind": kind, "name": name, "members": members,
        "network": network, "inputs": inputs, "outputs": outputs, "inference": inference, "training": training,
    }
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    pkg = ModelPackage(folder.resolve(), manifest)
    write_card(pkg, held_out=None)
    return pkg


def write_card(pkg: ModelPackage, held_out: dict[str, Any] | None) -> None:
    """``model_card.md`` (and ``metrics.json`` when ``held_out`` metrics are given)."""
    from medpipe.report.model_card import model_card_markdown

    if held_out is not None:
        write_text_atomic(pkg.path / "metrics.json", json.dumps(held_out, indent=1, sort_keys=True) + "\n")
    write_text_atomic(pkg.path / "model_card.md", model_card_markdown(pkg.manifest, pkg.id, held_out))


def export_package(src: ModelPackage, dest: Path, held_out: dict[str, Any] | None) -> ModelPackage:
    """Copy a package to ``dest`` (a new or empty folder, or an older copy of the same model) with its card."""
    dest = dest.expanduser()
    if dest.exists() and any(dest.iterdir()):
        existing = dest / MANIFEST
        if not existing.is_file():
            raise PackageError(f"{dest} exists and is not a model package; choose an empty or new folder")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "weights").mkdir(exist_ok=True)
    for m in src.manifest["members"]:
        with atomic_path(dest / m["file"]) as tmp:
            shutil.copyfile(src.path / m["file"], tmp)
    write_text_atomic(dest / MANIFEST, (src.path / MANIFEST).read_text(encoding="utf-8"))
    out = ModelPackage.load(dest)
    if out.id != src.id:  # pragma: no cover - a copy that changed would be a disk fault
        raise PackageError(f"{dest}: the copy differs from {src.path}")
    write_card(out, held_out)
    return out


def _training_record(datalist_path: Path, doc: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    from medpipe.provenance import git_commit, versions

    v = versions()
    return {
        "datalist_sha256": sha256_file(datalist_path),
        "split_sizes": {s: len(doc.get(s) or []) for s in ("train", "val", "test")},
        "medpipe_version": v.get("medpipe", "unknown"), "git_commit": git_commit(),
        "versions": {k: v[k] for k in ("torch", "monai") if k in v},
        **extra,
    }


def build_segmenter_package(folder: Path, checkpoints: list[Path], datalist_path: Path, *, name: str,
                            tta: bool = False, min_component_ml: float | None = None,
                            segment_codes: dict[str, Any] | None = None,
                            training: dict[str, Any] | None = None) -> ModelPackage:
    """The package of trained segmenter checkpoint(s) (one per fold: an ensemble, whose mean probabilities
    :class:`~medpipe.inference.segmentation.SegmentationModel` takes) and the datalist they were trained on.

    ``tta`` and ``min_component_ml`` (``inference`` in ``model.json``) are how ``medpipe score`` applies it.

    ``segment_codes``: class name -> ``{"category": code, "type": code}``; it wins over the codes the datalist
    carries from the truth SEG's segments (``label_codes``), which win over the known tables
    (:data:`KNOWN_SEGMENT_CODES`, :mod:`medpipe.dicom.anatomy`).
    """
    from medpipe.inference.checkpoint import SEGMENTER_FORMAT, SEGMENTER_VERSION, read_checkpoint

    ck = read_checkpoint(checkpoints[0], SEGMENTER_FORMAT, SEGMENTER_VERSION, "medpipe segmenter checkpoint")
    doc = json.loads(Path(datalist_path).read_text(encoding="utf-8"))
    codes = segment_codes or {}
    from_labels = class_label_codes(ck["labels"], doc.get("label_codes"))
    classes = {k: {"name": v, **segment_code(v, codes.get(v) or from_labels.get(k))}
               for k, v in ck["labels"]["classes"].items()}
    inputs = {"channels": list(ck.get("channels") or doc.get("channels") or []),
              "channel_rules": doc.get("channel_rules"), "reference": doc.get("reference"),
              "eval_transforms": ck["eval_transforms"], "roi_size": ck["roi_size"]}
    outputs = {"target": ck["labels"].get("target"), "label_map": ck["labels"].get("label_map"), "classes": classes}
    inference = {"tta": tta, "min_component_ml": min_component_ml,
                 "components": (ck.get("inference") or {}).get("components", "foreground"),
                 "min_component_fraction": (ck.get("inference") or {}).get("min_component_fraction"),
                 "sw_batch_size": ck.get("sw_batch_size", 4),
                 "overlap": ck.get("overlap", 0.25)}
    validation: dict[str, Any] = {"best_val_dice": ck.get("val_dice"), "best_epoch": ck.get("epoch")}
    if len(checkpoints) > 1:
        docs = [read_checkpoint(c, SEGMENTER_FORMAT, SEGMENTER_VERSION, "medpipe segmenter checkpoint")
                for c in checkpoints]
        validation = {"best_val_dice": [d.get("val_dice") for d in docs], "best_epoch": [d.get("epoch") for d in docs]}
    record = _training_record(datalist_path, doc, {"seed": ck.get("seed"), **(training or {}),
                                                   "validation": validation})
    return write_package(folder, kind="segmenter", name=name, checkpoints=checkpoints, network=ck["model"],
                         inputs=inputs, outputs=outputs, inference=inference, training=record)


def build_classifier_package(folder: Path, checkpoints: list[Path], datalist_path: Path, *, name: str,
                             tta_axes: list[int] | None = None, positive_class: int = 1, threshold: float = 0.5,
                             class_codes: dict[str, Any] | None = None, validation: dict[str, Any] | None = None,
                             training: dict[str, Any] | None = None) -> ModelPackage:
    """The package of trained classifier checkpoint(s) (one per fold) and the datalist they were trained on."""
    from medpipe.inference.checkpoint import CLASSIFIER_FORMAT, CLASSIFIER_VERSION, read_checkpoint

    ck = read_checkpoint(checkpoints[0], CLASSIFIER_FORMAT, CLASSIFIER_VERSION, "medpipe classifier checkpoint")
    doc = json.loads(Path(datalist_path).read_text(encoding="utf-8"))
    inputs = {"channels": list(doc.get("channels") or []), "channel_rules": doc.get("channel_rules"),
              "reference": doc.get("reference"), "eval_transforms": ck["eval_transforms"],
              "input_shape": ck.get("input_shape")}
    outputs = {"class_names": ck.get("class_names"), "positive_class": positive_class, "threshold": threshold,
               "class_codes": class_codes or {}}
    inference = {"tta": tta_axes is not None, "tta_axes": tta_axes or []}
    record = _training_record(datalist_path, doc, {**(training or {}), "validation": validation or {}})
    return write_package(folder, kind="classifier", name=name, checkpoints=checkpoints, network=ck["model"],
                         inputs=inputs, outputs=outputs, inference=inference, training=record)


#: what a lung-nodule detector reports: SCT 27925004 "Nodule" in SCT 39607008 "Lung" (as the sample's truth SR)
NODULE = {"scheme": "SCT", "value": "27925004", "meaning": "Nodule"}
LUNG = {"scheme": "SCT", "value": "39607008", "meaning": "Lung"}


def build_detector_package(folder: Path, checkpoint: Path, datalist_path: Path, *, name: str,
                           training: dict[str, Any] | None = None) -> ModelPackage:
    """The package of a trained detector checkpoint (:mod:`medpipe.inference.detection`) and its datalist."""
    from medpipe.inference.checkpoint import read_checkpoint
    from medpipe.inference.detection import DETECTOR_FORMAT, DETECTOR_VERSION

    ck = read_checkpoint(checkpoint, DETECTOR_FORMAT, DETECTOR_VERSION, "medpipe detector checkpoint")
    doc = json.loads(Path(datalist_path).read_text(encoding="utf-8"))
    inputs = {"channels": list(doc.get("channels") or []), "channel_rules": doc.get("channel_rules"),
              "reference": doc.get("reference"), "preprocessing": ck["preprocessing"]}
    outputs = {"finding": NODULE, "finding_site": LUNG}
    record = _training_record(datalist_path, doc, {**(training or {}), "validation": ck.get("record") or {}})
    return write_package(folder, kind="detector", name=name, checkpoints=[checkpoint], network=ck["model"],
                         inputs=inputs, outputs=outputs, inference=ck["inference"], training=record)
