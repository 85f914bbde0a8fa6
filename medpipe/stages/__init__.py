"""Pipeline stages, one module per kind. Listed explicitly: nothing is discovered by scanning."""

STAGE_MODULES: tuple[str, ...] = (
    "medpipe.stages.sample",
    "medpipe.stages.ingest",
    "medpipe.stages.dataset",
    "medpipe.stages.train_segmenter",
    "medpipe.stages.evaluate",
    "medpipe.stages.predict",
    "medpipe.stages.medmnist",
    "medpipe.stages.train_classifier",
    "medpipe.stages.evaluate_classifier",
    "medpipe.stages.explain",
    "medpipe.stages.train_gan",
    "medpipe.stages.augment",
)
