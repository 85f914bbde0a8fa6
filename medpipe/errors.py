"""The few exception types medpipe raises for problems with user input.

Library code raises these with context (path, series UID, field); the CLI catches
``MedpipeError`` in one place, prints one line plus a hint and exits non-zero.
Anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations

import logging

#: ``extra=`` of a log record whose problem the command line prints anyway as its one-line ``error:``: run.log
#: keeps the record, the console shows the problem once (:func:`not_reported_by_cli` filters it there)
REPORTED: dict[str, bool] = {"reported_by_cli": True}


def not_reported_by_cli(record: logging.LogRecord) -> bool:
    """Console log filter: drop the records marked :data:`REPORTED`."""
    return not getattr(record, "reported_by_cli", False)


class MedpipeError(Exception):
    """Base class: a problem the user can fix (bad input, bad config)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(MedpipeError):
    """An invalid pipeline file or option."""


class DicomError(MedpipeError):
    """A DICOM file or series that cannot be used."""


class SourceError(MedpipeError):
    """An ingest source (folder, zip, DICOMDIR) that cannot be read at all."""


class StageError(MedpipeError):
    """A pipeline stage failed."""


class CatalogError(MedpipeError):
    """An ingest catalog (``catalog.sqlite``) that is missing or cannot be read."""


class OutputError(MedpipeError):
    """An output folder that cannot be written (a file, read-only, full, locked by another run)."""


class Interrupted(MedpipeError):
    """The user interrupted the work (Ctrl-C); what was finished is kept and a re-run continues."""


class PacsError(MedpipeError):
    """A PACS (DIMSE or DICOMweb) operation that failed; the message names the cause and the fix.

    ``transient``: worth retrying after a pause (connection refused or lost, timeout, a busy PACS).
    """

    def __init__(self, message: str, *, hint: str | None = None, transient: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.transient = transient
