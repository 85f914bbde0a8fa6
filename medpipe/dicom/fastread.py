"""A one-pass reader of DICOM headers for the common case, giving what pydicom's reader gives.

``pydicom.dcmread(fp, stop_before_pixels=True)`` costs about 0.25 ms per file, most of it in Python
bookkeeping around each element (generator, file meta validation, a ``FileDataset``). Ingest reads
every header of an export, so this module parses the usual file in one pass over one buffer:

    128-byte preamble + ``DICM``, explicit VR little endian file meta (group 0002), then a dataset in
    implicit or explicit VR little endian (native or encapsulated pixel data) whose elements all have
    VRs pydicom knows, up to the pixel data.

It builds the same raw elements pydicom's ``data_element_generator`` yields (undefined-length
sequences are handed to pydicom's own ``read_sequence``) and the same ``Dataset`` / ``FileMetaDataset``,
so every value converts exactly as pydicom would convert it. Anything else (no preamble, big endian,
deflate, command groups, VRs that disagree with the transfer syntax, a header that does not fit the
buffer, truncation, no pixel data) returns None, and the caller reads the file with pydicom.
``tests/test_header_fastread.py`` checks both readers agree on real and synthetic files.
"""

from __future__ import annotations

import io
import struct
from typing import IO, Any

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.tag import BaseTag
from pydicom.uid import PrivateTransferSyntaxes
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

#: bytes read in one go; a header that does not fit (large private elements) goes to pydicom
FAST_READ_BYTES = 1 << 16

_IMPLICIT = "1.2.840.10008.1.2"
_EXPLICIT = "1.2.840.10008.1.2.1"
_NOT_FAST = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_ITEM_TAG = 0xFFFEE000
_VRS = {vr.value.encode(): vr.value for vr in VR}
_LONG = frozenset(str(v) for v in EXPLICIT_VR_LENGTH_32)
_EXPLICIT_HEAD = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_HEAD = struct.Struct("<HHL").unpack_from
_ULONG = struct.Struct("<L").unpack_from
_TAG = struct.Struct("<HH").unpack_from


class _Unusual(Exception):
    """The file is not the common case: let pydicom read it."""


def _looks_implicit(buf: bytes, pos: int) -> bool:
    """pydicom's test of a dataset's first element: VR bytes that are not upper-case letters mean implicit VR."""
    return not (0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B)


def _elements(buf: bytes, pos: int, implicit: bool, *, meta: bool) -> tuple[dict[int, Any], int, Any]:
    """The elements from ``pos`` up to the pixel data (or, for the file meta, the end of group 0002).

    Returns ``(elements by tag, position where reading stopped, character encoding)``.
    """
    n = len(buf)
    elements: dict[int, Any] = {}
    encoding: Any = default_encoding
    while True:
        if pos + 8 > n:
            raise _Unusual("ran past the buffer")
        if meta and _TAG(buf, pos)[0] != 2:  # the end of the file meta (the dataset may be implicit VR)
            return elements, pos, encoding
        if implicit:
            group, elem, length = _IMPLICIT_HEAD(buf, pos)
            vr = None
            head = 8
        else:
            group, elem, raw_vr, length = _EXPLICIT_HEAD(buf, pos)
            vr = _VRS.get(raw_vr)
            if vr is None:
                raise _Unusual(f"VR {raw_vr!r}")
            head = 8
            if vr in _LONG:
                if pos + 12 > n:
                    raise _Unusual("ran past the buffer")
                (length,) = _ULONG(buf, pos + 8)
                head = 12
        tag = group << 16 | elem
        if meta:
            pass
        elif tag in _PIXEL_TAGS:
            return elements, pos, encoding
        elif group in (0, 2) or tag == 0xFFFEE00D:
            raise _Unusual(f"element ({group:04X},{elem:04X}) in the dataset")
        value_pos = pos + head
        if length == 0xFFFFFFFF:
            if meta:
                raise _Unusual("undefined length in the file meta")
            if vr == "UN" and config.settings.infer_sq_for_un_vr:
                vr = "SQ"
            if vr is None or (vr == "UN" and config.replace_un_with_known_vr):
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    if value_pos + 4 <= n and (_TAG(buf, value_pos)[0] << 16 | _TAG(buf, value_pos)[1]) == _ITEM_TAG:
                        vr = "SQ"
            if vr != "SQ":
                raise _Unusual("undefined length value that is not a sequence")
            fp = io.BytesIO(buf)
            fp.seek(value_pos)
            seq = read_sequence(fp, implicit, True, length, encoding)
            pos = fp.tell()
            if pos >= n:
                raise _Unusual("sequence runs past the buffer")
            elements[tag] = DataElement(BaseTag(tag), vr, seq, value_pos, is_undefined_length=True)
            continue
        end = value_pos + length
        if end > n:
            raise _Unusual("value runs past the buffer")
        value = buf[value_pos:end] if length > 0 else empty_value_for_VR(vr, raw=True)
        if tag == 0x00080005:
            encoding = convert_encodings(convert_string(value or b"", True))
        elements[tag] = RawDataElement(BaseTag(tag), vr, length, value, value_pos, implicit, True)
        pos = end


def fast_dataset(fp: IO[bytes]) -> Dataset | None:
    """The dataset ``dcmread(fp, stop_before_pixels=True)`` reads, with its ``file_meta``, or None.

    ``fp`` must be at the start of the file; on success it is left at the pixel data tag (where
    pydicom leaves it), on None at the start again.
    """
    start = fp.tell()
    buf = fp.read(FAST_READ_BYTES)
    try:
        if start != 0 or len(buf) < 140 or buf[128:132] != b"DICM" or _looks_implicit(buf, 132):
            raise _Unusual("no preamble, or implicit file meta")
        meta_elements, pos, _ = _elements(buf, 132, False, meta=True)
        file_meta = FileMetaDataset(meta_elements)
        file_meta.set_original_encoding(is_implicit_vr=False, is_little_endian=True,
                                        character_encoding=default_encoding)
        syntax = meta_elements.get(0x00020010)
        ts = convert_raw_data_element(syntax).value if syntax is not None else None
        if not ts or ts in _NOT_FAST or ts in PrivateTransferSyntaxes:
            raise _Unusual(f"transfer syntax {ts}")
        implicit = ts == _IMPLICIT
        if pos + 8 > len(buf) or _looks_implicit(buf, pos) != implicit:
            raise _Unusual("the dataset's encoding disagrees with its transfer syntax")
        elements, pos, _ = _elements(buf, pos, implicit, meta=False)
    except _Unusual:
        fp.seek(start)
        return None
    except Exception:  # noqa: BLE001 - a sequence pydicom's read_sequence rejects: pydicom explains it
        fp.seek(start)
        return None
    ds = Dataset(elements, parent_encoding=default_encoding)
    if 0x00080005 in elements:
        encoding = convert_encodings(convert_raw_data_element(elements[0x00080005]).value)
    else:
        encoding = default_encoding
    ds.set_original_encoding(implicit, True, encoding)
    ds.file_meta = file_meta
    fp.seek(start + pos)
    return ds
