"""OmniV-Med demo (Gradio): upload a scan or a video, see what the model sees, ask a question, see where it looked.

    python app.py                          # the embedded default, runs/omnivmed-default/final (trained if missing)
    python app.py --model DIR_OR_HUB_ID    # trained weights from a local folder or a Hub repo: nothing is trained
    python app.py --model DIR --host 0.0.0.0 --port 7860 --max-new-tokens 64

On a Hugging Face Space (sdk: gradio) the Space runs `python app.py`; set the Space variable OMNIVMED_MODEL to a Hub
id (or a folder in the Space) to serve trained weights instead of training the embedded default at start-up (the
page then shows the measured progress and an estimate made from it, never a guess).

Inputs: PNG / JPEG (and the other pictures Pillow reads), a single DICOM file, NIfTI (.nii, .nii.gz), a .zip of a
DICOM series (nested folders are fine; one series per zip: the loader lists the series of a zip holding more), or a
video (MP4, AVI, MOV, WebM, MKV). Everything is read by the processor's own loader (`media_omnivmed.load_media`), so
the demo shows what the model gets: volumes in RAS with the radiological display convention, sliced along the chosen
plane; CT through the chosen Hounsfield window (presets, the 3-window "rgb" mode with its legend, or a level/width of
your own); other grayscale inputs (MR, X-ray, 16-bit PNG) through a level/width in % of the stored range (a 16-bit
PNG starts at its 0.5-99.5 percentiles, not at the full 16-bit range). The "model view" is the resized frame the
tower patches, with the token pruning of the chosen threshold drawn on it: pruned blocks dimmed, kept ones outlined.

Honesty rules of the page:
- no answer without a readable medium, unless the user ticks "text-only question" (the answer then says so);
- an answer with no visible character is shown as a notice, never as an empty bubble;
- one slice numbering: the index in the volume plus the position in mm (and the DICOM InstanceNumber when the
  slices are the acquired ones);
- uploads are bounded (file size, zip directory, a video's decoded size from its header) before anything is unpacked
  or decoded;
- a stopped, reloaded or closed page cancels its answer at the next token and frees the model for the others.

"Where the model looked": after each answer, one more forward pass of the prompt plus the answer with eager attention
records, for every answer token, the attention from the position that produced it to every visual token, averaged
over heads and layers; the page shows each visual token's share of that attention (normalised over the visual
tokens), summed per slice / frame as a strip heat map and per kept block as an overlay on the current slice.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `omnivmed` (see omnivmed.py) and the scripts live next to this file
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a demo that does not need them

import data_omnivmed  # noqa: E402
from omnivmed.media_omnivmed import WINDOW_PRESETS, Media  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor  # noqa: E402
from omnivmed_tools import (  # noqa: E402
    TINY_IMAGE_PROCESSOR,
    load_model,
    patches_to_frames,
    stream_generate,
    write_instrument_video,
)


logger = logging.getLogger("app")

DEFAULT_OUTPUT_DIR = ROOT / "runs" / "omnivmed-default"
DEFAULT_MODEL = DEFAULT_OUTPUT_DIR / "final"
EXAMPLES_DIR = ROOT / "runs" / "demo-examples"
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom", ".nii", ".gz", ".mgz",
                ".zip", ".mp4", ".avi", ".mov", ".webm", ".mkv"]  # fmt: skip
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".webm", ".mkv"}
PLANES = ("axial", "coronal", "sagittal")
WINDOWS = ["auto", *WINDOW_PRESETS, "rgb", "custom"]
# Upload bounds. One upload: 512 MB (a zipped 1,000-slice 512x512 CT series is ~0.5 GB). A zip is judged from its
# central directory before anything is unpacked: at most ZIP_MAX_FILES entries, ZIP_MAX_BYTES unpacked in all, and
# no entry that inflates more than ZIP_MAX_RATIO times (DICOM slices compress 2-10x; a bomb's zeros ~1000x).
MAX_UPLOAD_BYTES = 512 * 1024**2
ZIP_MAX_FILES = 2000
ZIP_MAX_BYTES = 1024**3
ZIP_MAX_RATIO = 100
# A video is judged from its container header before any frame is decoded: the frames the loader would keep (its fps
# and max_frames), at full resolution as float32 RGB (what `Media.frames` holds), must fit in this.
VIDEO_MAX_DECODED_BYTES = 2 * 1024**3
VIEW_SIDE = 320  # longest side, in screen pixels, of the slice panels (two fit side by side at 1366 x 768)
STRIP_TILE = 124  # width, in pixels, of a slice / frame in the strip
STRIP_COLUMNS = 5  # 5 tiles fit the picture column at 1366 px, so the strip is shown at its own size
LABEL_FONT = 14  # px: strip labels and titles stay readable when the strip is shown at its own size
# radiological display (media_omnivmed): the letters at the top / bottom / left / right edges of a slice
ORIENTATION_LETTERS = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}
NO_MEDIUM = ("No readable image, volume or video is loaded, so the question was not sent to the model. Upload one "
             "(or pick an example), or tick \"text-only question\" to ask without an image.")  # fmt: skip
TEXT_ONLY_NOTE = "[text-only question: no image was given to the model] "


# ---------------------------------------------------------------------------------------------------------- uploads
def unpack_zip(path: Path, into: Path) -> Path:
    """Unpack a zip of a DICOM series into `into`. Judged from the archive's central directory before anything is
    written: entries that would land outside `into`, more than ZIP_MAX_FILES files, more than ZIP_MAX_BYTES unpacked
    or an entry inflating more than ZIP_MAX_RATIO times are refused. zipfile stops each entry at its declared size,
    so a directory that lies cannot unpack more than it declared. Returns `into`."""
    name = path.name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{name}: not a readable zip archive ({error})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise ValueError(f"{name}: the zip archive holds no files")
        if len(members) > ZIP_MAX_FILES:
            raise ValueError(f"{name}: {len(members)} files in the archive, more than the {ZIP_MAX_FILES} allowed")
        total = sum(m.file_size for m in members)
        if total > ZIP_MAX_BYTES:
            raise ValueError(f"{name}: unpacks to {total / 1e9:.2f} GB, more than the {ZIP_MAX_BYTES / 1e9:.2f} GB "
                             "allowed")  # fmt: skip
        for m in members:
            if m.file_size > 1024**2 and m.file_size > ZIP_MAX_RATIO * max(m.compress_size, 1):
                raise ValueError(f"{name}: entry {m.filename!r} inflates {m.file_size / max(m.compress_size, 1):.0f} "
                                 f"times ({m.compress_size} -> {m.file_size} bytes; a zip bomb?), more than the "
                                 f"{ZIP_MAX_RATIO} times allowed")  # fmt: skip
        root = into.resolve()
        for member in members:
            target = (root / member.filename).resolve()
            if root not in target.parents:
                raise ValueError(f"{name}: entry {member.filename!r} would be written outside the archive's folder")
        for member in members:
            if Path(member.filename).name.startswith(".") or member.filename.startswith("__MACOSX/"):
                continue  # Finder's resource forks and hidden files are not slices
            archive.extract(member, root)
    return into


def check_video_header(path: Path, fps: float, max_frames: int, name: str | None = None) -> dict:
    """Refuse a video whose header promises more decoded data than VIDEO_MAX_DECODED_BYTES, before decoding a frame:
    the loader keeps the frames nearest to 0, 1/fps, 2/fps, ... (at most max_frames), each (H, W, 3) float32."""
    import av

    name = name or path.name
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{name}: no video stream in the file")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / 1e6
            frames = int(stream.frames or 0)
    except av.error.FFmpegError as error:
        raise ValueError(f"{name}: not a readable video ({error})") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{name}: the video header gives no frame size")
    sampled = min(max_frames, max(1, math.ceil(duration * fps))) if duration > 0 else min(max_frames, frames or
                                                                                         max_frames)  # fmt: skip
    decoded = sampled * width * height * 3 * 4
    if decoded > VIDEO_MAX_DECODED_BYTES:
        raise ValueError(f"{name}: {sampled} frames of {width}x{height} would decode to {decoded / 1e9:.1f} GB, more "
                         f"than the {VIDEO_MAX_DECODED_BYTES / 1e9:.1f} GB allowed (refused from the header; nothing "
                         "was decoded)")  # fmt: skip
    return {"width": width, "height": height, "duration_s": duration, "frames_sampled": sampled, "bytes": decoded}


def media_source(path: str | Path, workdir: Path, image_processor=None) -> Path:
    """What `load_media` should read for an uploaded file: the file itself, or the folder a zip unpacks to. Videos
    are checked from their header first."""
    path = Path(path)
    if path.suffix.lower() == ".zip":
        return unpack_zip(path, Path(tempfile.mkdtemp(prefix="series-", dir=workdir)))
    if path.suffix.lower() in VIDEO_SUFFIXES and image_processor is not None:
        check_video_header(path, float(image_processor.fps), int(image_processor.max_frames))
    return path


def readable_error(error: Exception, upload: Path, shown_as: str, unpacked: Path | None = None) -> str:
    """The loader's message with the server-side paths replaced by the name the user uploaded (a file inside an
    unpacked zip becomes `name.zip/inner/path`)."""
    text = str(error)
    if unpacked is not None and unpacked != upload:
        for long in {str(unpacked), str(unpacked.resolve())}:
            text = text.replace(long, shown_as)
    for long in sorted({str(upload), str(upload.resolve()), str(upload.parent), str(upload.parent.resolve())},
                       key=len, reverse=True):  # fmt: skip
        text = text.replace(long + os.sep, "").replace(long, shown_as)
    return text


def dicom_instance_numbers(source: Path, media: Media) -> list[int | None] | None:
    """The DICOM InstanceNumber of each shown slice, when the shown slices are the acquired ones: the files' slice
    centres (ImagePositionPatient, LPS -> RAS) along the shown axis match the slice positions one to one. A slice
    resliced from many files (e.g. coronal from an axial series) has no InstanceNumber: None."""
    import pydicom

    if media.kind != "volume" or not media.slice_positions_mm:
        return None
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}.get((media.metadata or {}).get("slice_axis", "axial"))
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    found = []
    for f in files[: ZIP_MAX_FILES]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            ipp, number = ds.get("ImagePositionPatient"), ds.get("InstanceNumber")
        except Exception:  # not a DICOM file (the loader skipped it as well)
            continue
        if ipp is None or number is None or axis is None:
            continue
        ras = np.asarray([float(v) for v in ipp]) * np.array([-1.0, -1.0, 1.0])
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        iop = ds.get("ImageOrientationPatient")
        if iop is not None and len(iop) == 6:  # the slice's centre, as media_omnivmed measures positions
            row_cos, col_cos = np.asarray([float(v) for v in iop[:3]]), np.asarray([float(v) for v in iop[3:]])
            spacing = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
            centre = col_cos * spacing[0] * (rows - 1) / 2 + row_cos * spacing[1] * (cols - 1) / 2
            ras = ras + centre * np.array([-1.0, -1.0, 1.0])
        found.append((float(ras[axis]), int(number)))
    if not found:
        return None
    positions = np.array([p for p, _ in found])
    spacing = (media.spacing_mm or (1.0,))[0] or 1.0
    out = []
    for z in media.slice_positions_mm:
        near = np.abs(positions - z)
        k = int(near.argmin())
        out.append(found[k][1] if near[k] < 0.25 * max(spacing, 1e-3) else None)
    return out if any(n is not None for n in out) else None


# -------------------------------------------------------------------------------------------------- window / level
def is_ct(media: Media) -> bool:
    metadata = media.metadata or {}
    return metadata.get("modality") == "CT" or (metadata.get("intensity") or {}).get("method") == "window"


def is_grayscale(media: Media) -> bool:
    f = media.frames
    return media.kind != "video" and bool(np.array_equal(f[..., 0], f[..., 1]) and np.array_equal(f[..., 0], f[..., 2]))


def auto_level_width(media: Media) -> tuple[float, float]:
    """The starting level/width (in % of the stored range) for a grayscale input that is not CT: a 16-bit picture
    (scaled by 1/65535, so its content may fill only a corner of the range) starts at its 0.5-99.5 percentiles; the
    rest were already normalised by the loader (percentiles or /255) and start at the identity 50 / 100."""
    intensity = (media.metadata or {}).get("intensity") or {}
    if intensity.get("method") == "scale" and float(intensity.get("divisor", 255)) > 255:
        lo, hi = (float(v) * 100 for v in np.percentile(media.frames[..., 0], (0.5, 99.5)))
        if hi - lo > 1e-3:
            return round((lo + hi) / 2, 3), round(hi - lo, 3)
    return 50.0, 100.0


def apply_level_width(media: Media, level: float, width: float) -> Media:
    """The loaded frames through a level/width window given in % of their [0, 1] range (identity: 50 / 100)."""
    if abs(level - 50.0) < 1e-9 and abs(width - 100.0) < 1e-9:
        return media
    lo, w = (level - width / 2) / 100, max(width, 1e-3) / 100
    frames = np.clip((media.frames - lo) / w, 0.0, 1.0).astype(np.float32)
    metadata = {**(media.metadata or {}), "display_window_percent": {"level": level, "width": width}}
    return dataclasses.replace(media, frames=frames, metadata=metadata)


# ------------------------------------------------------------------------------------------------------------- views
@dataclass
class View:
    """One upload as the model sees it under one (plane, window, level/width, threshold)."""

    media: Media  # frames as given to the model, at the loaded resolution (display orientation), for the scan panel
    name: str  # the uploaded file's name
    frames: np.ndarray  # (T, h, w, 3) in [0, 1]: the resized frames the tower patches
    keep: np.ndarray  # (T, h / block, w / block) bool: the visual tokens kept by pruning
    block: int  # pixels per visual token side (patch * merge)
    labels: list[str]  # one short label per slice / frame, the page's one numbering
    report: dict  # the processor's pruning report
    meta: dict  # the processor's media_metadata entry
    threshold: float
    plane: str
    window: str
    raw: Media | None = None  # as loaded, before the level/width of the page (reused when only that changes)
    instance_numbers: list | None = None  # DICOM InstanceNumber of each slice, when they are the acquired slices
    level_width: tuple | None = None  # (level, width) applied: % of the stored range, or HU for a custom CT window
    key: tuple = field(default_factory=tuple)  # what the model sees: a new key starts a new conversation


def slice_label(view: View, index: int, short: bool = False) -> str:
    """The page's one numbering. Volumes: the index in the (reoriented) volume along the shown axis, the position in
    mm, and the DICOM InstanceNumber when the slice is an acquired one; videos: the time; images: nothing."""
    m = view.media
    if m.kind == "volume":
        parts = [f"slice {m.slice_indices[index]}" if m.slice_indices else f"slice {index}"]
        if m.slice_positions_mm:
            parts.append(f"{m.slice_positions_mm[index]:.1f} mm")
        number = (view.instance_numbers or [None] * (index + 1))[index]
        if number is not None:
            parts.append(f"DICOM #{number}" if short else f"DICOM InstanceNumber {number}")
        return " · ".join(parts)
    if m.kind == "video":
        return f"{m.timestamps_s[index]:.1f} s" if m.timestamps_s else f"frame at index {index}"
    return "image"


def build_view(upload, image_processor, plane: str = "axial", window: str = "auto", threshold: float | None = None,
               workdir: Path | None = None, media: Media | None = None, name: str | None = None,
               level_width: tuple | None = None) -> View:  # fmt: skip
    """Load `upload` with the processor's settings (plane, CT window and level/width chosen here) and compute what
    pruning keeps. `media` reuses an already loaded file (as loaded, before level/width). `level_width` is in HU for
    window "custom" (applied by the loader), else in % of the stored range for a grayscale input that is not CT
    (None: `auto_level_width`)."""
    upload = Path(upload)
    name = name or upload.name
    workdir = Path(workdir or tempfile.gettempdir())
    options = {"slice_axis": plane}
    if window == "custom":
        options["window"] = tuple(float(v) for v in (level_width or (40.0, 400.0)))
    elif window != "auto":
        options["window"] = window
    source = upload
    numbers = None
    try:
        if media is None:
            source = media_source(upload, workdir, image_processor)
            media = image_processor.to_media(str(source), **options)
            if source.suffix.lower() in (".dcm", ".dicom") or source.is_dir():
                numbers = dicom_instance_numbers(source, media)
        raw = media
        applied = tuple(options["window"]) if window == "custom" else None
        if window != "custom" and not is_ct(raw) and is_grayscale(raw):
            applied = tuple(level_width) if level_width is not None else auto_level_width(raw)
            media = apply_level_width(raw, *applied)
        overrides = {} if threshold is None else {"prune_threshold": float(threshold)}
        batch = image_processor([media], return_tensors="pt", **overrides)
    except (ValueError, OSError, RuntimeError) as error:  # MediaError is a ValueError naming the file
        raise ValueError(readable_error(error, upload, name, source)) from None
    finally:
        if source != upload and source.is_dir():  # an unpacked zip: the slices are in memory now
            shutil.rmtree(source, ignore_errors=True)
    meta = batch["media_metadata"][0]
    merge, patch = int(batch["merge_sizes"][0]), image_processor.patch_size
    frames = patches_to_frames(batch["pixel_values"], batch["grid_thw"][0], merge, patch,
                               image_processor.image_mean, image_processor.image_std)  # fmt: skip
    t, gh, gw = (int(v) for v in batch["grid_thw"][0])
    keep = batch["visual_keep_mask"].reshape(t, gh // merge, gw // merge).numpy()
    used = image_processor.prune_threshold if threshold is None else float(threshold)
    view = View(media, name, frames, keep, merge * patch, [], meta["pruning_report"], meta, used, plane, window,
                raw=raw, instance_numbers=numbers, level_width=applied,
                key=(str(upload), plane, window, applied))  # fmt: skip
    view.labels = [slice_label(view, i, short=True) for i in range(t)]
    return view


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without scalable default font
        return ImageFont.load_default()


def heat_colour(v: np.ndarray) -> np.ndarray:
    """A red -> yellow ramp for v in [0, 1] ((..., 3) in [0, 1]), blended with alpha ~ v: no attention leaves the
    picture as it was, the most attention is bright yellow (never white, which grayscale anatomy already has)."""
    v = np.clip(v, 0, 1)[..., None]
    return np.concatenate([np.ones_like(v), v, np.zeros_like(v)], axis=-1)


def scan_image(view: View, index: int) -> Image.Image:
    """Slice / frame `index` at the loaded resolution, scaled for the screen, with orientation letters for volumes
    and the page's slice label."""
    frame = view.media.frames[index]
    image = Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype(np.uint8))
    scale = VIEW_SIDE / max(image.size)
    if scale != 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BICUBIC if scale > 1 else Image.LANCZOS)  # fmt: skip
    metadata = view.media.metadata or {}
    draw, font = ImageDraw.Draw(image), _font(max(13, image.height // 24))
    w, h = image.size
    if view.media.kind == "volume" and metadata.get("display") == "radiological":
        top, bottom, left, right = ORIENTATION_LETTERS[metadata.get("slice_axis", view.plane)]
        for text, xy, anchor in ((top, (w / 2, 4), "mt"), (bottom, (w / 2, h - 4), "mb"), (left, (4, h / 2), "lm"),
                                 (right, (w - 4, h / 2), "rm")):  # fmt: skip
            draw.text(xy, text, fill=(255, 220, 0), font=font, anchor=anchor, stroke_width=2, stroke_fill="black")
    if view.media.kind != "image":
        draw.text((4, 4), view.labels[index], fill="white", font=_font(LABEL_FONT), stroke_width=2,
                  stroke_fill="black")  # fmt: skip
    return image


def heat_span(blocks: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """The colour scale of a heat map: least to largest block share over the kept blocks of the whole volume /
    video, so slices compare and near-uniform attention still shows where it is higher (the numbers are printed
    beside: the colours alone say nothing about how much higher)."""
    kept = blocks[keep]
    return (float(kept.min()), float(kept.max())) if kept.size else (0.0, 0.0)


def _tint(rgb: np.ndarray, heat: np.ndarray, keep: np.ndarray, span, block: int) -> np.ndarray:
    lo, hi = span
    v = np.where(keep, np.clip((heat - lo) / (hi - lo), 0, 1) if hi > lo else 0.5, 0.0)
    v = np.repeat(np.repeat(v, block, 0), block, 1)
    alpha = (0.7 * v)[..., None]
    return rgb * (1 - alpha) + heat_colour(v) * alpha


def model_image(view: View, index: int, heat: np.ndarray | None = None, span: tuple | None = None,
                share: float | None = None) -> Image.Image:  # fmt: skip
    """Frame `index` as the tower sees it, pruned blocks dimmed and kept blocks outlined; with `heat` (the share of
    the last answer's attention per block of this frame, (h / block, w / block)) the kept blocks are tinted by it on
    the colour scale `span` (see heat_span; default: this frame's own), and `share` (this frame's part of the
    answer's attention to the image) is printed."""
    frame, keep = view.frames[index], view.keep[index]
    h, w = frame.shape[:2]
    scale = VIEW_SIDE / max(h, w)
    shade = np.repeat(np.repeat(np.where(keep, 1.0, 0.3), view.block, 0), view.block, 1)[..., None]
    rgb = frame * shade
    if heat is not None:
        rgb = _tint(rgb, heat, keep, span or heat_span(heat, keep), view.block)
    size = (round(w * scale), round(h * scale))
    image = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize(size, Image.NEAREST)  # crisp blocks
    draw = ImageDraw.Draw(image)
    b = view.block * scale
    for r, c in zip(*np.nonzero(keep)):
        draw.rectangle([round(c * b), round(r * b), round((c + 1) * b) - 1, round((r + 1) * b) - 1],
                       outline=(0, 200, 255) if heat is None else (90, 90, 90))  # fmt: skip
    title = f"{int(keep.sum())}/{keep.size} tokens kept"
    if share is not None:
        title += f" · {100 * share:.1f} % of the attention"
    draw.text((4, 4), title, fill="white", font=_font(LABEL_FONT), stroke_width=2, stroke_fill="black")
    return image


def strip_image(view: View, frame_share: np.ndarray | None = None, block_share: np.ndarray | None = None):
    """Every slice / frame the model gets with the pruning drawn on each, labelled with the page's numbering; with
    the last answer's attribution, each tile's kept blocks are tinted by their share and a bar under the tile gives
    the slice's share of the answer's attention to the image."""
    t, h, w = view.frames.shape[:3]
    scale = STRIP_TILE / w
    tile_w, tile_h = STRIP_TILE, max(1, round(h * scale))
    columns = min(t, STRIP_COLUMNS)
    rows = math.ceil(t / columns)
    label_h, bar_h, pad = LABEL_FONT + 6, 16 if frame_share is not None else 0, 6
    r = view.report
    title = (f"{r['tokens_after']}/{r['tokens_before']} visual tokens kept ({100 * r['kept_fraction']:.0f} %) at "
             f"threshold {view.threshold:g}")  # fmt: skip
    if frame_share is not None:
        title += "\ncolour: attention per block (least to most); bars: the slice's share of the answer's attention"
    font = _font(LABEL_FONT)
    title_h = (LABEL_FONT + 4) * (title.count("\n") + 1) + 8
    width = max(columns * (tile_w + pad) + pad, max(round(font.getlength(t)) for t in title.split("\n")) + 2 * pad)
    canvas = Image.new("RGB", (width, title_h + rows * (tile_h + label_h + bar_h + pad)), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill="white", font=font)
    top = float(frame_share.max()) if frame_share is not None and frame_share.max() > 0 else 1.0
    span = heat_span(block_share, view.keep) if block_share is not None else None
    for f in range(t):
        shade = np.repeat(np.repeat(np.where(view.keep[f], 1.0, 0.3), view.block, 0), view.block, 1)[..., None]
        rgb = view.frames[f] * shade
        if block_share is not None:
            rgb = _tint(rgb, block_share[f], view.keep[f], span, view.block)
        tile = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize((tile_w, tile_h), Image.BILINEAR)
        x0 = pad + (f % columns) * (tile_w + pad)
        y0 = title_h + (f // columns) * (tile_h + label_h + bar_h + pad)
        canvas.paste(tile, (x0, y0))
        draw.text((x0, y0 + tile_h + 2), view.labels[f], fill="white", font=_font(LABEL_FONT - 2))
        if frame_share is not None:
            y = y0 + tile_h + label_h
            length = round(tile_w * float(frame_share[f]) / top)
            draw.rectangle([x0, y, x0 + tile_w - 1, y + bar_h - 3], outline=(90, 90, 90))
            colour = tuple(int(255 * c) for c in heat_colour(np.array(float(frame_share[f]) / top)))
            if length > 0:
                draw.rectangle([x0, y, x0 + length - 1, y + bar_h - 3], fill=colour)
            draw.text((x0 + 3, y + (bar_h - 3) / 2), f"{100 * float(frame_share[f]):.1f} %", fill="white",
                      font=_font(LABEL_FONT - 3), anchor="lm", stroke_width=2, stroke_fill="black")  # fmt: skip
    return canvas


def describe_view(view: View, index: int, share: float | None = None, visual_fraction: float | None = None) -> str:
    """The info lines under the pictures; with the last answer's attribution, this slice's share of it."""
    m, r = view.media, view.report
    t = view.frames.shape[0]
    lines = [f"**{view.name}**: {m.kind}"]
    if m.kind == "volume":
        axis = (m.metadata or {}).get("slice_axis", view.plane)
        spacing = "unknown" if m.spacing_mm is None else " x ".join(f"{s:.2g}" for s in m.spacing_mm) + " mm"
        lines[0] += f", {t} {axis} slices given to the model (spacing {spacing})"
        lines.append(f"shown: **{slice_label(view, index)}**")
    elif m.kind == "video":
        lines[0] += f", {t} frames sampled"
        lines.append(f"shown: **frame at {slice_label(view, index)}**")
    intensity = (m.metadata or {}).get("intensity") or {}
    modality = (m.metadata or {}).get("modality")
    if intensity.get("method") == "window":
        shown = ", ".join(f"{w['name']} (C {w['center']:g} / W {w['width']:g})" for w in intensity["windows"])
        lines.append(f"{modality or 'intensity'} window: {shown}")
        if len(intensity["windows"]) == 3:
            names = [w["name"] for w in intensity["windows"]]
            lines.append(f"false colour: red = {names[0]}, green = {names[1]}, blue = {names[2]} window (a tissue "
                         "bright in one window only shows in that colour)")  # fmt: skip
    elif intensity.get("method"):
        lines.append(f"{modality + ', ' if modality else ''}intensity: {intensity['method']}")
    if view.level_width is not None and view.window != "custom":
        lines.append(f"level {view.level_width[0]:g} % / width {view.level_width[1]:g} % of the stored range")
    lines.append(f"{m.frames.shape[2]}x{m.frames.shape[1]} loaded -> {view.frames.shape[2]}x{view.frames.shape[1]} "
                 f"for the model; visual tokens kept: {r['tokens_after']}/{r['tokens_before']} "
                 f"({100 * r['kept_fraction']:.1f} %) at threshold {view.threshold:g}")  # fmt: skip
    if share is not None:
        where = "slice" if m.kind == "volume" else "frame" if m.kind == "video" else "image"
        lines.append(f"**where the last answer looked**: {100 * share:.1f} % of its attention to the image went to "
                     f"this {where}" + (f" ({100 * visual_fraction:.0f} % of all its attention went to the image)"
                                        if visual_fraction is not None else ""))  # fmt: skip
    for warning in (m.metadata or {}).get("warnings", []):
        lines.append(f"note: {warning}")
    return "  \n".join(lines)


def visible_answer(text: str) -> str:
    """The answer as shown: control and other invisible characters (C* categories: controls, format characters
    such as zero-width spaces, private use, unassigned) removed, newlines and tabs kept; an answer left with no
    visible character becomes a notice saying what it was."""
    kept = "".join(ch for ch in text if ch in "\n\t" or not unicodedata.category(ch).startswith("C"))
    if kept.strip():
        return kept.strip()
    codes = sorted({f"U+{ord(ch):04X}" for ch in text})[:6]
    return (f"(an empty answer: the model produced {len(text)} characters, none visible"
            + (f": {', '.join(codes)})" if codes else ")"))  # fmt: skip


# ------------------------------------------------------------------------------------------------------------- model
_PROGRESS = re.compile(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")  # a tqdm bar: "... 12/400 [00:05<02:41, ...]"
_STAGE = re.compile(r"\bstage (\d+) \((\w+)\) from ")  # train_trl.py's log line when a stage starts


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class Cancelled(Exception):
    """The user stopped the answer, reloaded or closed the page."""


class ModelHolder:
    """The model and processor the demo serves, loaded at once (`model_path`: a trained folder or Hub id) or after
    training the embedded default in a background process (its output is echoed to the terminal and summarised in
    the page, with an estimate made only from the progress measured so far)."""

    def __init__(self, model_path: str | None, device: str = "auto", dtype: str = "auto",
                 output_dir: Path = DEFAULT_OUTPUT_DIR, train_command: list[str] | None = None):  # fmt: skip
        """`model_path` None: the embedded default in `output_dir`/final, trained by `train_command` (default:
        `python train_trl.py --output_dir output_dir`) when missing."""
        self.device, self.dtype = device, dtype
        self.output_dir = Path(output_dir)
        self.train_command = train_command or [sys.executable, "-u", str(ROOT / "train_trl.py"), "--output_dir",
                                               str(self.output_dir)]  # fmt: skip
        self.model = self.processor = None
        self.error = None
        self.lock = threading.Lock()  # one generation at a time: the CPU has no spare cores for two
        self.stage = self.progress = ""
        self.steps = None  # (done, total, seconds elapsed in this bar) of the trainer's current progress bar
        self.started = time.time()
        self.training = None
        self._base_processor = None
        final = self.output_dir / "final"
        if model_path is None and not (final / "config.json").is_file():
            self.path = str(final)
            self.training = threading.Thread(target=self._train_then_load, daemon=True)
            self.training.start()
        else:
            self.path = str(model_path or final)
            self._load()

    def _load(self):
        logger.info("loading %s", self.path)
        self.model, self.processor = load_model(self.path, self.device, self.dtype)

    def _train_then_load(self):
        command = self.train_command
        logger.info("no trained embedded default at %s: training it (%s)", self.path, " ".join(command))
        self.stage = "starting the training (python train_trl.py)"
        try:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            tail = self._follow(proc)
            if proc.wait() != 0 or not (Path(self.path) / "config.json").is_file():
                raise RuntimeError(f"the training exited with code {proc.returncode}: ...{tail[-1500:]}")
            self.stage, self.progress, self.steps = "trained; loading the model", "", None
            self._load()
        except Exception as error:  # shown in the page; the viewer keeps working
            logger.exception("training the embedded default failed")
            self.error = f"{type(error).__name__}: {error}"

    def _follow(self, proc) -> str:
        """Echo the trainer's output (tqdm bars included) and keep the current stage and progress bar line."""
        tail, pending = "", b""
        while chunk := proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096):
            echo = getattr(sys.stderr, "buffer", None)
            if echo is not None:  # the trainer's own progress bars, as they are, in the terminal
                echo.write(chunk)
                sys.stderr.flush()
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for raw in lines:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                tail = (tail + "\n" + line)[-4000:]
                if stage := _STAGE.search(line):
                    self.stage, self.progress, self.steps = f"stage {stage[1]} of 3 ({stage[2]})", "", None
                elif bar := _PROGRESS.search(line):
                    self.progress = line[-160:]
                    elapsed = int(bar[3] or 0) * 3600 + int(bar[4]) * 60 + int(bar[5])
                    self.steps = (int(bar[1]), int(bar[2]), elapsed)
        return tail

    @property
    def ready(self) -> bool:
        return self.model is not None

    def image_processor(self):
        """The model's image processor; while the embedded default trains, one with the settings train_trl.py gives
        it (the tiny preset's, then data_omnivmed.DEFAULT_PROCESSOR), so the viewer shows what it will see."""
        if self.processor is not None:
            return self.processor.image_processor
        if self._base_processor is None:
            settings = {**TINY_IMAGE_PROCESSOR, **data_omnivmed.DEFAULT_PROCESSOR}
            self._base_processor = OmniVMedImageProcessor(**settings)
        return self._base_processor

    def estimate(self) -> str:
        """What is known about the time left, from measured progress only: the current bar's rate gives the time
        left in this bar; the later stages are not measured yet, so they are not guessed."""
        elapsed = _minutes(time.time() - self.started)
        if self.steps is None or self.steps[0] == 0 or self.steps[2] == 0:
            return f"running for {elapsed}; no progress measured yet in this step, so no estimate"
        done, total, seconds = self.steps
        left = (total - done) * seconds / done
        return (f"running for {elapsed}; this step: {done}/{total} done, ~{_minutes(left)} left at the measured "
                f"{seconds / done:.1f} s per step (later stages not measured yet, not included)")  # fmt: skip

    def status(self) -> str:
        if self.ready:
            return f"Model: `{self.path}`"
        if self.error:
            return f"**Training the embedded default failed**: {self.error}"
        return (f"**Training the embedded default** (first start only; to skip it, start with `--model` and a "
                f"trained folder or Hub id). {self.stage}: {self.estimate()}. The viewer works meanwhile.")  # fmt: skip

    def stream(self, messages: list[dict], max_new_tokens: int, threshold: float | None,
               cancel: threading.Event | None = None, attribution: dict | None = None):  # fmt: skip
        """Yield the growing answer text while the model generates it in a worker thread. Setting `cancel` (the
        user stopped, reloaded or closed the page) ends the generation at its next token and frees the lock; closing
        this generator sets it too. With `attribution` (a dict), the answer's attention shares are stored in it once
        the answer is complete (`attention_shares`)."""
        cancel = cancel if cancel is not None else threading.Event()
        pieces: queue.Queue = queue.Queue()
        outcome = {}

        def run():
            try:
                while not self.lock.acquire(timeout=0.05):  # another session's answer runs: wait, unless cancelled
                    if cancel.is_set():
                        return
                try:
                    if cancel.is_set():
                        return
                    outcome["text"] = self._generate(messages, max_new_tokens, threshold, cancel, pieces.put,
                                                     attribution)  # fmt: skip
                finally:
                    self.lock.release()
            except BaseException as error:  # re-raised in the caller's thread
                outcome["error"] = error
            finally:
                pieces.put(None)

        threading.Thread(target=run, daemon=True).start()
        text, shown, done = "", "", False
        try:
            while not done:
                piece = pieces.get()
                done = piece is None
                text += piece or ""
                while not done:  # take whatever else is ready: the page gets fewer, larger updates and no backlog
                    try:
                        piece = pieces.get_nowait()
                    except queue.Empty:
                        break
                    done = piece is None
                    text += piece or ""
                if cancel.is_set():  # nothing more once stopped: the page may already show another file's chat
                    break
                if text and text != shown:
                    shown = text
                    yield text
        finally:
            cancel.set()  # a closed generator (Gradio cancelled the event) stops the worker at its next token
        if "error" in outcome:
            raise outcome["error"]
        if "text" not in outcome:  # cancelled while another session's answer held the model
            raise Cancelled()

    def _inputs(self, messages, threshold):
        extra = {} if threshold is None else {"prune_threshold": threshold}
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt", **extra)  # fmt: skip
        inputs.pop("media_metadata", None)
        return inputs.to(self.model.device)

    def _generate(self, messages, max_new_tokens, threshold, cancel, emit, attribution) -> str:
        """omnivmed_tools.stream_generate (greedy, streamed), ended at the next token once `cancel` is set."""
        inputs = self._inputs(messages, threshold)
        text, ids = stream_generate(self.model, self.processor.tokenizer, inputs, max_new_tokens, emit, stop=cancel)
        if cancel.is_set():
            logger.info("answer cancelled (page stopped, reloaded or closed) after %d characters; the model is free",
                        len(text))  # fmt: skip
            raise Cancelled()
        if attribution is not None:
            try:
                attribution["attention_shares"] = self.attention_shares(inputs, ids)
            except Exception as error:  # the answer stands without its heat map; the page says why
                logger.exception("attention attribution failed")
                attribution["error"] = f"{type(error).__name__}: {error}"
        return text

    def attention_shares(self, inputs, sequences) -> dict:
        """Where the answer looked: one forward pass of prompt + answer with eager attention in the language model;
        for each answer token, the attention row of the position that produced it (query p predicts token p + 1),
        averaged over heads, layers and answer tokens. Returns `visual` (one share per visual token in prompt
        order, summing to 1 over the visual tokens) and `visual_fraction` (the part of the answer's attention that
        went to visual tokens at all; the rest went to text and special tokens). Rows are reduced inside a hook, so
        no layer's full attention matrix outlives its layer."""
        import torch

        prompt = inputs["input_ids"].shape[1]
        ids = sequences[:, : sequences.shape[1]]
        if ids.shape[1] <= prompt:
            return {"visual": np.zeros(0), "visual_fraction": 0.0, "answer_tokens": 0}
        visual = (inputs["input_ids"][0] == self.model.config.image_token_id).nonzero().flatten()
        queries = torch.arange(prompt - 1, ids.shape[1] - 1, device=ids.device)
        lm = self.model.model.language_model
        totals = {"visual": torch.zeros(len(visual), dtype=torch.float64), "all": 0.0, "layers": 0}

        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None  # (B, heads, L, L)
            if weights is None:
                return
            rows = weights[0, :, queries, :].double().mean(0)  # (answer tokens, L), averaged over heads
            totals["visual"] += rows[:, visual].mean(0).cpu()
            totals["all"] += float(rows.sum(-1).mean())
            totals["layers"] += 1

        attentions = [m for name, m in lm.named_modules() if name.endswith("self_attn")]
        handles = [m.register_forward_hook(hook) for m in attentions]
        previous = lm.config._attn_implementation
        lm.config._attn_implementation = "eager"  # sdpa / flash return no weights
        try:
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra)
        finally:
            lm.config._attn_implementation = previous
            for handle in handles:
                handle.remove()
        if totals["layers"] == 0:
            raise RuntimeError("the language model's attention layers returned no attention weights")
        mean = totals["visual"] / totals["layers"]
        fraction = float(mean.sum())
        shares = (mean / mean.sum()).numpy() if fraction > 0 else mean.numpy()
        return {"visual": shares, "visual_fraction": fraction, "answer_tokens": int(len(queries))}


def attribution_maps(view: View, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-visual-token shares (prompt order: frame by frame, kept blocks row by row, as the processor expands the
    placeholders) -> (per-frame share (T,), per-block share (T, h / block, w / block), 0 on pruned blocks)."""
    blocks = np.zeros(view.keep.shape, dtype=np.float64)
    if len(shares) != int(view.keep.sum()):
        raise ValueError(f"{len(shares)} attention shares for {int(view.keep.sum())} kept visual tokens")
    blocks[view.keep] = shares
    return blocks.reshape(blocks.shape[0], -1).sum(1), blocks


# --------------------------------------------------------------------------------------------------------- examples
def build_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """Example inputs from data that ships inside the installed wheels: nilearn's MNI152 T1 (a real 1 mm MR volume),
    pydicom's 693_J2KI.dcm (a real 512 x 512 CT slice, JPEG 2000) and CT_small.dcm (a real 128 x 128 CT slice), plus
    a synthesised endoscopy-like video (bench/bench_pruning.py's instrument sweep)."""
    import nilearn
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    mni = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    target = folder / "mni152_t1.nii.gz"
    if not target.is_file():
        shutil.copyfile(mni, target)
    out.append(target)
    for name, shipped in (("ct_chest_512.dcm", "693_J2KI.dcm"), ("ct_small.dcm", "CT_small.dcm")):
        target = folder / name
        if not target.is_file():
            shutil.copyfile(get_testdata_file(shipped), target)
        out.append(target)
    target = folder / "instrument_sweep.mp4"
    if not target.is_file():
        partial = folder / "instrument_sweep.tmp.mp4"
        write_instrument_video(partial, seconds=8, fps=8, size=224)
        partial.replace(target)
    out.append(target)
    return out


# ---------------------------------------------------------------------------------------------------------------- UI
CSS = """
#slice input[type=number], #slice .reset-button, #slice .min_value, #slice .max_value { display: none; }  /* the
   page's one numbering is in the picture: the slider shows no position numbers of its own */
.alert-box { border: 2px solid #d33; background: #fdecea; color: #7a1010; border-radius: 6px; padding: 6px 10px;
             font-size: 1.05em; font-weight: 600; }
.alert-box:empty { display: none; }
#strip img { max-width: none; max-height: none; width: auto; height: auto; object-fit: none; }  /* own size */
#strip .image-frame, #strip .image-container { overflow: auto; justify-content: flex-start; }
#chat .message-buttons, #chat .message-buttons-right { position: static !important; }
footer { display: none !important; }
/* error toasts top left, over the pictures (empty after a failed upload), not over the upload box, the answer or
   the Ask button; the red alert box above the answer keeps the message after the toast goes */
.toast-wrap { left: 12px !important; right: auto !important; align-items: start !important; }
#header { min-height: 0; }
#header p { margin: 0; }
"""


class Sessions:
    """Server-side per-browser facts: the uploads a page may reload (a random id -> the file, copied out of Gradio's
    cache; the browser only ever holds the id, so a forged value cannot name another file) and each session's
    cancel flag for its running answer."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.uploads: dict[str, Path] = {}
        self.views: dict[str, View] = {}  # the last view of the most recent uploads, for reloaded pages
        self.cancels: dict[str, threading.Event] = {}

    def remember(self, key: str, view: View, most: int = 8) -> None:
        self.views.pop(key, None)
        self.views[key] = view
        while len(self.views) > most:
            self.views.pop(next(iter(self.views)))

    def keep(self, upload: str | Path, most: int = 64) -> str:
        """Keep `upload` under a new random id; the oldest beyond `most` kept uploads are deleted (a reload of a
        page that old then says it was reset)."""
        while len(self.uploads) >= most:
            old = self.uploads.pop(next(iter(self.uploads)))
            shutil.rmtree(old.parent, ignore_errors=True)
        upload = Path(upload)
        key = secrets.token_hex(16)
        target = self.folder / key / upload.name
        target.parent.mkdir(parents=True)
        try:
            os.link(upload, target)
        except OSError:
            shutil.copyfile(upload, target)
        self.uploads[key] = target
        return key

    def path(self, key) -> Path | None:
        path = self.uploads.get(key) if isinstance(key, str) else None
        return path if path is not None and path.is_file() else None

    def cancel(self, session: str | None, reason: str = "stopped") -> None:
        event = self.cancels.get(session or "")
        if event is not None and not event.is_set():
            event.reason = reason
            event.set()

    def new_answer(self, session: str | None) -> threading.Event:
        self.cancel(session, "replaced")  # a session has at most one answer running
        event = self.cancels[session or ""] = threading.Event()
        event.reason = None
        return event


def build_app(holder: ModelHolder, examples: list[Path] | None = None, max_new_tokens: int = 64):
    import gradio as gr

    workdir = Path(tempfile.mkdtemp(prefix="omnivmed-app-"))
    sessions = Sessions(workdir / "uploads")
    default_threshold = float(holder.image_processor().prune_threshold)

    def alert(message: str):
        return gr.update(value=f"⚠ {message}" if message else "", visible=bool(message))

    def controls_for(view: View | None):
        """Only the controls that apply: plane for volumes; CT window for CT; level/width for grayscale inputs (in
        HU for a custom CT window, else in % of the stored range)."""
        if view is None:
            return (gr.update(visible=False), gr.update(visible=False), gr.update(visible=False),
                    gr.update(visible=False), gr.update(visible=False))  # fmt: skip
        ct, gray = is_ct(view.raw or view.media), is_grayscale(view.raw or view.media)
        lw = view.level_width
        custom = view.window == "custom"
        show_lw = lw is not None and (custom or (gray and not ct))
        unit = "HU" if custom else "% of the stored range"
        level = gr.update(visible=show_lw, minimum=-1100 if custom else 0, maximum=3000 if custom else 100,
                          value=lw[0] if lw else None, label=f"level ({unit})")  # fmt: skip
        width = gr.update(visible=show_lw, minimum=1 if custom else 0.5, maximum=4000 if custom else 200,
                          value=lw[1] if lw else None, label=f"width ({unit})")  # fmt: skip
        legend = describe_legend(view)
        return (gr.update(visible=view.media.kind == "volume"), gr.update(visible=ct), level, width,
                gr.update(value=legend, visible=bool(legend)))  # fmt: skip

    def describe_legend(view: View) -> str:
        windows = ((view.media.metadata or {}).get("intensity") or {}).get("windows") or []
        if len(windows) != 3:
            return ""
        return ("**rgb window legend**: " + ", ".join(
            f"<span style='color:{c}'>■</span> {n} = {w['name']} (C {w['center']:g} / W {w['width']:g})"
            for c, n, w in zip(("#e33", "#3c3", "#36f"), ("red", "green", "blue"), windows)))  # fmt: skip

    def empty_outputs(message: str, error: str = ""):
        return (None, message, None, None, gr.update(value=None), gr.Slider(minimum=0, maximum=1, value=0,
                visible=False), [], [], alert(error), None, *controls_for(None), None)  # fmt: skip

    def load(upload, plane, window, level, width, threshold, view, index, stored, request: gr.Request):
        """A new upload (or the upload cleared): load it with the current settings, on its middle slice. An answer
        still running for the previous file is stopped (it would land in the new file's conversation)."""
        sessions.cancel(getattr(request, "session_hash", None), "new medium")
        if upload is None:
            return empty_outputs("Upload a scan or a video, or pick an example below.")
        return _load(Path(upload), Path(upload).name, plane, window, None, threshold, None, 0, stored, new_file=True)

    def reload(plane, window, level, width, threshold, view, index, stored, request: gr.Request):
        """A setting changed: the same file again (already loaded frames reused when only the level/width or the
        threshold changed), on the same slice."""
        if view is None:
            return (gr.skip(),) * 16
        same_load = view.key[1:3] == (plane, window)
        lw = None
        if level is not None and width is not None and (
                (same_load and view.level_width is not None) or (window == "custom" and view.window == "custom")):
            lw = (float(level), float(width))
        media = view.raw if same_load and window != "custom" else None
        if not same_load or (lw is not None and lw != view.level_width):  # the model will see another input
            sessions.cancel(getattr(request, "session_hash", None), "new medium")
        return _load(Path(view.key[0]), view.name, plane, window, lw, threshold, view, index, stored, media=media)

    def _load(path, name, plane, window, lw, threshold, view, index, stored, media=None, new_file=False):
        try:
            new = build_view(path, holder.image_processor(), plane, window, threshold, workdir, media=media,
                             name=name, level_width=lw)  # fmt: skip
        except ValueError as error:
            logger.info("unreadable upload %s: %s", name, error)
            gr.Warning(f"Could not read the upload: {error}", duration=8)
            return empty_outputs(f"**Could not read `{name}`**", f"Could not read the upload: {error}")
        t = new.frames.shape[0]
        index = t // 2 if new_file else int(min(max(0, index or 0), t - 1))
        label = "slice" if new.media.kind == "volume" else "frame"
        slider = gr.Slider(minimum=0, maximum=max(1, t - 1), value=index, step=1, visible=t > 1,
                           label=f"{label} (its number is on the picture)")  # fmt: skip
        fresh = view is None or new.key != view.key
        stored = dict(stored or {}) if not new_file else {}
        if new_file or sessions.path(stored.get("upload_id")) is None:
            stored["upload_id"] = sessions.keep(path)
        stored.update(name=name, plane=plane, window=window, level_width=new.level_width, threshold=threshold,
                      index=index)  # fmt: skip
        sessions.remember(stored["upload_id"], new)
        chat = ([], []) if fresh else (gr.skip(), gr.skip())
        if fresh:
            stored["turns"] = []
        return (new, describe_view(new, index), scan_image(new, index), model_image(new, index),
                gr.update(value=strip_image(new)), slider, *chat, alert(""), stored, *controls_for(new),
                None if fresh else gr.skip())  # fmt: skip

    def show(index, view, attribution, stored):
        if view is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        index = int(min(max(0, index or 0), view.frames.shape[0] - 1))
        heat = None
        span = share = fraction = None
        if attribution is not None and attribution.get("key") == view.key:
            heat, span = attribution["blocks"][index], heat_span(attribution["blocks"], view.keep)
            share, fraction = float(attribution["frames"][index]), attribution["visual_fraction"]
        stored = {**(stored or {}), "index": index}
        return (describe_view(view, index, share, fraction), scan_image(view, index),
                model_image(view, index, heat, span, share), stored)  # fmt: skip

    def ask(question, history, messages, view, max_tokens, text_only, stored, index, request: gr.Request):
        question = (question or "").strip()
        nothing = (gr.skip(),) * 7
        if not question:
            yield nothing
            return
        if view is None and not text_only:
            gr.Warning(NO_MEDIUM, duration=8)
            yield history, messages, gr.skip(), alert(NO_MEDIUM), gr.skip(), gr.skip(), gr.skip()
            return
        history = [*history, {"role": "user", "content": question}]
        if not holder.ready:
            reply = ("The model is not ready yet, so nothing was generated. " +
                     (holder.error and f"Training failed: {holder.error}" or holder.estimate()))  # fmt: skip
            yield ([*history, {"role": "assistant", "content": reply}], messages, "", alert(""), gr.skip(), gr.skip(),
                   gr.skip())  # fmt: skip
            return
        prefix = TEXT_ONLY_NOTE if view is None else ""
        content = [{"type": "text", "text": question}]
        if view is not None and not any(m["role"] == "user" for m in messages):
            content = [{"type": view.media.kind, view.media.kind: view.media}, *content]  # media go with turn one
        turn = [*messages, {"role": "user", "content": content}]
        threshold = None if view is None else view.threshold  # the one the overlay shows
        session = getattr(request, "session_hash", None)
        logger.info("a question (%d characters)", len(question))
        cancel = sessions.new_answer(session)
        found: dict = {}
        text = ""
        pending = {**(stored or {}), "pending": question}  # a reload mid-answer can then say what was stopped
        try:
            for k, text in enumerate(holder.stream(turn, int(max_tokens), threshold, cancel,
                                                   found if view is not None else None)):  # fmt: skip
                yield ([*history, {"role": "assistant", "content": prefix + visible_answer(text)}], messages, "",
                       alert(""), pending if k == 0 else gr.skip(), gr.skip(), gr.skip())  # fmt: skip
        except Cancelled:
            if cancel.reason in ("new medium", "replaced"):  # the chat now belongs to another file or answer
                yield nothing  # Gradio re-sends an event's last output when it ends: make that one change nothing
                return
            yield ([*history, {"role": "assistant", "content": prefix + visible_answer(text) + " [stopped]"}],
                   messages, "", alert(""), gr.skip(), gr.skip(), gr.skip())  # fmt: skip
            return
        except Exception as error:  # e.g. a conversation longer than the model's context
            logger.exception("generation failed")
            gr.Warning(f"The answer failed: {error}", duration=8)
            yield history, messages, gr.skip(), alert(f"The answer failed: {error}"), gr.skip(), gr.skip(), gr.skip()
            return
        text = prefix + visible_answer(text)
        history = [*history, {"role": "assistant", "content": text}]
        stored = {**(stored or {}), "turns": [*(stored or {}).get("turns", []), [question, text]],
                  "text_only": view is None, "pending": None}  # fmt: skip
        attribution, strip = None, gr.skip()
        if view is not None and "error" in found:
            gr.Warning(f"No heat map for this answer: {found['error']}", duration=8)
        if view is not None and "attention_shares" in found and found["attention_shares"]["answer_tokens"] > 0:
            shares = found["attention_shares"]
            frame_share, blocks = attribution_maps(view, shares["visual"])
            attribution = {"key": view.key, "frames": frame_share, "blocks": blocks,
                           "visual_fraction": shares["visual_fraction"]}  # fmt: skip
            strip = strip_image(view, frame_share, blocks)
        yield history, [*turn, {"role": "assistant", "content": text}], "", alert(""), stored, attribution, strip

    def stop(request: gr.Request):
        sessions.cancel(getattr(request, "session_hash", None))

    def restore(stored, request: gr.Request):
        """A reloaded page: the upload (by its id), the settings and the conversation come back; when the server no
        longer has the upload (it restarted), the page says so."""
        blank = empty_outputs("Upload a scan or a video, or pick an example below.")
        if not stored or not stored.get("upload_id"):
            return (*blank, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        path = sessions.path(stored.get("upload_id"))
        if path is None:
            message = (f"The page was reset: the server no longer holds `{stored.get('name', 'your upload')}` (it "
                       "restarted); upload it again.")  # fmt: skip
            out = list(empty_outputs(message, message))
            out[9] = {}
            return (*out, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        plane, window = stored.get("plane", "axial"), stored.get("window", "auto")
        lw = stored.get("level_width")
        try:
            view = sessions.views.get(stored["upload_id"])  # the page's last view: a reload costs no reloading
            if view is None or view.key[1:] != (plane, window, tuple(lw) if lw else None):
                view = build_view(path, holder.image_processor(), plane, window, stored.get("threshold"), workdir,
                                  name=path.name, level_width=tuple(lw) if lw else None)  # fmt: skip
        except ValueError as error:
            return (*empty_outputs(f"The page was reset: {error}", f"The page was reset: {error}"), gr.skip(),
                    gr.skip(), gr.skip(), gr.skip(), gr.skip())  # fmt: skip
        index = int(min(stored.get("index", view.frames.shape[0] // 2), view.frames.shape[0] - 1))
        history, messages = [], []
        for k, (q, a) in enumerate(stored.get("turns", [])):
            history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            content = [{"type": "text", "text": q}]
            if k == 0:
                content = [{"type": view.media.kind, view.media.kind: view.media}, *content]
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        slider = gr.Slider(minimum=0, maximum=max(1, view.frames.shape[0] - 1), value=index, step=1,
                           visible=view.frames.shape[0] > 1, label="slice / frame (its number is on the picture)")
        note = "Restored after a reload: the upload, its settings and the finished answers."
        if stored.get("pending"):
            note += f" The answer to \"{stored['pending']}\" was stopped by the reload: ask it again."
        stored = {**stored, "pending": None}
        return (view, describe_view(view, index), scan_image(view, index), model_image(view, index),
                gr.update(value=strip_image(view)), slider, history, messages, alert(note), stored,
                *controls_for(view), None,
                gr.skip(), plane, window, stored.get("threshold", default_threshold), gr.skip())  # fmt: skip

    for fn in (ask, stop, restore, load, reload):  # `from __future__ import annotations` leaves "gr.Request" a string Gradio
        fn.__annotations__["request"] = gr.Request  # cannot resolve (gr is imported here, not at module level)

    with gr.Blocks(title="OmniV-Med") as demo:
        view_state = gr.State(None)
        messages_state = gr.State([])
        attribution_state = gr.State(None)
        # Gradio decrypts browser state in the page, so its secret is no protection and is fixed here: a restarted
        # server can still read a page's state and say that its upload is gone, instead of starting blank. The state
        # holds only a random upload id the server checks, the settings and the finished conversation's text.
        stored = gr.BrowserState({}, storage_key="omnivmed-demo", secret="omnivmed-demo-state")
        upload = gr.File(label="Image, NIfTI, DICOM file, zip of a DICOM series, or video", file_types=UPLOAD_TYPES,
                         type="filepath", elem_id="upload", height=64, render=False)  # rendered in the right column
        with gr.Row(equal_height=False, elem_id="header"):
            gr.Markdown("**OmniV-Med** · medical images, CT / MR volumes and videos: upload, look, ask",
                        elem_id="title")  # fmt: skip
            model_status = gr.Markdown(holder.status(), elem_id="model-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=620):  # the picture: what a clinician looks at
                with gr.Row(equal_height=False):
                    scan = gr.Image(label="scan (display orientation)", type="pil", interactive=False, format="png",
                                    elem_id="scan", height=VIEW_SIDE + 16, buttons=[])  # fmt: skip
                    seen = gr.Image(label="what the model sees (kept blocks outlined)", type="pil",
                                    interactive=False, format="png", elem_id="model-view", height=VIEW_SIDE + 16,
                                    buttons=[])  # fmt: skip
                index = gr.Slider(0, 1, value=0, step=1, label="slice", visible=False, elem_id="slice")
                info = gr.Markdown("Upload a scan or a video, or pick an example.", elem_id="view-info")
                with gr.Accordion("all slices / frames given to the model (and where the answer looked)", open=False,
                                  elem_id="strip-accordion"):  # fmt: skip
                    strip = gr.Image(label="all slices / frames", type="pil", interactive=False, format="png",
                                     elem_id="strip", buttons=[])  # fmt: skip
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[upload], label="examples (bundled real data)",
                                elem_id="examples")  # fmt: skip
            with gr.Column(scale=2, min_width=420):  # the file, the conversation and the settings
                upload.render()
                alert_box = gr.Markdown("", elem_id="alert", elem_classes=["alert-box"], visible=False)
                chatbot = gr.Chatbot(label="answer", height=220, elem_id="chat", buttons=[],
                                     feedback_options=None)  # fmt: skip
                with gr.Row(equal_height=True):
                    question = gr.Textbox(label="question", placeholder="e.g. Is there a lesion? Which side?",
                                          scale=4, lines=1, elem_id="question")  # fmt: skip
                    ask_button = gr.Button("Ask", variant="primary", scale=1, min_width=70, elem_id="ask")
                    stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
                text_only = gr.Checkbox(False, label="text-only question (allowed without an image; the answer says "
                                        "so)", elem_id="text-only")  # fmt: skip
                with gr.Row():
                    plane = gr.Radio(list(PLANES), value="axial", label="plane", elem_id="plane", visible=False)
                    window = gr.Dropdown(WINDOWS, value="auto", label="CT window", elem_id="window", visible=False,
                                         info="auto: the file's own, else abdomen; rgb: 3 windows as colours; "
                                              "custom: level / width in HU")  # fmt: skip
                legend = gr.Markdown("", elem_id="legend", visible=False)
                with gr.Row():
                    level = gr.Slider(0, 100, value=50, step=0.5, label="level", elem_id="level", visible=False)
                    width = gr.Slider(0.5, 200, value=100, step=0.5, label="width", elem_id="width", visible=False)
                with gr.Row():
                    threshold = gr.Slider(0.0, 1.0, value=default_threshold, step=0.01, label="pruning threshold",
                                          info="0 keeps every token; 2D images are never pruned",
                                          elem_id="threshold")  # fmt: skip
                    max_tokens = gr.Slider(1, 2048, value=max_new_tokens, step=1, label="max new tokens",
                                           elem_id="max-tokens")  # fmt: skip
        upload_outputs = [view_state, info, scan, seen, strip, index, chatbot, messages_state, alert_box, stored,
                          plane, window, level, width, legend, attribution_state]  # fmt: skip
        settings = [plane, window, level, width, threshold, view_state, index, stored]
        upload.change(load, [upload, *settings], upload_outputs)
        for control in (plane, window, level, width, threshold):  # user changes only (not the page's own updates)
            control.input(reload, settings, upload_outputs, trigger_mode="always_last")
        index.change(show, [index, view_state, attribution_state, stored], [info, scan, seen, stored],
                     show_progress="hidden")  # fmt: skip
        ask_inputs = [question, chatbot, messages_state, view_state, max_tokens, text_only, stored, index]
        ask_outputs = [chatbot, messages_state, question, alert_box, stored, attribution_state, strip]
        submitted = question.submit(ask, ask_inputs, ask_outputs, concurrency_limit=None)
        clicked = ask_button.click(ask, ask_inputs, ask_outputs, concurrency_limit=None)
        for event in (submitted, clicked):  # the overlay of the current slice follows the new attribution
            event.then(show, [index, view_state, attribution_state, stored], [info, scan, seen, stored],
                       show_progress="hidden")  # fmt: skip
        # Stop sets the session's cancel flag: the answer ends at its next token and says "[stopped]" (Gradio's own
        # `cancels` would kill the event before it could say so)
        stop_button.click(stop, None, None, queue=False)

        def gone(request: gr.Request):  # a reloaded or closed page: its answer stops at the next token
            logger.info("a page was reloaded or closed")
            sessions.cancel(getattr(request, "session_hash", None))

        gone.__annotations__["request"] = gr.Request

        demo.unload(gone)
        demo.load(restore, [stored], [*upload_outputs, upload, plane, window, threshold, question])
        if not holder.ready:
            timer = gr.Timer(2.0)

            def tick():
                return holder.status(), gr.Timer(active=not holder.ready and holder.error is None)

            timer.tick(tick, None, [model_status, timer], show_progress="hidden")
    demo.queue(default_concurrency_limit=4)
    demo.omnivmed_css = CSS
    return demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--model", default=os.environ.get("OMNIVMED_MODEL"),
                        help=f"trained OmniV-Med folder or Hub id (default: $OMNIVMED_MODEL, else the embedded default "
                             f"at {DEFAULT_MODEL.relative_to(ROOT)}, trained first when missing)")  # fmt: skip
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1 locally)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--examples-dir", type=Path, default=EXAMPLES_DIR, help="where the example inputs are written")
    parser.add_argument("--no-examples", action="store_true", help="do not build the example inputs")
    parser.add_argument("--share", action="store_true",
                        help="a PUBLIC gradio.live link (needs the network): anyone with the link can upload and "
                             "see this page; never use it with patient data")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up checks of its local URL
    if args.model is not None and not Path(args.model).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        parser.error(f"--model {args.model}: no such folder (and HF_HUB_OFFLINE=1, so no Hub download)")
    if args.share:
        logger.warning(SHARE_WARNING)
        print(SHARE_WARNING, file=sys.stderr, flush=True)

    started = time.time()
    holder = ModelHolder(args.model, args.device, args.dtype)
    examples = None if args.no_examples else build_examples(args.examples_dir)
    demo = build_app(holder, examples, args.max_new_tokens)
    logger.info("ready in %.1f s", time.time() - started)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False, css=CSS,
                max_file_size=MAX_UPLOAD_BYTES,
                allowed_paths=[str(args.examples_dir)] if examples else None)  # fmt: skip


SHARE_WARNING = ("\n" + "!" * 100 + "\n!! --share: this page becomes PUBLIC on a gradio.live address. Anyone who has "
                 "the link can upload files,\n!! read this page's answers and use this machine. Do NOT upload patient "
                 "data (medical data demo).\n" + "!" * 100)  # fmt: skip


if __name__ == "__main__":
    main()
