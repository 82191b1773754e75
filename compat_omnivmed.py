"""Compatibility mode: the input path of the checkpoints that `convert_omnivmed.py` converts, reproduced.

A converted Hulu-Med / VideoLLaMA3 model computes exactly what its source computes given the same pixels and tokens
(tests/test_convert_omnivmed.py). This module makes the processor give it those pixels and tokens: the source's frame
sizes, prompt text and volume reading, selected by the image processor setting `compat_mode` that the converter saves
in the folders it writes (None: OmniV-Med's own processing, the default of our own models). The pruning rule is the
model's config.json (`convert_omnivmed.pruning_settings`); the chat template is the processor's saved template
(`chat_template(mode)`).

Modes and the published code each rule follows (no code is copied; the file and version are named at each rule):
    "hulumed"      Hulu-Med, github.com/ZJUI-AI4H/Hulu-Med at commit a0060ad (the version the reference fixtures in
                   shared/fixtures were made with): src/hulumed/model/hulumed_encoder/image_processing_hulumed.py
                   (sizes), src/hulumed/model/processor.py (chat template, placeholder expansion),
                   src/hulumed/mm_utils.py (NIfTI slices), src/hulumed/model/hulumed_arch.py (token compression).
    "videollama3"  transformers 5.24 `models/video_llama_3/`: image_processing_pil_video_llama_3.py (image sizes),
                   video_processing_video_llama_3.py (video sizes), processing_video_llama_3.py (per-frame text).
    "videollama3_remote"
                   the original VideoLLaMA3 remote code (`model_type` videollama3_qwen2, DAMO-NLP-SG/VideoLLaMA3-2B /
                   -7B), github.com/DAMO-NLP-SG/VideoLLaMA3 at commit 05cee23, inference/transformers_api/ (the copy
                   of the Hub repos' code): image_processing_videollama3.py (sizes: Hulu-Med's rules, which forked
                   them, PIL size order included), processing_videollama3.py (video file reading, placeholder
                   expansion, fps 1 / max_frames 128 defaults), the chat template its processor takes from the
                   tokenizer (the comment at VL3_SYSTEM_PROMPT), modeling_videollama3.py (token compression: the
                   converter's pruning rule).

Batches: the source processes one conversation per call and shares its token budget among the media of that call, so
the budget here is shared among the media of one prompt (`groups`), never across the prompts of a batch: a batch gives
each sample what it gives alone.
"""

import math
import os

import numpy as np

from .media_omnivmed import VIDEO_EXTENSIONS, Media, MediaError


COMPAT_MODES = ("hulumed", "videollama3", "videollama3_remote")
# spellings that select OmniV-Med's own processing explicitly (None is the default)
OFF = (None, "off", "omnivmed")


def normalize_mode(mode):
    """None for OmniV-Med's own processing, else one of COMPAT_MODES; anything else is a ValueError."""
    if mode in OFF:
        return None
    if mode not in COMPAT_MODES:
        raise ValueError(f"compat_mode must be one of {COMPAT_MODES} or None / 'off', got {mode!r}")
    return mode


# ------------------------------------------------------------------------------------------------------------ sizes
def _round(x: float) -> int:
    # Python's round (half to even), as the sources call it
    return round(x)


def _hulumed_one_budget(sides, factor, min_tokens, max_tokens, n_frames):
    """image_processing_hulumed.py (a0060ad) `simple_batched_resize`: every item of the call has one merge size; the
    pixel budget max_tokens * factor**2 is divided by the number of frames in the call (an image is one frame), then
    each item is fitted to its share (floor) and lifted to min_tokens * factor**2 (ceil); no lower bound of one block
    on the first rounding, so only the minimum keeps a side positive."""
    min_pixels = min_tokens * factor * factor
    share = (max_tokens * factor * factor) // n_frames
    out = []
    for height, width in sides:
        h_bar = _round(height / factor) * factor
        w_bar = _round(width / factor) * factor
        if h_bar * w_bar > share:
            beta = math.sqrt((height * width) / share)
            h_bar = math.floor(height / beta / factor) * factor
            w_bar = math.floor(width / beta / factor) * factor
        if h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        out.append((h_bar, w_bar))
    return out


def _hulumed_mixed_merges(sides, factors, frames, max_tokens):
    """image_processing_hulumed.py (a0060ad) `batched_resize`, used when the call mixes merge sizes (images 1, videos
    2): the call's token count at ceil-divided sides is scaled down as a whole to max_tokens (floor), else each side is
    rounded; this rule has no minimum."""
    total = sum(t * math.ceil(h / f) * math.ceil(w / f) for (h, w), f, t in zip(sides, factors, frames))
    if total > max_tokens:
        beta = math.sqrt(total / max_tokens)
        return [(math.floor(h / beta / f) * f, math.floor(w / beta / f) * f) for (h, w), f in zip(sides, factors)]
    return [(_round(h / f) * f, _round(w / f) * f) for (h, w), f in zip(sides, factors)]


def hulumed_sizes(items, patch_size, image_merge, video_merge, min_tokens, max_tokens):
    """Target (height, width, merge) of each item of ONE call. items: (kind, frames, height, width, from_pil).

    `from_pil`: the source would hold this item as PIL images (its `load_images` returns PIL for image files and for
    NIfTI slices, mm_utils.py a0060ad). image_processing_hulumed.py a0060ad reads a PIL image's `.size`, which is
    (width, height), as `height, width` (VideoLLaMA3's original of the same function reads `width, height`), so for
    such items the rule runs on exchanged sides and its result is applied as (height, width): a non-square image is
    resized to the transposed aspect ratio. Arrays (decoded video frames, numpy images) are sized as they are.

    The original VideoLLaMA3 remote code has the same two functions with the same rules, the (W, H)-as-(height, width)
    read included (inference/transformers_api/image_processing_videollama3.py at 05cee23; only the training copy,
    videollama3/model/videollama3_encoder/image_processing_videollama3.py, reads `width, height` since c28335a), and
    its processor holds image files as PIL too (processing_videollama3.py `load_images`: `Image.open(...).convert`)."""
    merges = [image_merge if kind == "image" else video_merge for kind, *_ in items]
    sides = [(w, h) if from_pil else (h, w) for _, _, h, w, from_pil in items]
    frames = [t for _, t, *_ in items]
    factors = [patch_size * m for m in merges]
    if len(set(merges)) == 1:
        sizes = _hulumed_one_budget(sides, factors[0], min_tokens, max_tokens, sum(frames))
    else:
        sizes = _hulumed_mixed_merges(sides, factors, frames, max_tokens)
    return [(h, w, m) for (h, w), m in zip(sizes, merges)]


def videollama3_smart_resize(height, width, factor, min_pixels, max_pixels):
    """transformers 5.24 video_llama_3 `smart_resize` (image_processing_pil_video_llama_3.py and
    video_processing_video_llama_3.py hold the same rule): round to the factor, then fit into max_pixels (floor, at
    least one factor) or lift to min_pixels (ceil)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height}x{width}")
    h_bar = _round(height / factor) * factor
    w_bar = _round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def videollama3_size(kind, frames, height, width, s):
    """transformers 5.24: an image by VideoLlama3ImageProcessorPil.resize (its own [min_pixels, max_pixels], merge 1);
    a video by VideoLlama3VideoProcessor.resize, whose max_pixels (size.longest_edge) is the whole clip's budget,
    divided by the clip's frame count (`size.longest_edge // videos.shape[1]`). Volumes are videos there."""
    p = s["patch_size"]
    if kind == "image":
        h, w = videollama3_smart_resize(height, width, p * s["image_merge_size"], s["min_pixels"], s["max_pixels"])
        return h, w, s["image_merge_size"]
    min_pixels = s["min_pixels"] if s["video_min_pixels"] is None else s["video_min_pixels"]
    merge = s["video_merge_size"]
    h, w = videollama3_smart_resize(height, width, p * merge, min_pixels, s["video_max_pixels"] // frames)
    return h, w, merge


def hulumed_token_budget(s) -> tuple[int, int]:
    """(min_tokens, max_tokens) of Hulu-Med's image processor (preprocessor_config.json's names there) as the converter
    saves them: min_pixels = min_tokens patches (min_tokens * patch_size**2, tokens at merge 1, whatever merge a call
    asks for), max_total_visual_tokens = max_tokens."""
    return s["min_pixels"] // (s["patch_size"] ** 2), s["max_total_visual_tokens"]


def target_sizes(mode, items, settings, groups=None):
    """(height, width, merge) for every item under `mode`; `groups`: items per prompt (None: one group), the unit
    that shares a budget. items: (kind, frames, height, width, from_pil)."""
    groups = [len(items)] if groups is None else list(groups)
    if sum(groups) != len(items):
        raise ValueError(f"groups {groups} do not cover the {len(items)} media items")
    if mode == "videollama3":
        return [videollama3_size(kind, t, h, w, settings) for kind, t, h, w, _ in items]
    # "hulumed" and "videollama3_remote": one rule (hulumed_sizes), min_tokens / max_tokens from the same settings
    min_tokens, max_tokens = hulumed_token_budget(settings)
    out, start = [], 0
    for n in groups:
        if n:
            out += hulumed_sizes(items[start : start + n], settings["patch_size"], settings["image_merge_size"],
                                 settings["video_merge_size"], min_tokens, max_tokens)  # fmt: skip
        start += n
    return out


def from_pil(media: Media) -> bool:
    """Would the source hold this item as PIL images? Image files, PIL images and NIfTI slices: yes (Hulu-Med's
    `load_images`; VideoLLaMA3's `load_images` for files, and a PIL image given directly stays PIL there); arrays,
    videos (decord / ffmpeg frames are arrays) and DICOM (which neither reads): no."""
    if media.metadata.get("compat_reader") == "hulumed_nifti" or media.metadata.get("compat_read_as_pil"):
        return True  # marked where the processor read it (a path relative to data_root included)
    if media.kind != "image":
        return False
    return media.source == "<PIL.Image>" or (isinstance(media.source, str) and os.path.isfile(media.source))


# ------------------------------------------------------------------------------------------------------------ text
def media_text(mode, kind, kept_per_frame, image_token, timestamps=None) -> str:
    """What one medium's placeholder becomes in the prompt (pruned tokens already left out, as both sources drop the
    placeholders of compressed tokens).

    hulumed (processor.py a0060ad): the chat template writes `<image>` + "\\n" for an image and, for a video (volumes
    are given as videos there), one `<image>` per frame joined by "," and ended by "\\n"; each `<image>` is then
    expanded to the frame's tokens, and hulumed_arch.py `_compress_visual_tokens` removes the pruned ones. The "\\n"
    is written by `chat_template("hulumed")` after the placeholder, so only the frames are expanded here.
    videollama3 (transformers 5.24 processing_video_llama_3.py `replace_image_token` / `replace_video_token`): an image
    is its tokens; a video is `Time {t:.1f}s:` + the frame's kept tokens per frame, joined by ","; without timestamps
    its processor assumes fps 1 (frame i at i seconds).
    videollama3_remote: `videollama3_remote_text`."""
    if mode == "hulumed":
        return ",".join(image_token * k for k in kept_per_frame)
    if mode == "videollama3_remote":
        return videollama3_remote_text(kind, kept_per_frame, image_token, timestamps)
    if kind == "image":
        return image_token * kept_per_frame[0]
    if timestamps is None or len(timestamps) != len(kept_per_frame):
        timestamps = [float(i) for i in range(len(kept_per_frame))]
    return ",".join(f"Time {t:.1f}s:" + image_token * k for k, t in zip(kept_per_frame, timestamps))


# The chat template of the original VideoLLaMA3 checkpoints (processing_videollama3.py 05cee23 takes it from the
# tokenizer, `Videollama3Qwen2Processor.__init__`; its text as published on the Hub and as copied, unchanged, by
# downstream projects; the same rules as videollama3/model/processor.py DEFAULT_CHAT_TEMPLATE of the training code):
# `<|im_start|>{role}\n` ... `<|im_end|>\n` per message; with `add_system_prompt` (False in the processor's
# `_defaults`) a system message VL3_SYSTEM_PROMPT before the first message unless it is a system one; text blocks
# verbatim; an image `<image>\n`; a video, per frame i, `Time {round(t_i, 1)}s:` when the content carries
# `timestamps`, then `<image>` followed by "," (not the last frame) or "\n" (the last); generation prompt
# `<|im_start|>assistant\n`. Each `<image>` is one FRAME there, expanded to all its tokens (`process_text`); token
# compression then drops the placeholders of compressed tokens with them (modeling_videollama3.py
# `_compress_visual_tokens`), so the prompt the LLM reads is the one written here with pruned tokens left out.
# Not reproduced: its "stream" role (`<|stream_start|>` / `<|stream_end|>`, a streaming training format).
VL3_SYSTEM_PROMPT = (
    "You are VideoLLaMA3 created by Alibaba DAMO Academy, a helpful assistant to help people understand images and "
    "videos."
)


def videollama3_remote_text(kind, kept_per_frame, image_token, timestamps=None) -> str:
    """A medium's expansion in the original VideoLLaMA3's prompt (the template's "\\n" after it is
    `chat_template`'s). Timestamps are written as Jinja's `t | round(1) | string` writes them (Python's round and
    str: "0.0", "1.5", "12.3"), and only where the medium has them (its template tests `'timestamps' in content`):
    video files read by `read_videollama3_video` and `Media` given with timestamps_s; frames given as an array carry
    none there either."""
    if kind == "image":
        return image_token * kept_per_frame[0]
    if timestamps is None or len(timestamps) != len(kept_per_frame):
        return ",".join(image_token * k for k in kept_per_frame)
    return ",".join(f"Time {round(float(t), 1)}s:" + image_token * k for k, t in zip(kept_per_frame, timestamps))


def chat_template(mode) -> str:
    """The source's conversation format as a template of ours: each media block is ONE `<|image_pad|>`, which the
    processor expands with `media_text`.

    hulumed (processor.py a0060ad DEFAULT_CHAT_TEMPLATE, rendered with transformers' trim_blocks / lstrip_blocks):
    `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, no system message unless given, text blocks verbatim,
    a medium as its placeholder + "\\n", `<|im_start|>assistant\\n` as the generation prompt. For images and text the
    rendered string is theirs with `<image>` spelled `<|image_pad|>`; their video's per-frame list is one placeholder
    here until the processor expands it.
    videollama3: the same ChatML frame (UNVERIFIED: the checkpoints' own chat_template.jinja is on the Hub, not in
    transformers, and was not available here).
    videollama3_remote: the rules at VL3_SYSTEM_PROMPT (the same frame as Hulu-Med's, which forked it; a medium is
    followed by "\\n"; its default system prompt only with `add_system_prompt=True`, its processor's default being
    False)."""
    mode = normalize_mode(mode)
    after_medium = "\\n" if mode in ("hulumed", "videollama3_remote") else ""
    system = ""
    if mode == "videollama3_remote":
        system = ("{%- if add_system_prompt and loop.first and message['role'] != 'system' -%}"
                  "{{- '<|im_start|>system\\n" + VL3_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
                  "{%- endif -%}")  # fmt: skip
    return (
        "{%- macro render_content(content) -%}"
        "{%- if content is string -%}"
        "{{- content -}}"
        "{%- else -%}"
        "{%- for block in content -%}"
        "{%- if block['type'] in ['image', 'video', 'volume'] -%}"
        "{{- '<|image_pad|>" + after_medium + "' -}}"
        "{%- elif block['type'] == 'text' -%}"
        "{{- block['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}"
        "{%- for message in messages -%}"
        + system
        + "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}"
        "{{- render_content(message['content']) + '<|im_end|>' -}}"
        "{%- endgeneration -%}"
        "{{- '\\n' -}}"
        "{%- else -%}"
        "{{- render_content(message['content']) + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )


# ------------------------------------------------------------------------------------------------------------ volumes
HULUMED_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # mm_utils.py a0060ad slice_nifti_to_images' axis_map


def is_nifti_path(item) -> bool:
    if not isinstance(item, (str, os.PathLike)):
        return False
    name = os.fspath(item).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_hulumed_nifti(path, num_slices: int, axis: str | int = "axial") -> Media:
    """A NIfTI volume as Hulu-Med reads it (mm_utils.py a0060ad `slice_nifti_to_images`): nibabel `get_fdata()` (scale
    slope / intercept applied) in the file's own voxel order (no reorientation), `num_slices` indices
    `np.linspace(0, n - 1, num_slices, dtype=int)` along the axis (indices repeat when num_slices > n), each slice
    min-max scaled to [0, 255] on its own (a constant slice is left as is) and cast to uint8 (truncation), then the
    same grey value in R, G and B. Frames are that uint8 / 255.

    Where theirs prints an error and returns no slices (a missing file, a 4D volume), this raises a ValueError that
    names the file."""
    try:
        import nibabel as nib
    except ImportError as error:  # pragma: no cover - nibabel is a requirement
        raise ImportError("reading NIfTI needs nibabel: pip install nibabel") from error
    label = os.fspath(path)
    axis_index = HULUMED_AXES.get(axis, axis) if isinstance(axis, str) else int(axis)
    if axis_index not in (0, 1, 2):
        raise ValueError(f"{label}: slice axis must be one of {sorted(HULUMED_AXES)} or 0, 1, 2, got {axis!r}")
    if num_slices < 1:
        raise ValueError(f"{label}: the number of slices must be >= 1, got {num_slices}")
    if not os.path.isfile(label):
        raise MediaError(f"{label}: no such file")
    try:
        data = nib.load(label).get_fdata()
    except Exception as error:  # nibabel raises many types for a broken file
        raise MediaError(f"{label}: not a readable NIfTI file ({error})") from error
    if data.ndim != 3:
        raise MediaError(f"{label}: Hulu-Med's reader takes 3D volumes, this one has shape {data.shape}")
    if not np.isfinite(data).all():
        raise MediaError(f"{label}: the volume holds NaN or infinite values")
    indices = np.linspace(0, data.shape[axis_index] - 1, num_slices, dtype=int)
    frames = []
    for index in indices:
        plane = np.take(data, int(index), axis=axis_index)
        lo, hi = plane.min(), plane.max()
        if hi > lo:
            plane = (plane - lo) / (hi - lo) * 255.0
        else:
            # theirs casts a constant slice's raw value; values outside 0..255 have no defined uint8, refuse them
            if lo < 0 or lo > 255:
                raise MediaError(f"{label}: slice {int(index)} is constant at {lo}, which Hulu-Med's reader cannot "
                                 "cast to 8 bits")  # fmt: skip
        frames.append(plane.astype(np.uint8))
    gray = np.stack(frames).astype(np.float32) / np.float32(255.0)
    return Media(
        frames=np.repeat(gray[..., None], 3, axis=-1),
        kind="volume",
        source=label,
        slice_indices=[int(i) for i in indices],
        metadata={"compat_reader": "hulumed_nifti", "axis": int(axis_index)},
    )


# ------------------------------------------------------------------------------------------------------------ videos
def is_video_path(item) -> bool:
    return isinstance(item, (str, os.PathLike)) and os.fspath(item).lower().endswith(VIDEO_EXTENSIONS)


def read_hulumed_video(path, fps: float | None, max_frames: int | None) -> Media:
    """A video file as Hulu-Med reads it (mm_utils.py a0060ad `load_video`, no start / end time): decord, every
    `max(1, int(avg_fps / fps))`-th frame from frame 0; when that is more than max_frames,
    `np.linspace(0, n - 1, max_frames, dtype=int)` instead; timestamps index / avg_fps. Frames are the decoded uint8 /
    255."""
    label = os.fspath(path)
    if not os.path.isfile(label):
        raise MediaError(f"{label}: no such file")
    try:
        import decord

        reader = decord.VideoReader(label, ctx=decord.cpu(0))
        video_fps, total = float(reader.get_avg_fps()), len(reader)
    except Exception as error:  # decord raises its own error types for unreadable files
        raise MediaError(f"{label}: decord cannot read this video ({error})") from error
    if total < 1:
        raise MediaError(f"{label}: the video has no frames")
    indices = list(range(total))
    if fps is not None:
        indices = indices[:: max(1, int(video_fps / fps))]
    if max_frames is not None and len(indices) > max_frames:
        indices = [int(i) for i in np.linspace(0, total - 1, max_frames, dtype=int)]
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as error:
        raise MediaError(f"{label}: decord cannot decode frames {indices[:3]}... ({error})") from error
    return Media(
        frames=frames.astype(np.float32) / np.float32(255.0),
        kind="video",
        source=label,
        timestamps_s=[i / video_fps for i in indices],
        metadata={"compat_reader": "hulumed_video", "frame_indices": indices, "fps_native": video_fps},
    )


def _fps_filter_picks(pts_s: list[float], end_s: float, fps: float) -> list[int]:
    """Which decoded frames libavfilter's `fps` filter with `round=down` outputs (vf_fps.c): each frame's time is
    rescaled to the output time base 1/fps rounding DOWN; output tick n (n = first tick, first + 1, ...) carries the
    last frame whose rescaled time is <= n (earlier ones are dropped, a frame is repeated while no later one arrives);
    at end of stream ticks continue while n < the end time rescaled with rounding to nearest (its default
    eof_action=round), the end being the last frame's time plus its duration. Times are relative to the stream's
    start, as ffmpeg's command line feeds them (no -copyts)."""
    ticks = [math.floor(t * fps + 1e-9) for t in pts_s]  # 1e-9: pts / time_base products that are exact in ffmpeg
    end_tick = math.floor(end_s * fps + 0.5)
    picks, frame, n = [], 0, ticks[0]
    while n < end_tick:
        while frame + 1 < len(ticks) and ticks[frame + 1] <= n:
            frame += 1
        picks.append(frame)
        n += 1
    return picks


def read_videollama3_video(path, fps: float | None, max_frames: int | None) -> Media:
    """A video file as the original VideoLLaMA3 processor reads it (processing_videollama3.py 05cee23
    `Videollama3Qwen2Processor.load_video`, no start / end time): ffmpeg decodes the whole stream through the `fps`
    filter (`fps=fps, round="down"`, `_fps_filter_picks`) to rgb24; timestamps are NOT the frames' own times but
    `np.arange(start, start + duration + 1 / fps, 1 / fps)[:n]` (start: the video stream's start_time, duration: the
    container's); with more than max_frames frames, `np.linspace(0, n - 1, max_frames, dtype=int)` of them and of
    their timestamps; without fps, every frame and `np.linspace(start, start + duration, n)`. Decoded here with PyAV
    (FFmpeg's own libraries), frames uint8 / 255. Directories of frames and GIFs (its `load_video_from_ids`) are not
    reproduced: they go through OmniV-Med's reader."""
    label = os.fspath(path)
    if not os.path.isfile(label):
        raise MediaError(f"{label}: no such file")
    if fps is not None and fps <= 0:
        raise ValueError(f"{label}: fps must be > 0, got {fps}")
    try:
        import av

        with av.open(label) as container:
            if not container.streams.video:
                raise MediaError(f"{label}: the file has no video stream")
            stream = container.streams.video[0]
            base = stream.time_base
            start = float(stream.start_time * base) if stream.start_time is not None else 0.0
            duration = container.duration / av.time_base if container.duration is not None else None
            decoded = [(frame.pts, frame.duration, frame.to_ndarray(format="rgb24"))
                       for frame in container.decode(stream)]  # fmt: skip
    except MediaError:
        raise
    except Exception as error:  # PyAV raises its own error types for unreadable files
        raise MediaError(f"{label}: FFmpeg (PyAV) cannot read this video ({error})") from error
    if not decoded:
        raise MediaError(f"{label}: the video has no frames")
    if duration is None:
        raise MediaError(f"{label}: the container does not state its duration, which VideoLLaMA3's reader needs")
    decoded.sort(key=lambda item: item[0])
    first = decoded[0][0]
    times = [float((pts - first) * base) for pts, _, _ in decoded]
    if fps is not None:
        last_pts, last_duration, _ = decoded[-1]
        frame_time = float(last_duration * base) if last_duration else (times[-1] / max(1, len(times) - 1))
        indices = _fps_filter_picks(times, times[-1] + frame_time, fps)
        timestamps = np.arange(start, start + duration + 1 / fps, 1 / fps)[: len(indices)]
    else:
        indices = list(range(len(decoded)))
        timestamps = np.linspace(start, start + duration, len(indices))
    if max_frames is not None and len(indices) > max_frames:
        keep = np.linspace(0, len(indices) - 1, max_frames, dtype=int)
        indices, timestamps = [indices[i] for i in keep], timestamps[keep]
    frames = np.stack([decoded[i][2] for i in indices])
    return Media(
        frames=frames.astype(np.float32) / np.float32(255.0),
        kind="video",
        source=label,
        timestamps_s=[float(t) for t in timestamps],
        metadata={"compat_reader": "videollama3_video", "frame_indices": indices, "fps_sampled": fps},
    )


def compat_load(mode, item, kind, load_kwargs, load) -> Media | None:
    """The source's own reader for `item` under `mode`, or None where OmniV-Med's `load` (load_media) reads it as the
    source would. Image files and PIL images are marked as PIL-held (`from_pil`). load_kwargs: the processor's
    LOAD_SETTINGS and options for this item."""
    if mode not in ("hulumed", "videollama3_remote"):
        return None
    if mode == "hulumed":
        # NIfTI (no reorientation, per-slice min-max, max_slices evenly spaced slices) and video files (every
        # int(native / fps)-th frame, at most max_frames)
        if is_nifti_path(item) and kind in (None, "volume"):
            return read_hulumed_nifti(item, load_kwargs["max_slices"], load_kwargs["slice_axis"])
        if is_video_path(item) and kind in (None, "video"):
            return read_hulumed_video(item, load_kwargs["fps"], load_kwargs["max_frames"])
    elif is_video_path(item) and kind in (None, "video"):
        return read_videollama3_video(item, load_kwargs["fps"], load_kwargs["max_frames"])
    frames_given = kind in (None, "video") and isinstance(item, (list, tuple, np.ndarray))
    if frames_given and len(item) > load_kwargs["max_frames"]:
        # frames given as such are never sampled there (max_frames applies to its file readers only)
        load_kwargs = {**load_kwargs, "max_frames": len(item)}
    media = load(item, kind=kind, **load_kwargs)
    # an image file or PIL image is a PIL image in the source, which sizes it differently (from_pil); DICOM, which the
    # source does not read, and VideoLLaMA3 volumes (it has no volume reader: OmniV-Med's, given as frames) are arrays
    if media.kind == "image" and (isinstance(item, str) or type(item).__module__.startswith("PIL.")):
        media.metadata["compat_read_as_pil"] = True
    return media
