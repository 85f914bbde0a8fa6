"""The voxel grid shared by the four MR series of a synthetic study.

Arrays are indexed ``[slice, row, column]``. The grid is axial (ImageOrientationPatient
``1\\0\\0\\0\\1\\0``): columns run towards patient left (+x in LPS), rows towards posterior
(+y), slices towards superior (+z). The grid is centred on the scanner isocentre (0, 0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medpipe.errors import ConfigError

#: ImageOrientationPatient of every slice (row direction, column direction) in LPS.
AXIAL_ORIENTATION: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class Grid:
    """A square-matrix axial stack of contiguous slices."""

    matrix: int = 128
    pixel_spacing: float = 1.5
    slices: int = 32
    slice_thickness: float = 4.0

    def __post_init__(self) -> None:
        if self.matrix < 8:
            raise ConfigError(f"matrix must be at least 8 pixels, got {self.matrix}")
        if self.slices < 2:
            raise ConfigError(f"slices must be at least 2, got {self.slices}")
        if not (self.pixel_spacing > 0 and self.slice_thickness > 0):
            raise ConfigError(
                f"pixel spacing and slice thickness must be positive, got "
                f"{self.pixel_spacing} and {self.slice_thickness}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slices, self.matrix, self.matrix)

    @property
    def spacing_between_slices(self) -> float:
        """Centre-to-centre distance of adjacent slices (contiguous stack: = thickness)."""
        return self.slice_thickness

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing * self.pixel_spacing * self.spacing_between_slices / 1000.0

    @property
    def origin(self) -> tuple[float, float, float]:
        """LPS position (mm) of the centre of the first pixel of the first (most inferior) slice."""
        half_inplane = (self.matrix - 1) / 2.0 * self.pixel_spacing
        half_z = (self.slices - 1) / 2.0 * self.spacing_between_slices
        return (-half_inplane, -half_inplane, -half_z)

    def slice_position(self, index: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``index`` (0-based, inferior to superior)."""
        x0, y0, z0 = self.origin
        return (x0, y0, z0 + index * self.spacing_between_slices)

    def z_range(self) -> tuple[float, float]:
        """z (mm) of the first and last slice centres."""
        z0 = self.origin[2]
        return (z0, z0 + (self.slices - 1) * self.spacing_between_slices)

    def points(self) -> np.ndarray:
        """LPS coordinates (mm) of all voxel centres, shape ``(3, slices, rows, columns)``, float32."""
        x0, y0, z0 = self.origin
        xs = x0 + np.arange(self.matrix, dtype=np.float32) * np.float32(self.pixel_spacing)
        ys = y0 + np.arange(self.matrix, dtype=np.float32) * np.float32(self.pixel_spacing)
        zs = z0 + np.arange(self.slices, dtype=np.float32) * np.float32(self.spacing_between_slices)
        zz, yy, xx = np.meshgrid(zs, ys, xs, indexing="ij")
        return np.stack([xx, yy, zz]).astype(np.float32, copy=False)
