"""Group DICOM frames into series, split mixed series, order slices and judge their geometry.

Input: instance headers (:mod:`medpipe.dicom.header`). Output: :class:`Stack` objects, each one
3D or 4D volume to build, with a status (``ok`` / ``warning`` / ``rejected``), the reasons, and
a frame grid ``grid[k][t]`` (slice ``k`` sorted along the slice normal, time point ``t``).

Slices are ordered by their position along the slice normal, never by InstanceNumber or file
name. Frames at the same position form a time series (4D) when every position has the same count.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from medpipe.dicom.geometry import TILT_TOL_DEG, StackGeometry, analyse_stack, orientation_label, slice_normal
from medpipe.dicom.header import MISSING_UID_SERIES_KEYS, SYNTHETIC_SERIES_PREFIX, FrameInfo, InstanceHeader

#: fewer distinct slice positions than this (but more than one) cannot be checked: rejected
MIN_SLICES = 3
#: positions closer than this along the normal (mm) count as the same slice position
SAME_POSITION_TOL = 0.01


@dataclass
class FrameRef:
    key: str  # source key of the file
    header: InstanceHeader
    frame: FrameInfo


@dataclass
class Stack:
    """One output volume: frames of one series that share orientation, size, echo and type."""

    series_uid: str
    part: str  # "" when the series was not split, else what distinguishes this part
    frames: list[FrameRef]
    split_key: str = ""  # the full key this part was split by (labels can coincide, keys cannot)
    status: str = "ok"
    reasons: list[str] = field(default_factory=list)
    grid: list[list[FrameRef]] = field(default_factory=list)  # [slice k][time t]
    geometry: StackGeometry | None = None
    resample: bool = False  # uneven spacing or tilt: resample onto a uniform orthogonal grid

    @property
    def stack_id(self) -> str:
        if not self.part:
            return self.series_uid
        digest = hashlib.sha1(self.split_key.encode()).hexdigest()[:8]
        return f"{self.series_uid}#{digest}"

    @property
    def first(self) -> InstanceHeader:
        return self.frames[0].header

    @property
    def keys(self) -> list[str]:
        return sorted({f.key for f in self.frames})

    @property
    def n_slices(self) -> int:
        return len(self.grid)

    @property
    def n_times(self) -> int:
        return len(self.grid[0]) if self.grid else 0

    def reject(self, reason: str) -> None:
        self.status = "rejected"
        self.reasons.append(reason)

    def note(self, reason: str) -> None:
        """Record what was done without changing the status."""
        self.reasons.append(reason)

    def warn(self, reason: str) -> None:
        if self.status == "ok":
            self.status = "warning"
        self.reasons.append(reason)


def _split_key(ref: FrameRef) -> tuple:
    f, h = ref.frame, ref.header
    return (
        tuple(round(v, 4) for v in f.iop),
        (h.mosaic[1], h.mosaic[2]) if h.mosaic else (h.rows, h.columns),
        tuple(round(v, 4) for v in f.spacing),
        f.echo,
        f.image_type.upper(),
    )


def _describe_split(keys: list[tuple]) -> list[str]:
    """Which of the split-key fields differ between the parts of one series."""
    names = ["orientations", "image sizes", "pixel spacings", "echoes", "image types"]
    return [names[i] for i in range(len(names)) if len({k[i] for k in keys}) > 1]


def _type_labels(types: set[str]) -> dict[str, str]:
    """Shorten ImageType values to the components that differ between them (ORIGINAL\\PRIMARY\\M -> M)."""
    split = {t: t.split("\\") for t in types}
    n = max((len(v) for v in split.values()), default=0)
    keep = [i for i in range(n) if len({v[i] if i < len(v) else "" for v in split.values()}) > 1]
    return {t: "\\".join(v[i] for i in keep if i < len(v)) or t for t, v in split.items()}


def _part_label(key: tuple, differing: list[str], type_labels: dict[str, str]) -> str:
    iop, size, spacing, echo, itype = key
    bits = []
    if "orientations" in differing:
        bits.append(orientation_label(iop))
    if "image sizes" in differing:
        bits.append(f"{size[1]}x{size[0]}")  # columns x rows, as the volume's shape
    if "pixel spacings" in differing:
        bits.append(f"{spacing[0]:g}x{spacing[1]:g}mm")
    if "echoes" in differing:
        bits.append(echo or "no-echo")
    if "image types" in differing:
        bits.append(type_labels.get(itype) or "no-type")
    return " ".join(bits)


def group_stacks(instances: list[tuple[str, InstanceHeader]]) -> list[Stack]:
    """Group instances by Series Instance UID, split mixed series, and check each part."""
    by_series: dict[str, list[FrameRef]] = defaultdict(list)
    for path, header in instances:
        for frame in header.frames:
            by_series[header.series_uid].append(FrameRef(path, header, frame))
    stacks: list[Stack] = []
    for series_uid in sorted(by_series):
        refs = by_series[series_uid]
        parts: dict[tuple, list[FrameRef]] = defaultdict(list)
        for ref in refs:
            parts[_split_key(ref)].append(ref)
        keys = sorted(parts, key=lambda k: min(r.header.instance_number or 0 for r in parts[k]))
        differing = _describe_split(keys) if len(keys) > 1 else []
        type_labels = _type_labels({k[4] for k in keys})
        for split in keys:
            stack = Stack(series_uid, _part_label(split, differing, type_labels), parts[split], split_key=repr(split))
            if series_uid.startswith(SYNTHETIC_SERIES_PREFIX):
                stack.warn(
                    "no Series Instance UID (de-identified?): files grouped by "
                    + "/".join(MISSING_UID_SERIES_KEYS)
                )
            if differing:
                stack.note(f"series split by {', '.join(differing)} into {len(keys)} volumes; this part: {stack.part}")
            plan_stack(stack)
            stacks.append(stack)
    return stacks


def _is_localizer(stack: Stack) -> bool:
    return any("LOCALIZER" in ref.frame.image_type.upper().split("\\") for ref in stack.frames)


def plan_stack(stack: Stack) -> None:
    """Order the frames of ``stack`` into a [slice][time] grid and judge its geometry."""
    if _is_localizer(stack):
        stack.reject("localizer (scout) images: not a diagnostic volume")
        return
    iop = stack.frames[0].frame.iop
    normal = slice_normal(iop)
    first = stack.frames[0]
    if first.header.mosaic and len(first.header.frames) > 1:
        # keep a mosaic's own slice order (its CSA normal may point against row x column), as dcm2niix does
        tiles = first.header.frames
        if float(np.dot(np.subtract(tiles[1].ipp, tiles[0].ipp), normal)) < 0:
            normal = -normal
    dist = np.array([np.dot(ref.frame.ipp, normal) for ref in stack.frames])
    order = np.argsort(dist, kind="stable")
    # cluster frames by position along the normal
    positions: list[list[FrameRef]] = []
    last = None
    for idx in order:
        if last is None or dist[idx] - last > SAME_POSITION_TOL:
            positions.append([])
        positions[-1].append(stack.frames[idx])
        last = dist[idx]
    counts = {len(p) for p in positions}
    if len(counts) > 1:
        lo, hi = min(counts), max(counts)
        stack.reject(
            f"inconsistent frames per slice position ({lo} to {hi} at {len(positions)} positions): "
            "incomplete time series or duplicate slices"
        )
        return
    for p in positions:
        p.sort(key=lambda r: (r.frame.temporal, r.header.sop_uid, r.frame.index))
    stack.grid = positions
    n = len(positions)
    if n == 1:
        stack.warn("single slice: written as a 2D image")
        return
    if n < MIN_SLICES:
        stack.reject(f"too few slices ({n} < {MIN_SLICES}) to form a checked volume")
        return
    ipps = np.array([p[0].frame.ipp for p in positions])
    geo = analyse_stack(iop, ipps, normal)
    stack.geometry = geo
    if geo.spacing <= 0:
        stack.reject("slice spacing is zero")
        return
    if not geo.uniform:
        extent = float(geo.distances[-1])
        target = int(round(extent / geo.spacing)) + 1
        if target > 4 * n:
            stack.reject(
                f"slice gaps too irregular to resample (gaps {geo.gaps.min():.3g}-{geo.gaps.max():.3g} mm)"
            )
            return
        what = (
            f"{geo.missing_slices} missing slice(s)"
            if geo.missing_slices
            else f"uneven slice spacing (gaps {geo.gaps.min():.4g}-{geo.gaps.max():.4g} mm)"
        )
        stack.resample = True
        stack.warn(
            f"{what}: resampled onto a uniform {geo.spacing:.4g} mm grid ({n} -> {target} slices, linear)"
        )
    if geo.tilt_deg > TILT_TOL_DEG:
        stack.resample = True
        stack.warn(f"gantry tilt / sheared stack ({geo.tilt_deg:.2f} deg): resampled onto an orthogonal grid")
