"""The short safe list of private attributes kept under the Retain Safe Private option.

medpipe's own list, not a copy of PS3.15 Table E.3.10-1: the vendor attributes that medpipe's ingest
and common diffusion / quantitative tools read, all acquisition numbers. An attribute is kept only when
its private creator, group and element byte match an entry **and** its value is numeric (DS, IS, FL,
FD, US, UL, SS, SL; or undeclared in an implicit-VR file, where the entry's VR stands): a text value in
a listed slot is removed, so a name can never ride along. Every other private attribute is removed.
"""

from __future__ import annotations

NUMERIC_VRS = frozenset({"DS", "IS", "FL", "FD", "US", "UL", "SS", "SL"})

#: (group, private creator, element byte) -> (name, VR)
SAFE_PRIVATE: dict[tuple[int, str, int], tuple[str, str]] = {
    (0x0019, "SIEMENS MR HEADER", 0x0A): ("NumberOfImagesInMosaic", "US"),
    (0x0019, "SIEMENS MR HEADER", 0x0B): ("SliceMeasurementDuration", "DS"),
    (0x0019, "SIEMENS MR HEADER", 0x0C): ("B_value", "IS"),
    (0x0019, "SIEMENS MR HEADER", 0x0E): ("DiffusionGradientDirection", "FD"),
    (0x0019, "SIEMENS MR HEADER", 0x27): ("B_matrix", "FD"),
    (0x2005, "Philips MR Imaging DD 001", 0x0E): ("ScaleSlope", "FL"),
    (0x2005, "Philips MR Imaging DD 005", 0x0E): ("ScaleSlope", "FL"),
    (0x0043, "GEMS_PARM_01", 0x39): ("SlopIntegers6To9 (b-value)", "IS"),
    (0x0019, "GEMS_ACQU_01", 0xBB): ("UserData20 (diffusion direction)", "DS"),
    (0x0019, "GEMS_ACQU_01", 0xBC): ("UserData21 (diffusion direction)", "DS"),
    (0x0019, "GEMS_ACQU_01", 0xBD): ("UserData22 (diffusion direction)", "DS"),
}


def is_safe_private(group: int, creator: str, element: int, vr: str | None) -> bool:
    """Whether private attribute (group, creator, element byte) with this VR (None: not declared) is kept."""
    entry = SAFE_PRIVATE.get((group, creator, element))
    if entry is None:
        return False
    return vr is None or vr in NUMERIC_VRS
