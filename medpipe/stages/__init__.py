"""Pipeline stages, one module per kind. Listed explicitly: nothing is discovered by scanning."""

STAGE_MODULES: tuple[str, ...] = ()
