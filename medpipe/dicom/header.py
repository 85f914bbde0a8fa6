"""Read one DICOM file's header into a compact, JSON-serialisable record.

The record holds everything that series grouping, geometry checks and volume assembly need,
one :class:`FrameInfo` per 2D frame (a classic file has one, an enhanced multi-frame object one
per frame, a Siemens mosaic one per tile). Headers are read without pixel data; for native
(uncompressed) transfer syntaxes the file offset of the pixel data is recorded so the volume
builder can read the pixels directly.

A file that cannot be used raises :class:`Rejected` with a one-line reason. That includes every
header that would make a reader allocate more than the file can hold or compute with numbers no
scanner writes (:data:`LIMITS`): image sizes larger than the pixel data, a pixel data element shorter
than Rows x Columns x Frames (never read past its end), BitsAllocated other than 8 / 16 / 32,
non-finite or absurd rescale values, positions and spacings, and deflated datasets that would expand
beyond :func:`medpipe.io.expansion_problem`'s limit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import pydicom
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.hooks import hooks, raw_element_value, raw_element_vr
from pydicom.uid import UID
from pydicom.values import converters as _converters

from medpipe.dicom.fastread import fast_dataset

#: SOP classes that hold no image to turn into a volume (catalogued, explained, not converted).
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "DICOM SEG (segmentation)",
    "1.2.840.10008.5.1.4.1.1.66.7": "DICOM SEG (label map segmentation)",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.1.3.10": "DICOMDIR media directory",
}

NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
DEFLATED = "1.2.840.10008.1.2.1.99"

#: what a usable image header may declare (beyond these a file is rejected with the reason)
MAX_FILE_PIXEL_BYTES = 4 << 30  # decoded pixel data of one file
MAX_FRAMES_PER_FILE = 100_000  # frames of one enhanced object, tiles of one mosaic
MAX_COORDINATE_MM = 1e6  # |ImagePositionPatient| (a kilometre: no patient is larger)
MIN_SPACING_MM, MAX_SPACING_MM = 1e-6, 1e5  # PixelSpacing, slice spacing of a mosaic
MAX_RESCALE = 1e20  # |RescaleSlope|, |RescaleIntercept| (keeps every value finite in float32)
#: encapsulated (compressed) pixel data may decode to at most this many times its size above
#: medpipe.io.EXPANSION_FREE_BYTES (image codecs compress blank frames far better than deflate)
MAX_CODEC_RATIO = 1000
LIMITS = {
    "MAX_FILE_PIXEL_BYTES": MAX_FILE_PIXEL_BYTES, "MAX_FRAMES_PER_FILE": MAX_FRAMES_PER_FILE,
    "MAX_COORDINATE_MM": MAX_COORDINATE_MM, "MIN_SPACING_MM": MIN_SPACING_MM, "MAX_SPACING_MM": MAX_SPACING_MM,
    "MAX_RESCALE": MAX_RESCALE, "MAX_CODEC_RATIO": MAX_CODEC_RATIO,
}

#: DICOM keywords copied into each volume's JSON sidecar (no patient names or birth dates).
SIDECAR_KEYWORDS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "MagneticFieldStrength",
    "BodyPartExamined", "PatientPosition", "StudyDescription", "SeriesDescription", "ProtocolName",
    "SeriesNumber", "StudyDate", "SeriesDate", "AcquisitionDate", "ImageType", "SliceThickness",
    "SpacingBetweenSlices", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "ScanningSequence",
    "SequenceVariant", "SequenceName", "MRAcquisitionType", "KVP", "ConvolutionKernel", "ExposureTime",
    "XRayTubeCurrent", "ContrastBolusAgent", "PhotometricInterpretation", "BitsStored",
    "PixelRepresentation", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "AccessionNumber", "RescaleType",
)


#: series key used when Series Instance UID is empty, and the attributes it is made of
SYNTHETIC_SERIES_PREFIX = "no-series-uid-"
MISSING_UID_SERIES_KEYS = (
    "PatientID", "StudyInstanceUID", "StudyDate", "FrameOfReferenceUID", "Modality", "SeriesNumber",
    "SeriesDescription", "SeriesTime", "ProtocolName",
)


class Rejected(Exception):
    """A file that cannot be used; ``str(exc)`` is the one-line reason."""


class NonImage(Rejected):
    """A valid DICOM object that is not an image (SEG, SR, RT...): not a volume, but catalogued.

    ``info`` holds what later stages need to find it: UIDs, kind and the series it references.
    """

    def __init__(self, reason: str, info: dict[str, Any]) -> None:
        super().__init__(reason)
        self.info = info


def _referenced_series(ds: Dataset) -> list[str]:
    """Series Instance UIDs a SEG / SR / RT object refers to (ReferencedSeriesSequence, RT references)."""
    found: list[str] = []
    for item in ds.get("ReferencedSeriesSequence") or []:
        found.append(str(item.get("SeriesInstanceUID") or ""))
    for frame in ds.get("ReferencedFrameOfReferenceSequence") or []:
        for study in frame.get("RTReferencedStudySequence") or []:
            for series in study.get("RTReferencedSeriesSequence") or []:
                found.append(str(series.get("SeriesInstanceUID") or ""))
    for item in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in item.get("ReferencedSeriesSequence") or []:
            found.append(str(series.get("SeriesInstanceUID") or ""))
    return sorted({uid for uid in found if uid})


@dataclass
class FrameInfo:
    """Geometry and value mapping of one 2D frame."""

    index: int  # frame number in the file (0 for classic files), or mosaic tile number
    ipp: list[float]  # ImagePositionPatient (LPS, centre of the first pixel)
    iop: list[float]  # ImageOrientationPatient
    spacing: list[float]  # PixelSpacing [row spacing, column spacing]
    slope: float = 1.0
    intercept: float = 0.0
    echo: str = ""  # echo number / echo time, used to split multi-echo series
    image_type: str = ""  # frame type (enhanced) or ImageType
    temporal: list[float] = field(default_factory=list)  # sort key for frames at one position


@dataclass
class InstanceHeader:
    """What medpipe keeps of one DICOM file's header."""

    sop_uid: str
    sop_class: str
    transfer_syntax: str
    patient_id: str
    patient_name: str
    study_uid: str
    study_date: str
    study_description: str
    series_uid: str
    series_number: int | None
    series_description: str
    modality: str
    instance_number: int | None
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    n_frames: int
    mosaic: list[int] | None  # [tiles, tile rows, tile columns] for a Siemens mosaic
    pixel_offset: int | None  # file offset of native pixel bytes (None when encapsulated)
    frames: list[FrameInfo]
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON, as ``dataclasses.asdict`` gives but without its (slow) deep copy."""
        d = _fields(self)
        d["frames"] = [_fields(f) for f in self.frames]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstanceHeader:
        d = dict(d)
        d["frames"] = [FrameInfo(**f) for f in d["frames"]]
        return cls(**d)


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass instance's fields, with list and dict values copied (one level)."""
    return {k: v.copy() if isinstance(v, (list, dict)) else v for k, v in vars(obj).items()}


# -- fast element access -------------------------------------------------------------------

#: VRs whose raw bytes :class:`_Values` hands straight to pydicom's value converter. The text VRs
#: among them depend on the Specific Character Set: those go that way only when their bytes are
#: printable ASCII (or NUL), which every character set pydicom supports decodes alike. Not here:
#: PN (a PersonName keeps its encodings), SQ, bytes VRs, ambiguous ("US or SS") VRs, and SS / SL
#: (pydicom's hook rewrites signed LUT descriptors).
_DIRECT_VRS = frozenset(
    {"AS", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UL", "US", "UT"}
)
_CHARSET_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_PLAIN_ASCII = bytes(range(0x20, 0x7F)) + b"\x00"
_SLOW = object()  # "ask pydicom": the value is not one _convert_raw handles
_tag = functools.lru_cache(maxsize=None)(tag_for_keyword)  # keyword -> tag (or None)
#: pydicom's value converters by VR: a function, or (convert_numbers, struct format) for binary VRs
_CONVERTERS: dict[str, Any] = _converters  # type: ignore[assignment]


def _convert_raw(raw: RawDataElement) -> Any:
    """The value of a raw (not yet converted) element as pydicom converts it, or ``_SLOW``."""
    vr = raw.VR
    if vr is None:  # implicit VR
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return _SLOW
    value = raw.value
    if vr not in _DIRECT_VRS or type(value) is not bytes:  # also deferred reads (value None)
        return _SLOW
    if raw.length == 0:
        return empty_value_for_VR(vr)
    converter = _CONVERTERS[vr]
    try:
        if isinstance(converter, tuple):  # binary numbers: (convert_numbers, struct format)
            return converter[0](value, raw.is_little_endian, converter[1])
        if vr not in _CHARSET_VRS:
            return converter(value, raw.is_little_endian)
        if value.translate(None, _PLAIN_ASCII):  # other bytes: decode with the dataset's charset
            return _SLOW
        return converter(value, None, vr)
    except Exception:  # noqa: BLE001 - pydicom retries other VRs or raises: let it do so
        return _SLOW


class _Values:
    """Top-level element values of a dataset, as ``ds.get(keyword)`` returns them, only faster.

    ``Dataset.get`` converts a raw element through keyword lookup, hooks, the character set and
    a new DataElement (~25 us per call, ~80 calls per file). This calls pydicom's own converter
    for the element's VR directly, and caches the result (``ds`` is left as it is). Anything
    else (private or unknown tags, sequences, PN, non-ASCII text, deferred or already converted
    elements, values pydicom's converter rejects, custom pydicom hooks) goes to ``ds.get``.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self._elems = ds._dict
        self._cache: dict[str, Any] = {}
        self._direct = (  # pydicom's default conversion (hooks' kwargs go to the callbacks only)
            config.data_element_callback is None
            and hooks.raw_element_vr is raw_element_vr and hooks.raw_element_value is raw_element_value
        )

    def __contains__(self, keyword: str) -> bool:
        return _tag(keyword) in self._elems

    def numbers(self, keyword: str) -> Any:
        """A decimal string (DS) attribute as a list of floats, parsed straight from its bytes (the
        values ``float(v) for v in ds.get(keyword)`` gives, without pydicom's DSfloat objects); anything
        unusual (another VR, padding, empty values) goes through :meth:`get`. None when absent."""
        raw = self._elems.get(_tag(keyword))  # type: ignore[call-overload]
        if raw is None:
            return None
        if self._direct and type(raw) is RawDataElement and raw.VR in ("DS", None) and type(raw.value) is bytes:
            try:
                return [float(v) for v in raw.value.split(b"\\")]
            except ValueError:
                pass
        return self.get(keyword)

    def number(self, keyword: str) -> Any:
        """A single-valued DS attribute as a float (see :meth:`numbers`), or what :meth:`get` returns."""
        values = self.numbers(keyword)
        if isinstance(values, list) and len(values) == 1 and type(values[0]) is float:
            return values[0]
        return values

    def get(self, keyword: str, default: Any = None) -> Any:
        if keyword in self._cache:
            return self._cache[keyword]
        raw = self._elems.get(_tag(keyword))  # type: ignore[call-overload]  # int keys work
        if raw is None:
            return default
        value = _SLOW
        if self._direct and type(raw) is RawDataElement:
            key = _raw_key(raw)
            value = _CONVERTED.get(key, _MISSING)
            if value is _MISSING:
                value = _convert_raw(raw)
                _remember(_CONVERTED, key, value)
        if value is _SLOW:
            value = self.ds.get(keyword, default)
        self._cache[keyword] = value
        return value

    def json(self, keyword: str) -> Any:
        """``_json_value(get(keyword))``, or ``ABSENT`` for an absent or empty value; remembered across
        files by the element's bytes (most sidecar attributes repeat from file to file of an export)."""
        raw = self._elems.get(_tag(keyword))  # type: ignore[call-overload]
        if raw is None:
            return ABSENT
        key = _raw_key(raw) if self._direct and type(raw) is RawDataElement else None
        if key is not None:
            hit = _JSON.get(key, _MISSING)
            if hit is not _MISSING:
                return list(hit) if isinstance(hit, list) else hit
        v = self.get(keyword)
        out = ABSENT if v is None or (isinstance(v, str) and v == "") else _json_value(v)
        direct = _CONVERTED.get(key, _MISSING) if key is not None else _MISSING
        if direct is not _MISSING and direct is not _SLOW:  # converted from the bytes alone
            _remember(_JSON, key, out)  # type: ignore[arg-type]
        return list(out) if isinstance(out, list) else out


_MISSING = object()
ABSENT = object()  # what _Values.json returns for an absent or empty value
#: element conversions remembered across the files a process reads, by (VR or tag, bytes, endianness);
#: a conversion depends on nothing else (text that needs the character set is never remembered)
_CONVERTED: dict[tuple[Any, ...], Any] = {}
_JSON: dict[tuple[Any, ...], Any] = {}
_REMEMBER_MAX = 4096


def _raw_key(raw: RawDataElement) -> tuple[Any, ...]:
    return (raw.VR if raw.VR is not None else int(raw.tag), raw.value, raw.is_little_endian)


def _remember(cache: dict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any) -> None:
    if len(cache) >= _REMEMBER_MAX:
        cache.clear()
    cache[key] = value


def _json_value(value: Any) -> Any:
    """A pydicom element value as plain JSON (numbers, strings, lists)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_json_value(v) for v in value]
    if isinstance(value, (int, float)):
        return value if not (isinstance(value, float) and not math.isfinite(value)) else None
    if hasattr(value, "real") and not isinstance(value, str):  # DSfloat / IS
        return float(value) if not float(value).is_integer() or "." in str(value) else int(value)
    return str(value)


def _floats(value: Any, n: int, what: str) -> list[float]:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise Rejected(f"unreadable {what}: {value!r}") from exc
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise Rejected(f"invalid {what}: {value!r}")
    return out


def _int_or_none(value: Any) -> int | None:
    """An integer attribute, or None when absent, unreadable or beyond 64 bits (SQLite's INTEGER)."""
    try:
        n = int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    return n if n is None or -(1 << 63) <= n < (1 << 63) else None


def _float_or(value: Any, default: float) -> float:
    """A finite float attribute, or ``default`` when absent, unreadable, NaN or infinite."""
    try:
        x = float(value) if value not in (None, "") else default
    except (TypeError, ValueError, OverflowError):
        return default
    return x if math.isfinite(x) else default


def _rescale(value: Any, default: float, what: str) -> float:
    """RescaleSlope / RescaleIntercept: ``default`` when absent or unreadable; NaN / inf / absurd: rejected."""
    try:
        x = float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default
    except OverflowError:
        x = math.inf
    if not math.isfinite(x) or abs(x) > MAX_RESCALE:
        raise Rejected(f"{what} {value!r} is not a usable number (finite, |value| <= {MAX_RESCALE:g})")
    return x


def _image_int(vals: _Values, keyword: str, default: int | None = None) -> int:
    """An integer of the image pixel module (``default`` when absent or empty), or a rejection naming it."""
    value = vals.get(keyword)
    if value in (None, "") and default is not None:
        return default
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        raise Rejected(f"{keyword} {value!r} is not a single number")
    n = _int_or_none(value)
    if n is None:
        raise Rejected(f"{keyword} {value!r} is not a number")
    return n


def _image_type(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "\\".join(str(v) for v in value)


def _temporal_key(vals: _Values) -> list[float]:
    """Sort key for several frames at one position: time index, trigger time, acquisition time, numbers."""
    from_time = 0.0
    t = vals.get("AcquisitionTime") or vals.get("ContentTime") or ""
    if t:
        try:
            s = str(t)
            from_time = int(s[0:2]) * 3600 + int(s[2:4] or 0) * 60 + float(s[4:] or 0)
        except ValueError:
            from_time = 0.0
    return [
        _float_or(vals.get("TemporalPositionIdentifier"), 0.0),
        _float_or(vals.get("TriggerTime"), 0.0),
        _float_or(vals.get("DiffusionBValue"), 0.0),
        from_time,
        _float_or(vals.get("AcquisitionNumber"), 0.0),
        _float_or(vals.get("InstanceNumber"), 0.0),
    ]


def _echo_key(vals: _Values) -> str:
    number = vals.get("EchoNumbers")
    te = vals.get("EchoTime")
    parts = []
    if number not in (None, ""):
        parts.append(f"e{_json_value(number)}")
    if te not in (None, ""):
        parts.append(f"te{_float_or(te, 0.0):.3f}")
    return "_".join(parts)


def _pixel_data_offset(fp: IO[bytes], ts: UID, size: int, expected: int, n_frames: int) -> int | None:
    """Check the pixel data element after the header; return the offset of native pixel bytes.

    ``fp`` is positioned where ``dcmread(stop_before_pixels=True)`` stopped: at a pixel data tag,
    or at the end of the file when there is none. ``expected``: the bytes of native pixel data the
    header declares (Rows x Columns x samples x frames x bytes per sample).
    """
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        raise Rejected("no pixel data")
    end = ">" if ts == "1.2.840.10008.1.2.2" else "<"  # Explicit VR Big Endian (retired, still met)
    group, elem = struct.unpack(f"{end}HH", head[:4])
    if (group, elem) not in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)):
        raise Rejected("no pixel data")
    if (group, elem) != (0x7FE0, 0x0010):
        raise Rejected("float pixel data (FloatPixelData) is not supported")
    implicit = str(ts) == "1.2.840.10008.1.2"
    if implicit:
        (length,) = struct.unpack(f"{end}I", head[4:8])
        offset = start + 8
    else:
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"UN", b"OD", b"OF", b"OL", b"OV", b"UT", b"UC", b"UR", b"SV", b"UV"):
            (length,) = struct.unpack(f"{end}I", head[8:12])
            offset = start + 12
        else:
            (length,) = struct.unpack(f"{end}H", head[6:8])
            offset = start + 8
    if length == 0xFFFFFFFF:  # encapsulated (compressed) fragments: decoded later by pydicom
        if size - offset < 16:
            raise Rejected("truncated: encapsulated pixel data is empty")
        fp.seek(offset)
        _check_fragments(fp, end, expected, n_frames)
        return None
    if size - offset < min(length, expected):
        raise Rejected(f"truncated: pixel data has {size - offset} of {min(length, expected)} bytes")
    if length < expected:  # another element follows: reading `expected` bytes would read it as pixels
        raise Rejected(f"pixel data element holds {length} bytes but Rows x Columns x Frames needs {expected}: "
                       "corrupt or inconsistent header")
    if str(ts) not in NATIVE_SYNTAXES:
        return None
    return offset


def _check_fragments(fp: IO[bytes], end: str, expected: int, n_frames: int) -> None:
    """Walk the items of encapsulated pixel data (without reading them): enough fragments for the
    frames, a sequence delimiter, and a plausible compression ratio for the size the header declares."""
    from medpipe.io import EXPANSION_FREE_BYTES

    n_items = encoded = 0
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise Rejected("truncated: encapsulated pixel data ends without its sequence delimiter")
        group, elem, length = struct.unpack(f"{end}HHI", head)
        if (group, elem) == (0xFFFE, 0xE0DD):
            break
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise Rejected(f"corrupt encapsulated pixel data (item tag ({group:04X},{elem:04X}))")
        if n_items:  # the first item is the basic offset table
            encoded += length
        n_items += 1
        fp.seek(length, 1)
    fragments = n_items - 1
    if fragments < max(n_frames, 1):
        raise Rejected(f"encapsulated pixel data has {fragments} fragment(s) for {n_frames} frame(s): "
                       "truncated or corrupt")
    if expected > EXPANSION_FREE_BYTES and expected > MAX_CODEC_RATIO * max(encoded, 1):
        raise Rejected(f"header declares {expected} bytes of pixels from {encoded} compressed bytes "
                       f"({expected / max(encoded, 1):.0f}:1, more than {MAX_CODEC_RATIO}:1): refused")


def _check_decodable(ts: UID) -> None:
    if ts in NATIVE_SYNTAXES or ts in {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}:
        return
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise Rejected(f"unsupported transfer syntax {ts} ({ts.name})") from exc
    if not decoder.is_available:
        raise Rejected(f"no decoder installed for transfer syntax {ts.name}; install pylibjpeg plugins")


def _mosaic_frames(ds: Dataset, base: FrameInfo) -> tuple[list[FrameInfo], list[int]]:
    """Siemens mosaic: one FrameInfo per tile, positions corrected, along the CSA slice normal."""
    import numpy as np
    from nibabel.nicom import csareader

    try:
        csa = csareader.get_csa_header(ds, "image")
    except Exception as exc:  # malformed private header
        raise Rejected(f"Siemens mosaic with unreadable CSA header: {exc}") from exc
    n_tiles = _int_or_none(ds.get((0x0019, 0x100A)).value if (0x0019, 0x100A) in ds else None)
    if n_tiles is None and csa is not None:
        n_tiles = csareader.get_n_mosaic(csa)
    if not n_tiles or n_tiles < 0:
        raise Rejected("Siemens mosaic without NumberOfImagesInMosaic")
    if n_tiles > min(MAX_FRAMES_PER_FILE, int(ds.Rows) * int(ds.Columns)):
        raise Rejected(f"Siemens mosaic declares {n_tiles} images in a {ds.Rows}x{ds.Columns} mosaic")
    grid = math.ceil(math.sqrt(n_tiles))
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows % grid or cols % grid:
        raise Rejected(f"Siemens mosaic {rows}x{cols} does not divide into a {grid}x{grid} grid")
    t_rows, t_cols = rows // grid, cols // grid
    normal = csareader.get_slice_normal(csa) if csa is not None else None
    from medpipe.dicom.geometry import slice_normal

    n_iop = slice_normal(base.iop)
    if normal is None:
        normal = n_iop
    normal = np.asarray(normal, float)
    if abs(float(normal @ n_iop)) < 0.99:
        raise Rejected("Siemens mosaic: CSA slice normal disagrees with ImageOrientationPatient")
    row = np.asarray(base.iop[:3])
    col = np.asarray(base.iop[3:])
    dr, dc = base.spacing
    # ImagePositionPatient of a mosaic is that of the whole mosaic; move it to the first tile
    first = np.asarray(base.ipp) + col * dr * (rows - t_rows) / 2 + row * dc * (cols - t_cols) / 2
    gap = _float_or(ds.get("SpacingBetweenSlices"), _float_or(ds.get("SliceThickness"), 0.0))
    if gap <= 0:
        raise Rejected("Siemens mosaic without SpacingBetweenSlices or SliceThickness")
    if not MIN_SPACING_MM <= gap <= MAX_SPACING_MM:
        raise Rejected(f"Siemens mosaic slice spacing {gap:g} mm is out of range")
    frames = []
    for k in range(n_tiles):
        f = FrameInfo(**{**asdict(base), "index": k})
        f.ipp = [float(v) for v in first + normal * gap * k]
        frames.append(f)
    return frames, [n_tiles, t_rows, t_cols]


PHILIPS_CREATORS = ("Philips MR Imaging DD 001", "Philips MR Imaging DD 005")


def _philips_scale_slope(item: Dataset | None) -> float | None:
    """Philips private ScaleSlope (2005,xx0E) of a dataset or functional group item, if any."""
    if item is None:
        return None
    for creator in PHILIPS_CREATORS:
        try:
            value = item.private_block(0x2005, creator)[0x0E].value
        except (KeyError, ValueError):
            continue
        ss = _float_or(value, 0.0)
        if ss and math.isfinite(ss):
            return ss
    return None


def _philips_float(frame: FrameInfo, ss: float | None) -> None:
    """Use Philips 'floating point' values FP = (PV*RS + RI) / (RS*SS), as dcm2niix does by default.

    The DICOM rescale of Philips MR gives 'display' values that differ between scans; the private
    ScaleSlope gives the values proportional to the MR signal. Applied in place.
    """
    if ss is None or frame.slope == 0:
        return
    denom = frame.slope * ss
    frame.slope, frame.intercept = frame.slope / denom, frame.intercept / denom


def _enhanced_frames(ds: Dataset) -> list[FrameInfo]:
    """One FrameInfo per frame of an enhanced multi-frame object (per-frame functional groups)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = _int_or_none(ds.get("NumberOfFrames", 1)) or 1
    if len(per_frame) != n:
        raise Rejected(f"multi-frame object has {len(per_frame)} per-frame groups for {n} frames")

    def group(fg: Dataset, name: str) -> Dataset | None:
        seq = fg.get(name) or shared.get(name)
        return seq[0] if seq else None

    frames = []
    top_type = _image_type(ds.get("ImageType"))
    philips = "PHILIPS" in str(ds.get("Manufacturer", "")).upper() and ds.get("Modality") == "MR"
    for i, fg in enumerate(per_frame):
        pos, ori, meas = group(fg, "PlanePositionSequence"), group(fg, "PlaneOrientationSequence"), group(
            fg, "PixelMeasuresSequence"
        )
        if pos is None or ori is None or meas is None or "ImagePositionPatient" not in pos:
            raise Rejected("multi-frame object without plane position / orientation / pixel measures per frame")
        pvt = group(fg, "PixelValueTransformationSequence")
        content = group(fg, "FrameContentSequence") or Dataset()
        echo = group(fg, "MREchoSequence")
        ftype = (
            group(fg, "MRImageFrameTypeSequence") or group(fg, "CTImageFrameTypeSequence")
            or group(fg, "PETFrameTypeSequence")
        )
        diffusion = group(fg, "MRDiffusionSequence")
        acq = str(content.get("FrameAcquisitionDateTime") or "")
        acq_s = 0.0
        if len(acq) >= 14:
            try:
                acq_s = int(acq[8:10]) * 3600 + int(acq[10:12]) * 60 + float(acq[12:])
            except ValueError:
                acq_s = 0.0
        trigger = group(fg, "CardiacSynchronizationSequence")
        frame = FrameInfo(
                index=i,
                ipp=_floats(pos.ImagePositionPatient, 3, "ImagePositionPatient"),
                iop=_floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                spacing=_floats(meas.PixelSpacing, 2, "PixelSpacing"),
                slope=_rescale(pvt.get("RescaleSlope") if pvt else None, 1.0, "RescaleSlope"),
                intercept=_rescale(pvt.get("RescaleIntercept") if pvt else None, 0.0, "RescaleIntercept"),
                echo=f"te{_float_or(echo.get('EffectiveEchoTime'), 0.0):.3f}" if echo else "",
                image_type=_image_type(ftype.get("FrameType")) if ftype else top_type,
                temporal=[
                    _float_or(content.get("TemporalPositionIndex"), 0.0),
                    _float_or(trigger.get("NominalCardiacTriggerDelayTime") if trigger else None, 0.0),
                    _float_or(diffusion.get("DiffusionBValue") if diffusion else None, 0.0),
                    acq_s,
                    _float_or(ds.get("AcquisitionNumber"), 0.0),
                    _float_or(ds.get("InstanceNumber"), 0.0),
                float(i),
            ],
        )
        if philips:
            private = fg.get((0x2005, 0x140F))
            _philips_float(frame, _philips_scale_slope(private[0] if private else None))
        frames.append(frame)
    return frames


def read_header(fp: IO[bytes], size: int) -> InstanceHeader:
    """Parse the header of the DICOM file open in ``fp`` (``size`` bytes long).

    Raises:
        Rejected: the file is not DICOM, truncated, has no usable image, or is not supported.
    """
    if size == 0:
        raise Rejected("empty file (0 bytes)")
    # pydicom's default validation (WARN) only emits warnings, which cost time and are ignored
    # here: skip it (the setting is global; it is restored on the way out)
    quiet = config.settings.reading_validation_mode == config.WARN
    with config.disable_value_validation() if quiet else contextlib.nullcontext():
        _check_deflated(fp, size)
        return _read_header(fp, size)


def _check_deflated(fp: IO[bytes], size: int) -> None:
    """A deflated dataset is inflated whole by pydicom: measure what it expands to first, in bounded
    memory, and refuse it beyond :func:`medpipe.io.expansion_problem`'s limit."""
    head = fp.read(132 + 4096)
    fp.seek(0)
    if head[128:132] != b"DICM" or DEFLATED.encode() not in head:
        return
    import zlib

    from medpipe.io import EXPANSION_FREE_BYTES, MAX_EXPANSION_RATIO, expansion_problem

    try:
        from pydicom.filereader import _read_file_meta_info, read_preamble

        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
            return
        start = fp.tell()
        limit = max(EXPANSION_FREE_BYTES, MAX_EXPANSION_RATIO * max(size - start, 1))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = 0
        while inflated <= limit:
            chunk = fp.read(1 << 20)
            if not chunk:
                break
            while chunk and inflated <= limit:
                inflated += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
        problem = expansion_problem(inflated, size - start, "deflated DICOM dataset", at_least=inflated > limit)
    except zlib.error as exc:
        raise Rejected(f"corrupt deflated DICOM dataset: {exc}") from exc
    except Exception:  # an unreadable meta header: left to the header reader to explain
        problem = None
    finally:
        fp.seek(0)
    if problem:
        raise Rejected(problem)


def _read_header(fp: IO[bytes], size: int) -> InstanceHeader:
    try:
        # the usual file in one pass (medpipe.dicom.fastread); anything unusual as pydicom reads it
        ds = fast_dataset(fp) or pydicom.dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError as exc:
        # some exporters write a bare dataset without preamble / file meta: accept those only
        # when the file starts with a plausible little-endian group 0008 tag
        fp.seek(0)
        if fp.read(2) != b"\x08\x00":
            raise Rejected("not a DICOM file (no DICM preamble or file meta)") from exc
        fp.seek(0)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        except Exception as exc2:
            raise Rejected(f"not a DICOM file (no preamble; unreadable as a bare dataset: {exc2})") from exc2
    except (EOFError, OSError, struct.error) as exc:
        raise Rejected(f"truncated or unreadable DICOM header: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise Rejected(f"corrupt DICOM header: {type(exc).__name__}: {exc}") from exc
    try:
        return _header_from_dataset(ds, fp, size)
    except Rejected:
        raise
    except Exception as exc:  # malformed values: never let one file stop the run
        raise Rejected(f"corrupt DICOM attribute: {type(exc).__name__}: {exc}") from exc


def _header_from_dataset(ds: Dataset, fp: IO[bytes], size: int) -> InstanceHeader:
    meta = getattr(ds, "file_meta", None) or Dataset()
    vals = _Values(ds)
    sop_class = str(vals.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    if sop_class in NON_IMAGE_SOP_CLASSES:
        kind = NON_IMAGE_SOP_CLASSES[sop_class]
        info = {
            "kind": kind,
            "sop_class": sop_class,
            "sop_uid": str(vals.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or ""),
            "modality": str(vals.get("Modality") or ""),
            "patient_id": str(vals.get("PatientID") or ""),
            "study_uid": str(vals.get("StudyInstanceUID") or ""),
            "series_uid": str(vals.get("SeriesInstanceUID") or ""),
            "series_description": str(vals.get("SeriesDescription") or ""),
            "referenced_series": _referenced_series(ds),
        }
        raise NonImage(f"{kind}: not an image series (catalogued in the objects table)", info)
    sop_uid = str(vals.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "")
    if not sop_uid:
        raise Rejected("no SOP Instance UID")
    series_uid = str(vals.get("SeriesInstanceUID") or "")
    if not series_uid:
        # de-identified exports sometimes blank the UIDs: group by what identifies a series instead
        import hashlib

        ident = [str(vals.get(k) or "") for k in MISSING_UID_SERIES_KEYS]
        series_uid = SYNTHETIC_SERIES_PREFIX + hashlib.sha1("\x00".join(ident).encode()).hexdigest()[:16]
    if "Rows" not in vals or "Columns" not in vals or "BitsAllocated" not in vals:
        raise Rejected("no image pixel module (Rows/Columns/BitsAllocated)")
    rows, columns = _image_int(vals, "Rows"), _image_int(vals, "Columns")
    bits_allocated = _image_int(vals, "BitsAllocated")
    bits_stored = _image_int(vals, "BitsStored", bits_allocated)
    samples = _image_int(vals, "SamplesPerPixel", 1)
    pixel_representation = _image_int(vals, "PixelRepresentation", 0)
    n_frames = _image_int(vals, "NumberOfFrames", 1)
    if rows < 1 or columns < 1:
        raise Rejected(f"image of {rows} rows x {columns} columns: no pixels")
    if bits_allocated not in (8, 16, 32):
        raise Rejected(f"BitsAllocated {bits_allocated} is not supported (8, 16 or 32 bits per pixel)")
    if not 1 <= bits_stored <= bits_allocated:
        raise Rejected(f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}")
    if pixel_representation not in (0, 1):
        raise Rejected(f"PixelRepresentation {pixel_representation} is neither 0 (unsigned) nor 1 (signed)")
    if samples < 1:
        raise Rejected(f"SamplesPerPixel {samples}: no samples")
    n_frames = n_frames or 1  # NumberOfFrames 0 is read as one frame, as pydicom does
    if not 1 <= n_frames <= MAX_FRAMES_PER_FILE:
        raise Rejected(f"NumberOfFrames {n_frames} is out of range (1 to {MAX_FRAMES_PER_FILE})")
    expected = rows * columns * samples * n_frames * (bits_allocated // 8)
    if expected > MAX_FILE_PIXEL_BYTES:
        raise Rejected(f"header declares {rows}x{columns}x{n_frames} frames ({expected / 1e9:.1f} GB of pixels), "
                       f"more than the {MAX_FILE_PIXEL_BYTES / 1e9:.1f} GB medpipe reads from one file")
    if meta.get("TransferSyntaxUID"):
        ts = UID(str(meta.TransferSyntaxUID))
    else:  # bare dataset: the encoding pydicom found
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ts = UID("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
    _check_decodable(ts)
    if samples != 1:
        raise Rejected(f"colour image ({samples} samples per pixel, {vals.get('PhotometricInterpretation')}) not supported")
    # a deflated dataset was inflated in memory: file offsets mean nothing there
    pixel_offset = None if ts == DEFLATED else _pixel_data_offset(fp, ts, size, expected, n_frames)
    image_type = _image_type(vals.get("ImageType"))

    mosaic = None
    if "PerFrameFunctionalGroupsSequence" in vals:
        frames = _enhanced_frames(ds)
    else:
        if "ImagePositionPatient" not in vals or "ImageOrientationPatient" not in vals or "PixelSpacing" not in vals:
            raise Rejected(
                "no image plane geometry (ImagePositionPatient / ImageOrientationPatient / PixelSpacing): "
                "projection and secondary-capture images are not converted"
            )
        if n_frames > 1:
            raise Rejected(f"multi-frame object ({n_frames} frames) without per-frame functional groups")
        base = FrameInfo(
            index=0,
            ipp=_floats(vals.numbers("ImagePositionPatient"), 3, "ImagePositionPatient"),
            iop=_floats(vals.numbers("ImageOrientationPatient"), 6, "ImageOrientationPatient"),
            spacing=_floats(vals.numbers("PixelSpacing"), 2, "PixelSpacing"),
            slope=_rescale(vals.number("RescaleSlope"), 1.0, "RescaleSlope"),
            intercept=_rescale(vals.number("RescaleIntercept"), 0.0, "RescaleIntercept"),
            echo=_echo_key(vals),
            image_type=image_type,
            temporal=_temporal_key(vals),
        )
        if "PHILIPS" in str(vals.get("Manufacturer", "")).upper() and vals.get("Modality") == "MR":
            _philips_float(base, _philips_scale_slope(ds))
        if "MOSAIC" in image_type.upper().split("\\"):
            frames, mosaic = _mosaic_frames(ds, base)
        else:
            frames = [base]
    for f in frames:
        if min(f.spacing) <= 0:
            raise Rejected(f"invalid PixelSpacing {f.spacing}")
        if not all(MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in f.spacing):
            raise Rejected(f"PixelSpacing {f.spacing} is out of range ({MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm)")
        if not all(abs(v) <= MAX_COORDINATE_MM for v in f.ipp):
            raise Rejected(f"ImagePositionPatient {f.ipp} is out of range (|value| <= {MAX_COORDINATE_MM:g} mm)")
        row, col = f.iop[:3], f.iop[3:]
        nr = math.sqrt(sum(v * v for v in row))
        nc = math.sqrt(sum(v * v for v in col))
        dot = sum(a * b for a, b in zip(row, col))
        if abs(nr - 1) > 1e-2 or abs(nc - 1) > 1e-2 or abs(dot) > 1e-2:
            raise Rejected(f"invalid ImageOrientationPatient {f.iop}: cosines not orthonormal")
        if f.slope == 0:
            raise Rejected(f"RescaleSlope is 0 (frame {f.index})")
        if not (math.isfinite(f.slope) and math.isfinite(f.intercept)
                and abs(f.slope) <= MAX_RESCALE and abs(f.intercept) <= MAX_RESCALE):
            raise Rejected(f"rescale slope / intercept {f.slope:g} / {f.intercept:g} out of range (frame {f.index})")

    sidecar = {}
    for kw in SIDECAR_KEYWORDS:
        v = vals.json(kw)
        if v is not ABSENT:
            sidecar[kw] = v
    return InstanceHeader(
        sop_uid=sop_uid,
        sop_class=sop_class,
        transfer_syntax=str(ts),
        patient_id=str(vals.get("PatientID") or ""),
        patient_name=str(vals.get("PatientName") or ""),
        study_uid=str(vals.get("StudyInstanceUID") or ""),
        study_date=str(vals.get("StudyDate") or ""),
        study_description=str(vals.get("StudyDescription") or ""),
        series_uid=series_uid,
        series_number=_int_or_none(vals.get("SeriesNumber")),
        series_description=str(vals.get("SeriesDescription") or vals.get("ProtocolName") or ""),
        modality=str(vals.get("Modality") or ""),
        instance_number=_int_or_none(vals.get("InstanceNumber")),
        rows=rows,
        columns=columns,
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
        n_frames=n_frames,
        mosaic=mosaic,
        pixel_offset=pixel_offset,
        frames=frames,
        meta=sidecar,
    )
