"""What the tools share (train_trl.py, evaluate_omnivmed.py, build_omnivmed.py, convert_omnivmed.py, chat, app, ...),
one section each: the embedded default's questions and answers; JSON / JSONL files; loading a model and processor;
training rows (train_trl's JSONL reader and checks); pushing a folder; the tiny preset (offline tokenizer, model) and
the Hub folder writer with its model card; the one answer normaliser and its scores; reading pretrained checkpoints'
tensor indexes; streamed answers; pruning montages; a synthetic instrument video; image statistics of a part.

Not remote code: the Hub copies only the `*_omnivmed.py` files the model and processor import (REMOTE_CODE_FILES);
this module stays in the checkout. It imports the core through the `omnivmed` package (omnivmed.py) and never a tool;
tools import it and the core, never each other (tests/test_layout.py checks it).
"""

import collections
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from PIL import Image, ImageDraw, ImageFont
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from omnivmed.configuration_omnivmed import OmniVMedConfig
from omnivmed.media_omnivmed import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VOLUME_EXTENSIONS,
    MediaError,
    load_media,
)
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration
from omnivmed.processing_omnivmed import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    ENDOFTEXT,
    FRAME_TOKEN,
    IM_END,
    IMAGE_TOKEN,
    LOAD_OPTIONS,
    LOAD_SETTINGS,
    SETTINGS,
    SPECIAL_TOKENS,
    OmniVMedImageProcessor,
    OmniVMedProcessor,
    VISION_END,
    VISION_START,
)


ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("omnivmed_tools")


# ================================================================================================= the embedded default
# Its questions and answers: data_omnivmed.py builds rows from them and scores against them; the tiny tokenizer's
# corpus holds them so the tiny model reads them at about a token a word.
QUESTIONS = {
    "modality": ["What imaging modality is this?", "Which modality was used to acquire this image?"],
    "plane": ["In which plane is this slice?", "What is the imaging plane?"],
    "lesion": ["Is there a lesion?", "Is a focal lesion present?"],
    "side": ["On which side of the patient is the lesion?", "Is the lesion in the patient's left or right side?"],
    "level": ["Is the lesion in the upper, middle or lower slices?", "Which part of the volume holds the lesion?"],
    "direction": ["In which direction does the instrument move?", "Where does the instrument move?"],
}
ANSWERS = {
    "modality": ("CT", "MR", "ultrasound"),
    "plane": ("axial", "coronal", "sagittal"),
    "lesion": ("yes", "no"),
    "side": ("left", "right"),
    "level": ("upper", "middle", "lower"),
    "direction": ("left", "right", "up", "down"),
}
CAPTION_QUESTION = "Describe this image briefly."


# ================================================================================================= files
def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def short(names, limit: int = 20) -> str:
    names = list(names)
    shown = ", ".join(map(str, names[:limit]))
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"


def first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ================================================================================================= loading a model
def load_model(model_path: str, device: str = "auto", dtype: str = "auto", prune_stage: str | None = None):
    """Model + processor through the Auto classes; `prune_stage` overrides the checkpoint's (e.g. "pre_encoder" for
    long volumes / videos: much less tower work, see README "Token pruning" for what it costs)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    stage = {} if prune_stage is None else {"prune_stage": prune_stage}
    model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, dtype=torch_dtype, **stage)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    return model.to(device).eval(), processor


# ================================================================================================= training rows
# train_trl.py reads its JSONL through these; data_omnivmed.py, ablate_omnivmed.py and build_instruct_omnivmed.py read
# the same rows the same way.
MEDIA_KINDS = ("image", "video", "volume")


class RowError(ValueError):
    """One dataset row cannot be used; the message says why."""


@dataclass
class BadRow:
    source: str  # "file.jsonl:LINE"
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class BadRowsError(ValueError):
    def __init__(self, bad: list[BadRow], total: int):
        self.bad = bad
        listing = "\n".join(f"  {b}" for b in bad)
        super().__init__(
            f"{len(bad)} of {total} dataset rows are unusable:\n{listing}\n"
            "Fix them, or pass --skip_bad_rows to train on the others."
        )


ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MEDIA_KEYS = {"image": "image", "images": "image", "video": "video", "videos": "video", "volume": "volume",
              "volumes": "volume"}  # fmt: skip
UNSUPPORTED_MEDIA_KEYS = ("audio", "audios", "speech")
MEDIA_TAG = re.compile(r"<(image|video|volume)>")
# what a file's extension says it holds; "dicom" files are images or volumes (multi-frame)
_EXTENSION_KINDS = (
    [(ext, "volume") for ext in VOLUME_EXTENSIONS]
    + [(ext, "image") for ext in IMAGE_EXTENSIONS]
    + [(ext, "video") for ext in VIDEO_EXTENSIONS]
    + [(ext, "dicom") for ext in DICOM_EXTENSIONS]
)
_BLOCK_OPTIONS = set(LOAD_SETTINGS) | set(LOAD_OPTIONS) - {"data_root"}


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for ext, kind in _EXTENSION_KINDS:
        if name.endswith(ext):
            return kind
    return "dicom" if "." not in name else None  # DICOM files often have no extension


def _media_block(kind: str, source) -> dict:
    """A media entry of a LLaVA-style row (a path, a nested list of DICOM files, or a dict with 'path' and load
    options) -> a content block."""
    if isinstance(source, dict):
        block = dict(source)
        block.setdefault("type", kind)
        return block
    return {"type": kind, "path": source}


def _check_media(block: dict, root: Path, where: str) -> None:
    kind = block.get("type")
    if kind not in MEDIA_KINDS:
        raise RowError(f"{where}: unknown media type {kind!r} (supported: {', '.join(MEDIA_KINDS)})")
    keys = [k for k in (kind, "path") if k in block]
    if len(keys) != 1:
        raise RowError(f"{where}: a {kind} block needs exactly one of '{kind}' or 'path'")
    unknown = set(block) - {"type", keys[0]} - _BLOCK_OPTIONS
    if unknown:
        raise RowError(f"{where}: unknown option(s) {sorted(unknown)} in a {kind} block")
    source = block[keys[0]]
    paths = source if isinstance(source, list) else [source]
    if isinstance(source, list) and kind != "volume":
        raise RowError(f"{where}: a list of files is one DICOM series, so only a volume; got a {kind}")
    if not paths:
        raise RowError(f"{where}: empty list of files")
    for path in paths:
        if not isinstance(path, str) or not path:
            raise RowError(f"{where}: a {kind} source must be a file path, got {path!r}")
        p = Path(path).expanduser()
        resolved = (p if p.is_absolute() else root / p).resolve()
        if not resolved.is_relative_to(root):
            raise RowError(f"{where}: {path} escapes the data root {root}")
        if not resolved.exists():
            raise RowError(f"{where}: {path} does not exist (under {root})")
        if resolved.is_dir():
            if kind != "volume" or isinstance(source, list):
                raise RowError(f"{where}: {path} is a folder (a DICOM series), which can only be a volume")
            continue
        file_kind = _file_kind(resolved)
        if file_kind is None:
            suffix = "".join(resolved.suffixes[-2:]) or resolved.name
            raise RowError(f"{where}: unknown media type {suffix!r} ({path})")
        if file_kind == "dicom" and kind == "video":
            raise RowError(f"{where}: {path} is a DICOM file, which is an image or a volume, not a video")
        if file_kind not in ("dicom", kind):
            raise RowError(f"{where}: {path} is a {file_kind} file but the row uses it as a {kind}")


def _text_blocks(text: str, media: dict[str, list], where: str) -> list[dict]:
    """Split a LLaVA turn at its <image>/<video>/<volume> tags into text and media blocks."""
    blocks, pos = [], 0
    for match in MEDIA_TAG.finditer(text):
        if match.start() > pos:
            blocks.append({"type": "text", "text": text[pos : match.start()]})
        kind = match.group(1)
        if not media[kind]:
            raise RowError(f"{where}: more <{kind}> tags than {kind} entries")
        blocks.append(media[kind].pop(0))
        pos = match.end()
    rest = text[pos:]
    if blocks and rest.startswith("\n"):  # "<image>\nQuestion" -> the media block, then "Question"
        rest = rest[1:]
    if rest:
        blocks.append({"type": "text", "text": rest})
    return blocks


def normalize_row(raw, root: Path) -> list[dict]:
    """One JSONL row (LLaVA/VideoLLaMA3 or messages style) -> a validated list of messages whose content is a list
    of blocks. Raises RowError naming what is wrong."""
    if not isinstance(raw, dict):
        raise RowError(f"a row must be a JSON object, got {type(raw).__name__}")
    for key in UNSUPPORTED_MEDIA_KEYS:
        if key in raw:
            raise RowError(f"unknown media type {key!r} (supported: {', '.join(MEDIA_KINDS)})")
    media: dict[str, list] = {kind: [] for kind in MEDIA_KINDS}
    for key, kind in MEDIA_KEYS.items():
        if raw.get(key) is not None:
            value = raw[key]
            entries = value if isinstance(value, list) else [value]
            media[kind] += [_media_block(kind, entry) for entry in entries]

    messages = []
    if "messages" in raw:
        if not isinstance(raw["messages"], list):
            raise RowError("'messages' must be a list")
        for i, message in enumerate(raw["messages"]):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise RowError(f"message {i}: needs a role of system / user / assistant")
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise RowError(f"message {i}: content must be a string or a list of blocks")
            blocks = []
            for block in content:
                if not isinstance(block, dict) or "type" not in block:
                    raise RowError(f"message {i}: every content block needs a 'type'")
                if block["type"] == "text":
                    blocks.append({"type": "text", "text": str(block.get("text", ""))})
                    continue
                if block["type"] in MEDIA_KINDS and block["type"] not in block and "path" not in block:
                    # TRL style: {"type": "image"} blocks take their files from the row's "images" list in order
                    if not media[block["type"]]:
                        raise RowError(f"message {i}: a {block['type']} block without a source and no entry left")
                    block = {**media[block["type"]].pop(0), **{k: v for k, v in block.items() if k != "type"}}
                blocks.append(dict(block))
            messages.append({"role": message["role"], "content": blocks})
    elif "conversations" in raw:
        if not isinstance(raw["conversations"], list):
            raise RowError("'conversations' must be a list")
        tags = sum(len(MEDIA_TAG.findall(str(t.get("value", "")))) for t in raw["conversations"] if isinstance(t, dict))
        n_media = sum(len(v) for v in media.values())
        for i, turn in enumerate(raw["conversations"]):
            if not isinstance(turn, dict) or ROLE_ALIASES.get(turn.get("from")) is None:
                raise RowError(f"turn {i}: 'from' must be human / gpt / system (got {turn!r:.60})")
            role = ROLE_ALIASES[turn["from"]]
            value = turn.get("value")
            if not isinstance(value, str):
                raise RowError(f"turn {i}: 'value' must be a string")
            blocks = _text_blocks(value, media, f"turn {i}") if role == "user" else [{"type": "text", "text": value}]
            if role != "user" and MEDIA_TAG.search(value):
                raise RowError(f"turn {i}: media tags are only allowed in human turns")
            messages.append({"role": role, "content": blocks})
        if tags == 0 and n_media:  # LLaVA convention: no tag means the media come first in the first human turn
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is None:
                raise RowError("media given but no human turn to attach them to")
            first["content"] = [b for kind in MEDIA_KINDS for b in media[kind]] + first["content"]
            media = {kind: [] for kind in MEDIA_KINDS}
    else:
        raise RowError("no 'messages' or 'conversations'")

    leftover = {kind: len(v) for kind, v in media.items() if v}
    if leftover:
        raise RowError(f"media entries not placed in the conversation (no matching tag / block): {leftover}")
    if not any(m["role"] == "assistant" and any(b.get("text", "").strip() for b in m["content"]) for m in messages):
        raise RowError("no assistant turn (nothing to learn from)")
    for i, message in enumerate(messages):
        for block in message["content"]:
            if block["type"] != "text":
                _check_media(block, root, f"message {i}")
    return messages


def _media_limits() -> dict:
    """load_media's file-size limits (the processor loads with these defaults)."""
    params = inspect.signature(load_media).parameters
    return {name: params[name].default for name in ("max_image_pixels", "max_voxels")}


def _visual_tokens(image_processor, kind: str, frames: int, height: int, width: int) -> int:
    """LLM visual tokens (before pruning) of `frames` frames of height x width, as the image processor plans them."""
    h, w, merge = image_processor.get_resized_size(height, width, kind)
    p = image_processor.patch_size
    return frames * (h // (p * merge)) * (w // (p * merge))


def _worst_case_tokens(image_processor, kind: str, block: dict) -> int:
    """The most visual tokens any file can give as a `kind` under the processor's settings (frame count and pixel
    budget caps), so files need no reading when this fits the budget."""
    ip = image_processor
    if kind == "image":
        per_frame, frames = ip.max_pixels, 1
    else:
        cap = "max_slices" if kind == "volume" else "max_frames"
        per_frame, frames = ip.video_max_pixels, int(block.get(cap, getattr(ip, cap)))
    merge = ip.image_merge_size if kind == "image" else ip.video_merge_size
    return frames * (per_frame // (ip.patch_size * merge) ** 2)


def _check_media_cheaply(block: dict, root: Path, image_processor) -> None:
    """Find a medium the processor would reject (too many pixels or voxels, extreme aspect ratio, more visual tokens
    than max_total_visual_tokens) from file headers, before any model is loaded; raises RowError naming the file and
    the cause. Only what a header proves is reported: an unreadable header is left to the loader's own message."""
    kind = block["type"]
    source = block.get(kind, block.get("path"))
    if isinstance(source, list):
        return  # a DICOM series: its size is known only once its files are grouped (checked when loaded)
    path = Path(source).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if path.is_dir():
        return
    ip, limits = image_processor, _media_limits()
    budget = ip.max_total_visual_tokens
    file_kind = _file_kind(path)
    try:
        if file_kind == "image":
            from PIL import Image

            try:
                with Image.open(path) as im:  # reads the header only
                    width, height = im.size
            except Image.DecompressionBombError as e:
                raise RowError(f"{path}: image too large ({e})") from None
        elif file_kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            height, width = int(ds.Rows), int(ds.Columns)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            if kind == "volume":  # a multi-frame volume may be resliced: only its voxel count is known here
                if frames * height * width > limits["max_voxels"]:
                    raise RowError(f"{path}: the header claims {frames} frames of {height}x{width}, more than "
                                   f"max_voxels={limits['max_voxels']}")  # fmt: skip
                height = width = None
        elif file_kind == "volume":
            import nibabel

            shape = tuple(int(n) for n in nibabel.load(path).shape) + (1, 1, 1)
            n_vox = math.prod(shape[:3])
            if n_vox > limits["max_voxels"]:
                raise RowError(f"{path}: the header claims {'x'.join(map(str, shape[:3]))} = {n_vox} voxels, "
                               f"more than max_voxels={limits['max_voxels']}")  # fmt: skip
            height = width = None
        elif file_kind == "video":
            import av

            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                width, height = stream.width, stream.height
        else:
            return
    except RowError:
        raise
    except Exception:  # noqa: BLE001 - the loader reports unreadable files with its own, better message
        return
    if height is not None:
        if height * width > limits["max_image_pixels"]:
            what = "frames are" if kind == "video" else "image is"
            raise RowError(f"{path}: {what} {width}x{height} = {width * height} pixels, more than "
                           f"max_image_pixels={limits['max_image_pixels']}")  # fmt: skip
        try:  # the aspect ratio and the grid, as the processor plans them
            per_frame = _visual_tokens(ip, kind, 1, height, width)
        except ValueError as e:
            raise RowError(f"{path}: {e}") from None
        if kind == "image" and per_frame > budget:
            raise RowError(f"{path}: {height}x{width} gives {per_frame} visual tokens, more than "
                           f"max_total_visual_tokens={budget}")  # fmt: skip
    if kind != "image" and _worst_case_tokens(ip, kind, block) > budget:
        # the settings allow more tokens than the budget: only the file's real frame count tells; load it
        try:
            media = ip.to_media({**block, "data_root": root})
        except (MediaError, ValueError, ImportError) as e:
            raise RowError(str(e)) from None
        _check_loaded_budget(media, ip, path)


def _check_loaded_budget(media, image_processor, where) -> None:
    t, height, width = media.frames.shape[:3]
    try:
        n = _visual_tokens(image_processor, media.kind, t, height, width)
    except ValueError as e:
        raise RowError(f"{where}: {e}") from None
    if n > image_processor.max_total_visual_tokens:
        raise RowError(f"{where}: {t} frame(s) of {height}x{width} give {n} visual tokens before pruning, more than "
                       f"max_total_visual_tokens={image_processor.max_total_visual_tokens}; lower max_frames / "
                       "max_slices or the pixel budget")  # fmt: skip


def load_rows(paths, data_root=None, skip_bad_rows: bool = False, validate_with=None, load_media: bool = True
              ) -> list[dict]:  # fmt: skip
    """Read JSONL files -> rows {"messages": JSON string, "data_root": str, "source": "file:line", "meta": JSON string}.

    Every row is checked (JSON, format, roles, an assistant turn, known media types, paths inside the data root and
    existing, extension vs. kind). With `validate_with` (a processor), every medium is also checked against what the
    processor accepts (pixel / voxel limits, aspect ratio, max_total_visual_tokens): from file headers when
    `load_media` is False, else by loading it once. Bad rows are collected; `skip_bad_rows=False` raises BadRowsError
    listing all of them (file:line and cause), True logs them and drops them. Missing files are an error naming them;
    a UTF-8 byte order mark is read as such; rows repeated verbatim are kept, with a warning giving their count.
    Top-level keys other than the media and conversation keys (e.g. "id", "task", "answer") travel in "meta".
    """
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"training data not found: {', '.join(missing)}" + (
            "" if all(p.parent.is_dir() for p in map(Path, missing)) else " (its folder does not exist)"))  # fmt: skip
    rows, bad, total = [], [], 0
    seen: dict[str, str] = {}
    duplicates: list[tuple[str, str]] = []
    known = set(MEDIA_KEYS) | {"messages", "conversations"}
    for path in paths:
        root = Path(data_root if data_root is not None else path.parent).expanduser().resolve()
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark is not part of the first row
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                total += 1
                source = f"{path}:{lineno}"
                try:
                    try:
                        raw = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RowError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                    messages = normalize_row(raw, root)
                    if validate_with is not None:
                        for message in messages:
                            for block in message["content"]:
                                if block["type"] == "text":
                                    continue
                                if not load_media:
                                    _check_media_cheaply(block, root, validate_with.image_processor)
                                    continue
                                try:
                                    media = validate_with.image_processor.to_media({**block, "data_root": root})
                                except (MediaError, ValueError, ImportError) as e:
                                    raise RowError(str(e)) from None
                                _check_loaded_budget(media, validate_with.image_processor, media.source)
                except RowError as e:
                    bad.append(BadRow(source, str(e)))
                    continue
                key = json.dumps([raw, str(root)], sort_keys=True)
                if key in seen:
                    duplicates.append((source, seen[key]))
                else:
                    seen[key] = source
                meta = {k: v for k, v in raw.items() if k not in known}
                rows.append(
                    {
                        "messages": json.dumps(messages),
                        "data_root": str(root),
                        "source": source,
                        "meta": json.dumps(meta),
                    }
                )
    if bad:
        if not skip_bad_rows:
            raise BadRowsError(bad, total)
        logger.warning(
            "skipping %d bad row(s) of %d:\n%s", len(bad), total, "\n".join(f"  {b}" for b in bad)
        )
    if duplicates:
        listing = "\n".join(f"  {a} repeats {b}" for a, b in duplicates[:10])
        logger.warning("%d duplicate row(s) of %d (kept: each is trained on as often as it appears):\n%s%s",
                       len(duplicates), total, listing, "\n  ..." if len(duplicates) > 10 else "")  # fmt: skip
    if not rows:
        raise ValueError(f"no usable rows in {[str(p) for p in paths]}")
    return rows


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _processor_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTINGS:
            raise SystemExit(f"--processor {item!r}: expected KEY=VALUE with KEY one of {list(SETTINGS)}")
        out[key] = _json_value(value)
    return out


def load_processor(path, overrides: list[str] = ()) -> OmniVMedProcessor:
    """The processor of a Hub folder / repo, with --processor KEY=VALUE overrides. (trust_remote_code: the tokenizer
    loader reads config.json, whose auto_map points at this repo's own code.)"""
    return OmniVMedProcessor.from_pretrained(path, trust_remote_code=True, **_processor_overrides(list(overrides)))


# ================================================================================================= Hub folders
def push_folder(folder: Path, repo_id: str, private: bool = False, token: str | None = None, message: str = "") -> str:
    """Create the Hub repo (if needed) and upload the folder in one commit; honours HF_ENDPOINT at call time."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    url = api.create_repo(repo_id, exist_ok=True, private=private)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message or "Upload OmniV-Med")
    logger.info("pushed %s to %s (%s)", folder, url, getattr(info, "commit_url", info))
    return str(url)


# ================================================================================================= the tiny preset and Hub folders
# Qwen2's pre-tokenizer split (the tiny tokenizer behaves like Qwen2's on whitespace, digits and punctuation)
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A small English medical corpus for the tiny tokenizer (radiology, pathology, surgery, endoscopy, QA).
TINY_CORPUS = """\
The chest radiograph shows no focal consolidation, pleural effusion or pneumothorax.
Heart size is within normal limits and the mediastinal contours are unremarkable.
There is a small left pleural effusion with adjacent basilar atelectasis.
Axial CT of the abdomen demonstrates a hypodense lesion in segment VII of the liver.
The lesion measures 2.3 x 1.8 cm and shows peripheral nodular enhancement.
Findings are most consistent with a hepatic hemangioma.
MRI of the brain shows a T2 hyperintense lesion in the right frontal lobe.
There is no restricted diffusion, mass effect or midline shift.
The ventricles and sulci are appropriate for the patient's age.
Contrast-enhanced CT of the chest reveals a filling defect in the right lower lobe pulmonary artery.
Impression: acute pulmonary embolism without right heart strain.
A 6 mm solid nodule is seen in the left upper lobe; follow-up CT in 12 months is recommended.
Ground-glass opacities are present bilaterally in a peripheral distribution.
The appendix is dilated to 11 mm with periappendiceal fat stranding.
No free air or drainable fluid collection is identified.
The kidneys are normal in size with no hydronephrosis or calculi.
A simple cyst is noted in the upper pole of the left kidney.
The pancreas is atrophic with a dilated main pancreatic duct.
Ultrasound of the gallbladder shows multiple mobile echogenic stones with posterior acoustic shadowing.
The common bile duct measures 4 mm, which is normal.
Mammography demonstrates scattered areas of fibroglandular density.
There is an irregular spiculated mass in the upper outer quadrant of the right breast, BI-RADS 5.
Knee MRI shows a complex tear of the posterior horn of the medial meniscus.
The anterior cruciate ligament is intact.
There is a nondisplaced fracture of the distal radius.
Degenerative changes are present at L4-L5 with moderate foraminal narrowing.
The thyroid gland is enlarged with a dominant nodule in the right lobe.
PET-CT shows intense FDG uptake in the mediastinal lymph nodes.
The sagittal slice shows a compression fracture of the T12 vertebral body.
On the coronal reconstruction the aortic root is dilated to 4.6 cm.
Echocardiography shows a left ventricular ejection fraction of 35 percent.
The frontal view shows an endotracheal tube 4 cm above the carina.
A right internal jugular central venous catheter terminates in the superior vena cava.
Histopathology shows invasive ductal carcinoma, grade 2, with lymphovascular invasion.
The tumor cells are arranged in nests and cords within a desmoplastic stroma.
Immunohistochemistry is positive for estrogen receptor and negative for HER2.
The biopsy shows chronic gastritis with Helicobacter pylori organisms.
Sections show colonic mucosa with a tubular adenoma and low-grade dysplasia.
The margins of resection are free of tumor.
There is extensive necrosis and a high mitotic rate.
Hematoxylin and eosin staining reveals granulomas with central caseation.
The skin biopsy shows a melanocytic lesion with irregular nests at the dermoepidermal junction.
Frozen section confirms metastatic adenocarcinoma in the sentinel lymph node.
The patient underwent laparoscopic cholecystectomy without complications.
The surgeon identifies the cystic duct and the cystic artery before clipping.
In this frame the grasper retracts the gallbladder fundus toward the right shoulder.
The critical view of safety is achieved before division of the cystic structures.
Bleeding from the liver bed is controlled with electrocautery.
The specimen is placed in a retrieval bag and removed through the umbilical port.
During colonoscopy a 1 cm sessile polyp was found in the ascending colon.
The polyp was removed by cold snare polypectomy.
Endoscopy shows erosive esophagitis, Los Angeles grade B.
The duodenal bulb and second portion of the duodenum are normal.
Video frames show the instrument approaching the target tissue.
The scope is withdrawn and the procedure is complete.
Question: Is there a pneumothorax in this image?
Answer: No, there is no pneumothorax.
Question: Which organ shows the abnormality?
Answer: The liver shows a hypodense lesion.
Question: What imaging modality was used?
Answer: This is an axial CT scan with intravenous contrast.
Question: Is the lesion benign or malignant?
Answer: The features favor a benign lesion, but correlation with prior imaging is advised.
Question: In which slice is the mass largest?
Answer: The mass is largest on slice 23 of the axial series.
Question: What is the plane of this MRI image?
Answer: The image is in the sagittal plane.
Question: Describe the findings in this pathology slide.
Answer: The slide shows sheets of atypical cells with prominent nucleoli.
Question: What happens in the video between 10 and 20 seconds?
Answer: The surgeon dissects the hepatocystic triangle.
Question: Are the lungs clear?
Answer: Yes, the lungs are clear.
Question: How many nodules are visible?
Answer: Two nodules are visible in the right lung.
Please describe this chest X-ray.
Write the radiology report for this CT volume.
Summarize the key findings and give an impression.
Compare the current study with the prior examination.
The findings are stable compared with the examination from last year.
Interval increase in size of the right hilar mass.
There has been interval resolution of the left lower lobe pneumonia.
Recommend clinical correlation and follow-up imaging.
The study is limited by motion artifact.
Bone windows show no lytic or sclerotic lesion.
Lung windows show centrilobular emphysema in the upper lobes.
The soft tissue window shows a heterogeneous enhancing mass.
The Hounsfield units of the lesion measure 45 before and 110 after contrast.
Diffusion-weighted imaging shows an acute infarct in the left middle cerebral artery territory.
There is a subdural hematoma along the right convexity measuring 8 mm.
The optic nerves and chiasm are normal.
Fundus photography shows microaneurysms and hard exudates consistent with diabetic retinopathy.
The optical coherence tomography shows subretinal fluid.
Dermoscopy shows an atypical pigment network with regression structures.
The fetal ultrasound shows a single live intrauterine pregnancy.
The estimated fetal weight is appropriate for gestational age.
The patient is a 64-year-old man with cough and fever for three days.
The patient is a 45-year-old woman with abdominal pain and jaundice.
History: trauma after a motor vehicle collision.
Technique: multiplanar multisequence MRI without and with gadolinium.
Comparison: none available.
Clinical indication: rule out appendicitis.
"""

_TEMPLATES = [
    "The {organ} measures {n}.{d} cm on the {plane} {series}.",
    "Slice {n} of {m} shows the {organ} at a spacing of {d}.{n} mm.",
    "At {n} seconds the camera shows the {organ}.",
    "Question: What is abnormal in the {organ}? Answer: a {n} mm {finding}.",
]
_FILL = {
    "organ": ["liver", "spleen", "lung", "kidney", "heart", "brain", "pancreas", "colon", "aorta", "gallbladder"],
    "plane": ["axial", "sagittal", "coronal"],
    "series": ["CT", "MRI", "ultrasound", "PET-CT", "radiograph"],
    "finding": ["nodule", "cyst", "mass", "lesion", "calcification", "polyp"],
}


def _tiny_corpus_lines(seed: int) -> list[str]:
    """The built-in corpus plus seed-dependent templated lines (numbers, organs, planes) in a seed-dependent order."""
    rng = random.Random(seed)
    lines = TINY_CORPUS.strip().splitlines()
    for _ in range(200):
        template = rng.choice(_TEMPLATES)
        lines.append(
            template.format(
                organ=rng.choice(_FILL["organ"]),
                plane=rng.choice(_FILL["plane"]),
                series=rng.choice(_FILL["series"]),
                finding=rng.choice(_FILL["finding"]),
                n=rng.randint(1, 99),
                m=rng.randint(100, 300),
                d=rng.randint(0, 9),
            )
        )
    lines += _chat_lines() * 20
    rng.shuffle(lines)
    return lines


def _chat_lines() -> list[str]:
    """The chat template's role lines and the embedded default's questions and answers. A real Qwen tokenizer codes
    such everyday English at about a token a word; without these lines the 1024-token BPE spent 29 tokens on the
    system turn and 10-18 on each question, a third of a training row's tokens and of its training time."""
    lines = [f"system\n{DEFAULT_SYSTEM_PROMPT}", "user\n", "assistant\n", CAPTION_QUESTION]
    lines += [q for questions in QUESTIONS.values() for q in questions]
    lines += [answer for answers in ANSWERS.values() for answer in answers]
    return lines


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A Qwen2-like byte-level BPE trained offline on a built-in medical corpus.

    Special tokens (fixed ids 0..6): <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos: this is a chat tokenizer),
    <|vision_start|>, <|vision_end|>, <|image_pad|>, <|frame_sep|>. Padding on the left (generation). Carries the
    OmniV-Med chat template. Same seed and vocab_size -> byte-identical tokenizer.json. The tokenizer has exactly
    `vocab_size` tokens up to about 1700 (beyond that the corpus runs out of merges; check `len(tokenizer)`).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,  # every pair may merge: the small corpus fills vocab_size
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus_lines(seed), trainer=trainer)
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != index:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {index}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "frame_token": FRAME_TOKEN,
            "vision_start_token": VISION_START,
            "vision_end_token": VISION_END,
        },
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )



REMOTE_CODE_FILES = (
    "configuration_omnivmed.py",
    "modeling_omnivmed.py",
    "processing_omnivmed.py",
    "pruning_omnivmed.py",
    "media_omnivmed.py",
    "media_base_omnivmed.py",
    "intensity_omnivmed.py",
    "volume_omnivmed.py",
    "picture_omnivmed.py",
    "dicom_omnivmed.py",
    "nifti_omnivmed.py",
    "video_omnivmed.py",
    "collator_omnivmed.py",
    "compat_omnivmed.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_omnivmed.OmniVMedConfig",
    "AutoModel": "modeling_omnivmed.OmniVMedModel",
    "AutoModelForImageTextToText": "modeling_omnivmed.OmniVMedForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_omnivmed.OmniVMedForConditionalGeneration",
    "AutoProcessor": "processing_omnivmed.OmniVMedProcessor",
}

# The tiny preset: a few million parameters, real patch size 14 so the processor defaults apply unchanged.
TINY_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, patch_size=14)
TINY_TEXT = dict(
    model_type="qwen2",
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
TINY_IMAGE_PROCESSOR = dict(max_pixels=224 * 224, video_max_pixels=112 * 112, max_slices=32, max_frames=32)


def token_ids(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    return dict(
        image_token_id=vocab[IMAGE_TOKEN],
        frame_token_id=vocab[FRAME_TOKEN],
        vision_start_token_id=vocab[VISION_START],
        vision_end_token_id=vocab[VISION_END],
    )


def tiny_model(tokenizer, seed: int) -> OmniVMedForConditionalGeneration:
    vocab_size = -(-len(tokenizer) // 64) * 64  # rows padded to a multiple of 64, as Qwen does
    text = dict(
        TINY_TEXT,
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        bos_token_id=None,
    )
    config = OmniVMedConfig(
        text_config=text, vision_config=TINY_VISION, tie_word_embeddings=True, **token_ids(tokenizer)
    )
    torch.manual_seed(seed)
    return OmniVMedForConditionalGeneration(config).eval()


MODEL_CARD = """---
license: {license}
{license_meta}library_name: {library_name}
pipeline_tag: image-text-to-text
tags:
- medical
- vision-language
- 3d
- video
- omnivmed
{extra_meta}---

# {title}

{description}

OmniV-Med reads 2D images, 3D volumes (NIfTI, DICOM series) and videos through one RoPE vision tower
(positions (t, h, w): slice or frame, row, column), drops visual tokens that repeat the previous slice/frame
(medical-aware token pruning), and answers in a Qwen2.5 language model.

## Intended use

Research on medical vision-language models: asking questions about, and describing, 2D medical images, 3D volumes
(CT / MR as NIfTI files or DICOM series) and medical videos (endoscopy, surgery); studying token pruning; a starting
point for fine-tuning on one's own data.

**Not for clinical use.** This model is not a medical device. It has not been validated for diagnosis, treatment,
triage, screening or any decision about a patient, and its answers can be wrong while sounding certain. Do not use it
on patients or to inform their care.

## Out of scope

- Clinical decisions or reports without qualified review, and any use outside a validated, regulated setting.
- Identifying people from their images; inferring sensitive attributes.
- Inputs other than images, volumes and videos (signals, genomics, records alone); languages other than English.

## Limitations

- Fluent but wrong answers (hallucinated findings, measurements or sides) happen; nothing here checks them.
- Token pruning drops visual tokens that barely change from the previous slice/frame: a small finding that changes
  little between slices can be dropped (`prune_threshold=0` keeps every token).
- Volumes are sampled to at most `max_slices` slices and videos to `max_frames` frames at `fps`: what lies between the
  samples is not seen. Intensities are windowed (CT) or percentile-normalised; unusual acquisitions may look wrong.
- The training data's sites, scanners and populations shape the answers; no fairness evaluation across groups exists.

## Training data

{training_data}

## Evaluation

{evaluation}

## Use

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
messages = [{{"role": "user", "content": [
    {{"type": "volume", "path": "scan.nii.gz"}},
    {{"type": "text", "text": "Which side is the lesion on?"}},
]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
inputs.pop("media_metadata")
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Fine-tuning with TRL needs nothing but this repo: `SFTTrainer(model=model, args=SFTConfig(...),
train_dataset=rows, data_collator=processor.data_collator(), processing_class=processor)` with rows
`{{"messages": [...], "images": []}}`. For LoRA on the language model only:
`LoraConfig(target_modules=model.lora_target_modules())` (the plain `["q_proj", "v_proj"]` also matches the vision
tower's projections).

## Architecture

| part | shape |
|---|---|
| vision tower | hidden {v_hidden}, {v_layers} layers, {v_heads} heads, patch {patch}, RoPE frequencies (t, h, w) = {rope} |
| projector | {merge_kind} merge (images {image_merge}x{image_merge}, volumes/videos {video_merge}x{video_merge}), 2-layer MLP |
| language model | {text_type}, hidden {t_hidden}, {t_layers} layers |
| parameters | {params:,} |
| pruning | threshold {prune_threshold} ({prune_unit} units, reference {prune_reference}, {prune_stage}) |

## Licence

{license_text}

## Citation

The method is that of the OmniV-Med paper (this repo's code is an independent implementation; no weights were
released with the paper):

```bibtex
@article{{jiang2025omnivmed,
  title   = {{OmniV-Med: Scaling Medical Vision-Language Model for Universal Visual Understanding}},
  author  = {{Jiang, Songtao and Wang, Yuan and Song, Sibo and Zhang, Yan and Meng, Zijie and Lei, Bohan and Wu, Jian
             and Sun, Jimeng and Liu, Zuozhu}},
  journal = {{arXiv preprint arXiv:2504.14692}},
  year    = {{2025}}
}}
```
"""
CODE_LICENSE = "apache-2.0"  # this repo's code, copied into every folder


def part_license(folder: Path, default: str | None = None) -> str | None:
    """The `license` of a pretrained part's model card (README.md front matter), else `default` (None: unknown)."""
    card = Path(folder) / "README.md"
    if card.is_file():
        from huggingface_hub.repocard import metadata_load

        try:
            license = (metadata_load(card) or {}).get("license")
        except Exception:  # a card without valid YAML says nothing about its licence
            license = None
        if license:
            return str(license)
    return default


def public_name(source: str) -> str:
    """A model named in a card: the Hub id, or a local folder's name only (a card never carries a local path)."""
    path = Path(str(source)).expanduser()
    return f"{path.name} (a local folder)" if path.exists() else str(source)


def card_license(parts) -> tuple[str, str, str]:
    """(license, extra YAML lines, Licence section) for a folder built from `parts`: (name, licence or None) pairs,
    besides this repo's code. One licence for all: that licence. Different or unknown ones: `license: other`, each
    part named with its licence, so nobody reads one part's terms as the whole's."""
    parts = [("OmniV-Med code (this repo)", CODE_LICENSE), *parts]
    licenses = {license for _, license in parts}
    lines = "\n".join(f"- {name}: {license or 'unknown (see its own model card)'}" for name, license in parts)
    if len(licenses) == 1 and None not in licenses:
        return parts[0][1], "", f"{parts[0][1]}, the licence of every part:\n\n{lines}"
    return ("other", "license_name: omnivmed-parts\n",
            "The parts come under different (or unknown) licences; each part's licence applies to that part: read them "
            f"all before using or sharing the whole.\n\n{lines}")


def write_model_card(out: Path, model, title: str, description: str, repo: str, extra_meta: str = "", parts=(),
                     training_data: str = "None: random weights.", evaluation: str = "Not evaluated.",
                     library_name: str = "transformers"):  # fmt: skip
    """The one model card of every folder the tools write (build, convert, train_trl's stages and final folder,
    LoRA adapters). `repo` is what the usage snippet loads (the Hub id where known); `parts`: (name, licence)."""
    c = model.config
    license, license_meta, license_text = card_license(parts)
    out.joinpath("README.md").write_text(
        MODEL_CARD.format(
            license=license,
            license_meta=license_meta,
            library_name=library_name,
            extra_meta=extra_meta,
            title=title,
            description=description,
            training_data=training_data,
            evaluation=evaluation,
            license_text=license_text,
            repo=repo,
            v_hidden=c.vision_config.hidden_size,
            v_layers=c.vision_config.num_hidden_layers,
            v_heads=c.vision_config.num_attention_heads,
            patch=c.vision_config.patch_size,
            rope=tuple(c.vision_config.rope_axes_dims),
            merge_kind=c.merge_kind,
            image_merge=c.image_merge_size,
            video_merge=c.video_merge_size,
            text_type=c.text_config.model_type,
            t_hidden=c.text_config.hidden_size,
            t_layers=c.text_config.num_hidden_layers,
            params=sum(p.numel() for p in model.parameters()),
            prune_threshold=c.prune_threshold,
            prune_unit=c.prune_unit,
            prune_reference=c.prune_reference,
            prune_stage=c.prune_stage,
        )
    )


def save_hub_folder(model, processor, out: Path, max_shard_size: str | int | None = None, original_format: bool = True,
                    **card) -> Path:  # fmt: skip
    """Everything a Hub repo needs: code, config with auto_map, safetensors (sharded above `max_shard_size`, e.g.
    "5GB"; transformers' default when None), processor, tokenizer, card. `original_format`: the weights under the key
    names they were loaded with (transformers' `save_original_format`); False: this code's own names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.auto_map = dict(AUTO_MAP)
    model.config.architectures = ["OmniVMedForConditionalGeneration"]
    model.generation_config = GenerationConfig(
        eos_token_id=sorted({processor.tokenizer.convert_tokens_to_ids(IM_END), processor.tokenizer.eos_token_id}),
        pad_token_id=processor.tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, save_original_format=original_format,
                          **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))  # fmt: skip
    # the processor refuses prompts longer than the tokenizer's model_max_length: no more than the LLM can place
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    if limit and processor.tokenizer.model_max_length > limit:
        processor.tokenizer.model_max_length = limit
    processor.save_pretrained(out)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(ROOT / name, out / name)
    write_model_card(out, model, **card)
    logger.info("wrote %s", out)
    return out


def build_tiny(out: Path, seed: int = 0) -> Path:
    # the tokenizer is part of the preset: the seed only changes the weights
    tokenizer = build_tiny_tokenizer(seed=0)
    model = tiny_model(tokenizer, seed)
    # the pruning rule and image_mean / image_std are the model config's (written once, in config.json)
    processor = OmniVMedProcessor(
        image_processor=OmniVMedImageProcessor(**TINY_IMAGE_PROCESSOR, **model.config.processor_settings()),
        tokenizer=tokenizer,
    )
    return save_hub_folder(
        model,
        processor,
        out,
        title="OmniV-Med tiny (random weights)",
        description="A randomly initialised tiny OmniV-Med for tests and the embedded default; its answers are noise "
        "until trained (`python train_trl.py`).",
        repo=out.name,
    )


# ================================================================================================= the int8 variant
# A weight-only int8 copy of a checkpoint, made once by torchao (transformers' TorchAoConfig) and saved as safetensors:
# transformers flattens torchao's Int8Tensor into plain tensors plus JSON metadata (torchao.prototype.safetensors), and
# the saved config.json carries the quantization_config, so from_pretrained(folder) rebuilds the int8 weights without
# quantizing again. Loading the bf16 source with the config instead quantizes at every load and keeps the bf16 pages
# mapped beside the int8 copy (BENCHMARKS.md, Low memory).
# Loading maps the shards and the rebuilt Int8Tensors are views of the mapped pages (0.45 GiB resident right after
# loading the 7B shape), so the shard size does not change the peak; a few hundred MB per file suits Hub transfers.
INT8_SHARD_SIZE = "300MB"
# copied from the source folder as they are; config, generation config and weights are written by save_pretrained
_WEIGHT_FILES = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
                           r"(\.index\.json)?|pytorch_model.*|.*\.bin)$")  # fmt: skip


def int8_config():
    """transformers' TorchAoConfig for torchao's weight-only int8 (per output row, symmetric): every nn.Linear but
    the output head; the embeddings stay in the source dtype (torchao's Int8Tensor embedding lookup dequantizes the
    whole table on every call)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as error:
        raise ImportError("the int8 variant needs torchao: pip install -r requirements-int8.txt") from error
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def is_int8_linear(module) -> bool:
    """An nn.Linear whose weight is torchao's int8 tensor (what the int8 variant holds)."""
    return isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "Int8Tensor"


def quantize_int8(src, out, max_shard_size: str | int = INT8_SHARD_SIZE) -> Path:
    """Write the int8 weight-only variant of the checkpoint folder `src` to `out`: a complete Hub folder (the source's
    code, processor, tokenizer and card, which gains a section saying what was done) that
    `AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)` loads as int8 with no quantization
    config. The source is read memory-mapped in its dtype (bf16 / fp32 as saved; no fp32 copy of a bf16 model)."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: not a checkpoint folder (no config.json)")
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the int8 variant must go to another folder than its source")
    quantized = read_json(src / "config.json").get("quantization_config")
    if quantized:
        raise ValueError(f"{src}: already quantized ({quantized})")
    model = AutoModelForImageTextToText.from_pretrained(src, dtype="auto", trust_remote_code=True,
                                                        quantization_config=int8_config())  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and not _WEIGHT_FILES.match(path.name):
            shutil.copyfile(path, out / path.name)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    int8 = sum(is_int8_linear(m) for m in linear)
    card = out / "README.md"
    if card.is_file():
        import torchao

        with card.open("a") as f:
            f.write(
                f"\n## int8 weight-only variant\n\nThis folder is the int8 weight-only variant of "
                f"{public_name(str(src))}, made by `python quantize_omnivmed.py SRC OUT` with torchao "
                f"{torchao.__version__} (`Int8WeightOnlyConfig`: symmetric int8 per output row) through transformers' "
                f"`TorchAoConfig`: {int8} of {len(linear)} Linear layers are int8 (the output head, the embeddings "
                "and the norms keep the source's dtype). Loading needs torchao installed; no quantization config is "
                "passed: `config.json` carries it.\n"
            )
    logger.info("wrote %s (%d of %d Linear layers int8)", out, int8, len(linear))
    return out


# ================================================================================================= answers and scoring
# One normaliser for training (build_instruct's duplicate check), evaluation and the embedded default: the published
# VQA benchmarks' rule (evaluate_omnivmed.py reports them).
ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalize_answer(text: str) -> str:
    """Lower case, NFKC, punctuation and underscores -> spaces, articles (a, an, the) dropped, number words zero..ten
    -> digits, whitespace collapsed. "The LEFT lung." -> "left lung"; "Calot_Triangle dissection" -> "calot triangle
    dissection"; "two" -> "2"."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    words = PUNCTUATION.sub(" ", text).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def yes_no(text: str) -> str | None:
    """"yes" / "no" when the normalised answer starts with that word ("No, there is no effusion." -> "no"), else
    None ("There is no effusion." and "normal" are not answers to a yes/no question)."""
    words = tokens(text)
    return words[0] if words and words[0] in ("yes", "no") else None


def closed_correct(prediction: str, answer: str) -> bool:
    """Clean closed-ended rule: a yes/no reference is matched by `yes_no`; any other closed reference (e.g. "left",
    "axial", "ct") by exact match after `normalize_answer`."""
    reference = normalize_answer(answer)
    if reference in ("yes", "no"):
        return yes_no(prediction) == reference
    return normalize_answer(prediction) == reference


def token_overlap(prediction: str, answer: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of the normalised word multisets, counts clipped (a word repeated in the prediction
    counts at most as often as in the reference). Empty prediction or reference -> zeros."""
    pred, ref = collections.Counter(tokens(prediction)), collections.Counter(tokens(answer))
    overlap = sum((pred & ref).values())
    if not pred or not ref or not overlap:
        return 0.0, 0.0, 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return precision, recall, 2 * precision * recall / (precision + recall)


# ================================================================================================= pretrained checkpoints
WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


class BuildError(ValueError):
    """The parts cannot be composed as asked (unknown layout, unexpected or missing tensors, wrong shapes)."""


@dataclasses.dataclass
class TensorRef:
    folder: Path
    file: str
    key: str
    shape: tuple
    dtype: str


def resolve_checkpoint(id_or_dir: str, allow_patterns: list[str], revision: str | None = None) -> Path:
    """A local folder as is; anything else is a Hub repo id, fetched with snapshot_download (config, safetensors,
    tokenizer files; never pickle checkpoints)."""
    path = Path(id_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise BuildError(f"{id_or_dir} is a file; give a checkpoint folder or a Hub repo id")
    from huggingface_hub import snapshot_download

    logger.info("fetching %s from the Hub", id_or_dir)
    try:
        return Path(snapshot_download(repo_id=id_or_dir, revision=revision, allow_patterns=allow_patterns))
    except Exception as error:  # offline, unknown repo, gated repo without a token: say which part failed
        raise BuildError(
            f"{id_or_dir} is not a local folder and could not be fetched from the Hub "
            f"({type(error).__name__}: {error})"
        ) from error


def read_tensor_index(folder: Path) -> dict[str, TensorRef]:
    """Names, shapes and dtypes of a checkpoint's tensors from the safetensors headers (no tensor data read)."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir())
        raise BuildError(
            f"{folder}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or *.safetensors (found {found}); pickle checkpoints "
            "(pytorch_model.bin) are not read"
        )
    tensors = {}
    for name in files:
        if not (folder / name).is_file():
            raise BuildError(f"{folder}: shard {name} listed in {WEIGHTS_INDEX_NAME} is missing")
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                tensors[key] = TensorRef(folder, name, key, tuple(view.get_shape()), view.get_dtype())
    if index.is_file():
        listed, stored = set(json.loads(index.read_text())["weight_map"]), set(tensors)
        if listed != stored:
            raise BuildError(
                f"{folder}: {WEIGHTS_INDEX_NAME} and the shards disagree: listed but not stored "
                f"{short(sorted(listed - stored))}, stored but not listed {short(sorted(stored - listed))}"
            )
    return tensors


# ================================================================================================= answering
def answer(model, processor, messages: list[dict], max_new_tokens: int = 128, prune_threshold: float | None = None,
           out=sys.stdout) -> str:  # fmt: skip
    """Generate the assistant's reply to `messages`, writing it to `out` piece by piece (TextIteratorStreamer)."""
    extra = {} if prune_threshold is None else {"prune_threshold": prune_threshold}
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **extra
    )
    inputs.pop("media_metadata", None)
    # the model refuses positions past its LLM's max_position_embeddings: fit the reply into what is left
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit:
        room = limit - inputs["input_ids"].shape[1]
        if room < 1:
            raise ValueError(f"the conversation is {inputs['input_ids'].shape[1]} tokens long (media expanded) and "
                             f"the model takes at most {limit}, leaving no room for a reply: start a new conversation "
                             "or give fewer media")  # fmt: skip
        if room < max_new_tokens:
            print(f"[the reply is cut at {room} tokens: the model takes at most {limit}]", file=sys.stderr)
            max_new_tokens = room
    inputs = inputs.to(model.device)

    def emit(piece: str):
        out.write(piece)
        out.flush()

    text, _ = stream_generate(model, processor.tokenizer, inputs, max_new_tokens, emit)
    out.write("\n")
    out.flush()
    return text


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generate(model, tokenizer, inputs, max_new_tokens: int, emit, stop: threading.Event | None = None):
    """Greedy generation in a worker thread; each decoded piece goes to `emit` as it comes (TextIteratorStreamer).
    `stop`, set from any thread (a user pressing Stop, a page closing), ends the generation at its next token.
    Returns (the reply text, the generated ids: prompt + reply)."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(stop)])
    result, failure = {}, []

    def run():
        try:
            with torch.inference_mode():
                result["ids"] = model.generate(**kwargs)
        except BaseException as error:  # surfaced in the caller's thread below
            failure.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        emit(piece)
    thread.join()
    if failure:
        raise failure[0]
    return "".join(pieces).strip(), result.get("ids")


# ================================================================================================= showing what pruning keeps
def patches_to_frames(pixel_values, grid_thw, merge, patch, image_mean, image_std) -> np.ndarray:
    """Undo the processor's patching and normalisation for one item: (N, 3*p*p) -> (T, H, W, 3) in [0, 1]."""
    t, gh, gw = (int(v) for v in grid_thw)
    x = pixel_values.reshape(t, gh // merge, gw // merge, merge, merge, 3, patch, patch)
    x = x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(t, 3, gh * patch, gw * patch)
    mean = torch.tensor(image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_std).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def frame_labels(meta: dict) -> list[str]:
    t = meta["num_frames"]
    if meta.get("timestamps_s"):
        return [f"{s:.1f} s" for s in meta["timestamps_s"]]
    if meta.get("slice_positions_mm"):
        return [f"slice {i} ({z:.0f} mm)" for i, z in zip(meta["slice_indices"], meta["slice_positions_mm"])]
    return [f"frame {i}" for i in range(t)]


def montage(frames: np.ndarray, keep: np.ndarray, block: int, labels, title: str, columns: int | None = None):
    """frames (T, H, W, 3) in [0, 1]; keep (T, H/block, W/block) bool."""
    t, h, w, _ = frames.shape
    columns = columns or min(t, max(1, math.ceil(math.sqrt(t * h / w))))
    rows = math.ceil(t / columns)
    scale = max(1, 160 // max(h, w))
    tile_h, tile_w, label_h, title_h, pad = h * scale, w * scale, 14, 22, 4
    canvas = Image.new("RGB", (columns * (tile_w + pad) + pad, title_h + rows * (tile_h + label_h + pad) + pad), "black")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((pad, 4), title, fill="white", font=font)
    for f in range(t):
        # dim pruned blocks so what the LLM still sees stands out
        shade = np.repeat(np.repeat(np.where(keep[f], 1.0, 0.3), block, 0), block, 1)[..., None]
        tile = Image.fromarray((frames[f] * shade * 255).astype(np.uint8)).resize((tile_w, tile_h), Image.NEAREST)
        x0 = pad + (f % columns) * (tile_w + pad)
        y0 = title_h + (f // columns) * (tile_h + label_h + pad)
        canvas.paste(tile, (x0, y0))
        tile_draw = ImageDraw.Draw(canvas)
        for r, c in zip(*np.nonzero(keep[f])):
            bx, by = x0 + c * block * scale, y0 + r * block * scale
            tile_draw.rectangle([bx, by, bx + block * scale - 1, by + block * scale - 1], outline=(0, 220, 90))
        kept, total = int(keep[f].sum()), keep[f].size
        draw.text((x0, y0 + tile_h + 1), f"{labels[f]}  {kept}/{total}", fill="white", font=font)
    return canvas


def visualize(source, out, kind=None, threshold=None, processor=None, columns=None, **options) -> dict:
    processor = processor or OmniVMedImageProcessor()
    overrides = dict(options)
    if threshold is not None:
        overrides["prune_threshold"] = threshold
    batch = processor([source], kind=kind, return_tensors="pt", **overrides)
    meta = batch["media_metadata"][0]
    merge, patch = int(batch["merge_sizes"][0]), processor.patch_size
    frames = patches_to_frames(
        batch["pixel_values"], batch["grid_thw"][0], merge, patch, processor.image_mean, processor.image_std
    )
    t, gh, gw = (int(v) for v in batch["grid_thw"][0])
    keep = batch["visual_keep_mask"].reshape(t, gh // merge, gw // merge).numpy()
    report = meta["pruning_report"]
    settings = processor._settings(**{k: v for k, v in overrides.items() if k in processor._settings()})
    title = (
        f"{Path(str(meta['source'])).name}: {report['tokens_after']}/{report['tokens_before']} tokens kept "
        f"({100 * report['kept_fraction']:.0f} %), threshold {settings['prune_threshold']} "
        f"({settings['prune_unit']}, {settings['prune_reference']})"
    )
    montage(frames, keep, merge * patch, frame_labels(meta), title, columns).save(out)
    logger.info("%s -> %s", title, out)
    return report


# ================================================================================================= synthetic media
def endoscopic_scene(size: int, seed: int = 0) -> np.ndarray:
    """A static 'endoscopic' background: smooth pink texture, (size, size, 3) in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    texture = sum(
        np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        for fx, fy, phase in rng.uniform([1, 1, 0], [6, 6, 2 * np.pi], size=(8, 3))
    )
    texture = (texture - texture.min()) / np.ptp(texture)
    return np.stack([0.55 + 0.35 * texture, 0.25 + 0.2 * texture, 0.25 + 0.15 * texture], -1)


def write_mjpeg(path: Path, frames, fps: float = 1, options: dict | None = None) -> Path:
    """Motion-JPEG in AVI from (H, W, 3) uint8 frames (any iterable, so a long clip need not exist whole): every frame
    is coded on its own, so the same frames always give the same bytes (x264 does not), and writing is fast."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=fps, options=options or {})
        stream.pix_fmt = "yuvj420p"
        for i, frame in enumerate(frames):
            if i == 0:
                stream.height, stream.width = frame.shape[:2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_instrument_video(path: Path, seconds: int = 64, fps: int = 8, size: int = 224, seed: int = 0) -> Path:
    """A static 'endoscopic' scene (smooth pink texture) with a grey instrument sweeping left to right and back."""
    import av

    scene = endoscopic_scene(size, seed)
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "18"}
    n = seconds * fps
    for i in range(n):
        frame = scene.copy()
        phase = (i / n) * 2  # one sweep right, one back
        x = int((phase if phase < 1 else 2 - phase) * (size - 40))
        y = size // 2 + int(20 * np.sin(2 * np.pi * i / n))
        frame[y - 6 : y + 6, : x + 30] = 0.75  # shaft from the left edge
        frame[y - 12 : y + 12, x + 30 : x + 40] = 0.9  # jaws
        image = av.VideoFrame.from_ndarray((frame * 255).astype(np.uint8), format="rgb24")
        for packet in stream.encode(image):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


# ================================================================================================= media statistics
def image_statistics(folder: Path, default: tuple, default_name: str) -> tuple[list[float], list[float]]:
    """image_mean / image_std of a pretrained part's preprocessor_config.json, else `default` (with a warning)."""
    pre = read_json(folder / "preprocessor_config.json")
    if "image_mean" in pre and "image_std" in pre:
        return [float(v) for v in pre["image_mean"]], [float(v) for v in pre["image_std"]]
    logger.warning("%s has no preprocessor_config.json with image_mean/std: using %s", folder, default_name)
    return default
