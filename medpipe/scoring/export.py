"""``medpipe export``: a run's model package, with the held-out metrics of the run, copied anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError
from medpipe.inference.package import MANIFEST, ModelPackage, export_package
from medpipe.stage import from_run_path

TRAINING_KINDS = ("train_segmenter", "train_classifier")
EVALUATION_KINDS = ("evaluate", "evaluate_classifier")


def _state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "state.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedpipeError(f"{run_dir}: no readable state.json; not a medpipe run folder",
                           hint="give the folder `medpipe run` wrote (default runs/<name>)") from exc
    return doc if isinstance(doc, dict) else {}


def held_out_metrics(run_dir: Path, stage_key: str) -> dict[str, Any]:
    """Metrics of the evaluation stages that ran after ``stage_key`` and before the next training stage."""
    stages = _state(run_dir).get("stages", {})
    out: dict[str, Any] = {}
    started = False
    for key in sorted(stages):
        kind = key.split("_", 1)[1] if "_" in key else key
        if key == stage_key:
            started = True
            continue
        if not started:
            continue
        if kind in TRAINING_KINDS:
            break
        if kind in EVALUATION_KINDS and stages[key].get("status") == "done":
            out[key] = stages[key].get("metrics", {})
    return out


def export_model(run_dir: Path | str, out: Path | str, stage: str | None = None) -> ModelPackage:
    """Copy the model package of a training stage of ``run_dir`` (or a package folder) to ``out``.

    Raises:
        MedpipeError: not a run folder, no (or no such) trained model in it.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if (run_dir / MANIFEST).is_file():
        return export_package(ModelPackage.load(run_dir), Path(out), None)
    stages = _state(run_dir).get("stages", {})
    trained = [k for k, v in sorted(stages.items()) if v.get("status") == "done" and "model" in v.get("outputs", {})]
    if not trained:
        raise MedpipeError(f"{run_dir}: no finished training stage with a model package in this run")
    if stage is None:
        key = trained[-1]
    else:
        matches = [k for k in trained if k == stage or k.endswith(stage) or stage in k]
        if len(matches) != 1:
            raise MedpipeError(f"--stage {stage}: {'no' if not matches else 'several'} training stages match "
                               f"(trained: {', '.join(trained)})")
        key = matches[0]
    src = Path(from_run_path(stages[key]["outputs"]["model"], run_dir))
    return export_package(ModelPackage.load(src), Path(out), held_out_metrics(run_dir, key))
