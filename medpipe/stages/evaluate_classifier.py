"""Stage ``evaluate_classifier``: a trained classifier (or k-fold ensemble) on a held-out split.

Probabilities are the softmax averaged over the ensemble's members and, with ``tta: true``, over
flips along ``tta_axes`` (default: the first spatial axis, left-right for RAS volumes and for 2D
images as MONAI loads them); by default (``tta`` unset) the TTA the training stage set for its model
package (``package.tta``), so the evaluation scores what ``medpipe score`` will compute. Metrics (:mod:`medpipe.metrics.classification`): ROC AUC, accuracy,
sensitivity, specificity, F1, PPV / NPV (binary), expected calibration error, each with a seeded
percentile-bootstrap 95 % confidence interval over cases. For binary problems ``positive_class``
says which class is "positive" (sensitivity = its recall; for BreastMNIST the malignant class 0);
a case is called positive when its probability reaches ``threshold``; by default (unset) the
threshold the training stage chose (``threshold_rule``) or 0.5, and the positive class it chose it for.

Writes ``predictions.csv`` (one row per case: truth, probabilities, prediction), ``roc.png``,
``confusion.png``, ``calibration.png`` (reliability diagram with ECE) and ``metrics.json``; the
run's ``metrics.json`` gets ``auc``, ``accuracy``, ... at its top level (and ``*_ci95``).
Outputs ``{"predictions": path}``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import Field

from medpipe.data.datalist import case_name, class_items, load_datalist, model_inputs
from medpipe.errors import StageError
from medpipe.inference.classification import ClassificationModel, valid_tta_axes
from medpipe.io import sha256_file, write_csv_atomic, write_text_atomic
from medpipe.stage import Axis, InputPath, Need, RunContext, StageParams, StageResult, stage

REPORTED = ("auc", "accuracy", "sensitivity", "specificity", "f1", "ppv", "npv", "ece")


class EvaluateClassifierParams(StageParams):
    checkpoints: list[InputPath] | None = Field(None, description="None: the train_classifier stage's checkpoint(s)")
    datalist: InputPath | None = Field(None, description="None: the datalist the previous stages used")
    split: Literal["test", "val", "train"] = "test"
    tta: bool | None = Field(None, description="average the probabilities over flips (test-time augmentation); "
                                               "None: as the model package (the training stage's package.tta)")
    tta_axes: list[Axis] | None = Field(None, description="spatial axes flipped when tta is on; None: the model's, "
                                                          "else [0]")
    positive_class: int | None = Field(None, ge=0, description="binary: the positive class (default: the one the "
                                                               "threshold was chosen for, else 1)")
    threshold: float | None = Field(None, gt=0.0, lt=1.0, description="binary: positive when its probability >= this; "
                                                                      "None: the training stage's choice, else 0.5")
    bootstrap: int = Field(2000, ge=0, description="bootstrap resamples for the 95 % confidence intervals")
    batch_size: int = Field(64, ge=1)


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), nd)


@stage("evaluate_classifier", EvaluateClassifierParams,
       needs=(Need("classifier", params=("checkpoints",)), Need("datalist", params=("datalist",))),
       gives=("class_predictions",))
def evaluate_classifier(ctx: RunContext, p: EvaluateClassifierParams) -> StageResult:
    import numpy as np

    from medpipe.data.datasets import make_dataset
    from medpipe.metrics.classification import metrics_with_ci, predict_labels
    from medpipe.report.classification_plots import calibration_png, confusion_png, roc_png

    paths = ctx.inputs("classifier", p.checkpoints, "checkpoints")
    dl_path = ctx.input("datalist", p.datalist)
    doc = load_datalist(dl_path)
    items = class_items(doc, p.split, path=dl_path)
    model = ClassificationModel.load(paths, ctx.device, ctx.amp)
    names = model.class_names
    n_cls = len(names)
    dims = model.spatial_dims
    if n_cls != 2 and p.positive_class is not None:
        raise StageError(f"positive_class applies to binary problems; this one has {n_cls} classes")
    if p.positive_class is not None and p.positive_class >= n_cls:
        raise StageError(f"positive_class {p.positive_class} is not a class (0..{n_cls - 1})")
    bad = sorted({int(it["class"]) for it in items if not 0 <= int(it["class"]) < n_cls})
    if bad:
        raise StageError(f"classes {bad} of the {p.split} split are unknown to the classifier ({n_cls} classes)")
    model_axes = model.tta_axes
    use_tta = p.tta if p.tta is not None else model_axes is not None
    tta = valid_tta_axes(p.tta_axes or model_axes or [0], dims) if use_tta else None
    try:
        ds = make_dataset(model_inputs(items), model.eval_transforms, "none")
        prob = model.predict_proba(ds, tta_axes=tta, batch_size=p.batch_size)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"cannot run the classifier on the {p.split} split ({type(exc).__name__}: {exc})") from exc
    y = np.asarray([int(it["class"]) for it in items])
    positive: int | None = None
    threshold: float | None = None
    if n_cls == 2:
        recorded = model.decision
        positive = p.positive_class if p.positive_class is not None else recorded[0] if recorded else None
        threshold = p.threshold if p.threshold is not None else model.threshold_for(1 if positive is None else positive)
        if threshold is None:
            threshold = 0.5
        if p.threshold is None and recorded is not None:
            ctx.log.info("decision threshold %.4f on P(%s), as chosen in training", threshold,
                         names[1 if positive is None else positive])
    results = metrics_with_ci(y, prob, positive=positive, threshold=threshold, seed=ctx.seed, n_boot=p.bootstrap)
    pred = predict_labels(prob, positive=positive, threshold=threshold)

    fields = ["case", "patient_id", "study_uid", "image", "true", "true_name", "predicted", "predicted_name",
              *[f"prob_{c}" for c in range(n_cls)], "correct"]
    rows: list[dict[str, object]] = []
    for it, yt, yp, pr in zip(items, y, pred, prob, strict=True):
        image = it["image"]
        rows.append({"case": case_name(it), "patient_id": it.get("patient_id", ""), "study_uid": it.get("study_uid", ""),
                     "image": image[0] if isinstance(image, list) else image, "true": int(yt),
                     "true_name": names[int(yt)], "predicted": int(yp), "predicted_name": names[int(yp)],
                     **{f"prob_{c}": f"{float(pr[c]):.6f}" for c in range(n_cls)}, "correct": int(yt == yp)})
    pred_path = ctx.stage_dir / "predictions.csv"
    write_csv_atomic(pred_path, rows, fields)

    auc = results["auc"]
    members = f"{len(model.nets)}-model ensemble" if len(model.nets) > 1 else "1 model"
    title = f"{p.split} split, n={len(y)}, {members}" + (", flip TTA" if tta else "")
    roc_png(y, prob, ctx.stage_dir / "roc.png", class_names=names, positive=positive, title=f"ROC\n{title}",
            ci=auc["ci95"])
    confusion_png(y, pred, n_cls, ctx.stage_dir / "confusion.png", class_names=names,
                  title=f"Confusion matrix\n{title}")
    calibration_png(y, prob, ctx.stage_dir / "calibration.png", title=f"Calibration\n{title}", positive=positive,
                    threshold=threshold)

    metrics: dict[str, Any] = {}
    for key in REPORTED:
        if key in results:
            metrics[key] = _r(results[key]["value"])
            metrics[f"{key}_ci95"] = [_r(v) for v in results[key]["ci95"]]
    metrics.update(n_cases=len(y), n_per_class=np.bincount(y, minlength=n_cls).tolist(), ensemble_size=len(model.nets),
                   tta=bool(tta))
    if n_cls == 2:
        metrics["positive_class"] = names[1 if positive is None else positive]
        metrics["threshold"] = round(float(threshold), 6) if threshold is not None else None
    write_text_atomic(ctx.stage_dir / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    ctx.log.info("%s split (%d cases, %s): AUC %.4f (95%% CI %s), accuracy %.4f, sensitivity %s, specificity %s",
                 p.split, len(y), members, metrics["auc"] or math.nan, metrics["auc_ci95"], metrics["accuracy"],
                 metrics.get("sensitivity"), metrics.get("specificity"))
    inputs = {str(c): sha256_file(c) for c in paths}
    return StageResult(outputs={"class_predictions": str(pred_path)}, metrics=metrics, inputs=inputs)
