"""Ctrl-C during training, then ``--resume``: training continues from its snapshot and ends exactly where an
uninterrupted run ends (same history, same weights). Guards: resume restarting from epoch 1, resuming a
snapshot made under other settings, and random states not restored (the continued run would differ)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.config import load_pipeline
from medpipe.errors import Interrupted
from medpipe.runner import run_pipeline

PIPELINE = """\
name: resume
seed: 3
cpu_threads: 1
stages:
  - stage: sample
    out: {sample}
    cases: 6
    tumor_fraction: 1.0
    matrix: 48
    pixel_spacing: 4.0
    slices: 12
    slice_thickness: 10.0
  - stage: ingest
  - stage: dataset
    split: {{val: 0.34, test: 0.0}}
  - stage: train_segmenter
    channels: [4, 8]
    strides: [2]
    roi_size: [16, 16, 8]
    epochs: 6
    val_every: 2
    cache: memory
    snapshot_every: 0
"""


def _pipeline(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(sample=tmp_path / "sample") + extra)
    return path


def _interrupting(after: int) -> Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]:
    """A progress factory whose training bar raises KeyboardInterrupt after ``after`` epochs (a Ctrl-C)."""

    @contextlib.contextmanager
    def factory(description: str, total: int) -> Iterator[Callable[[int], None]]:
        done = [0]

        def advance(n: int = 1) -> None:
            if description.startswith("Training"):
                done[0] += n
                if done[0] > after:
                    raise KeyboardInterrupt

        yield advance

    return factory


def _trained(run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    stage = run_dir / "stages" / "03_train_segmenter"
    lines = (stage / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    for r in rows:
        r.pop("seconds")
    return rows, torch.load(stage / "checkpoint.pt", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["", "    average: ema\n    ema_decay: 0.8\n    select_window: 2\n"],
                         ids=["plain", "ema_window"])
def test_interrupted_training_resumes_where_it_stopped(tmp_path: Path, selection: str) -> None:
    """Also with averaged weights and a selection window: the average and the window are in the snapshot."""
    clean = tmp_path / "clean"
    run_pipeline(load_pipeline(_pipeline(tmp_path, selection)), clean, device="cpu")
    clean_rows, clean_weights = _trained(clean)

    run_dir = tmp_path / "interrupted"
    with pytest.raises(Interrupted, match="interrupted in 03_train_segmenter"):
        run_pipeline(load_pipeline(_pipeline(tmp_path, selection)), run_dir, device="cpu",
                     progress_factory=_interrupting(4))
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"]["03_train_segmenter"]["status"] == "interrupted"
    snapshot = run_dir / "stages" / "03_train_segmenter" / "train.resume.pt"
    assert snapshot.is_file()
    assert torch.load(snapshot, weights_only=True)["loop"]["epoch"] == 4

    if selection:
        saved = torch.load(snapshot, weights_only=True)
        assert "average" in saved["objects"] and len(saved["loop"]["recent"]) == 2
    summary = run_pipeline(load_pipeline(_pipeline(tmp_path, selection)), run_dir, resume=True, device="cpu")
    assert summary.skipped == ["00_sample", "01_ingest", "02_dataset"] and summary.ran == ["03_train_segmenter"]
    rows, weights = _trained(run_dir)
    assert rows == clean_rows, "the continued run's history is the uninterrupted run's"
    assert all(torch.equal(weights[k], clean_weights[k]) for k in clean_weights), "and so are the kept weights"
    assert not snapshot.exists(), "a finished stage leaves no snapshot"
    log = (run_dir / "run.log").read_text()
    assert "resuming training from its snapshot after epoch 4" in log


@pytest.mark.slow
def test_a_snapshot_made_under_other_settings_is_not_resumed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_pipeline(load_pipeline(_pipeline(tmp_path)), run_dir, device="cpu", progress_factory=_interrupting(2))
    changed = load_pipeline(_pipeline(tmp_path), ["train_segmenter.lr=0.01"])
    run_pipeline(changed, run_dir, resume=True, device="cpu")
    log = (run_dir / "run.log").read_text()
    assert "made with other settings: not resumed" in log and "resuming training" not in log


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    from tests.test_config import GOOD, write

    path = write(tmp_path, GOOD.replace("    epochs: 3\n", "    epochs: 3\n    crash: true\n"))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 130
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "interrupted in 01_toy_train; what finished is kept" in lines[-2]
    assert lines[-1].startswith("hint: run the same command with --resume")
    assert "Traceback" not in result.output
