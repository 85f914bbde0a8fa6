"""Distributed training (``medpipe run FILE --nproc 2`` and the same command under ``torchrun``): real process
groups of 2 CPU processes (gloo on 127.0.0.1), tiny networks.

What is checked: every training stage (segmenter, classifier, GAN) ends with the same weights on both ranks
(the stages compare digests of every parameter and buffer across ranks and fail otherwise; the log line says
so); the run folder has the shape of a one-process run; a failure planted on one rank ends the job within a
time limit with that rank's one line; an interrupted distributed run continues with ``--resume`` from its
training snapshot and ends where an uninterrupted distributed run ends. CUDA (NCCL) runs are marked ``gpu``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: a job that neither finishes nor fails within this many seconds hangs (tiny runs take ~20 s on a loaded CPU)
JOB_TIMEOUT = 300

SEGMENTER = """\
name: ddp
seed: 3
cpu_threads: 1
device: {device}
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
    epochs: 4
    val_every: 2
    cache: memory
    snapshot_every: 0
"""

#: a planted failure, loaded into every process of a job through ``sitecustomize`` (``PYTHONPATH``): the
#: ``MEDPIPE_TEST_FAIL_CALL``-th training step of rank ``MEDPIPE_TEST_FAIL_RANK`` raises a StageError
PLANT = """\
import os

if os.environ.get("MEDPIPE_TEST_FAIL_RANK") == os.environ.get("RANK", "0"):
    from medpipe.errors import StageError
    from medpipe.training import loop

    _step = loop.SupervisedStep.__call__
    _calls = [0]

    def _failing(self, batch):
        _calls[0] += 1
        if _calls[0] == int(os.environ["MEDPIPE_TEST_FAIL_CALL"]):
            raise StageError("planted failure in training step " + str(_calls[0]))
        return _step(self, batch)

    loop.SupervisedStep.__call__ = _failing
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    plant = tmp_path / "plant"
    plant.mkdir(exist_ok=True)
    (plant / "sitecustomize.py").write_text(PLANT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDPIPE_TEST_FAIL", "TORCHELASTIC"))}
    env["PYTHONPATH"] = os.pathsep.join([str(plant), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MEDPIPE_DDP_TIMEOUT"] = "120"  # a collective or rank 0 that stalls longer than this fails the job
    env.update(extra)
    return env


def _medpipe(args: list[str], env: dict[str, str], cwd: Path, torchrun: int = 0) -> subprocess.CompletedProcess[str]:
    """``medpipe ARGS`` (or under ``torchrun --nproc-per-node N``), with a time limit: a hang fails the test."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
               "-m", "medpipe.cli", *args]
    else:
        cmd = [sys.executable, "-m", "medpipe.cli", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=JOB_TIMEOUT, check=False)


def _pipeline(tmp_path: Path, device: str = "cpu") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(SEGMENTER.format(sample=tmp_path / "sample", device=device))
    return path


def _shape(run_dir: Path) -> list[str]:
    """The run folder's file names, content-hash suffixes (which name the run folder's own path) masked."""
    return sorted(re.sub(r"_[0-9a-f]{12}(?=\.)", "_<hash>", str(p.relative_to(run_dir)))
                  for p in run_dir.rglob("*") if p.is_file())


def _history(run_dir: Path, stage: str = "03_train_segmenter") -> list[dict[str, str]]:
    with open(run_dir / "stages" / stage / "history.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def _weights(run_dir: Path, stage: str = "03_train_segmenter", name: str = "checkpoint.pt") -> dict[str, Any]:
    return dict(torch.load(run_dir / "stages" / stage / name, weights_only=True)["state_dict"])


def _identical_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "run.log").read_text().splitlines() if "identical on all 2 ranks" in line]


@pytest.fixture(scope="module")
def segmenter_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny segmenter pipeline run in one process and with ``--nproc 2``."""
    tmp = tmp_path_factory.mktemp("ddp_seg")
    pipeline = _pipeline(tmp)
    env = _env(tmp)
    single = _medpipe(["run", str(pipeline), "--out", str(tmp / "single")], env, tmp)
    assert single.returncode == 0, single.stdout + single.stderr
    ddp = _medpipe(["run", str(pipeline), "--out", str(tmp / "ddp"), "--nproc", "2"], env, tmp)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    return {"tmp": tmp, "pipeline": pipeline, "env": env, "single": tmp / "single", "ddp": tmp / "ddp",
            "stdout": ddp.stdout}


@pytest.mark.slow
def test_nproc_trains_one_model_on_two_ranks_with_identical_weights(segmenter_runs: dict[str, Any]) -> None:
    run = segmenter_runs["ddp"]
    log = (run / "run.log").read_text()
    assert "2 processes (gloo)" in log
    assert "2 train and 1 val on each of 2 ranks" in log, "each rank caches only its shard of the 4 train studies"
    assert len(_identical_lines(run)) == 1, log
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert len(_history(run)) == 4 and all(r["loss"] for r in _history(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["stages"]["03_train_segmenter"]["best_val_dice"] <= 1.0
    assert segmenter_runs["stdout"].count("03_train_segmenter: done") == 1, "one rank speaks for the job"


@pytest.mark.slow
def test_the_distributed_run_folder_has_the_shape_of_a_one_process_run(segmenter_runs: dict[str, Any]) -> None:
    assert _shape(segmenter_runs["ddp"]) == _shape(segmenter_runs["single"])
    ddp, single = _weights(segmenter_runs["ddp"]), _weights(segmenter_runs["single"])
    assert list(ddp) == list(single) and all(ddp[k].shape == single[k].shape for k in ddp)
    state = json.loads((segmenter_runs["ddp"] / "state.json").read_text())
    assert {v["status"] for v in state["stages"].values()} == {"done"}
    assert not list(segmenter_runs["ddp"].rglob("*.resume.pt")), "the snapshot is deleted when the stage is done"


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_the_job_with_its_one_line(segmenter_runs: dict[str, Any]) -> None:
    tmp = segmenter_runs["tmp"]
    env = _env(tmp, MEDPIPE_TEST_FAIL_RANK="1", MEDPIPE_TEST_FAIL_CALL="2")
    out = _medpipe(["run", str(segmenter_runs["pipeline"]), "--out", str(tmp / "failed"), "--nproc", "2"], env, tmp)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1: stages[3] (train_segmenter): planted failure in training step 2"], out.stderr
    assert "Traceback" not in out.stderr
    state = json.loads((tmp / "failed" / "state.json").read_text())
    assert state["stages"]["03_train_segmenter"]["status"] == "failed"
    assert "rank 1" in state["stages"]["03_train_segmenter"]["error"]


@pytest.mark.slow
def test_an_interrupted_distributed_run_resumes_where_it_stopped(segmenter_runs: dict[str, Any]) -> None:
    """Rank 0 fails in epoch 3 (snapshots after every epoch); ``--resume`` skips the finished stages, continues
    training after epoch 2 on both ranks and ends exactly where the uninterrupted distributed run ended."""
    tmp, pipeline = segmenter_runs["tmp"], segmenter_runs["pipeline"]
    run = tmp / "resumed"
    failing = _env(tmp, MEDPIPE_TEST_FAIL_RANK="0", MEDPIPE_TEST_FAIL_CALL="3")
    first = _medpipe(["run", str(pipeline), "--out", str(run), "--nproc", "2"], failing, tmp)
    assert first.returncode == 2 and "rank 0: " in first.stderr, first.stdout + first.stderr
    assert (run / "stages" / "03_train_segmenter" / "train.resume.pt").is_file()
    again = _medpipe(["run", str(pipeline), "--out", str(run), "--nproc", "2", "--resume"], segmenter_runs["env"], tmp)
    assert again.returncode == 0, again.stdout + again.stderr
    log = (run / "run.log").read_text()
    assert "resuming training from its snapshot after epoch 2" in log
    assert all(f"{k}: unchanged, skipped (--resume)" in log for k in ("00_sample", "01_ingest", "02_dataset"))
    assert _history(run) == _history(segmenter_runs["ddp"])
    resumed, straight = _weights(run), _weights(segmenter_runs["ddp"])
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.slow
def test_the_same_command_under_torchrun(segmenter_runs: dict[str, Any]) -> None:
    tmp = segmenter_runs["tmp"]
    out = _medpipe(["run", str(segmenter_runs["pipeline"]), "--out", str(tmp / "torchrun")], segmenter_runs["env"],
                   tmp, torchrun=2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(_identical_lines(tmp / "torchrun")) == 1
    assert _shape(tmp / "torchrun") == _shape(segmenter_runs["single"])
    assert _history(tmp / "torchrun") == _history(segmenter_runs["ddp"]), "torchrun and --nproc: the same training"


def test_nproc_inside_torchrun_is_refused_with_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    out = _medpipe(["run", str(_pipeline(tmp_path)), "--nproc", "2"], env, tmp_path)
    assert out.returncode != 0
    assert "--nproc inside a torchrun job" in out.stderr and "Traceback" not in out.stderr


# -- the classifier and the GAN ------------------------------------------------------------------------------


def _pngs(root: Path, n_train: int, n_val: int, size: int = 16) -> Path:
    """A datalist of ``size``-pixel PNGs: class 0 a bright disc on dark, class 1 a dark disc on bright."""
    from PIL import Image

    rng = np.random.default_rng(0)
    doc: dict[str, Any] = {"class_names": {"0": "bright", "1": "dark"}, "train": [], "val": [], "test": []}
    yy, xx = np.indices((size, size))
    for i in range(n_train + n_val):
        split, cls = ("train" if i < n_train else "val"), i % 2
        c = rng.uniform(size / 3, 2 * size / 3, 2)
        disc = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size / 4) ** 2
        image = np.where(disc, 200, 50) if cls == 0 else np.where(disc, 50, 200)
        path = root / "images" / f"case-{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8), mode="L").save(path)
        doc[split].append({"image": str(path), "class": cls, "patient_id": f"case-{i:02d}"})
    (root / "datalist.json").write_text(json.dumps(doc))
    return root / "datalist.json"


CLASSIFIER = """\
name: ddp-classifier
seed: 1
cpu_threads: 1
stages:
  - stage: train_classifier
    datalist: {datalist}
    model: resnet18
    stem: small
    widen_factor: 0.125
    batch_size: 4
    epochs: 2
    imbalance: weighted_sampler
    average: ema
    ema_decay: 0.8
    snapshot_every: 0
"""

GAN = """\
name: ddp-gan
seed: 1
cpu_threads: 1
stages:
  - stage: train_gan
    datalist: {datalist}
    epochs: 2
    batch_size: 4
    latent_dim: 8
    g_channels: 4
    d_channels: 4
    n_eval: 16
    fid_every: 1
    extractor_epochs: 1
    extractor_width: 0.125
    grid: 3
    snapshot_every: 0
"""


@pytest.mark.slow
@pytest.mark.parametrize(("text", "stage", "nets"), [
    (CLASSIFIER, "00_train_classifier", ["fold 0: network"]),
    (GAN, "00_train_gan", ["generator", "discriminator", "moving-average generator"]),
])
def test_the_classifier_and_the_gan_train_on_two_ranks(tmp_path: Path, text: str, stage: str,
                                                       nets: list[str]) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(text.format(datalist=_pngs(tmp_path / "data", 20, 6)))
    env = _env(tmp_path)
    single = _medpipe(["run", str(pipeline), "--out", str(tmp_path / "single")], env, tmp_path)
    assert single.returncode == 0, single.stdout + single.stderr
    out = _medpipe(["run", str(pipeline), "--out", str(tmp_path / "ddp"), "--nproc", "2"], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = _identical_lines(tmp_path / "ddp")
    assert [line.split(" INFO medpipe.stages.")[1].split(":", 1)[1].strip().split(" weights")[0] for line in lines] \
        == nets, lines
    assert _shape(tmp_path / "ddp") == _shape(tmp_path / "single")
    history = _history(tmp_path / "ddp", stage)
    assert len(history) >= 2 and history == sorted(history, key=lambda r: (r.get("fold", ""), int(r["epoch"])))


# -- CUDA ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL: one GPU per rank)")
def test_nproc_on_cuda_trains_with_nccl_one_gpu_per_rank(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, device="cuda")
    out = _medpipe(["run", str(pipeline), "--out", str(tmp_path / "run"), "--nproc", "2"], _env(tmp_path), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    log = (tmp_path / "run" / "run.log").read_text()
    assert "2 processes (nccl)" in log and "on cuda:0" in log
    assert len(_identical_lines(tmp_path / "run")) == 1


# -- the pieces, without a process group ------------------------------------------------------------------------


class _Ranks:
    """What :func:`medpipe.training.ddp.gather_shards` needs of a process group: ``all_gather`` of fixed parts."""

    def __init__(self, parts: list[list[Any]]) -> None:
        self.parts, self.world_size, self.enabled = parts, len(parts), True

    def all_gather(self, obj: Any) -> list[Any]:
        return self.parts


def test_shards_gathered_back_are_in_item_order() -> None:
    from medpipe.distributed.group import Distributed
    from medpipe.training.ddp import gather_shards, shard

    items = list(range(7))
    parts = [shard(items, Distributed(rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert gather_shards(parts[0], _Ranks(parts)) == items  # type: ignore[arg-type]


def test_validation_dice_from_cases_scored_apart_is_the_one_process_number() -> None:
    from medpipe.metrics.segmentation import combine_validation_dice, validation_case, validation_dice

    rng = np.random.default_rng(0)
    cases = []
    for i in range(5):
        truth = torch.zeros(1, 1, 6, 6, 4, dtype=torch.long)
        if i % 2 == 0:
            truth[..., 1:4, 1:4, 1:3] = 1
        prob = torch.as_tensor(rng.random((1, 2, 6, 6, 4)), dtype=torch.float32).softmax(1)
        cases.append((prob, truth))
    assert combine_validation_dice(validation_case(p, t, 2) for p, t in cases) == validation_dice(cases, 2)


def test_shuffled_batches_deal_each_global_batch_to_the_ranks() -> None:
    from medpipe.training.loop import ShuffledBatches

    x = torch.arange(11)
    ranks = [list(ShuffledBatches([x], 2, torch.Generator().manual_seed(5), rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3, "11 items, global batches of 4: 3 batches on every rank"
    assert all(len(b[0]) == 2 for r in ranks for b in r), "padded: every rank gets whole batches"
    seen = [int(v) for r in ranks for b in r for v in b[0]]
    assert sorted(set(seen)) == list(range(11)) and len(seen) == 12
    first = [int(v) for v in torch.randperm(11, generator=torch.Generator().manual_seed(5))[:4]]
    assert sorted([*ranks[0][0][0].tolist(), *ranks[1][0][0].tolist()]) == sorted(first)


def test_the_distributed_weighted_sampler_deals_one_draw_per_epoch() -> None:
    from medpipe.training.imbalance import EpochWeightedSampler

    weights = [1.0, 1.0, 1.0, 9.0, 9.0]
    samplers = [EpochWeightedSampler(weights, 5, num_replicas=2, rank=r, seed=4) for r in range(2)]
    assert [len(s) for s in samplers] == [3, 3]
    epoch0 = [list(s) for s in samplers]
    g = torch.Generator().manual_seed(4)
    drawn = torch.multinomial(torch.as_tensor(weights, dtype=torch.double), 6, replacement=True, generator=g).tolist()
    assert epoch0 == [drawn[0::2], drawn[1::2]]
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != epoch0 and [list(s) for s in samplers] == [list(s) for s in samplers]
