"""Pipeline files: YAML -> typed, validated stages, with errors that name the YAML line.

A pipeline file has a few top-level keys and a list of stages::

    name: brain_tumor
    seed: 0
    device: auto            # auto | cpu | cuda
    stages:
      - stage: ingest
        source: sample_data/brain_tumor
      - stage: train_segmenter
        roi_size: [64, 64, 32]

Validation runs in two phases: the top level, then each stage's parameters against the pydantic
model its kind registered (``extra="forbid"``: a typo is an error). Every problem becomes one line
such as ``stages[3] (train_segmenter).roi_size: expected 3 items, got 2 (pipelines/x.yaml line 31)``.
MONAI transforms are named by class and built during validation, so a wrong name or argument fails
before any data is read. There is no ``eval`` and no way to run code from a pipeline file.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medpipe.errors import ConfigError
from medpipe.stage import REGISTRY, PathRole, StageParams, check_wiring


class PipelineConfig(BaseModel):
    """The top level of a pipeline file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (numpy and torch take 0 .. 2**32-1)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False
    cpu_threads: int | None = Field(
        default=None, ge=1, le=1024,
        description="torch CPU threads for every stage; None: torch's default (one per core). 1 is the safe "
                    "choice on a small shared machine (busy-waiting threads slow down many-fold when other "
                    "processes want the same cores)")
    stages: list[Any]  # each checked below: a mapping with 'stage: <kind>'


@dataclass
class Stage:
    index: int
    kind: str
    params: StageParams
    line: int | None


@dataclass
class Pipeline:
    path: Path
    config: PipelineConfig
    stages: list[Stage]
    warnings: list[str] = field(default_factory=list)  # one line each: things that may be wrong, not errors

    def resolved(self) -> dict[str, Any]:
        """The whole pipeline with every default filled in (what ``resolved.yaml`` holds)."""
        top = self.config.model_dump(mode="json", exclude={"stages"})
        top["stages"] = [{"stage": s.kind, **s.params.model_dump(mode="json")} for s in self.stages]
        return top


# -- YAML with line numbers ---------------------------------------------------------------------

#: a pipeline file is a few kB; these bounds stop hostile files before they cost memory
MAX_PIPELINE_BYTES = 1_000_000
#: values a document may expand to once YAML aliases are followed ("billion laughs" stops here)
MAX_YAML_VALUES = 100_000


def _expanded_size(node: yaml.Node, path: str = "") -> int:
    """How many values ``node`` becomes once every alias is expanded.

    Raises:
        ConfigError: the document refers to itself (an alias inside its own anchor) or expands past
            :data:`MAX_YAML_VALUES`.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("the YAML refers to itself (an alias inside its own anchor); remove the alias")
        active.add(key)
        total = 1
        if isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total += sum(size(v) for v in n.value)
        active.discard(key)
        if total > MAX_YAML_VALUES:
            raise ConfigError(f"the YAML expands to more than {MAX_YAML_VALUES} values through its aliases; "
                              "a pipeline file is a few dozen lines: write the values out")
        sizes[key] = total
        return total

    return size(node)


def _line_map(node: yaml.Node, path: tuple[Any, ...] = (), out: dict[tuple[Any, ...], int] | None = None
              ) -> dict[tuple[Any, ...], int]:
    """``path -> 1-based line`` for every key and item of a composed YAML document."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


def _line_for(lines: dict[tuple[Any, ...], int], path: tuple[Any, ...]) -> int | None:
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


# -- overrides (--set key=value) -----------------------------------------------------------------


def apply_override(raw: dict[str, Any], assignment: str) -> tuple[Any, ...]:
    """Apply ``key.path=value`` to the raw pipeline dict; return the path that was set.

    ``key.path`` is dotted; numbers index lists; a stage kind may stand for its stage when only one
    stage has that kind (``train_segmenter.epochs=2`` = ``stages.3.epochs=2``). ``value`` is YAML.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set seed=3")
    key, _, text = assignment.partition("=")
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.strip().split(".") if p]
    stages: list[Any] = raw["stages"] if isinstance(raw.get("stages"), list) else []
    if parts and isinstance(parts[0], str) and parts[0] not in raw and parts[0] != "stages":
        matches = [i for i, s in enumerate(stages) if isinstance(s, dict) and s.get("stage") == parts[0]]
        if len(matches) == 1:
            parts = ["stages", matches[0], *parts[1:]]
        elif len(matches) > 1:
            raise ConfigError(f"--set {key}: {len(matches)} stages are {parts[0]!r}; use stages.N.{'.'.join(map(str, parts[1:]))}")
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML ({exc})") from exc
    target: Any = raw
    for p in parts[:-1]:
        try:
            target = target[p]
        except (KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"--set {key}: no {p!r} in the pipeline") from exc
    try:
        target[parts[-1]] = value
    except (IndexError, TypeError) as exc:
        raise ConfigError(f"--set {key}: cannot set {parts[-1]!r}") from exc
    return tuple(parts)


# -- validation ------------------------------------------------------------------------------------


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _unwrap(annotation: Any) -> list[Any]:
    """The types an annotation may hold: ``Annotated`` and ``Optional`` removed, unions split."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _tag_of(model: type[BaseModel]) -> set[str]:
    """The literal values of a model's discriminator-like fields (``source: Literal["nifti"]``)."""
    import typing

    tags: set[str] = set()
    for info in model.model_fields.values():
        if typing.get_origin(info.annotation) is typing.Literal:
            args = typing.get_args(info.annotation)
            if len(args) == 1:
                tags.add(str(args[0]))
    return tags


def nested_names(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], tuple[Any, ...]]:
    """The parameter names of the (nested) model whose field the last element of ``loc`` names (several models of
    an undecided union: all their names), and ``loc`` without the union tags
    pydantic inserts (``labels.nifti.patern`` -> ``labels.patern``), for messages and YAML lines.

    ``channels.FLAIR.SeriesDescription`` resolves to the channel rule (through ``dict[str, ChannelRule]``),
    ``split.k`` to the split model, ``labels.nifti.x`` to the NIfTI label source of a discriminated union.
    """
    import typing

    current: list[Any] = [model]
    clean: list[Any] = []
    for part in loc[:-1]:
        models = [t for t in current if _is_model(t)]
        nxt: list[Any] = []
        tagged = False
        for m in models:
            if isinstance(part, str) and part in m.model_fields:
                nxt += _unwrap(m.model_fields[part].annotation)
        if not nxt:
            # a union tag (discriminator value or class name): pick the member, drop the tag from the path
            picked = [t for t in current if _is_model(t) and (str(part) in _tag_of(t) or part == t.__name__)]
            if picked:
                current, tagged = picked, True
        if tagged:
            continue
        if not nxt:  # a dict key or a list index: go into the value / item type
            for t in current:
                origin = typing.get_origin(t)
                args = typing.get_args(t)
                if origin is dict and len(args) == 2:
                    nxt += _unwrap(args[1])
                elif origin in (list, tuple) and args:
                    nxt += _unwrap(args[0])
        clean.append(part)
        current = nxt
        if not current:
            return list(model.model_fields), loc
    models = [t for t in current if _is_model(t)]
    if not models:
        return list(model.model_fields), loc
    return list(dict.fromkeys(name for m in models for name in m.model_fields)), (*clean, loc[-1])


def _message(err: Mapping[str, Any], known: list[str]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        close = difflib.get_close_matches(name, known, n=1)
        return f"unknown parameter {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + (
            f"; known: {', '.join(known)}" if not close and known else "")
    if kind == "missing":
        return "missing (required)"
    if kind.startswith("value_error"):
        return msg.removeprefix("Value error, ")
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 60 else type(got).__name__
    return f"{msg[0].lower()}{msg[1:]}, got {shown}"


def _read_bounded(path: Path) -> bytes:
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder; give a pipeline .yaml file")
        with path.open("rb") as fh:
            data = fh.read(MAX_PIPELINE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read pipeline file ({exc.strerror or exc})") from exc
    if len(data) > MAX_PIPELINE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_PIPELINE_BYTES // 1000} kB; not a pipeline file")
    return data


def load_pipeline(path: Path | str, overrides: list[str] | None = None) -> Pipeline:
    """Read and fully validate a pipeline file. Nothing runs.

    Raises:
        ConfigError: with one line per problem, each naming the stage, field and YAML line.
    """
    from medpipe.stages import load_stages

    path = Path(path)
    raw_bytes = _read_bounded(path)
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw_bytes[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text (byte {exc.start}); save the pipeline file as UTF-8"
                          ) from None
    try:
        node = yaml.compose(text)
        if node is not None:
            try:
                _expanded_size(node)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise ConfigError(f"{path}{at}: not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline file is a mapping with 'name' and 'stages'")
    lines = _line_map(node) if node is not None else {}
    overridden: set[tuple[Any, ...]] = set()
    for assignment in overrides or []:
        overridden.add(apply_override(raw, assignment))

    def where(p: tuple[Any, ...]) -> str:
        if any(p[: len(o)] == o for o in overridden):
            return "(--set)"
        line = _line_for(lines, p)
        return f"({path} line {line})" if line else f"({path})"

    errors: list[str] = []
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            if loc[:1] == ("stages",) and len(loc) > 1:
                continue  # reported per stage below
            errors.append(f"{_field_path(loc)}: {_message(err, list(PipelineConfig.model_fields))} {where(loc)}")
        if errors:
            raise ConfigError("\n".join(errors)) from None
        raise  # pragma: no cover - only stage errors, which cannot come from the top-level model

    load_stages()
    stages: list[Stage] = []
    for i, item in enumerate(config.stages):
        base = ("stages", i)
        if not isinstance(item, dict) or "stage" not in item:
            errors.append(f"stages[{i}]: each stage needs 'stage: <kind>' {where(base)}")
            continue
        kind = str(item["stage"])
        if kind not in REGISTRY:
            close = difflib.get_close_matches(kind, list(REGISTRY), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(REGISTRY))}"
            errors.append(f"stages[{i}]: unknown stage kind {kind!r} ({hint}) {where(base + ('stage',))}")
            continue
        model = REGISTRY[kind].params
        params = {k: v for k, v in item.items() if k != "stage"}
        try:
            stages.append(Stage(i, kind, model.model_validate(params), _line_for(lines, base)))
        except ValidationError as exc:
            for err in exc.errors():
                known, loc = nested_names(model, tuple(err["loc"]))
                errors.append(f"stages[{i}] ({kind}).{_field_path(loc)}: "
                              f"{_message(err, known)} {where(base + loc)}")
    if not stages and not errors:
        errors.append(f"stages: a pipeline needs at least one stage {where(('stages',))}")
    warnings: list[str] = []
    if not errors:
        for i, field_loc, message, fatal in _check_paths(stages):
            st = stages[i]
            text = f"stages[{st.index}] ({st.kind}).{_field_path(field_loc)}: {message}"
            (errors if fatal else warnings).append(f"{text} {where(('stages', st.index) + field_loc)}")
        for problem in check_wiring([(s.kind, s.params) for s in stages]):
            st = stages[problem.index]
            loc = ("stages", st.index) + ((problem.field,) if problem.field and problem.field in
                                          config.stages[st.index] else ("stage",))
            errors.append(f"stages[{st.index}] ({st.kind}): {problem.message} {where(loc)}")
    if errors:
        raise ConfigError("\n".join(errors))
    return Pipeline(path, config, stages, warnings)


# -- paths: inputs must exist, outputs should stay in the project -------------------------------------------


def _role(annotation: Any) -> PathRole | None:
    """The :class:`PathRole` the annotation (or one inside a union / list) carries, if any."""
    import typing

    if typing.get_origin(annotation) is typing.Annotated:
        for m in annotation.__metadata__:
            if isinstance(m, PathRole):
                return m
    for arg in typing.get_args(annotation):
        role = _role(arg)
        if role:
            return role
    return None


def _paths(params: BaseModel, loc: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str, str]]:
    """``(field location, role, value)`` of every path parameter, nested models included (URLs the parameter
    accepts instead of a path left out)."""
    out: list[tuple[tuple[Any, ...], str, str]] = []
    for name, info in type(params).model_fields.items():
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            out += _paths(value, loc + (name,))
            continue
        role = next((m for m in info.metadata if isinstance(m, PathRole)), None) or _role(info.annotation)
        if role is None or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        for k, v in enumerate(values):
            if not role.is_url(str(v)):
                out.append((loc + ((name, k) if isinstance(value, list) else (name,)), role.role, str(v)))
    return out


def _check_paths(stages: list[Stage]) -> list[tuple[int, tuple[Any, ...], str, bool]]:
    """``(stage, field, message, fatal)``: inputs that do not exist and that no earlier stage writes (fatal);
    outputs outside the current folder (a warning: a colleague's pipeline file should not write elsewhere
    unnoticed). Relative paths are taken from the current folder, as the stages take them.
    """
    cwd = Path.cwd().resolve()
    written: list[Path] = []
    problems: list[tuple[int, tuple[Any, ...], str, bool]] = []
    for i, st in enumerate(stages):
        for loc, role, value in _paths(st.params):
            path = Path(value).expanduser().resolve()
            if role == "input":
                made = any(path == w or w in path.parents for w in written)
                if not made and not path.exists():
                    problems.append((i, loc, f"{path} does not exist (and no earlier stage writes it)", True))
            else:
                written.append(path)
                if path != cwd and cwd not in path.parents:
                    problems.append((i, loc, f"writes to {path}, outside the current folder {cwd}", False))
    return problems

