"""Volume geometry (remote code): reorientation to the closest canonical RAS grid, slice choice by count and spacing,
the radiological display of each slice, and the frames of a volume. Conventions: media_omnivmed.py's docstring.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .intensity_omnivmed import check_finite, normalise
from .media_base_omnivmed import AXIS_CODES, SLICE_AXES, Media, MediaError, Options, jsonable


def closest_canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """(3, 2) [RAS axis, +1/-1] per array axis: greedy match of each axis to its closest world axis."""
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    ornt = np.full((3, 2), np.nan)
    if not np.all(norms > 1e-9):
        return ornt  # degenerate: reported by volume_media
    directions = affine[:3, :3] / norms
    cost = np.abs(directions).copy()
    for _ in range(3):
        world, axis = np.unravel_index(np.argmax(cost), cost.shape)
        ornt[axis] = (world, 1.0 if directions[world, axis] > 0 else -1.0)
        cost[world, :], cost[:, axis] = -1.0, -1.0
    return ornt


def _axcodes(ornt: np.ndarray) -> str:
    return "".join(AXIS_CODES[int(a)][1 if f > 0 else 0] for a, f in ornt)


@dataclasses.dataclass
class Grid:
    """A 3D array-like in stored voxel order plus how it maps to RAS (affine None: no geometry)."""

    data: Any  # supports data[(i, j, k)] with one int index and two slice(None)
    shape: tuple[int, ...]
    affine: np.ndarray | None  # stored voxel -> RAS mm
    ornt: np.ndarray | None = None  # per stored axis: (canonical axis, flip)
    stack_centres: np.ndarray | None = None  # (shape[0], 3) true RAS centres of axis-0 slices (DICOM)

    def _source_axis(self, axis: int) -> int:
        return int(np.flatnonzero(self.ornt[:, 0] == axis)[0])

    def canonical_shape(self) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for i, (a, _) in enumerate(self.ornt):
            out[int(a)] = int(self.shape[i])
        return tuple(out)

    def canonical_affine(self) -> np.ndarray:
        """Affine of the reoriented grid (what nibabel's as_closest_canonical would report)."""
        to_stored = np.zeros((4, 4))
        to_stored[3, 3] = 1.0
        for i, (a, flip) in enumerate(self.ornt):
            to_stored[i, int(a)] = flip
            to_stored[i, 3] = 0.0 if flip > 0 else self.shape[i] - 1
        return self.affine @ to_stored

    def display_slice(self, axis: int, k: int) -> np.ndarray:
        """Slice k of the reoriented volume along RAS axis `axis`, in radiological display orientation."""
        if self.affine is None:  # no geometry: slices of the stored axis 0, shown as stored
            return np.asarray(self.data[(k, slice(None), slice(None))])
        i = self._source_axis(axis)
        idx = [slice(None)] * 3
        idx[i] = k if self.ornt[i, 1] > 0 else self.shape[i] - 1 - k
        plane = np.asarray(self.data[tuple(idx)])  # stored dtype: range checks happen before float32
        rest = [j for j in range(3) if j != i]
        for pos, j in enumerate(rest):
            if self.ornt[j, 1] < 0:
                plane = np.flip(plane, pos)
        if self.ornt[rest[0], 0] > self.ornt[rest[1], 0]:
            plane = plane.T
        # plane is now (first remaining RAS axis, second); see the module docstring for the convention.
        return np.ascontiguousarray(plane.T[::-1, ::-1])

    def slice_centres(self, axis: int) -> np.ndarray:
        """(n, 3) RAS centre of every slice of the reoriented volume along `axis`."""
        i = self._source_axis(axis)
        if i == 0 and self.stack_centres is not None:
            return self.stack_centres if self.ornt[0, 1] > 0 else self.stack_centres[::-1]
        shape = self.canonical_shape()
        vox = np.tile([(n - 1) / 2 for n in shape] + [1.0], (shape[axis], 1))
        vox[:, axis] = np.arange(shape[axis])
        return (vox @ self.canonical_affine().T)[:, :3]

    def zooms(self) -> np.ndarray:
        return np.linalg.norm(self.canonical_affine()[:3, :3], axis=0)


def _choose_slices(positions: np.ndarray | None, n: int, max_slices: int, min_spacing: float | None) -> list[int]:
    """Indices of the slices to keep: all of them, or ones evenly spaced in mm (by index without positions)."""
    if positions is None or n < 2:
        if n <= max_slices:
            return list(range(n))
        return sorted({int(round(x)) for x in np.linspace(0, n - 1, max_slices)})
    extent = float(positions[-1] - positions[0])
    count = n
    if min_spacing is not None and extent > 0:
        count = min(count, int(math.floor(extent / min_spacing + 1e-6)) + 1)
    count = min(count, max_slices)
    if count == n:
        return list(range(n))
    targets = np.linspace(positions[0], positions[-1], count)
    return sorted(set(nearest(positions, targets)))


def nearest(sorted_values: np.ndarray, targets: np.ndarray) -> list[int]:
    """Index of the value nearest each target; near-ties go to the earlier value."""
    values = np.asarray(sorted_values, dtype=np.float64)
    if values.size == 1:
        return [0] * len(targets)
    j = np.clip(np.searchsorted(values, targets), 1, values.size - 1)
    left, right = values[j - 1], values[j]
    take_left = (np.asarray(targets) - left) <= (right - np.asarray(targets)) + 1e-6
    return [int(x) for x in np.where(take_left, j - 1, j)]


# bit_scale value for volume_media: divide by 255 when every value read is an integer in 0..255 (display-ready
# 8-bit content), else percentiles; so equal physical values give equal frames whatever dtype stores them.
EIGHT_BIT_VALUES = "8-bit values"


def _eight_bit_divisor(raw: np.ndarray, label: str, warnings: list[str]) -> float | None:
    if raw.size == 0:
        return None
    lo, hi = float(raw.min()), float(raw.max())
    if lo < 0 or hi > 255 or (raw.dtype.kind == "f" and bool((raw != np.round(raw)).any())):
        return None
    if hi == lo:
        warnings.append(f"{label}: constant data (every value is {lo:g})")
    elif hi < 16:
        warnings.append(
            f"{label}: 8-bit values that only reach {hi:g} of 255 (a label map or mask?): frames are nearly "
            f"black; pass window=({hi / 2:g}, {max(hi, 1.0):g}) to stretch them"
        )
    return 255.0


def volume_media(grid: Grid, label: str, opts: Options, meta: dict, *, windows, bit_scale,
                  monochrome1: bool = False) -> Media:
    warnings = meta.setdefault("warnings", [])
    if grid.affine is not None:
        if np.isnan(grid.ornt).any():
            raise MediaError(f"{label}: degenerate affine {grid.affine.tolist()}: cannot tell the orientation")
        axis = SLICE_AXES[opts.slice_axis]
        n = grid.canonical_shape()[axis]
        centres = grid.slice_centres(axis)
        positions = centres[:, axis]
        meta.update(orientation=_axcodes(grid.ornt), reoriented_to="RAS", display="radiological",
                    slice_axis=opts.slice_axis, affine_ras=grid.canonical_affine().round(6).tolist())
    else:
        axis, n, centres, positions = 0, int(grid.shape[0]), None, None
        meta.update(orientation=None, reoriented_to=None, display="as stored", slice_axis="stack")
        if opts.slice_axis != "axial":
            warnings.append(f"slice_axis={opts.slice_axis!r} ignored: no geometry, slices kept as stored")
    idx = _choose_slices(positions, n, opts.max_slices, opts.min_slice_spacing_mm)
    raw = np.stack([grid.display_slice(axis, k) for k in idx])
    raw = check_finite(raw, label, opts.nan_policy, warnings)
    if isinstance(bit_scale, str):  # EIGHT_BIT_VALUES: decided on the values read, not the stored dtype
        bit_scale = None if windows is not None else _eight_bit_divisor(raw, label, warnings)
    raw = raw.astype(np.float32, copy=False)
    frames, info = normalise(raw, windows=windows, bit_scale=bit_scale, percentiles=opts.percentiles,
                              label=label, warnings=warnings)
    if monochrome1:
        frames = 1.0 - frames
    meta.update(n_slices_total=n, intensity=info)

    spacing = positions_out = None
    if grid.affine is not None:
        zooms = grid.zooms()
        others = [a for a in range(3) if a != axis]  # display rows follow the second, columns the first
        between = (float(np.linalg.norm(np.diff(centres[idx], axis=0), axis=1).mean()) if len(idx) > 1
                   else float(zooms[axis]))
        spacing = (between, float(zooms[others[1]]), float(zooms[others[0]]))
        positions_out = [float(p) for p in positions[idx]]
    return Media(frames=frames, kind="volume", source=label, spacing_mm=spacing, slice_positions_mm=positions_out,
                 slice_indices=[int(k) for k in idx], metadata=jsonable(meta))
