"""Intensity -> [0, 1] for every reader (remote code): HU windows (presets, a file's own, 3-window RGB), 8-bit and
16-bit scaling, percentile normalisation, non-finite and float32-range checks. Rules: media_omnivmed.py's docstring.
"""

from __future__ import annotations

import math

import numpy as np

from .media_base_omnivmed import DEFAULT_CT_WINDOW, DEFAULT_RGB_WINDOWS, WINDOW_PRESETS, MediaError, Options


def parse_window(window, label: str) -> list[tuple[str, float, float]] | None:
    """None, or a list of 1 (grayscale) or 3 (one per RGB channel) (name, center, width) windows."""
    if window is None:
        return None
    if isinstance(window, str):
        if window.lower() == "rgb":
            return [_one_window(w, label) for w in DEFAULT_RGB_WINDOWS]
        return [_one_window(window, label)]
    if isinstance(window, (tuple, list)) and len(window) == 2 and all(_is_number(v) for v in window):
        return [_one_window(window, label)]
    if isinstance(window, (tuple, list)) and len(window) == 3:
        return [_one_window(w, label) for w in window]
    raise MediaError(
        f"{label}: window must be a preset name {sorted(WINDOW_PRESETS)}, a (center, width) pair, "
        f"'rgb', or three of those; got {window!r}"
    )


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _one_window(spec, label: str) -> tuple[str, float, float]:
    if isinstance(spec, str):
        if spec.lower() not in WINDOW_PRESETS:
            raise MediaError(f"{label}: unknown window preset {spec!r}; known presets: {sorted(WINDOW_PRESETS)}")
        return (spec.lower(), *WINDOW_PRESETS[spec.lower()])
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(_is_number(v) for v in spec):
        center, width = float(spec[0]), float(spec[1])
        if not (math.isfinite(center) and width > 0 and math.isfinite(width)):
            raise MediaError(f"{label}: window width must be > 0 and finite, got (center={center}, width={width})")
        return ("custom", center, width)
    raise MediaError(f"{label}: bad window {spec!r}; expected a preset name or a (center, width) pair")


def windows_for(opts: Options, label: str):
    """The caller's window, else the default CT window when modality is CT, else None."""
    if opts.window is None and opts.modality == "CT":
        return parse_window(DEFAULT_CT_WINDOW, label)
    return parse_window(opts.window, label)


def _window_info(windows) -> list[dict]:
    return [{"name": n, "center": c, "width": w} for n, c, w in windows]


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_finite(data: np.ndarray, label: str, policy: str, warnings: list[str]) -> np.ndarray:
    """Refuse (or zero) NaN/inf; refuse finite values that float32, the normalisation dtype, cannot hold."""
    if not np.issubdtype(data.dtype, np.floating) or data.size == 0:
        return data
    wide = data.dtype.itemsize > 4
    if wide:  # min/max propagate NaN and inf, and a float64 sum of huge finite values could overflow
        finite = math.isfinite(float(data.min())) and math.isfinite(float(data.max()))
    else:  # one reduction, no mask: any NaN/inf would make the sum non-finite
        finite = bool(np.isfinite(data.sum(dtype=np.float64)))
    if not finite:
        bad = ~np.isfinite(data)
        n_bad = int(bad.sum())
        if policy == "raise":
            raise MediaError(
                f"{label}: {n_bad} non-finite values (NaN/inf) out of {data.size} in the data; "
                "pass nan_policy='zero' to replace them with 0"
            )
        warnings.append(f"{n_bad} non-finite values replaced by 0 before normalisation")
        data = np.where(bad, 0, data).astype(data.dtype, copy=False)
    if wide:
        check_float32_range(data, label)
    return data


def check_float32_range(data: np.ndarray, label: str) -> None:
    """Finite values beyond float32 would become inf in the normalisation and then pass for 'NaN data'."""
    if data.dtype.kind != "f" or data.dtype.itemsize <= 4 or data.size == 0:
        return
    lo, hi = float(data.min()), float(data.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf themselves are check_finite's business
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
    if max(-lo, hi) > _FLOAT32_MAX:
        raise MediaError(
            f"{label}: values range from {lo:.4g} to {hi:.4g}, beyond float32's range (+-{_FLOAT32_MAX:.4g}) "
            "in which intensities are normalised (a corrupt file, or a wrong scl_slope / RescaleSlope?)"
        )


def normalise(
    data: np.ndarray, *, windows, bit_scale: float | None, percentiles, label: str, warnings: list[str]
) -> tuple[np.ndarray, dict]:
    """(T, H, W) or (T, H, W, C) raw values -> ((T, H, W, 3) float32 in [0, 1], description)."""
    data = data.astype(np.float32, copy=False)
    color = data.ndim == 4
    if windows is not None:
        if color:
            raise MediaError(
                f"{label}: a window needs single-channel (grayscale) data, this has {data.shape[-1]} channels"
            )
        chans = [np.clip((data - (c - w / 2)) / w, 0.0, 1.0) for _, c, w in windows]
        out = np.stack(chans if len(chans) == 3 else chans * 3, axis=-1)
        return out, {"method": "window", "windows": _window_info(windows)}
    if bit_scale is not None:
        out, info = data / np.float32(bit_scale), {"method": "scale", "divisor": float(bit_scale)}
        np.clip(out, 0.0, 1.0, out=out)
    else:
        out, info = _percentile_normalise(data, percentiles, warnings)
    if not color:
        out = np.repeat(out[..., None], 3, axis=-1)
    return out.astype(np.float32, copy=False), info


def _percentile_normalise(data: np.ndarray, percentiles, warnings: list[str]) -> tuple[np.ndarray, dict]:
    lo, hi = (float(v) for v in np.percentile(data, percentiles))
    info = {"method": "percentile", "percentiles": list(percentiles), "values": [lo, hi]}
    if hi <= lo:  # e.g. mostly-background data: fall back to the full range before giving up
        lo, hi = float(data.min()), float(data.max())
        info["values"] = [lo, hi]
        if hi <= lo:
            warnings.append(f"constant data (every value is {lo}); frames are all zeros")
            return np.zeros_like(data), info
        warnings.append("percentiles coincide; normalised by min/max instead")
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0), info
