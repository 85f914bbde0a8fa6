"""An analytic chest / upper-abdomen phantom for synthetic CT: organs, airways, vessels and lung nodules.

Everything is defined by signed distance functions (SDFs, mm, negative inside) in a **body frame**
``u = (left, posterior, superior)`` whose origin lies on the midline at the top of the right
diaphragm dome; the frame is placed in patient space (DICOM LPS, mm) by a rotation about the body
axis and a shift (:class:`ChestModel`). Because the anatomy is a function of position, any image
grid samples it consistently: axial, feet-first, prone, gantry-tilted stacks all show one body, and
the label of a voxel is decided at its centre in world space.

Rendering (:meth:`ChestModel.render`) paints tissues in order (later ones over earlier ones), each
with a partial-volume ramp across its boundary (the fraction of a voxel inside a surface is
``clip(0.5 - d / w, 0, 1)`` for a ramp width ``w`` of about a voxel), so edges are soft as in a real
reconstruction; the label map takes the same structures at their surface (``d <= 0``). Values are
Hounsfield units of an unenhanced low-dose chest CT. The scanner's blur and noise are added by
:mod:`medpipe.sample.chest_ct`.

Structures and label values (:data:`ORGANS`): lungs (the lung vessels and nodules inside them
included), airways (trachea, main and lobar bronchi: lumen and wall), heart, aorta (ascending,
arch, descending), liver, spleen, kidneys and spine (vertebral bodies, discs and posterior
elements; not the spinal canal). Ribs, sternum, muscle, fat, a stomach with gas and the patient
table are drawn but not labelled.

Nodules (:class:`Nodule`) are spheres in the lungs, solid (soft-tissue density) or part-solid (a
ground-glass sphere around a solid core), placed in three ways: inside the lung, touching the
pleura (the sphere reaches into the chest wall) or touching a vessel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

#: label value -> organ name (the SEG's segment labels; label 0 is everything else)
ORGANS: dict[int, str] = {
    1: "Lungs", 2: "Airways", 3: "Heart", 4: "Aorta", 5: "Liver", 6: "Spleen", 7: "Kidneys", 8: "Spine",
}

#: Hounsfield units of the tissues
HU = {
    "air": -1000.0, "lung": -860.0, "fat": -100.0, "muscle": 45.0, "blood": 40.0, "liver": 58.0,
    "spleen": 48.0, "kidney": 32.0, "bone": 650.0, "vertebra": 300.0, "disc": 80.0, "csf": 10.0,
    "table": 150.0, "stomach": 20.0, "solid": 35.0, "ggo": -560.0,
}

Placement = Literal["interior", "pleural", "vascular"]
Kind = Literal["solid", "part-solid"]


@dataclass(frozen=True)
class Nodule:
    """A lung nodule: a sphere of ``diameter_mm`` centred at ``center_lps`` (patient LPS, mm)."""

    center_lps: tuple[float, float, float]
    diameter_mm: float
    kind: Kind
    placement: Placement
    core_fraction: float = 1.0  # part-solid: the solid core's diameter / the nodule's
    hu: float = HU["solid"]


# -- signed distance helpers (body frame, mm; arrays of equal shape) -------------------------------


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, c: tuple[float, float, float],
               a: tuple[float, float, float]) -> np.ndarray:
    """First-order signed distance to an axis-aligned ellipsoid (exact on the surface, good near it)."""
    vx, vy, vz = (x - c[0]) / a[0], (y - c[1]) / a[1], (z - c[2]) / a[2]
    r = np.sqrt(vx * vx + vy * vy + vz * vz)
    g = np.sqrt((vx / a[0]) ** 2 + (vy / a[1]) ** 2 + (vz / a[2]) ** 2)
    return ((r - 1.0) * r / np.maximum(g, 1e-6)).astype(np.float32)


def _ellipse2d(x: np.ndarray, y: np.ndarray, c: tuple[float, float], a: tuple[float, float]) -> np.ndarray:
    vx, vy = (x - c[0]) / a[0], (y - c[1]) / a[1]
    r = np.sqrt(vx * vx + vy * vy)
    g = np.sqrt((vx / a[0]) ** 2 + (vy / a[1]) ** 2)
    return ((r - 1.0) * r / np.maximum(g, 1e-6)).astype(np.float32)


def _segment_distance(x: np.ndarray, y: np.ndarray, z: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance from points to the segment p-q."""
    d = q - p
    length2 = float(d @ d) or 1e-9
    t = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1] + (z - p[2]) * d[2]) / length2, 0.0, 1.0)
    return np.sqrt((x - p[0] - t * d[0]) ** 2 + (y - p[1] - t * d[1]) ** 2 + (z - p[2] - t * d[2]) ** 2)


@dataclass(frozen=True)
class Tube:
    """A polyline with a radius per vertex (capsules between consecutive vertices)."""

    points: np.ndarray  # (n, 3) body frame
    radii: np.ndarray  # (n,)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.radii.max())
        return self.points.min(0) - r, self.points.max(0) + r

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.full(x.shape, np.inf, dtype=np.float32)
        for i in range(len(self.points) - 1):
            p, q = self.points[i], self.points[i + 1]
            lo = np.minimum(p, q) - max(self.radii[i], self.radii[i + 1]) - 4.0
            hi = np.maximum(p, q) + max(self.radii[i], self.radii[i + 1]) + 4.0
            near = (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])
            if not near.any():
                continue
            xs, ys, zs = x[near], y[near], z[near]
            d = q - p
            length2 = float(d @ d) or 1e-9
            t = np.clip(((xs - p[0]) * d[0] + (ys - p[1]) * d[1] + (zs - p[2]) * d[2]) / length2, 0.0, 1.0)
            dist = np.sqrt((xs - p[0] - t * d[0]) ** 2 + (ys - p[1] - t * d[1]) ** 2 + (zs - p[2] - t * d[2]) ** 2)
            radius = self.radii[i] + t * (self.radii[i + 1] - self.radii[i])
            out[near] = np.minimum(out[near], (dist - radius).astype(np.float32))
        return out


def _smooth_noise(rng: np.random.Generator, n: int, scale_mm: float) -> Callable[..., np.ndarray]:
    """A zero-mean, roughly unit-variance smooth field: a sum of ``n`` random plane waves."""
    k = rng.normal(size=(n, 3))
    k *= (2 * np.pi / scale_mm) / np.linalg.norm(k, axis=1, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, n)
    amp = np.sqrt(2.0 / n)

    def field(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(x.shape, dtype=np.float32)
        for i in range(n):
            out += np.cos(k[i, 0] * x + k[i, 1] * y + k[i, 2] * z + phase[i]).astype(np.float32)
        return out * np.float32(amp)

    return field


# -- the model -----------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """The phantom sampled at a set of points: HU (before blur and noise) and labels (ORGANS values)."""

    hu: np.ndarray  # float32
    labels: np.ndarray  # uint8


@dataclass
class ChestModel:
    """A randomly sized and placed chest and upper abdomen (draw one with :meth:`draw`)."""

    scale: float
    half_width: float  # body semi-axis left-right (mm)
    half_depth: float  # body semi-axis anterior-posterior (mm)
    fat: float  # subcutaneous fat thickness (mm)
    dome_right: float  # height of the right / left diaphragm domes (body frame z, mm)
    dome_left: float
    rotation: np.ndarray  # body frame -> LPS (3x3)
    origin: np.ndarray  # LPS of the body frame's origin
    airways: list[Tube] = field(default_factory=list)
    vessels: list[Tube] = field(default_factory=list)
    aorta: Tube | None = None
    nodules: list[Nodule] = field(default_factory=list)
    texture: Callable[..., np.ndarray] | None = None
    z_range: tuple[float, float] = (0.0, 0.0)  # body-frame z covered by the scan (mm)
    table_side: float = 1.0  # the table is behind the patient (+1, supine) or in front (-1, prone)

    # -- drawing ------------------------------------------------------------------------------------

    @classmethod
    def draw(cls, rng: np.random.Generator) -> ChestModel:
        """A random patient: size, shape, position and a little rotation about the body axis."""
        k = float(rng.uniform(0.9, 1.12))
        yaw = np.deg2rad(rng.uniform(-4.0, 4.0))
        rot = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
        model = cls(
            scale=k,
            half_width=float(158.0 * k * rng.uniform(0.95, 1.08)),
            half_depth=float(108.0 * k * rng.uniform(0.9, 1.08)),
            fat=float(rng.uniform(8.0, 26.0) * k),
            dome_right=float(rng.uniform(-6.0, 8.0)),
            dome_left=0.0,
            rotation=rot,
            origin=np.array([rng.uniform(-15, 15), rng.uniform(-20, 10), rng.uniform(-15, 15)]),
        )
        model.dome_left = model.dome_right - float(rng.uniform(8.0, 22.0)) * k
        model.z_range = (-125.0 * k, 195.0 * k)
        model._draw_tubes(rng)
        model.texture = _smooth_noise(rng, 10, 14.0)
        return model

    def _draw_tubes(self, rng: np.random.Generator) -> None:
        k = self.scale
        carina = np.array([rng.uniform(-3, 3), 18.0 * k, 112.0 * k])
        top = np.array([carina[0] + rng.uniform(-3, 3), 8.0 * k, self.z_range[1] + 10.0])
        self.airways = [Tube(np.array([top, carina]), np.array([8.5, 8.0]) * k)]
        for side in (-1.0, 1.0):  # right (-x), left (+x)
            main_end = carina + np.array([side * 38.0 * k, 6.0 * k, -(22.0 if side > 0 else 16.0) * k])
            self.airways.append(Tube(np.array([carina, main_end]), np.array([6.0, 5.0]) * k))
            for dz, dy in ((45.0, -8.0), (-55.0, 12.0)) + (((-30.0, -25.0),) if side < 0 else ()):
                end = main_end + np.array([side * rng.uniform(12, 22) * k, dy * k, dz * k])
                self.airways.append(Tube(np.array([main_end, end]), np.array([4.0, 3.0]) * k))
        # aorta: root above the heart, arch to the left and back, down left of the spine
        root = np.array([10.0 * k, -20.0 * k, 72.0 * k])
        path = [root, np.array([8.0, -22.0, 118.0]) * k, np.array([14.0, 0.0, 140.0]) * k,
                np.array([22.0, 30.0, 132.0]) * k, np.array([26.0, 48.0, 100.0]) * k,
                np.array([22.0, 50.0, 20.0]) * k, np.array([10.0, 45.0, self.z_range[0] / k - 20.0]) * k]
        r = float(rng.uniform(12.0, 15.0) * k)
        self.aorta = Tube(np.array(path), np.array([r * 1.1, r * 1.1, r, r, r * 0.9, r * 0.85, r * 0.8]))
        # lung vessels: a tree from each hilum, kept inside the lung (drawn only there)
        self.vessels = []
        for side in (-1.0, 1.0):
            hilum = np.array([side * 48.0 * k, 12.0 * k, 95.0 * k])
            self._branch(rng, hilum, side, 5.0 * k, depth=0)

    def _branch(self, rng: np.random.Generator, start: np.ndarray, side: float, radius: float, depth: int) -> None:
        n = 3 if depth == 0 else 2
        for _ in range(n):
            for _attempt in range(20):
                direction = np.array([side * rng.uniform(0.2, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-1.0, 1.0)])
                direction /= np.linalg.norm(direction)
                end = start + direction * rng.uniform(35.0, 60.0) * self.scale * (0.75**depth)
                if self.lung_sdf(*(np.array([v]) for v in end))[0] < -6.0:
                    break
            else:
                continue
            self.vessels.append(Tube(np.array([start, end]), np.array([radius, radius * 0.8])))
            if depth < 2:
                self._branch(rng, end, side, radius * 0.62, depth + 1)

    # -- geometry -----------------------------------------------------------------------------------

    def to_body(self, lps: np.ndarray) -> np.ndarray:
        """Patient LPS points ``(3, ...)`` in the body frame."""
        shape = lps.shape
        u = self.rotation.T @ (lps.reshape(3, -1) - self.origin[:, None])
        return u.reshape(shape).astype(np.float32)

    def to_lps(self, u: np.ndarray) -> np.ndarray:
        """Body-frame points ``(3,)`` or ``(3, n)`` in patient LPS."""
        u = np.asarray(u, dtype=np.float64)
        return self.rotation @ u + (self.origin if u.ndim == 1 else self.origin[:, None])

    def _diaphragm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (body z) of the diaphragm: a dome per side, deepest at the sides and the back."""
        k = self.scale
        top = np.where(x < 0, self.dome_right, self.dome_left)
        return (top - 0.0045 * (np.abs(x) - 55.0 * k) ** 2 / k - 0.002 * (y + 10.0 * k) ** 2 / k).astype(np.float32)

    def body_sdf(self, x: np.ndarray, y: np.ndarray, shrink: float = 0.0) -> np.ndarray:
        return _ellipse2d(x, y, (0.0, 0.0), (self.half_width - shrink, self.half_depth - shrink))

    def lung_sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Both lungs (left at +x, right at -x)."""
        k = self.scale
        wall = self.fat + 24.0 * k
        cavity = self.body_sdf(x, y, wall)
        apex = 172.0 * k
        taper = np.sqrt(np.clip(1.0 - ((z - 55.0 * k) / (apex - 55.0 * k)) ** 2, 0.0, 1.0)) * (z > 55.0 * k) \
            + (z <= 55.0 * k)
        lateral = (np.abs(x) - 72.0 * k) / (62.0 * k * np.maximum(taper, 0.05))
        ap = (y - 8.0 * k) / (92.0 * k * np.maximum(taper, 0.05))
        lobe = ((np.sqrt(lateral**2 + ap**2) - 1.0) * 60.0 * k * np.maximum(taper, 0.05)).astype(np.float32)
        above = (self._diaphragm(x, y) - z).astype(np.float32)
        below_apex = (z - apex).astype(np.float32)
        mediastinum = (14.0 * k + 10.0 * k * (y < 0) - np.abs(x)).astype(np.float32)
        heart = self.heart_sdf(x, y, z)
        spine = self.spine_sdf(x, y, z, solid=True) - 6.0
        aorta = self.aorta.sdf(x, y, z) - 3.0 if self.aorta is not None else np.inf
        trachea = self.airways[0].sdf(x, y, z) - 4.0 if self.airways else np.inf
        out = np.maximum.reduce([cavity, lobe, above, below_apex, mediastinum, -(heart - 4.0), -spine])
        return np.maximum(np.maximum(out, -aorta), -trachea).astype(np.float32)

    def heart_sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        k = self.scale
        # long axis towards the left, front and down: rotate 35 degrees about z and 20 about y
        c = np.array([18.0, -30.0, 42.0]) * k
        a, b = np.deg2rad(35.0), np.deg2rad(20.0)
        px, py, pz = x - c[0], y - c[1], z - c[2]
        qx = np.cos(a) * px + np.sin(a) * py
        qy = -np.sin(a) * px + np.cos(a) * py
        rx = np.cos(b) * qx - np.sin(b) * pz
        rz = np.sin(b) * qx + np.cos(b) * pz
        return _ellipsoid(rx, qy, rz, (0.0, 0.0, 0.0), (56.0 * k, 42.0 * k, 46.0 * k))

    def spine_sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, solid: bool = False) -> np.ndarray:
        """The vertebral column: bodies, the ring of posterior elements and the spinous process
        (``solid``: with the canal filled, for keeping the lungs off it)."""
        k = self.scale
        yb = self.half_depth - self.fat - 58.0 * k
        body = _ellipse2d(x, y, (0.0, yb), (19.0 * k, 16.0 * k))
        canal_c = (0.0, yb + 26.0 * k)
        ring = _ellipse2d(x, y, canal_c, (15.0 * k, 12.0 * k))
        canal = _ellipse2d(x, y, canal_c, (8.0 * k, 7.0 * k))
        spinous = np.maximum(np.abs(x) - 4.0 * k, np.abs(y - (yb + 44.0 * k)) - 10.0 * k)
        column = np.minimum.reduce([body, ring, spinous])
        if not solid:
            column = np.maximum(column, -canal)
        return column.astype(np.float32)

    # -- rendering ----------------------------------------------------------------------------------

    def render(self, lps: np.ndarray, ramp_mm: float) -> Rendered:
        """HU and labels at patient points ``lps`` ``(3, ...)``; ``ramp_mm``: partial-volume ramp width."""
        shape = lps.shape[1:]
        x, y, z = self.to_body(lps.reshape(3, -1))
        w = np.float32(max(ramp_mm, 1e-3))
        hu = np.full(x.shape, HU["air"], dtype=np.float32)
        labels = np.zeros(x.shape, dtype=np.uint8)
        table_y = self.table_side * (self.half_depth + 22.0)
        table = np.maximum(np.abs(y - table_y) - 6.0, np.abs(x) - 0.9 * self.half_width)
        hu += np.clip(0.5 - table / w, 0.0, 1.0) * np.float32(HU["table"] - HU["air"])
        inside = np.flatnonzero(self.body_sdf(x, y) < w)  # everything else is air (or table)
        if inside.size:
            h, lab = self._render_body(x[inside], y[inside], z[inside], w)
            hu[inside], labels[inside] = h, lab
        return Rendered(hu.reshape(shape), labels.reshape(shape))

    def _render_body(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, w: np.float32
                     ) -> tuple[np.ndarray, np.ndarray]:
        """HU and labels at body-frame points (1-D arrays) inside the body; structures whose extent along the
        body axis misses the points are skipped."""
        k = self.scale
        hu = np.full(x.shape, HU["air"], dtype=np.float32)
        labels = np.zeros(x.shape, dtype=np.uint8)
        z_lo, z_hi = float(z.min()), float(z.max())

        def reaches(lo: float, hi: float) -> bool:
            return hi >= z_lo - 10.0 and lo <= z_hi + 10.0

        def paint(sdf: np.ndarray, value: float | np.ndarray, label: int | None = None) -> None:
            frac = np.clip(0.5 - sdf / w, 0.0, 1.0).astype(np.float32)
            hu[...] = hu + frac * (np.float32(value) - hu)
            if label is not None:
                labels[sdf <= 0] = label

        tex = self.texture(x, y, z) if self.texture is not None else np.zeros_like(x)
        # the body: fat, muscle, and inside fat mixed with soft tissue (more of it in the abdomen)
        paint(self.body_sdf(x, y), HU["fat"])
        paint(self.body_sdf(x, y, self.fat), HU["muscle"])
        inner = self.body_sdf(x, y, self.fat + 14.0 * k)
        diaphragm = self._diaphragm(x, y)
        soft = np.where(z < diaphragm, HU["fat"] + 110.0 * np.clip(tex + 0.3, 0, 1), HU["fat"] + 15.0 * tex)
        paint(inner, soft.astype(np.float32))
        # ribs (bands in the chest wall) and the sternum
        if reaches(-90.0 * k, 170.0 * k):
            rib_shell = np.maximum(self.body_sdf(x, y, self.fat + 6.0 * k), -self.body_sdf(x, y, self.fat + 15.0 * k))
            slope = 20.0 * k * (1.0 - y / self.half_depth)  # ribs run down from the spine to the front
            band = np.abs(((z - 7.0 * k + slope) % (26.0 * k)) - 13.0 * k) - 5.0 * k
            gap = np.where(y < 0, 30.0 * k - np.abs(x), -1e3).astype(np.float32)  # costal cartilage: no rib in front
            paint(np.maximum.reduce([rib_shell, band, gap, z - 170.0 * k, -z - 90.0 * k]), HU["bone"])
            if reaches(5.0 * k, 150.0 * k):
                paint(np.maximum.reduce([np.abs(x) - 14.0 * k, rib_shell, z - 150.0 * k, -z + 5.0 * k]),
                      HU["bone"] * 0.7)
        # organs below the diaphragm
        below = (z - diaphragm).astype(np.float32)  # > 0 above
        liver: np.ndarray | float = np.inf
        if reaches(-130.0 * k, 40.0 * k):
            liver = np.maximum(_ellipsoid(x, y, z, (-52.0 * k, -8.0 * k, -48.0 * k), (92.0 * k, 88.0 * k, 78.0 * k)),
                               np.maximum(below + 3.0, inner))
            paint(liver, HU["liver"] + 6.0 * tex, 5)
        if reaches(-92.0 * k, 10.0 * k):
            spleen = np.maximum(_ellipsoid(x, y, z, (78.0 * k, 42.0 * k, -42.0 * k), (32.0 * k, 52.0 * k, 48.0 * k)),
                                np.maximum(below + 3.0, inner))
            paint(spleen, HU["spleen"] + 4.0 * tex, 6)
            stomach = np.maximum(_ellipsoid(x, y, z, (48.0 * k, -28.0 * k, -38.0 * k), (42.0 * k, 36.0 * k, 40.0 * k)),
                                 np.maximum.reduce([below + 4.0, inner, -(spleen - 3.0), -(liver - 3.0)]))
            paint(stomach, HU["stomach"])
            paint(np.maximum(stomach, -(y + 40.0 * k)), HU["air"])  # gas in the front of the stomach
        if reaches(-158.0 * k, -42.0 * k):
            for side in (-1.0, 1.0):
                kidney = _ellipsoid(x, y, z, (side * 62.0 * k, 52.0 * k, -100.0 * k), (28.0 * k, 30.0 * k, 55.0 * k))
                paint(np.maximum(kidney, inner), HU["kidney"] + 4.0 * tex, 7)
        # lungs, the vessels inside them, nodules
        if reaches(-60.0 * k, 175.0 * k):
            lung = self.lung_sdf(x, y, z)
            paint(lung, HU["lung"] + 25.0 * tex, 1)
            for v in self.vessels:
                lo, hi = v.bounds()
                if reaches(float(lo[2]), float(hi[2])):
                    paint(np.maximum(v.sdf(x, y, z), lung), HU["blood"])
            for n in self.nodules:
                self._paint_nodule(paint, n, x, y, z)
        # mediastinum: heart in its fat, aorta, airways; then the spine
        if reaches(-25.0 * k, 105.0 * k):
            heart = self.heart_sdf(x, y, z)
            paint(heart - 4.0, HU["fat"])
            paint(heart, HU["blood"] + 5.0 * tex, 3)
        if self.aorta is not None:
            paint(self.aorta.sdf(x, y, z), HU["blood"], 4)
        for i, tube in enumerate(self.airways):
            lo, hi = tube.bounds()
            if reaches(float(lo[2]), float(hi[2])):
                outer = tube.sdf(x, y, z)
                paint(outer, HU["muscle"], 2)
                paint(outer + (1.8 if i == 0 else 1.2) * k, HU["air"])
        spine = self.spine_sdf(x, y, z)
        disc = np.abs(((z + 4.0 * k) % (32.0 * k)) - 16.0 * k) - 2.5 * k  # discs between the bodies
        paint(spine, np.where(disc < 0, HU["disc"], HU["vertebra"] + 40.0 * tex).astype(np.float32), 8)
        canal = _ellipse2d(x, y, (0.0, self.half_depth - self.fat - 58.0 * k + 26.0 * k), (8.0 * k, 7.0 * k))
        paint(canal, HU["csf"])
        return hu, labels

    def _paint_nodule(self, paint: Callable[..., None], n: Nodule, x: np.ndarray, y: np.ndarray,
                      z: np.ndarray) -> None:
        c = self.to_body(np.asarray(n.center_lps, dtype=np.float64).reshape(3, 1)).ravel()
        r = n.diameter_mm / 2.0
        lo, hi = c - r - 4.0, c + r + 4.0
        near = (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])
        if not near.any():
            return
        dist = np.full(x.shape, np.inf, dtype=np.float32)
        dist[near] = np.sqrt((x[near] - c[0]) ** 2 + (y[near] - c[1]) ** 2 + (z[near] - c[2]) ** 2)
        if n.kind == "part-solid":
            paint(dist - r, HU["ggo"], 1)
            paint(dist - r * n.core_fraction, n.hu, 1)
        else:
            paint(dist - r, n.hu, 1)

    # -- nodules ------------------------------------------------------------------------------------

    def place_nodules(self, rng: np.random.Generator, count: int, z_limits: tuple[float, float]) -> list[Nodule]:
        """``count`` nodules in the lungs within body z ``z_limits``, not touching each other.

        Diameters 3-30 mm (log-uniform, so small ones are common); about a quarter part-solid;
        placements interior / pleural / vascular in about 2 : 1 : 1.
        """
        k = self.scale
        # candidate points in the lungs' bounding box, with their lung SDF and distance to a vessel
        n = 6000
        cand = np.stack([rng.uniform(-135 * k, 135 * k, n), rng.uniform(-90 * k, 100 * k, n),
                         rng.uniform(max(z_limits[0], -40 * k), min(z_limits[1], 170 * k), n)]).astype(np.float32)
        lung = self.lung_sdf(*cand)
        vessel = np.full(n, np.inf, dtype=np.float32)
        for v in self.vessels:
            vessel = np.minimum(vessel, v.sdf(*cand))
        placed: list[Nodule] = []
        centres: list[np.ndarray] = []
        for _ in range(count):
            diameter = float(np.exp(rng.uniform(np.log(3.0), np.log(30.0))))
            r = diameter / 2
            placement: Placement = rng.choice(["interior", "interior", "pleural", "vascular"])  # type: ignore[assignment]
            kind: Kind = "part-solid" if rng.random() < 0.25 and diameter >= 6.0 else "solid"
            for mode in (placement, "interior"):
                if mode == "interior":
                    ok = (lung < -(r + 3.0)) & (vessel > r + 2.0)
                elif mode == "pleural":
                    ok = (lung > -0.7 * r) & (lung < -0.3 * r - 0.5) & (vessel > r + 2.0)
                else:  # touching a vessel (centre one radius off its wall), inside the lung
                    ok = (np.abs(vessel - r * 0.9) < max(0.6, 0.15 * r)) & (lung < -(r + 2.0))
                for c in centres:
                    ok &= np.linalg.norm(cand - c[:, None], axis=0) > (r + 20.0)
                idx = np.flatnonzero(ok)
                if idx.size:
                    pick = cand[:, int(rng.choice(idx))].astype(np.float64)
                    placement = mode  # type: ignore[assignment]
                    break
            else:
                continue
            centres.append(pick.astype(np.float32))
            centre = self.to_lps(pick)
            placed.append(Nodule(
                center_lps=(round(float(centre[0]), 3), round(float(centre[1]), 3), round(float(centre[2]), 3)),
                diameter_mm=round(diameter, 3), kind=kind, placement=placement,
                core_fraction=round(float(rng.uniform(0.35, 0.6)), 3) if kind == "part-solid" else 1.0,
                hu=round(float(rng.uniform(15.0, 60.0)), 1),
            ))
        self.nodules = placed
        return placed
