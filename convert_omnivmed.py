"""Convert the public Hulu-Med and VideoLLaMA3 checkpoints into complete OmniV-Med Hub folders, by a pure weight map.

    python convert_omnivmed.py --from hulumed --src ZJU-AI4H/Hulu-Med-7B --out Hulu-Med-7B-omnivmed
    python convert_omnivmed.py --from videollama3 --src DAMO-NLP-SG/VideoLLaMA3-7B --out VideoLLaMA3-7B-omnivmed
    python convert_omnivmed.py --from hulumed --src ZJU-AI4H/Hulu-Med-7B --out H7-ours --processing omnivmed
    python convert_omnivmed.py --from hulumed --src ./fixture --out ./converted --tiny-tokenizer   # tokenizer-less

Both families share one tower (a SigLIP-shaped NaViT over packed 14x14 patches with 2D RoPE), a 2x2 average merge
and a two-layer GELU MLP projector in front of a Qwen2 / Qwen3 LLM, so every tensor maps 1:1 onto OmniV-Med's names
(the Conv2d patch embedding (D, 3, p, p) is flattened into the equivalent Linear over (C, p, p) patches) and the
behaviour is carried by the config:

    vision_config.rope_axes_dims = [0, head_dim/4, head_dim/4]   (t gets no frequencies; [row | col] repeated twice)
    image_merge_size = 1, video_merge_size = 2, merge_kind = "average", projector_hidden_act = "gelu" (exact erf)
    prune_* = the source's token compression (compatibility mode, the default) or OmniV-Med's rule
    (`--processing omnivmed`); the processor's `compat_mode` reproduces the source's input path (compat_omnivmed.py).

Key layouts read (`model.safetensors` or sharded with `model.safetensors.index.json`):
    remote   Hulu-Med (`hulumed_qwen2`, Qwen2.5 or Qwen3 LLM) and the original VideoLLaMA3 remote-code checkpoints
             (`videollama3_qwen2`): `model.vision_encoder.{embeddings.patch_embedding, encoder.layers.N.*,
             post_layernorm}`, `model.mm_projector.readout.{0,2}`, `model.{embed_tokens,layers,norm}`, `lm_head`.
    native   transformers' own VideoLLaMA3 port (`video_llama_3`): `model.vision_model.*`, `model.projector.readout.*`,
             `model.language_model.*`, `lm_head`.
Every source tensor must map onto an expected OmniV-Med tensor of the right shape and every expected tensor must be
given, else the conversion stops (before writing anything) with the lists of unknown, missing and mismatched keys.

Memory: the target model is built on the meta device (names and shapes only); tensors are streamed one at a time with
`safetensors.safe_open` and written into output shards of at most `--max-shard-size`, so peak RAM is about one output
shard and disk is the output size (plus the download when `--src` is a Hub id).
"""

import argparse
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig

from omnivmed.compat_omnivmed import chat_template as compat_chat_template
from omnivmed.configuration_omnivmed import OmniVMedConfig
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration
from omnivmed.processing_omnivmed import (
    CHAT_TEMPLATE,
    FRAME_TOKEN,
    IM_END,
    IMAGE_TOKEN,
    VISION_END,
    VISION_START,
    OmniVMedImageProcessor,
    OmniVMedProcessor,
)
from omnivmed_tools import image_statistics as folder_image_statistics
from omnivmed_tools import (
    AUTO_MAP,
    REMOTE_CODE_FILES,
    ROOT,
    BuildError,
    TensorRef,
    build_tiny_tokenizer,
    part_license,
    public_name,
    push_folder,
    read_json,
    read_tensor_index,
    resolve_checkpoint,
    short,
    token_ids,
    write_model_card,
)


logger = logging.getLogger("convert_omnivmed")

FAMILIES = ("hulumed", "videollama3")
# "compat": the folder processes inputs as the source does (sizes, prompt text, volumes, pruning: compat_omnivmed.py);
# "omnivmed": OmniV-Med's own processing (RAS volumes, HU windows, frame separators, last-kept pruning)
PROCESSING = ("compat", "omnivmed")
# transformers 5.24 video_llama_3 class defaults, for a native folder without processor files:
# VideoLlama3ImageProcessorPil.size and VideoLlama3VideoProcessor.size / max_frames
VL3_IMAGE_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
VL3_VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
VL3_MAX_FRAMES = 180
# Hulu-Med a0060ad: mm_utils.load_images' nii_num_slices default; README "Video Example" (load_video at fps 1,
# max_frames 1800)
HULUMED_NII_NUM_SLICES, HULUMED_MAX_FRAMES = 180, 1800
# original VideoLLaMA3 (github.com/DAMO-NLP-SG/VideoLLaMA3 05cee23, inference/transformers_api/processing_videollama3.py
# `Videollama3Qwen2Processor.__init__` defaults, overridden by a folder's processor_config.json): fps 1, max_frames 128,
# image_merge_size 1, video_merge_size 2
VL3_REMOTE_PROCESSOR = {"fps": 1, "max_frames": 128, "image_merge_size": 1, "video_merge_size": 2}
# config model_type -> (family, key layout)
SOURCE_MODEL_TYPES = {
    "hulumed_qwen2": ("hulumed", "remote"),
    "hulumed_qwen3": ("hulumed", "remote"),
    "videollama3_qwen2": ("videollama3", "remote"),
    "video_llama_3": ("videollama3", "native"),
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]
# when the source folder has no preprocessor_config.json: Hulu-Med's is CLIP (checked against the fixtures);
# VideoLLaMA3's is SigLIP's 0.5 / 0.5 as in transformers' port (UNVERIFIED for the remote-code checkpoints)
FAMILY_MEAN_STD = {"hulumed": (CLIP_MEAN, CLIP_STD), "videollama3": (HALF, HALF)}
# both families' image processors: min_tokens = 16, max_tokens = 16384 LLM tokens per call
DEFAULT_MIN_TOKENS, DEFAULT_MAX_TOKENS = 16, 16384
# their tower's RoPE base (hard-coded in their code, recorded in the fixtures)
THEIR_ROPE_THETA = 10000.0
IGNORED_KEYS = (re.compile(r".*rotary_(?:pos_)?emb\.(?:original_)?inv_freq$"),)  # stale non-persistent buffers
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "README.md", "LICENSE*"]
TEXT_KEYS = (  # what the flat (remote-code) config holds for the LLM; the rest is multimodal or generic
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_bias", "attention_dropout", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "initializer_range", "use_cache", "bos_token_id", "eos_token_id",
    "pad_token_id", "tie_word_embeddings",
)  # fmt: skip


class ConversionError(BuildError):
    """The source cannot be expressed exactly (unknown / missing / mis-shaped tensors, unsupported settings)."""


# ------------------------------------------------------------------------------------------------------ key mapping
_VISION_LAYER = r"encoder\.layers\.(\d+)\.(layer_norm[12]|self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.(weight|bias)"
KEY_RULES = {
    # `vision_encoder.vision_encoder.` is the layout of their training code (scripts/convert_hf_checkpoint.py)
    "remote": [
        (r"model\.vision_encoder\.(?:vision_encoder\.)?embeddings\.patch_embedding\.(weight|bias)",
         r"model.vision_tower.patch_embedding.\1"),
        (r"model\.vision_encoder\.(?:vision_encoder\.)?" + _VISION_LAYER, r"model.vision_tower.layers.\1.\2.\3"),
        (r"model\.vision_encoder\.(?:vision_encoder\.)?post_layernorm\.(weight|bias)",
         r"model.vision_tower.post_layernorm.\1"),
        (r"model\.mm_projector\.readout\.0\.(weight|bias)", r"model.projector.linear_1.\1"),
        (r"model\.mm_projector\.readout\.2\.(weight|bias)", r"model.projector.linear_2.\1"),
        (r"model\.((?:embed_tokens|layers|norm)\..+)", r"model.language_model.\1"),
        (r"lm_head\.weight", r"lm_head.weight"),
    ],
    "native": [
        (r"model\.vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"model.vision_tower.patch_embedding.\1"),
        (r"model\.vision_model\." + _VISION_LAYER, r"model.vision_tower.layers.\1.\2.\3"),
        (r"model\.vision_model\.post_layernorm\.(weight|bias)", r"model.vision_tower.post_layernorm.\1"),
        (r"model\.projector\.readout\.0\.(weight|bias)", r"model.projector.linear_1.\1"),
        (r"model\.projector\.readout\.2\.(weight|bias)", r"model.projector.linear_2.\1"),
        (r"model\.language_model\.(.+)", r"model.language_model.\1"),
        (r"lm_head\.weight", r"lm_head.weight"),
    ],
}  # fmt: skip
KEY_RULES = {layout: [(re.compile(p), t) for p, t in rules] for layout, rules in KEY_RULES.items()}
PATCH_EMBEDDING = "model.vision_tower.patch_embedding.weight"


def map_key(key: str, layout: str) -> str | None:
    """OmniV-Med name of a source tensor; None when no rule knows it."""
    for pattern, target in KEY_RULES[layout]:
        if pattern.fullmatch(key):
            return pattern.sub(target, key)
    return None


def convert_tensor(target: str, tensor: torch.Tensor) -> torch.Tensor:
    # a Conv2d(kernel p, stride p) weight (D, C, p, p) flattened row-major is the Linear over (C, p, p) patches
    return tensor.reshape(tensor.shape[0], -1) if target == PATCH_EMBEDDING else tensor


def converted_shape(target: str, shape: tuple) -> tuple:
    return (shape[0], math.prod(shape[1:])) if target == PATCH_EMBEDDING else tuple(shape)


# ------------------------------------------------------------------------------------------------------ the source
@dataclass
class Source:
    folder: Path
    config: dict
    family: str
    layout: str
    tensors: dict[str, TensorRef] = field(default_factory=dict)

    @property
    def text_type(self) -> str:
        """qwen2 or qwen3, decided by the weights (Qwen3 has q/k norms; the Hulu-Med 14B config still says qwen2)."""
        return "qwen3" if any(".self_attn.q_norm." in k for k in self.tensors) else "qwen2"


def resolve_source(src: str, revision: str | None = None) -> Path:
    """A local folder as is; anything else is a Hub repo id, downloaded (config, safetensors, tokenizer, card)."""
    return resolve_checkpoint(src, HUB_ALLOW_PATTERNS, revision)


def read_source(folder: Path, family: str) -> Source:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type not in SOURCE_MODEL_TYPES:
        raise ConversionError(
            f"{folder}: config model_type {model_type!r} is not one this converter knows "
            f"({sorted(SOURCE_MODEL_TYPES)})"
        )
    src_family, layout = SOURCE_MODEL_TYPES[model_type]
    if src_family != family:
        raise ConversionError(f"{folder} is a {src_family} checkpoint (model_type {model_type!r}), not {family}")
    source = Source(folder=folder, config=config, family=family, layout=layout)

    try:
        source.tensors = read_tensor_index(folder)
    except BuildError as error:  # the converter's callers catch ConversionError
        raise ConversionError(str(error)) from error
    return source


# ------------------------------------------------------------------------------------------------------ the config
def text_config_dict(source: Source) -> dict:
    cfg = source.config
    if source.layout == "native":
        text = dict(cfg["text_config"])
    else:
        text = {k: cfg[k] for k in TEXT_KEYS if k in cfg}
    declared = str(text.get("model_type", "")) + " ".join(cfg.get("architectures") or [])
    if source.text_type == "qwen2" and "qwen3" in declared.lower():
        raise ConversionError("the config declares a Qwen3 LLM but the weights have no q_norm / k_norm")
    text["model_type"] = source.text_type
    if "rope_parameters" not in text:  # pre-v5 names: rope_theta + rope_scaling (None, or a dict with its type)
        scaling = dict(text.pop("rope_scaling", None) or {})
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        text["rope_parameters"] = {"rope_type": rope_type, "rope_theta": text.pop("rope_theta", 10000.0), **scaling}
    if source.text_type == "qwen2":
        text.pop("head_dim", None)  # Qwen2 derives it
    return text


def vision_config_dict(source: Source) -> dict:
    cfg = source.config
    if source.layout == "native":
        vision = cfg["vision_config"]
        rope = vision.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConversionError(f"vision rope_type {rope['rope_type']!r} is not the axial 2D RoPE this maps")
        theta = rope.get("rope_theta", THEIR_ROPE_THETA)
    else:
        vision = cfg.get("vision_encoder_config")
        if not isinstance(vision, dict):
            raise ConversionError(
                "the config has no vision_encoder_config (a checkpoint that still points at a separate vision "
                f"encoder, vision_encoder={cfg.get('vision_encoder')!r}, is a training checkpoint: export it first)"
            )
        theta = THEIR_ROPE_THETA
    patch = vision.get("patch_size", 14)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ConversionError(f"non-square patches {patch} are not supported")
        patch = patch[0]
    out = {k: vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    head_dim = out["hidden_size"] // out["num_attention_heads"]
    if head_dim % 4:
        raise ConversionError(f"the tower's head_dim {head_dim} is not divisible by 4 (their RoPE needs hd/4 per axis)")
    out.update(
        num_channels=vision.get("num_channels", 3),
        patch_size=int(patch),
        hidden_act=vision.get("hidden_act", "gelu_pytorch_tanh"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        attention_dropout=vision.get("attention_dropout", 0.0),
        rope_theta=float(theta),
        rope_axes_dims=[0, head_dim // 4, head_dim // 4],
        attention_scope="frame",
    )
    return out


def compat_mode_for(source: Source) -> str:
    """The compatibility mode whose published rules this source's checkpoints were made with: Hulu-Med's own code,
    transformers' VideoLLaMA3 port for its native folders, the original VideoLLaMA3 remote code for
    `videollama3_qwen2` folders (compat_omnivmed.py names the files and commits)."""
    if source.family == "hulumed":
        return "hulumed"
    return "videollama3" if source.layout == "native" else "videollama3_remote"


def source_uses_token_compression(source: Source) -> bool:
    if source.layout == "native":  # transformers' port: a video processor setting, on by default
        video = read_json(source.folder / "video_preprocessor_config.json")
        return bool(video.get("use_token_compression", True))
    return bool(source.config.get("use_token_compression", False))


def pruning_settings(source: Source, compat: bool) -> dict:
    """OmniV-Med's rule, or (compat) the source's token compression:
    Hulu-Med: mean |delta| of the normalised block vs the previous frame > 0.1; its first-frame sentinel is divided by
        255 too, so the first frame keeps only min_tokens (1) tokens.
    VideoLLaMA3: mean |delta| * 255 > 0.1, i.e. > 0.1 / 255 in normalised units; the first frame is kept whole.
    Both run the tower on every patch and drop tokens after it (post_encoder)."""
    ours = dict(prune_threshold=0.1, prune_reference="last_kept", prune_unit="normalized", prune_keep_first_frame=True,
                prune_min_tokens=1, prune_min_tokens_pick="most_changed")  # fmt: skip
    if not compat:
        return ours
    if not source_uses_token_compression(source):
        return dict(ours, prune_threshold=0.0)
    threshold = 0.1 if source.family == "hulumed" else 0.1 / 255.0
    # both fill a frame below min_tokens with its first tokens (`mask[padding_ids, :min_tokens] = 1` in Hulu-Med
    # a0060ad hulumed_arch.py `_get_compression_mask` and in transformers' VideoLLaMA3 video processor)
    return dict(prune_threshold=threshold, prune_reference="previous", prune_unit="normalized",
                prune_keep_first_frame=source.family != "hulumed", prune_min_tokens=1,
                prune_min_tokens_pick="first")  # fmt: skip


def omnivmed_config(source: Source, token_ids: dict, mean_std, compat_pruning: bool, dtype: str) -> OmniVMedConfig:
    cfg = source.config
    if source.layout == "remote":
        projector = cfg.get("mm_projector_type", "mlp2x_gelu")
        if projector != "mlp2x_gelu":
            raise ConversionError(f"mm_projector_type {projector!r}: only mlp2x_gelu (Linear, GELU, Linear) maps")
    text = text_config_dict(source)
    tie = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    text["tie_word_embeddings"] = tie
    config = OmniVMedConfig(
        vision_config=vision_config_dict(source),
        text_config=text,
        image_merge_size=1,
        video_merge_size=2,
        merge_kind="average",
        projector_hidden_act="gelu",
        prune_stage="post_encoder",
        image_mean=list(mean_std[0]),
        image_std=list(mean_std[1]),
        tie_word_embeddings=tie,
        **pruning_settings(source, compat_pruning),
        **token_ids,
    )
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["OmniVMedForConditionalGeneration"]
    config.dtype = dtype
    return config


# ------------------------------------------------------------------------------------------------------ the processor
def image_statistics(source: Source) -> tuple[list, list]:
    return folder_image_statistics(source.folder, FAMILY_MEAN_STD[source.family], f"the {source.family} default")


def image_processor_settings(source: Source, config: OmniVMedConfig, mode: str | None = None) -> dict:
    """Their preprocessing as far as OmniV-Med's per-item settings express it: sides multiples of patch * merge
    (images merge 1, videos 2), bicubic, rescale 1/255, their mean/std, pixel bounds from their token budget
    (min_tokens * factor**2 per item; max_tokens * factor**2 shared by all frames of a call). Exact where no resize
    happens; resized frames differ by the kernel (theirs: PIL bicubic on uint8), see the README."""
    p = config.vision_config.patch_size
    pre = read_json(source.folder / "preprocessor_config.json")
    resample = pre.get("resample", 3)
    if resample not in (3, "bicubic"):
        raise ConversionError(f"the source image processor resamples with {resample!r}; only bicubic (3) maps")
    settings = dict(
        patch_size=p,
        image_merge_size=config.image_merge_size,
        video_merge_size=config.video_merge_size,
        resample="bicubic",
        # the pruning rule and mean / std: the config's (config.json is their one source; the processor files saved
        # beside it do not repeat the rule)
        **config.processor_settings(),
        # their resize is PIL bicubic on uint8 (transformers' image processors on uint8 inputs)
        resize_backend="pil",
    )
    max_frames = 64  # OmniVMedImageProcessor's default frame budget
    if source.layout == "native":
        size = pre.get("size") or {}
        video = read_json(source.folder / "video_preprocessor_config.json")
        video_size = video.get("size") or {}
        default_video_max = VL3_VIDEO_SIZE["longest_edge"] if mode else 28 * 28 * 1280
        settings.update(
            min_pixels=int(size.get("shortest_edge", pre.get("min_pixels", VL3_IMAGE_SIZE["shortest_edge"]))),
            max_pixels=int(size.get("longest_edge", pre.get("max_pixels", VL3_IMAGE_SIZE["longest_edge"]))),
            # compat: the whole clip's budget, divided by its frame count per call (compat_omnivmed.videollama3_size)
            video_max_pixels=int(video_size.get("longest_edge", video.get("max_pixels", default_video_max))),
        )
        if mode:
            settings["video_min_pixels"] = int(video_size.get("shortest_edge", video.get(
                "min_pixels", VL3_VIDEO_SIZE["shortest_edge"])))  # fmt: skip
            max_frames = int(video.get("max_frames", VL3_MAX_FRAMES))
    else:
        min_tokens = int(pre.get("min_tokens", DEFAULT_MIN_TOKENS))
        max_tokens = int(pre.get("max_tokens", DEFAULT_MAX_TOKENS))
        image_factor = p * config.image_merge_size
        video_factor = p * config.video_merge_size
        settings.update(
            # their minimum is min_tokens at the item's own factor (merge 1 for images, 2 for video)
            min_pixels=min_tokens * image_factor**2,
            video_min_pixels=min_tokens * video_factor**2,
            max_pixels=max_tokens * image_factor**2,
            # their budget max_tokens * factor**2 is shared by all frames of a call: per frame of a max_frames clip
            video_max_pixels=max(min_tokens * video_factor**2, max_tokens * video_factor**2 // max_frames),
            max_total_visual_tokens=max_tokens,
        )
        if mode == "hulumed":
            max_frames = HULUMED_MAX_FRAMES
            settings["max_slices"] = HULUMED_NII_NUM_SLICES
        elif mode == "videollama3_remote":
            proc = {**VL3_REMOTE_PROCESSOR, **read_json(source.folder / "processor_config.json")}
            merges = (int(proc["image_merge_size"]), int(proc["video_merge_size"]))
            if merges != (config.image_merge_size, config.video_merge_size):
                raise ConversionError(f"the source processor merges images / videos by {merges}; only (1, 2) maps")
            if proc["fps"] is None or float(proc["fps"]) <= 0:
                raise ConversionError(f"the source processor samples videos at fps={proc['fps']!r}; only fps > 0 maps")
            max_frames = int(proc["max_frames"])
            settings["fps"] = float(proc["fps"])
    settings["max_frames"] = max_frames
    settings["compat_mode"] = mode
    return settings


def load_tokenizer(source: Source, tokenizer_dir: str | None, tiny: bool, vocab_rows: int,
                   chat_template: str = CHAT_TEMPLATE):
    """The source folder's tokenizer, else --tokenizer DIR, else (--tiny-tokenizer) OmniV-Med's tiny offline one.
    OmniV-Med's media tokens are added as special tokens where missing (Qwen2.5 has all but <|frame_sep|>); their ids
    must fall inside the checkpoint's embedding rows (Qwen pads the vocabulary, so they do)."""
    has_own = any((source.folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    # their folders carry remote code for the model; the tokenizer is a stock Qwen one and must load without it
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    elif has_own:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=False)
    elif tiny:
        tokenizer = build_tiny_tokenizer(vocab_size=min(1024, vocab_rows))
    else:
        raise ConversionError(
            f"{source.folder} has no tokenizer: pass --tokenizer DIR (the LLM's tokenizer, e.g. Qwen2.5's), or "
            "--tiny-tokenizer for tiny test checkpoints"
        )
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMAGE_TOKEN, FRAME_TOKEN, VISION_START, VISION_END) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        logger.info("added special tokens %s to the tokenizer", missing)
    too_large = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, FRAME_TOKEN, VISION_START, VISION_END)}
    too_large = {t: i for t, i in too_large.items() if i >= vocab_rows}
    if too_large or len(tokenizer) > vocab_rows:
        raise ConversionError(
            f"the tokenizer ({len(tokenizer)} tokens; media tokens {too_large}) does not fit the checkpoint's "
            f"{vocab_rows} embedding rows"
        )
    tokenizer.chat_template = chat_template
    return tokenizer


# ------------------------------------------------------------------------------------------------------ the weights
@dataclass
class Plan:
    """source key -> target key, in source order; the checks' findings."""

    moves: list[tuple[TensorRef, str]]
    dropped: list[str]


def plan_weights(source: Source, config: OmniVMedConfig) -> Plan:
    """Check every name and shape against the target model (built on the meta device) before reading any tensor."""
    with torch.device("meta"):
        target = OmniVMedForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # tied to the embeddings: not stored

    moves, dropped, unknown, mismatched = [], [], [], []
    seen: dict[str, str] = {}
    for key, tensor in source.tensors.items():
        if any(p.fullmatch(key) for p in IGNORED_KEYS):
            dropped.append(key)
            continue
        name = map_key(key, source.layout)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            dropped.append(key)  # a tied checkpoint that also stored the copy
            continue
        if name is None or name not in expected:
            unknown.append(key if name is None else f"{key} -> {name}")
            continue
        if name in seen:
            unknown.append(f"{key} -> {name} (also given by {seen[name]})")
            continue
        seen[name] = key
        shape = converted_shape(name, tensor.shape)
        if shape != expected[name]:
            mismatched.append(f"{key} {tensor.shape} -> {name} {shape}, expected {expected[name]}")
            continue
        moves.append((tensor, name))
    missing = sorted(set(expected) - set(seen))
    problems = []
    if unknown:
        problems.append(f"unknown keys (no OmniV-Med counterpart): {short(unknown)}")
    if missing:
        problems.append(f"missing keys (the OmniV-Med model needs them): {short(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {short(mismatched)}")
    if problems:
        raise ConversionError(f"{source.folder} cannot be converted exactly:\n  " + "\n  ".join(problems))
    if dropped:
        logger.info("dropping %s", dropped)
    return Plan(moves=moves, dropped=dropped)


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read the size {size!r} (e.g. 5GB, 500MB)")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]  # fmt: skip
    return int(float(match.group(1)) * scale)


# safetensors dtype codes <-> torch
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip
_CODES = {v: k for k, v in _DTYPES.items()}


def _target_dtype(tensor: TensorRef, dtype: torch.dtype | None) -> torch.dtype:
    if tensor.dtype not in _DTYPES:
        raise ConversionError(f"{tensor.key}: unsupported safetensors dtype {tensor.dtype}")
    stored = _DTYPES[tensor.dtype]
    return dtype if dtype is not None and stored.is_floating_point else stored


def write_safetensors(path: Path, entries: list[tuple[str, tuple, torch.dtype]], load, metadata: dict) -> None:
    """Write a .safetensors file one tensor at a time: the header (names, dtypes, shapes, offsets) comes from the
    plan, then each tensor is loaded by `load(name)`, written and dropped, so RAM holds one tensor, not the shard
    (safetensors.torch.save_file would hold the whole shard plus a bytes copy of it)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype in entries:
            value = load(name)
            if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                raise RuntimeError(f"{name}: planned {shape} {dtype}, got {tuple(value.shape)} {value.dtype}")
            f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del value
    path.chmod(0o644)


def write_weights(source: Source, plan: Plan, out: Path, max_shard_size: int, dtype: torch.dtype | None) -> int:
    """Stream the tensors into shards of at most max_shard_size bytes (a larger tensor gets a shard of its own).
    The layout is planned from the source headers, so shard names are final before any data is read."""
    entries = []  # (source tensor, target name, shape, dtype, bytes) in source order: source shards are read in turn
    for tensor, name in plan.moves:
        target_dtype = _target_dtype(tensor, dtype)
        shape = converted_shape(name, tensor.shape)
        entries.append((tensor, name, shape, target_dtype, math.prod(shape) * torch.empty((), dtype=target_dtype)
                        .element_size()))  # fmt: skip
    shards, current, current_size = [], [], 0
    for entry in entries:
        if current and current_size + entry[-1] > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(entry)
        current_size += entry[-1]
    if current:
        shards.append(current)
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    handles: dict[str, object] = {}
    by_name = {entry[1]: entry[0] for entry in entries}

    def load(name: str) -> torch.Tensor:
        tensor = by_name[name]
        if tensor.file not in handles:
            handles.clear()  # sources are read shard by shard: one open (memory-mapped) at a time
            handles[tensor.file] = safe_open(source.folder / tensor.file, framework="pt")
        value = convert_tensor(name, handles[tensor.file].get_tensor(tensor.key))
        return value.to(_target_dtype(tensor, dtype))

    weight_map = {}
    try:
        for shard, shard_name in zip(shards, names):
            write_safetensors(out / shard_name, [(e[1], e[2], e[3]) for e in shard], load, {"format": "pt"})
            weight_map.update({e[1]: shard_name for e in shard})
            logger.info("wrote %s (%d tensors)", shard_name, len(shard))
            handles.clear()  # unmap: the pages read so far leave the resident set with each output shard
    finally:
        handles.clear()
    total = sum(e[-1] for e in entries)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total


def output_dtype(source: Source, dtype: torch.dtype | None) -> str:
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    floats = {t.dtype for t in source.tensors.values() if t.dtype in ("F64", "F32", "F16", "BF16")}
    if len(floats) == 1:
        return str(_DTYPES[floats.pop()]).removeprefix("torch.")
    return str(source.config.get("dtype") or source.config.get("torch_dtype") or "float32")


# ------------------------------------------------------------------------------------------------------ the folder
CARD_DESCRIPTION = """\
Converted from {base_ref} ({family}, {text_type} LLM) by `convert_omnivmed.py`: a pure weight map, no
training. The source's licence (Apache-2.0) applies to these weights.

- Tower: their NaViT with 2D RoPE, expressed as `rope_axes_dims = {rope}` (no t frequencies); images merge
  {image_merge}x{image_merge}, videos / volumes {video_merge}x{video_merge} by averaging; projector Linear-GELU-Linear.
- Pruning: {pruning}.
- Processing: {processing}.
- Verified: on tiny random checkpoints in the source format, logits equal the source code's to 1e-5 (float32, sdpa)
  from raw media through this folder's processor in compatibility mode. Not verified here: these real weights' outputs
  against the original code, and answer quality (in `--processing omnivmed` folders the prompt format differs from
  the one these weights were trained on).
"""


def describe_pruning(config: OmniVMedConfig, compat: bool) -> str:
    if config.prune_threshold == 0:
        return "off (as in the source checkpoint)"
    where = "the source's token compression (`--compat-pruning`)" if compat else "OmniV-Med's rule"
    first = "kept whole" if config.prune_keep_first_frame else f"keeps {config.prune_min_tokens} token(s)"
    return (
        f"{where}: threshold {config.prune_threshold:.6g} ({config.prune_unit} units), reference "
        f"{config.prune_reference}, first frame {first}"
    )


def convert(
    family: str,
    src: str,
    out: str | Path,
    *,
    tokenizer: str | None = None,
    tiny_tokenizer: bool = False,
    compat_pruning: bool = False,
    processing: str = "compat",
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    revision: str | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Convert one checkpoint; returns the output folder (a complete OmniV-Med Hub repo).

    processing "compat" (default): the folder reproduces the source's input path (compat_omnivmed.py) and its token
    compression; "omnivmed": OmniV-Med's own processing, with the source's compression only if `compat_pruning`."""
    if family not in FAMILIES:
        raise ConversionError(f"--from must be one of {FAMILIES}, got {family!r}")
    if processing not in PROCESSING:
        raise ConversionError(f"--processing must be one of {PROCESSING}, got {processing!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    folder = resolve_source(src, revision)
    if base_model is None and not Path(src).expanduser().exists():
        base_model = src  # a Hub id
    source = read_source(folder, family)
    torch_dtype = getattr(torch, dtype) if dtype else None
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ConversionError(f"--dtype {dtype!r} is not a torch dtype")

    embed = next((t for k, t in source.tensors.items() if k.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise ConversionError(f"{folder}: no embed_tokens.weight among the tensors")
    mode = compat_mode_for(source) if processing == "compat" else None
    compat_pruning = compat_pruning or processing == "compat"
    template = compat_chat_template(mode) if mode else CHAT_TEMPLATE
    tok = load_tokenizer(source, tokenizer, tiny_tokenizer, vocab_rows=embed.shape[0], chat_template=template)
    config = omnivmed_config(source, token_ids(tok), image_statistics(source), compat_pruning,
                             output_dtype(source, torch_dtype))  # fmt: skip
    plan = plan_weights(source, config)  # raises before anything is written

    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    total = write_weights(source, plan, out, parse_size(max_shard_size), torch_dtype)
    config.save_pretrained(out)
    eos = sorted({i for i in (tok.convert_tokens_to_ids(IM_END), tok.eos_token_id) if isinstance(i, int) and i >= 0})
    GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(out)
    image_processor = OmniVMedImageProcessor(**image_processor_settings(source, config, mode))
    OmniVMedProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template).save_pretrained(out)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(ROOT / name, out / name)

    with torch.device("meta"):
        meta_model = OmniVMedForConditionalGeneration(config)
    base = base_model or folder.name
    write_model_card(
        out,
        meta_model,
        title=f"{base.split('/')[-1]} (OmniV-Med format)",
        description=CARD_DESCRIPTION.format(
            base_ref=f"[{base}](https://huggingface.co/{base})" if base_model else f"`{folder.name}`",
            family="Hulu-Med" if family == "hulumed" else "VideoLLaMA3",
            text_type=source.text_type,
            rope=config.vision_config.rope_axes_dims,
            image_merge=config.image_merge_size,
            video_merge=config.video_merge_size,
            pruning=describe_pruning(config, compat_pruning),
            processing=(f"compatibility mode `{mode}` (the source's frame sizes, prompt text and volume reading; "
                        "README: Converting checkpoints)") if mode else
            "OmniV-Med's own (frame separators, RAS volumes, HU windows)",
        ),
        repo=push_to_hub or out.name,
        extra_meta=f"base_model: {base_model}\n" if base_model else "",
        # Hulu-Med and VideoLLaMA3 are published under Apache-2.0; a card of the source folder says otherwise
        parts=[(public_name(base_model or folder.name), part_license(folder, default="apache-2.0"))],
        training_data=f"That of `{public_name(base_model or folder.name)}` (see its model card); the conversion "
        "changes no weight.",
        evaluation="The conversion is checked for exactness against the source code's outputs on tiny checkpoints "
        "(tests/test_convert_omnivmed.py); the real weights' benchmark scores are not re-measured here "
        "(evaluate_omnivmed.py does that).",
    )
    logger.info("converted %d tensors (%.2f GB) into %s", len(plan.moves), total / 1e9, out)
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, message=f"Convert {base} to OmniV-Med")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="family", choices=FAMILIES, required=True)
    parser.add_argument("--src", required=True, help="Hub repo id or local folder of the source checkpoint")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--revision", default=None, help="Hub revision of --src")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder when the source has none")
    parser.add_argument("--tiny-tokenizer", action="store_true", help="OmniV-Med's tiny offline tokenizer (tests)")
    parser.add_argument("--processing", choices=PROCESSING, default="compat",
                        help="compat: process inputs as the source does (default); omnivmed: OmniV-Med's own")
    parser.add_argument("--compat-pruning", action="store_true",
                        help="with --processing omnivmed: still reproduce the source's token compression")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--dtype", default=None, help="cast floating tensors (float32, bfloat16, float16)")
    parser.add_argument("--base-model", default=None, help="Hub id for the card's base_model (default: --src)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--push_to_hub", "--push-to-hub", dest="push_to_hub", default=None, metavar="REPO_ID")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = convert(
            args.family, args.src, args.out, tokenizer=args.tokenizer, tiny_tokenizer=args.tiny_tokenizer,
            compat_pruning=args.compat_pruning, processing=args.processing, max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            revision=args.revision, base_model=args.base_model, overwrite=args.overwrite,
            push_to_hub=args.push_to_hub, private=args.private,
        )  # fmt: skip
    except BuildError as error:
        parser.exit(2, f"error: {error}\n")
    print(folder)


if __name__ == "__main__":
    main()
