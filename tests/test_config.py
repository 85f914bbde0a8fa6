"""Pipeline validation: every error is one line naming the stage, field and YAML line; nothing runs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tests.toy_stages  # noqa: F401  (registers toy_* stages)
from medpipe.cli import app
from medpipe.config import load_pipeline
from medpipe.errors import ConfigError

GOOD = """\
name: toy
seed: 1
stages:
  - stage: toy_make
    n: 4
  - stage: toy_train
    epochs: 3
    roi_size: [16, 16, 8]
    train_transforms:
      - ScaleIntensityd: {keys: [image]}
      - RandFlipd: {keys: [image], prob: 0.5, spatial_axis: 0}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_pipeline(path, overrides)
    return str(exc.value)


def test_good_pipeline_resolves_defaults(tmp_path: Path) -> None:
    p = load_pipeline(write(tmp_path, GOOD))
    assert [s.kind for s in p.stages] == ["toy_make", "toy_train"]
    resolved = p.resolved()
    assert resolved["device"] == "auto" and resolved["stages"][1]["model"] == "unet"
    assert resolved["stages"][1]["roi_size"] == [16, 16, 8]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("  - stage: toy_train", "  - stage: toy_trian"),
         "stages[1]: unknown stage kind 'toy_trian' (did you mean 'toy_train'?) ({p} line 6)"),
        (("    epochs: 3", "    epoch: 3"),
         "stages[1] (toy_train).epoch: unknown parameter 'epoch' (did you mean 'epochs'?) ({p} line 7)"),
        (("    epochs: 3", "    epochs: three"),
         "stages[1] (toy_train).epochs: input should be a valid integer, unable to parse string as an integer, "
         "got 'three' ({p} line 7)"),
        (("    roi_size: [16, 16, 8]", "    roi_size: [16, 16]"),
         "stages[1] (toy_train).roi_size[2]: missing (required) ({p} line 8)"),
        (("      - RandFlipd: {keys: [image], prob: 0.5, spatial_axis: 0}", "      - RandFlip_d: {keys: [image]}"),
         "stages[1] (toy_train).train_transforms[1]: unknown MONAI transform 'RandFlip_d' (did you mean 'RandFlipd'?) "
         "({p} line 11)"),
        (("      - ScaleIntensityd: {keys: [image]}", "      - ScaleIntensityd: {keys: [image], minv: 0, mnv: 1}"),
         "stages[1] (toy_train).train_transforms[0]: ScaleIntensityd: "),
        (("seed: 1", "sead: 1"), "sead: unknown parameter 'sead' (did you mean 'seed'?) ({p} line 2)"),
        (("name: toy\n", ""), "name: missing (required) ({p} line 1)"),
        (("    n: 4", "    n: [4"), "{p} line 6: not valid YAML"),
    ],
)
def test_each_error_names_stage_field_and_line(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    path = write(tmp_path, text)
    message = error_of(path)
    assert expected.format(p=path) in message, message
    assert len(message.splitlines()) == 1


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("    n: 4", "    n: four").replace("    epochs: 3", "    epoch: 3")
    lines = error_of(write(tmp_path, text)).splitlines()
    assert len(lines) == 2 and lines[0].startswith("stages[0] (toy_make).n:") and "line 5" in lines[0]


def test_overrides_are_validated_and_marked(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    p = load_pipeline(path, ["toy_train.epochs=7", "seed=5", "stages.0.n=2"])
    assert p.stages[1].params.epochs == 7 and p.config.seed == 5 and p.stages[0].params.n == 2  # type: ignore[attr-defined]
    assert "(--set)" in error_of(path, ["toy_train.epochs=many"])
    assert "no 'nope'" in error_of(path, ["nope.x=1"])


def test_yaml_cannot_run_code(tmp_path: Path) -> None:
    text = GOOD.replace("name: toy", "name: !!python/object/apply:os.system ['echo hacked']")
    assert "not valid YAML" in error_of(write(tmp_path, text))


def test_cli_validate_ok_and_error_without_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(write(tmp_path, GOOD))])
    assert ok.exit_code == 0 and "ok" in ok.output
    bad = runner.invoke(app, ["validate", str(write(tmp_path, GOOD.replace("epochs: 3", "epochz: 3")))])
    assert bad.exit_code == 2
    assert bad.output.startswith("error: stages[1] (toy_train).epochz: unknown parameter")
    assert "Traceback" not in bad.output
