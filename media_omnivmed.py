"""Turn any medical input into normalised frames plus metadata (OmniV-Med remote code).

``load_media(source, kind=None, ...)`` returns a :class:`Media` whose ``frames`` are a
``(T, H, W, 3)`` float32 array in ``[0, 1]``: ``T == 1`` for 2D images, slices for volumes, sampled
frames for videos. Grayscale is replicated to three channels. Every bad input raises
:class:`MediaError` (a ``ValueError``) whose message names the file (or ``<array>``) and the problem;
a missing optional package raises ``ImportError`` naming what to ``pip install``.

This file is copied into Hub repos as remote code: it is a flat module, imports no other repo module,
never touches the network, and imports nibabel / pydicom / decord / PyAV / Pillow only when needed.

Conventions
-----------
Volumes (NIfTI via nibabel, DICOM series via pydicom)
    * Reoriented to the closest canonical RAS+ grid (nibabel's ``io_orientation``, i.e. what
      ``nib.as_closest_canonical`` does) without resampling; only the slices needed are read when the
      file is uncompressed. ``slice_axis``: "sagittal" = RAS axis 0, "coronal" = 1, "axial" = 2.
    * Slices come out in increasing world coordinate along that axis (axial: inferior -> superior).
    * Each slice is shown in the radiological display convention: axial -- anterior at the top,
      patient's right on the image's LEFT; coronal -- superior at the top, patient's right on the
      image's left; sagittal -- superior at the top, anterior on the image's left. From a RAS slice
      ``s = data_ras[..., k]`` (remaining axes in RAS order) this is always ``s.T[::-1, ::-1]``.
    * DICOM series get an affine from ImageOrientationPatient / ImagePositionPatient (LPS converted to
      RAS) and go through the same reorientation, so a standard axial CT comes out exactly as stored
      (DICOM's own display). The orientation codes in ``metadata["orientation"]`` describe the
      array axes before reorientation: NIfTI (i, j, k); DICOM (slice, row, column).
    * Slice sampling: when there are more than ``max_slices`` slices, or they are closer than
      ``min_slice_spacing_mm``, slices are picked evenly spaced in millimetres between the first and
      last slice (nearest real slice to each target). ``slice_indices`` index the reoriented volume,
      ``slice_positions_mm`` are world coordinates (RAS, mm) of the slice centres along the slice
      axis, ``spacing_mm`` = (mean distance between sampled slices, row spacing, column spacing).
    * Without usable geometry (DICOM slices lacking positions or with differing orientations,
      multi-frame DICOM, ``(D, H, W)`` arrays) slices are kept in stored order and shown as stored;
      ``spacing_mm`` and ``slice_positions_mm`` are then None and the metadata says why.
    * Doubtful geometry is read as nibabel reads it and reported in ``metadata["warnings"]`` (each
      warning names the file): NIfTI without orientation (sform and qform codes 0: nibabel's LAS
      fallback), zero voxel sizes (taken as 1 mm), a sheared affine, sform and qform that disagree;
      DICOM orientation vectors that are not perpendicular unit vectors, slices advancing off their
      normal (gantry tilt). Sheared volumes are not resampled. A NIfTI affine with NaN/inf is an
      error. NIfTI spatial units of metres or microns (xyzt_units) are converted to mm.

Intensity -> [0, 1]
    1. An explicit ``window`` is always applied (to HU for CT, to the stored values otherwise).
    2. CT (``modality="CT"``, or the DICOM Modality tag) without ``window``: the DICOM file's own
       WindowCenter/WindowWidth when present, else the "abdomen" preset (40, 400). NIfTI files are
       only windowed when the caller says ``modality="CT"``; pictures read by Pillow never get a
       default HU window (their values are not HU).
    3. Display-ready 8-bit data (uint8 arrays, 8-bit pictures, 8-bit DICOM series none of whose
       files has a rescale): divide by 255. NIfTI decides on its values, not on its stored dtype:
       when every value read (after the header's scl_slope / scl_inter) is an integer in 0..255,
       as in any uint8 file without scaling, divide by 255; so equal physical values give equal
       frames whether stored as uint8, int16 or float. 16-bit pictures (Pillow "I;16"): divide by
       65535, so the full dynamic range is kept.
    4. Everything else (MR, PET, CR, int16/float volumes...): percentile normalisation, default
       0.5 -> 0 and 99.5 -> 1, clipped, computed over all output slices together (the whole volume
       unless it was subsampled) so slices stay comparable. A constant input gives zeros and a
       warning in ``metadata["warnings"]``.
    ``window`` may be a preset name from :data:`WINDOW_PRESETS`, a ``(center, width)`` pair, or
    "rgb" / a sequence of three windows for a 3-window image (one window per channel; "rgb" means
    :data:`DEFAULT_RGB_WINDOWS` = abdomen (soft tissue), lung, bone). MONOCHROME1 DICOM is inverted
    after normalisation. Non-finite values raise (``nan_policy="raise"``) or become 0 before
    normalisation (``nan_policy="zero"``). Values are physical values: NIfTI through nibabel's
    scaling (what ``get_fdata`` returns), DICOM through pydicom's modality LUT / rescale; a DICOM
    RescaleSlope that is NaN, inf or 0, a file's own invalid CT window, and values beyond float32's
    range are errors naming the cause.

Compressed DICOM is decoded by pydicom's pixel-data plugins: with pylibjpeg, pylibjpeg-libjpeg,
pylibjpeg-openjpeg and pylibjpeg-rle installed (requirements.txt) that covers JPEG Baseline,
Extended (12-bit), Lossless (process 14 and SV1), JPEG-LS, JPEG 2000 / HTJ2K and RLE; a transfer
syntax nothing decodes (e.g. MPEG) is an error naming the syntax.

2D pictures (Pillow)
    EXIF orientation applied; first frame of multi-frame files (GIF/TIFF); palette -> RGB; CMYK and
    other colour modes -> RGB; alpha (RGBA, LA, palette transparency) is composited on BLACK
    (``rgb * alpha``), matching the black background of medical images. Pillow itself reduces 16-bit
    RGB PNGs to 8 bits; 16-bit grayscale keeps 16 bits. ``max_image_pixels`` is checked from the
    header before any pixel is decoded.

Video (decord, PyAV fallback)
    Frames nearest to t = 0, 1/fps, 2/fps, ... < duration; when that is more than ``max_frames``,
    ``max_frames`` frames at t = k * duration / max_frames instead (evenly over the whole video).
    ``timestamps_s`` are the chosen frames' own presentation times, relative to the first frame.
    Only the chosen frames are converted; PyAV decodes sequentially and keeps nothing else.
    Container rotation metadata is not applied. Before decoding, the frame size from the stream
    header (read with PyAV, also when decord decodes; without PyAV, from decord's first decoded
    frame) is refused over ``max_image_pixels``, and frames kept x height x width over
    ``max_voxels`` (their float32 frames cost what a volume of that many voxels does).
    Files without presentation times (AVI with B-frames): decord's timestamps are then unusable and
    times come from the average frame rate; PyAV's decoded frames are timed by the sorted packet
    timestamps. Both cases are noted in ``metadata["warnings"]``. With ``video_backend=None`` a file
    decord cannot open or decode (MPEG-TS, codecs its FFmpeg lacks) is read with PyAV instead.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import importlib
import importlib.util
import logging
import math
import os
import re
import struct
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CT_WINDOW",
    "DEFAULT_RGB_WINDOWS",
    "WINDOW_PRESETS",
    "Media",
    "MediaError",
    "load_media",
]

# (center, width) in Hounsfield units; Radiopaedia's "Windowing (CT)" values.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "temporal_bone": (600.0, 2800.0),
    "soft_tissue": (50.0, 400.0),
    "abdomen": (40.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}
DEFAULT_CT_WINDOW = "abdomen"
DEFAULT_RGB_WINDOWS = ("abdomen", "lung", "bone")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".mgh", ".mgz")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".webm", ".mkv")
DICOM_EXTENSIONS = (".dcm", ".dicom")

KINDS = ("image", "volume", "video")
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
VIDEO_BACKENDS = ("decord", "pyav")
_AXIS_CODES = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of each RAS axis


class MediaError(ValueError):
    """A bad input: the message names the file (or ``<array>``) and what is wrong with it."""


@dataclasses.dataclass
class Media:
    frames: np.ndarray  # (T, H, W, 3) float32 in [0, 1]
    kind: str  # "image" | "volume" | "video"
    source: str  # path, "<array>" or "<PIL.Image>"
    spacing_mm: tuple[float, float, float] | None = None  # volumes: (between sampled slices, row, col)
    slice_positions_mm: list[float] | None = None  # volumes: world coordinate along the slice axis
    slice_indices: list[int] | None = None  # volumes: index in the reoriented full volume
    timestamps_s: list[float] | None = None  # video: presentation time of each frame
    metadata: dict = dataclasses.field(default_factory=dict)  # JSON-serialisable values only

    def __repr__(self) -> str:
        return (
            f"Media(kind={self.kind!r}, source={self.source!r}, frames={tuple(self.frames.shape)}, "
            f"spacing_mm={self.spacing_mm}, metadata_keys={sorted(self.metadata)})"
        )


@dataclasses.dataclass(frozen=True)
class _Options:
    modality: str | None
    window: Any
    percentiles: tuple[float, float]
    slice_axis: str
    max_slices: int
    min_slice_spacing_mm: float | None
    volume_index: int | None
    fps: float
    max_frames: int
    video_backend: str | None
    max_image_pixels: int
    max_voxels: int
    max_video_frames_decoded: int
    nan_policy: str
    series_uid: str | None
    data_root: Path | None


def load_media(
    source,
    kind: str | None = None,
    *,
    data_root=None,
    modality: str | None = None,
    window=None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    slice_axis: str = "axial",
    max_slices: int = 64,
    min_slice_spacing_mm: float | None = None,
    volume_index: int | None = None,
    fps: float = 1.0,
    max_frames: int = 64,
    video_backend: str | None = None,
    max_image_pixels: int = 50_000_000,
    max_voxels: int = 512**3,
    max_video_frames_decoded: int = 100_000,
    nan_policy: str = "raise",
    series_uid: str | None = None,
) -> Media:
    """Load an image, volume or video as normalised frames; see the module docstring for conventions.

    ``source``: a path (file or DICOM folder), a list of DICOM paths, a PIL image, or a numpy array /
    torch tensor (then ``kind`` is required: image HxW or HxWxC with C in 1, 3, 4; volume (D, H, W) in
    slice order; video (T, H, W[, C]) uint8 or float in [0, 1]). ``series_uid`` picks one series out
    of a DICOM folder holding several; ``nan_policy`` is "raise" (default) or "zero".
    Size limits, checked before pixels are decoded or copied: ``max_image_pixels`` per image or
    video frame; ``max_voxels`` per volume and per video's kept frames (frames x height x width);
    ``max_video_frames_decoded`` per video. Float arrays beyond float32's range are refused (frames
    are computed in float32).
    """
    label = _label(source)
    opts = _validate_options(label, kind, locals())
    try:
        if _is_array_like(source):
            return _load_array(source, kind, opts)
        if type(source).__module__.startswith("PIL."):
            if kind not in (None, "image"):
                raise MediaError(f"{label}: a PIL image can only be loaded as kind='image', not {kind!r}")
            return _load_picture(source, label, opts)
        if isinstance(source, (list, tuple)):
            if kind not in (None, "volume"):
                raise MediaError(f"{label}: a list of files is read as a DICOM series (kind='volume')")
            if not source:
                raise MediaError(f"{label}: the list of DICOM files is empty")
            files = [_existing_file(_resolve_path(p, opts.data_root), _label(p)) for p in source]
            return _load_dicom_series(files, label, opts)
        if isinstance(source, (str, os.PathLike)):
            return _load_path(_resolve_path(source, opts.data_root), kind, opts)
        raise MediaError(f"{label}: unsupported source type {type(source).__name__}")
    except MediaError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError, LookupError, zlib.error, struct.error) as e:
        # Last resort: library errors not wrapped closer to their cause still come out as MediaError.
        raise MediaError(f"{label}: could not read ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Arguments and paths
# ----------------------------------------------------------------------------------------------


def _label(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (list, tuple)):
        head = ", ".join(os.path.basename(os.fspath(p)) for p in source[:3] if isinstance(p, (str, os.PathLike)))
        return f"<{len(source)} DICOM files: {head}{', ...' if len(source) > 3 else ''}>"
    if type(source).__module__.startswith("PIL."):
        return "<PIL.Image>"
    return "<array>" if _is_array_like(source) else f"<{type(source).__name__}>"


def _validate_options(label: str, kind, args: dict) -> _Options:
    """Check every keyword argument of load_media (``args`` is its ``locals()``) before reading anything."""
    if kind is not None and kind not in KINDS:
        raise MediaError(f"{label}: unknown kind {kind!r}; expected one of {KINDS} or None")
    if args["slice_axis"] not in SLICE_AXES:
        raise MediaError(f"{label}: unknown slice_axis {args['slice_axis']!r}; expected one of {tuple(SLICE_AXES)}")
    if args["video_backend"] not in (None, *VIDEO_BACKENDS):
        raise MediaError(
            f"{label}: unknown video_backend {args['video_backend']!r}; expected 'decord', 'pyav' or None"
        )
    if args["nan_policy"] not in ("raise", "zero"):
        raise MediaError(f"{label}: nan_policy must be 'raise' or 'zero', not {args['nan_policy']!r}")
    limits = ("max_slices", "max_frames", "max_image_pixels", "max_voxels", "max_video_frames_decoded")
    try:
        lo, hi = (float(p) for p in args["percentiles"])
        ints = {name: int(args[name]) for name in limits}
        fps = float(args["fps"])
        min_spacing = None if args["min_slice_spacing_mm"] is None else float(args["min_slice_spacing_mm"])
    except (TypeError, ValueError) as e:
        raise MediaError(f"{label}: bad numeric option ({e})") from e
    if not 0.0 <= lo < hi <= 100.0:
        raise MediaError(f"{label}: percentiles must satisfy 0 <= low < high <= 100, got {args['percentiles']}")
    for name, value in ints.items():
        if value < 1:
            raise MediaError(f"{label}: {name} must be >= 1, got {value}")
    if not fps > 0:
        raise MediaError(f"{label}: fps must be > 0, got {fps}")
    if min_spacing is not None and not min_spacing > 0:
        raise MediaError(f"{label}: min_slice_spacing_mm must be > 0, got {min_spacing}")
    _parse_window(args["window"], label)  # a bad window fails here, before any file is read
    root = args["data_root"]
    return _Options(
        modality=str(args["modality"]).upper() if args["modality"] else None,
        window=args["window"],
        percentiles=(lo, hi),
        slice_axis=args["slice_axis"],
        min_slice_spacing_mm=min_spacing,
        volume_index=args["volume_index"],
        fps=fps,
        video_backend=args["video_backend"],
        nan_policy=args["nan_policy"],
        series_uid=args["series_uid"],
        data_root=None if root is None else Path(root).resolve(),
        **ints,
    )


def _resolve_path(path, root: Path | None) -> Path:
    """Absolute path; under ``data_root`` relative paths are joined to it and escapes are refused."""
    if not isinstance(path, (str, os.PathLike)):
        raise MediaError(f"{_label(path)}: expected a file path, got {type(path).__name__}")
    if "\x00" in os.fspath(path):  # os calls would refuse it, and Path.exists() would call it missing
        raise MediaError(f"{os.fspath(path)!r}: the path contains a NUL byte")
    p = Path(path).expanduser()
    if root is None:
        return p
    resolved = (p if p.is_absolute() else root / p).resolve()  # follows symlinks and ".."
    if not resolved.is_relative_to(root):
        raise MediaError(f"{os.fspath(path)}: path escapes the data root {root} (resolves to {resolved})")
    return resolved


def _existing_file(path: Path, label: str) -> Path:
    if not path.exists():
        if path.is_symlink():  # exists() follows links: say which link is broken rather than "does not exist"
            try:
                os.stat(path)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise MediaError(f"{label}: symbolic link loop (too many levels of symbolic links)") from e
            raise MediaError(f"{label}: broken symbolic link: its target {os.readlink(path)} does not exist")
        raise MediaError(f"{label}: file does not exist")
    if not path.is_file():
        raise MediaError(f"{label}: not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(f"{label}: file is empty (0 bytes)")
    return path


def _load_path(path: Path, kind: str | None, opts: _Options) -> Media:
    label = os.fspath(path)
    if path.is_dir():
        if kind not in (None, "volume"):
            raise MediaError(f"{label}: a folder is read as a DICOM series (kind='volume'), not {kind!r}")
        return _load_dicom_series(_walk_files(path, opts.data_root), label, opts)
    _existing_file(path, label)
    fmt = _detect_format(path, label)
    if fmt == "dicom":
        return _load_dicom_file(path, kind, label, opts)
    fmt_kind = {"image": "image", "nifti": "volume", "video": "video"}[fmt]
    if kind is not None and kind != fmt_kind:
        raise MediaError(f"{label}: asked for kind={kind!r} but this {fmt} file is read as kind={fmt_kind!r}")
    if fmt == "image":
        return _load_picture(path, label, opts)
    if fmt == "nifti":
        return _load_nifti(path, label, opts)
    return _load_video(path, label, opts)


def _extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _sniff(path: Path) -> tuple[str | None, str | None]:
    """(format, description) guessed from the first bytes; (None, None) when not recognised."""
    with open(path, "rb") as f:
        head = f.read(352)
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself look like a TIFF header
        return "dicom", "DICOM"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image", "TIFF"
    if head[:2] == b"BM":
        return "image", "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "WebP"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", "AVI"
    if head[4:8] == b"ftyp":
        return "video", "MP4/QuickTime"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "video", "Matroska/WebM"
    if _looks_like_nifti(head):
        return "nifti", "NIfTI"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(352)
        except (OSError, EOFError, zlib.error):
            return None, "a gzip file that does not decompress"
        if _looks_like_nifti(inner):
            return "nifti", "gzip-compressed NIfTI"
        return None, "a gzip file (not NIfTI)"
    return None, None


def _looks_like_nifti(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return struct.unpack("<i", head[:4])[0] == 348 or struct.unpack(">i", head[:4])[0] == 348
    return len(head) >= 8 and head[4:8] == b"n+2\x00"


def _detect_format(path: Path, label: str) -> str:
    """'image' | 'nifti' | 'dicom' | 'video': file content wins over a wrong extension."""
    ext = _extension(path)
    by_ext = (
        "image" if ext in IMAGE_EXTENSIONS else
        "nifti" if ext in VOLUME_EXTENSIONS else
        "video" if ext in VIDEO_EXTENSIONS else
        "dicom" if ext in DICOM_EXTENSIONS else None
    )
    sniffed, what = _sniff(path)
    if sniffed is None and by_ext is None:
        looks = f"its content looks like {what}" if what else "its content is not a recognised format"
        raise MediaError(f"{label}: unknown file format (extension {ext or '<none>'!r}; {looks})")
    if sniffed is not None and by_ext is not None and sniffed != by_ext:
        if sniffed == "nifti":  # nibabel picks its reader by extension, so content alone cannot help
            raise MediaError(
                f"{label}: extension {ext!r} but the content looks like {what}; rename it to .nii or .nii.gz"
            )
        logger.warning("%s: extension %r but the content looks like %s; reading it as %s", label, ext, what, what)
        return sniffed
    if sniffed == "nifti" and by_ext is None:
        raise MediaError(f"{label}: content looks like {what} but nibabel needs a .nii / .nii.gz name; rename it")
    return by_ext or sniffed


def _what_it_looks_like(path: Path) -> str:
    try:
        _, what = _sniff(path)
    except OSError:
        return ""
    return f"; content looks like {what}" if what else "; content is not a recognised format"


def _require(module: str, pip_name: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"load_media needs {pip_name} to read {purpose}: pip install {pip_name}") from e


def _is_array_like(source) -> bool:
    if isinstance(source, np.ndarray):
        return True
    # torch tensors, duck-typed so this module never imports torch
    return all(hasattr(source, a) for a in ("detach", "cpu", "numpy", "shape", "dtype"))


def _to_numpy(source) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    t = source.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


# ----------------------------------------------------------------------------------------------
# Intensity
# ----------------------------------------------------------------------------------------------


def _parse_window(window, label: str) -> list[tuple[str, float, float]] | None:
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


def _windows_for(opts: _Options, label: str):
    """The caller's window, else the default CT window when modality is CT, else None."""
    if opts.window is None and opts.modality == "CT":
        return _parse_window(DEFAULT_CT_WINDOW, label)
    return _parse_window(opts.window, label)


def _window_info(windows) -> list[dict]:
    return [{"name": n, "center": c, "width": w} for n, c, w in windows]


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_finite(data: np.ndarray, label: str, policy: str, warnings: list[str]) -> np.ndarray:
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
        _check_float32_range(data, label)
    return data


def _check_float32_range(data: np.ndarray, label: str) -> None:
    """Finite values beyond float32 would become inf in the normalisation and then pass for 'NaN data'."""
    if data.dtype.kind != "f" or data.dtype.itemsize <= 4 or data.size == 0:
        return
    lo, hi = float(data.min()), float(data.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf themselves are _check_finite's business
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
    if max(-lo, hi) > _FLOAT32_MAX:
        raise MediaError(
            f"{label}: values range from {lo:.4g} to {hi:.4g}, beyond float32's range (+-{_FLOAT32_MAX:.4g}) "
            "in which intensities are normalised (a corrupt file, or a wrong scl_slope / RescaleSlope?)"
        )


def _normalise(
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


# ----------------------------------------------------------------------------------------------
# Arrays (numpy / torch)
# ----------------------------------------------------------------------------------------------


def _load_array(source, kind: str | None, opts: _Options) -> Media:
    label = "<array>"
    if kind is None:
        raise MediaError(f"{label}: kind is required for arrays ('image', 'volume' or 'video')")
    arr = _to_numpy(source)
    if arr.dtype.kind not in "biuf":
        raise MediaError(f"{label}: unsupported dtype {arr.dtype}")
    if arr.size == 0:
        raise MediaError(f"{label}: empty array of shape {arr.shape}")
    warnings: list[str] = []
    arr = _check_finite(arr, label, opts.nan_policy, warnings)  # also refuses values beyond float32's range
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
        grid = _Grid(data=arr, shape=arr.shape, affine=None)
        windows = _windows_for(opts, label)
        bit_scale = 255.0 if arr.dtype == np.uint8 else None
        if opts.min_slice_spacing_mm is not None:
            warnings.append("min_slice_spacing_mm ignored: an array has no slice spacing")
        return _volume_media(grid, label, opts, meta, windows=windows, bit_scale=bit_scale)
    return _array_video(arr, label, opts, meta)


def _array_image(arr: np.ndarray, label: str, opts: _Options, meta: dict) -> Media:
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
    windows = _windows_for(opts, label)
    frames, info = _normalise(data[None], windows=windows, bit_scale=bit_scale, percentiles=opts.percentiles,
                              label=label, warnings=meta["warnings"])
    meta["intensity"] = info
    return Media(frames=frames, kind="image", source=label, metadata=_jsonable(meta))


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


def _array_video(arr: np.ndarray, label: str, opts: _Options, meta: dict) -> Media:
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
    _check_video_size(label, width, height, len(idx), opts)  # before any float copy is made
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
    return Media(frames=frames, kind="video", source=label, metadata=_jsonable(meta))


# ----------------------------------------------------------------------------------------------
# 2D pictures (Pillow)
# ----------------------------------------------------------------------------------------------


def _load_picture(source, label: str, opts: _Options) -> Media:
    PIL_Image = _require("PIL.Image", "pillow", "images")
    from PIL import ImageOps, UnidentifiedImageError

    is_path = isinstance(source, Path)
    try:
        opened = im = PIL_Image.open(source) if is_path else source
    except PIL_Image.DecompressionBombError as e:
        raise MediaError(f"{label}: image too large{_over_limit(opts, PIL_Image)} ({e})") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"{label}: not a readable image{_what_it_looks_like(source)}") from e
    except (OSError, ValueError, SyntaxError, struct.error, zlib.error) as e:  # e.g. a WebP decoder refusing the file
        raise MediaError(f"{label}: corrupt or truncated image ({e}){_what_it_looks_like(source)}") from e
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
                f"{label}: corrupt or truncated image ({e}){_what_it_looks_like(source) if is_path else ''}"
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
    data = _check_finite(data, label, opts.nan_policy, warnings)
    # Pictures are display-ready: no default HU window even for CT (their values are not HU).
    windows = _parse_window(opts.window, label)
    frames, info = _normalise(data[None], windows=windows, bit_scale=bit_scale, percentiles=opts.percentiles,
                              label=label, warnings=warnings)
    meta["intensity"] = info
    return Media(frames=frames, kind="image", source=label, metadata=_jsonable(meta))


def _over_limit(opts: _Options, PIL_Image) -> str:
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


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def _read_dicom_header(path: Path, label: str):
    pydicom = _require("pydicom", "pydicom", "DICOM files")
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as e:
        raise MediaError(f"{label}: not a DICOM file (no DICM preamble / file meta){_what_it_looks_like(path)}") from e
    except Exception as e:  # pydicom raises many types on corrupt headers
        raise MediaError(f"{label}: corrupt DICOM header ({type(e).__name__}: {e})") from e


def _dicom_pixels(path: Path, label: str) -> tuple[np.ndarray, Any]:
    """Decoded pixel data (modality LUT / rescale slope+intercept applied: HU for CT) and the dataset."""
    pydicom = _require("pydicom", "pydicom", "DICOM files")
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
    _check_float32_range(arr, label)
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


def _dicom_intensity(ds, modality: str | None, label: str, opts: _Options, series=()):
    """(windows, bit_scale) for grayscale DICOM pixel data following the module's intensity rule.

    ``series``: every header of a series (``ds`` is its first), so that one rescaled slice is enough to
    rule out the display-ready 8-bit reading."""
    windows = _parse_window(opts.window, label)
    if windows is None and modality == "CT":
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center not in (None, "") and width not in (None, ""):  # the file's own window (first one if several)
            windows = [_file_window(center, width, label)]
        else:
            windows = _parse_window(DEFAULT_CT_WINDOW, label)
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


def _load_dicom_file(path: Path, kind: str | None, label: str, opts: _Options) -> Media:
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
    return _load_dicom_series([path], label, opts)


def _dicom_image(path: Path, header, label: str, opts: _Options) -> Media:
    rows, cols = int(header.Rows), int(header.Columns)
    if rows * cols > opts.max_image_pixels:
        raise MediaError(f"{label}: image is {cols}x{rows} pixels, more than max_image_pixels={opts.max_image_pixels}")
    data, ds = _dicom_pixels(path, label)
    modality = opts.modality or (str(ds.get("Modality", "")).upper() or None)
    meta = {**_dicom_meta(ds, modality), "original_shape": list(data.shape), "warnings": []}
    data = _check_finite(data, label, opts.nan_policy, meta["warnings"])
    if data.ndim == 3:  # colour: pydicom already converted YBR to RGB
        windows, bit_scale = _parse_window(opts.window, label), float(2 ** int(ds.get("BitsStored", 8)) - 1)
    else:
        windows, bit_scale = _dicom_intensity(ds, modality, label, opts)
    frames, info = _normalise(data[None], windows=windows, bit_scale=bit_scale, percentiles=opts.percentiles,
                              label=label, warnings=meta["warnings"])
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        frames = 1.0 - frames  # low values are white in MONOCHROME1
    meta["intensity"] = info
    return Media(frames=frames, kind="image", source=label, metadata=_jsonable(meta))


def _dicom_multiframe(path: Path, header, label: str, opts: _Options) -> Media:
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
        windows, bit_scale = _parse_window(opts.window, label), float(2 ** int(ds.get("BitsStored", 8)) - 1)
    else:
        windows, bit_scale = _dicom_intensity(ds, modality, label, opts)
    grid = _Grid(data=data, shape=data.shape[:3], affine=None)
    return _volume_media(grid, label, opts, meta, windows=windows, bit_scale=bit_scale,
                         monochrome1=str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1")


def _walk_files(folder: Path, root: Path | None) -> list[Path]:
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


def _load_dicom_series(files: list[Path], label: str, opts: _Options) -> Media:
    pydicom = _require("pydicom", "pydicom", "DICOM files")
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
    return _volume_media(grid, label, opts, meta, windows=windows, bit_scale=bit_scale,
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


def _dicom_grid(headers, rows: int, cols: int, label: str, meta: dict) -> _Grid:
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
        return _Grid(data=_DicomStack(files, (len(files), rows, cols)), shape=(len(files), rows, cols), affine=None)

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
    return _Grid(data=_DicomStack(files, (len(files), rows, cols)), shape=(len(files), rows, cols),
                 affine=affine, ornt=_closest_canonical_ornt(affine), stack_centres=centres_lps @ lps_to_ras.T)


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


# ----------------------------------------------------------------------------------------------
# Volumes: reorientation, slice sampling, display
# ----------------------------------------------------------------------------------------------


def _closest_canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """(3, 2) [RAS axis, +1/-1] per array axis: greedy match of each axis to its closest world axis."""
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    ornt = np.full((3, 2), np.nan)
    if not np.all(norms > 1e-9):
        return ornt  # degenerate: reported by _volume_media
    directions = affine[:3, :3] / norms
    cost = np.abs(directions).copy()
    for _ in range(3):
        world, axis = np.unravel_index(np.argmax(cost), cost.shape)
        ornt[axis] = (world, 1.0 if directions[world, axis] > 0 else -1.0)
        cost[world, :], cost[:, axis] = -1.0, -1.0
    return ornt


def _axcodes(ornt: np.ndarray) -> str:
    return "".join(_AXIS_CODES[int(a)][1 if f > 0 else 0] for a, f in ornt)


@dataclasses.dataclass
class _Grid:
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
    return sorted(set(_nearest(positions, targets)))


def _nearest(sorted_values: np.ndarray, targets: np.ndarray) -> list[int]:
    """Index of the value nearest each target; near-ties go to the earlier value."""
    values = np.asarray(sorted_values, dtype=np.float64)
    if values.size == 1:
        return [0] * len(targets)
    j = np.clip(np.searchsorted(values, targets), 1, values.size - 1)
    left, right = values[j - 1], values[j]
    take_left = (np.asarray(targets) - left) <= (right - np.asarray(targets)) + 1e-6
    return [int(x) for x in np.where(take_left, j - 1, j)]


# bit_scale value for _volume_media: divide by 255 when every value read is an integer in 0..255 (display-ready
# 8-bit content), else percentiles; so equal physical values give equal frames whatever dtype stores them.
_EIGHT_BIT_VALUES = "8-bit values"


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


def _volume_media(grid: _Grid, label: str, opts: _Options, meta: dict, *, windows, bit_scale,
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
    raw = _check_finite(raw, label, opts.nan_policy, warnings)
    if isinstance(bit_scale, str):  # _EIGHT_BIT_VALUES: decided on the values read, not the stored dtype
        bit_scale = None if windows is not None else _eight_bit_divisor(raw, label, warnings)
    raw = raw.astype(np.float32, copy=False)
    frames, info = _normalise(raw, windows=windows, bit_scale=bit_scale, percentiles=opts.percentiles,
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
                 slice_indices=[int(k) for k in idx], metadata=_jsonable(meta))


# ----------------------------------------------------------------------------------------------
# NIfTI (nibabel)
# ----------------------------------------------------------------------------------------------


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


def _load_nifti(path: Path, label: str, opts: _Options) -> Media:
    nib = _require("nibabel", "nibabel", "NIfTI files")
    try:
        img = nib.load(os.fspath(path), mmap=False)  # no mmap: a short file must not fault later
        shape = tuple(int(s) for s in img.shape)  # header only
    except Exception as e:
        raise MediaError(
            f"{label}: not a readable NIfTI file ({_nifti_header_problem(path) or f'{type(e).__name__}: {e}'})"
            f"{_what_it_looks_like(path)}"
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
    if _extension(path) in (".nii.gz", ".mgz") or len(shape) < 3:
        # Each lazy slice read of a gzip stream decompresses from the start: read the volume once
        # instead (bounded by max_voxels above).
        data = reader[(slice(None),) * min(len(shape), 3)].reshape(spatial)
        if _extension(path) == ".nii.gz":
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
    grid = _Grid(data=data, shape=spatial, affine=affine, ornt=ornt)
    return _volume_media(grid, label, opts, meta, windows=_windows_for(opts, label), bit_scale=_EIGHT_BIT_VALUES)


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
    if _extension(path) != ".nii":
        return
    offset = int(getattr(img.dataobj, "offset", 0))
    needed = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual < needed:
        raise MediaError(f"{label}: truncated NIfTI file: header needs {needed} bytes, file has {actual}")


# ----------------------------------------------------------------------------------------------
# Video (decord, PyAV fallback)
# ----------------------------------------------------------------------------------------------


def _load_video(path: Path, label: str, opts: _Options) -> Media:
    backend = opts.video_backend or _default_video_backend()
    warnings: list[str] = []
    if backend == "decord":
        try:
            frames, times, info = _read_video_decord(path, label, opts, warnings)
        except _DecordFailed as e:
            pyav_installed = importlib.util.find_spec("av") is not None
            if opts.video_backend == "decord" or not pyav_installed:
                hint = "; video_backend='pyav' may read it" if pyav_installed else ""
                raise MediaError(f"{label}: {e}{hint}{_what_it_looks_like(path)}") from e.__cause__
            # decord fails on files PyAV reads (MPEG-TS, some AVIs): the caller asked for no backend in particular
            logger.warning("%s: %s; reading it with PyAV instead", label, e)
            warnings.append(f"{e}; read with PyAV instead")
            backend = "pyav"
    if backend == "pyav":
        frames, times, info = _read_video_pyav(path, label, opts, warnings)
    meta = {"video_backend": backend, **info, "intensity": {"method": "scale", "divisor": 255.0}, "warnings": warnings}
    # divided in place: an hour of frames is held once as float32, not twice (same values as `/ 255.0`)
    pixels = frames.astype(np.float32)
    del frames
    np.divide(pixels, np.float32(255.0), out=pixels)
    return Media(frames=pixels, kind="video", source=label,
                 timestamps_s=[round(float(t), 6) for t in times], metadata=_jsonable(meta))


def _default_video_backend() -> str:
    for module, backend in (("decord", "decord"), ("av", "pyav")):
        try:
            importlib.import_module(module)
            return backend
        except ImportError:
            continue
    raise ImportError("load_media needs decord or PyAV to read videos: pip install decord (or pip install av)")


class _DecordFailed(Exception):
    """decord cannot open, time or decode a file that PyAV may still read (the message says what failed)."""


def _check_video_size(label: str, width: int, height: int, n_frames: int, opts: _Options) -> None:
    """Refuse before decoding: one frame over max_image_pixels, or kept frames x height x width over max_voxels
    (the float32 frames of a video cost what a volume of that many voxels costs)."""
    if width * height > opts.max_image_pixels:
        raise MediaError(
            f"{label}: frames are {width}x{height}, more than max_image_pixels={opts.max_image_pixels}"
        )
    if n_frames * width * height > opts.max_voxels:
        raise MediaError(
            f"{label}: {n_frames} frames of {width}x{height} would decode to {n_frames * width * height} pixels, more "
            f"than max_voxels={opts.max_voxels}; lower max_frames or fps"
        )


def _probe_video_header(path: Path, label: str, opts: _Options) -> tuple[int, int] | None:
    """(width, height) from the container header read by PyAV (nothing decoded), after refusing a frame size or a
    decoded size (frames the header's duration implies) over the limits. None when PyAV is missing or cannot
    parse the header: the caller then looks at a decoded frame instead."""
    if importlib.util.find_spec("av") is None:
        return None
    import av

    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            width, height, n_header = int(stream.width or 0), int(stream.height or 0), int(stream.frames or 0)
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = container.duration / 1e6 if container.duration else 0.0
    except Exception:  # decord may still read what PyAV's demuxer refuses; it reports its own errors
        return None
    if width <= 0 or height <= 0:
        return None
    n_kept = min(opts.max_frames, max(1, math.ceil(seconds * opts.fps - 1e-9))) if seconds > 0 else 1
    _check_video_size(label, width, height, min(n_kept, n_header) if n_header > 0 else n_kept, opts)
    return width, height


def _video_indices(times: np.ndarray, duration: float, fps: float, max_frames: int) -> tuple[list[int], dict]:
    """Frames nearest to k / fps (< duration), or to k * duration / max_frames when that is too many."""
    n_wanted = max(1, math.ceil(duration * fps - 1e-9))
    if n_wanted <= max_frames:
        targets, sampling = np.arange(n_wanted) / fps, {"sampling": "fps", "sampling_fps": fps}
    else:
        targets = np.arange(max_frames) * duration / max_frames
        sampling = {"sampling": "max_frames", "sampling_fps": max_frames / duration}
    return sorted(set(_nearest(times, targets))), sampling


def _decord_times(stamps: np.ndarray, avg_fps: float) -> tuple[np.ndarray | None, float, str | None]:
    """(frame times relative to the first frame, duration, warning) from decord's (n, 2) [start, end] stamps.

    decord reports AV_NOPTS_VALUE (about -1.8e18 s) for every frame of files without presentation times (an AVI
    with B-frames): then times come from the average frame rate, which is how such containers define them.
    Times None: neither is usable."""
    starts = stamps[:, 0]
    if np.isfinite(stamps).all() and np.abs(stamps).max() < 1e7 and (np.diff(starts) >= -1e-6).all():
        duration = float(stamps[-1, 1] - stamps[0, 0])
        if duration > 0:
            return starts - starts[0], duration, None
    seen = f"first frame {stamps[0].tolist()}, last {stamps[-1].tolist()} s"
    if math.isfinite(avg_fps) and avg_fps > 0:
        n = len(stamps)
        note = (f"decord reported unusable frame timestamps ({seen}); times computed from the average frame rate "
                f"({avg_fps:g} fps)")
        return np.arange(n) / avg_fps, n / avg_fps, note
    return None, 0.0, seen


def _read_video_decord(path: Path, label: str, opts: _Options, warnings: list[str]):
    decord = _require("decord", "decord", "videos")
    header = _probe_video_header(path, label, opts)
    try:
        vr = decord.VideoReader(os.fspath(path), ctx=decord.cpu(0))
        n = len(vr)
    except Exception as e:  # DECORDError / RuntimeError: no stream, unsupported codec, bad container
        hint = " -- no decodable video stream (no video track, an unsupported codec, or a damaged container)" \
            if "cannot find video stream" in str(e) else ""
        raise _DecordFailed(f"cannot open video with decord{hint} ({_short(e)})") from e
    if n == 0:
        raise MediaError(f"{label}: video has no frames")
    if n > opts.max_video_frames_decoded:
        raise MediaError(
            f"{label}: video has {n} frames, more than max_video_frames_decoded={opts.max_video_frames_decoded}"
        )
    try:
        stamps = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64).reshape(n, 2)
        avg_fps = float(vr.get_avg_fps())
    except Exception as e:
        raise _DecordFailed(f"decord cannot read the frame timestamps ({_short(e)})") from e
    times, duration, note = _decord_times(stamps, avg_fps)
    if times is None:
        raise _DecordFailed(f"decord reports unusable frame timestamps ({note}) and no frame rate")
    if note:
        warnings.append(note)
    idx, sampling = _video_indices(times, duration, opts.fps, opts.max_frames)
    try:
        if header is None:  # no header size (PyAV missing): decode one frame and look before decoding the rest
            first = vr.get_batch(idx[:1]).asnumpy()
            _check_video_size(label, first.shape[2], first.shape[1], len(idx), opts)
            batch = np.concatenate([first, vr.get_batch(idx[1:]).asnumpy()]) if len(idx) > 1 else first
        else:
            _check_video_size(label, *header, len(idx), opts)
            batch = vr.get_batch(idx).asnumpy()  # decodes only what is needed (seeking to key frames)
    except MediaError:
        raise
    except Exception as e:
        raise _DecordFailed(f"cannot decode video with decord ({_short(e)})") from e
    info = {"fps_native": avg_fps, "duration_s": duration, "n_frames_total": n, "frame_indices": idx, **sampling}
    return batch, times[idx], info


def _read_video_pyav(path: Path, label: str, opts: _Options, warnings: list[str]):
    av = _require("av", "av", "videos")
    # Pass 1: packet timestamps only (demuxing, no decoding) to know every frame's time.
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise MediaError(
                    f"{label}: no video stream in the file (no frames): an audio-only file, or a truncated or "
                    "damaged container"
                )
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise MediaError(f"{label}: unsupported video codec (no decoder for this stream)")
            width, height = int(stream.width or 0), int(stream.height or 0)
            _check_video_size(label, width, height, 1, opts)
            time_base, pts, end, n_packets, last_dts, restarts = stream.time_base, [], None, 0, None, False
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                n_packets += 1
                if packet.dts is not None:  # decode timestamps only grow, unless the timeline restarts
                    restarts = restarts or (last_dts is not None and packet.dts < last_dts)
                    last_dts = packet.dts
                if packet.pts is not None:
                    pts.append(packet.pts)
                    packet_end = packet.pts + (packet.duration or 0)
                    end = packet_end if end is None else max(end, packet_end)
                if n_packets > opts.max_video_frames_decoded:
                    raise MediaError(
                        f"{label}: video has more than max_video_frames_decoded={opts.max_video_frames_decoded} "
                        "frames"
                    )
            rate = stream.average_rate or stream.guessed_rate
            fps_native = float(rate) if rate else None
    except MediaError:
        raise
    except Exception as e:  # av.error.*: invalid data, missing decoder...
        raise MediaError(f"{label}: cannot open video with PyAV ({_short(e)}){_what_it_looks_like(path)}") from e
    if n_packets == 0:
        raise MediaError(f"{label}: video has no frames")
    by_rate = (restarts or len(pts) < n_packets or time_base is None) and bool(fps_native and fps_native > 0)
    if by_rate:
        # packets without presentation times, or a timeline that restarts (concatenated segments): sorting
        # the packet times would misplace frames, while the decoder still outputs them in playback order
        times, duration = np.arange(n_packets) / fps_native, n_packets / fps_native
        warnings.append(f"packet timestamps {'restart mid-stream' if restarts else 'missing'}; frame times computed "
                        f"from the average frame rate ({fps_native:g} fps)")
    else:
        if not pts or time_base is None:
            raise MediaError(f"{label}: the video's packets carry no timestamps and the stream no frame rate")
        pts.sort()
        times = np.array([float((p - pts[0]) * time_base) for p in pts])
        duration = float((end - pts[0]) * time_base)
        if not duration > 0 and len(pts) > 1:
            duration = float(times[-1] + np.median(np.diff(times)))
    if not duration > 0:
        raise MediaError(f"{label}: video has zero duration")
    idx, sampling = _video_indices(times, duration, opts.fps, opts.max_frames)
    _check_video_size(label, width, height, len(idx), opts)

    # Pass 2: decode in presentation order, convert only the wanted frames, stop after the last one.
    wanted, frames, got, decoded_pts, kept_pixels = set(idx), [], [], [], 0
    try:
        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                decoded_pts.append(frame.pts)
                if i in wanted:
                    # the header may understate the size (or give none): check what the decoder made
                    _check_video_size(label, frame.width, frame.height, 1, opts)
                    kept_pixels += frames[0].shape[0] * frames[0].shape[1] if frames else frame.width * frame.height
                    if kept_pixels > opts.max_voxels:
                        raise MediaError(
                            f"{label}: the decoded frames exceed max_voxels={opts.max_voxels} pixels (frames larger "
                            "than the stream header says); lower max_frames or fps"
                        )
                    got.append(i)
                    if frames and (frame.width, frame.height) != (frames[0].shape[1], frames[0].shape[0]):
                        # the stream changes resolution (concatenated segments): one clip needs one frame size
                        size = (frames[0].shape[1], frames[0].shape[0])
                        note = f"frame size changes from {size[0]}x{size[1]} to {frame.width}x{frame.height}"
                        if not any(w.startswith(note) for w in warnings):
                            warnings.append(f"{note} at frame {i}; such frames resized to {size[0]}x{size[1]}")
                        frames.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
                    else:
                        frames.append(frame.to_ndarray(format="rgb24"))
                if i >= idx[-1]:
                    break
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{label}: cannot decode video with PyAV ({_short(e)})") from e
    if not frames:
        raise MediaError(f"{label}: no frame could be decoded")
    # The decoder outputs frames in presentation order, but their pts can still be missing or scrambled (AVI stores
    # no presentation times, so B-frames come out with decode-order guesses): then frame i gets the i-th smallest
    # packet timestamp, which is the same value whenever the pts are sound.
    if not by_rate and None not in decoded_pts and all(b > a for a, b in zip(decoded_pts, decoded_pts[1:])):
        stamps = [float((decoded_pts[i] - pts[0]) * time_base) for i in got]
    else:
        stamps = [float(times[min(i, len(times) - 1)]) for i in got]
        if not by_rate:
            warnings.append("decoded frames carry missing or out-of-order timestamps (B-frames in AVI?); "
                            "frame times taken from the sorted packet timestamps")
    info = {"fps_native": fps_native, "duration_s": duration, "n_frames_total": len(times),
            "frame_indices": got, **sampling}
    if len(frames) < len(idx):
        logger.warning("%s: decoded only %d of %d wanted frames", label, len(frames), len(idx))
        warnings.append(f"decoded only {len(frames)} of {len(idx)} wanted frames")
    return np.stack(frames), np.array(stamps), info


def _short(e: Exception, limit: int = 300) -> str:
    """One-line exception text without decord's "[hh:mm:ss] /path/file.cc:123:" prefixes."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", " ".join(str(e).split()))
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------


def _jsonable(value):
    """Plain Python containers and scalars only (numpy / pydicom types converted), so json.dumps works."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return str(value)
