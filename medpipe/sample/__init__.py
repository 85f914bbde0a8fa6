"""Synthetic sample data, generated on demand (no real patient data is shipped or downloaded).

``generate_brain_tumor`` writes multi-parametric brain MR studies (T1, T1c, T2, FLAIR) as
DICOM with a DICOM SEG of the tumour sub-regions; see :mod:`medpipe.sample.brain_tumor`.
"""

from __future__ import annotations

from medpipe.sample.brain_tumor import (
    BrainTumorParams,
    CaseInfo,
    existing_generation,
    generate_brain_tumor,
    tumor_case_indices,
)

__all__ = [
    "BrainTumorParams",
    "CaseInfo",
    "existing_generation",
    "generate_brain_tumor",
    "tumor_case_indices",
]
