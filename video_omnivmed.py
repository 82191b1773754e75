"""Video reading (remote code): decord with PyAV fallback, frames sampled by fps within max_frames, header size checks
before decoding, timestamps. Conventions: media_omnivmed.py's docstring.
"""

from __future__ import annotations

import logging
import importlib.util
import importlib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .media_base_omnivmed import Media, MediaError, Options, jsonable, require, what_it_looks_like
from .volume_omnivmed import nearest


logger = logging.getLogger(__name__)


def load_video(path: Path, label: str, opts: Options) -> Media:
    """The sampled frames of a video file, all at once: the one chunk of `iter_video` that holds every frame."""
    (media,) = iter_video(path, label, opts)
    return media


def iter_video(path: Path, label: str, opts: Options, chunk_frames: int | None = None) -> Iterator[Media]:
    """The sampled frames of a video file as `Media` chunks of at most `chunk_frames` consecutive frames (None: one
    chunk with every frame, what `load_video` returns), decoded as they are needed: never more than a chunk is held.

    The chunks hold exactly the frames, timestamps and metadata of the one-shot read, in order (one code path reads
    both). Each chunk's metadata is the video's as far as it is known when the chunk is made; the last chunk's is the
    one-shot read's. With `chunk_frames`, it also holds "chunk": first_frame (index of the chunk's first frame among
    the sampled frames), num_frames, frames_planned (sampled frames the video should give) and last. The size limits
    apply to what is held: `max_voxels` to the frames of one chunk. PyAV may hold more than `chunk_frames` frames only
    while a damaged file's frame times are undecided (see `_pyav_chunks`)."""
    backend = opts.video_backend or _default_video_backend()
    warnings: list[str] = []
    yielded = False
    if backend == "decord":
        try:
            for frames, times, info, start, last in _decord_chunks(path, label, opts, warnings, chunk_frames):
                yield _chunk_media(frames, times, info, start, last, "decord", label, warnings, chunk_frames)
                yielded, frames = True, None
            return
        except _DecordFailed as e:
            pyav_installed = importlib.util.find_spec("av") is not None
            if yielded or opts.video_backend == "decord" or not pyav_installed:
                hint = "; video_backend='pyav' may read it" if pyav_installed else ""
                raise MediaError(f"{label}: {e}{hint}{what_it_looks_like(path)}") from e.__cause__
            # decord fails on files PyAV reads (MPEG-TS, some AVIs): the caller asked for no backend in particular
            logger.warning("%s: %s; reading it with PyAV instead", label, e)
            warnings.append(f"{e}; read with PyAV instead")
    for frames, times, info, start, last in _pyav_chunks(path, label, opts, warnings, chunk_frames):
        yield _chunk_media(frames, times, info, start, last, "pyav", label, warnings, chunk_frames)
        frames = None


def _chunk_media(frames, times, info, start, last, backend, label, warnings, chunk_frames) -> Media:
    meta = {"video_backend": backend, **info, "intensity": {"method": "scale", "divisor": 255.0},
            "warnings": list(warnings)}  # fmt: skip
    if chunk_frames is not None:
        meta["chunk"] = {"first_frame": start, "num_frames": len(frames), "frames_planned": info["frames_planned"],
                         "last": last}  # fmt: skip
    meta.pop("frames_planned")
    # divided in place: an hour of frames is held once as float32, not twice (same values as `/ 255.0`)
    pixels = frames.astype(np.float32)
    del frames
    np.divide(pixels, np.float32(255.0), out=pixels)
    return Media(frames=pixels, kind="video", source=label, timestamps_s=[round(float(t), 6) for t in times],
                 metadata=jsonable(meta))  # fmt: skip


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


def check_video_size(label: str, width: int, height: int, n_frames: int, opts: Options) -> None:
    """Refuse before decoding: one frame over max_image_pixels, or kept frames x height x width over max_voxels
    (the float32 frames of a video cost what a volume of that many voxels costs)."""
    if width * height > opts.max_image_pixels:
        raise MediaError(
            f"{label}: frames are {width}x{height}, more than max_image_pixels={opts.max_image_pixels}"
        )
    if n_frames * width * height > opts.max_voxels:
        raise MediaError(
            f"{label}: {n_frames} frames of {width}x{height} would decode to {n_frames * width * height} pixels, more "
            f"than max_voxels={opts.max_voxels}; lower max_frames or fps, or stream the video in smaller chunks "
            "(chunk_frames)"
        )


def _probe_video_header(path: Path, label: str, opts: Options, chunk_frames: int | None = None
                        ) -> tuple[int, int] | None:  # fmt: skip
    """(width, height) from the container header read by PyAV (nothing decoded), after refusing a frame size or a
    decoded size (the frames the header's duration implies, at most a chunk's) over the limits. None when PyAV is
    missing or cannot parse the header: the caller then looks at a decoded frame instead."""
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
    n_kept = min(n_kept, n_header) if n_header > 0 else n_kept
    check_video_size(label, width, height, _held(n_kept, chunk_frames), opts)
    return width, height


def _video_indices(times: np.ndarray, duration: float, fps: float, max_frames: int) -> tuple[list[int], dict]:
    """Frames nearest to k / fps (< duration), or to k * duration / max_frames when that is too many."""
    n_wanted = max(1, math.ceil(duration * fps - 1e-9))
    if n_wanted <= max_frames:
        targets, sampling = np.arange(n_wanted) / fps, {"sampling": "fps", "sampling_fps": fps}
    else:
        targets = np.arange(max_frames) * duration / max_frames
        sampling = {"sampling": "max_frames", "sampling_fps": max_frames / duration}
    return sorted(set(nearest(times, targets))), sampling


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


def _held(n_frames: int, chunk_frames: int | None) -> int:
    """Frames held at once: every sampled frame in one read, at most a chunk's when streaming."""
    return n_frames if chunk_frames is None else min(n_frames, chunk_frames)


def _decord_chunks(path: Path, label: str, opts: Options, warnings: list[str], chunk_frames: int | None):
    """(uint8 frames, times, info, first frame, last) per chunk of the sampled frames, decoded with decord."""
    decord = require("decord", "decord", "videos")
    header = _probe_video_header(path, label, opts, chunk_frames)
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
    info = {"fps_native": avg_fps, "duration_s": duration, "n_frames_total": n, "frame_indices": idx, **sampling,
            "frames_planned": len(idx)}  # fmt: skip
    held = _held(len(idx), chunk_frames)
    for start in range(0, len(idx), held):
        part = idx[start : start + held]
        try:
            if vr is None:
                vr = decord.VideoReader(os.fspath(path), ctx=decord.cpu(0))
            if start == 0 and header is None:
                # no header size (PyAV missing): decode one frame and look before decoding the rest
                first = vr.get_batch(part[:1]).asnumpy()
                check_video_size(label, first.shape[2], first.shape[1], held, opts)
                batch = np.concatenate([first, vr.get_batch(part[1:]).asnumpy()]) if len(part) > 1 else first
            else:
                if start == 0:
                    check_video_size(label, *header, held, opts)
                batch = vr.get_batch(part).asnumpy()  # decodes only what is needed (seeking to key frames)
        except MediaError:
            raise
        except Exception as e:
            raise _DecordFailed(f"cannot decode video with decord ({_short(e)})") from e
        # decord's reader goes on decoding frames ahead in the background while the caller works on a chunk, holding
        # them (gigabytes over an hour of 448 px video when the tower takes seconds per chunk): a streamed chunk is
        # read by a fresh reader (opening costs milliseconds; its get_batch seeks as the old one would: same frames)
        vr = None if chunk_frames is not None else vr
        yield batch, times[part], info, start, start + held >= len(idx)
        batch = first = None


def _pyav_chunks(path: Path, label: str, opts: Options, warnings: list[str], chunk_frames: int | None):
    """(uint8 frames, times, info, first frame, last) per chunk of the sampled frames, decoded with PyAV."""
    av = require("av", "av", "videos")
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
            check_video_size(label, width, height, 1, opts)
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
        raise MediaError(f"{label}: cannot open video with PyAV ({_short(e)}){what_it_looks_like(path)}") from e
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
    held = _held(len(idx), chunk_frames)
    check_video_size(label, width, height, held, opts)
    info = {"fps_native": fps_native, "duration_s": duration, "n_frames_total": len(times), "frame_indices": idx,
            **sampling, "frames_planned": len(idx)}  # fmt: skip

    # Pass 2: decode in presentation order, convert only the wanted frames, stop after the last one.
    # The decoder outputs frames in presentation order, but their pts can still be missing or scrambled (AVI stores no
    # presentation times, so B-frames come out with decode-order guesses): then frame i gets the i-th smallest packet
    # timestamp, which is the same value whenever the pts are sound. Whether they are is known only once every frame
    # up to the last wanted one is decoded, so a chunk is released when its times are certain: the pts seen so far are
    # unsound, or its frames' pts equal their packet times (so either answer gives them), or the read is over. Only a
    # file whose sound-looking pts disagree with its packet times makes PyAV hold more than a chunk.
    wanted, got, buffer, size, sound, last_pts, held_pixels = set(idx), [], [], None, not by_rate, None, 0

    def packet_time(i: int) -> float:
        return float(times[min(i, len(times) - 1)])

    def pts_time(pts_i) -> float:
        return float((pts_i - pts[0]) * time_base)

    def certain_times(final: bool) -> list[float] | None:
        by_packets = [packet_time(i) for i, _, _ in buffer]
        if not sound:
            return by_packets
        by_pts = [pts_time(p) for _, p, _ in buffer]
        return by_pts if final or by_pts == by_packets else None

    def release(stamps: list[float], last: bool):
        first = len(got)
        got.extend(i for i, _, _ in buffer)
        frames = np.stack([f for _, _, f in buffer])
        buffer.clear()
        if not last:
            return frames, np.array(stamps), info, first, False
        if len(got) < len(idx):
            logger.warning("%s: decoded only %d of %d wanted frames", label, len(got), len(idx))
            warnings.append(f"decoded only {len(got)} of {len(idx)} wanted frames")
        return frames, np.array(stamps), {**info, "frame_indices": list(got)}, first, True

    try:
        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if sound and (frame.pts is None or (last_pts is not None and frame.pts <= last_pts)):
                    sound = False
                    warnings.append("decoded frames carry missing or out-of-order timestamps (B-frames in AVI?); "
                                    "frame times taken from the sorted packet timestamps")  # fmt: skip
                last_pts = frame.pts
                if i in wanted:
                    if len(buffer) >= held:
                        stamps = certain_times(final=False)
                        if stamps is not None:
                            yield release(stamps, last=False)
                            held_pixels = 0
                    # the header may understate the size (or give none): check what the decoder made
                    check_video_size(label, frame.width, frame.height, 1, opts)
                    held_pixels += size[0] * size[1] if size else frame.width * frame.height
                    if held_pixels > opts.max_voxels:
                        raise MediaError(
                            f"{label}: the decoded frames exceed max_voxels={opts.max_voxels} pixels (frames larger "
                            "than the stream header says); lower max_frames or fps"
                        )
                    if size is None:
                        size = (frame.width, frame.height)
                    if (frame.width, frame.height) != size:
                        # the stream changes resolution (concatenated segments): one clip needs one frame size
                        note = f"frame size changes from {size[0]}x{size[1]} to {frame.width}x{frame.height}"
                        if not any(w.startswith(note) for w in warnings):
                            warnings.append(f"{note} at frame {i}; such frames resized to {size[0]}x{size[1]}")
                        rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                    else:
                        rgb = frame.to_ndarray(format="rgb24")
                    buffer.append((i, frame.pts, rgb))
                if i >= idx[-1]:
                    break
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{label}: cannot decode video with PyAV ({_short(e)})") from e
    if not buffer:
        raise MediaError(f"{label}: no frame could be decoded")
    yield release(certain_times(final=True), last=True)


def _short(e: Exception, limit: int = 300) -> str:
    """One-line exception text without decord's "[hh:mm:ss] /path/file.cc:123:" prefixes."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", " ".join(str(e).split()))
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
