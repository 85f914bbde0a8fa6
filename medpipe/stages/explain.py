"""Stage ``explain``: Grad-CAM, Grad-CAM++ and occlusion-sensitivity maps of a trained classifier.

Why: a classifier's accuracy says nothing about *what* it looks at; a map over the misclassified
cases shows shortcuts (text markers, borders, the scanner bed) and where the evidence sat in the
cases it got wrong.

Every item of the split (default ``test``) goes through the eval transforms stored in the checkpoint
and the classifier (all ensemble members, averaged: the predictions ``evaluate_classifier`` scores);
then the chosen cases are explained (``medpipe.models.explain``) and drawn
(``medpipe.report.explanation_plots``). With several checkpoints (a k-fold ensemble) the maps are
those of the **first member**: a map explains one network, and the members' maps cannot be averaged
meaningfully (each has its own features); the log and the figure titles say so.

Cases (``cases``): ``misclassified`` (default): the wrong predictions, most confident first, topped up
with the least confident correct ones when there are fewer than ``max_cases``; ``all``: the split in
datalist order, up to ``max_cases``; or a list of patient IDs / study UIDs (all of them, whatever
``max_cases``).

Outputs in the stage folder (artifact ``explanations``): ``<case>_explain.png`` per case (2D: the
image and each map overlaid; 3D: a montage of ``slices`` axial slices, rows = methods; ``cnn_rnn``
adds each slice's attention weight) and ``explanations.csv`` (case, patient_id, study_uid, true,
predicted, probability, target, misclassified, file). Metrics: ``n_explained``, ``n_misclassified``
(in the whole split), ``seconds_per_case``.

Cost per case: Grad-CAM(++) one forward and backward pass; occlusion one forward pass per window
position (see ``medpipe.models.explain.occlusion_settings``: ~121 passes for a 28 px image, at most
343 for a volume): seconds on a CPU for MedMNIST-sized inputs.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from medpipe.data.datalist import case_name, class_items, load_datalist, model_inputs
from medpipe.errors import StageError
from medpipe.inference.classification import ClassificationModel
from medpipe.io import sha256_file, write_csv_atomic
from medpipe.stage import InputPath, Need, RunContext, StageParams, StageResult, stage

Method = Literal["gradcam", "gradcampp", "occlusion"]
ALL_METHODS: list[Method] = ["gradcam", "gradcampp", "occlusion"]


class ExplainParams(StageParams):
    checkpoints: list[InputPath] | None = Field(
        default=None, description="classifier checkpoint(s); None: the train_classifier stage's; with several "
                                  "(an ensemble), the maps are the first member's")
    datalist: InputPath | None = Field(default=None, description="None: the dataset stage's datalist")
    split: Literal["train", "val", "test"] = Field(default="test", description="the split whose cases are explained")
    methods: list[Method] = Field(default_factory=lambda: list(ALL_METHODS), min_length=1,
                                  description="gradcam, gradcampp and/or occlusion")
    cases: Literal["misclassified", "all"] | list[str] = Field(
        default="misclassified", description="misclassified (then the least confident correct ones), all, or a "
                                             "list of patient IDs / study UIDs")
    max_cases: int | None = Field(default=8, ge=1,
                                  description="at most this many cases (not for a list of IDs); None: no limit")
    target: Literal["predicted", "true"] = Field(default="predicted",
                                                 description="the class whose evidence the maps show")
    mask_size: int | None = Field(default=None, ge=1, description="occlusion window side in voxels; None: a quarter "
                                                                  "of each side (see occlusion_settings)")
    overlap: float | None = Field(default=None, ge=0.0, lt=1.0,
                                  description="occlusion window overlap; None: 0.75 in 2D, 0.5 in 3D")
    n_batch: int = Field(default=16, ge=1, description="occluded images per forward pass")
    slices: int = Field(default=8, ge=1, description="3D: axial slices in the montage")
    slice_choice: Literal["strongest", "even"] = Field(
        default="strongest", description="3D: the slices where the maps peak, or evenly spaced inside the body")
    channel: int | None = Field(default=None, ge=0, description="image channel shown under the maps; None: colour "
                                                                "for RGB images, else the first channel")

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[Method]) -> list[Method]:
        return list(dict.fromkeys(v))


def _pick(items: list[dict[str, Any]], probs: np.ndarray, truth: np.ndarray, p: ExplainParams) -> list[int]:
    """Indices of the items to explain (see the module docstring)."""
    n = len(items) if p.max_cases is None else p.max_cases
    pred = probs.argmax(1)
    conf = probs[np.arange(len(items)), pred]
    if isinstance(p.cases, list):
        wanted = list(dict.fromkeys(p.cases))
        index: dict[str, int] = {}
        for i, it in enumerate(items):
            for key in ("patient_id", "study_uid"):
                if it.get(key) is not None:
                    index.setdefault(str(it[key]), i)
        missing = [c for c in wanted if c not in index]
        if missing:
            raise StageError(f"cases: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} not in the "
                             f"{p.split} split (give patient IDs or study UIDs of items with a class)")
        return list(dict.fromkeys(index[c] for c in wanted))
    if p.cases == "all":
        return list(range(min(n, len(items))))
    wrong = np.flatnonzero(pred != truth)
    right = np.flatnonzero(pred == truth)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")]  # most confident mistakes first
    right = right[np.argsort(conf[right], kind="stable")]  # then the least confident correct ones
    return [int(i) for i in np.concatenate([wrong, right])[:n]]


def _spacing(x: Any, dims: int) -> list[float] | None:
    """Voxel size from a MetaTensor's affine (None for plain tensors)."""
    affine = getattr(x, "affine", None)
    if affine is None:
        return None
    a = np.asarray(affine.cpu() if hasattr(affine, "cpu") else affine, dtype=np.float64)
    zooms = np.sqrt((a[:dims, :dims] ** 2).sum(0))
    return [float(z) if z > 0 else 1.0 for z in zooms]


@stage("explain", ExplainParams,
       needs=(Need("classifier", params=("checkpoints",)), Need("datalist", params=("datalist",))),
       gives=("explanations",))
def explain(ctx: RunContext, p: ExplainParams) -> StageResult:
    from medpipe.data.datasets import make_dataset
    from medpipe.models.explain import Explainer, occlusion_settings, slice_attention
    from medpipe.report.explanation_plots import explanation_png

    paths = ctx.inputs("classifier", p.checkpoints, "checkpoints")
    model = ClassificationModel.load(paths, ctx.device, ctx.amp)
    nets = model.nets
    dl_path = ctx.input("datalist", p.datalist)
    doc = load_datalist(dl_path)
    items = class_items(doc, p.split, path=dl_path)
    cfg = model.config
    n_classes = int(cfg["num_classes"])
    dims = int(cfg["spatial_dims"])
    names = model.class_names
    truth = np.asarray([int(it["class"]) for it in items], dtype=np.int64)
    if truth.min() < 0 or truth.max() >= n_classes:
        raise StageError(f"the {p.split} split has classes {sorted(set(truth.tolist()))}; the classifier knows "
                         f"{n_classes} (0..{n_classes - 1})")
    ds = make_dataset(model_inputs(items), model.eval_transforms, "none")
    try:
        probs = model.predict_proba(ds, batch_size=32 if dims == 2 else 1)
    except (RuntimeError, ValueError, OSError) as exc:
        raise StageError(f"the {p.split} split cannot be classified ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    pred = probs.argmax(1)
    wrong = int((pred != truth).sum())
    chosen = _pick(items, probs, truth, p)
    member = f"first of {len(nets)} ensemble members" if len(nets) > 1 else ""
    if member:
        ctx.log.info("explaining the %s (%s); predictions are the ensemble's", member, paths[0].name)
    n_wrong_chosen = sum(1 for i in chosen if pred[i] != truth[i])
    ctx.log.info("%s split: %d of %d misclassified; explaining %d case(s) (%d misclassified) with %s", p.split,
                 wrong, len(items), len(chosen), n_wrong_chosen, ", ".join(p.methods))

    try:
        explainer = Explainer(nets[0], cfg, p.methods, mask_size=p.mask_size, overlap=p.overlap, n_batch=p.n_batch)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    out_dir = ctx.stage_dir
    rows: list[dict[str, Any]] = []
    warned_flat = False
    t0 = time.perf_counter()
    with ctx.progress("Explaining", len(chosen)) as advance:
        for i in chosen:
            item = items[i]
            try:
                image = ds[i]["image"]
            except Exception as exc:
                raise StageError(f"case {item.get('patient_id')}: cannot be loaded ({type(exc).__name__}: {exc})"
                                 ) from exc
            x = image[None]
            if x.ndim != dims + 2:
                raise StageError(f"case {item.get('patient_id')}: a {x.ndim - 2}D image for a {dims}D classifier")
            c = int(pred[i]) if p.target == "predicted" else int(truth[i])
            try:
                maps = explainer(x, c)
            except (RuntimeError, ValueError) as exc:
                raise StageError(f"case {item.get('patient_id')}: no explanation ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
            if explainer.feature_shape is not None and int(np.prod(explainer.feature_shape)) == 1 and not warned_flat:
                ctx.log.warning("the Grad-CAM layer %s of %s is 1 voxel for inputs of size %s: its maps are "
                                "constant; use occlusion or larger inputs", explainer.layer, cfg["name"],
                                list(x.shape[2:]))
                warned_flat = True
            attention = slice_attention(nets[0], x)
            name = case_name(item)
            png = out_dir / f"{name}_explain.png"
            tn, pn = names.get(int(truth[i]), str(truth[i])), names.get(int(pred[i]), str(pred[i]))
            title = (f"{item.get('patient_id') or name}: true {tn}, predicted {pn} (p = {probs[i, pred[i]]:.2f})"
                     f"\nmaps for class {names.get(c, str(c))}{' (' + member + ')' if member else ''}")
            image_np = x[0].detach().cpu().float().numpy()
            try:
                explanation_png(png, image_np, {m: v[0] for m, v in maps.items()}, title,
                                spacing=_spacing(image, dims), n_slices=p.slices, slice_choice=p.slice_choice,
                                attention=None if attention is None else attention[0], channel=p.channel)
            except ValueError as exc:  # e.g. a channel the images do not have
                raise StageError(f"case {item.get('patient_id')}: {exc}") from exc
            rows.append({"case": name, "patient_id": item.get("patient_id"), "study_uid": item.get("study_uid"),
                         "true": tn, "predicted": pn, "probability": round(float(probs[i, pred[i]]), 6),
                         "target": names.get(c, str(c)), "misclassified": int(pred[i] != truth[i]),
                         "file": png.name})
            if len(rows) == 1:  # what the rest will cost
                took = time.perf_counter() - t0
                occ = ""
                if "occlusion" in p.methods:
                    passes = occlusion_settings(list(x.shape[2:]), p.mask_size, p.overlap)[2]
                    occ = f" (occlusion: {passes} forward passes, {explainer.seconds['occlusion']:.1f} s)"
                ctx.log.info("first case explained in %.1f s%s; about %.0f s for all %d", took, occ,
                             took * len(chosen), len(chosen))
            advance(1)
    seconds = time.perf_counter() - t0

    write_csv_atomic(out_dir / "explanations.csv", rows, ["case", "patient_id", "study_uid", "true", "predicted",
                                                          "probability", "target", "misclassified", "file"])
    per_method = {m: round(s / max(1, len(rows)), 3) for m, s in explainer.seconds.items()}
    ctx.log.info("explained %d case(s) in %.1f s; seconds per case by method: %s", len(rows), seconds, per_method)
    metrics = {"n_explained": len(rows), "n_misclassified": wrong,
               "seconds_per_case": round(seconds / len(rows), 3) if rows else 0.0}
    inputs = {str(q): sha256_file(q) for q in [*paths, dl_path]}
    return StageResult(metrics=metrics, outputs={"explanations": str(out_dir)}, inputs=inputs)

