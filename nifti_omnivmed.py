"""NIfTI (remote code, nibabel): header checks, affine and units, scaling, only the needed slices read from
uncompressed files, 4D volume choice. Conventions: media_omnivmed.py's docstring.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .intensity_omnivmed import windows_for
from .media_base_omnivmed import Media, MediaError, Options, extension, require, what_it_looks_like
from .volume_omnivmed import EIGHT_BIT_VALUES, Grid, volume_media


def _check_gzip_crc(path: Path, label: str) -> None:
    """nibabel stops reading a .nii.gz once it has the voxels it needs, before the gzip trailer whose CRC would
    reveal a corrupted byte: read the stream to its end so such a file is refused instead of read as wrong values."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise MediaError(f"{label}: corrupt gzip stream, its CRC check failed or it is truncated ({e})") from e


class _ProxySlicer:
    """Reads one 3D volume of a (possibly 4D) image lazily through nibabel's ArrayProxy."""

    def __init__(self, proxy, tail: tuple[int, ...], label: str):
        self.proxy, self.tail, self.label = proxy, tail, label

    def __getitem__(self, idx):
        try:
            return np.asarray(self.proxy[(*idx, *self.tail)])
        except Exception as e:
            raise MediaError(
                f"{self.label}: cannot read NIfTI data, file truncated or corrupt ({type(e).__name__}: {e})"
            ) from e


def load_nifti(path: Path, label: str, opts: Options) -> Media:
    nib = require("nibabel", "nibabel", "NIfTI files")
    try:
        img = nib.load(os.fspath(path), mmap=False)  # no mmap: a short file must not fault later
        shape = tuple(int(s) for s in img.shape)  # header only
    except Exception as e:
        raise MediaError(
            f"{label}: not a readable NIfTI file ({_nifti_header_problem(path) or f'{type(e).__name__}: {e}'})"
            f"{what_it_looks_like(path)}"
        ) from e
    header = img.header
    if getattr(img, "affine", None) is None or not hasattr(header, "get_data_dtype"):  # e.g. CIFTI-2 matrices
        raise MediaError(f"{label}: a {type(img).__name__} file is not an image volume (no voxel grid / affine)")
    if 0 in shape:
        axis = shape.index(0)
        what = "0 volumes (its 4th dimension has length 0)" if axis == 3 else f"axis {axis} has length 0"
        raise MediaError(f"{label}: NIfTI of shape {shape} holds no data: {what}")
    spatial = (shape + (1, 1, 1))[:3]
    n_vox = math.prod(spatial)
    if n_vox > opts.max_voxels:
        raise MediaError(
            f"{label}: header claims {n_vox} voxels ({'x'.join(map(str, spatial))}), "
            f"more than max_voxels={opts.max_voxels}"
        )
    extra = list(shape[3:])
    while extra and extra[-1] == 1:
        extra.pop()
    if len(extra) > 1:
        raise MediaError(
            f"{label}: {len(shape)}D NIfTI of shape {shape} is not supported (3D, or 4D with volume_index)"
        )
    volume = _pick_volume(label, extra[0] if extra else None, opts.volume_index)
    dtype = np.dtype(header.get_data_dtype())
    if dtype.kind not in "biuf":
        raise MediaError(f"{label}: NIfTI data type {dtype} (e.g. RGB or complex) is not supported")
    _check_nifti_size(path, label, img, shape, dtype)

    # Trailing indices that pick one 3D volume out of a 4D (or singleton-padded) file.
    tail = () if len(shape) <= 3 else (volume or 0,) + (0,) * (len(shape) - 4)
    reader = _ProxySlicer(img.dataobj, tail, label)
    if extension(path) in (".nii.gz", ".mgz") or len(shape) < 3:
        # Each lazy slice read of a gzip stream decompresses from the start: read the volume once
        # instead (bounded by max_voxels above).
        data = reader[(slice(None),) * min(len(shape), 3)].reshape(spatial)
        if extension(path) == ".nii.gz":
            _check_gzip_crc(path, label)
    else:
        data = reader  # uncompressed: each slice is read from disk on demand

    warnings: list[str] = []
    meta = {"format": type(img).__name__, "original_shape": list(shape), "dtype": str(dtype),
            "modality": opts.modality, "zooms_mm": [float(z) for z in header.get_zooms()[:3]], "warnings": warnings}
    # nibabel moves scl_slope / scl_inter from the header into the data proxy when it loads a file (the
    # loaded header reads NaN), and the proxy applies them: what it returns are the physical values.
    slope, inter = (float(getattr(img.dataobj, a, d)) for a, d in (("slope", 1.0), ("inter", 0.0)))
    if (slope, inter) != (1.0, 0.0):
        meta["scaling"] = {"scl_slope": slope, "scl_inter": inter}
    if extra:
        meta.update(n_volumes=int(extra[0]), volume_index=volume)
    affine = _nifti_affine(img, path, label, warnings)
    ornt = nib.io_orientation(affine)
    grid = Grid(data=data, shape=spatial, affine=affine, ornt=ornt)
    return volume_media(grid, label, opts, meta, windows=windows_for(opts, label), bit_scale=EIGHT_BIT_VALUES)


def _nifti_affine(img, path: Path, label: str, warnings: list[str]) -> np.ndarray:
    """The voxel -> RAS mm affine nibabel uses, refused when not finite; doubtful geometry is reported in
    ``warnings`` (missing orientation, zero voxel sizes, shear, sform/qform disagreement, non-mm units)."""
    import nibabel as nib

    header = img.header
    affine = np.asarray(img.affine, dtype=np.float64)
    if not hasattr(header, "get_sform"):  # MGH: geometry always present in its own form
        if not np.isfinite(affine).all():
            raise MediaError(f"{label}: the header's affine is not finite (NaN/inf): {affine.tolist()}")
        return affine
    codes = {"sform": int(header["sform_code"]), "qform": int(header["qform_code"])}
    raw = _raw_nifti_header(img, path)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64) if raw is not None else None
    if not np.isfinite(affine).all():
        source = ("sform (srow_x/y/z)" if codes["sform"] > 0 else
                  "qform (quatern_b/c/d, qoffset, pixdim)" if codes["qform"] > 0 else "pixdim")
        raise MediaError(
            f"{label}: the header's {source} holds NaN/inf, so the voxel-to-world affine is not finite: "
            f"{np.round(affine, 4).tolist()}; orientation and spacing are unknown"
        )
    if codes["sform"] == 0 and codes["qform"] == 0:
        stored = (f"sform_code {int(raw['sform_code'])}, qform_code {int(raw['qform_code'])}" if raw is not None
                  else "sform_code and qform_code 0")
        warnings.append(
            f"{label}: no valid orientation in the header ({stored}): orientation "
            f"{''.join(c or '?' for c in nib.aff2axcodes(affine))} and positions are nibabel's fallback from "
            "pixdim, not the scanner's; left/right may be wrong"
        )
    if codes["sform"] == 0 and pixdim is not None and (pixdim == 0).any():
        warnings.append(
            f"{label}: voxel sizes pixdim[1:4] = {pixdim.tolist()} include 0: nibabel took 1 mm for those, "
            "so spacing and positions are guesses"
        )
    if codes["sform"] == 0 and pixdim is not None and (pixdim < 0).any():
        warnings.append(
            f"{label}: voxel sizes pixdim[1:4] = {pixdim.tolist()} include negative values: nibabel uses their "
            "absolute value, but the tool that wrote them may have meant a flip, so left/right may be wrong"
        )
    if raw is not None and np.isinf(float(raw["scl_slope"])):
        warnings.append(f"{label}: scl_slope is {float(raw['scl_slope'])}, not a valid scaling: the stored "
                        "values are read unscaled, as nibabel does")
    if codes["sform"] > 0 and codes["qform"] > 0:
        try:
            qform = np.asarray(header.get_qform(), dtype=np.float64)
        except Exception:  # an invalid quaternion: nibabel ignores the qform when the sform is set
            qform = np.full((4, 4), np.nan)
        if not np.isfinite(qform).all():
            warnings.append(f"{label}: the qform is invalid (NaN/inf); the sform was used (as nibabel does)")
        elif not np.allclose(qform, affine, atol=1e-3 * max(1.0, np.abs(affine).max())):
            warnings.append(f"{label}: sform and qform disagree; the sform was used (as nibabel does)")
    shear = _shear_deg(affine[:3, :3])
    if shear > 0.01:
        warnings.append(
            f"{label}: the affine is sheared (voxel axes {shear:.2f} degrees from perpendicular): slices are "
            "taken along the stored axes without resampling, so shapes in them are skewed"
        )
    unit = header.get_xyzt_units()[0] if hasattr(header, "get_xyzt_units") else "unknown"
    factor = {"meter": 1000.0, "micron": 0.001}.get(unit)
    if factor is not None:
        warnings.append(f"{label}: spatial unit in the header is {unit}; spacing and positions converted to mm")
        affine = affine.copy()
        affine[:3, :] *= factor
    return affine


def _nifti_header_problem(path: Path) -> str | None:
    """Plain words for header faults nibabel reports cryptically (e.g. 'w2 should be positive')."""
    try:
        import nibabel as nib
        from nibabel.openers import ImageOpener

        with ImageOpener(os.fspath(path)) as f:
            little = struct.unpack("<i", f.read(4))[0]
            f.seek(0)
            size = little if little in (348, 540) else struct.unpack(">i", struct.pack("<i", little))[0]
            header = (nib.Nifti2Header if size == 540 else nib.Nifti1Header).from_fileobj(f, check=False)
    except Exception:
        return None
    b, c, d = (float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d"))
    if int(header["qform_code"]) > 0 and b * b + c * c + d * d > 1 + 1e-6:
        return (f"the qform quaternion (quatern_b, c, d) = ({b:g}, {c:g}, {d:g}) is invalid: "
                "b^2 + c^2 + d^2 must not exceed 1")
    return None


def _raw_nifti_header(img, path: Path):
    """The header as stored (nibabel's loaded header has zero pixdim already replaced by 1)."""
    try:
        from nibabel.openers import ImageOpener

        with ImageOpener(os.fspath(path)) as f:
            return type(img.header).from_fileobj(f, check=False)
    except Exception:  # the raw header only refines warnings; the loaded one was already accepted
        return None


def _shear_deg(m: np.ndarray) -> float:
    """Largest deviation from 90 degrees between two columns (voxel axes) of a 3x3 matrix."""
    cols = m / np.maximum(np.linalg.norm(m, axis=0), 1e-12)
    cosines = np.abs(cols.T @ cols)[np.triu_indices(3, 1)]
    return float(np.degrees(np.arcsin(np.clip(cosines.max(), 0.0, 1.0))))


def _pick_volume(label: str, n_volumes: int | None, volume_index: int | None) -> int | None:
    if n_volumes is None:
        if volume_index not in (None, 0):
            raise MediaError(f"{label}: volume_index={volume_index} given but the file holds a single 3D volume")
        return None
    if volume_index is None:
        raise MediaError(f"{label}: 4D NIfTI with {n_volumes} volumes; pass volume_index (0..{n_volumes - 1})")
    if not isinstance(volume_index, (int, np.integer)) or not 0 <= int(volume_index) < n_volumes:
        raise MediaError(
            f"{label}: volume_index {volume_index!r} out of range; "
            f"the file holds {n_volumes} volumes (0..{n_volumes - 1})"
        )
    return int(volume_index)


def _check_nifti_size(path: Path, label: str, img, shape, dtype) -> None:
    """Uncompressed files: refuse a file shorter than its header says (clear message instead of a read error)."""
    if extension(path) != ".nii":
        return
    offset = int(getattr(img.dataobj, "offset", 0))
    needed = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual < needed:
        raise MediaError(f"{label}: truncated NIfTI file: header needs {needed} bytes, file has {actual}")
