"""Run a validated pipeline: one run directory, stages in order, resume, provenance, metrics.

The run directory holds::

    resolved.yaml      the pipeline with every default filled in
    provenance.json    package versions, git commit, seed, device, command, input checksums
    state.json         per stage: its hash, status, outputs, metrics, seconds
    metrics.json       every stage's metrics (``stages``) and, merged at the top level, the latest
                       value of each metric (e.g. ``dice`` from ``evaluate``)
    run.log            the log
    stages/NN_kind/    each stage's own outputs

A stage's hash covers its kind, its parameters, the seed / determinism settings and the hash of
the stage before it, so ``--resume`` skips exactly the stages whose inputs and parameters did not
change (and everything after a changed stage runs again).

**Distributed runs** (``dist``: several processes started by torchrun or ``medpipe run --nproc N``): rank 0
is the runner above and alone writes the run folder; the other ranks *follow* (:func:`_follow`). Before each
stage rank 0 publishes what happens to it: skipped (``--resume``), run by rank 0 alone (every stage but
training), or run by every rank (stages registered ``distributed=True``: the training stages, which then
train with DistributedDataParallel), with the artifacts and the resume key the stage needs. The followers
run the distributed stages and otherwise wait (without a time limit while rank 0's heartbeat goes on; see
:mod:`medpipe.distributed.group`). Rank 0 waits for every follower to finish a distributed stage before it
records the stage done; a follower's failure fails the stage with that rank's message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from medpipe.config import Pipeline, Stage
from medpipe.distributed.group import SINGLE, Distributed, PeerFailed
from medpipe.errors import REPORTED, ConfigError, Interrupted, MedpipeError, StageError
from medpipe.inference.device import resolve_device
from medpipe.io import write_text_atomic
from medpipe.provenance import git_commit, versions
from medpipe.stage import REGISTRY, ProgressFn, RunContext, from_run_path, no_progress, to_run_path

log = logging.getLogger("medpipe")

STATE_VERSION = 1


@dataclass
class RunSummary:
    run_dir: Path
    ran: list[str]
    skipped: list[str]
    metrics: dict[str, Any]
    seconds: dict[str, float]
    artifacts: dict[str, Any]  # what the stages gave (artifact name -> path(s)), the last giver's


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np
    import torch
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)  # also makes cuDNN deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: leave torch's setting), then restore it.

    Why a knob at all (the pipeline's top-level ``cpu_threads``): torch's OpenMP threads busy-wait,
    so on a small machine whose cores another process also wants, 2 threads can run many times
    slower than 1 (measured on 2 cores: an epoch went from 0.2 s to 8 s); 1 thread is only ~20 %
    slower than 2 on an idle 2-core machine. torch is imported only when ``n`` is set.
    """
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stage_key(stage: Stage) -> str:
    return f"{stage.index:02d}_{stage.kind}"


def _stage_hash(stage: Stage, previous: str, pipeline: Pipeline) -> str:
    doc = {
        "kind": stage.kind,
        "params": stage.params.model_dump(mode="json"),
        "previous": previous,
        "seed": pipeline.config.seed,
        "deterministic": pipeline.config.deterministic,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, doc: Any) -> None:
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")


#: what a run folder holds (``clear_run`` deletes these and nothing else)
RUN_FILES = ("resolved.yaml", "provenance.json", "state.json", "metrics.json", "run.log", "report.html")
RUN_FOLDERS = ("stages", "cache")


def next_run_dir(base: Path) -> Path:
    """A new numbered run folder ``base/NNN`` (one more than the highest there), with ``base/latest`` pointing
    at it (a relative symbolic link, replaced atomically)."""
    import os

    base.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name) for p in base.iterdir() if p.is_dir() and not p.is_symlink() and p.name.isdigit()]
    n = max(numbers, default=0) + 1
    while True:
        run_dir = base / f"{n:03d}"
        try:
            run_dir.mkdir()
            break
        except FileExistsError:  # another run took this number at the same time
            n += 1
    tmp = base / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, base / "latest")
    return run_dir


def latest_run_dir(base: Path) -> Path | None:
    """The folder ``base/latest`` points at (None when there is none)."""
    link = base / "latest"
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def clear_run(run_dir: Path) -> None:
    """Delete the files of a run (``--overwrite``); other files in the folder are left alone."""
    import shutil

    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "state.json"
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return state if state.get("version") == STATE_VERSION else {}


def run_pipeline(
    pipeline: Pipeline,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress_factory: ProgressFn = no_progress,
    on_stage: Callable[[str, str], None] | None = None,
    dist: Distributed = SINGLE,
) -> RunSummary:
    """Run every stage of ``pipeline`` in ``run_dir``.

    ``overwrite``: start afresh in a folder that holds a run (its run files are deleted first).
    ``dist``: this process's place in a distributed run (see the module docstring); ranks other than 0 follow
    rank 0 and write nothing.

    Raises:
        ConfigError: the run directory holds another run and neither ``resume`` nor ``overwrite`` is set,
            or it exists and is not a run directory.
        StageError: a stage failed on user input (wrapped once, with the stage named).
        Interrupted: Ctrl-C; the stage is marked ``interrupted`` and ``resume`` continues it.
    """
    cfg = pipeline.config
    run_dir = run_dir.resolve()
    if not dist.is_main:
        return _follow(pipeline, run_dir, device or cfg.device, dist)
    state = _read_state(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run folder", hint="choose another --out")
    if state and overwrite:
        clear_run(run_dir)
        state = {}
    elif state and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run",
            hint="add --resume to continue it (unchanged stages are skipped), --overwrite to start afresh, or "
                 "leave out --out for a new numbered run folder",
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _run(pipeline, run_dir, state, device or cfg.device, progress_factory, on_stage, dist)
    finally:
        from medpipe.report.html import write_report_quietly

        write_report_quietly(run_dir)  # report.html, also after a failure or an interrupt; never raises
        log.removeHandler(handler)
        handler.close()


def _run(
    pipeline: Pipeline,
    run_dir: Path,
    state: dict[str, Any],
    requested_device: str,
    progress_factory: ProgressFn,
    on_stage: Callable[[str, str], None] | None,
    dist: Distributed = SINGLE,
) -> RunSummary:
    cfg = pipeline.config
    device, amp = _device(requested_device, dist)
    write_text_atomic(run_dir / "resolved.yaml", yaml.safe_dump(pipeline.resolved(), sort_keys=False))
    started = datetime.now(timezone.utc).isoformat()
    provenance: dict[str, Any] = {
        "pipeline": str(pipeline.path),
        "pipeline_sha256": hashlib.sha256(pipeline.path.read_bytes()).hexdigest(),
        "command": sys.argv,
        "started": started,
        "seed": cfg.seed,
        "deterministic": cfg.deterministic,
        "device": device,
        "mixed_precision": amp,
        "git_commit": git_commit(),
        "versions": versions(),
        "host": platform.node(),
        "inputs": {},
    }
    if dist.enabled:
        provenance["distributed"] = {"world_size": dist.world_size, "backend": dist.backend}
    log.info("run %s in %s on %s (seed %d)%s", cfg.name, run_dir, device, cfg.seed,
             f"; {dist.world_size} processes ({dist.backend})" if dist.enabled else "")
    _write_json(run_dir / "provenance.json", provenance)  # rewritten with inputs and timings when the run ends
    old_stages: dict[str, Any] = state.get("stages", {})
    new_state: dict[str, Any] = {"version": STATE_VERSION, "pipeline": cfg.name, "stages": {}}
    artifacts: dict[str, Any] = {}
    metrics: dict[str, Any] = {"stages": {}}
    ran: list[str] = []
    skipped: list[str] = []
    seconds: dict[str, float] = {}
    previous = ""
    for stage in pipeline.stages:
        key = _stage_key(stage)
        digest = _stage_hash(stage, previous, pipeline)
        previous = digest
        old = old_stages.get(key)
        if old and old.get("hash") == digest and old.get("status") == "done":
            artifacts.update({k: from_run_path(v, run_dir) for k, v in old.get("outputs", {}).items()})
            metrics["stages"][key] = old.get("metrics", {})
            metrics.update(old.get("metrics", {}))
            provenance["inputs"].update(old.get("inputs", {}))
            new_state["stages"][key] = old
            skipped.append(key)
            seconds[key] = float(old.get("seconds", 0.0))
            log.info("%s: unchanged, skipped (--resume)", key)
            if on_stage:
                on_stage(key, "skipped")
            dist.publish(f"stage/{stage.index}", {"action": "skip"})
            continue
        everywhere = dist.enabled and REGISTRY[stage.kind].distributed
        stage_dir = run_dir / "stages" / key
        stage_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed, cfg.deterministic)
        ctx = RunContext(run_dir, stage_dir, cfg.seed, device, amp, cfg.deterministic, dict(artifacts),
                         logging.getLogger(f"medpipe.stages.{stage.kind}"), progress_factory, resume_key=digest,
                         dist=dist if everywhere else SINGLE)
        dist.publish(f"stage/{stage.index}", {"action": "all", "artifacts": artifacts, "resume_key": digest}
                     if everywhere else {"action": "main"})
        if on_stage:
            on_stage(key, "running")
        new_state["stages"][key] = {"hash": digest, "status": "running"}
        _write_json(run_dir / "state.json", {**new_state, "stages": {**old_stages, **new_state["stages"]}})
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # expected, not actionable: tumour-free cases under pos/neg patch sampling, and
                # MONAI's own deprecation notices; they would drown the progress bars
                warnings.filterwarnings("ignore", message="Num foregrounds 0")
                warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
                with torch_threads(cfg.cpu_threads):
                    result = REGISTRY[stage.kind].fn(ctx, stage.params)
            if everywhere:  # the stage is done when every rank is done with it
                dist.wait_arrivals(f"stage/{stage.index}/finished", dist.world_size - 1)
        except MedpipeError as exc:
            peer = _peer_failure(dist, everywhere)
            new_state["stages"][key] = {"hash": digest, "status": "failed", "error": peer or str(exc)}
            _write_json(run_dir / "state.json", new_state)
            log.error("%s failed: %s", key, peer or exc, extra=REPORTED)
            if peer is not None:
                raise PeerFailed(peer) from exc
            raise StageError(f"stages[{stage.index}] ({stage.kind}): {exc}", hint=exc.hint) from exc
        except KeyboardInterrupt:
            new_state["stages"][key] = {"hash": digest, "status": "interrupted"}
            _write_json(run_dir / "state.json", new_state)
            log.warning("%s interrupted after %.0f s", key, time.perf_counter() - t0, extra=REPORTED)
            raise Interrupted(f"interrupted in {key}; what finished is kept",
                              hint="run the same command with --resume to continue (training restarts from its "
                                   "last snapshot)") from None
        except BaseException as exc:
            peer = _peer_failure(dist, everywhere)
            if peer is not None:  # e.g. a collective broken by the death of the rank that failed
                new_state["stages"][key] = {"hash": digest, "status": "failed", "error": peer}
                _write_json(run_dir / "state.json", new_state)
                log.error("%s failed: %s", key, peer, extra=REPORTED)
                raise PeerFailed(peer) from exc
            new_state["stages"][key] = {"hash": digest, "status": "failed"}
            _write_json(run_dir / "state.json", new_state)
            log.exception("%s crashed", key)
            raise
        elapsed = time.perf_counter() - t0
        undeclared = sorted(set(result.outputs) - set(REGISTRY[stage.kind].gives))
        if undeclared:  # a bug in the stage module, not a user problem
            raise RuntimeError(f"stage {stage.kind} gave {undeclared}, which it does not declare in gives=")
        seconds[key] = elapsed
        artifacts.update(result.outputs)
        metrics["stages"][key] = result.metrics
        metrics.update(result.metrics)
        provenance["inputs"].update(result.inputs)
        new_state["stages"][key] = {
            "hash": digest, "status": "done", "outputs": {k: to_run_path(v, run_dir) for k, v in result.outputs.items()},
            "metrics": result.metrics, "inputs": result.inputs, "seconds": round(elapsed, 3),
        }
        for snapshot in stage_dir.glob("*.resume.pt"):  # training snapshots are for interrupted stages only
            snapshot.unlink()
        _write_json(run_dir / "state.json", new_state)
        _write_json(run_dir / "metrics.json", metrics)
        ran.append(key)
        log.info("%s done in %.1f s", key, elapsed)
        if on_stage:
            on_stage(key, "done")
    provenance["finished"] = datetime.now(timezone.utc).isoformat()
    provenance["stage_seconds"] = seconds
    _write_json(run_dir / "metrics.json", metrics)
    _write_json(run_dir / "provenance.json", provenance)
    dist.publish("end", {"ran": ran, "skipped": skipped})
    return RunSummary(run_dir, ran, skipped, metrics, seconds, artifacts)


def _peer_failure(dist: Distributed, everywhere: bool) -> str | None:
    """In a stage every rank runs: the first failure of the job when another rank had it (``rank R: ...``)."""
    failed = dist.failure() if everywhere else None
    return failed if failed is not None and not failed.startswith(f"rank {dist.rank}:") else None


def _device(requested: str, dist: Distributed) -> tuple[str, bool]:
    """(device, mixed precision) for the run; in a distributed run on CUDA, this rank's GPU."""
    device, amp = resolve_device(requested)
    if dist.enabled and device == "cuda":
        device = dist.device
    return device, amp


def _follow(pipeline: Pipeline, run_dir: Path, requested_device: str, dist: Distributed) -> RunSummary:
    """A rank other than 0: run the stages rank 0 says every rank runs, wait through the others; write nothing.

    Raises:
        StageError: a stage failed on this rank (wrapped as on rank 0).
        Interrupted: Ctrl-C.
        PeerFailed: another rank failed first.
    """
    cfg = pipeline.config
    device, amp = _device(requested_device, dist)
    quiet = logging.getLogger("medpipe")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # rank 0 logs the run; the same lines from every rank would only repeat it
    ran: list[str] = []
    try:
        for stage in pipeline.stages:
            doc = dist.wait(f"stage/{stage.index}")
            if doc["action"] != "all":
                continue
            key = _stage_key(stage)
            seed_everything(cfg.seed, cfg.deterministic)
            ctx = RunContext(run_dir, run_dir / "stages" / key, cfg.seed, device, amp, cfg.deterministic,
                             dict(doc["artifacts"]), logging.getLogger(f"medpipe.stages.{stage.kind}"), no_progress,
                             resume_key=doc["resume_key"], dist=dist)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Num foregrounds 0")
                    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
                    with torch_threads(cfg.cpu_threads):
                        REGISTRY[stage.kind].fn(ctx, stage.params)
            except MedpipeError as exc:
                if isinstance(exc, (Interrupted, PeerFailed)):
                    raise
                raise StageError(f"stages[{stage.index}] ({stage.kind}): {exc}", hint=exc.hint) from exc
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted in {key}; what finished is kept") from None
            dist.arrive(f"stage/{stage.index}/finished")
            ran.append(key)
        dist.wait("end")
    finally:
        quiet.setLevel(level)
    return RunSummary(run_dir, ran, [], {}, {}, {})
