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
from medpipe.errors import ConfigError, StageError
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
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, ["toy_train.crash=true"])
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["stages"]["00_toy_make"]["status"] == "done"
    assert state["stages"]["01_toy_train"]["status"] == "failed"
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
