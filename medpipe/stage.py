"""The stage contract: what a pipeline stage is, what it gets, what it returns, what it needs and gives.

A stage is a function plus a pydantic parameter model, registered under a kind with the artifacts it
needs from earlier stages and the artifacts it gives to later ones (Kedro's declared node inputs and
outputs)::

    class EvaluateParams(StageParams):
        checkpoint: str | None = None    # set it, or let an earlier train_segmenter give it

    @stage("evaluate", EvaluateParams,
           needs=(Need("checkpoint", params=("checkpoint",)), Need("datalist", params=("datalist",))),
           gives=("evaluation",))
    def evaluate(ctx: RunContext, p: EvaluateParams) -> StageResult: ...

Artifacts are named in one table (:data:`ARTIFACTS`): a name has one meaning everywhere, so
``predictions`` cannot be a CSV in one stage and a folder in another. ``medpipe validate`` checks
the wiring before anything runs (:func:`check_wiring`): every need is set as a parameter or given
by an earlier stage. At run time a stage reads its inputs with :meth:`RunContext.input` and the
runner refuses a result that gives what the stage did not declare.

This module is the bottom layer of the pipeline machinery: it imports nothing from medpipe but
``errors`` and ``distributed`` (what a stage knows of a multi-process run: :attr:`RunContext.dist`);
stage modules import it and the library, never the runner or the config loader.

**Distributed runs** (``medpipe run --nproc N`` or under torchrun): a stage registered with
``distributed=True`` (the training stages) runs on every rank, each with ``ctx.dist`` saying which it is;
such a stage writes its outputs on rank 0 only (``ctx.dist.is_main``) and returns its result there (the
other ranks' results are ignored). Every other stage runs once, on rank 0, while the other ranks wait.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from medpipe.distributed.group import SINGLE, Distributed
from medpipe.errors import StageError

#: bounded numbers for stage parameters (every numeric parameter has bounds: a typo such as ``-1`` or
#: ``1000000`` fails validation with one line, not a run)
Size = Annotated[int, Field(ge=1, le=16384, description="a size in voxels / pixels / features")]
Axis = Annotated[int, Field(ge=0, le=2, description="a spatial axis, 0-based")]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="a random seed")]
LabelValue = Annotated[int, Field(ge=0, le=2**31 - 1, description="a label value or class index")]


@dataclass(frozen=True)
class PathRole:
    """Marks a path parameter (in ``Annotated``) as something a stage reads or writes, for ``validate``:
    an input must exist (or be written by an earlier stage), an output outside the project is warned about.
    ``schemes``: URL schemes the parameter also accepts instead of a path (``pacs``: ``pacs://NODE?...``);
    such a value is not checked as a path (the stage's own validator checks it)."""

    role: Literal["input", "output"]
    schemes: tuple[str, ...] = ()

    def is_url(self, value: str) -> bool:
        return any(value.lower().startswith(f"{s}://") for s in self.schemes)


InputPath = Annotated[str, PathRole("input")]
OutputPath = Annotated[str, PathRole("output")]
#: a path, or a PACS query ``pacs://NODE?StudyDate=...&Modality=MR`` (see :mod:`medpipe.pacs.source`)
InputSource = Annotated[str, PathRole("input", schemes=("pacs",))]


class StageParams(BaseModel):
    """Base of every stage's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# -- artifacts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A named thing one stage hands to later ones: a path (or list of paths) with one meaning."""

    name: str
    kind: Literal["file", "folder", "files"]
    meaning: str


ARTIFACTS: dict[str, Artifact] = {}


def artifact(name: str, kind: Literal["file", "folder", "files"], meaning: str) -> Artifact:
    """Declare an artifact (plug-ins may add their own); one name, one meaning."""
    existing = ARTIFACTS.get(name)
    new = Artifact(name, kind, meaning)
    if existing is not None and existing != new:
        raise RuntimeError(f"artifact {name!r} declared twice with different meanings: {existing.meaning!r} and "
                           f"{meaning!r}")
    ARTIFACTS[name] = new
    return new


artifact("sample_dir", "folder", "a generated synthetic sample (DICOM studies + labels.csv)")
artifact("ingest_dir", "folder", "an ingest output folder (catalog.sqlite, volumes, manifest.csv)")
artifact("datalist", "file", "a datalist.json (train / val / test items)")
artifact("checkpoint", "files", "a trained segmenter checkpoint, or one per fold: an ensemble")
artifact("classifier", "files", "trained classifier checkpoints (one per fold)")
artifact("generator", "file", "a trained GAN generator checkpoint")
artifact("detector", "file", "a trained detector checkpoint (RetinaNet)")
artifact("evaluation", "file", "per-case segmentation metrics (cases.csv)")
artifact("inference", "file", "the inference settings a segmenter was evaluated with (TTA, post-processing): "
                              "inference.json")
artifact("masks", "folder", "predicted masks as NIfTI on the source grids")
artifact("class_predictions", "file", "per-case classifier predictions (predictions.csv)")
artifact("explanations", "folder", "explanation maps (PNG) and explanations.csv")
artifact("model", "folder", "a model package (model.json, weights, model card): what `medpipe score` takes")
artifact("scores", "file", "per-study scoring results (scores.csv) beside the DICOM results")


@dataclass(frozen=True)
class Need:
    """An artifact a stage needs: given by an earlier stage, or by one of ``params`` when set.

    ``optional``: the stage runs without it (it then uses a default or skips a feature).
    """

    artifact: str
    params: tuple[str, ...] = ()
    optional: bool = False


# -- what a stage gets and returns ------------------------------------------------------------------


@dataclass
class StageResult:
    outputs: dict[str, Any] = field(default_factory=dict)  # artifact name -> path(s), for later stages
    metrics: dict[str, Any] = field(default_factory=dict)  # merged into metrics.json
    inputs: dict[str, str] = field(default_factory=dict)  # input file -> sha256, for provenance.json


ProgressFn = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]


def _ignore(n: int = 1) -> None:
    pass


@contextlib.contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield _ignore


@dataclass
class RunContext:
    """What a stage gets besides its parameters."""

    run_dir: Path
    stage_dir: Path
    seed: int
    device: str
    amp: bool
    deterministic: bool
    artifacts: dict[str, Any]
    log: logging.Logger
    progress_factory: ProgressFn = no_progress
    #: identifies this stage's inputs and parameters (the runner's stage hash): a training snapshot left by an
    #: interrupted run is resumed only when it was made under the same key
    resume_key: str = ""
    #: this process's place in a distributed run (:data:`~medpipe.distributed.group.SINGLE`: the only process)
    dist: Distributed = SINGLE

    def progress(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """A progress bar; the yielded function advances it by ``n``."""
        return self.progress_factory(description, total)

    def input(self, name: str, value: str | Path | None, field: str | None = None) -> Path:
        """The path parameter ``value`` when set, else the artifact ``name`` of an earlier stage.

        Raises:
            StageError: neither is there (``validate`` catches this before a run), or the path is missing.
        """
        field = field or name
        if value is not None:
            path = Path(value).expanduser().resolve()
        elif name in self.artifacts:
            path = Path(self.artifacts[name])
        else:
            meaning = ARTIFACTS[name].meaning if name in ARTIFACTS else name
            raise StageError(f"{field}: not given, and no earlier stage gives {name!r} ({meaning})")
        if not path.exists():
            raise StageError(f"{field}: {path} does not exist")
        return path

    def inputs(self, name: str, value: list[str] | None, field: str | None = None) -> list[Path]:
        """Like :meth:`input` for an artifact that is a list of files (e.g. fold checkpoints)."""
        field = field or name
        if value:
            paths = [Path(v).expanduser().resolve() for v in value]
        elif name in self.artifacts:
            got = self.artifacts[name]
            paths = [Path(v) for v in (got if isinstance(got, list) else [got])]
        else:
            meaning = ARTIFACTS[name].meaning if name in ARTIFACTS else name
            raise StageError(f"{field}: not given, and no earlier stage gives {name!r} ({meaning})")
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise StageError(f"{field}: {', '.join(missing)} does not exist")
        return paths


# -- paths inside a run folder ---------------------------------------------------------------------------


def to_run_path(value: Any, run_dir: Path) -> Any:
    """Artifact paths (a path or a list) inside ``run_dir`` as ``run:<relative path>``, so a run folder
    that is copied or moved still works (``state.json`` stores them so); other values unchanged."""
    if isinstance(value, list):
        return [to_run_path(v, run_dir) for v in value]
    if isinstance(value, str) and value.startswith(str(run_dir) + "/"):
        return "run:" + value[len(str(run_dir)) + 1:]
    return value


def from_run_path(value: Any, run_dir: Path) -> Any:
    """The inverse of :func:`to_run_path` for the folder the run is in now."""
    if isinstance(value, list):
        return [from_run_path(v, run_dir) for v in value]
    if isinstance(value, str) and value.startswith("run:"):
        return str(run_dir / value[4:])
    return value


# -- the registry -------------------------------------------------------------------------------------


StageFn = Callable[[RunContext, Any], StageResult]
F = TypeVar("F", bound=StageFn)


@dataclass(frozen=True)
class StageDef:
    kind: str
    fn: StageFn
    params: type[StageParams]
    needs: tuple[Need, ...] = ()
    gives: tuple[str, ...] = ()
    #: runs on every rank of a distributed run (training); else on rank 0 alone
    distributed: bool = False


REGISTRY: dict[str, StageDef] = {}


def stage(kind: str, params: type[StageParams], *, needs: tuple[Need, ...] = (),
          gives: tuple[str, ...] = (), distributed: bool = False) -> Callable[[F], F]:
    """Register ``fn(ctx, params) -> StageResult`` as the stage ``kind``.

    ``needs``: artifacts taken from earlier stages (or parameters); ``gives``: artifacts it returns in
    ``StageResult.outputs``. Both must name declared artifacts (:func:`artifact`), and every parameter a
    need names must exist in ``params``. ``distributed``: in a multi-process run the stage runs on every rank
    (see the module docstring), else on rank 0 alone.
    """
    for name in (*(n.artifact for n in needs), *gives):
        if name not in ARTIFACTS:
            raise RuntimeError(f"stage {kind!r}: artifact {name!r} is not declared (medpipe.stage.artifact)")
    for n in needs:
        for p in n.params:
            if p not in params.model_fields:
                raise RuntimeError(f"stage {kind!r}: need {n.artifact!r} names parameter {p!r}, which "
                                   f"{params.__name__} lacks")

    def register(fn: F) -> F:
        existing = REGISTRY.get(kind)
        if existing is not None and existing.fn.__module__ != fn.__module__:
            raise RuntimeError(f"stage kind {kind!r} registered twice ({existing.fn.__module__}, {fn.__module__})")
        REGISTRY[kind] = StageDef(kind, fn, params, tuple(needs), tuple(gives), distributed)
        return fn

    return register


def givers(name: str) -> list[str]:
    """The stage kinds that make the artifact ``name`` (for error hints): those that give it without needing it
    (a training stage passes on the datalist it was given, but cannot start a pipeline without one)."""
    return sorted(k for k, d in REGISTRY.items() if name in d.gives and name not in {n.artifact for n in d.needs})


@dataclass(frozen=True)
class WiringProblem:
    index: int  # stage index in the pipeline
    field: str | None  # the parameter to set, for the YAML line
    message: str


def check_wiring(stages: list[tuple[str, StageParams]]) -> list[WiringProblem]:
    """Check that every stage's needs are met by a parameter or an earlier stage (nothing runs).

    ``stages``: (kind, validated params) in pipeline order.
    """
    problems: list[WiringProblem] = []
    given: set[str] = set()
    for i, (kind, params) in enumerate(stages):
        d = REGISTRY[kind]
        for need in d.needs:
            if need.optional or need.artifact in given:
                continue
            if any(getattr(params, p, None) not in (None, [], "") for p in need.params):
                continue
            art = ARTIFACTS[need.artifact]
            by = givers(need.artifact)
            how = []
            if need.params:
                how.append(f"set {' or '.join(need.params)}")
            if by:
                how.append(f"put {'an' if by[0][0] in 'aeiou' else 'a'} {' / '.join(by)} stage before it")
            problems.append(WiringProblem(
                i, need.params[0] if need.params else None,
                f"needs {need.artifact!r} ({art.meaning}) but no earlier stage gives it; {', or '.join(how)}"))
        given.update(d.gives)
    return problems
