"""Analytic head and tumour models: tissue class and tumour sub-region at any point in mm.

Everything is defined in millimetres in a head-fixed frame, not in voxels, so the same seed
gives the same anatomy whatever the output matrix or slice thickness (a 32x32 test grid shows
a coarse version of the 128x128 head). Random ingredients are drawn from a
``numpy.random.Generator`` in a fixed order; smooth random fields live on a coarse lattice
of the head frame and are interpolated at the requested points.

Head: an egg-shaped ellipsoid with a smooth radial perturbation, layered scalp (fat) ->
skull (cortical bone with fatty diploe) -> dura -> subarachnoid CSF -> cortex (grey matter
with sulci) -> white matter, with lateral and third ventricles, choroid plexus, deep grey
nuclei and the interhemispheric fissure.

Tumour (BraTS-style labels): 1 necrotic core, 2 peritumoural edema, 3 enhancing rim.
Irregular blobs (perturbed ellipsoids) inside the brain parenchyma; edema spreads mainly
through white matter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medpipe.errors import ConfigError
from medpipe.sample.grid import Grid

log = logging.getLogger(__name__)

# Tissue classes (index into the contrast tables of medpipe.sample.contrast).
AIR, SCALP, BONE, MARROW, DURA, CSF, GM, WM, DEEP_GM, CHOROID, SULCAL_CSF = range(11)
TISSUE_NAMES: tuple[str, ...] = (
    "air", "scalp", "bone", "marrow", "dura", "csf", "grey matter", "white matter",
    "deep grey matter", "choroid plexus", "sulcal csf",
)
PARENCHYMA: tuple[int, ...] = (GM, WM, DEEP_GM)

# Tumour labels (BraTS convention).
NECROTIC, EDEMA, ENHANCING = 1, 2, 3

# Whole-tumour volume limits (mL) the generator guarantees.
MIN_TUMOR_ML, MAX_TUMOR_ML = 5.0, 60.0

# Head-frame box (mm) that the smooth random fields cover; points outside take edge values.
_BOX_LO = np.array([-110.0, -130.0, -120.0], dtype=np.float64)
_BOX_HI = -_BOX_LO


class SmoothField:
    """A zero-mean, unit-variance smooth random field in the head frame.

    White noise on a lattice of ``scale_mm / 2`` spacing, Gaussian-smoothed (sigma two
    lattice steps), interpolated trilinearly: the correlation length is about ``scale_mm``.
    """

    def __init__(self, rng: np.random.Generator, scale_mm: float) -> None:
        self._step = scale_mm / 2.0
        shape = tuple(int(np.ceil((hi - lo) / self._step)) + 1 for lo, hi in zip(_BOX_LO, _BOX_HI, strict=True))
        noise = rng.standard_normal(shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, sigma=2.0, mode="wrap")
        self._data = (noise / noise.std()).astype(np.float32)

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """Field values at head-frame points ``u`` of shape ``(3, ...)``."""
        idx = (u.reshape(3, -1) - _BOX_LO[:, None].astype(np.float32)) / np.float32(self._step)
        values = ndimage.map_coordinates(self._data, idx, order=1, mode="nearest")
        return values.reshape(u.shape[1:])


def _rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Rotation matrix (LPS -> head frame) from small angles about z, x and y."""
    a, b, c = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


@dataclass
class Anatomy:
    """The head sampled on a grid."""

    tissue: np.ndarray  # uint8 (slices, rows, cols), one of the tissue classes
    brain_depth: np.ndarray  # float32 mm below the brain surface (negative outside the brain)
    texture: np.ndarray  # float32 multiplicative texture, ~1


class HeadModel:
    """A randomly shaped, sized and positioned head (see the module docstring)."""

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        size = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))
        # Semi-axes (mm) of the outer scalp surface: left-right, anterior-posterior, cranio-caudal.
        self.axes = np.array(
            [70.0 * size * u(0.96, 1.04), 89.0 * size * u(0.96, 1.04), 80.0 * size * u(0.96, 1.04)]
        )
        self.egg = u(0.03, 0.08)  # wider at the back than at the front
        # Centre near the AC-PC level, so the vertex is near the top slice of a 128 mm stack.
        self.center = np.array([rng.normal(0, 3.0), rng.normal(0, 4.0), -22.0 + rng.normal(0, 3.0)])
        self.rotation = _rotation(rng.normal(0, 4.0), rng.normal(0, 4.0), rng.normal(0, 2.0))
        self.scalp = u(4.0, 6.0)
        self.bone = u(5.5, 7.5)
        self.csf = u(1.2, 2.2)
        self.ventricle_scale = u(0.8, 1.3)
        self.size = size
        self.f_shape = SmoothField(rng, 45.0)
        self.f_bone = SmoothField(rng, 30.0)
        self.f_sulci = SmoothField(rng, 12.0)
        self.f_sulci_fine = SmoothField(rng, 6.0)
        self.f_cortex = SmoothField(rng, 20.0)
        self.f_texture = SmoothField(rng, 6.0)

    def to_head_frame(self, points: np.ndarray) -> np.ndarray:
        """LPS points ``(3, ...)`` -> head-frame points ``(3, ...)`` (float32)."""
        flat = points.reshape(3, -1).astype(np.float64) - self.center[:, None]
        return (self.rotation.T @ flat).astype(np.float32).reshape(points.shape)

    def _outer_depth(self, u: np.ndarray) -> np.ndarray:
        """Approximate distance (mm) below the scalp surface (first-order ellipsoid distance)."""
        a, b, c = self.axes
        x, y, z = u
        a_eff = a * (1.0 + self.egg * np.clip(y / b, -1.0, 1.0))
        r2 = (x / a_eff) ** 2 + (y / b) ** 2 + (z / c) ** 2
        r = np.sqrt(np.maximum(r2, 1e-12))
        grad = np.sqrt((x / a_eff**2) ** 2 + (y / b**2) ** 2 + (z / c**2) ** 2) / r
        depth = (1.0 - r) / np.maximum(grad, 1e-6)
        return (depth + 2.5 * self.f_shape(u)).astype(np.float32)

    def evaluate(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue class (uint8) and brain depth (mm) at head-frame points ``u`` ``(3, ...)``."""
        x, y, z = u
        depth = self._outer_depth(u)
        # f_bone at reversed or mirrored coordinates serves as further, independent-looking fields.
        bone = self.bone + 0.8 * self.f_bone(u)
        csf = np.maximum(self.csf + 0.6 * self.f_bone(u[::-1]), 0.6)
        s_end = self.scalp
        b_end = s_end + bone
        d_end = b_end + 1.0
        brain_depth = (depth - (d_end + csf)).astype(np.float32)

        tissue = np.full(depth.shape, WM, dtype=np.uint8)

        # Cortex: a grey-matter shell of varying thickness, sulci as thin CSF clefts lined by GM.
        f_sulci = self.f_sulci(u) + 0.5 * self.f_sulci_fine(u)
        f_cortex = self.f_cortex(u)
        thickness = 3.0 + 0.8 * f_cortex
        sulcus_depth = 11.0 + 3.0 * f_cortex
        abs_s = np.abs(f_sulci)
        tissue[(brain_depth < thickness) | ((abs_s < 0.5) & (brain_depth < sulcus_depth + 3.0))] = GM

        k = self.size
        vs = self.ventricle_scale
        yv, zv = 2.0 * k, 16.0 * k  # centre of the lateral ventricles (head frame)
        # Deep grey nuclei: thalami and lentiform nuclei.
        for side in (-1.0, 1.0):
            thal = ((x - side * 10.5 * k) / 7.5) ** 2 + ((y - (yv + 12.0 * k)) / 12.0) ** 2 + (
                (z - (zv - 15.0 * k)) / 9.0
            ) ** 2
            lent = ((x - side * 24.0 * k) / 6.0) ** 2 + ((y - (yv - 6.0 * k)) / 15.0) ** 2 + (
                (z - (zv - 12.0 * k)) / 10.0
            ) ** 2
            tissue[(thal < 1.0) | (lent < 1.0)] = DEEP_GM

        # Interhemispheric fissure above the corpus callosum and in front of/behind the ventricles.
        fissure_zone = (z > zv + 14.0 * k) | (np.abs(y - yv) > 40.0 * k)
        tissue[fissure_zone & (np.abs(x) < 3.0)] = GM
        tissue[fissure_zone & (np.abs(x) < 1.0)] = SULCAL_CSF
        tissue[(abs_s < 0.1) & (brain_depth < sulcus_depth)] = SULCAL_CSF

        # Lateral ventricles: banana-shaped, frontal and occipital horns diverging laterally.
        t = (y - yv) / (30.0 * k * vs**0.3)
        t2 = t * t
        inside_t = t2 < 1.0
        for side in (-1.0, 1.0):
            xc = side * (6.5 * vs + 1.0 + 4.5 * t2) * k
            zc = zv - 7.0 * t2 * k
            wx = np.maximum(6.0 * vs * (1.0 - 0.35 * t2), 0.5)
            wz = np.maximum(8.0 * vs * (1.0 - 0.45 * t2), 0.5)
            q = ((x - xc) / wx) ** 2 + t2 + ((z - zc) / wz) ** 2
            vent = inside_t & (q < 1.0)
            tissue[vent] = CSF
            # Choroid plexus: a small enhancing tuft in the atrium.
            choroid = vent & (t > 0.45) & (t < 0.7) & (z < zc - 0.1 * wz) & (q < 0.35)
            tissue[choroid] = CHOROID
        third = (np.abs(x) < 1.5 * vs) & (
            ((y - (yv + 6.0 * k)) / 13.0) ** 2 + ((z - (zv - 17.0 * k)) / 8.0) ** 2 < 1.0
        )
        tissue[third] = CSF

        # Outer layers override everything.
        tissue[brain_depth < 0] = CSF
        tissue[depth < d_end] = DURA
        tissue[depth < b_end] = BONE
        marrow = (depth > s_end + 0.35 * bone) & (depth < s_end + 0.65 * bone) & (self.f_bone(-u) > -0.3)
        tissue[marrow] = MARROW
        tissue[depth < s_end] = SCALP
        tissue[depth < 0] = AIR
        return tissue, brain_depth

    def sample(self, grid: Grid) -> Anatomy:
        u = self.to_head_frame(grid.points())
        tissue, brain_depth = self.evaluate(u)
        texture = np.ones(tissue.shape, dtype=np.float32)
        f_tex = self.f_texture(u)
        brain = np.isin(tissue, PARENCHYMA)
        texture[brain] += 0.035 * f_tex[brain]
        fatty = (tissue == SCALP) | (tissue == MARROW)
        texture[fatty] += 0.07 * f_tex[fatty]
        return Anatomy(tissue=tissue, brain_depth=brain_depth, texture=texture)


@dataclass
class Tumor:
    """A tumour sampled on a grid."""

    labels: np.ndarray  # uint8 (slices, rows, cols): 0 none, 1 necrotic, 2 edema, 3 enhancing
    edema_weight: np.ndarray  # float32 in [0, 1]: how strongly edema signal replaces tissue signal
    texture: np.ndarray  # float32 zero-mean heterogeneity field
    center_lps: tuple[float, float, float]


class TumorModel:
    """An irregular tumour with necrotic core, enhancing rim and peritumoural edema."""

    def __init__(self, rng: np.random.Generator, head: HeadModel, grid: Grid) -> None:
        self._head = head
        self.target_ml = float(np.exp(rng.uniform(np.log(8.0), np.log(45.0))))
        self.core_fraction = rng.uniform(0.5, 0.72)  # core radius / edema radius
        self.rim_mm = rng.uniform(2.5, 4.5)  # thickness of the enhancing rim
        stretch = rng.uniform(0.8, 1.25, size=3)
        self.stretch = (stretch / np.cbrt(stretch.prod())).astype(np.float32)
        self.f_core = SmoothField(rng, 10.0)
        self.f_edema = SmoothField(rng, 18.0)
        self.f_fine = SmoothField(rng, 6.0)
        self.f_texture = SmoothField(rng, 6.0)
        self.center = self._pick_center(rng, grid)

    def _pick_center(self, rng: np.random.Generator, grid: Grid) -> np.ndarray:
        """A head-frame point deep in the parenchyma, away from the ends of the stack."""
        head = self._head
        z_lo, z_hi = grid.z_range()
        margin = 0.22 * (z_hi - z_lo)
        for _ in range(20):
            cand = (rng.uniform(-1.0, 1.0, size=(3, 256)) * (head.axes[:, None] - 25.0)).astype(np.float32)
            tissue, depth = head.evaluate(cand)
            lps = (head.rotation @ cand.astype(np.float64)) + head.center[:, None]
            ok = (
                np.isin(tissue, (WM, DEEP_GM))
                & (depth > 14.0)
                & (lps[2] > z_lo + margin)
                & (lps[2] < z_hi - margin)
            )
            if ok.any():
                return cand[:, int(np.argmax(ok))].astype(np.float64)
        raise ConfigError(
            "could not place a tumour inside the brain within the field of view",
            hint="use a field of view that covers the head (matrix x pixel spacing >= 180 mm, "
            "slices x slice thickness >= 80 mm)",
        )

    def _shape_fields(self, u: np.ndarray) -> dict[str, np.ndarray]:
        """Distance from the centre and the shape perturbations at head-frame points ``u``."""
        bshape = (3,) + (1,) * (u.ndim - 1)
        c = self.center.reshape(3, 1).astype(np.float32)
        rel = u - c.reshape(bshape)
        dist = np.sqrt(((rel * self.stretch.reshape(bshape)) ** 2).sum(axis=0))
        # Perturbations relative to their value at the centre, so they deform but do not shrink.
        f_fine = self.f_fine(u)
        return {
            "dist": dist,
            "core": (self.f_core(u) - self.f_core(c)[0]) + 0.32 * f_fine,
            "edema": (self.f_edema(u) - self.f_edema(c)[0]) + 0.33 * f_fine,
            "rim": self.f_core(u[::-1]) - self.f_core(c[::-1])[0],
        }

    def _labels(
        self, f: dict[str, np.ndarray], tissue: np.ndarray, edema_radius: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labels and edema weight for a given edema radius (mm)."""
        r_core = edema_radius * self.core_fraction
        rho_core = f["dist"] / r_core - 0.25 * f["core"]
        rho_edema = f["dist"] / edema_radius - 0.3 * f["edema"]
        rim = self.rim_mm * np.clip(1.0 + 0.35 * f["rim"], 0.5, 1.8) / r_core

        in_brain = np.isin(tissue, PARENCHYMA)
        # Mass effect: the tumour effaces the sulci it reaches.
        effaced = (tissue == SULCAL_CSF) & (rho_edema < 0.9)
        core = (rho_core < 1.0) & (in_brain | effaced)
        # Edema follows white matter; it involves cortex only close to the core.
        edema = (rho_edema < 1.0) & (
            (tissue == WM) | (tissue == DEEP_GM) | (((tissue == GM) | effaced) & (rho_edema < 0.75))
        )
        labels = np.zeros(tissue.shape, dtype=np.uint8)
        labels[edema] = EDEMA
        labels[core] = ENHANCING
        labels[core & (rho_core < 1.0 - rim)] = NECROTIC
        weight = np.clip(1.15 - 0.3 * rho_edema, 0.75, 1.0).astype(np.float32)
        return labels, weight

    def sample(self, grid: Grid, anatomy: Anatomy) -> Tumor:
        """Rasterise on ``grid``, scaling the size until the whole tumour is 5-60 mL."""
        u = self._head.to_head_frame(grid.points())
        fields = self._shape_fields(u)
        radius = float(np.cbrt(3.0 * self.target_ml * 1000.0 / (4.0 * np.pi)))
        target = float(np.clip(self.target_ml, MIN_TUMOR_ML + 1.0, MAX_TUMOR_ML - 5.0))
        labels, weight = self._labels(fields, anatomy.tissue, radius)
        for _ in range(8):
            volume = float(np.count_nonzero(labels)) * grid.voxel_volume_ml
            if MIN_TUMOR_ML <= volume <= MAX_TUMOR_ML and abs(volume / target - 1.0) < 0.5:
                break
            radius *= float(np.clip(np.cbrt(target / max(volume, 0.1)), 0.6, 1.6))
            labels, weight = self._labels(fields, anatomy.tissue, radius)
        labels = _ensure_all_regions(labels, anatomy.tissue)
        volume = float(np.count_nonzero(labels)) * grid.voxel_volume_ml
        if not MIN_TUMOR_ML <= volume <= MAX_TUMOR_ML:
            log.warning("tumour volume %.1f mL is outside %.0f-%.0f mL on this grid",
                        volume, MIN_TUMOR_ML, MAX_TUMOR_ML)
        center_lps = self._head.rotation @ self.center + self._head.center
        return Tumor(
            labels=labels,
            edema_weight=weight,
            texture=self.f_texture(u),
            center_lps=(float(center_lps[0]), float(center_lps[1]), float(center_lps[2])),
        )


def _ensure_all_regions(labels: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """On coarse grids a sub-region can vanish; grow it from its neighbour so all three exist."""
    labels = labels.copy()
    if not np.any(labels == NECROTIC):
        core = np.argwhere((labels == ENHANCING) | (labels == EDEMA))
        if len(core):
            mid = core[np.argmin(((core - core.mean(axis=0)) ** 2).sum(axis=1))]
            labels[tuple(mid)] = NECROTIC
    if not np.any(labels == ENHANCING):
        ring = ndimage.binary_dilation(labels == NECROTIC) & (labels != NECROTIC) & (tissue != AIR)
        labels[ring] = ENHANCING
    if not np.any(labels == EDEMA):
        ring = ndimage.binary_dilation(labels > 0) & (labels == 0) & np.isin(tissue, PARENCHYMA)
        labels[ring] = EDEMA
    return labels
