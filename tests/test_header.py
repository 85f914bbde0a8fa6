"""``read_header``'s fast element access gives exactly what pydicom's own access gives.

:class:`medpipe.dicom.header._Values` hands raw element bytes straight to pydicom's value
converters instead of going through ``Dataset.get``. The reference here is the same code with
that shortcut switched off (every value through ``Dataset.get``, pydicom's default validation),
run over every file of pydicom's and pydicom-data's test files and of ``../shared/data``; plus
element-by-element checks of ``_Values.get`` against ``Dataset.get`` on those files and on
hand-made raw elements (implicit / big endian, padding, odd numbers, character sets).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from medpipe.dicom import header as H
from tests.conftest import DATA

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd values in test files


def _corpora() -> dict[str, Path]:
    from pydicom.data.data_manager import (
        DATA_ROOT,  # not get_testdata_files: that one downloads
    )

    found = {"pydicom": Path(DATA_ROOT) / "test_files"}
    try:
        import data_store

        found["pydicom-data"] = Path(data_store.__file__).parent / "data"
    except ImportError:
        pass
    if DATA.is_dir():
        found.update({f"shared/{d.name}": d for d in sorted(DATA.iterdir()) if d.is_dir()})
    return found


CORPORA = _corpora()


def _files(name: str) -> list[Path]:
    return sorted(p for p in CORPORA[name].rglob("*") if p.is_file())


def _read(read: Any, path: Path) -> tuple[str, Any]:
    with open(path, "rb") as fh:
        try:
            return "ok", read(fh, path.stat().st_size).to_dict()
        except H.Rejected as exc:
            return "rejected", str(exc)


def _slow(raw: RawDataElement) -> object:
    return H._SLOW


@pytest.mark.parametrize("mode", [config.WARN, config.RAISE], ids=["warn", "raise"])
@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_read_header_matches_pydicom_access(corpus: str, mode: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.settings, "reading_validation_mode", mode)
    files = _files(corpus)
    fast = [_read(H.read_header, p) for p in files]
    assert config.settings.reading_validation_mode == mode  # restored after each read
    monkeypatch.setattr(H, "_convert_raw", _slow)
    reference = [_read(H._read_header, p) for p in files]  # no validation switch either
    diffs = [(str(p), a, b) for p, a, b in zip(files, reference, fast) if a != b]
    assert not diffs, diffs[:3]
    for result in fast:  # JSON-able
        assert result[0] == "rejected" or json.loads(json.dumps(result[1])) == result[1]


def _same(a: Any, b: Any) -> bool:
    """Same type, value, str and repr (NaN equal to NaN), item by item for sequences."""
    if type(a) is not type(b) or str(a) != str(b) or repr(a) != repr(b):
        return False
    if isinstance(a, (list, tuple)) or type(a).__name__ == "MultiValue":
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def _get(get: Any, keyword: str) -> Any:
    try:
        return get(keyword)
    except Exception as exc:  # noqa: BLE001 - pydicom cannot convert it: then neither may the fast path
        return type(exc)


def _vr(elem: Any) -> str | None:
    try:
        return elem.VR or dictionary_VR(elem.tag)
    except KeyError:
        return None


def _assert_values_match(ds: Dataset, reference: Dataset) -> None:
    """``_Values(ds).get`` == ``reference.get`` for every top-level keyword element; ``ds`` is
    ``reference`` read again (the fast path only reads, pydicom's converts in place)."""
    keywords = [k for k in (keyword_for_tag(t) for t in ds._dict if _vr(ds._dict[t]) != "SQ") if k]
    vals = H._Values(ds)
    fast = {k: _get(vals.get, k) for k in keywords}  # before any Dataset.get on ds
    for k in keywords:
        expected = _get(reference.get, k)
        assert _same(fast[k], expected), (k, fast[k], expected)
        assert _same(_get(vals.get, k), expected)  # cached


def _datasets(paths: list[Path]) -> Iterator[tuple[Dataset, Dataset]]:
    """Each DICOM file read twice, as read_header reads it (bare datasets included)."""
    for p in paths:
        with open(p, "rb") as fh:
            force = fh.read(2) == b"\x08\x00"
        pair = []
        for _ in range(2):
            try:
                pair.append(pydicom.dcmread(p, stop_before_pixels=True, force=force))
            except Exception:  # noqa: BLE001 - not DICOM
                break
        if len(pair) == 2:
            yield pair[0], pair[1]


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_values_match_dataset_get(corpus: str) -> None:
    for ds, reference in _datasets(_files(corpus)):
        _assert_values_match(ds, reference)


# -- hand-made raw elements ------------------------------------------------------------------

CASES: list[tuple[str, bytes]] = [
    # keyword, raw value bytes (little endian where binary)
    ("Modality", b"MR"), ("Modality", b"CT "), ("Modality", b"CT\x00"), ("Modality", b""),
    ("ImageType", b"ORIGINAL\\PRIMARY\\M\\ND "), ("ImageType", b"A \\B\\\\"), ("ImageType", b" LEAD"),
    ("StudyDate", b"20240101"), ("AcquisitionTime", b"101010.123 "), ("AcquisitionDateTime", b"20240101101010"),
    ("PatientAge", b"042Y"),
    ("SOPInstanceUID", b"1.2.3.4\x00"), ("SOPInstanceUID", b" 1.2.3 "), ("SOPInstanceUID", b"1.2\\3.4\x00"),
    ("SliceThickness", b"1.5 "), ("SliceThickness", b" 01.50"), ("SliceThickness", b"1e3"), ("SliceThickness", b"5"),
    ("SliceThickness", b"nan"), ("SliceThickness", b"inf "), ("SliceThickness", b"abc"), ("SliceThickness", b"  "),
    ("SliceThickness", b"1_0"), ("SliceThickness", b"1,5"), ("SliceThickness", b"-0"),
    ("ImagePositionPatient", b"-1.5\\2\\3e1 "), ("ImagePositionPatient", b"1\\\\2"), ("PixelSpacing", b"0.5\\x"),
    ("SeriesNumber", b"01"), ("SeriesNumber", b"+7 "), ("SeriesNumber", b"1.0"), ("SeriesNumber", b"1.5"),
    ("SeriesNumber", b"x"), ("SeriesNumber", b" "), ("SeriesNumber", b"99999999999"), ("EchoNumbers", b"1\\2 "),
    ("Rows", struct.pack("<H", 512)), ("Rows", b"\x00\x02\x00\x01"), ("Rows", b"\x01"), ("Rows", b""),
    ("Rows", struct.pack("<H", 0)), ("ReferencePixelX0", struct.pack("<l", -3)), ("PixelPaddingValue", b"\xff\xff"),
    ("SimpleFrameList", struct.pack("<2L", 7, 2**32 - 1)),
    ("SpacingBetweenSlices", b"3.0"),
    ("RecommendedDisplayFrameRateInFloat", struct.pack("<f", 2.5)), ("RealWorldValueLUTData", struct.pack("<2d", 1.0, -2.0)),
    ("Manufacturer", b"SIEMENS "), ("Manufacturer", b"A\\B "), ("Manufacturer", b"Sch\xf6n"),
    ("Manufacturer", b"\x1b$B"), ("Manufacturer", b"tab\there"), ("Manufacturer", b"x" * 80),
    ("ConvolutionKernel", b"B30f\x00"), ("StudyDescription", b"Head^Neck "),
    ("ImageComments", b" free text \\ with backslash  "), ("PatientName", b"Doe^John "),
    ("RequestedProcedureDescription", b"plain"),
]


def _raw(keyword: str, value: bytes, implicit: bool, little: bool) -> RawDataElement:
    tag = Tag(keyword)
    vr = None if implicit else dictionary_VR(tag)
    if not little and vr in ("US", "UL", "SS", "SL", "FL", "FD"):
        fmt = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FL": "f", "FD": "d"}[vr]
        size = struct.calcsize("<" + fmt)
        n = len(value) // size
        if n and n * size == len(value):
            value = struct.pack(f">{n}{fmt}", *struct.unpack(f"<{n}{fmt}", value))
    return RawDataElement(tag, vr, len(value), value, 0, implicit, little)


@pytest.mark.parametrize("charset", [None, b"ISO_IR 100", b"ISO_IR 192", b"\\ISO 2022 IR 87", b"ISO_IR 13", b"GB18030"])
@pytest.mark.parametrize("encoding", [(False, True), (True, True), (False, False)], ids=["explicit", "implicit", "big"])
def test_values_match_on_raw_elements(encoding: tuple[bool, bool], charset: bytes | None) -> None:
    implicit, little = encoding
    for keyword, value in CASES:
        pair = []
        for _ in range(2):
            ds = Dataset()
            if charset is not None:
                ds._dict[Tag(0x00080005)] = RawDataElement(Tag(0x00080005), None if implicit else "CS",
                                                            len(charset), charset, 0, implicit, little)
            ds._dict[Tag(keyword)] = _raw(keyword, value, implicit, little)
            pair.append(ds)
        _assert_values_match(*pair)


def _as_un(raw: RawDataElement, data: dict[str, Any], **kwargs: Any) -> None:
    data["VR"] = "UN"


def _lower(raw: RawDataElement, data: dict[str, Any], **kwargs: Any) -> None:
    from pydicom.hooks import raw_element_value

    raw_element_value(raw, data, **kwargs)
    data["value"] = str(data["value"]).lower()


@pytest.mark.parametrize("hook", ["vr", "value", "kwargs", "callback"])
def test_values_follow_custom_pydicom_hooks(hook: str) -> None:
    from pydicom.hooks import (
        hooks,
        raw_element_value,
        raw_element_value_fix_separator,
        raw_element_vr,
    )

    if hook == "vr":
        hooks.register_callback("raw_element_vr", _as_un)
    elif hook == "value":
        hooks.register_callback("raw_element_value", _lower)
    elif hook == "kwargs":
        hooks.register_callback("raw_element_value", raw_element_value_fix_separator)
        hooks.register_kwargs("raw_element_kwargs", {"target_VRs": ("DS",), "separator": b":"})
    else:
        config.data_element_callback = lambda raw, **kw: raw._replace(value=raw.value.lower())
    try:
        pair = []
        for _ in range(2):
            ds = Dataset()
            ds._dict[Tag("PixelSpacing")] = _raw("PixelSpacing", b"0.5:0.25", False, True)
            ds._dict[Tag("Modality")] = _raw("Modality", b"MR", False, True)
            pair.append(ds)
        _assert_values_match(*pair)
        expected = {"vr": b"MR", "value": "mr", "kwargs": "MR", "callback": "mr"}[hook]
        assert H._Values(pair[0]).get("Modality") == expected
    finally:
        config.data_element_callback = None
        hooks.register_callback("raw_element_vr", raw_element_vr)
        hooks.register_callback("raw_element_value", raw_element_value)
        hooks.raw_element_kwargs = {}


def test_values_leave_converted_and_missing_elements_to_pydicom() -> None:
    ds = Dataset()
    ds.Modality = "MR"  # already a DataElement
    ds.add_new(0x00191010, "DS", "1.5")  # private
    vals = H._Values(ds)
    assert vals.get("Modality") == "MR" and "Modality" in vals
    assert vals.get("SeriesNumber") is None and vals.get("SeriesNumber", 3) == 3 and "SeriesNumber" not in vals


# -- to_dict -------------------------------------------------------------------------------


def _some_headers() -> list[H.InstanceHeader]:
    out = []
    for name in ("shared/dcm_qa", "shared/dcm_qa_enh", "pydicom"):
        if name not in CORPORA:
            continue
        for p in _files(name)[:40]:
            with open(p, "rb") as fh:
                try:
                    out.append(H.read_header(fh, p.stat().st_size))
                except H.Rejected:
                    pass
    return out


def test_to_dict_is_asdict_and_round_trips() -> None:
    frame = H.FrameInfo(0, [0.0, 1.0, 2.0], [1.0, 0, 0, 0, 1.0, 0], [0.5, 0.5], temporal=[1.0])
    made = H.InstanceHeader(
        "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", "P", "Doe^J", "1.3", "20240101", "", "1.4",
        3, "T1", "MR", None, 4, 4, 1, 16, 12, 0, 1, [4, 2, 2], 132, [frame, dataclasses.replace(frame, index=1)],
        {"ImageType": ["ORIGINAL", "PRIMARY"], "EchoTime": 4.5},
    )
    for h in [made, *_some_headers()]:
        d = h.to_dict()
        assert d == dataclasses.asdict(h)
        assert json.loads(json.dumps(d)) == d
        assert H.InstanceHeader.from_dict(d) == h
        assert H.InstanceHeader.from_dict(json.loads(json.dumps(d))) == h
    d = made.to_dict()  # a copy: editing it leaves the header alone
    d["frames"][0]["ipp"][0] = 99.0
    d["meta"]["EchoTime"] = 0
    d["mosaic"].append(1)
    assert made.frames[0].ipp[0] == 0.0 and made.meta["EchoTime"] == 4.5 and made.mosaic == [4, 2, 2]


@pytest.mark.parametrize("mode", [config.WARN, config.RAISE, config.IGNORE])
def test_validation_mode_restored(mode: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.settings, "reading_validation_mode", mode)
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 200)
    for path in (CORPORA["pydicom"] / "CT_small.dcm", tmp_path / "junk.dcm"):
        with open(path, "rb") as fh:
            try:
                H.read_header(fh, path.stat().st_size)
            except H.Rejected:
                pass
        assert config.settings.reading_validation_mode == mode
