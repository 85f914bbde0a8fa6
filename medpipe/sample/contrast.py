"""MR contrast of the synthetic head: tissue classes -> T1 / T1c / T2 / FLAIR signal.

Relative signal levels (WM brighter than GM on T1 and darker on T2; CSF dark on T1 and
FLAIR, bright on T2; fat bright on T1; bone dark everywhere; gadolinium enhancement of the
tumour rim, dura and choroid plexus on T1c) follow the usual appearance of clinical 1.5/3 T
spin-echo images. Then: a small point-spread blur, a smooth multiplicative bias field,
Rician noise and a per-series scanner gain, stored as 12-bit unsigned integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medpipe.sample.grid import Grid
from medpipe.sample.phantom import EDEMA, ENHANCING, NECROTIC, Anatomy, Tumor

SEQUENCES: tuple[str, ...] = ("T1", "T1c", "T2", "FLAIR")

# Mean signal per tissue class (rows: medpipe.sample.phantom tissue order) and sequence.
#                      T1    T1c   T2    FLAIR
_TISSUE_SIGNAL = np.array(
    [
        [0.00, 0.00, 0.00, 0.00],  # air
        [0.95, 0.95, 0.60, 0.72],  # scalp (subcutaneous fat)
        [0.05, 0.05, 0.05, 0.04],  # cortical bone
        [0.55, 0.57, 0.35, 0.40],  # diploe (fatty marrow)
        [0.25, 0.80, 0.30, 0.30],  # dura (enhances)
        [0.12, 0.13, 1.00, 0.07],  # CSF
        [0.46, 0.48, 0.58, 0.58],  # grey matter
        [0.68, 0.69, 0.40, 0.44],  # white matter
        [0.55, 0.56, 0.48, 0.50],  # deep grey matter
        [0.35, 0.85, 0.60, 0.35],  # choroid plexus (enhances)
        [0.12, 0.13, 1.00, 0.07],  # sulcal CSF
    ],
    dtype=np.float32,
)

# Mean signal per tumour label (row 0 unused).
_TUMOR_SIGNAL = np.array(
    [
        [0.00, 0.00, 0.00, 0.00],
        [0.22, 0.20, 0.88, 0.55],  # 1 necrotic core: dark T1/T1c, bright T2, intermediate FLAIR
        [0.42, 0.43, 0.82, 0.88],  # 2 edema: mildly dark T1, bright T2 and FLAIR
        [0.50, 1.05, 0.62, 0.70],  # 3 enhancing rim: bright on T1c only
    ],
    dtype=np.float32,
)

# Scanner units per unit signal (the stored values stay below 4096).
_GAIN = {"T1": 1400.0, "T1c": 1400.0, "T2": 1500.0, "FLAIR": 1200.0}
MAX_STORED = 4095  # 12 bits stored


@dataclass(frozen=True)
class ScanEffects:
    """Per-case acquisition nuisances, drawn once per case."""

    bias_coefs: np.ndarray  # (4 sequences, 9) low-order log-bias polynomial coefficients
    noise_sigma: float
    gains: np.ndarray  # (4,) relative scanner gain per series

    @classmethod
    def draw(cls, rng: np.random.Generator) -> ScanEffects:
        shared = np.concatenate([rng.normal(0, 0.09, 3), rng.normal(0, 0.05, 6)])
        per_series = np.concatenate(
            [rng.normal(0, 0.03, (len(SEQUENCES), 3)), rng.normal(0, 0.015, (len(SEQUENCES), 6))], axis=1
        )
        return cls(
            bias_coefs=(shared[None, :] + per_series).astype(np.float64),
            noise_sigma=float(rng.uniform(0.014, 0.022)),
            gains=rng.uniform(0.85, 1.15, len(SEQUENCES)),
        )


def _bias_field(points: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """exp(polynomial of degree 2) of scanner coordinates in units of 100 mm."""
    x, y, z = points / np.float32(100.0)
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    log_bias = np.zeros(x.shape, dtype=np.float32)
    for c, t in zip(coefs, terms, strict=True):
        log_bias += np.float32(c) * t
    return np.exp(log_bias)


def render(
    sequence: str,
    grid: Grid,
    anatomy: Anatomy,
    tumor: Tumor | None,
    effects: ScanEffects,
    rng: np.random.Generator,
    points: np.ndarray,
) -> np.ndarray:
    """Stored pixel values (uint16, 12 bits used) of one series, shape (slices, rows, cols)."""
    s = SEQUENCES.index(sequence)
    img = _TISSUE_SIGNAL[anatomy.tissue, s] * anatomy.texture
    if tumor is not None:
        lab = tumor.labels
        edema = lab == EDEMA
        target = _TUMOR_SIGNAL[EDEMA, s] * (1.0 + 0.06 * tumor.texture[edema])
        w = tumor.edema_weight[edema]
        img[edema] = img[edema] * (1.0 - w) + target * w
        for label, hetero in ((NECROTIC, 0.12), (ENHANCING, 0.12)):
            m = lab == label
            img[m] = _TUMOR_SIGNAL[label, s] * (1.0 + hetero * tumor.texture[m])
    # Point-spread function: a slight in-plane blur (0.7 mm).
    sigma = 0.7 / grid.pixel_spacing
    img = ndimage.gaussian_filter(img, sigma=(0.0, sigma, sigma), mode="nearest")
    img *= _bias_field(points, effects.bias_coefs[s])
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
    sd = np.float32(effects.noise_sigma)
    real = img + sd * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sd * rng.standard_normal(img.shape, dtype=np.float32)
    mag = np.sqrt(real * real + imag * imag)
    scaled = mag * np.float32(_GAIN[sequence] * effects.gains[s])
    return np.clip(np.rint(scaled), 0, MAX_STORED).astype(np.uint16)
