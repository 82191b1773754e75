"""DICOM (remote code, pydicom): single files, multi-frame files and series (grouped by SeriesInstanceUID, ordered
along the slice normal), rescale and windows, geometry from ImageOrientation/PositionPatient. Conventions:
media_omnivmed.py's docstring.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .intensity_omnivmed import check_finite, check_float32_range, normalise, parse_window
from .media_base_omnivmed import DEFAULT_CT_WINDOW, Media, MediaError, Options, jsonable, require, what_it_looks_like
from .volume_omnivmed import Grid, closest_canonical_ornt, volume_media


logger = logging.getLogger(__name__)


def _read_dicom_header(path: Path, label: str):
    pydicom = require("pydicom", "pydicom", "DICOM files")
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as e:
        raise MediaError(f"{label}: not a DICOM file (no DICM preamble / file meta){what_it_looks_like(path)}") from e
    except Exception as e:  # pydicom raises many types on corrupt headers
        raise MediaError(f"{label}: corrupt DICOM header ({type(e).__name__}: {e})") from e


def _dicom_pixels(path: Path, label: str) -> tuple[np.ndarray, Any]:
    """Decoded pixel data (modality LUT / rescale slope+intercept applied: HU for CT) and the dataset."""
    pydicom = require("pydicom", "pydicom", "DICOM files")
    from pydicom.pixels import apply_rescale

    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise MediaError(f"{label}: unreadable DICOM file ({type(e).__name__}: {e})") from e
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if "Rows" in ds and "Columns" in ds:  # pydicom drops a PixelData element cut off by the end of the file
            raise MediaError(
                f"{label}: the header describes a {ds.Rows}x{ds.Columns} image but the file holds no pixel data: "
                "truncated or corrupt file?"
            )
        raise MediaError(f"{label}: DICOM file has no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    grayscale = int(ds.get("SamplesPerPixel", 1) or 1) == 1
    if grayscale:
        _check_rescale(ds, label)
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing decoder plugin, truncated pixel data, bad group 0028 values...
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        name = f" in transfer syntax {syntax.name} ({syntax})" if syntax is not None else ""
        raise MediaError(f"{label}: cannot decode DICOM pixel data{name} ({type(e).__name__}: {e})") from e
    try:
        if grayscale:
            arr = apply_rescale(arr, ds)
    except Exception as e:  # a malformed Modality LUT
        raise MediaError(f"{label}: cannot apply the DICOM modality LUT ({type(e).__name__}: {e})") from e
    arr = np.asarray(arr)
    check_float32_range(arr, label)
    return arr.astype(np.float32, copy=False), ds


def _check_rescale(ds, label: str) -> None:
    """RescaleSlope / RescaleIntercept must be finite numbers and the slope non-zero: else the physical values
    (HU for CT) are unknown, which must not surface later as 'NaN data' or a blank image."""
    if "ModalityLUTSequence" in ds:
        return  # pydicom uses the LUT and ignores the rescale tags
    for tag in ("RescaleSlope", "RescaleIntercept"):
        if tag not in ds or ds[tag].value in (None, ""):
            continue
        try:
            value = _first_value(ds[tag].value)
        except (TypeError, ValueError):
            raise MediaError(f"{label}: the file's {tag} {ds[tag].value!r} is not a number") from None
        if not math.isfinite(value):
            raise MediaError(f"{label}: the file's {tag} is {value}: the physical pixel values cannot be computed")
        if tag == "RescaleSlope" and value == 0:
            raise MediaError(f"{label}: the file's RescaleSlope is 0: every pixel would equal RescaleIntercept")


def _first_value(v) -> float:
    return float(v[0]) if isinstance(v, Sequence) and not isinstance(v, (str, bytes)) else float(v)


def _has_rescale(ds) -> bool:
    slope, intercept = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
    try:
        return "ModalityLUTSequence" in ds or _first_value(slope) != 1.0 or _first_value(intercept) != 0.0
    except (TypeError, ValueError):  # unreadable tags: _check_rescale reports them when the pixels are read
        return True


def _dicom_intensity(ds, modality: str | None, label: str, opts: Options, series=()):
    """(windows, bit_scale) for grayscale DICOM pixel data following the module's intensity rule.

    ``series``: every header of a series (``ds`` is its first), so that one rescaled slice is enough to
    rule out the display-ready 8-bit reading."""
    windows = parse_window(opts.window, label)
    if windows is None and modality == "CT":
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center not in (None, "") and width not in (None, ""):  # the file's own window (first one if several)
            windows = [_file_window(center, width, label)]
        else:
            windows = parse_window(DEFAULT_CT_WINDOW, label)
    eight_bit = all(int(h.get("BitsStored", 16) or 16) <= 8 and not _has_rescale(h) for h in (ds, *series))
    return windows, (255.0 if eight_bit else None)


def _file_window(center, width, label: str) -> tuple[str, float, float]:
    """The file's own WindowCenter / WindowWidth (first pair if several); a bad one is the file's fault."""
    try:
        c, w = _first_value(center), _first_value(width)
    except (TypeError, ValueError, IndexError):
        c = w = math.nan
    if not (math.isfinite(c) and math.isfinite(w) and w > 0):
        raise MediaError(
            f"{label}: the file's own CT window is invalid (WindowCenter {center}, WindowWidth {width}; the width "
            "must be > 0 and both finite); pass window=<preset name or (center, width)> to choose one"
        )
    return ("dicom", c, w)


def _dicom_meta(ds, modality: str | None) -> dict:
    return {
        "modality": modality,
        "series_uid": str(ds.get("SeriesInstanceUID", "")) or None,
        "series_description": str(ds.get("SeriesDescription", "")) or None,
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")) or None,
        "pixel_spacing_mm": [float(v) for v in ds.PixelSpacing] if "PixelSpacing" in ds else None,
    }


def load_dicom_file(path: Path, kind: str | None, label: str, opts: Options) -> Media:
    header = _read_dicom_header(path, label)
    if "Rows" not in header or "Columns" not in header:
        raise MediaError(
            f"{label}: DICOM file is not an image (no Rows/Columns; SOP class {header.get('SOPClassUID', '?')})"
        )
    n_frames = int(header.get("NumberOfFrames", 1) or 1)
    if kind is None:
        kind = "volume" if n_frames > 1 else "image"
    if kind == "video":
        raise MediaError(f"{label}: DICOM files are read as kind='image' or 'volume', not 'video'")
    if kind == "image":
        if n_frames > 1:
            raise MediaError(f"{label}: DICOM file holds {n_frames} frames; load it with kind='volume'")
        return _dicom_image(path, header, label, opts)
    if n_frames > 1:
        return _dicom_multiframe(path, header, label, opts)
    return load_dicom_series([path], label, opts)


def _dicom_image(path: Path, header, label: str, opts: Options) -> Media:
    rows, cols = int(header.Rows), int(header.Columns)
    if rows * cols > opts.max_image_pixels:
        raise MediaError(f"{label}: image is {cols}x{rows} pixels, more than max_image_pixels={opts.max_image_pixels}")
    data, ds = _dicom_pixels(path, label)
    modality = opts.modality or (str(ds.get("Modality", "")).upper() or None)
    meta = {**_dicom_meta(ds, modality), "original_shape": list(data.shape), "warnings": []}
    data = check_finite(data, label, opts.nan_policy, meta["warnings"])
    if data.ndim == 3:  # colour: pydicom already converted YBR to RGB
        windows, bit_scale = parse_window(opts.window, label), float(2 ** int(ds.get("BitsStored", 8)) - 1)
    else:
        windows, bit_scale = _dicom_intensity(ds, modality, label, opts)
    frames, info = normalise(data[None], windows=windows, bit_scale=bit_scale, percentiles=opts.percentiles,
                              label=label, warnings=meta["warnings"])
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        frames = 1.0 - frames  # low values are white in MONOCHROME1
    meta["intensity"] = info
    return Media(frames=frames, kind="image", source=label, metadata=jsonable(meta))


def _dicom_multiframe(path: Path, header, label: str, opts: Options) -> Media:
    n, rows, cols = int(header.NumberOfFrames), int(header.Rows), int(header.Columns)
    if n * rows * cols > opts.max_voxels:
        raise MediaError(f"{label}: header claims {n * rows * cols} voxels, more than max_voxels={opts.max_voxels}")
    data, ds = _dicom_pixels(path, label)
    modality = opts.modality or (str(ds.get("Modality", "")).upper() or None)
    meta = {
        **_dicom_meta(ds, modality),
        "original_shape": list(data.shape),
        "warnings": ["multi-frame DICOM: frames kept in stored order, per-frame geometry not read"],
    }
    color = int(ds.get("SamplesPerPixel", 1)) > 1
    if color:
        windows, bit_scale = parse_window(opts.window, label), float(2 ** int(ds.get("BitsStored", 8)) - 1)
    else:
        windows, bit_scale = _dicom_intensity(ds, modality, label, opts)
    grid = Grid(data=data, shape=data.shape[:3], affine=None)
    return volume_media(grid, label, opts, meta, windows=windows, bit_scale=bit_scale,
                         monochrome1=str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1")


def walk_files(folder: Path, root: Path | None) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if root is not None and not p.resolve().is_relative_to(root):
                raise MediaError(f"{p}: path escapes the data root {root} (resolves to {p.resolve()})")
            if p.is_file():
                files.append(p)
    return files


def load_dicom_series(files: list[Path], label: str, opts: Options) -> Media:
    pydicom = require("pydicom", "pydicom", "DICOM files")
    from pydicom.errors import InvalidDicomError

    headers, skipped = [], defaultdict(int)
    for f in files:
        if f.name.upper() == "DICOMDIR" or f.stat().st_size == 0:
            skipped["DICOMDIR or empty"] += 1
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except InvalidDicomError:
            skipped["not DICOM"] += 1
            continue
        except Exception as e:  # a damaged file among good ones: skip it, but say so
            logger.warning("%s: skipping unreadable DICOM file (%s)", f, e)
            skipped["unreadable DICOM"] += 1
            continue
        if "Rows" not in ds or "Columns" not in ds:
            skipped["DICOM without an image"] += 1  # DICOMDIR, SR, RTSTRUCT, ...
            continue
        headers.append((f, ds))
    if not headers:
        detail = ", ".join(f"{v} {k}" for k, v in skipped.items()) or "no files"
        raise MediaError(f"{label}: no DICOM image files found ({len(files)} files looked at: {detail})")
    headers = _pick_series(headers, label, opts.series_uid)
    if len(headers) == 1 and int(headers[0][1].get("NumberOfFrames", 1) or 1) > 1:
        return _dicom_multiframe(headers[0][0], headers[0][1], os.fspath(headers[0][0]), opts)

    first = headers[0][1]
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    if len(shapes) > 1:
        raise MediaError(f"{label}: slices of one series have different shapes {sorted(shapes)}")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 or int(ds.get("SamplesPerPixel", 1)) != 1 for _, ds in headers):
        raise MediaError(
            f"{label}: series mixes multi-frame or colour files; only single-frame grayscale series are supported"
        )
    rows, cols = shapes.pop()
    if len(headers) * rows * cols > opts.max_voxels:
        raise MediaError(
            f"{label}: headers claim {len(headers) * rows * cols} voxels, more than max_voxels={opts.max_voxels}"
        )

    modality = opts.modality or (str(first.get("Modality", "")).upper() or None)
    meta = {**_dicom_meta(first, modality), "n_files": len(headers), "skipped_files": dict(skipped), "warnings": []}
    grid = _dicom_grid(headers, rows, cols, label, meta)
    windows, bit_scale = _dicom_intensity(first, modality, label, opts, [ds for _, ds in headers])
    return volume_media(grid, label, opts, meta, windows=windows, bit_scale=bit_scale,
                         monochrome1=str(first.get("PhotometricInterpretation", "")) == "MONOCHROME1")


def _pick_series(headers, label: str, series_uid: str | None):
    groups = defaultdict(list)
    for f, ds in headers:
        groups[str(ds.get("SeriesInstanceUID", "<no SeriesInstanceUID>"))].append((f, ds))
    if series_uid is not None:
        if series_uid not in groups:
            raise MediaError(
                f"{label}: no series with SeriesInstanceUID {series_uid}; found {_describe_series(groups)}"
            )
        return groups[series_uid]
    if len(groups) > 1:
        raise MediaError(
            f"{label}: holds {len(groups)} DICOM series: {_describe_series(groups)}; pass one series "
            "(series_uid=..., a folder or a list of files holding a single series)"
        )
    return next(iter(groups.values()))


def _describe_series(groups) -> str:
    parts = []
    for uid, items in groups.items():
        desc = str(items[0][1].get("SeriesDescription", "")).strip()
        parts.append(f"{uid} ({len(items)} files{', ' + repr(desc) if desc else ''})")
    return "; ".join(parts)


def _dicom_grid(headers, rows: int, cols: int, label: str, meta: dict) -> Grid:
    """Sort slices along the slice normal and build a RAS affine; fall back to InstanceNumber order."""
    iops = [ds.get("ImageOrientationPatient") for _, ds in headers]
    ipps = [ds.get("ImagePositionPatient") for _, ds in headers]
    geometric = all(v is not None and len(v) == 6 for v in iops) and all(v is not None and len(v) == 3 for v in ipps)
    if geometric:
        iop = np.asarray(iops, dtype=np.float64)
        unusable = not (np.isfinite(iop).all() and np.isfinite(np.asarray(ipps, dtype=np.float64)).all()) or \
            np.linalg.norm(np.cross(iop[0, :3], iop[0, 3:])) < 1e-3  # zero or parallel direction vectors
        if unusable:
            geometric = False
            meta["warnings"].append(
                f"{label}: ImagePositionPatient/ImageOrientationPatient unusable (NaN/inf, or zero or parallel "
                f"direction vectors, e.g. {iop[0].tolist()}): slices sorted by InstanceNumber, not reoriented"
            )
        elif not np.allclose(iop, iop[0], atol=1e-4):
            geometric = False
            meta["warnings"].append(f"{label}: ImageOrientationPatient differs between slices (localizer or "
                                    "projections?): slices sorted by InstanceNumber, not reoriented")
    else:
        meta["warnings"].append(f"{label}: ImagePositionPatient/ImageOrientationPatient missing: "
                                "slices sorted by InstanceNumber, not reoriented")

    if not geometric:
        order = sorted(range(len(headers)), key=lambda i: (_instance_number(headers[i][1]), os.fspath(headers[i][0])))
        meta.update(sorted_by="InstanceNumber", irregular_spacing=None)
        files = [headers[i][0] for i in order]
        return Grid(data=_DicomStack(files, (len(files), rows, cols)), shape=(len(files), rows, cols), affine=None)

    row_cos, col_cos = iop[0, :3], iop[0, 3:]
    normal = np.cross(row_cos, col_cos)
    unit_vectors = np.allclose(np.linalg.norm(iop[0].reshape(2, 3), axis=1), 1, atol=1e-3)
    if abs(float(row_cos @ col_cos)) > 1e-3 or not unit_vectors:
        meta["warnings"].append(
            f"{label}: ImageOrientationPatient {iop[0].tolist()} is not two perpendicular unit vectors: "
            "orientation and spacing are doubtful"
        )
    ipp = np.asarray(ipps, dtype=np.float64)
    dist = ipp @ normal
    order = np.argsort(dist, kind="stable")
    dist, ipp = dist[order], ipp[order]
    travel = ipp[-1] - ipp[0]
    if np.linalg.norm(travel) > 1e-6 and np.linalg.norm(normal) > 1e-6:
        cos = abs(float(travel @ normal)) / (np.linalg.norm(travel) * np.linalg.norm(normal))
        tilt = float(np.degrees(np.arccos(min(cos, 1.0))))
        if tilt > 0.5:
            meta["warnings"].append(
                f"{label}: slice positions advance {tilt:.1f} degrees off the slice normal (gantry tilt?): the "
                "volume is sheared and is shown without resampling"
            )
    files = [headers[i][0] for i in order]
    first = headers[order[0]][1]
    row_sp, col_sp = _pixel_spacing(first, label, meta["warnings"])

    gaps = np.diff(dist)
    step = float(np.median(gaps)) if gaps.size and np.median(gaps) > 0 else float(
        first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    meta.update(sorted_by="ImagePositionPatient", irregular_spacing=_irregularity(gaps))
    if meta["irregular_spacing"]:
        meta["warnings"].append(f"{label}: irregular slice spacing (see irregular_spacing)")

    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    # Array axes (slice, row, column): a row index moves along col_cos, a column index along row_cos.
    axes_lps = np.stack([normal * step, col_cos * row_sp, row_cos * col_sp], axis=1)
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ axes_lps
    affine[:3, 3] = lps_to_ras @ ipp[0]
    centres_lps = ipp + col_cos * row_sp * (rows - 1) / 2 + row_cos * col_sp * (cols - 1) / 2
    return Grid(data=_DicomStack(files, (len(files), rows, cols)), shape=(len(files), rows, cols),
                 affine=affine, ornt=closest_canonical_ornt(affine), stack_centres=centres_lps @ lps_to_ras.T)


def _pixel_spacing(ds, label: str, warnings: list[str]) -> tuple[float, float]:
    """(row, column) spacing in mm; 1 mm with a warning when missing or not two positive numbers."""
    if "PixelSpacing" not in ds:
        warnings.append(f"{label}: PixelSpacing missing: assumed 1 mm")
        return 1.0, 1.0
    try:
        row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
    except (TypeError, ValueError):
        row_sp = col_sp = math.nan
    if not (math.isfinite(row_sp) and math.isfinite(col_sp) and row_sp > 0 and col_sp > 0):
        warnings.append(f"{label}: PixelSpacing {ds.PixelSpacing} is not two positive numbers: assumed 1 mm")
        return 1.0, 1.0
    return row_sp, col_sp


def _instance_number(ds) -> float:
    try:
        return float(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return math.inf


def _irregularity(gaps: np.ndarray) -> dict | None:
    """None when slices are evenly spaced (gap spread <= 1 % of the median gap, no duplicates)."""
    if gaps.size == 0:
        return None
    median = float(np.median(gaps))
    duplicates = int((gaps < 1e-3).sum())
    if duplicates == 0 and float(gaps.max() - gaps.min()) <= 0.01 * abs(median):
        return None
    return {"gaps_mm": [round(float(g), 4) for g in gaps], "min_gap_mm": float(gaps.min()),
            "max_gap_mm": float(gaps.max()), "median_gap_mm": median, "duplicate_positions": duplicates}


class _DicomStack:
    """Array-like (slice, row, col) view of sorted DICOM files; a slice read decodes only its file."""

    def __init__(self, files: list[Path], shape: tuple[int, int, int]):
        self.files, self.shape, self._all = files, shape, None

    def _slice(self, s: int) -> np.ndarray:
        data, _ = _dicom_pixels(self.files[s], os.fspath(self.files[s]))
        if data.shape != self.shape[1:]:
            raise MediaError(
                f"{self.files[s]}: pixel data shape {data.shape} differs from the header's {self.shape[1:]}"
            )
        return data

    def __getitem__(self, idx):
        if isinstance(idx[0], (int, np.integer)):
            return self._slice(int(idx[0]))[idx[1:]]
        if self._all is None:  # a slice across the stack needs every file
            self._all = np.stack([self._slice(s) for s in range(self.shape[0])])
        return self._all[idx]
