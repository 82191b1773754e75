"""What every OmniV-Med media reader shares (remote code): the `Media` result, `MediaError`, the validated options,
window presets and file extensions, optional-package and file-type helpers, JSON-safe metadata.

Conventions for all readers: see media_omnivmed.py, whose `load_media` is the entry point.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np


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
AXIS_CODES = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of each RAS axis


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
class Options:
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


def extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def sniff(path: Path) -> tuple[str | None, str | None]:
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


def what_it_looks_like(path: Path) -> str:
    try:
        _, what = sniff(path)
    except OSError:
        return ""
    return f"; content looks like {what}" if what else "; content is not a recognised format"


def require(module: str, pip_name: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"load_media needs {pip_name} to read {purpose}: pip install {pip_name}") from e


def to_numpy(source) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    t = source.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def jsonable(value):
    """Plain Python containers and scalars only (numpy / pydicom types converted), so json.dumps works."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
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
        return jsonable(value.tolist())
    return str(value)
