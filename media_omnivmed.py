"""Turn any medical input into normalised frames plus metadata (OmniV-Med remote code).

``load_media(source, kind=None, ...)`` returns a :class:`Media` whose ``frames`` are a
``(T, H, W, 3)`` float32 array in ``[0, 1]``: ``T == 1`` for 2D images, slices for volumes, sampled
frames for videos. Grayscale is replicated to three channels. Every bad input raises
:class:`MediaError` (a ``ValueError``) whose message names the file (or ``<array>``) and the problem;
a missing optional package raises ``ImportError`` naming what to ``pip install``.

Remote code, split by concern into flat files the Hub copies with it (imported as ``from .x import y``):
media_base_omnivmed (Media, MediaError, options, presets, file sniffing), intensity_omnivmed, volume_omnivmed
(reorientation, slice choice, display), picture_omnivmed (Pillow, arrays), dicom_omnivmed, nifti_omnivmed,
video_omnivmed; this file holds ``load_media`` and the dispatch by source and file type. None touches the network;
nibabel / pydicom / decord / PyAV / Pillow are imported only when needed.

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
    Streaming: ``load_video_chunks(source, chunk_frames, **options)`` yields the same frames,
    timestamps and metadata in chunks of consecutive frames, decoding as it goes (one code path
    reads both), so an hour of video is never held; ``max_voxels`` then bounds one chunk.
"""


from __future__ import annotations

import logging
import dataclasses
import errno
import inspect
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .dicom_omnivmed import load_dicom_file, load_dicom_series, walk_files
from .intensity_omnivmed import parse_window
from .media_base_omnivmed import (
    DEFAULT_CT_WINDOW,
    DEFAULT_RGB_WINDOWS,
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    KINDS,
    SLICE_AXES,
    VIDEO_BACKENDS,
    VIDEO_EXTENSIONS,
    VOLUME_EXTENSIONS,
    WINDOW_PRESETS,
    Media,
    MediaError,
    Options,
    extension,
    sniff,
)
from .nifti_omnivmed import load_nifti
from .picture_omnivmed import load_array, load_picture
from .video_omnivmed import iter_video, load_video


logger = logging.getLogger(__name__)


__all__ = [
    "DEFAULT_CT_WINDOW",
    "DEFAULT_RGB_WINDOWS",
    "WINDOW_PRESETS",
    "Media",
    "MediaError",
    "load_media",
    "load_video_chunks",
    "media_chunks",
]


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
            return load_array(source, kind, opts)
        if type(source).__module__.startswith("PIL."):
            if kind not in (None, "image"):
                raise MediaError(f"{label}: a PIL image can only be loaded as kind='image', not {kind!r}")
            return load_picture(source, label, opts)
        if isinstance(source, (list, tuple)):
            if kind not in (None, "volume"):
                raise MediaError(f"{label}: a list of files is read as a DICOM series (kind='volume')")
            if not source:
                raise MediaError(f"{label}: the list of DICOM files is empty")
            files = [_existing_file(_resolve_path(p, opts.data_root), _label(p)) for p in source]
            return load_dicom_series(files, label, opts)
        if isinstance(source, (str, os.PathLike)):
            return _load_path(_resolve_path(source, opts.data_root), kind, opts)
        raise MediaError(f"{label}: unsupported source type {type(source).__name__}")
    except MediaError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError, LookupError, zlib.error, struct.error) as e:
        # Last resort: library errors not wrapped closer to their cause still come out as MediaError.
        raise MediaError(f"{label}: could not read ({type(e).__name__}: {e})") from e


def load_video_chunks(source, chunk_frames: int = 64, **options) -> Iterator[Media]:
    """A video's sampled frames in consecutive chunks of at most `chunk_frames` frames, decoded as they are needed.

    Exactly the frames, timestamps and metadata `load_media(source, kind="video", **options)` returns, in order, as
    `Media` chunks (kind "video") whose metadata also holds "chunk": first_frame, num_frames, frames_planned, last (see
    `video_omnivmed.iter_video`); a long video is never held whole. `max_voxels` bounds the frames of one chunk. An
    array (T, H, W[, C]) is loaded whole (it is in memory already) and cut into chunks. The options are load_media's;
    the source, the options and `chunk_frames` are checked here, before the first chunk is asked for."""
    label = _label(source)
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, (int, np.integer)) or chunk_frames < 1:
        raise MediaError(f"{label}: chunk_frames must be an integer >= 1, got {chunk_frames!r}")
    try:
        bound = inspect.signature(load_media).bind(source, kind="video", **options)
    except TypeError as e:
        raise MediaError(f"{label}: {e}") from e
    bound.apply_defaults()
    opts = _validate_options(label, "video", bound.arguments)
    if _is_array_like(source):
        return media_chunks(load_array(source, "video", opts), int(chunk_frames))
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(
            f"{label}: streaming reads a video file or a (T, H, W[, C]) array, not {type(source).__name__}"
        )
    path = _resolve_path(source, opts.data_root)
    label = os.fspath(path)
    _existing_file(path, label)
    fmt = _detect_format(path, label)
    if fmt != "video":
        raise MediaError(f"{label}: streaming reads video files; this is read as {fmt}")
    return _guarded(iter_video(path, label, opts, int(chunk_frames)), label)


def media_chunks(media: Media, chunk_frames: int) -> Iterator[Media]:
    """A loaded volume or video cut into consecutive chunks of at most `chunk_frames` frames (views, no copy), with
    the per-frame fields sliced alike and "chunk" in the metadata, as `load_video_chunks` gives them."""
    n = len(media.frames)

    def part(values, start, stop):
        return None if values is None else list(values[start:stop])

    for start in range(0, n, chunk_frames):
        stop = min(start + chunk_frames, n)
        chunk = {"first_frame": start, "num_frames": stop - start, "frames_planned": n, "last": stop == n}
        yield dataclasses.replace(
            media, frames=media.frames[start:stop], timestamps_s=part(media.timestamps_s, start, stop),
            slice_positions_mm=part(media.slice_positions_mm, start, stop),
            slice_indices=part(media.slice_indices, start, stop), metadata={**media.metadata, "chunk": chunk},
        )


def _guarded(chunks: Iterator[Media], label: str) -> Iterator[Media]:
    """load_media's last resort for a streamed read: library errors come out as MediaError naming the file."""
    try:
        yield from chunks
    except MediaError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError, LookupError, zlib.error, struct.error) as e:
        raise MediaError(f"{label}: could not read ({type(e).__name__}: {e})") from e


def _label(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (list, tuple)):
        head = ", ".join(os.path.basename(os.fspath(p)) for p in source[:3] if isinstance(p, (str, os.PathLike)))
        return f"<{len(source)} DICOM files: {head}{', ...' if len(source) > 3 else ''}>"
    if type(source).__module__.startswith("PIL."):
        return "<PIL.Image>"
    return "<array>" if _is_array_like(source) else f"<{type(source).__name__}>"


def _validate_options(label: str, kind, args: dict) -> Options:
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
    parse_window(args["window"], label)  # a bad window fails here, before any file is read
    root = args["data_root"]
    return Options(
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


def _load_path(path: Path, kind: str | None, opts: Options) -> Media:
    label = os.fspath(path)
    if path.is_dir():
        if kind not in (None, "volume"):
            raise MediaError(f"{label}: a folder is read as a DICOM series (kind='volume'), not {kind!r}")
        return load_dicom_series(walk_files(path, opts.data_root), label, opts)
    _existing_file(path, label)
    fmt = _detect_format(path, label)
    if fmt == "dicom":
        return load_dicom_file(path, kind, label, opts)
    fmt_kind = {"image": "image", "nifti": "volume", "video": "video"}[fmt]
    if kind is not None and kind != fmt_kind:
        raise MediaError(f"{label}: asked for kind={kind!r} but this {fmt} file is read as kind={fmt_kind!r}")
    if fmt == "image":
        return load_picture(path, label, opts)
    if fmt == "nifti":
        return load_nifti(path, label, opts)
    return load_video(path, label, opts)


def _detect_format(path: Path, label: str) -> str:
    """'image' | 'nifti' | 'dicom' | 'video': file content wins over a wrong extension."""
    ext = extension(path)
    by_ext = (
        "image" if ext in IMAGE_EXTENSIONS else
        "nifti" if ext in VOLUME_EXTENSIONS else
        "video" if ext in VIDEO_EXTENSIONS else
        "dicom" if ext in DICOM_EXTENSIONS else None
    )
    sniffed, what = sniff(path)
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


def _is_array_like(source) -> bool:
    if isinstance(source, np.ndarray):
        return True
    # torch tensors, duck-typed so this module never imports torch
    return all(hasattr(source, a) for a in ("detach", "cpu", "numpy", "shape", "dtype"))
