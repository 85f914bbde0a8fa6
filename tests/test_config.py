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


# -- wiring: what a stage needs must be given by a parameter or an earlier stage -------------------------


def test_evaluate_without_a_checkpoint_fails_validation(tmp_path: Path) -> None:
    (tmp_path / "ingested").mkdir()
    path = write(tmp_path, f"""\
        name: no_model
        stages:
          - stage: dataset
            ingest_dir: {tmp_path / "ingested"}
          - stage: evaluate
            split: test
        """)
    assert error_of(path) == (
        "stages[1] (evaluate): needs 'checkpoint' (a trained segmenter checkpoint, or one per fold: an ensemble) but no earlier stage gives it; "
        f"set checkpoint, or put a train_segmenter stage before it ({path} line 5)")


def test_a_parameter_or_an_earlier_stage_meets_the_need(tmp_path: Path) -> None:
    for name in ("model.pt", "datalist.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "export").mkdir()
    by_param = write(tmp_path, f"""\
        name: given
        stages:
          - stage: evaluate
            checkpoint: {tmp_path / "model.pt"}
            datalist: {tmp_path / "datalist.json"}
        """)
    load_pipeline(by_param)
    wired = write(tmp_path, f"""\
        name: wired
        stages:
          - stage: ingest
            source: {tmp_path / "export"}
          - stage: dataset
          - stage: train_segmenter
          - stage: evaluate
          - stage: predict
        """)
    assert [s.kind for s in load_pipeline(wired).stages][-1] == "predict"


def test_every_missing_need_is_one_line_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "a.pt").write_bytes(b"")
    path = write(tmp_path, f"""\
        name: nothing_given
        stages:
          - stage: explain
            checkpoints: [{tmp_path / "a.pt"}]
          - stage: train_classifier
            epochs: 1
        """)
    lines = error_of(path).splitlines()
    assert lines == [
        "stages[0] (explain): needs 'datalist' (a datalist.json (train / val / test items)) but no earlier "
        f"stage gives it; set datalist, or put a dataset / medmnist stage before it ({path} line 3)",
        "stages[1] (train_classifier): needs 'datalist' (a datalist.json (train / val / test items)) but no earlier "
        f"stage gives it; set datalist, or put a dataset / medmnist stage before it ({path} line 5)",
    ]  # explain's checkpoints are set: no line for them


def test_stage_declarations_are_checked_at_registration() -> None:
    from medpipe.stage import Need, StageParams, stage

    class P(StageParams):
        x: int = 0

    with pytest.raises(RuntimeError, match="artifact 'nonexistent' is not declared"):
        stage("bad_kind", P, gives=("nonexistent",))
    with pytest.raises(RuntimeError, match="names parameter 'datalist', which P lacks"):
        stage("bad_kind", P, needs=(Need("datalist", params=("datalist",)),))


def test_one_artifact_name_has_one_meaning() -> None:
    from medpipe.stage import artifact

    artifact("datalist", "file", "a datalist.json (train / val / test items)")  # the same declaration again: fine
    with pytest.raises(RuntimeError, match="declared twice with different meanings"):
        artifact("datalist", "folder", "a folder of CSV files")


# -- paths: inputs exist, outputs stay in the project ---------------------------------------------------------


def test_missing_input_paths_fail_validation_unless_an_earlier_stage_writes_them(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, """\
        name: paths
        stages:
          - stage: sample
            out: data/sample
          - stage: ingest
            source: data/sample/dicom      # written by the sample stage: fine
          - stage: ingest
            source: data/elsewhere         # nobody writes it
        """)
    lines = error_of(path).splitlines()
    assert lines == [f"stages[2] (ingest).source: {tmp_path / 'data' / 'elsewhere'} does not exist (and no earlier "
                     f"stage writes it) ({path} line 8)"]


def test_outputs_outside_the_project_are_warned_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    path = write(tmp_path, """\
        name: writes_elsewhere
        stages:
          - stage: sample
            out: ../../somewhere_else
          - stage: sample
            out: data/sample
        """)
    p = load_pipeline(path)
    assert p.warnings == [f"stages[0] (sample).out: writes to {(project / '../../somewhere_else').resolve()}, outside "
                          f"the current folder {project} ({path} line 4)"]
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "warning: stages[0] (sample).out: writes to" in result.output


def test_validate_takes_several_files_and_globs_and_reports_all(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD)
    (tmp_path / "b.yaml").write_text(GOOD.replace("epochs: 3", "epoch: 3"))
    (tmp_path / "c.yaml").write_text(GOOD.replace("name: toy", "name: toy_c"))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "*.yaml")])
    assert result.exit_code == 2
    assert f"ok {good}" in result.output and f"ok {tmp_path / 'c.yaml'}" in result.output
    assert "unknown parameter 'epoch' (did you mean 'epochs'?)" in result.output
    assert "1 of 3 pipeline file(s) have problems" in result.output


def test_transform_argument_typos_get_a_suggestion_in_the_same_pass(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("      - RandFlipd: {keys: [image], prob: 0.5, spatial_axis: 0}",
                                        "      - RandFlipd: {keyz: [image], prob: 0.5, spatial_axis: 0}")
                 .replace("    epochs: 3", "    epoch: 3"))
    lines = error_of(path).splitlines()
    assert any("unknown parameter 'epoch' (did you mean 'epochs'?)" in line for line in lines)
    assert any("train_transforms[1]: RandFlipd: unknown argument 'keyz' (did you mean 'keys'?)" in line
               for line in lines), lines


# -- nested parameters: the known names are the nested model's, not the stage's ----------------------------


@pytest.mark.parametrize(("stage", "expected"), [
    ("- stage: dataset\n    channels:\n      FLAIR: {modality: MR, SeriesDescription: flair}\n    reference: FLAIR",
     "stages[0] (dataset).channels.FLAIR.SeriesDescription: unknown parameter 'SeriesDescription' "
     "(did you mean 'series_description'?) ({p} line 5)"),
    ("- stage: dataset\n    channels:\n      FLAIR: {modality: MR, colour: red}\n    reference: FLAIR",
     "stages[0] (dataset).channels.FLAIR.colour: unknown parameter 'colour'; known: modality, series_description, "
     "protocol_name, image_type, min_slices ({p} line 5)"),
    ("- stage: dataset\n    split: {k: 5}",
     "stages[0] (dataset).split.k: unknown parameter 'k'; known: val, test, seed, stratify, folds, fold ({p} line 4)"),
    ("- stage: dataset\n    labels: {source: nifti, pattern: x, requird: false}",
     "stages[0] (dataset).labels.requird: unknown parameter 'requird' (did you mean 'required'?) ({p} line 4)"),
    ("- stage: dataset\n    labels: {source: csv, path: x.csv, colum: y}",
     "stages[0] (dataset).labels.colum: unknown parameter 'colum' (did you mean 'column'?) ({p} line 4)"),
    ("- stage: train_classifier\n    datalist: x.json\n    package: {tta_axis: [0]}",
     "stages[0] (train_classifier).package.tta_axis: unknown parameter 'tta_axis' (did you mean 'tta_axes'?) "
     "({p} line 5)"),
    ("- stage: train_segmenter\n    datalist: x.json\n    package: {zzz: 1}",
     "stages[0] (train_segmenter).package.zzz: unknown parameter 'zzz'; known: name, tta, intended_use, "
     "min_component_ml, components, min_component_fraction, segment_codes ({p} line 5)"),
])
def test_nested_parameter_errors_list_the_nested_models_names(tmp_path: Path, stage: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: t\nstages:\n  {stage}\n")
    lines = error_of(path).splitlines()
    want = expected.format(p=path)
    assert want in lines, "\n".join(lines)


def test_nested_names_resolves_dicts_lists_and_discriminated_unions() -> None:
    from medpipe.config import nested_names
    from medpipe.stages import load_stages
    from medpipe.stages.dataset import DatasetParams

    load_stages()
    known, loc = nested_names(DatasetParams, ("labels", "nifti", "patern"))
    assert loc == ("labels", "patern") and "pattern" in known and "column" not in known
    known, loc = nested_names(DatasetParams, ("labels", "csv", "colum"))
    assert "column" in known and "pattern" not in known
    known, loc = nested_names(DatasetParams, ("nope",))
    assert "channels" in known and loc == ("nope",)


# -- the datalist a training stage was given is the one later stages use ----------------------------------


def test_later_stages_take_the_datalist_the_training_stage_was_given(tmp_path: Path) -> None:
    """Issue: evaluate / predict / evaluate_classifier after a training stage given ``datalist:`` failed after
    training. The training stages give the datalist they used, so validation passes and nothing else is needed."""
    (tmp_path / "dl.json").write_text('{"train": [], "val": [], "test": []}')
    seg = write(tmp_path, f"""\
        name: seg
        stages:
          - stage: train_segmenter
            datalist: {tmp_path / "dl.json"}
          - stage: evaluate
          - stage: predict
        """)
    assert [s.kind for s in load_pipeline(seg).stages] == ["train_segmenter", "evaluate", "predict"]
    cls = write(tmp_path, f"""\
        name: cls
        stages:
          - stage: train_classifier
            datalist: {tmp_path / "dl.json"}
          - stage: evaluate_classifier
          - stage: explain
        """)
    assert len(load_pipeline(cls).stages) == 3


def test_validate_says_when_no_datalist_is_available(tmp_path: Path) -> None:
    (tmp_path / "c.pt").write_bytes(b"")
    path = write(tmp_path, f"""\
        name: seg
        stages:
          - stage: evaluate
            checkpoint: {tmp_path / "c.pt"}
          - stage: predict
            checkpoint: [{tmp_path / "c.pt"}, {tmp_path / "c.pt"}]
        """)
    lines = error_of(path).splitlines()
    assert lines == [
        "stages[0] (evaluate): needs 'datalist' (a datalist.json (train / val / test items)) but no earlier stage "
        f"gives it; set datalist, or put a dataset / medmnist stage before it ({path} line 3)",
        "stages[1] (predict): needs 'datalist' (a datalist.json (train / val / test items)) but no earlier stage "
        f"gives it; set datalist or ingest_dir, or put a dataset / medmnist stage before it ({path} line 5)",
    ]
