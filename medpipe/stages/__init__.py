"""Pipeline stages, one module per kind. Listed explicitly: nothing is discovered by scanning.

Each module holds a parameter model and a short function that calls the library, registered with
:func:`medpipe.stage.stage`. Third parties add stages through the ``medpipe.stages`` entry-point group.
"""

from __future__ import annotations

import importlib

from medpipe.stage import REGISTRY, StageDef

STAGE_MODULES: tuple[str, ...] = (
    "medpipe.stages.sample",
    "medpipe.stages.sample_chest_ct",
    "medpipe.stages.ingest",
    "medpipe.stages.dataset",
    "medpipe.stages.train_segmenter",
    "medpipe.stages.evaluate",
    "medpipe.stages.train_detector",
    "medpipe.stages.evaluate_detector",
    "medpipe.stages.predict",
    "medpipe.stages.medmnist",
    "medpipe.stages.train_classifier",
    "medpipe.stages.evaluate_classifier",
    "medpipe.stages.explain",
    "medpipe.stages.train_gan",
    "medpipe.stages.augment",
    "medpipe.stages.score",
)

_loaded = False


def load_stages() -> dict[str, StageDef]:
    """Import the built-in stage modules (and entry-point plug-ins) once; return the registry."""
    global _loaded
    if not _loaded:
        from importlib.metadata import entry_points

        for name in STAGE_MODULES:
            importlib.import_module(name)
        for ep in entry_points(group="medpipe.stages"):
            ep.load()
        _loaded = True
    return REGISTRY
