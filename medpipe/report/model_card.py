"""``model_card.md``: what a model package is, how it was made and measured, and what it is for."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) or x is None for x in v):
        return "[" + ", ".join("n/a" if x is None else f"{x:.4g}" for x in v) + "]"
    return str(v)


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in metrics.items():
        if key.endswith("_ci95") or isinstance(value, dict):
            continue
        ci = metrics.get(f"{key}_ci95")
        ci_text = "" if ci is None else (" (95% CI undefined)" if None in ci else f" (95% CI {_fmt(ci)})")
        lines.append(f"| {key} | {_fmt(value)}{ci_text} |")
    return lines


def _per_label_lines(per_label: dict[str, Any]) -> list[str]:
    def value(m: dict[str, Any], key: str) -> str:
        v, ci = m.get(key), m.get(f"{key}_ci95")
        if v is None:
            return "n/a"
        return _fmt(v) + ("" if ci is None else " (undefined)" if None in ci else f" {_fmt(ci)}")

    return [f"| {name} | {value(m, 'dice')} | {value(m, 'hd95')} | {m.get('n', '')} |" for name, m in per_label.items()]


def model_card_markdown(manifest: dict[str, Any], model_id: str, held_out: dict[str, Any] | None) -> str:
    """The card's Markdown text (deterministic for a given manifest and metrics)."""
    kind = manifest["kind"]
    inputs, outputs, training = manifest["inputs"], manifest["outputs"], manifest.get("training") or {}
    net = manifest.get("network") or {}
    out = [f"# Model card: {manifest.get('name', 'medpipe model')}", ""]
    out += [f"- **Model id** (sha256 of model.json, cited by every output): `{model_id}`",
            f"- **Kind**: {kind}, network `{net.get('name')}`, {len(manifest['members'])} member(s)"
            + (" (k-fold ensemble, probabilities averaged)" if len(manifest["members"]) > 1 else ""),
            f"- **medpipe** {training.get('medpipe_version', '?')}, git commit {training.get('git_commit') or 'unknown'}",
            ""]
    out += ["## Intended use", "",
            str(training.get("intended_use") or
                "Research use only. Not a medical device; outputs must not be used for clinical decisions. "
                "Trained on the data described below; performance on other scanners, protocols or populations "
                "is unknown until measured."), ""]
    out += ["## Inputs", ""]
    channels = inputs.get("channels") or []
    rules = inputs.get("channel_rules") or {}
    if channels:
        out += ["| channel | DICOM series rule |", "|---|---|"]
        for c in channels:
            rule = rules.get(c)
            text = ", ".join(f"{k}={v!r}" for k, v in rule.items() if v is not None) if rule else \
                "(no DICOM rule: trained on files, scores ingest folders only through a datalist)"
            out.append(f"| {c} | {text.replace('|', chr(92) + '|')} |")
        out.append("")
        if inputs.get("reference"):
            out += [f"Outputs lie on the grid of the **{inputs['reference']}** series.", ""]
    out += [f"Preprocessing (MONAI): {', '.join(next(iter(t)) for t in inputs.get('eval_transforms') or [])}.", ""]
    out += ["## Outputs", ""]
    if kind == "segmenter":
        out += ["| class | name | SNOMED CT category | SNOMED CT type |", "|---|---|---|---|"]
        for k, c in sorted(outputs.get("classes", {}).items(), key=lambda kv: int(kv[0])):
            out.append(f"| {k} | {c['name']} | {c['category']['meaning']} ({c['category']['value']}) | "
                       f"{c['type']['meaning']} ({c['type']['value']}) |")
    else:
        names = outputs.get("class_names", {})
        out += [f"Classes: {', '.join(f'{k} = {v}' for k, v in sorted(names.items(), key=lambda kv: int(kv[0])))}."]
        if outputs.get("threshold") is not None:
            out += [f"Decision: positive class {outputs.get('positive_class')} when its probability >= "
                    f"{outputs['threshold']}."]
    out += [""]
    out += ["## Training data", ""]
    splits = training.get("split_sizes") or {}
    if splits:
        out += [f"Split sizes (studies): {', '.join(f'{k} {v}' for k, v in splits.items())}; split by patient."]
    if training.get("datalist_sha256"):
        out += [f"Datalist sha256: `{training['datalist_sha256']}`."]
    if training.get("pipeline"):
        out += [f"Pipeline: `{training['pipeline']}`, seed {training.get('seed')}."]
    out += [""]
    out += ["## Validation during training", ""]
    val = training.get("validation") or {}
    out += (["| metric | value |", "|---|---|", *_metric_lines(val)] if val else ["(not recorded)"])
    out += ["", "## Held-out evaluation", ""]
    if held_out:
        for stage_key, metrics in held_out.items():
            out += [f"### {stage_key}", "", "| metric | value |", "|---|---|", *_metric_lines(metrics), ""]
            if isinstance(metrics.get("per_label"), dict) and len(metrics["per_label"]) > 1:
                out += ["Per class:", "", "| class | Dice (95% CI) | HD95 mm (95% CI) | cases |", "|---|---|---|---|",
                        *_per_label_lines(metrics["per_label"]), ""]
    else:
        out += ["Not yet attached: `medpipe export RUN_DIR --out DIR` copies the model with the held-out metrics "
                "of the run's evaluation stages.", ""]
    return "\n".join(out).rstrip() + "\n"
