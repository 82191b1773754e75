"""2D pictures and in-memory arrays (remote code): Pillow files (EXIF orientation, palettes, alpha on black, 16-bit
grayscale) and numpy / torch arrays as images, volumes or videos. Conventions: media_omnivmed.py's docstring.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .intensity_omnivmed import check_finite, normalise, parse_window, windows_for
from .media_base_omnivmed import Media, MediaError, Options, jsonable, require, to_numpy, what_it_looks_like
from .video_omnivmed import check_video_size
from .volume_omnivmed import Grid, volume_media


def load_array(source, kind: str | None, opts: Options) -> Media:
    label = "<array>"
    if kind is None:
        raise MediaError(f"{label}: kind is required for arrays ('image', 'volume' or 'video')")
    arr = to_numpy(source)
    if arr.dtype.kind not in "biuf":
        raise MediaError(f"{label}: unsupported dtype {arr.dtype}")
    if arr.size == 0:
        raise MediaError(f"{label}: empty array of shape {arr.shape}")
    warnings: list[str] = []
    arr = check_finite(arr, label, opts.nan_policy, warnings)  # also refuses values beyond float32's range
    meta = {"original_shape": list(arr.shape), "dtype": str(arr.dtype), "modality": opts.modality,
            "warnings": warnings}
    if kind == "image":
        return _array_image(arr, label, opts, meta)
    if kind == "volume":
        if arr.ndim != 3:
            raise MediaError(f"{label}: a volume array must be (D, H, W) in slice order, got shape {arr.shape}")
        if arr.size > opts.max_voxels:
            raise MediaError(f"{label}: volume array of shape {arr.shape} has {arr.size} voxels, "
                             f"more than max_voxels={opts.max_voxels}")
        grid = Grid(data=arr, shape=arr.shape, affine=None)
        windows = windows_for(opts, label)
        bit_scale = 255.0 if arr.dtype == np.uint8 else None
        if opts.min_slice_spacing_mm is not None:
            warnings.append("min_slice_spacing_mm ignored: an array has no slice spacing")
        return volume_media(grid, label, opts, meta, windows=windows, bit_scale=bit_scale)
    return _array_video(arr, label, opts, meta)


def _array_image(arr: np.ndarray, label: str, opts: Options, meta: dict) -> Media:
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))):
        hint = " (channels first? transpose to H x W x C)" if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) else ""
        raise MediaError(
            f"{label}: an image array must be HxW or HxWxC with C in (1, 3, 4), got shape {arr.shape}{hint}"
        )
    if arr.shape[0] * arr.shape[1] > opts.max_image_pixels:
        raise MediaError(
            f"{label}: image has {arr.shape[0] * arr.shape[1]} pixels, "
            f"more than max_image_pixels={opts.max_image_pixels}"
        )
    data, bit_scale = _array_values(arr)
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3 and data.shape[-1] == 4:
        data = _composite_on_black(data, 1.0 if bit_scale is None else bit_scale)
        meta["warnings"].append("alpha channel composited on black")
    windows = windows_for(opts, label)
    frames, info = normalise(data[None], windows=windows, bit_scale=bit_scale, percentiles=opts.percentiles,
                              label=label, warnings=meta["warnings"])
    meta["intensity"] = info
    return Media(frames=frames, kind="image", source=label, metadata=jsonable(meta))


def _array_values(arr: np.ndarray) -> tuple[np.ndarray, float | None]:
    """float32 values and the divisor that maps them to [0, 1] (None: needs percentiles)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), 1.0
    if arr.dtype == np.uint8:
        return arr.astype(np.float32), 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32), 65535.0
    data = arr.astype(np.float32)
    if arr.dtype.kind == "f" and data.size and data.min() >= 0.0 and data.max() <= 1.0:
        return data, 1.0
    return data, None


def _composite_on_black(data: np.ndarray, full: float) -> np.ndarray:
    """(..., C+1) colour + alpha -> (..., C) colour * alpha (alpha in the same units as colour)."""
    return data[..., :-1] * (data[..., -1:] / full)


def _array_video(arr: np.ndarray, label: str, opts: Options, meta: dict) -> Media:
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise MediaError(
            f"{label}: a video array must be (T, H, W) or (T, H, W, C) with C in (1, 3, 4), "
            f"got shape {meta['original_shape']}"
        )
    if arr.shape[0] == 0:
        raise MediaError(f"{label}: the video array has no frames")
    n, height, width = arr.shape[:3]
    # Arrays carry no timing: keep every frame unless that exceeds max_frames (then evenly spread).
    idx = list(range(n)) if n <= opts.max_frames else [int(k * n // opts.max_frames) for k in range(opts.max_frames)]
    check_video_size(label, width, height, len(idx), opts)  # before any float copy is made
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype.kind == "f" and arr.min() >= 0.0 and arr.max() <= 1.0:
        scale = 1.0
    else:
        raise MediaError(f"{label}: a video array must be uint8 or float in [0, 1], got {arr.dtype} "
                         f"with range [{arr.min()}, {arr.max()}]")
    data = arr[idx].astype(np.float32) / scale
    if data.shape[-1] == 4:
        data = _composite_on_black(data, 1.0)
    if data.shape[-1] == 1:
        data = np.repeat(data, 3, axis=-1)
    meta.update(frame_indices=idx, n_frames_total=n, intensity={"method": "scale", "divisor": scale})
    frames = np.ascontiguousarray(data, dtype=np.float32)
    return Media(frames=frames, kind="video", source=label, metadata=jsonable(meta))


def load_picture(source, label: str, opts: Options) -> Media:
    PIL_Image = require("PIL.Image", "pillow", "images")
    from PIL import ImageOps, UnidentifiedImageError

    is_path = isinstance(source, Path)
    try:
        opened = im = PIL_Image.open(source) if is_path else source
    except PIL_Image.DecompressionBombError as e:
        raise MediaError(f"{label}: image too large{_over_limit(opts, PIL_Image)} ({e})") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"{label}: not a readable image{what_it_looks_like(source)}") from e
    except (OSError, ValueError, SyntaxError, struct.error, zlib.error) as e:  # e.g. a WebP decoder refusing the file
        raise MediaError(f"{label}: corrupt or truncated image ({e}){what_it_looks_like(source)}") from e
    try:
        w, h = im.size
        if w * h > opts.max_image_pixels:  # header only: nothing decoded yet
            raise MediaError(
                f"{label}: image is {w}x{h} = {w * h} pixels, more than max_image_pixels={opts.max_image_pixels}"
            )
        file_format, n_frames = im.format, int(getattr(im, "n_frames", 1))
        try:
            im.load()
            exif_orientation = int(im.getexif().get(0x0112, 1) or 1)
            if exif_orientation != 1:
                im = ImageOps.exif_transpose(im)
        except PIL_Image.DecompressionBombError as e:
            raise MediaError(f"{label}: image too large{_over_limit(opts, PIL_Image)} ({e})") from e
        except (OSError, ValueError, SyntaxError, struct.error, zlib.error) as e:
            raise MediaError(
                f"{label}: corrupt or truncated image ({e}){what_it_looks_like(source) if is_path else ''}"
            ) from e
        warnings: list[str] = []
        data, bit_scale, note = _picture_values(im)
        if note:
            warnings.append(note)
    finally:
        if is_path:
            opened.close()
    meta = {
        "format": file_format,
        "mode": im.mode,
        "original_shape": list(data.shape),
        "exif_orientation": exif_orientation,
        "n_frames_in_file": n_frames,
        "modality": opts.modality,
        "warnings": warnings,
    }
    if n_frames > 1:
        warnings.append(f"file holds {n_frames} frames; only the first is used")
    data = check_finite(data, label, opts.nan_policy, warnings)
    # Pictures are display-ready: no default HU window even for CT (their values are not HU).
    windows = parse_window(opts.window, label)
    frames, info = normalise(data[None], windows=windows, bit_scale=bit_scale, percentiles=opts.percentiles,
                              label=label, warnings=warnings)
    meta["intensity"] = info
    return Media(frames=frames, kind="image", source=label, metadata=jsonable(meta))


def _over_limit(opts: Options, PIL_Image) -> str:
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS before we see the size: say which limit that breaks."""
    pillow_limit = 2 * (PIL_Image.MAX_IMAGE_PIXELS or 0)
    if pillow_limit and opts.max_image_pixels < pillow_limit:
        return f", more than max_image_pixels={opts.max_image_pixels}"
    return ", more than Pillow's decompression-bomb limit"


def _picture_values(im) -> tuple[np.ndarray, float | None, str | None]:
    """Pillow image -> (HxW or HxWx3 float32 values, divisor to [0, 1] or None for percentiles, note)."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32), 65535.0, None
    if mode == "I":
        data = np.asarray(im).astype(np.float32)
        if data.size and data.min() >= 0 and data.max() <= 65535:
            return data, 65535.0, None  # 16-bit content in a 32-bit container
        return data, None, None
    if mode == "F":
        data = np.asarray(im, dtype=np.float32)
        finite = data[np.isfinite(data)]
        in_unit = finite.size and finite.min() >= 0 and finite.max() <= 1
        return data, (1.0 if in_unit else None), None
    if mode == "L":
        return np.asarray(im).astype(np.float32), 255.0, None
    if mode == "1":
        return np.asarray(im.convert("L")).astype(np.float32), 255.0, None
    if mode in ("LA", "La"):
        data = np.asarray(im.convert("LA")).astype(np.float32)
        return _composite_on_black(data, 255.0)[..., 0], 255.0, "alpha channel composited on black"
    if mode in ("RGBA", "RGBa", "P", "PA") or "transparency" in im.info:
        data = np.asarray(im.convert("RGBA")).astype(np.float32)  # palette transparency becomes alpha
        has_alpha = bool((data[..., 3] < 255).any())
        note = "alpha channel composited on black" if has_alpha else None
        return _composite_on_black(data, 255.0), 255.0, note
    return np.asarray(im.convert("RGB")).astype(np.float32), 255.0, None  # RGB, CMYK, YCbCr, LAB, HSV
