"""Typed network configurations: one pydantic model per task, whose JSON form checkpoints store.

A task's *options* model (e.g. :class:`~medpipe.models.classification_config.ClassifierOptions`) lists the
architecture choices and their defaults once: the stage parameters inherit it (so a pipeline file
sets them under the same names) and the task's *config* model adds what the data decide (channels,
classes). :meth:`NetworkConfig.to_dict` is the stored form and :meth:`NetworkConfig.from_dict` reads
it back, including the dictionaries of checkpoints written before these models existed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self


class Options(BaseModel):
    """Base of the architecture options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class NetworkConfig(Options):
    """Base of a task's network configuration."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form checkpoints store."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | NetworkConfig) -> Self:
        """Check a stored (or hand-written) dictionary.

        Raises:
            ValueError: one line per problem (``field: message``).
        """
        if isinstance(doc, cls):
            return doc
        if isinstance(doc, NetworkConfig):
            doc = doc.to_dict()
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            raise ValueError(config_error(exc)) from None


def stored_config(config: type[NetworkConfig], options: type[Options], what: str, fields: dict[str, Any],
                  chosen: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a ``config`` made of the data-decided ``fields`` and the ``chosen`` architecture options
    (checked against ``options``' names, defaults filled in).

    Raises:
        TypeError: an unknown option (``unknown <what> option(s) ...``).
        ValueError: a bad value (one line per problem).
    """
    unknown = sorted(set(chosen) - set(options.model_fields))
    if unknown:
        raise TypeError(f"unknown {what} option(s) {', '.join(unknown)}")
    return config.from_dict({**fields, **chosen}).to_dict()


def config_error(exc: ValidationError) -> str:
    """A pydantic error as ``field: message`` lines (the message of a ``ValueError`` raised in a validator as is)."""
    lines = []
    for e in exc.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)
