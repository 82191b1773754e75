"""OmniV-Med processing: media -> patches, positions and keep mask (image processor), text -> expanded placeholders
(processor), conversations -> ChatML prompts (chat template).

One code path for 2D images, 3D volumes and videos. An item is T frames (T = 1 for a 2D image, slices for a volume,
sampled frames for a video), all resized to the same (H, W); the kinds differ only in T, in the merge size
(`image_merge_size` for 2D images, `video_merge_size` for volumes and videos) and in the per-frame pixel budget
(`max_pixels` for 2D images, `video_max_pixels` per slice/frame).

Patch layout (what the model and `pruning_omnivmed` rely on):
    pixel_values[n] is one p x p patch flattened in (C, p, p) order (a Conv2d patch embedding of shape (D, 3, p, p)
    is the same Linear); within a frame, patches come in merge-block order: for each block row, for each block
    column, the merge x merge patches of the block row by row. So one LLM visual token = `merge**2` consecutive rows.
    patch_positions[n] = (t, h, w): frame index within the item, patch row, patch column (not divided by merge).

Text format: each medium is ONE `<|image_pad|>` between `<|vision_start|>` and `<|vision_end|>` in the prompt; the
processor expands it to the number of visual tokens the model produces after pruning: `<|image_pad|>` * kept for a 2D
image, and for a volume/video, per slice/frame f, `<|frame_sep|>` followed by `<|image_pad|>` * kept(f). The frame
separators let the LLM tell which slice/frame each visual token came from (a frame whose tokens were all pruned
cannot happen: every frame keeps >= `prune_min_tokens` >= 1 tokens).

Streaming (`OmniVMedImageProcessor.iter_video_chunks`): a long video is decoded, patched and pruned a chunk of frames
at a time, with the rows of the one-shot call (frame index and pruning reference continue across chunk borders);
`OmniVMedModel.encode_video_chunks` encodes the chunks and `OmniVMedProcessor.prompt_inputs` expands a prompt to them.

Compatibility mode (`compat_mode` "hulumed" / "videollama3" / "videollama3_remote", saved by `convert_omnivmed.py`
in the folders it writes): frame sizes, a medium's prompt text and the source's volume / video file reading follow the
source instead, as `compat_omnivmed.py` documents; the hooks here only route to it.
"""

import bisect
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.configuration_utils import PreTrainedConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs, ProcessorMixin, TextKwargs
from transformers.utils import logging
from transformers.utils.chat_template_utils import render_jinja_template

from .collator_omnivmed import OmniVMedCollator
from .compat_omnivmed import compat_load, from_pil, media_text, normalize_mode, target_sizes
from .configuration_omnivmed import PROCESSOR_SETTINGS, OmniVMedConfig
from .media_omnivmed import Media, MediaError, load_media, load_video_chunks, media_chunks
from .pruning_omnivmed import (
    compute_keep_mask,
    compute_keep_mask_chunk,
    patch_grid_positions,
    pruning_report,
    tokens_per_frame,
)


logger = logging.get_logger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"
FRAME_TOKEN = "<|frame_sep|>"
# the special tokens of an OmniV-Med tokenizer, in the id order of the tiny offline tokenizer (ids 0..6)
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_TOKEN, FRAME_TOKEN]
DEFAULT_SYSTEM_PROMPT = "You are a helpful medical imaging assistant."
MEDIA_KINDS = ("image", "volume", "video")
CHAT_ROLES = ("system", "user", "assistant")
# Private-use characters that bracket a control token written in user text (see `_mark`); what lies between them is
# tokenised as plain text, never as the added token.
_MARK_START, _MARK_END = "\ue000", "\ue001"
_PLACEHOLDER_OR_MARKED = re.compile(f"{_MARK_START}[^{_MARK_START}{_MARK_END}]*{_MARK_END}|[{_MARK_START}{_MARK_END}]|"
                                    + re.escape(IMAGE_TOKEN))  # fmt: skip

# Qwen2.5-style ChatML. A media block (type image / video / volume) renders as ONE placeholder that the processor
# expands; no timestamps or slice positions are written into the text (they travel in `media_metadata`).
# `{% generation %}` marks the assistant reply (with its closing <|im_end|>) for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}"
    "{{- content -}}"
    "{%- else -%}"
    "{%- for block in content -%}"
    "{%- if block['type'] in ['image', 'video', 'volume'] -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif block['type'] == 'text' -%}"
    "{{- block['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
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


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's rule: the (height, width) closest to the input whose sides are multiples of `factor`, whose area lies
    in [min_pixels, max_pixels] (as far as multiples of `factor` allow) and whose aspect ratio is kept."""
    if min(height, width) < 1:
        raise ValueError(f"image sides must be >= 1 pixel, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class OmniVMedImagesKwargs(ImagesKwargs, total=False):
    """Settings of `OmniVMedImageProcessor` that `from_pretrained(..., key=value)` may override."""

    patch_size: int
    image_merge_size: int
    video_merge_size: int
    min_pixels: int
    max_pixels: int
    video_min_pixels: int | None
    video_max_pixels: int
    resize_backend: str
    max_total_visual_tokens: int
    prune_threshold: float
    prune_reference: str
    prune_unit: str
    prune_keep_first_frame: bool
    prune_min_tokens: int
    prune_min_tokens_pick: str
    window: str | list | None
    slice_axis: str
    min_slice_spacing_mm: float | None
    max_slices: int
    fps: float
    max_frames: int
    percentiles: list[float]
    compat_mode: str | None


# settings a call may override (all saved); LOAD_SETTINGS are forwarded to `load_media`
SETTINGS = tuple(k for k in OmniVMedImagesKwargs.__annotations__ if k not in ImagesKwargs.__annotations__) + (
    "resample",
    "image_mean",
    "image_std",
)
LOAD_SETTINGS = ("window", "slice_axis", "min_slice_spacing_mm", "max_slices", "fps", "max_frames", "percentiles")
# per-call / per-item `load_media` options that are not saved settings
LOAD_OPTIONS = ("data_root", "modality", "volume_index", "series_uid", "video_backend", "nan_policy")
# resample names (and PIL's integer codes) -> torch interpolate modes
_RESAMPLE = {
    "bicubic": "bicubic",
    "bilinear": "bilinear",
    "nearest": "nearest",
    3: "bicubic",
    2: "bilinear",
    0: "nearest",
}


def _plain(value):
    """numpy values -> python (metadata is returned as plain data)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _pil_resize(frames: np.ndarray, h: int, w: int, resample: str) -> np.ndarray:
    """(n, H, W, 3) float in [0, 1] -> (n, h, w, 3) float32 through uint8 Pillow, as transformers' processors do."""
    from PIL import Image

    codes = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    code = codes[_RESAMPLE[resample]]
    out = np.empty((frames.shape[0], h, w, 3), dtype=np.float32)
    for i, frame in enumerate(frames):
        image = Image.fromarray(np.clip(np.round(frame * 255.0), 0, 255).astype(np.uint8))
        if image.size != (w, h):
            image = image.resize((w, h), resample=code)
        out[i] = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    return out


def _is_gray(frames: np.ndarray) -> bool:
    """All three channels equal (the first frame is checked first, so colour input costs almost nothing)."""
    first = frames[:1]
    if not (np.array_equal(first[..., 0], first[..., 1]) and np.array_equal(first[..., 0], first[..., 2])):
        return False
    return bool(np.array_equal(frames[..., 0], frames[..., 1]) and np.array_equal(frames[..., 0], frames[..., 2]))


class OmniVMedImageProcessor(BaseImageProcessor):
    r"""
    Turns media items into the packed visual inputs of OmniV-Med.

    Resizing: all frames of an item go to one (H, W) chosen by `smart_resize` with factor `patch_size * merge` within
    [`min_pixels`, `max_pixels`] (2D images) or [`min_pixels`, `video_max_pixels`] (each slice/frame of a volume or
    video). Frames arrive as float32 in [0, 1] (rescaling and intensity windowing happen in media loading) and are
    resized in float32 with `torch.nn.functional.interpolate(mode=resample, antialias=True)` (deterministic on CPU; no
    8-bit quantisation, so 16-bit dynamic range survives), then clamped to [0, 1] (bicubic overshoot). A frame already
    at the target size is not resampled at all. Then `(x - image_mean) / image_std`.
    `resize_backend="pil"` instead rounds each frame to uint8 and resizes it with Pillow, then rescales by 1/255: what
    transformers' image processors do with uint8 inputs, so converted checkpoints (Hulu-Med, VideoLLaMA3) see the
    pixels they were trained on.

    Args:
        patch_size: side of a square patch in pixels.
        image_merge_size / video_merge_size: merge x merge patches form one LLM visual token (2D images / volumes and
            videos).
        min_pixels / max_pixels / video_max_pixels: per-frame pixel bounds (see above); video_min_pixels: the lower
            bound for slices/frames when it differs from 2D images (None: min_pixels).
        resize_backend: "torch" (float, default) or "pil" (uint8 Pillow, for converted checkpoints).
        max_total_visual_tokens: most LLM visual tokens (before pruning, all frames) one item may produce; checked
            before any patch is allocated.
        prune_threshold / prune_reference / prune_unit / prune_keep_first_frame / prune_min_tokens /
            prune_min_tokens_pick: the pruning rule of `pruning_omnivmed.compute_keep_mask` (threshold 0 disables
            pruning; 2D images are never pruned). `from_pretrained` on a model folder takes these and image_mean /
            image_std from its config.json, the one source the model shares (`OmniVMedConfig.processor_settings`);
            saved beside that config.json, the processor files do not repeat the pruning rule.
        window, slice_axis, min_slice_spacing_mm, max_slices, fps, max_frames, percentiles: forwarded to
            `media_omnivmed.load_media` when an item is not a `Media` (a path, DICOM folder, PIL image, array).
        resample: "bicubic" (default), "bilinear" or "nearest".
        image_mean / image_std: per-channel normalisation (SigLIP: 0.5 / 0.5).
        compat_mode: None (OmniV-Med's processing) or "hulumed" / "videollama3" / "videollama3_remote": the source's
            frame sizes (a budget shared among the media of one prompt), per-frame prompt text and file readers, as
            `compat_omnivmed` documents; converted folders save it. "off" selects our processing explicitly.

    Call: `processor(media, kind=None, return_tensors=None, **overrides)` -> `BatchFeature` with
        pixel_values (N_patches, 3 * p * p) float32, patch_positions (N_patches, 3) int64 (t, h, w),
        grid_thw (n_items, 3) int64, merge_sizes (n_items,) int64, visual_keep_mask (N_tokens,) bool and
        media_metadata (a list of one dict per item; never converted to tensors).
    """

    model_input_names = ["pixel_values", "patch_positions", "grid_thw", "merge_sizes", "visual_keep_mask"]
    valid_kwargs = OmniVMedImagesKwargs

    def __init__(
        self,
        patch_size: int = 14,
        image_merge_size: int = 2,
        video_merge_size: int = 2,
        min_pixels: int = 56 * 56,
        max_pixels: int = 448 * 448,
        video_min_pixels: int | None = None,
        video_max_pixels: int = 224 * 224,
        resize_backend: str = "torch",
        max_total_visual_tokens: int = 16384,
        prune_threshold: float = 0.1,
        prune_reference: str = "last_kept",
        prune_unit: str = "normalized",
        prune_keep_first_frame: bool = True,
        prune_min_tokens: int = 1,
        prune_min_tokens_pick: str = "most_changed",
        window: str | list | None = None,
        slice_axis: str = "axial",
        min_slice_spacing_mm: float | None = None,
        max_slices: int = 64,
        fps: float = 1.0,
        max_frames: int = 64,
        percentiles: list[float] = (0.5, 99.5),
        resample: str = "bicubic",
        image_mean: list[float] = (0.5, 0.5, 0.5),
        image_std: list[float] = (0.5, 0.5, 0.5),
        compat_mode: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.image_merge_size = int(image_merge_size)
        self.video_merge_size = int(video_merge_size)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.video_min_pixels = None if video_min_pixels is None else int(video_min_pixels)
        self.video_max_pixels = int(video_max_pixels)
        self.resize_backend = resize_backend
        self.max_total_visual_tokens = int(max_total_visual_tokens)
        self.prune_threshold = float(prune_threshold)
        self.prune_reference = prune_reference
        self.prune_unit = prune_unit
        self.prune_keep_first_frame = bool(prune_keep_first_frame)
        self.prune_min_tokens = int(prune_min_tokens)
        self.prune_min_tokens_pick = prune_min_tokens_pick
        self.window = list(window) if isinstance(window, tuple) else window
        self.slice_axis = slice_axis
        self.min_slice_spacing_mm = None if min_slice_spacing_mm is None else float(min_slice_spacing_mm)
        self.max_slices = int(max_slices)
        self.fps = float(fps)
        self.max_frames = int(max_frames)
        self.percentiles = [float(p) for p in percentiles]
        self.resample = resample
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.compat_mode = normalize_mode(compat_mode)
        self._check_settings(self._settings())

    # ------------------------------------------------------------------------------------------- loading and saving
    @classmethod
    def get_image_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        # the pruning rule and image_mean / image_std come from the folder's config.json, the model's one source
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        subfolder = kwargs.get("subfolder", "")
        image_processor_dict, kwargs = super().get_image_processor_dict(pretrained_model_name_or_path, **kwargs)
        folder = (pretrained_model_name_or_path, subfolder, hub_kwargs)
        return with_model_settings(image_processor_dict, *folder), kwargs

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        check_against_model_config(self, save_directory)
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        drop_model_settings(save_directory)
        return files

    # ---------------------------------------------------------------------------------------------------------- setup
    def _settings(self, **overrides) -> dict:
        unknown = set(overrides) - set(SETTINGS)
        if unknown:
            raise TypeError(f"Unknown image processor argument(s) {sorted(unknown)}; valid ones: {list(SETTINGS)}")
        settings = {name: getattr(self, name) for name in SETTINGS}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return settings

    @staticmethod
    def _check_settings(s: dict):
        if s["patch_size"] < 1 or min(s["image_merge_size"], s["video_merge_size"]) < 1:
            raise ValueError("patch_size and merge sizes must be >= 1")
        if s["min_pixels"] > min(s["max_pixels"], s["video_max_pixels"]):
            raise ValueError(
                f"min_pixels ({s['min_pixels']}) exceeds max_pixels ({s['max_pixels']}) or video_max_pixels "
                f"({s['video_max_pixels']})"
            )
        if s["video_min_pixels"] is not None and s["video_min_pixels"] > s["video_max_pixels"]:
            raise ValueError(
                f"video_min_pixels ({s['video_min_pixels']}) exceeds video_max_pixels ({s['video_max_pixels']})"
            )
        if s["resample"] not in _RESAMPLE:
            raise ValueError(f"resample must be one of 'bicubic', 'bilinear', 'nearest', got {s['resample']!r}")
        if s["resize_backend"] not in ("torch", "pil"):
            raise ValueError(f"resize_backend must be 'torch' or 'pil', got {s['resize_backend']!r}")
        if len(s["image_mean"]) != 3 or len(s["image_std"]) != 3 or min(s["image_std"]) <= 0:
            raise ValueError("image_mean and image_std must be 3 values each, std > 0")
        if s["prune_threshold"] < 0:
            raise ValueError(f"prune_threshold must be >= 0, got {s['prune_threshold']}")
        if s["prune_min_tokens"] < 1:
            raise ValueError("prune_min_tokens must be >= 1 (every frame keeps at least one token)")
        normalize_mode(s["compat_mode"])

    def get_resized_size(self, height: int, width: int, kind: str = "image", **overrides) -> tuple[int, int, int]:
        """(resized height, resized width, merge size) of a frame of `kind` under the current settings."""
        s = self._settings(**overrides)
        merge = s["image_merge_size"] if kind == "image" else s["video_merge_size"]
        max_pixels = s["max_pixels"] if kind == "image" else s["video_max_pixels"]
        min_pixels = s["min_pixels"] if kind == "image" or s["video_min_pixels"] is None else s["video_min_pixels"]
        factor = s["patch_size"] * merge
        h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
        return h, w, merge

    # --------------------------------------------------------------------------------------------------------- inputs
    def to_media(self, item: Any, kind: str | None = None, **options) -> Media:
        """Turn one input into a `Media`: a `Media` is returned as is; a content block dict
        `{"type": kind, kind | "path": source, **load options}` is unpacked; anything else (a path, a DICOM folder, a
        list of DICOM files, a PIL image, an array or tensor) goes through `load_media` with this processor's load
        settings, overridden by `options` (any of LOAD_SETTINGS and LOAD_OPTIONS)."""
        unknown = set(options) - set(SETTINGS) - set(LOAD_OPTIONS)
        if unknown:
            raise TypeError(f"unknown media option(s) {sorted(unknown)}")
        if isinstance(item, Media):
            if kind is not None and item.kind != kind:
                raise ValueError(f"{item.source}: passed as a {kind} but it is a {item.kind}")
            return item
        if isinstance(item, dict):
            source, block_kind, block = _unpack_block(item, kind)
            return self.to_media(source, kind=block_kind, **{**options, **block})
        load_kwargs = self._load_kwargs(options)
        if isinstance(item, os.PathLike):
            item = os.fspath(item)
        # compatibility mode: the source's own readers where it has them (compat_omnivmed.compat_load)
        media = compat_load(normalize_mode(options.get("compat_mode", self.compat_mode)), item, kind, load_kwargs,
                            load_media)  # fmt: skip
        return media if media is not None else load_media(item, kind=kind, **load_kwargs)

    def _load_kwargs(self, options: dict) -> dict:
        """`load_media` keywords: this processor's load settings overridden by `options`, plus the load options."""
        load_kwargs = {name: options.get(name, getattr(self, name)) for name in LOAD_SETTINGS}
        load_kwargs.update({k: options[k] for k in LOAD_OPTIONS if options.get(k) is not None})
        return load_kwargs

    @staticmethod
    def _validated_frames(media: Media) -> np.ndarray:
        frames = media.frames
        name = media.source
        if media.kind not in MEDIA_KINDS:
            raise ValueError(f"{name}: kind must be one of {MEDIA_KINDS}, got {media.kind!r}")
        if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
            shape = getattr(frames, "shape", type(frames).__name__)
            raise ValueError(f"{name}: frames must be a (T, H, W, 3) float array in [0, 1], got {shape}")
        if not np.issubdtype(frames.dtype, np.floating):
            raise ValueError(f"{name}: frames must be float in [0, 1], got dtype {frames.dtype}")
        if media.kind == "image" and frames.shape[0] != 1:
            raise ValueError(f"{name}: a 2D image has one frame, got {frames.shape[0]}")
        lo, hi = float(frames.min()), float(frames.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name}: frames contain NaN or infinite values")
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{name}: frames must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        return frames

    # ----------------------------------------------------------------------------------------------------- processing
    def __call__(self, media, *args, **kwargs) -> BatchFeature:
        return self.preprocess(media, *args, **kwargs)

    def preprocess(
        self,
        media,
        kind: str | None = None,
        return_tensors: str | None = None,
        groups: list[int] | None = None,
        **overrides,
    ) -> BatchFeature:
        """Process a list of media items (or one item). `kind` tells what non-`Media` inputs are (None: let
        `load_media` decide); `overrides` are per-call settings (e.g. `prune_threshold=0`, `max_frames=16`) and
        `load_media` options (LOAD_OPTIONS, e.g. `modality="CT"`). `groups`: how many consecutive items belong to each
        prompt (None: all one prompt), the unit whose media share a budget in compatibility mode."""
        s, medias = self._load_items(media, kind, overrides)
        # plan every item (validation and the token budget) before allocating any patch
        plans = self._plan(medias, s, overrides, groups)
        pixel_values, patch_positions = self._patchify(plans, s)
        p = s["patch_size"]
        grid_thw = torch.tensor([[f.shape[0], h // p, w // p] for _, f, h, w, _ in plans], dtype=torch.int64)
        grid_thw = grid_thw.reshape(-1, 3)
        merge_sizes = torch.tensor([merge for *_, merge in plans], dtype=torch.int64)
        metadata = [self._item_metadata(m, frames, h, w, merge, p) for m, frames, h, w, merge in plans]
        keep = self._keep_mask(pixel_values, grid_thw, merge_sizes, s, metadata)

        data = {
            "pixel_values": pixel_values,
            "patch_positions": patch_positions,
            "grid_thw": grid_thw,
            "merge_sizes": merge_sizes,
            "visual_keep_mask": keep,
        }
        if return_tensors != "pt":
            data = {k: v.numpy() for k, v in data.items()}
        data["media_metadata"] = metadata
        return BatchFeature(data=data, skip_tensor_conversion=["media_metadata"])

    def _load_items(self, media, kind: str | None, overrides: dict) -> tuple[dict, list[Media]]:
        """The call's settings (checked) and every item as a `Media`; load options are taken out of `overrides`."""
        load_options = {k: overrides.pop(k) for k in LOAD_OPTIONS if k in overrides}
        s = self._settings(**overrides)
        self._check_settings(s)
        items = list(media) if isinstance(media, (list, tuple)) else [media]
        load_settings = {k: v for k, v in overrides.items() if k in LOAD_SETTINGS and v is not None}
        if "compat_mode" in overrides:
            load_settings["compat_mode"] = normalize_mode(s["compat_mode"])
        return s, [self.to_media(item, kind=kind, **load_settings, **load_options) for item in items]

    def _plan(self, medias: list[Media], s: dict, overrides: dict, groups: list[int] | None = None) -> list[tuple]:
        """(media, frames, resized h, resized w, merge) per item; refuses an item over the visual-token budget. In
        compatibility mode the source's sizing rule (compat_omnivmed.target_sizes) decides the sizes, per prompt."""
        mode = normalize_mode(s["compat_mode"])
        # validated once: the check reads every value (min / max), a full pass over a long clip
        all_frames = [self._validated_frames(m) for m in medias]
        compat_sizes = None
        if mode is not None:
            shapes = [(m.kind, *frames.shape[:3], from_pil(m)) for m, frames in zip(medias, all_frames)]
            compat_sizes = target_sizes(mode, shapes, s, groups)
        plans = []
        for index, (m, frames) in enumerate(zip(medias, all_frames)):
            t, height, width = frames.shape[:3]
            try:
                if compat_sizes is None:
                    h, w, merge = self.get_resized_size(height, width, m.kind, **overrides)
                else:
                    h, w, merge = compat_sizes[index]
                    if min(h, w) < 1:
                        raise ValueError(f"the {mode} sizing rule gives a {h}x{w} frame (no pixels left): give fewer "
                                         "or smaller media in this prompt")  # fmt: skip
            except ValueError as e:  # smart_resize's size limits know nothing of the file: name it
                raise ValueError(f"media item {index} ({m.source}, {m.kind}): {e}") from e
            p = s["patch_size"]
            n_tokens = t * (h // (p * merge)) * (w // (p * merge))
            # compatibility mode: the source's own rule bounds the tokens (its minimum may exceed its budget)
            if compat_sizes is None and n_tokens > s["max_total_visual_tokens"]:
                raise ValueError(
                    f"media item {index} ({m.source}, {m.kind}, {t} frame(s) of {height}x{width} -> {h}x{w}) would "
                    f"give {n_tokens} visual tokens before pruning, more than max_total_visual_tokens="
                    f"{s['max_total_visual_tokens']}; lower max_frames / max_slices or the pixel budget "
                    f"({'max_pixels' if m.kind == 'image' else 'video_max_pixels'})"
                )
            plans.append((m, frames, h, w, merge))
        return plans

    def _patchify(self, plans: list[tuple], s: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize, normalise and cut every planned item into patches: pixel_values (N, 3*p*p) in merge-block order
        and patch_positions (N, 3) = (t, h, w), written straight into one allocation."""
        p = s["patch_size"]
        patch_dim = 3 * p * p
        n_patches = sum(frames.shape[0] * (h // p) * (w // p) for _, frames, h, w, _ in plans)
        pixel_values = torch.empty(n_patches, patch_dim, dtype=torch.float32)
        patch_positions = torch.empty(n_patches, 3, dtype=torch.int64)
        mean = torch.tensor(s["image_mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(s["image_std"], dtype=torch.float32).view(1, 3, 1, 1)
        mode = _RESAMPLE[s["resample"]]
        resize = {"mode": mode} if mode == "nearest" else {"mode": mode, "antialias": True, "align_corners": False}

        offset = 0
        for m, frames, h, w, merge in plans:
            t = frames.shape[0]
            gh, gw = h // p, w // p
            per_frame = gh * gw
            # frames in chunks so a long clip never holds two full-resolution float copies
            chunk = max(1, (1 << 24) // max(1, frames.shape[1] * frames.shape[2] * 3 + h * w * 3))
            resizing = tuple(frames.shape[1:3]) != (h, w)
            # grayscale (CT, MR, X-ray: replicated to 3 channels) is resampled once, not three times; the kernel
            # treats channels independently, so the result is the same
            gray = resizing and s["resize_backend"] == "torch" and _is_gray(frames)
            for f0 in range(0, t, chunk):
                if s["resize_backend"] == "pil":
                    x = torch.from_numpy(_pil_resize(frames[f0 : f0 + chunk], h, w, s["resample"]))
                elif gray:
                    x = torch.from_numpy(np.ascontiguousarray(frames[f0 : f0 + chunk, :, :, :1], dtype=np.float32))
                else:
                    x = torch.from_numpy(np.ascontiguousarray(frames[f0 : f0 + chunk], dtype=np.float32))
                x = x.permute(0, 3, 1, 2)  # (n, 3, H, W), or (n, 1, H, W) for grayscale
                if gray:
                    x = F.interpolate(x.contiguous(), size=(h, w), **resize).clamp_(0.0, 1.0)
                    x = (x.expand(-1, 3, -1, -1) - mean) / std
                elif x.shape[-2:] != (h, w):
                    # the resampling kernel runs ~1.5x faster on planar (n, 3, H, W) memory than on this strided view
                    x = F.interpolate(x.contiguous(), size=(h, w), **resize).clamp_(0.0, 1.0)
                    x = x.sub_(mean).div_(std)  # a fresh tensor: normalise in place
                else:
                    x = (x - mean) / std  # x may share memory with the caller's frames
                n = x.shape[0]
                # (n, C, gh/m, m, p, gw/m, m, p) -> (n, gh/m, gw/m, m, m, C, p, p): merge-block order, (C, p, p) flat,
                # copied once, straight into the output rows
                x = x.reshape(n, 3, gh // merge, merge, p, gw // merge, merge, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
                rows = slice(offset + f0 * per_frame, offset + (f0 + n) * per_frame)
                pixel_values[rows].view(x.shape).copy_(x)
            patch_positions[offset : offset + t * per_frame] = patch_grid_positions(t, gh, gw, merge)
            offset += t * per_frame
        return pixel_values, patch_positions

    @staticmethod
    def _item_metadata(m: Media, frames, h: int, w: int, merge: int, p: int) -> dict:
        t = frames.shape[0]
        return {
            "kind": m.kind,
            "source": m.source,
            "num_frames": t,
            "original_size": [int(frames.shape[1]), int(frames.shape[2])],
            "resized_size": [h, w],
            "grid_thw": [t, h // p, w // p],
            "merge_size": merge,
            "spacing_mm": _plain(m.spacing_mm),
            "slice_positions_mm": _plain(m.slice_positions_mm),
            "slice_indices": _plain(m.slice_indices),
            "timestamps_s": _plain(m.timestamps_s),
            "metadata": _plain(m.metadata),
        }

    @staticmethod
    def _keep_mask(pixel_values, grid_thw, merge_sizes, s: dict, metadata: list[dict]) -> torch.Tensor:
        """The pruning rule (pruning_omnivmed) on the patches; each item's metadata gets its pruning report."""
        keep = compute_keep_mask(pixel_values, grid_thw, merge_sizes, **OmniVMedImageProcessor._pruning_rule(s))
        reports = pruning_report(keep, grid_thw, merge_sizes)
        for item_meta, report in zip(metadata, reports):
            item_meta["pruning_report"] = report
        logger.debug("visual tokens (before, after pruning): %s", [(r["tokens_before"], r["tokens_after"]) for r in reports])
        return keep

    # ------------------------------------------------------------------------------------------------------ streaming
    def iter_video_chunks(self, video, chunk_frames: int = 64, return_tensors: str | None = None, **overrides):
        """A long video (or volume) processed a chunk of `chunk_frames` consecutive frames at a time: decoded, resized,
        cut into patches and pruned chunk by chunk, so an hour of frames never exists whole (video files are read by
        `media_omnivmed.load_video_chunks`; a `Media`, array or content block works too).

        Yields, per chunk, what `preprocess` returns for a one-item call, for that chunk's frames: pixel_values,
        patch_positions, grid_thw ((1, 3): the chunk's frames), merge_sizes, visual_keep_mask and media_metadata (one
        dict, with "chunk": first_frame, num_frames, frames_planned, last). They are exactly the rows of the one-shot
        call on the whole video: patch_positions carry the video's frame index (the time axis continues across
        chunks, so RoPE positions are the one-shot ones), and the keep mask is computed with the pruning reference
        carried across chunk borders (the video's first frame is kept whole, not each chunk's). Settings and
        overrides are `preprocess`'s; `max_total_visual_tokens` applies to the whole video's planned frames, and the
        reader's `max_voxels` to one chunk's. `join_chunk_metadata` turns the chunks' media_metadata into the one-shot
        call's. Compatibility mode is refused (its readers and budgets are the source's, made for whole clips).

        `OmniVMedModel.encode_video_chunks` turns the chunks into the video's visual features, and
        `OmniVMedProcessor.prompt_inputs` expands a prompt to them."""
        load_options = {k: overrides.pop(k) for k in LOAD_OPTIONS if k in overrides}
        s = self._settings(**overrides)
        self._check_settings(s)
        label = getattr(video, "source", None) or (os.fspath(video) if isinstance(video, (str, os.PathLike))
                                                    else type(video).__name__)  # fmt: skip
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, (int, np.integer)) or chunk_frames < 1:
            raise ValueError(f"{label}: chunk_frames must be an integer >= 1, got {chunk_frames!r}")
        if normalize_mode(s["compat_mode"]) is not None:
            raise ValueError(
                f"{label}: streaming is not available in compatibility mode ({s['compat_mode']}): the source's "
                "readers and budgets work on whole clips; process the clip in one call"
            )
        load_settings = {k: v for k, v in overrides.items() if k in LOAD_SETTINGS and v is not None}
        if isinstance(video, dict):
            video, kind, block = _unpack_block(video, None)
            if kind == "image":
                raise ValueError(f"{video}: a 2D image is one frame; stream videos or volumes")
            load_settings.update(block)
        if isinstance(video, Media):
            if video.kind not in ("video", "volume"):
                raise ValueError(f"{video.source}: only a video or volume can be streamed, not a {video.kind}")
            chunks = media_chunks(video, int(chunk_frames))
        else:
            chunks = load_video_chunks(video, int(chunk_frames), **self._load_kwargs({**load_settings, **load_options}))
        return self._process_chunks(chunks, s, overrides, return_tensors)

    def _process_chunks(self, chunks, s: dict, overrides: dict, return_tensors: str | None):
        p = s["patch_size"]
        start, carry, plan = 0, None, None
        for m in chunks:
            frames = self._validated_frames(m)
            t, height, width = frames.shape[:3]
            chunk = m.metadata.get("chunk", {})  # a Media given whole is one chunk
            planned, last = chunk.get("frames_planned", t), chunk.get("last", True)
            if plan is None:
                plan = (height, width, *self._plan_stream(m, height, width, planned, s, overrides))
            elif (height, width) != plan[:2]:
                raise ValueError(f"{m.source}: frames of {height}x{width} after frames of {plan[0]}x{plan[1]}; a "
                                 "streamed clip has one frame size")  # fmt: skip
            h, w, merge = plan[2:]
            pixel_values, patch_positions = self._patchify([(m, frames, h, w, merge)], s)
            patch_positions[:, 0] += start  # the video's frame index: the one-shot RoPE positions
            grid_thw = torch.tensor([[t, h // p, w // p]], dtype=torch.int64)
            merge_sizes = torch.tensor([merge], dtype=torch.int64)
            keep, carry = compute_keep_mask_chunk(
                pixel_values, grid_thw, merge_sizes, carry, whole_item=start == 0 and last,
                **self._pruning_rule(s),
            )  # fmt: skip
            metadata = self._item_metadata(m, frames, h, w, merge, p)
            metadata["pruning_report"] = pruning_report(keep, grid_thw, merge_sizes)[0]
            metadata["chunk"] = {"first_frame": start, "num_frames": t, "frames_planned": planned, "last": last}
            data = {"pixel_values": pixel_values, "patch_positions": patch_positions, "grid_thw": grid_thw,
                    "merge_sizes": merge_sizes, "visual_keep_mask": keep}  # fmt: skip
            if return_tensors != "pt":
                data = {k: v.numpy() for k, v in data.items()}
            data["media_metadata"] = [metadata]
            yield BatchFeature(data=data, skip_tensor_conversion=["media_metadata"])
            # nothing of this chunk stays referenced here while the next one is read
            del m, frames, pixel_values, patch_positions, data
            start += t

    def _plan_stream(self, m: Media, height: int, width: int, planned: int, s: dict, overrides: dict) -> tuple:
        """(h, w, merge) of a streamed clip's frames; refuses a clip whose planned frames exceed the token budget."""
        try:
            h, w, merge = self.get_resized_size(height, width, m.kind, **overrides)
        except ValueError as e:
            raise ValueError(f"{m.source} ({m.kind}): {e}") from e
        p = s["patch_size"]
        n_tokens = planned * (h // (p * merge)) * (w // (p * merge))
        if n_tokens > s["max_total_visual_tokens"]:
            raise ValueError(
                f"{m.source} ({m.kind}, {planned} frame(s) of {height}x{width} -> {h}x{w}) would give {n_tokens} "
                f"visual tokens before pruning, more than max_total_visual_tokens={s['max_total_visual_tokens']}; "
                "raise it for a long streamed clip, or lower max_frames or video_max_pixels"
            )
        return h, w, merge

    @staticmethod
    def join_chunk_metadata(chunks_metadata: list[dict]) -> dict:
        """The media_metadata of a streamed clip's chunks (one dict each, in order) -> the one-shot call's dict."""
        if not chunks_metadata:
            raise ValueError("join_chunk_metadata needs the metadata of at least one chunk")
        first, last = chunks_metadata[0], chunks_metadata[-1]

        def joined(key):
            values = [m[key] for m in chunks_metadata]
            return None if values[0] is None else [v for part in values for v in part]

        out = {k: v for k, v in last.items() if k != "chunk"}
        out["metadata"] = {k: v for k, v in last["metadata"].items() if k != "chunk"}
        t = sum(m["num_frames"] for m in chunks_metadata)
        out.update(num_frames=t, grid_thw=[t, *first["grid_thw"][1:]], timestamps_s=joined("timestamps_s"),
                   slice_positions_mm=joined("slice_positions_mm"), slice_indices=joined("slice_indices"))  # fmt: skip
        per_frame = [n for m in chunks_metadata for n in m["pruning_report"]["per_frame"]]
        before = sum(m["pruning_report"]["tokens_before"] for m in chunks_metadata)
        out["pruning_report"] = {"tokens_before": before, "tokens_after": sum(per_frame),
                                 "kept_fraction": sum(per_frame) / before, "per_frame": per_frame}  # fmt: skip
        return out

    @staticmethod
    def _pruning_rule(s: dict) -> dict:
        return dict(
            threshold=s["prune_threshold"],
            reference=s["prune_reference"],
            unit=s["prune_unit"],
            image_mean=s["image_mean"],
            image_std=s["image_std"],
            keep_first_frame=s["prune_keep_first_frame"],
            min_tokens=s["prune_min_tokens"],
            min_tokens_pick=s["prune_min_tokens_pick"],
        )


# the tokenizer keywords `OmniVMedProcessor.__call__` forwards
_TEXT_KWARGS = set(TextKwargs.__annotations__) - {
    "return_tensors",
    "return_mm_token_type_ids",
    "sanitize_control_tokens",
}
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")
# written to the processor files only where no OmniV-Med config.json holds them; image_mean / image_std stay in
# preprocessor_config.json for tools that read only that file (on loading, config.json's values win)
_PRUNING_SETTINGS = tuple(name for name in PROCESSOR_SETTINGS if name.startswith("prune_"))


def model_config_settings(pretrained_model_name_or_path, subfolder: str = "", hub_kwargs: dict | None = None):
    """PROCESSOR_SETTINGS as the model of this folder / Hub repo sees them (its config.json, with the config's
    defaults for keys an older file lacks), or None where there is no OmniV-Med config.json."""
    from transformers.utils import cached_file

    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isfile(path):  # a single processor JSON file: no folder, no model config
        return None
    try:
        resolved = cached_file(path, "config.json", subfolder=subfolder, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, **(hub_kwargs or {}))  # fmt: skip
    except OSError:
        return None
    if not resolved:
        return None
    with open(resolved, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != OmniVMedConfig.model_type:
        return None
    try:
        return OmniVMedConfig.from_dict(config).processor_settings()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{resolved}: not a valid OmniV-Med config ({error})") from error


def _same(a, b) -> bool:
    plain = lambda v: [float(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return plain(a) == plain(b)


def with_model_settings(image_processor_dict: dict, pretrained_model_name_or_path, subfolder="", hub_kwargs=None):
    """The saved image processor settings with PROCESSOR_SETTINGS taken from the folder's config.json.

    Folders written before config.json became their one source also carry them in the processor files. Where such a
    copy differs, config.json wins with a warning rather than an error: the model recomputes keep masks from its
    config, so a processor that followed the other copy would expand the text to a different token count (the silent
    disagreement this rule exists to end), and refusing to load would lock users out of old folders. A deliberate other
    setting stays possible explicitly (from_pretrained(..., prune_threshold=...) or per call): the processor's
    visual_keep_mask carries it to the model."""
    settings = model_config_settings(pretrained_model_name_or_path, subfolder, hub_kwargs)
    if settings is None:
        return image_processor_dict
    differ = {k: (image_processor_dict[k], v) for k, v in settings.items()
              if k in image_processor_dict and not _same(image_processor_dict[k], v)}  # fmt: skip
    if differ:
        logger.warning(
            "%s: the processor files hold pruning / normalisation settings that differ from config.json, the model's "
            "and so the one source: using config.json's (processor file -> config.json: %s)",
            pretrained_model_name_or_path,
            {k: f"{a!r} -> {b!r}" for k, (a, b) in differ.items()},
        )
    return {**image_processor_dict, **settings}


def check_against_model_config(image_processor, save_directory):
    """Saving beside an OmniV-Med config.json whose settings differ would leave the folder's processor and model
    disagreeing (the processor's copy is not written there, and would lose on loading anyway): refuse, and say how."""
    settings = model_config_settings(save_directory)
    if settings is None:
        return
    ours = {k: getattr(image_processor, k) for k in settings}
    differ = {k: (ours[k], v) for k, v in settings.items() if not _same(ours[k], v)}
    if differ:
        raise ValueError(
            f"the processor's settings {{name: (processor, config.json)}} = {differ} differ from the model's "
            f"config.json in {save_directory}, which is their one source (the model recomputes keep masks from it): "
            "set them on model.config and save the model, or pass them per call to the processor"
        )


def drop_model_settings(save_directory):
    """Remove the pruning rule from the processor files just written beside an OmniV-Med config.json, which holds it."""
    if model_config_settings(save_directory) is None:
        return
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = os.path.join(save_directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        target = data.get("image_processor", data) if name == "processor_config.json" else data
        if not isinstance(target, dict) or not any(k in target for k in _PRUNING_SETTINGS):
            continue
        for key in _PRUNING_SETTINGS:
            target.pop(key, None)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


class OmniVMedProcessor(ProcessorMixin):
    r"""
    Tokenizer + `OmniVMedImageProcessor` + ChatML chat template.

    `processor(text, media=[...])`: every `<|image_pad|>` in the text is one medium (in order of appearance across the
    batch); it is expanded to the visual tokens the model produces after pruning (see the module docstring). Returns
    input_ids, attention_mask, mm_token_type_ids (1 on `<|image_pad|>`), the image processor's tensors and
    `media_metadata`.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in (IMAGE_TOKEN, FRAME_TOKEN, VISION_START, VISION_END) if tok not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the special token(s) {missing}; add them with "
                "tokenizer.add_special_tokens({'additional_special_tokens': [...]}) and resize the embeddings"
            )
        self.image_token, self.frame_token = IMAGE_TOKEN, FRAME_TOKEN
        self.vision_start_token, self.vision_end_token = VISION_START, VISION_END
        self.image_token_id = vocab[IMAGE_TOKEN]
        self.frame_token_id = vocab[FRAME_TOKEN]
        self.vision_start_token_id = vocab[VISION_START]
        self.vision_end_token_id = vocab[VISION_END]

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + self.image_processor.model_input_names + ["mm_token_type_ids"]

    def data_collator(self, prune_threshold: float | None = None, cache_size: int = 0) -> OmniVMedCollator:
        """The training collator (collator_omnivmed.py) for this processor: rows with chat messages -> batches with
        labels on the assistant replies; give it to SFTTrainer as `data_collator`."""
        return OmniVMedCollator(self, prune_threshold=prune_threshold, cache_size=cache_size)

    # ------------------------------------------------------------------------------------------------------ loading
    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image processor is this file's class (no Auto lookup, so the folder loads with or without
        # trust_remote_code once this module is imported); settings come from processor_config.json, else
        # preprocessor_config.json, except the pruning rule and image_mean / image_std: config.json's.
        from transformers import AutoTokenizer

        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in SETTINGS}
        subfolder = kwargs.pop("subfolder", "")
        image_config = (processor_dict or {}).get("image_processor")
        hub_kwargs = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS and v is not None}
        if isinstance(image_config, dict):
            # the pruning rule and image_mean / image_std from config.json (see with_model_settings), then overrides
            image_config = with_model_settings(image_config, pretrained_model_name_or_path, subfolder, hub_kwargs)
            image_processor = OmniVMedImageProcessor.from_dict({**image_config, **overrides})
        else:
            image_processor = OmniVMedImageProcessor.from_pretrained(
                pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs, **overrides
            )
        # the tokenizer is a plain fast tokenizer: never let the config's auto_map make AutoTokenizer prompt for
        # remote code (it would block a non-interactive process)
        kwargs.setdefault("trust_remote_code", False)
        # an empty config: the tokenizer class comes from tokenizer_config.json, and AutoTokenizer would otherwise
        # read our config.json without its remote code and warn that an `omnivmed` model is loaded as another type
        kwargs.setdefault("config", PreTrainedConfig())
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # processor_config.json (image processor nested) + tokenizer + chat_template.jinja + this code, and also a
        # stand-alone preprocessor_config.json for tools that read only that file
        check_against_model_config(self.image_processor, save_directory)
        files = super().save_pretrained(save_directory)
        files = files + self.image_processor.save_pretrained(save_directory)
        drop_model_settings(save_directory)  # config.json beside them holds the pruning rule
        if push_to_hub:  # push_to_hub saves into a fresh folder through this method, so every file goes up
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            kwargs.pop("max_shard_size", None)
            self.push_to_hub(repo_id, **kwargs)
        return files

    # ------------------------------------------------------------------------------------------------------- calling
    def __call__(
        self,
        text: str | list[str] | None = None,
        media=None,
        images=None,
        videos=None,
        volumes=None,
        prune_threshold: float | None = None,
        return_tensors: str | None = None,
        padding: bool | str = True,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            text: a prompt or a batch of prompts; each medium is one `<|image_pad|>` (as the chat template writes it,
                inside `<|vision_start|>...<|vision_end|>`).
            media: the media of the whole batch in order of appearance (flat), or one list per prompt. Items: `Media`,
                paths (image files, NIfTI, DICOM folders, videos), PIL images, arrays, or content-block dicts
                `{"type": "volume", "path": ..., "window": "lung"}`.
            images / videos / volumes: the same, all of one kind (use `media` for a mix).
            prune_threshold: per-call override of the pruning threshold (0 keeps every token).
            return_tensors: "pt" for torch tensors, "np" / None for numpy (token ids as lists when None).
            padding: tokenizer padding (default True: pad to the longest, on the tokenizer's `padding_side`).
            kwargs: image processor settings (e.g. `max_frames=16`, `window="lung"`) and tokenizer arguments.

        `text` is the caller's own prompt: every placeholder and control token written in it (`<|im_end|>`,
        `<|image_pad|>`, ...) is meant and tokenised as such. Untrusted text (a pasted report, a user's message) belongs
        in a conversation given to `apply_chat_template(..., tokenize=True)`, which tokenises such strings as text.

        Length: a prompt (media expanded) longer than `max_prompt_length` (the tokenizer's `model_max_length`) is a
        ValueError; `truncation=True` (with `max_length` or that limit) cuts text on the tokenizer's
        `truncation_side` with a warning, and is a ValueError when the cut would remove a media token.
        """
        sources = {None: media, "image": images, "video": videos, "volume": volumes}
        given = [(kind, value) for kind, value in sources.items() if value is not None]
        if len(given) > 1:
            raise ValueError("pass media of mixed kinds through `media=`, in order of appearance, not several of "
                             "media / images / videos / volumes")  # fmt: skip
        kind, value = given[0] if given else (None, None)
        items, per_sample = _flatten_media(value)

        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in SETTINGS or k in LOAD_OPTIONS}
        if prune_threshold is not None:
            image_kwargs["prune_threshold"] = prune_threshold
        return_replacements = kwargs.pop("return_text_replacement_offsets", False)
        # set by apply_chat_template: the text holds user strings whose control tokens are marked (see `_mark`)
        marked = bool(kwargs.pop("sanitize_control_tokens", False))
        unknown = set(kwargs) - _TEXT_KWARGS
        if unknown:
            raise TypeError(f"Unknown argument(s) {sorted(unknown)} for {type(self).__name__}.__call__")

        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("`text` must be a string or a list of strings")
            counts = [len(_placeholder_spans(t, marked)) for t in texts]
            if per_sample is not None and (len(per_sample) != len(texts) or per_sample != counts):
                raise ValueError(
                    f"the prompts hold {counts} {IMAGE_TOKEN} placeholders per sample but the media given per sample "
                    f"number {per_sample}"
                    + _CHAT_FORMAT_HINT
                )
            if sum(counts) != len(items):
                raise ValueError(
                    f"the text holds {sum(counts)} {IMAGE_TOKEN} placeholder(s) (per sample: {counts}) but "
                    f"{len(items)} media item(s) were given"
                    + _CHAT_FORMAT_HINT
                )
        if texts is None and not items:
            raise ValueError(f"You need to provide text and/or media to call {type(self).__name__}")

        data: dict[str, Any] = {}
        replacements: list[str] = []
        if items:
            # the media of each prompt share a budget in compatibility mode
            groups = counts if texts is not None else per_sample
            visual = self.image_processor(items, kind=kind, return_tensors="pt", groups=groups, **image_kwargs)
            kept = tokens_per_frame(visual["visual_keep_mask"], visual["grid_thw"], visual["merge_sizes"])
            mode = normalize_mode(image_kwargs.get("compat_mode") or self.image_processor.compat_mode)
            for meta, per_frame in zip(visual["media_metadata"], kept):
                if mode is not None:
                    replacements.append(media_text(mode, meta["kind"], per_frame, IMAGE_TOKEN, meta["timestamps_s"]))
                else:
                    replacements.append(_media_tokens(meta["kind"], per_frame))
            data.update(visual)

        if texts is not None:
            expanded, offsets = _expand_placeholders(texts, replacements, marked)
            text_inputs = self._tokenize(expanded, marked, padding=padding, **kwargs)
            data.update(text_inputs)
            input_ids = text_inputs["input_ids"]
            data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in ids] for ids in input_ids]
            n_placeholders = sum(sum(row) for row in data["mm_token_type_ids"])
            if items and n_placeholders != int(data["visual_keep_mask"].sum()):
                raise ValueError(
                    f"the tokenized text holds {n_placeholders} {IMAGE_TOKEN} tokens but the media give "
                    f"{int(data['visual_keep_mask'].sum())} visual tokens (was the text truncated?)"
                )
            if return_replacements:
                data["text_replacement_offsets"] = offsets

        if return_tensors != "pt" and items:
            for key in self.image_processor.model_input_names:
                data[key] = data[key].numpy()
        return BatchFeature(
            data, tensor_type=return_tensors, skip_tensor_conversion=["media_metadata", "text_replacement_offsets"]
        )

    def iter_video_chunks(self, video, chunk_frames: int = 64, return_tensors: str | None = None, **overrides):
        """The image processor's `OmniVMedImageProcessor.iter_video_chunks`: a long video, a chunk at a time."""
        return self.image_processor.iter_video_chunks(video, chunk_frames, return_tensors=return_tensors, **overrides)

    def prompt_inputs(self, text, visual, kinds: str | list[str] = "video", return_tensors: str | None = None,
                      padding: bool | str = True, **kwargs) -> BatchFeature:  # fmt: skip
        """Tokenise prompts for media encoded beforehand, e.g. a streamed video (`model.encode_video_chunks`): every
        placeholder of `text` (in order, across the batch) stands for one item of `visual` (an `OmniVMedVisualOutput`)
        and is expanded to that item's kept tokens per frame, read from its visual_keep_mask, grid_thw and
        merge_sizes, as `__call__` expands it for pixels. `kinds`: each item's kind ("video", "volume" or "image"; one
        string for all), which decides the frame separators. Returns input_ids, attention_mask and mm_token_type_ids;
        then `model.generate(**inputs, mm_encoder_outputs={"image": visual})`. kwargs: tokenizer arguments."""
        unknown = set(kwargs) - _TEXT_KWARGS
        if unknown:
            raise TypeError(f"Unknown argument(s) {sorted(unknown)} for {type(self).__name__}.prompt_inputs")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a non-empty list of strings")
        keep, grid_thw, merge_sizes = (getattr(visual, k, None)
                                       for k in ("visual_keep_mask", "grid_thw", "merge_sizes"))  # fmt: skip
        if keep is None or grid_thw is None or merge_sizes is None:
            raise ValueError("`visual` must be the model's OmniVMedVisualOutput (with visual_keep_mask, grid_thw and "
                             "merge_sizes), e.g. model.encode_video_chunks(...)")  # fmt: skip
        per_item = tokens_per_frame(keep.cpu(), grid_thw.cpu(), merge_sizes.cpu())
        kinds = [kinds] * len(per_item) if isinstance(kinds, str) else list(kinds)
        if len(kinds) != len(per_item) or not set(kinds) <= set(MEDIA_KINDS):
            raise ValueError(f"kinds must name one of {MEDIA_KINDS} per item ({len(per_item)}), got {kinds}")
        if any(kind == "image" and len(frames) != 1 for kind, frames in zip(kinds, per_item)):
            raise ValueError("an item of several frames cannot be a 2D image: give kinds='video' or 'volume'")
        counts = [len(_placeholder_spans(t)) for t in texts]
        if sum(counts) != len(per_item):
            raise ValueError(f"the text holds {sum(counts)} {IMAGE_TOKEN} placeholder(s) (per sample: {counts}) but "
                             f"`visual` has {len(per_item)} item(s)" + _CHAT_FORMAT_HINT)  # fmt: skip
        replacements = [_media_tokens(kind, frames) for kind, frames in zip(kinds, per_item)]
        expanded, _ = _expand_placeholders(texts, replacements)
        data = self._tokenize(expanded, False, padding=padding, **kwargs)
        data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in ids] for ids in data["input_ids"]]
        n_placeholders = sum(sum(row) for row in data["mm_token_type_ids"])
        if n_placeholders != int(keep.sum()):
            raise ValueError(f"the tokenized text holds {n_placeholders} {IMAGE_TOKEN} tokens but `visual` has "
                             f"{int(keep.sum())} visual tokens (was the text truncated?)")  # fmt: skip
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def max_prompt_length(self) -> int | None:
        """The longest prompt (in tokens, media expanded) the processor lets through: the tokenizer's
        `model_max_length`, which a checkpoint sets to its LLM's `max_position_embeddings`; None when unset."""
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if limit is not None and limit < 10**20 else None  # unset is transformers' 1e30

    def _tokenize(self, texts: list[str], marked: bool, padding=True, truncation=None, max_length=None,
                  pad_to_multiple_of=None, padding_side=None, return_attention_mask=None, **kwargs) -> dict:
        """Tokenise the expanded prompts unpadded, refuse (or, with `truncation`, cut with a warning) any longer than
        the limit, then pad. Truncation never removes a media token: it is an error instead."""
        if kwargs.get("return_overflowing_tokens"):
            raise ValueError("return_overflowing_tokens would split a prompt away from its media; it is not supported")
        if marked and any(_MARK_START in t or _MARK_END in t for t in texts):
            unsupported = {"return_token_type_ids", "return_special_tokens_mask", "return_length"} & {
                k for k, v in kwargs.items() if v}  # fmt: skip
            if unsupported:
                raise ValueError(f"{sorted(unsupported)} are not supported for chats whose text holds control tokens")
            rows = [self._encode_marked(t, kwargs) for t in texts]
            enc = {k: [row[k] for row in rows] for k in rows[0]}
        else:
            enc = dict(self.tokenizer(texts, padding=False, truncation=False, **kwargs))
        if return_attention_mask is False:
            enc.pop("attention_mask", None)

        truncate = truncation not in (None, False, "do_not_truncate")
        limit = (max_length or self.max_prompt_length) if truncate else self.max_prompt_length
        media_ids = {self.image_token_id, self.frame_token_id, self.vision_start_token_id, self.vision_end_token_id}
        for i, ids in enumerate(enc["input_ids"]):
            if limit is None or len(ids) <= limit:
                continue
            if not truncate:
                raise ValueError(
                    f"prompt {i} is {len(ids)} tokens long (media expanded), more than the {limit} the model takes "
                    "(the tokenizer's model_max_length); shorten the text, give fewer media or a smaller pixel budget "
                    "(max_frames / max_slices / max_pixels), raise prune_threshold, or pass truncation=True to cut "
                    "text"
                )
            left = self.tokenizer.truncation_side == "left"
            keep = slice(len(ids) - limit, None) if left else slice(0, limit)
            cut = ids[: len(ids) - limit] if left else ids[limit:]
            if media_ids & set(cut):
                raise ValueError(
                    f"prompt {i} is {len(ids)} tokens long; truncating it to {limit} tokens on the "
                    f"{self.tokenizer.truncation_side} would cut media tokens; give fewer media or a smaller pixel "
                    "budget instead"
                )
            logger.warning("prompt %d: %d tokens, truncated on the %s to %d (no media token cut)",
                           i, len(ids), self.tokenizer.truncation_side, limit)  # fmt: skip
            for key in enc:
                enc[key][i] = enc[key][i][keep]
        return self._pad(enc, padding, max_length, pad_to_multiple_of, padding_side)

    def _pad(self, enc: dict, padding, max_length, pad_to_multiple_of, padding_side) -> dict:
        """Pad per-token lists like the tokenizer does (padding True / 'longest' / 'max_length' / False)."""
        lengths = [len(ids) for ids in enc["input_ids"]]
        if padding in (False, None, "do_not_pad") or not lengths:
            return enc
        target = max(lengths)
        if padding == "max_length":
            target = max_length or self.max_prompt_length or target
        target = max(target, max(lengths))
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if all(n == target for n in lengths):
            return enc
        if self.tokenizer.pad_token_id is None:
            raise ValueError("padding needs a pad token: set tokenizer.pad_token")
        fill = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0,
                "special_tokens_mask": 1, "offset_mapping": (0, 0)}  # fmt: skip
        left = (padding_side or self.tokenizer.padding_side) == "left"
        out = {}
        for key, rows in enc.items():
            if key not in fill:
                out[key] = rows
                continue
            padded = []
            for row in rows:
                pad = [fill[key]] * (target - len(row))
                padded.append(pad + list(row) if left else list(row) + pad)
            out[key] = padded
        return out

    def _control_tokens_re(self) -> "re.Pattern":
        """Every added token of the tokenizer (special or not: ChatML, media and tool tokens alike), longest first."""
        tokens = sorted(self.tokenizer.added_tokens_encoder, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens)) or "(?!)")

    def _encode_marked(self, text: str, kwargs: dict) -> dict:
        """Encode a prompt whose user-written control tokens are marked (`_mark`): marked tokens as plain text (their
        markers dropped), the rest, including the template's own control tokens, as usual. Offsets refer to `text`."""
        want_offsets = bool(kwargs.get("return_offsets_mapping"))
        added_ids = set(self.tokenizer.added_tokens_encoder.values())
        ids, offsets = [], []

        def encode(piece: str, start: int, as_text: bool):
            if not piece:
                return
            enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True,
                                 split_special_tokens=as_text)  # fmt: skip
            if as_text and added_ids & set(enc["input_ids"]):
                raise ValueError(f"cannot encode {piece!r} as plain text: the tokenizer maps it to an added token")
            ids.extend(enc["input_ids"])
            offsets.extend((a + start, b + start) for a, b in enc["offset_mapping"])

        pos = 0
        for m in _PLACEHOLDER_OR_MARKED.finditer(text):
            if m.group() == IMAGE_TOKEN:
                continue
            encode(text[pos : m.start()], pos, as_text=False)
            encode(m.group()[1:-1] if len(m.group()) > 1 else "", m.start() + 1, as_text=True)
            pos = m.end()  # a lone marker is dropped, but still separates the text around it
        encode(text[pos:], pos, as_text=False)
        row = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if want_offsets:
            row["offset_mapping"] = offsets
        return row

    # ------------------------------------------------------------------------------------------------ chat template
    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        return_assistant_tokens_mask: bool = False,
        processor_kwargs: dict | None = None,
        sanitize_control_tokens: bool = True,
        **kwargs,
    ):
        """Render one conversation (a list of messages) or a batch of them with the ChatML template; with
        `tokenize=True`, load the media blocks (type image / video / volume, with the source under that key or
        `path`, plus optional load options such as `window`) in order of appearance and run the processor.

        kwargs that are processor settings or tokenizer arguments (e.g. `prune_threshold`, `max_frames`, `padding`)
        go to the processor, the rest to the template. `return_assistant_tokens_mask=True` (with tokenize and
        return_dict) adds `assistant_masks`: 1 on the tokens of assistant replies including their closing <|im_end|>,
        0 elsewhere and on every media token (<|vision_start|>, <|image_pad|>, <|frame_sep|>, <|vision_end|>).

        Messages: a non-empty list of dicts with a role (system / user / assistant) and a content that is a string, a
        list of blocks (type text / image / video / volume) or None (empty text); anything else is a ValueError.

        `sanitize_control_tokens` (default True, a safety property): with `tokenize=True`, control and media tokens
        that the messages' text or the template variables spell out (`<|im_end|>`, `<|vision_start|>`,
        `<|image_pad|>`, ... every added token of the tokenizer) are tokenised as plain text, so a pasted report can
        neither end a turn nor open a medium; only the template and the media blocks write those tokens. With
        `tokenize=False` the returned string cannot carry that distinction (a warning says so when the text holds
        such tokens): tokenise chats through this method, not by passing its string to the processor.
        """
        template = self._resolve_chat_template(chat_template)
        call_names = set(SETTINGS) | set(LOAD_OPTIONS) | _TEXT_KWARGS | {"prune_threshold"}
        call_kwargs = dict(processor_kwargs or {})
        call_kwargs.update({k: kwargs.pop(k) for k in list(kwargs) if k in call_names})
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")
        if return_assistant_tokens_mask and continue_final_message:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask")

        is_list = isinstance(conversation, (list, tuple))
        is_batched = is_list and bool(conversation) and isinstance(conversation[0], (list, tuple))
        batch = conversation if is_batched else [conversation]
        conversations = [_normalize_conversation(c, i, is_batched) for i, c in enumerate(batch)]
        rendered = conversations
        control_re = self._control_tokens_re()
        if sanitize_control_tokens:
            def mark_text(content):
                if isinstance(content, str):
                    return _mark(content, control_re)
                return [{**b, "text": _mark(b["text"], control_re)} if b["type"] == "text" else b for b in content]

            texts = [m["content"] for conv in conversations for m in conv if isinstance(m["content"], str)]
            texts += [b["text"] for conv in conversations for m in conv if not isinstance(m["content"], str)
                      for b in m["content"] if b["type"] == "text"]  # fmt: skip
            texts += [v for v in kwargs.values() if isinstance(v, str)]
            if tokenize:
                rendered = [[{**m, "content": mark_text(m["content"])} for m in conv] for conv in conversations]
                kwargs = {k: _mark(v, control_re) if isinstance(v, str) else v for k, v in kwargs.items()}
                call_kwargs["sanitize_control_tokens"] = True
            elif any(control_re.search(t) for t in texts):
                logger.warning(
                    "the chat's text spells out control or media tokens (e.g. <|im_end|>, <|image_pad|>); the returned "
                    "string cannot mark them as text, so tokenising it would turn them into real control tokens: "
                    "use apply_chat_template(..., tokenize=True) instead"
                )
        prompts, generation_indices = render_jinja_template(
            conversations=rendered,
            chat_template=template,
            return_assistant_tokens_mask=return_assistant_tokens_mask,
            continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt,
            **{**self.tokenizer.special_tokens_map, **kwargs},
        )
        if not tokenize:
            return prompts if is_batched else prompts[0]

        media = [
            [
                block
                for message in conv
                if isinstance(message.get("content"), (list, tuple))
                for block in message["content"]
                if isinstance(block, dict) and block.get("type") in MEDIA_KINDS
            ]
            for conv in conversations
        ]
        if return_assistant_tokens_mask:
            call_kwargs["return_offsets_mapping"] = True
            call_kwargs["return_text_replacement_offsets"] = True
        out = self(
            text=prompts,
            media=media if any(media) else None,
            return_tensors=None,
            **call_kwargs,
        )
        if return_assistant_tokens_mask:
            out["assistant_masks"] = self._assistant_masks(out, generation_indices)
            out.pop("offset_mapping")
            out.pop("text_replacement_offsets")
        if return_tensors is not None:
            out.convert_to_tensors(tensor_type=return_tensors)
        if not return_dict:
            return out["input_ids"] if is_batched else out["input_ids"][0]
        return out

    def _assistant_masks(self, out, generation_indices) -> list[list[int]]:
        """Map the assistant spans of the rendered prompts through the placeholder expansion onto tokens."""
        media_ids = {self.image_token_id, self.frame_token_id, self.vision_start_token_id, self.vision_end_token_id}
        masks = []
        for ids, offsets, replaced, spans in zip(
            out["input_ids"], out["offset_mapping"], out["text_replacement_offsets"], generation_indices
        ):
            # a position of the rendered prompt moves by the characters that the expansions before it added
            ends = [r["span"][1] for r in replaced]
            moved = [r["new_span"][1] - r["span"][1] for r in replaced]  # cumulative shift at each placeholder end

            def shift(pos: int) -> int:
                before = bisect.bisect_right(ends, pos)
                return pos + (moved[before - 1] if before else 0)

            new_spans = [(shift(a), shift(b)) for a, b in spans]
            mask = [0] * len(ids)
            for pos, ((start, end), token_id) in enumerate(zip(offsets, ids)):
                if end > start and token_id not in media_ids and any(start < b and end > a for a, b in new_spans):
                    mask[pos] = 1
            masks.append(mask)
        return masks


_CHAT_FORMAT_HINT = (
    ": the prompt must hold one placeholder per medium, as the chat template writes it. Give messages instead of "
    "plain text: processor.apply_chat_template([{'role': 'user', 'content': [{'type': 'image', 'image': ...}, "
    "{'type': 'text', 'text': 'your question'}]}], add_generation_prompt=True, tokenize=True, return_dict=True), or "
    "to a pipeline('image-text-to-text') text=[that message] (images inside the content blocks)"
)


def _media_tokens(kind: str, per_frame: list[int]) -> str:
    """What one medium's placeholder expands to (see the module docstring): kept tokens, frame by frame."""
    if kind == "image":
        return IMAGE_TOKEN * per_frame[0]
    return "".join(FRAME_TOKEN + IMAGE_TOKEN * k for k in per_frame)


def _unpack_block(item: dict, kind: str | None) -> tuple[Any, str, dict]:
    """A content block `{"type": kind, kind | "path": source, **load options}` -> (source, kind, load options)."""
    block = dict(item)
    block_kind = block.pop("type", kind)
    if block_kind not in MEDIA_KINDS:
        raise ValueError(f"a media block needs 'type' in {MEDIA_KINDS}, got {item.get('type')!r}")
    if kind is not None and block_kind != kind:
        raise ValueError(f"a {block_kind} block was passed as a {kind}")
    if "url" in block:
        raise ValueError(f"media URLs are not fetched ({block['url']!r}): download the file, pass its 'path'")
    keys = [k for k in (block_kind, "path") if k in block]
    if len(keys) != 1:
        raise ValueError(f"a {block_kind} block needs one of '{block_kind}' or 'path', got keys {sorted(item)}")
    source = block.pop(keys[0])
    block.pop("text", None)
    unknown = set(block) - set(LOAD_SETTINGS) - set(LOAD_OPTIONS)
    if unknown:
        valid = LOAD_SETTINGS + LOAD_OPTIONS
        raise ValueError(f"unknown option(s) {sorted(unknown)} in a {block_kind} block; valid: {valid}")
    return source, block_kind, block


def _flatten_media(media) -> tuple[list, list[int] | None]:
    """Media given flat (in order of appearance) or nested per sample -> (flat list, per-sample counts or None)."""
    if media is None:
        return [], None
    if not isinstance(media, (list, tuple)):
        return [media], None
    if any(isinstance(m, (list, tuple)) for m in media):
        if not all(isinstance(m, (list, tuple)) for m in media):
            raise ValueError("`media` must be a flat list of items or a list of lists (one per sample), not a mix")
        return [item for sample in media for item in sample], [len(sample) for sample in media]
    return list(media), None


def _placeholder_spans(text: str, marked: bool = False) -> list[tuple[int, int]]:
    """Character spans of the media placeholders in `text`; in a `marked` text, an `<|image_pad|>` inside user-text
    markers (see `_mark`) is text, not a placeholder."""
    if not marked:
        return [m.span() for m in re.finditer(re.escape(IMAGE_TOKEN), text)]
    return [m.span() for m in _PLACEHOLDER_OR_MARKED.finditer(text) if m.group() == IMAGE_TOKEN]


def _expand_placeholders(texts: list[str], replacements: list[str], marked: bool = False
                         ) -> tuple[list[str], list[list[dict]]]:  # fmt: skip
    """Replace the i-th placeholder of the batch (see `_placeholder_spans`) by replacements[i]; also return, per text,
    the span of each placeholder in the input and of its expansion in the output (character offsets)."""
    expanded, offsets = [], []
    index = 0
    for text in texts:
        pieces, spans = [], []
        old_pos, shift = 0, 0
        for start, end in _placeholder_spans(text, marked):
            replacement = replacements[index]
            index += 1
            pieces += [text[old_pos:start], replacement]
            spans.append({"span": (start, end), "new_span": (start + shift, start + shift + len(replacement))})
            shift += len(replacement) - (end - start)
            old_pos = end
        pieces.append(text[old_pos:])
        expanded.append("".join(pieces))
        offsets.append(spans)
    return expanded, offsets


def _mark(text: str, control_re: "re.Pattern") -> str:
    """Wrap every control token written in a user string in private-use markers, so that tokenisation can tell it from
    the control tokens the template writes (transformers' `sanitize_control_tokens` idea). Markers already in the
    string are dropped first, so a string cannot forge a marked span."""
    text = text.replace(_MARK_START, "").replace(_MARK_END, "")
    return control_re.sub(lambda m: _MARK_START + m.group() + _MARK_END, text)


def _normalize_conversation(conversation, index: int, is_batched: bool) -> list[dict]:
    """Check one conversation's shape; returns its messages as dicts whose content is a string or a list of blocks.

    A `content` of None reads as empty text, as transformers' processors do (they drop keys whose value is None, so
    an OpenAI-style assistant message without text renders as an empty turn)."""
    where = f"conversation {index}" if is_batched else "the conversation"
    if not isinstance(conversation, (list, tuple)):
        raise ValueError(f"{where} must be a list of messages (dicts with 'role' and 'content'), "
                         f"got {type(conversation).__name__}")  # fmt: skip
    if not conversation:
        raise ValueError(f"{where} is empty: give at least one message")
    messages = []
    for j, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}, message {j}: a message must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")  # fmt: skip
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(f"{where}, message {j}: role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, (list, tuple)):
            for k, block in enumerate(content):
                kind = block.get("type") if isinstance(block, Mapping) else None
                if kind == "text":
                    if not isinstance(block.get("text"), str):
                        raise ValueError(f"{where}, message {j}, block {k}: a text block needs a string 'text', "
                                         f"got {block.get('text')!r:.60}")  # fmt: skip
                elif kind not in MEDIA_KINDS:
                    raise ValueError(
                        f"{where}, message {j}, block {k}: unknown content block "
                        f"{(kind if isinstance(block, Mapping) else block)!r:.60}; a block is a dict whose 'type' is "
                        f"text, {', '.join(MEDIA_KINDS)}"
                    )
            content = list(content)
        elif not isinstance(content, str):
            raise ValueError(f"{where}, message {j}: content must be a string, a list of blocks or None, "
                             f"got {type(content).__name__}")  # fmt: skip
        messages.append({**message, "content": content})
    return messages


OmniVMedImageProcessor.register_for_auto_class("AutoImageProcessor")
OmniVMedProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "Media",
    "MediaError",
    "OmniVMedImageProcessor",
    "OmniVMedProcessor",
    "smart_resize",
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "FRAME_TOKEN",
    "VISION_START",
    "VISION_END",
    "SPECIAL_TOKENS",
]
