"""The runner: run directory contents, metrics, provenance, and --resume after changes and kills."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import tests.toy_stages as toy
from medpipe.cli import app
from medpipe.config import load_pipeline
from medpipe.errors import ConfigError, Interrupted, StageError
from medpipe.runner import run_pipeline
from tests.test_config import GOOD, write


def run(tmp_path: Path, overrides: list[str] | None = None, resume: bool = False, text: str = GOOD):
    toy.CALLS.clear()
    return run_pipeline(load_pipeline(write(tmp_path, text), overrides), tmp_path / "run", resume=resume)


def test_run_directory_contents(tmp_path: Path) -> None:
    summary = run(tmp_path)
    rd = tmp_path / "run"
    assert summary.ran == ["00_toy_make", "01_toy_train"] and toy.CALLS == ["toy_make", "toy_train"]
    resolved = yaml.safe_load((rd / "resolved.yaml").read_text())
    assert resolved["stages"][1]["model"] == "unet" and resolved["seed"] == 1
    prov = json.loads((rd / "provenance.json").read_text())
    assert prov["seed"] == 1 and prov["device"] == "cpu" and "torch" in prov["versions"] and prov["pipeline_sha256"]
    metrics = json.loads((rd / "metrics.json").read_text())
    assert metrics["dice"] == pytest.approx(0.6 + 0.03) and metrics["stages"]["00_toy_make"] == {"n": 4}
    assert (rd / "stages" / "00_toy_make" / "numbers.json").is_file()
    assert "01_toy_train done" in (rd / "run.log").read_text()


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    run(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(tmp_path)


def test_resume_skips_unchanged_and_reruns_from_a_change(tmp_path: Path) -> None:
    run(tmp_path)
    s = run(tmp_path, resume=True)
    assert s.ran == [] and s.skipped == ["00_toy_make", "01_toy_train"] and toy.CALLS == []
    assert s.metrics["dice"] == pytest.approx(0.63)
    s = run(tmp_path, ["toy_train.epochs=5"], resume=True)
    assert s.ran == ["01_toy_train"] and toy.CALLS == ["toy_train"]
    s = run(tmp_path, ["toy_make.n=5"], resume=True)  # an upstream change reruns everything after it
    assert s.ran == ["00_toy_make", "01_toy_train"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["dice"] == pytest.approx(1.0 + 0.03)  # epochs back to 3


def test_resume_after_a_kill_continues_from_the_killed_stage(tmp_path: Path) -> None:
    with pytest.raises(Interrupted, match="interrupted in 01_toy_train"):
        run(tmp_path, ["toy_train.crash=true"])
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["stages"]["00_toy_make"]["status"] == "done"
    assert state["stages"]["01_toy_train"]["status"] == "interrupted"
    s = run(tmp_path, resume=True)
    assert s.skipped == ["00_toy_make"] and s.ran == ["01_toy_train"]


def test_stage_error_is_wrapped_once_with_the_stage(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"^stages\[0\] \(toy_make\): asked to fail"):
        run(tmp_path, ["toy_make.fail=true"])


def test_cli_run_and_resume(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    runner = CliRunner()
    out = tmp_path / "cli_run"
    first = runner.invoke(app, ["run", str(path), "--out", str(out), "--device", "cpu"])
    assert first.exit_code == 0, first.output
    assert "01_toy_train" in first.output
    again = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, ["run", str(path), "--out", str(out), "--resume"])
    assert resumed.exit_code == 0 and "skipped" in resumed.output


def test_cpu_threads_apply_to_every_stage_and_are_restored(tmp_path: Path) -> None:
    import torch

    from medpipe.runner import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            inside = torch.get_num_threads()
        with torch_threads(None):
            untouched = torch.get_num_threads()
        assert (inside, untouched) == (1, 2)
        summary = run(tmp_path, ["cpu_threads=1"])
        assert summary.metrics["torch_threads"] == 1 and torch.get_num_threads() == 2
        assert yaml.safe_load((tmp_path / "run" / "resolved.yaml").read_text())["cpu_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_a_moved_run_folder_still_resumes(tmp_path: Path) -> None:
    """Guards: absolute paths in state.json (a copied or moved run would read the old folder, or fail)."""
    import shutil

    run(tmp_path)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "run", moved)
    state = json.loads((moved / "state.json").read_text())
    assert state["stages"]["00_toy_make"]["outputs"]["toy_numbers"] == "run:stages/00_toy_make/numbers.json"
    toy.CALLS.clear()
    summary = run_pipeline(load_pipeline(write(tmp_path, GOOD), ["toy_train.epochs=5"]), moved, resume=True)
    assert summary.skipped == ["00_toy_make"] and summary.ran == ["01_toy_train"]
    assert summary.artifacts["toy_numbers"] == str(moved / "stages" / "00_toy_make" / "numbers.json")


def test_datalist_paths_inside_the_run_are_relative(tmp_path: Path) -> None:
    import shutil

    from medpipe.data.datalist import load_datalist
    from medpipe.data.datalist_builder import write_datalist

    run_dir = tmp_path / "run"
    volume = run_dir / "stages" / "01_ingest" / "volumes" / "P1" / "a.nii.gz"
    outside = tmp_path / "elsewhere" / "label.nii.gz"
    doc = {"train": [{"image": [str(volume)], "label": str(outside), "reference_volume": str(volume)}],
           "val": [], "test": [], "ingest_dir": str(run_dir / "stages" / "01_ingest")}
    path = run_dir / "stages" / "02_dataset" / "datalist.json"
    write_datalist(path, doc, relative_within=run_dir)
    raw = json.loads(path.read_text())
    assert raw["train"][0]["image"] == ["../01_ingest/volumes/P1/a.nii.gz"] and raw["train"][0]["label"] == str(outside)
    shutil.move(run_dir, tmp_path / "copy")
    back = load_datalist(tmp_path / "copy" / "stages" / "02_dataset" / "datalist.json", check_files=False)
    assert back["train"][0]["image"] == [str(tmp_path / "copy" / "stages" / "01_ingest" / "volumes" / "P1" / "a.nii.gz")]
    assert back["ingest_dir"] == str(tmp_path / "copy" / "stages" / "01_ingest")


def test_runs_without_out_get_numbered_folders_and_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, GOOD)
    runner = CliRunner()
    for expected in ("001", "002"):
        result = runner.invoke(app, ["run", str(path), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "runs" / "toy" / expected / "state.json").is_file()
        assert (tmp_path / "runs" / "toy" / "latest").resolve() == tmp_path / "runs" / "toy" / expected
    resumed = runner.invoke(app, ["run", str(path), "--resume"])
    flat = resumed.output.replace("\n", "")
    assert resumed.exit_code == 0 and "skipped" in resumed.output and "runs/toy/002" in flat
    assert "Where to look" in resumed.output and "runs/toy/002/metrics.json" in flat


def test_overwrite_starts_afresh_and_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(path), "--out", str(out)]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    again = runner.invoke(app, ["run", str(path), "--out", str(out), "--overwrite"])
    assert again.exit_code == 0 and "skipped" not in again.output
    assert (out / "notes.txt").read_text() == "mine", "only the run's own files are replaced"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad = runner.invoke(app, ["run", str(path), "--out", str(a_file)])
    assert bad.exit_code == 2 and "is a file, not a run folder" in bad.output
