"""Fuzz module for media loading (issue #19): well over 100 bad or unusual inputs, each run in its own process.

Every case builds its input (a file under a fresh tmp dir, or an array) and feeds it through the public paths users
use: `media_omnivmed.load_media` and, where the case's options allow, `OmniVMedImageProcessor` on the same path. Each
case runs in a child forked from this process (no per-case torch import) with a time cap and an address-space cap
(`RLIMIT_AS`), so a hang, a signal or an out-of-memory death is seen as such. A case passes when:

* an input that must be refused raises a `ValueError` (MediaError) whose message names the file (its base name, or
  `<array>`) and the cause (the words the case declares; a tuple means any one of those words);
* an input that must load gives finite float32 `(T, H, W, 3)` frames in [0, 1] that equal the reference library's own
  reading (Pillow, nibabel, pydicom, PyAV, or the frame number painted into a synthetic video), and the processor gives
  finite patches whose count matches its grid;
* `either` cases (where a correct fix may refuse or read the file) satisfy one of the two.
Anything else (another exception type, a death by signal, a timeout) fails the case.

`python tests/test_fuzz_media_omnivmed.py` prints a table of every case's outcome.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gzip
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnivmed import dicom_omnivmed  # noqa: E402
from omnivmed import media_omnivmed as mo  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor  # noqa: E402

av = pytest.importorskip("av")
nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
decord = pytest.importorskip("decord")
from PIL import Image, ImageOps  # noqa: E402
from pydicom.pixels import apply_rescale  # noqa: E402

DICOM_DATA = Path(pydicom.__file__).parent / "data/test_files"
CT_SMALL = DICOM_DATA / "CT_small.dcm"
MR_SMALL = DICOM_DATA / "MR_small.dcm"
CT5N = DICOM_DATA / "dicomdirtests/98892001/CT5N"
NIB_DATA = Path(nib.__file__).parent / "tests/data"

TIME_CAP_S = 30  # per case; the slowest case takes ~1 s on one core
MEMORY_HEADROOM = 2 << 30  # address space a child may add on top of this process's own


# ------------------------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    name: str
    make: Callable[[Path], Any]  # tmp dir -> source, or (source, extra load options)
    error: tuple | None = None  # words the error must contain (besides the file name); None: must load
    check: Callable | None = None  # (media, source) -> None, asserts against the reference reading
    options: dict = dataclasses.field(default_factory=dict)
    either: bool = False  # a correct reader may refuse (with `error` words) or load (passing `check`)
    processor: bool = True  # also run OmniVMedImageProcessor on the source
    forbid: tuple = ()  # words a correct message must not contain (a wrong cause)
    processor_error: tuple | None = None  # the processor must refuse with these words though load_media reads it
    without: tuple = ()  # modules made unimportable in the child (e.g. "av": decord without PyAV beside it)


CASES: list[Case] = []


def case(name, *, error=None, check=None, options=None, either=False, processor=True, forbid=(), processor_error=None,
         without=()):
    def register(make):
        CASES.append(Case(name, make, error, check, options or {}, either, processor, forbid, processor_error, without))
        return make

    return register


# --- builders -----------------------------------------------------------------------------------------------------

RNG = np.random.default_rng(19)
GRAY = (RNG.random((24, 32)) * 255).astype(np.uint8)
RGB = (RNG.random((24, 32, 3)) * 255).astype(np.uint8)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def save(img: Image.Image, path: Path, **kw) -> Path:
    if path.suffix.lower() not in Image.registered_extensions():
        kw.setdefault("format", "PNG")
    img.save(path, **kw)
    return path


def png_gray(tmp: Path, name="g.png") -> Path:
    return save(Image.fromarray(GRAY), tmp / name)


def png_rgb(tmp: Path, name="c.png") -> Path:
    return save(Image.fromarray(RGB), tmp / name)


def jpeg(tmp: Path, name="c.jpg") -> Path:
    return save(Image.fromarray(RGB), tmp / name, quality=90)


def cut(path: Path, keep, name=None) -> Path:
    """A copy of `path` keeping the first `keep` bytes (an int, or a fraction of the size)."""
    data = path.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    out = path.with_name(name or ("cut_" + path.name))
    out.write_bytes(data[:n])
    return out


def _flip(data: bytes, start_frac: float, n: int = 64) -> bytes:
    out = bytearray(data)
    s = int(len(out) * start_frac)
    for i in range(s, min(s + n, len(out))):
        out[i] ^= 0x5A
    return bytes(out)


def flip_bytes(path: Path, start_frac: float, n: int = 64, name=None) -> Path:
    data = bytearray(path.read_bytes())
    s = int(len(data) * start_frac)
    for i in range(s, min(s + n, len(data))):
        data[i] ^= 0x5A
    out = path.with_name(name or ("bad_" + path.name))
    out.write_bytes(bytes(data))
    return out


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_with_header(tmp: Path, width: int, height: int, bit_depth=8, color_type=0, idat=b"", name="hdr.png") -> Path:
    """A PNG whose IHDR promises width x height (valid CRCs), followed by `idat` compressed bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    body += png_chunk(b"IDAT", zlib.compress(idat)) + png_chunk(b"IEND", b"")
    (tmp / name).write_bytes(body)
    return tmp / name


def tiff_float(tmp: Path, arr: np.ndarray, name="f.tif") -> Path:
    return save(Image.fromarray(arr.astype(np.float32), mode="F"), tmp / name)


def nifti(tmp: Path, data, affine=None, name="v.nii", **header) -> Path:
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    path = tmp / name
    nib.save(img, path)
    return path


def patch_nifti(path: Path, edits: dict[int, bytes], name=None) -> Path:
    """Overwrite header bytes at the given offsets (NIfTI-1 layout) of an uncompressed .nii."""
    data = bytearray(path.read_bytes())
    for offset, value in edits.items():
        data[offset : offset + len(value)] = value
    out = path.with_name(name or path.name)
    out.write_bytes(bytes(data))
    return out


def vol16(shape=(6, 7, 5)) -> np.ndarray:
    return (np.arange(math.prod(shape)).reshape(shape) % 97).astype(np.int16)


def dicom_copy(tmp: Path, src=CT_SMALL, name="x.dcm", **tags) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    out = tmp / name
    ds.save_as(out, enforce_file_format=False)
    return out


def dicom_with_raw_value(tmp: Path, keyword: str, raw: bytes, src=CT_SMALL, name="raw.dcm") -> Path:
    """A DICOM copy whose element `keyword` holds raw bytes pydicom would refuse to write as a number (e.g. NaN)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import tag_for_keyword, dictionary_VR

    ds = pydicom.dcmread(src)
    tag = pydicom.tag.Tag(tag_for_keyword(keyword))
    raw = raw + b" " * (len(raw) % 2)
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    out = tmp / name
    ds.save_as(out, enforce_file_format=False)
    return out


def level(i: int) -> int:
    """Gray level painted into frame i of a synthetic video (frames are told apart by it)."""
    return 16 + 22 * (i % 10)


def video(path: Path, codec="libx264", n=10, rate=5, w=64, h=48, pix="yuv420p", fmt=None, gop=None,
          drop_packets=0, second_stream=False, audio=False, first=0) -> Path:
    """A video whose frame i is uniformly gray at level(i); `drop_packets` leaves out the first encoded packets."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, pix
        if gop:
            s.codec_context.gop_size = gop
        extra = c.add_stream("mpeg4", rate=rate) if second_stream else None
        if extra is not None:
            extra.width, extra.height, extra.pix_fmt = 32, 32, "yuv420p"
        sound = c.add_stream("aac", rate=8000) if audio else None
        written = 0
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), level(first + i), np.uint8), format="rgb24")
            for p in s.encode(frame):
                written += 1
                if written > drop_packets:
                    c.mux(p)
            if extra is not None:
                other = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 255 - level(i), np.uint8), format="rgb24")
                for p in extra.encode(other):
                    c.mux(p)
        for p in s.encode():
            c.mux(p)
        if extra is not None:
            for p in extra.encode():
                c.mux(p)
        if sound is not None:
            for i in range(int(n / rate * 8000 / 1024)):
                a = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                a.sample_rate, a.pts = 8000, i * 1024
                for p in sound.encode(a):
                    c.mux(p)
            for p in sound.encode():
                c.mux(p)
    return path


def mjpeg_with_header_size(tmp: Path, width: int, height: int, n=10, rate=1, name="big.avi") -> Path:
    """A small MJPEG AVI whose container and JPEG headers claim width x height frames."""
    src = video(tmp / "small_mjpeg.avi", codec="mjpeg", n=n, rate=rate, pix="yuvj420p")
    b = bytearray(src.read_bytes())
    i = b.find(b"\xff\xc0")
    while i >= 0:  # every SOF0 segment: precision, height, width
        b[i + 5 : i + 9] = struct.pack(">HH", height, width)
        i = b.find(b"\xff\xc0", i + 1)
    j = b.find(b"avih")
    b[j + 8 + 32 : j + 8 + 40] = struct.pack("<II", width, height)
    j = b.find(b"strf")
    b[j + 8 + 4 : j + 8 + 12] = struct.pack("<ii", width, height)
    (tmp / name).write_bytes(bytes(b))
    return tmp / name


# --- reference readings -------------------------------------------------------------------------------------------


def close(a, b, atol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != reference {b.shape}"
    err = float(np.abs(a - b).max()) if a.size else 0.0
    assert err <= atol, f"{what}: max difference {err:.3g} from the reference (tolerance {atol})"


def pillow_rgb(path: Path) -> np.ndarray:
    """Pillow's own reading of an 8-bit picture, alpha composited on black (the documented convention)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"), np.float64) / 255
            return rgba[..., :3] * rgba[..., 3:]
        return np.asarray(im.convert("RGB"), np.float64) / 255


def check_pillow(m, path):
    assert m.kind == "image"
    close(m.frames[0], pillow_rgb(path), 1e-5, "pixels vs Pillow")


def check_pillow_16bit(m, path):
    with Image.open(path) as im:
        ref = np.asarray(im, np.float64) / 65535
    close(m.frames[0], np.repeat(ref[..., None], 3, -1), 1e-6, "16-bit pixels vs Pillow")


def check_pillow_unit_float(m, path):
    with Image.open(path) as im:
        ref = np.asarray(im, np.float64)
    close(m.frames[0], np.repeat(ref[..., None], 3, -1), 1e-6, "float pixels vs Pillow")


def percentile01(values: np.ndarray, lo=0.5, hi=99.5) -> np.ndarray:
    a, b = np.percentile(values, [lo, hi])
    if b <= a:
        a, b = values.min(), values.max()
    if b <= a:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - a) / (b - a), 0, 1)


def check_pillow_percentile(m, path):
    with Image.open(path) as im:
        ref = np.asarray(im, np.float64)
    close(m.frames[0, ..., 0], percentile01(ref), 1e-5, "pixels vs Pillow (percentile-normalised)")


def check_nibabel(m, path):
    """Frames equal nibabel's canonical physical values (get_fdata) under the documented intensity rule: integers in
    0..255 are divided by 255, anything else is percentile-normalised over the stack."""
    img = nib.as_closest_canonical(nib.load(path))
    data = img.get_fdata()
    if data.ndim == 2:
        data = data[..., None]
    stack = np.stack([data[:, :, k].T[::-1, ::-1] for k in m.slice_indices])
    eight_bit = bool(np.all(stack == np.round(stack)) and stack.min() >= 0 and stack.max() <= 255)
    close(m.frames[..., 0], stack / 255.0 if eight_bit else percentile01(stack), 1e-4,
          "voxels vs nibabel get_fdata (canonical)")


def vol_wide(shape=(6, 7, 5)) -> np.ndarray:
    """int16 values beyond 0..255, so the percentile rule applies."""
    return (vol16(shape).astype(np.int32) * 37 - 900).astype(np.int16)


def check_pydicom_window(m, path, center=None, width=None):
    ds = pydicom.dcmread(path)
    hu = apply_rescale(ds.pixel_array, ds).astype(np.float64)
    c = float(center if center is not None else dicom_omnivmed._first_value(ds.WindowCenter))
    w = float(width if width is not None else dicom_omnivmed._first_value(ds.WindowWidth))
    ref = np.clip((hu - (c - w / 2)) / w, 0, 1)
    close(m.frames[0, ..., 0], ref, 1e-5, "HU vs pydicom apply_rescale + window")


def check_pydicom_percentile(m, path):
    ds = pydicom.dcmread(path)
    ref = percentile01(apply_rescale(ds.pixel_array, ds).astype(np.float64))
    close(m.frames[0, ..., 0], ref, 1e-5, "values vs pydicom (percentile-normalised)")


def check_same_as(reference: Path, **options):
    def check(m, path):
        ref = mo.load_media(reference, **options)
        close(m.frames, ref.frames, 0, f"frames vs {reference.name}")

    return check


VFR_TICKS = [0, 1, 2, 50, 51, 52, 200, 201, 202, 300]  # frame k shown at VFR_TICKS[k] / 100 s


def vfr_video(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=100)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 100)
        for k, tick in enumerate(VFR_TICKS):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), level(k), np.uint8), format="rgb24")
            frame.pts, frame.time_base = tick, Fraction(1, 100)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def check_vfr(m, path):
    """Variable frame rate: each frame's timestamp is the time its content was written at; sampling at 1 fps picks
    the frames nearest 0, 1, 2, 3 s."""
    shown = [min(range(10), key=lambda j: abs(level(j) - float(f.mean()) * 255)) for f in m.frames]
    assert m.timestamps_s == pytest.approx([VFR_TICKS[k] / 100 for k in shown], abs=1e-3)
    assert shown == [0, 5, 6, 9], f"frames {shown} for targets 0, 1, 2, 3 s"


def pyav_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def check_video(rate: float, n: int, exact_pyav: bool = True, first_missing: bool = False):
    """The frame each timestamp points at is the one shown (told apart by the gray level painted into frame k, at
    k / rate s), sampling follows the documented rule, and with PyAV the pixels equal PyAV's own decoding.
    `first_missing`: the file lacks its first packet, so only differences between timestamps are known."""

    def check(m, path):
        assert m.kind == "video" and m.timestamps_s is not None
        idx = m.metadata["frame_indices"]
        assert len(m.timestamps_s) == len(m.frames) == len(idx)
        shown = [min(range(n), key=lambda j: abs(level(j) - float(f.mean()) * 255)) for f in m.frames]
        for f, k in zip(m.frames, shown):
            assert abs(float(f.mean()) * 255 - level(k)) < 8, f"a frame shows gray {float(f.mean()) * 255:.1f}"
        t0, k0 = m.timestamps_s[0], shown[0]
        for t, k in zip(m.timestamps_s, shown):
            assert abs((t - t0) - (k - k0) / rate) < 1e-3, f"frame {k} stamped {t}s, but frame {k0} at {t0}s"
        assert shown == sorted(set(shown)), f"frames out of order or repeated: {shown}"
        if first_missing:
            return
        assert k0 == 0 and t0 == 0.0 and shown == idx, f"frames {shown} reported as {idx}, first at {t0}s"
        duration = n / rate
        assert m.metadata["duration_s"] == pytest.approx(duration, rel=1e-3)
        assert len(idx) == min(max(1, math.ceil(duration * 1.0 - 1e-9)), 64, n)
        if exact_pyav and m.metadata["video_backend"] == "pyav":
            ref = pyav_frames(path)
            close(m.frames, np.stack([ref[k] for k in idx]) / 255.0, 1e-6, "frames vs PyAV")

    return check


def check_array_image(expected_fn):
    def check(m, source):
        close(m.frames[0], expected_fn(source), 1e-5, "array image")

    return check


# --- 2D pictures --------------------------------------------------------------------------------------------------

case("png empty (0 bytes)", error=("empty",))(lambda t: write(t / "e.png", b""))
case("png signature only", error=(("not a readable", "truncated", "corrupt"),))(
    lambda t: cut(png_gray(t), 8, "sig.png"))
case("png cut inside IHDR", error=(("not a readable", "truncated", "corrupt"),))(
    lambda t: cut(png_gray(t), 20, "ihdr.png"))
case("png cut in IDAT", error=(("truncated", "corrupt"),))(lambda t: cut(png_rgb(t), 0.6))
case("png without IEND", error=None, check=check_pillow)(lambda t: cut(png_rgb(t), -12, "noiend.png"))
case("png corrupt IDAT bytes", error=(("corrupt", "truncated"),))(lambda t: flip_bytes(png_rgb(t), 0.5))
case("png IHDR 50000x50000", error=("max_image_pixels", "50000"))(lambda t: png_with_header(t, 50000, 50000))
case("png IHDR 2^31-1 wide", error=(("max_image_pixels", "not a readable", "corrupt"),))(
    lambda t: png_with_header(t, 2**31 - 1, 1, name="wide.png"))
case("png IHDR width 0", error=(("not a readable", "corrupt", "0 pixels", "size"),))(
    lambda t: png_with_header(t, 0, 10, name="w0.png"))
case("png IHDR bad bit depth", error=(("not a readable", "corrupt"),))(
    lambda t: png_with_header(t, 4, 4, bit_depth=7, name="bd.png"))
case("png 2x50000 (aspect ratio)", check=check_pillow, processor_error=("aspect ratio", "2x50000"))(
    lambda t: save(Image.fromarray((RNG.random((2, 50000)) * 255).astype(np.uint8)), t / "thin.png"))
case("png 50000x2 (aspect ratio)", check=check_pillow, processor_error=("aspect ratio",))(
    lambda t: save(Image.fromarray((RNG.random((50000, 2)) * 255).astype(np.uint8)), t / "tall.png"))
case("png 1x1", check=check_pillow)(lambda t: save(Image.fromarray(np.full((1, 1), 200, np.uint8)), t / "dot.png"))
case("png 1x300 (just over aspect 200)", check=check_pillow, processor_error=("aspect ratio",))(
    lambda t: save(Image.fromarray(np.zeros((1, 300), np.uint8)), t / "line.png"))
case("png grayscale", check=check_pillow)(png_gray)
case("png rgb", check=check_pillow)(png_rgb)
case("png rgba", check=check_pillow)(
    lambda t: save(Image.fromarray(np.dstack([RGB, GRAY])), t / "rgba.png"))
case("png LA", check=check_pillow)(
    lambda t: save(Image.fromarray(np.dstack([GRAY, GRAY[::-1]])).convert("LA"), t / "la.png"))
case("png palette", check=check_pillow)(
    lambda t: save(Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), t / "p.png"))
case("png palette + tRNS", check=check_pillow)(
    lambda t: save(Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), t / "pt.png",
                   transparency=3))
case("png 1-bit", check=check_pillow)(lambda t: save(Image.fromarray(GRAY > 128), t / "bw.png"))
case("png 16-bit gray", check=check_pillow_16bit)(
    lambda t: save(Image.fromarray((GRAY.astype(np.uint16) * 257)), t / "g16.png"))
case("png 16-bit gray cut", error=(("truncated", "corrupt"),))(
    lambda t: cut(save(Image.fromarray((RNG.random((64, 64)) * 65535).astype(np.uint16)), t / "g16c.png"), 0.5))
case("png 16-bit constant", check=check_pillow_16bit)(
    lambda t: save(Image.fromarray(np.full((8, 8), 1234, np.uint16)), t / "c16.png"))
case("png named .jpg", check=check_pillow)(lambda t: png_rgb(t, "really_png.jpg"))
case("png named .mp4", check=check_pillow)(lambda t: png_rgb(t, "really_png.mp4"))
case("png named .dcm", check=check_pillow)(lambda t: png_rgb(t, "really_png.dcm"))
case("png named .nii", check=check_pillow)(lambda t: png_rgb(t, "really_png.nii"))
case("png without extension", check=check_pillow)(lambda t: png_rgb(t, "noext"))
case("png with zTXt bomb", error=(("too large", "decompress", "not a readable", "corrupt"),))(
    lambda t: write(t / "bomb.png", png_gray(t).read_bytes()[:33]
                    + png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"A" * (64 << 20)))
                    + png_gray(t).read_bytes()[33:]))
case("jpeg", check=lambda m, p: close(m.frames[0], pillow_rgb(p), 1e-5, "jpeg vs Pillow"))(jpeg)
case("jpeg cut at half", error=(("truncated", "corrupt"),))(lambda t: cut(jpeg(t), 0.5))
case("jpeg SOI only", error=(("not a readable", "truncated", "corrupt"),))(lambda t: cut(jpeg(t), 3, "soi.jpg"))
case("jpeg garbage after header", error=(("truncated", "corrupt", "not a readable"),))(
    lambda t: flip_bytes(jpeg(t), 0.3, 400))
case("jpeg CMYK", check=check_pillow)(lambda t: save(Image.fromarray(RGB).convert("CMYK"), t / "cmyk.jpg"))
case("jpeg EXIF rotated", check=check_pillow)(
    lambda t: save(Image.fromarray(RGB), t / "exif.jpg", exif=_exif(6), quality=95))
case("jpeg EXIF orientation 9 (invalid)", check=check_pillow)(
    lambda t: save(Image.fromarray(RGB), t / "exif9.jpg", exif=_exif(9), quality=95))
case("jpeg corrupt EXIF block", either=True, error=(("corrupt", "exif"),), check=check_pillow)(
    lambda t: write(t / "badexif.jpg", _corrupt_exif(save(Image.fromarray(RGB), t / "e.jpg", exif=_exif(6)))))
case("jpeg named .png", check=check_pillow)(lambda t: jpeg(t, "really_jpeg.png"))
case("tiff rgb", check=check_pillow)(lambda t: save(Image.fromarray(RGB), t / "c.tif"))
case("tiff cut", error=(("truncated", "corrupt", "not a readable"),))(
    lambda t: cut(save(Image.fromarray(RGB), t / "c.tif"), 0.5))
case("tiff header promising 50000x50000", error=("max_image_pixels",))(lambda t: _tiff_huge(t))
case("tiff float in [0,1]", check=check_pillow_unit_float)(lambda t: tiff_float(t, GRAY / 255.0))
case("tiff float with NaN", error=(("non-finite", "nan"),))(
    lambda t: tiff_float(t, np.where(GRAY > 250, np.nan, GRAY / 1.0), "nan.tif"))
case("tiff float with inf", error=(("non-finite", "inf"),))(
    lambda t: tiff_float(t, np.where(GRAY > 250, np.inf, GRAY / 1.0), "inf.tif"))
case("tiff float huge values", check=check_pillow_percentile)(
    lambda t: tiff_float(t, GRAY * 1e36, "huge.tif"))
case("tiff float negative", check=check_pillow_percentile)(lambda t: tiff_float(t, GRAY - 300.0, "neg.tif"))
case("tiff int32 negative", check=check_pillow_percentile)(
    lambda t: save(Image.fromarray(GRAY.astype(np.int32) - 1000), t / "i32.tif"))
case("tiff two pages", check=check_pillow)(
    lambda t: save(Image.fromarray(RGB), t / "pages.tif", save_all=True, append_images=[Image.fromarray(RGB[::-1])]))
case("gif animated", check=check_pillow)(
    lambda t: save(Image.fromarray(RGB).convert("P"), t / "a.gif", save_all=True,
                   append_images=[Image.fromarray(RGB[::-1]).convert("P")]))
case("gif cut", error=(("truncated", "corrupt", "not a readable"),))(
    lambda t: cut(save(Image.fromarray(RGB).convert("P"), t / "c.gif"), 0.5))
case("bmp cut", error=(("truncated", "corrupt", "not a readable"),))(
    lambda t: cut(save(Image.fromarray(RGB), t / "c.bmp"), 0.5))
case("webp", check=lambda m, p: close(m.frames[0], pillow_rgb(p), 1e-5, "webp vs Pillow"))(
    lambda t: save(Image.fromarray(RGB), t / "c.webp", lossless=True))
case("webp cut", error=(("truncated", "corrupt", "not a readable"),))(
    lambda t: cut(save(Image.fromarray(RGB), t / "c.webp"), 0.5))
case("text file named .png", error=(("not a readable", "not a recognised"),))(
    lambda t: write(t / "notes.png", "hello, not an image\n".encode()))
case("random bytes .png", error=(("not a readable", "not a recognised"),))(
    lambda t: write(t / "rnd.png", RNG.bytes(4096)))
case("random bytes, unknown extension", error=("unknown file format",))(
    lambda t: write(t / "rnd.xyz", RNG.bytes(4096)))
case("gzip of text named .png", error=(("not a readable",),))(
    lambda t: write(t / "gz.png", gzip.compress(b"hello" * 100)))


def _exif(orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _corrupt_exif(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    i = data.find(b"Exif\x00\x00")
    data[i + 10 : i + 18] = b"\xff" * 8  # the IFD offset and entry count now point far past the segment
    return bytes(data)


def _tiff_huge(t: Path) -> Path:
    path = save(Image.fromarray(GRAY), t / "huge.tif")
    data = bytearray(path.read_bytes())
    # patch the ImageWidth (256) and ImageLength (257) entries of the first IFD
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for e in range(count):
        off = ifd + 2 + 12 * e
        tag, typ = struct.unpack("<HH", data[off : off + 4])
        if tag in (256, 257):
            data[off + 2 : off + 4] = struct.pack("<H", 4)  # LONG
            data[off + 8 : off + 12] = struct.pack("<I", 50000)
    path.write_bytes(bytes(data))
    return path


# --- paths --------------------------------------------------------------------------------------------------------

case("missing file", error=("does not exist",))(lambda t: t / "missing.png")
case("directory named .png", error=(("not a regular file", "no DICOM", "folder"),))(
    lambda t: (t / "dir.png").mkdir() or t / "dir.png")
case("fifo named .png (would block on open)", error=("not a regular file",))(
    lambda t: os.mkfifo(t / "fifo.png") or t / "fifo.png")
case("/dev/zero", error=("not a regular file",), processor=False)(lambda t: Path("/dev/zero"))
case("symlink to a png", check=check_pillow)(lambda t: (t / "link.png").symlink_to(png_rgb(t)) or t / "link.png")
case("dangling symlink", error=("broken symbolic link", "nowhere.png"))(
    lambda t: (t / "dangling.png").symlink_to(t / "nowhere.png") or t / "dangling.png")
case("symlink loop", error=("loop",))(
    lambda t: (t / "loop.png").symlink_to(t / "loop.png") or t / "loop.png")
case("path with NUL byte", error=(("null", "nul"),), processor=False)(lambda t: str(t / "a\x00b.png"))
case("path too long", error=(("too long", "does not exist"),))(lambda t: str(t / ("x" * 5000 + ".png")))
case("unicode and spaces in the name", check=check_pillow)(lambda t: png_rgb(t, "ünï cødé ü.png"))
case("data_root: ../ escape", error=("escapes the data root",))(
    lambda t: ("../outside.png", {"data_root": _root_with_outside(t)}))
case("data_root: absolute path outside", error=("escapes the data root",))(
    lambda t: (str(_root_with_outside(t).parent / "outside.png"), {"data_root": t / "root"}))
case("data_root: symlink inside pointing outside", error=("escapes the data root",))(
    lambda t: _root_symlink_out(t))
case("data_root: DICOM folder with a symlink out", error=("escapes the data root",))(
    lambda t: _root_dicom_folder_link_out(t))
case("data_root: relative path inside", check=check_pillow)(
    lambda t: ("sub/in.png", {"data_root": _root_with_inside(t)}))


def _root_with_outside(t: Path) -> Path:
    (t / "root").mkdir(exist_ok=True)
    png_rgb(t, "outside.png")
    return t / "root"


def _root_with_inside(t: Path) -> Path:
    (t / "root" / "sub").mkdir(parents=True, exist_ok=True)
    png_rgb(t / "root" / "sub", "in.png")
    return t / "root"


def _root_symlink_out(t: Path):
    root = _root_with_outside(t)
    (root / "inner.png").symlink_to(t / "outside.png")
    return "inner.png", {"data_root": root}


def _root_dicom_folder_link_out(t: Path):
    root = t / "root"
    (root / "series").mkdir(parents=True)
    shutil.copy(CT_SMALL, root / "series" / "a.dcm")
    (root / "series" / "b.dcm").symlink_to(CT_SMALL)
    return "series", {"data_root": root}


# --- arrays (load_media only) -------------------------------------------------------------------------------------


def arr_case(name, make, kind, error=None, check=None, options=None, either=False, forbid=()):
    case(name, error=error, check=check, options={"kind": kind, **(options or {})}, processor=False, either=either,
         forbid=forbid)(lambda t: make())


arr_case("array image NaN", lambda: np.where(GRAY > 250, np.nan, GRAY / 255.0), "image", error=(("non-finite", "nan"),))
arr_case("array video inf", lambda: np.full((3, 8, 8), np.inf, np.float32), "video", error=(("non-finite", "inf"),))
arr_case("array volume NaN", lambda: np.full((3, 8, 8), np.nan), "volume", error=(("non-finite", "nan"),))
arr_case("array image float64 beyond float32", lambda: GRAY * 1e300, "image", either=True,
         error=(("float32",),), forbid=("nan",), check=check_array_image(
             lambda a: np.repeat(percentile01(a / 1e300)[..., None], 3, -1)))
arr_case("array volume float64 beyond float32", lambda: np.stack([GRAY * 1e300] * 3), "volume", either=True,
         error=(("float32",),), forbid=("nan",))
arr_case("array video float64 beyond float32", lambda: np.stack([GRAY * 1e300] * 3), "video",
         error=(("float32", "[0, 1]"),), forbid=("nan",))
arr_case("array 1D image", lambda: np.zeros(10, np.uint8), "image", error=("shape",))
arr_case("array 5D video", lambda: np.zeros((2, 2, 4, 4, 3), np.uint8), "video", error=("shape",))
arr_case("array channels-first image", lambda: np.zeros((3, 16, 16), np.uint8), "image", error=("channels first",))
arr_case("array image 2 channels", lambda: np.zeros((16, 16, 2), np.uint8), "image", error=("shape",))
arr_case("array image zero rows", lambda: np.zeros((0, 16), np.uint8), "image", error=("empty",))
arr_case("array video zero frames", lambda: np.zeros((0, 8, 8, 3), np.uint8), "video", error=("empty",))
arr_case("array volume zero-length axis", lambda: np.zeros((4, 0, 8), np.int16), "volume", error=("empty",))
arr_case("array volume 2D", lambda: np.zeros((8, 8), np.int16), "volume", error=("(D, H, W)",))
arr_case("array complex", lambda: np.zeros((8, 8), np.complex64), "image", error=("unsupported dtype",))
arr_case("array object", lambda: np.array([[None, 1]], dtype=object), "image", error=("unsupported dtype",))
arr_case("array str", lambda: np.array([["a", "b"]]), "image", error=("unsupported dtype",))
arr_case("array video int16", lambda: np.zeros((2, 8, 8), np.int16), "video", error=("uint8 or float",))
arr_case("array video float 0..255", lambda: np.full((2, 8, 8), 200.0), "video", error=("[0, 1]",))
arr_case("array image bool", lambda: GRAY > 128, "image",
         check=check_array_image(lambda a: np.repeat(a[..., None], 3, -1).astype(float)))
arr_case("array image int64 negative", lambda: GRAY.astype(np.int64) - 1000, "image",
         check=check_array_image(lambda a: np.repeat(percentile01(a.astype(float))[..., None], 3, -1)))
arr_case("array image uint16", lambda: GRAY.astype(np.uint16) * 257, "image",
         check=check_array_image(lambda a: np.repeat((a / 65535.0)[..., None], 3, -1)))
arr_case("array image rgba float", lambda: np.dstack([RGB / 255.0, GRAY / 255.0]), "image",
         check=check_array_image(lambda a: a[..., :3] * a[..., 3:]))
arr_case("array image huge (broadcast, no memory)", lambda: np.broadcast_to(np.uint8(1), (100_000, 100_000)),
         "image", error=("max_image_pixels",))
arr_case("array video huge frames (broadcast)", lambda: np.broadcast_to(np.uint8(1), (64, 20_000, 20_000, 3)),
         "video", error=("max_image_pixels",))
arr_case("array video huge total (broadcast)", lambda: np.broadcast_to(np.uint8(1), (64, 4000, 4000, 3)),
         "video", error=("max_voxels",))
arr_case("array volume huge (broadcast)", lambda: np.broadcast_to(np.int16(1), (600, 600, 600)),
         "volume", error=("max_voxels",))
arr_case("array no kind", lambda: np.zeros((8, 8), np.uint8), None, error=("kind is required",))
arr_case("array video (T,H,W,2)", lambda: np.zeros((2, 8, 8, 2), np.uint8), "video", error=("shape",))
arr_case("array video rgba float", lambda: np.stack([np.dstack([RGB / 255.0, GRAY / 255.0])] * 2), "video",
         check=lambda m, a: close(m.frames, a[..., :3] * a[..., 3:], 1e-6, "rgba video composited on black"))
arr_case("array image HxWx1", lambda: GRAY[..., None], "image",
         check=check_array_image(lambda a: np.repeat(a / 255.0, 3, -1)))
arr_case("array image constant float", lambda: np.full((8, 8), 7.5), "image",
         check=check_array_image(lambda a: np.zeros((8, 8, 3))))
arr_case("torch bfloat16 image", lambda: _torch(GRAY / 255.0, "bfloat16"), "image",
         check=lambda m, t: close(m.frames[0], np.repeat(t.float().numpy()[..., None], 3, -1), 1e-6, "bfloat16"))
arr_case("torch int8 video", lambda: _torch(np.full((2, 8, 8), -3), "int8"), "video", error=("uint8 or float",))
arr_case("torch tensor requiring grad", lambda: _torch(GRAY / 255.0, "float32").requires_grad_(), "image",
         check=lambda m, t: close(m.frames[0], np.repeat(t.detach().numpy()[..., None], 3, -1), 1e-6, "grad tensor"))
arr_case("array image float16", lambda: (GRAY / 255.0).astype(np.float16), "image",
         check=check_array_image(lambda a: np.repeat(a.astype(np.float64)[..., None], 3, -1)))


def _torch(values, dtype: str):
    import torch

    return torch.tensor(np.asarray(values, np.float64)).to(getattr(torch, dtype))


# --- NIfTI --------------------------------------------------------------------------------------------------------

case("nii empty (0 bytes)", error=("empty",))(lambda t: write(t / "e.nii", b""))
case("nii header only", error=("truncated",))(lambda t: cut(nifti(t, vol16()), 352, "hdr.nii"))
case("nii cut in the data", error=("truncated",))(lambda t: cut(nifti(t, vol16((20, 20, 20))), 0.5))
case("nii.gz cut in half", error=(("truncated", "corrupt", "not a readable", "cannot read"),))(
    lambda t: cut(nifti(t, RNG.random((20, 20, 20)).astype(np.float32), name="v.nii.gz"), 0.5))
case("nii.gz corrupt deflate stream", error=(("truncated", "corrupt", "not a readable", "cannot read"),))(
    lambda t: write(t / "bad.nii.gz", _flip(gzip.compress(nifti(t, vol16((20, 20, 20))).read_bytes(), mtime=0), 0.5)))
case("nii.gz with a flipped data byte (CRC mismatch)", error=(("corrupt", "crc"),))(
    lambda t: write(t / "crc.nii.gz", _flip(gzip.compress(nifti(t, vol16((20, 20, 20))).read_bytes(),
                                                          compresslevel=0, mtime=0), 0.7, 1)))
case("nii.gz of garbage", error=(("not a readable", "gzip", "not NIfTI"),))(
    lambda t: write(t / "g.nii.gz", gzip.compress(RNG.bytes(2000))))
case("nii header promising 50000^3", error=("max_voxels",))(
    lambda t: patch_nifti(nifti(t, vol16()), {42: struct.pack("<3h", 30000, 30000, 30000)}, "big.nii"))
case("nii NaN in the affine (sform)", error=("affine", ("nan", "non-finite", "not finite")))(
    lambda t: patch_nifti(nifti(t, vol16()), {254: struct.pack("<h", 1), 280: struct.pack("<f", np.nan),
                                              252: struct.pack("<h", 0)}, "nanaff.nii"))
case("nii 4D with 0 volumes", error=(("0 volumes", "no volume", "empty", "zero"),), forbid=("0..-1",))(
    lambda t: patch_nifti(nifti(t, vol16()), {40: struct.pack("<5h", 4, 6, 7, 5, 0)}, "zero4d.nii"))
case("nii zero-length axis", error=(("empty", "zero-length", "no voxels", "0 voxels", "length 0"),),
     forbid=("IndexError",))(
    lambda t: patch_nifti(nifti(t, vol16()), {40: struct.pack("<4h", 3, 6, 0, 5)}, "zeroaxis.nii"))
case("nii negative dim", error=(("not a readable", "dimension", "negative", "invalid", "corrupt"),))(
    lambda t: patch_nifti(nifti(t, vol16()), {42: struct.pack("<h", -6)}, "negdim.nii"))
case("nii float64 beyond float32 range", either=True, error=(("float32", "range", "overflow"),), forbid=("nan",),
     check=check_nibabel)(lambda t: nifti(t, vol16().astype(np.float64) * 1e300, name="f64.nii"))
case("nii NaN data", error=(("non-finite", "nan"),))(
    lambda t: nifti(t, np.where(vol16() > 90, np.nan, vol16()).astype(np.float32), name="nan.nii"))
case("nii inf data", error=(("non-finite", "inf"),))(
    lambda t: nifti(t, np.where(vol16() > 90, np.inf, vol16()).astype(np.float32), name="inf.nii"))
case("nii constant 8-bit values", check=check_nibabel)(
    lambda t: nifti(t, np.full((6, 7, 5), 42, np.int16), name="const.nii"))
case("nii constant wide values", check=lambda m, p: close(m.frames, np.zeros_like(m.frames), 0, "constant -> zeros"))(
    lambda t: nifti(t, np.full((6, 7, 5), -1000, np.int16), name="constw.nii"))
case("nii int16 LPS, wide values", check=check_nibabel)(
    lambda t: nifti(t, vol_wide(), np.diag([-1.0, -1.0, 2.0, 1.0]), name="lpsw.nii"))
case("nii int16 LPS", check=check_nibabel)(
    lambda t: nifti(t, vol16(), np.diag([-1.0, -1.0, 2.0, 1.0]), name="lps.nii"))
case("nii.gz int16 oblique", check=check_nibabel)(
    lambda t: nifti(t, vol_wide(), _oblique(), name="obl.nii.gz"))
case("nii 2D (one slice)", check=check_nibabel)(lambda t: nifti(t, vol_wide((6, 7)), name="flat.nii"))
case("nii uint8 unscaled", check=check_nibabel)(
    lambda t: nifti(t, (vol16() * 2).astype(np.uint8), name="u8.nii"))
case("nii uint8 with scl_slope/scl_inter", check=check_nibabel)(
    lambda t: _scaled_uint8(t))
case("nii 4D without volume_index", error=("volume_index",))(
    lambda t: nifti(t, np.stack([vol16()] * 2, -1), name="4d.nii"))
case("nii 4D volume_index out of range", error=("volume_index",), options={"volume_index": 5})(
    lambda t: nifti(t, np.stack([vol16()] * 2, -1), name="4d.nii"))
case("nii 5D", error=("not supported",))(
    lambda t: nifti(t, np.zeros((4, 4, 4, 2, 2), np.int16), name="5d.nii"))
case("nii complex", error=("not supported",))(
    lambda t: nifti(t, np.zeros((4, 4, 4), np.complex64), name="cplx.nii"))
case("nii RGB", error=("not supported",))(
    lambda t: _nifti_rgb(t))
case("nii named .png", error=(".nii",))(
    lambda t: nifti(t, vol16(), name="vol.nii").rename(t / "vol.png") or t / "vol.png")
case("nii without extension", error=(("rename", ".nii"),))(
    lambda t: nifti(t, vol16(), name="vol.nii").rename(t / "vol.dat") or t / "vol.dat")
case("nii vox_offset past the end", error=("truncated",))(
    lambda t: patch_nifti(nifti(t, vol16()), {108: struct.pack("<f", 1e6)}, "offset.nii"))
case("nii zero pixdim, no geometry", check=check_nibabel)(
    lambda t: patch_nifti(nifti(t, vol16()), {76: struct.pack("<4f", 0, 0, 0, 0), 252: struct.pack("<2h", 0, 0)},
                          "nogeo.nii"))
case("nii as kind=video", error=("kind",), options={"kind": "video"})(lambda t: nifti(t, vol16()))


def _oblique() -> np.ndarray:
    c, s = math.cos(0.3), math.sin(0.3)
    return np.array([[c, -s, 0, 1], [s, c, 0, 2], [0, 0, 1.5, 3], [0, 0, 0, 1]])


def _scaled_uint8(t: Path) -> Path:
    img = nib.Nifti1Image((vol16() * 2).astype(np.uint8), np.eye(4))
    img.header.set_slope_inter(2.0, -10.0)
    nib.save(img, t / "scaled.nii")
    return t / "scaled.nii"


def _nifti_rgb(t: Path) -> Path:
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return nifti(t, rgb, name="rgb.nii")


# --- DICOM --------------------------------------------------------------------------------------------------------

case("dcm empty (0 bytes)", error=("empty",))(lambda t: write(t / "e.dcm", b""))
case("dcm preamble only", error=(("not a DICOM", "corrupt", "unreadable", "not an image"),))(
    lambda t: cut(dicom_copy(t), 132, "pre.dcm"))
case("dcm cut in the header", error=(("corrupt", "not a DICOM", "unreadable", "not an image"),))(
    lambda t: cut(dicom_copy(t), 300, "hdr.dcm"))
case("dcm cut in the pixel data", error=(("cannot decode", "truncated", "corrupt", "unreadable"),))(
    lambda t: cut(dicom_copy(t), 0.8))
case("dcm random bytes", error=(("not a DICOM", "corrupt"),))(
    lambda t: write(t / "rnd.dcm", RNG.bytes(3000)))
case("dcm Rows/Columns 50000", error=("max_image_pixels",))(lambda t: dicom_copy(t, Rows=50000, Columns=50000))
case("dcm Rows 0", error=(("cannot decode", "0", "empty"),))(lambda t: dicom_copy(t, Rows=0))
case("dcm no pixel data", error=(("no pixel data",),))(lambda t: dicom_copy(t, PixelData=None))
case("dcm BitsAllocated 7", error=(("cannot decode", "bits"),))(lambda t: dicom_copy(t, BitsAllocated=7))
case("dcm RescaleSlope NaN", error=("RescaleSlope",), forbid=("nan_policy",))(
    lambda t: dicom_with_raw_value(t, "RescaleSlope", b"NaN", name="slope_nan.dcm"))
case("dcm RescaleSlope text", error=("RescaleSlope",))(
    lambda t: dicom_with_raw_value(t, "RescaleSlope", b"abc", name="slope_txt.dcm"))
case("dcm own WindowWidth 0 (CT)", either=True, error=("WindowWidth",),
     check=lambda m, p: None, forbid=("got (center",))(
    lambda t: dicom_copy(t, WindowCenter=40, WindowWidth=0, name="ww0.dcm"))
case("dcm own WindowCenter NaN (CT)", either=True, error=("WindowCenter",), check=lambda m, p: None)(
    lambda t: dicom_with_raw_value(dicom_copy(t, WindowCenter=40, WindowWidth=400).parent, "WindowCenter", b"NaN",
                                   src=t / "x.dcm", name="wc_nan.dcm"))
case("dcm CT with its own window", check=check_pydicom_window)(
    lambda t: dicom_copy(t, WindowCenter=100, WindowWidth=600, name="win.dcm"))
case("dcm CT without window tags", check=lambda m, p: check_pydicom_window(m, p, 40, 400))(
    lambda t: dicom_copy(t, WindowCenter=None, WindowWidth=None, name="nowin.dcm"))
case("dcm MR", check=check_pydicom_percentile)(lambda t: dicom_copy(t, MR_SMALL, name="mr.dcm"))
case("dcm named .png", check=lambda m, p: check_pydicom_window(m, p, 40, 400))(
    lambda t: dicom_copy(t, name="really_dicom.png"))
case("dcm without extension", check=lambda m, p: check_pydicom_window(m, p, 40, 400))(
    lambda t: dicom_copy(t, name="IM0001"))
case("dcm NumberOfFrames huge", error=(("max_voxels", "cannot decode"),))(
    lambda t: dicom_copy(t, NumberOfFrames=100000, name="frames.dcm"))
case("dcm as kind=video", error=("not 'video'",), options={"kind": "video"})(lambda t: dicom_copy(t))
case("dcm JPEG-LS lossless twin", either=True, error=(("decode", "plugin", "transfer syntax"),),
     check=check_same_as(MR_SMALL))(lambda t: DICOM_DATA / "MR_small_jpeg_ls_lossless.dcm")
case("dcm RLE lossless twin", check=check_same_as(MR_SMALL))(lambda t: DICOM_DATA / "MR_small_RLE.dcm")
case("folder empty", error=("no DICOM image files",))(lambda t: (t / "empty_dir").mkdir() or t / "empty_dir")
case("folder of text files", error=("no DICOM image files",))(lambda t: _folder(t, {"a.txt": b"x", "b.txt": b"y"}))
case("folder of PNGs", error=("no DICOM image files",))(lambda t: _png_folder(t))
case("folder with two series", error=("2 DICOM series",))(
    lambda t: _folder_of_dicoms(t, [CT_SMALL, dicom_copy(t, SeriesInstanceUID="1.2.3.4", name="s2.dcm")]))
case("folder with different shapes", error=("different shapes",))(
    lambda t: _folder_of_dicoms(t, [CT_SMALL, _resized_ct(t)]))
case("folder: a truncated slice among good ones", error=(("cannot decode", "truncated", "corrupt", "unreadable"),))(
    lambda t: _folder_with_cut_slice(t))
case("folder: CT5N series", check=lambda m, p: None)(lambda t: CT5N)
case("folder: CT5N plus a fifo (would block on open)", check=check_same_as(CT5N))(lambda t: _folder_with_fifo(t))
case("dcm without preamble or file meta", error=("preamble",))(lambda t: _raw_dicom(t))
case("dicom list empty", error=("empty",), processor=False)(lambda t: [])
case("dicom list with a missing file", error=("missing.dcm", "does not exist"), processor=False)(
    lambda t: [CT_SMALL, t / "missing.dcm"])


def _folder(t: Path, files: dict[str, bytes]) -> Path:
    d = t / "folder"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _png_folder(t: Path) -> Path:
    d = t / "pngs"
    d.mkdir()
    png_rgb(d)
    png_gray(d)
    return d


def _folder_of_dicoms(t: Path, files: list[Path]) -> Path:
    d = t / "series"
    d.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, d / f"{i}.dcm")
    return d


def _resized_ct(t: Path) -> Path:
    ds = pydicom.dcmread(CT_SMALL)
    arr = ds.pixel_array[:64, :32].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    ds.ImagePositionPatient = [float(v) + (5.0 if i == 2 else 0.0) for i, v in enumerate(ds.ImagePositionPatient)]
    ds.SOPInstanceUID = "1.2.3.5"
    out = t / "small.dcm"
    ds.save_as(out, enforce_file_format=False)
    return out


def _folder_with_fifo(t: Path) -> Path:
    d = t / "series"
    shutil.copytree(CT5N, d)
    os.mkfifo(d / "zz_fifo")
    return d


def _raw_dicom(t: Path) -> Path:
    """The dataset alone, implicit VR little endian: no 128-byte preamble, no DICM, no file meta group."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(CT_SMALL)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return write(t / "raw.dcm", fp.getvalue())


def _folder_with_cut_slice(t: Path) -> Path:
    d = t / "series"
    shutil.copytree(CT5N, d)
    victim = sorted(d.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[: int(victim.stat().st_size * 0.7)])
    return d


# --- video --------------------------------------------------------------------------------------------------------

for backend in ("decord", "pyav"):
    b = {"video_backend": backend}
    case(f"mp4 empty (0 bytes) [{backend}]", error=("empty",), options=b)(
        lambda t: write(t / "e.mp4", b""))
    case(f"mp4 cut to 1 KB [{backend}]", error=(("cannot open", "cannot decode", "no frames"),), options=b)(
        lambda t: cut(video(t / "v.mp4"), 1024))
    case(f"mp4 cut at half [{backend}]", error=(("cannot open", "cannot decode", "no frames"),), options=b)(
        lambda t: cut(video(t / "v.mp4", n=30), 0.5))
    case(f"mp4 random bytes [{backend}]", error=(("cannot open", "not a recognised"),), options=b)(
        lambda t: write(t / "rnd.mp4", RNG.bytes(5000)))
    case(f"mp4 h264 [{backend}]", check=check_video(5, 10), options=b)(lambda t: video(t / "v.mp4"))
    case(f"mp4 one frame [{backend}]", check=check_video(5, 1), options=b)(lambda t: video(t / "one.mp4", n=1))
    case(f"mp4 1000 fps [{backend}]", check=check_video(1000, 10), options=b)(
        lambda t: video(t / "fast.mp4", rate=1000))
    case(f"mp4 0.2 fps [{backend}]", check=check_video(0.2, 10), options=b)(
        lambda t: video(t / "slow.mp4", rate=Fraction(1, 5)))
    case(f"avi mpeg4 [{backend}]", check=check_video(5, 10), options=b)(lambda t: video(t / "v.avi", "mpeg4"))
    case(f"avi h264 with B-frames (no pts) [{backend}]", check=check_video(5, 10), options=b)(
        lambda t: video(t / "bframes.avi"))
    case(f"avi mjpeg [{backend}]", check=check_video(5, 10), options=b)(
        lambda t: video(t / "mj.avi", "mjpeg", pix="yuvj420p"))
    case(f"avi cut [{backend}]", error=(("cannot open", "cannot decode", "no frames", "truncated"),), options=b,
         either=True, check=lambda m, p: None)(lambda t: cut(video(t / "v.avi", "mpeg4", n=30), 0.5))
    case(f"webm vp8 [{backend}]", check=check_video(5, 10), options=b)(lambda t: video(t / "v.webm", "libvpx"))
    case(f"webm vp9 [{backend}]", check=check_video(5, 10), options=b)(lambda t: video(t / "v9.webm", "libvpx-vp9"))
    case(f"webm cut to 300 bytes [{backend}]", error=(("cannot open", "cannot decode", "no frames"),), options=b)(
        lambda t: cut(video(t / "v.webm", "libvpx"), 300))
    case(f"mkv h264 [{backend}]", check=check_video(5, 10), options=b)(lambda t: video(t / "v.mkv"))
    case(f"mov mpeg4 [{backend}]", check=check_video(5, 10), options=b)(lambda t: video(t / "v.mov", "mpeg4"))
    case(f"mpeg-ts named .mp4 [{backend}]", check=check_video(5, 10), options=b, either=backend == "decord",
         error=("video_backend='pyav'",) if backend == "decord" else None)(lambda t: video(t / "ts.mp4", fmt="mpegts"))
    case(f"avi unknown codec fourcc [{backend}]", error=(("codec", "cannot open", "no decodable"),), options=b)(
        lambda t: _unknown_codec(t))
    case(f"audio-only mp4 [{backend}]", error=(("no video stream", "no decodable video stream"),), options=b)(
        lambda t: _audio_only(t))
    case(f"frames over max_image_pixels [{backend}]", error=("max_image_pixels",),
         options={**b, "max_image_pixels": 1000}, processor=False)(lambda t: video(t / "v.mp4"))
    case(f"header promising 8000x6000 frames [{backend}]", error=("max_voxels",), options=b)(
        lambda t: mjpeg_with_header_size(t, 8000, 6000))
    case(f"header promising 16000x16000 frames [{backend}]", error=(("max_image_pixels", "cannot open"),), options=b)(
        lambda t: mjpeg_with_header_size(t, 16000, 16000, n=3))
    case(f"decoded size over max_voxels [{backend}]", error=("max_voxels",),
         options={**b, "max_voxels": 5_000}, processor=False)(lambda t: video(t / "v.mp4"))
    case(f"frame count over max_video_frames_decoded [{backend}]", error=("max_video_frames_decoded",),
         options={**b, "max_video_frames_decoded": 5}, processor=False)(lambda t: video(t / "v.mp4"))
    case(f"mkv ffv1 gray, odd size 33x17 [{backend}]", check=check_video(5, 10), options=b)(
        lambda t: video(t / "odd.mkv", "ffv1", w=33, h=17, pix="gray"))
    case(f"mkv ffv1 1x1 pixel [{backend}]", check=check_video(5, 10), options=b, either=backend == "decord",
         error=("video_backend='pyav'",) if backend == "decord" else None)(
        lambda t: video(t / "dot.mkv", "ffv1", w=1, h=1, pix="gray"))
    case(f"mp4 hevc [{backend}]", check=check_video(5, 10), options=b)(lambda t: video(t / "hevc.mp4", "libx265"))
    case(f"mp4 AV1 [{backend}]", check=check_video(5, 10), options=b, either=backend == "decord",
         error=(("codec", "cannot open", "cannot decode"),) if backend == "decord" else None)(
        lambda t: video(t / "av1.mp4", "libsvtav1"))
    case(f"avi rawvideo [{backend}]", check=check_video(5, 10), options=b)(
        lambda t: video(t / "raw.avi", "rawvideo", pix="bgr24"))
    case(f"mp4 first keyframe missing [{backend}]", check=check_video(5, 10, first_missing=True), options=b,
         either=True, error=(("no frame", "cannot decode"),))(
        lambda t: video(t / "nokey.mp4", gop=3, drop_packets=1))
    case(f"mkv with two video streams [{backend}]", check=check_video(5, 10), options=b)(
        lambda t: video(t / "two.mkv", second_stream=True))
    case(f"mp4 with audio [{backend}]", check=check_video(5, 10), options=b)(
        lambda t: video(t / "av.mp4", audio=True))
    case(f"webm vp9 with alpha [{backend}]", check=check_video(5, 10), options=b)(
        lambda t: video(t / "alpha.webm", "libvpx-vp9", pix="yuva420p"))
    case(f"gif named .mp4 [{backend}]", check=check_pillow, options=b)(
        lambda t: save(Image.fromarray(RGB).convert("P"), t / "anim.mp4", format="GIF", save_all=True,
                       append_images=[Image.fromarray(RGB[::-1]).convert("P")]))
    case(f"mp4 as kind=image [{backend}]", error=("kind",), options={**b, "kind": "image"})(
        lambda t: video(t / "v.mp4"))


case("mpeg-ts named .mp4 [default backend: decord, then PyAV]", check=check_video(5, 10))(
    lambda t: video(t / "ts.mp4", fmt="mpegts"))
case("avi h264 with B-frames [default backend]", check=check_video(5, 10))(lambda t: video(t / "bframes.avi"))
case("mkv ffv1 1x1 pixel [default backend]", check=check_video(5, 10))(
    lambda t: video(t / "dot.mkv", "ffv1", w=1, h=1, pix="gray"))
case("mp4 AV1 [default backend]", check=check_video(5, 10))(lambda t: video(t / "av1.mp4", "libsvtav1"))
case("avi h264 with B-frames [decord, PyAV not installed]", check=check_video(5, 10),
     options={"video_backend": "decord"}, without=("av",))(lambda t: video(t / "bframes.avi"))
case("frames over max_image_pixels [decord, PyAV not installed]", error=("max_image_pixels",),
     options={"video_backend": "decord", "max_image_pixels": 1000}, processor=False, without=("av",))(
    lambda t: video(t / "v.mp4"))
case("decoded size over max_voxels [decord, PyAV not installed]", error=("max_voxels",),
     options={"video_backend": "decord", "max_voxels": 5000}, processor=False, without=("av",))(
    lambda t: video(t / "v.mp4"))
case("mpeg-ts named .mp4 [default backend, PyAV not installed]", error=(("cannot decode", "corrupted"),),
     without=("av",))(lambda t: video(t / "ts.mp4", fmt="mpegts"))
for _backend in ("decord", "pyav"):
    case(f"mkv variable frame rate [{_backend}]", check=lambda m, p: check_vfr(m, p),
         options={"video_backend": _backend})(lambda t: vfr_video(t / "vfr.mkv"))
case("mpeg-ts segments concatenated: timeline restarts, size changes [pyav]", check=check_video(5, 10, False),
     options={"video_backend": "pyav"})(lambda t: _two_segments(t))
case("mpeg-ts segments concatenated [default backend]", check=check_video(5, 10, False))(lambda t: _two_segments(t))
case("mp4 random bytes [default backend]", error=(("cannot open", "not a recognised"),))(
    lambda t: write(t / "rnd.mp4", RNG.bytes(5000)))


def _two_segments(t: Path) -> Path:
    """Two MPEG-TS files back to back (frames 0-4 at 64x48, then 5-9 at 128x96), each timed from 0."""
    a = video(t / "a.ts", n=5, fmt="mpegts")
    b = video(t / "b.ts", n=5, w=128, h=96, fmt="mpegts", first=5)
    return write(t / "joined.ts.mp4", a.read_bytes() + b.read_bytes())


def _unknown_codec(t: Path) -> Path:
    data = bytearray(video(t / "mj.avi", "mjpeg", pix="yuvj420p").read_bytes())
    j = data.find(b"strf")
    data[j + 8 + 16 : j + 8 + 20] = b"XQZW"
    k = data.find(b"strh")
    data[k + 12 : k + 16] = b"XQZW"
    (t / "codec.avi").write_bytes(bytes(data))
    return t / "codec.avi"


def _audio_only(t: Path) -> Path:
    path = t / "audio.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 8000
            frame.pts = i * 1024
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# --- other sources ------------------------------------------------------------------------------------------------

case("source None", error=("unsupported source type",), processor=False)(lambda t: None)
case("source int", error=("unsupported source type",), processor=False)(lambda t: 123)
case("source bytes", error=("unsupported source type",), processor=False)(lambda t: b"/tmp/x.png")
case("unknown kind", error=("unknown kind",), options={"kind": "audio"}, processor=False)(lambda t: png_rgb(t))
case("bad window on a png", error=("window",), options={"window": (40, 0)})(lambda t: png_gray(t))


# ------------------------------------------------------------------------------------------------------------------
# Harness: fork per case, time and memory caps
# ------------------------------------------------------------------------------------------------------------------


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _invariants(m) -> None:
    f = m.frames
    assert isinstance(f, np.ndarray) and f.dtype == np.float32, f"frames dtype {getattr(f, 'dtype', type(f))}"
    assert f.ndim == 4 and f.shape[-1] == 3 and f.shape[0] >= 1, f"frames shape {f.shape}"
    assert np.isfinite(f).all(), "non-finite frames"
    assert f.min() >= 0.0 and f.max() <= 1.0, f"frames outside [0, 1]: [{f.min()}, {f.max()}]"
    if m.kind == "image":
        assert f.shape[0] == 1
    json.dumps(m.metadata)


def _processor_invariants(out, source) -> None:
    pv, grid = out["pixel_values"], out["grid_thw"]
    assert np.isfinite(pv).all(), "non-finite pixel_values"
    assert pv.shape[0] == int(np.prod(grid, axis=1).sum()), f"{pv.shape[0]} patches for grid {grid.tolist()}"
    assert out["visual_keep_mask"].dtype == bool


def _source_name(source) -> str:
    """What an error message must call the source: a path's base name, "<array>", or the source's type."""
    if isinstance(source, (str, os.PathLike)):
        name = os.path.basename(os.fspath(source)) or os.fspath(source)
        return name.replace("\x00", "\\x00")  # a NUL byte can only be shown escaped
    if mo._is_array_like(source):
        return "<array>"
    if isinstance(source, list):
        return ""  # the case names the file it expects (a list has no single name)
    return f"<{type(source).__name__}>"


def _outcome(run, check) -> dict:
    """Run the public call, then check its result: an exception from the call is an error (ValueError) or a crash;
    one from the check is a wrong result (AssertionError) or a broken check, never taken for a refusal."""
    try:
        value = run()
    except ValueError as e:  # MediaError and other clear argument errors
        return {"status": "error", "type": type(e).__name__, "message": str(e)}
    except BaseException as e:  # noqa: BLE001 - every other exception is a crash
        return {"status": "crash", "type": type(e).__name__, "message": str(e)[:500],
                "trace": traceback.format_exc(limit=8)}
    try:
        return {"status": "ok", **(check(value) or {})}
    except AssertionError as e:
        return {"status": "wrong", "message": str(e), "trace": traceback.format_exc(limit=4)}
    except BaseException as e:  # noqa: BLE001
        return {"status": "wrong", "message": f"the check itself failed: {type(e).__name__}: {e}",
                "trace": traceback.format_exc(limit=6)}


def _child(c: Case, tmp: Path, limit: int) -> dict:
    made = c.make(tmp)
    source, extra = made if isinstance(made, tuple) else (made, {})
    options = {**c.options, **extra}
    try:
        import torch

        torch.set_num_threads(1)  # no OpenMP pool in a forked child
    except Exception:
        pass
    try:  # one malloc arena per thread would reserve 64 MB of address space each (decoder threads)
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except OSError:
        pass
    for module in c.without:
        sys.modules[module] = None  # "import av" now raises ImportError, as if PyAV were not installed
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = {"label": _source_name(source)}

    def check_media(m):
        _invariants(m)
        if c.check is not None:
            root = options.get("data_root")
            c.check(m, Path(root) / source if root is not None and isinstance(source, str) else source)
        return {"shape": list(m.frames.shape)}

    result["load_media"] = _outcome(lambda: mo.load_media(source, **options), check_media)
    proc_options = {k: v for k, v in options.items() if k != "kind"}
    if c.processor and isinstance(source, (str, os.PathLike)):
        def check_processor(out):
            _processor_invariants(out, source)
            return {"grid": out["grid_thw"].tolist()}

        result["processor"] = _outcome(
            lambda: OmniVMedImageProcessor()([os.fspath(source)], kind=options.get("kind"), **proc_options),
            check_processor,
        )
    return result


def run_case(c: Case, tmp: Path, time_cap: float = TIME_CAP_S) -> dict:
    """Run one case in a forked child; returns its outcomes, or {"died": ...} / {"hang": seconds}."""
    limit = _vm_size() + MEMORY_HEADROOM
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(r)
            result = _child(c, tmp, limit)
        except BaseException as e:  # noqa: BLE001 - a failure of the case's own builder
            result = {"harness": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=6)}
        try:
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    os.close(w)
    chunks, start, status = [], time.monotonic(), None
    try:
        while True:
            left = time_cap - (time.monotonic() - start)
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"hang": time_cap}
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
    if os.WIFSIGNALED(status):
        return {"died": f"signal {os.WTERMSIG(status)} ({signal.Signals(os.WTERMSIG(status)).name})"}
    if not chunks:
        return {"died": f"exit status {os.WEXITSTATUS(status)} without a result"}
    return json.loads(b"".join(chunks))


def problems(c: Case, result: dict) -> list[str]:
    """What is wrong with a case's result (empty: it passes)."""
    label = result.pop("label", "")
    if "hang" in result:
        return [f"hang: no result within {result['hang']} s"]
    if "died" in result:
        return [f"crash: child died ({result['died']})"]
    if "harness" in result:
        return [f"could not build the case: {result['harness']}\n{result.get('trace', '')}"]
    out = []
    for via, o in result.items():
        status = o["status"]
        if via == "processor" and c.processor_error is not None:
            if status != "error":
                out.append(f"{via}: {status} ({o}) but should be refused with {c.processor_error}")
            elif not all(_has(o["message"], w) for w in (label, *c.processor_error)):
                out.append(f"{via}: message lacks {(label, *c.processor_error)}: {o['type']}: {o['message']}")
            continue
        if status == "crash":
            out.append(f"{via}: crash {o['type']}: {o['message']}\n{o.get('trace', '')}")
        elif status == "wrong":
            out.append(f"{via}: silent wrong result: {o['message']}\n{o.get('trace', '')}")
        elif status == "ok" and c.error is not None and not c.either:
            out.append(f"{via}: loaded ({o}) but should be refused with {c.error}")
        elif status == "error":
            msg = o["message"]
            if c.error is None:
                out.append(f"{via}: refused a valid input: {o['type']}: {msg}")
                continue
            missing = [w for w in (label, *c.error) if not _has(msg, w)]
            wrong = [w for w in c.forbid if _has(msg, w)]
            if missing:
                out.append(f"{via}: message lacks {missing}: {o['type']}: {msg}")
            if wrong:
                out.append(f"{via}: message points at the wrong cause ({wrong}): {msg}")
    return out


def _has(message: str, words) -> bool:
    alternatives = words if isinstance(words, tuple) else (words,)
    return any(w.lower() in message.lower() for w in alternatives)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_fuzz_case(c: Case, tmp_path: Path):
    result = run_case(c, tmp_path)
    found = problems(c, result)
    assert not found, f"{c.name}:\n" + "\n".join(found)


def test_the_harness_sees_hangs_signals_memory_and_wrong_messages(tmp_path):
    """The caps and checks can fail: a sleeping child is a hang, a killed one a crash, an allocation over the cap a
    MemoryError crash, and a message without the file name is reported."""
    hang = Case("sleeps", lambda t: time.sleep(30))
    assert "hang" in problems(hang, run_case(hang, tmp_path, time_cap=1))[0]
    segv = Case("segfault", lambda t: os.kill(os.getpid(), signal.SIGSEGV))
    assert "SIGSEGV" in problems(segv, run_case(segv, tmp_path))[0]
    big = Case("allocates", lambda t: np.zeros((8, 8), np.uint8), options={"kind": "image"}, processor=False,
               check=lambda m, source: np.ones(MEMORY_HEADROOM // 8 + (1 << 28)))  # runs under the cap
    assert "MemoryError" in problems(big, run_case(big, tmp_path))[0]

    def out_of_memory():
        raise MemoryError("from the call under test")

    assert _outcome(out_of_memory, lambda v: None)["status"] == "crash"  # not taken for a clear refusal
    wrong = Case("names no file", lambda t: np.zeros((4, 4), np.uint8), error=("shape",), options={"kind": "video"},
                 processor=False)
    assert "lacks" in problems(wrong, {"label": "other.png", "load_media": {
        "status": "error", "type": "MediaError", "message": "<array>: bad shape"}})[0]


def test_fuzz_module_covers_enough_cases():
    assert len(CASES) >= 100
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


if __name__ == "__main__":
    import tempfile

    rows = []
    t0 = time.monotonic()
    for c in CASES:
        with tempfile.TemporaryDirectory() as d:
            start = time.monotonic()
            res = run_case(c, Path(d))
            found = problems(c, res)
            rows.append((c.name, "PASS" if not found else "FAIL", time.monotonic() - start, found, res))
    for name, verdict, secs, found, res in rows:
        print(f"{verdict} {secs:5.2f}s {name}")
        for p in found:
            print("      " + p.replace("\n", "\n      ")[:1500])
        if verdict == "PASS":
            for via, o in res.items():
                if isinstance(o, dict) and o.get("status") == "error":
                    print(f"      [{via}] {o['message'][:300]}")
    print(f"{sum(r[1] == 'PASS' for r in rows)}/{len(rows)} pass in {time.monotonic() - t0:.1f}s")
