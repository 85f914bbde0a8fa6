"""The stage registry: one explicit dict from stage kind to its function and parameter model.

Stage modules register with :func:`stage`; :func:`load_stages` imports the modules listed in
``medpipe.stages.STAGE_MODULES`` and those third parties declare in the ``medpipe.stages``
entry-point group. Nothing is found by scanning folders or evaluating strings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from medpipe.config import StageParams

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class StageDef:
    kind: str
    fn: Callable[..., Any]
    params: type[StageParams]


REGISTRY: dict[str, StageDef] = {}


def stage(kind: str, params: type[StageParams]) -> Callable[[F], F]:
    """Register ``fn(ctx, params) -> StageResult`` as the stage ``kind`` with its parameter model."""

    def register(fn: F) -> F:
        existing = REGISTRY.get(kind)
        if existing is not None and existing.fn.__module__ != fn.__module__:
            raise RuntimeError(f"stage kind {kind!r} registered twice ({existing.fn.__module__}, {fn.__module__})")
        REGISTRY[kind] = StageDef(kind, fn, params)
        return fn

    return register


_loaded = False


def load_stages() -> dict[str, StageDef]:
    """Import the built-in stage modules (and entry-point plug-ins) once; return the registry."""
    global _loaded
    if not _loaded:
        from importlib.metadata import entry_points

        from medpipe.stages import STAGE_MODULES

        for name in STAGE_MODULES:
            importlib.import_module(name)
        for ep in entry_points(group="medpipe.stages"):
            ep.load()
        _loaded = True
    return REGISTRY
