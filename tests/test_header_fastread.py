"""The one-pass header reader (``medpipe.dicom.fastread``) gives what pydicom's reader gives.

``read_header`` uses the fast reader for the usual file and pydicom for everything else; for every file
here both paths must give the same header record, the same rejection or the same non-image record:
pydicom's own test files (odd encodings, truncations, big endian, sequences), pydicom-data, the real
scanner data of ``../shared/data`` when present, and synthetic series in every transfer syntax the
factory writes, with sequences of undefined length (items of undefined length inside).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import medpipe.dicom.header as header_mod
from medpipe.dicom.fastread import fast_dataset
from tests.conftest import DATA
from tests.dicom_factory import (
    DeflatedExplicitVRLittleEndian,
    Geometry,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    pattern,
    write_series,
)


def _record(path: Path) -> tuple[Any, ...]:
    try:
        with open(path, "rb") as fh:
            h = header_mod.read_header(fh, path.stat().st_size)
        return ("ok", json.dumps(h.to_dict(), sort_keys=True))
    except header_mod.NonImage as exc:
        return ("non-image", str(exc), json.dumps(exc.info, sort_keys=True))
    except header_mod.Rejected as exc:
        return ("rejected", str(exc))


def _compare(files: list[Path], monkeypatch: pytest.MonkeyPatch) -> int:
    """Assert both readers agree on ``files``; return how many the fast reader took."""
    fast = 0
    for p in files:
        with open(p, "rb") as fh:
            fast += fast_dataset(fh) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quick = {p: _record(p) for p in files}
        monkeypatch.setattr(header_mod, "fast_dataset", lambda fp: None)
        slow = {p: _record(p) for p in files}
        monkeypatch.undo()
    differ = [(p.name, slow[p][:2], quick[p][:2]) for p in files if slow[p] != quick[p]]
    assert not differ, differ[:5]
    return fast


def _sequences(path: Path) -> None:
    """Add sequences of undefined length (one with an item of undefined length, one nested) to a file."""
    ds = pydicom.dcmread(path)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D0050", "SRT", "Tissue"
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    ds["ReferencedImageSequence"].value[0]["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    ds.AnatomicRegionSequence = Sequence([inner])
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", ["explicit", ImplicitVRLittleEndian, JPEGLSLossless, RLELossless, JPEG2000Lossless,
                                    DeflatedExplicitVRLittleEndian])
def test_fast_reader_agrees_on_synthetic_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syntax: str) -> None:
    kw = {} if syntax == "explicit" else {"transfer_syntax": syntax}
    shape = (40, 32, 4) if syntax == JPEG2000Lossless else (16, 12, 4)  # openjpeg needs 32 pixels or more
    w = write_series(tmp_path, pattern(shape), Geometry(), modality="MR", **kw)
    _sequences(w.files[1])
    fast = _compare(w.files, monkeypatch)
    # the fast reader takes little-endian files, not deflated ones
    assert fast == (0 if syntax == DeflatedExplicitVRLittleEndian else len(w.files))


def test_fast_reader_agrees_on_pydicom_test_files(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_ingest_reference import _pydicom_test_folders  # never pydicom's downloader: offline

    files = sorted(p for folder in _pydicom_test_folders() for p in folder.rglob("*") if p.is_file())
    fast = _compare(files, monkeypatch)
    assert fast >= 50, fast  # the common case is common


def test_fast_reader_agrees_on_real_scanner_data(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(p for p in shared_data.rglob("*") if p.is_file() and p.suffix not in (".nii", ".gz", ".json",
                                                                                          ".npz", ".md", ".txt"))
    assert _compare(files, monkeypatch) > 0
    assert DATA.is_dir()
