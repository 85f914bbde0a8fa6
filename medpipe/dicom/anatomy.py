"""Coded concepts of anatomical structures for DICOM SEG segments (segmented property category and type).

One table, used by the chest CT sample's truth SEG and by model packages for classes named after an
organ. The **type** codes are SNOMED CT, as TotalSegmentator's ``totalsegmentator_snomed_mapping.csv``
and pydicom's ``codes.SCT`` give them. The **category** is "Anatomical Structure" as DICOM CID 7150
(Segmentation Property Category) lists it, SCT 91723000 (pydicom ``codes.cid7150.AnatomicalStructure``,
the code highdicom's examples use); TotalSegmentator writes SCT 123037004 (SNOMED CT's "Body structure"
concept, the code of older dcmqi templates) under the same meaning, which CID 7150 does not list.

Names are matched case-insensitively, with ``_`` and ``-`` read as spaces; a trailing ``left`` / ``right``
is dropped when the name itself is not listed (``kidney_left`` -> Kidney: laterality is not coded here).
"""

from __future__ import annotations

import re

#: DICOM CID 7150 "Anatomical Structure"
ANATOMICAL_STRUCTURE: dict[str, str] = {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"}

#: SNOMED CT type (code value, meaning) by structure name (lower case) and its usual variants
_TYPES: dict[str, tuple[str, str]] = {
    "lung": ("39607008", "Lung"), "lungs": ("39607008", "Lung"),
    "airways": ("110726009", "Trachea and bronchus"), "trachea and bronchus": ("110726009", "Trachea and bronchus"),
    "trachea": ("44567001", "Trachea"),
    "heart": ("80891009", "Heart"),
    "aorta": ("15825003", "Aorta"),
    "liver": ("10200004", "Liver"),
    "spleen": ("78961009", "Spleen"),
    "kidney": ("64033007", "Kidney"), "kidneys": ("64033007", "Kidney"),
    "spine": ("421060004", "Spine"),
    "stomach": ("69695003", "Stomach"),
    "pancreas": ("15776009", "Pancreas"),
    "gallbladder": ("28231008", "Gallbladder"),
    "esophagus": ("32849002", "Esophagus"), "oesophagus": ("32849002", "Esophagus"),
    "duodenum": ("38848004", "Duodenum"),
    "colon": ("71854001", "Colon"),
    "small bowel": ("30315005", "Small Intestine"),
    "urinary bladder": ("89837001", "Urinary bladder"),
    "adrenal gland": ("23451007", "Adrenal gland"),
    "inferior vena cava": ("64131007", "Inferior vena cava"),
    "portal vein and splenic vein": ("110765007", "Portal vein and splenic vein"),
    "brain": ("12738006", "Brain"),
}


def normalise(name: str) -> str:
    """``"Kidney_Left "`` -> ``"kidney left"``."""
    return re.sub(r"[\s_-]+", " ", name).strip().lower()


def anatomy_codes(name: str) -> dict[str, dict[str, str]] | None:
    """``{"category": Anatomical Structure, "type": <structure>}`` for a known structure name, else None."""
    key = normalise(name)
    found = _TYPES.get(key) or _TYPES.get(re.sub(r" (left|right)$", "", key))
    if found is None:
        return None
    return {"category": dict(ANATOMICAL_STRUCTURE), "type": {"scheme": "SCT", "value": found[0], "meaning": found[1]}}
