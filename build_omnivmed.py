"""Build OmniV-Med checkpoints: complete Hub folders (code, config, weights, processor, tokenizer, chat template).

    python build_omnivmed.py --preset tiny --out DIR [--seed N]   # random tiny model + offline tokenizer
    python build_omnivmed.py --vision ID_OR_DIR --llm ID_OR_DIR --out DIR [--preset 1.5b|7b] [--push_to_hub ID]
    python build_omnivmed.py --preset 1.5b --out DIR   # google/siglip-so400m-patch14-384 + Qwen/Qwen2.5-1.5B-Instruct

The pretrained path maps a SigLIP / SigLIP2 vision tower into the RoPE tower (patch-embedding Conv2d -> Linear over
(C, p, p) patches; position table and pooling head dropped), copies a Qwen2 / Qwen2.5 / Qwen3 LLM verbatim (its
tokenizer gains OmniV-Med's media tokens where missing; embeddings grow only when a new id exceeds their rows) and
initialises the projector fresh; it prints a table of mapped / dropped / new tensors and stops on anything unexpected.

`build_tiny_tokenizer` trains a byte-level BPE offline for tiny models (no download, deterministic); same seed, same
bytes for every file of the folder.
"""

import argparse
import collections
import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from omnivmed.configuration_omnivmed import OmniVMedConfig
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration
from omnivmed.processing_omnivmed import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    FRAME_TOKEN,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    OmniVMedImageProcessor,
    OmniVMedProcessor,
    VISION_END,
    VISION_START,
)
from omnivmed_tools import (  # noqa: F401 (the tiny preset and the Hub folder writer live there; re-exported)
    AUTO_MAP,
    BuildError,
    TensorRef,
    read_tensor_index,
    resolve_checkpoint,
    REMOTE_CODE_FILES,
    TINY_CORPUS,
    TINY_IMAGE_PROCESSOR,
    TINY_TEXT,
    TINY_VISION,
    build_tiny,
    build_tiny_tokenizer,
    image_statistics,
    part_license,
    public_name,
    push_folder,
    read_json,
    save_hub_folder,
    short,
    tiny_model,
    token_ids,
    write_model_card,
)


logger = logging.getLogger("build_omnivmed")


# ------------------------------------------------------------------------------------------------------------------
# Composing pretrained parts: a SigLIP / SigLIP2 vision tower + a Qwen2 / Qwen2.5 / Qwen3 LLM
# ------------------------------------------------------------------------------------------------------------------

PRESETS = {
    # the paper's parents; the architecture each preset must end up with (checked after reading the parts' configs)
    "1.5b": dict(
        vision="google/siglip-so400m-patch14-384",
        llm="Qwen/Qwen2.5-1.5B-Instruct",
        vision_shape=dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, patch_size=14),
        text_shape=dict(hidden_size=1536, num_hidden_layers=28),
    ),
    "7b": dict(
        vision="google/siglip-so400m-patch14-384",
        llm="Qwen/Qwen2.5-7B-Instruct",
        vision_shape=dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, patch_size=14),
        text_shape=dict(hidden_size=3584, num_hidden_layers=28),
    ),
}
SIGLIP_MODEL_TYPES = ("siglip", "siglip2", "siglip_vision_model", "siglip2_vision_model")
LLM_MODEL_TYPES = ("qwen2", "qwen3")
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")  # fmt: skip
# files fetched from the Hub (weights as safetensors only: pickle checkpoints are never read)
VISION_ALLOW_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json",
                         "README.md", "LICENSE*"]  # fmt: skip
LLM_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "merges.txt",
                      "README.md", "LICENSE*"]  # fmt: skip
PATCH_EMBEDDING = "model.vision_tower.patch_embedding.weight"
_SIGLIP_LAYER = re.compile(
    r"encoder\.layers\.(\d+)\.(layer_norm[12]|self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.(weight|bias)"
)
_SIGLIP_DROPPED = (
    (re.compile(r"embeddings\.position_embedding\.weight"), "absolute position table (the tower uses RoPE)"),
    (re.compile(r"embeddings\.position_ids"), "stale buffer"),
    (re.compile(r"head\..+"), "attention-pooling head (OmniV-Med feeds every patch to the projector)"),
)
_LLM_KEY = re.compile(r"(embed_tokens\.weight|layers\.\d+\..+|norm\.weight)")
_STALE_BUFFER = re.compile(r".*rotary_emb\.(?:original_)?inv_freq")


@dataclasses.dataclass
class WeightPlan:
    """target name -> (source tensor, how it is transformed); what was dropped and what is new."""

    moves: dict = dataclasses.field(default_factory=dict)  # target -> (TensorRef, transform name)
    dropped: list = dataclasses.field(default_factory=list)  # (source key, reason)
    new: list = dataclasses.field(default_factory=list)  # (target, reason)


def siglip_vision_config(folder: Path) -> tuple[dict, str]:
    """OmniVMedVisionConfig fields from a SigLIP / SigLIP2 config (full model or vision-only); returns (fields, kind)
    with kind "siglip" (Conv2d patch embedding) or "siglip2" (Linear over (p, p, C) patches)."""
    raw = read_json(folder / "config.json")
    model_type = raw.get("model_type")
    if model_type not in SIGLIP_MODEL_TYPES:
        raise BuildError(
            f"{folder}/config.json: model_type {model_type!r} is not a SigLIP vision checkpoint "
            f"(expected one of {SIGLIP_MODEL_TYPES})"
        )
    config = AutoConfig.from_pretrained(folder)
    vision = getattr(config, "vision_config", None) or config  # SiglipConfig nests it, SiglipVisionConfig is it
    fields = {name: getattr(vision, name) for name in VISION_FIELDS}
    patch = fields["patch_size"]
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise BuildError(f"{folder}: non-square patches {patch} are not supported")
        fields["patch_size"] = int(patch[0])
    return fields, ("siglip2" if model_type.startswith("siglip2") else "siglip")


def plan_vision(tensors: dict[str, TensorRef], kind: str, plan: WeightPlan):
    """SigLIP names -> OmniV-Med tower names. The vision model's prefix is found from its patch embedding (so the
    full SiglipModel `vision_model.`, a standalone tower without prefix, or a tower nested in a bigger model all
    work); the text tower (`text_model.*`, `logit_scale`, `logit_bias`) is dropped; anything else is an error."""
    anchors = [k for k in tensors if k.endswith("embeddings.patch_embedding.weight")]
    if len(anchors) != 1:
        raise BuildError(
            "expected exactly one vision patch embedding (`[prefix]embeddings.patch_embedding.weight`) in the SigLIP "
            f"checkpoint, found {anchors or 'none'}"
        )
    prefix = anchors[0][: -len("embeddings.patch_embedding.weight")]
    unexpected = []
    for key, ref in tensors.items():
        if not key.startswith(prefix):
            if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
                plan.dropped.append((key, "text tower"))
            else:
                unexpected.append(key)
            continue
        rest = key[len(prefix) :]
        reason = next((why for pattern, why in _SIGLIP_DROPPED if pattern.fullmatch(rest)), None)
        if reason is not None:
            plan.dropped.append((key, reason))
        elif rest in ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias"):
            target = "model.vision_tower.patch_embedding." + rest.rsplit(".", 1)[1]
            transform = f"{kind}_patch" if rest.endswith("weight") else "copy"
            plan.moves[target] = (ref, transform)
        elif (match := _SIGLIP_LAYER.fullmatch(rest)) is not None:
            plan.moves["model.vision_tower.layers.{}.{}.{}".format(*match.groups())] = (ref, "copy")
        elif rest in ("post_layernorm.weight", "post_layernorm.bias"):
            plan.moves["model.vision_tower." + rest] = (ref, "copy")
        else:
            unexpected.append(key)
    if unexpected:
        raise BuildError(f"unexpected tensors in the SigLIP checkpoint (prefix {prefix!r}): {short(unexpected)}")


def plan_llm(tensors: dict[str, TensorRef], tie: bool, plan: WeightPlan):
    """Qwen2 / Qwen3 names (`model.*` + `lm_head.weight` of a ...ForCausalLM, or a bare ...Model) -> OmniV-Med's."""
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    unexpected = []
    for key, ref in tensors.items():
        if _STALE_BUFFER.fullmatch(key):
            plan.dropped.append((key, "stale buffer"))
        elif key == "lm_head.weight":
            if tie:
                plan.dropped.append((key, "tied to the input embeddings"))
            else:
                plan.moves["lm_head.weight"] = (ref, "copy")
        elif key.startswith(prefix) and _LLM_KEY.fullmatch(key[len(prefix) :]):
            plan.moves["model.language_model." + key[len(prefix) :]] = (ref, "copy")
        else:
            unexpected.append(key)
    if unexpected:
        raise BuildError(f"unexpected tensors in the LLM checkpoint: {short(unexpected)}")


def prepare_tokenizer(llm_folder: Path):
    """The LLM's tokenizer plus OmniV-Med's media tokens (Qwen2.5 has all but <|frame_sep|>: reused, not re-added),
    ChatML tokens if missing, a pad token, left padding and OmniV-Med's chat template."""
    from transformers import AutoTokenizer

    if not any((llm_folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise BuildError(f"{llm_folder} has no tokenizer (tokenizer.json / tokenizer_config.json / vocab.json)")
    tokenizer = AutoTokenizer.from_pretrained(llm_folder, padding_side="left")  # generation pads on the left
    vocab = tokenizer.get_vocab()
    wanted = [IM_START, IM_END, VISION_START, VISION_END, IMAGE_TOKEN, FRAME_TOKEN]
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        logger.info("added special tokens %s (ids %s)", missing, tokenizer.convert_tokens_to_ids(missing))
    reused = [t for t in wanted if t not in missing]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = ENDOFTEXT if ENDOFTEXT in tokenizer.get_vocab() else tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, missing, reused


def resized_rows(rows: int, tokenizer) -> int:
    """Embedding rows after adding tokens: unchanged while every id fits, else len(tokenizer) rounded up to 64."""
    needed = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    return rows if needed <= rows else -(-needed // 64) * 64


def _text_config_dict(llm_config) -> dict:
    text = llm_config.to_dict()
    for key in ("architectures", "auto_map", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    return text


def _dtype_of(name: str | None, llm_config) -> torch.dtype:
    if name in (None, "auto"):
        name = getattr(llm_config, "dtype", None) or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise BuildError(f"--dtype {name!r} is not a torch dtype (float32, bfloat16, float16)")
    return dtype


def check_preset(preset: str, config: OmniVMedConfig):
    spec = PRESETS[preset]
    for part, shape in (("vision_config", spec["vision_shape"]), ("text_config", spec["text_shape"])):
        got = {k: getattr(getattr(config, part), k) for k in shape}
        if got != shape:
            raise BuildError(f"--preset {preset} expects a {part.split('_')[0]} part of shape {shape}, got {got}")


def _load_tensor(ref: TensorRef, transform: str, handles: dict) -> torch.Tensor:
    path = ref.folder / ref.file
    if path not in handles:
        handles[path] = safe_open(path, framework="pt")
    tensor = handles[path].get_tensor(ref.key)
    if transform == "siglip_patch":  # Conv2d (D, C, p, p) row-major == Linear over (C, p, p)
        return tensor.reshape(tensor.shape[0], -1)
    if transform == "siglip2_patch":  # Linear over (p, p, C)-ordered patches -> (C, p, p) order
        d, n = tensor.shape
        p = int(round((n / 3) ** 0.5))
        return tensor.view(d, p, p, -1).permute(0, 3, 1, 2).reshape(d, -1)
    return tensor


def print_plan_table(plan: WeightPlan, file=None):
    """mapped / dropped / new tensors, with numbered layers folded (`layers.*.`) so a 27-layer tower is a few rows."""

    def fold(name: str) -> str:
        return re.sub(r"\.(\d+)\.", ".*.", name)

    rows = collections.Counter()
    for target, (ref, transform) in plan.moves.items():
        rows[("mapped", fold(ref.key), fold(target), transform)] += 1
    for key, reason in plan.dropped:
        rows[("dropped", "text_model.*, logit_*" if reason == "text tower" else fold(key), "-", reason)] += 1
    for target, reason in plan.new:
        rows[("new", "-", fold(target), reason)] += 1
    header = ("action", "source", "target", "how", "n")
    table = [header] + [(*k, str(n)) for k, n in rows.items()]
    widths = [min(70, max(len(r[i]) for r in table)) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=file)
    summary = collections.Counter(k[0] for k in rows.elements())
    print(f"{summary['mapped']} mapped, {summary['dropped']} dropped, {summary['new']} newly initialised", file=file)


PRETRAINED_DESCRIPTION = """\
Composed by `build_omnivmed.py` from {vision_ref} (vision tower) and {llm_ref} (language model):
the SigLIP tower's weights are mapped into OmniV-Med's RoPE tower (its patch-embedding Conv2d flattened into the
equivalent Linear; its absolute position table and attention-pooling head dropped), the LLM's weights are copied
verbatim, and the merge + MLP projector is freshly initialised. **Not trained as a whole: the projector is random
until stage-1 alignment, so this checkpoint does not yet answer questions about images.** Text-only input gives the
LLM's own logits.

| part | from | tensors |
|---|---|---|
| vision tower | {vision} | {n_vision} mapped, {n_dropped_vision} dropped |
| language model | {llm} | {n_llm} copied{resize} |
| projector | new | {n_new} initialised (seed {seed}) |

Tokenizer: the LLM's, with media tokens {reused} reused and {added} added; OmniV-Med's chat template.
"""


def build_pretrained(
    vision: str,
    llm: str,
    out: str | Path,
    *,
    preset: str | None = None,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    revision: str | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Compose a SigLIP / SigLIP2 vision tower and a Qwen2 / Qwen2.5 / Qwen3 LLM (local folders or Hub ids) into a
    complete OmniV-Med Hub folder. Everything is checked from configs and safetensors headers before any tensor is
    read; tensors are then read one at a time (`safe_open`) into a model built on the meta device, so peak memory
    is about the model's size in the output dtype."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BuildError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    vision_dir = resolve_checkpoint(vision, VISION_ALLOW_PATTERNS, revision)
    llm_dir = resolve_checkpoint(llm, LLM_ALLOW_PATTERNS, revision)

    vision_fields, vision_kind = siglip_vision_config(vision_dir)
    mean, std = image_statistics(vision_dir, ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]), "SigLIP's 0.5 / 0.5")
    llm_raw = read_json(llm_dir / "config.json")
    if llm_raw.get("model_type") not in LLM_MODEL_TYPES:
        raise BuildError(
            f"{llm_dir}/config.json: model_type {llm_raw.get('model_type')!r} is not a supported LLM "
            f"(expected one of {LLM_MODEL_TYPES}: Qwen2, Qwen2.5, Qwen3)"
        )
    llm_config = AutoConfig.from_pretrained(llm_dir)
    tie = bool(getattr(llm_config, "tie_word_embeddings", False))
    torch_dtype = _dtype_of(dtype, llm_config)

    tokenizer, added, reused = prepare_tokenizer(llm_dir)
    llm_tensors = read_tensor_index(llm_dir)
    embed_key = next((k for k in llm_tensors if k.endswith("embed_tokens.weight")), None)
    if embed_key is None:
        raise BuildError(f"{llm_dir}: no embed_tokens.weight among the LLM's tensors")
    old_rows = llm_tensors[embed_key].shape[0]
    rows = resized_rows(old_rows, tokenizer)
    text = dict(_text_config_dict(llm_config), vocab_size=rows, tie_word_embeddings=tie)
    config = OmniVMedConfig(
        vision_config=vision_fields,
        text_config=text,
        tie_word_embeddings=tie,
        image_mean=mean,
        image_std=std,
        **token_ids(tokenizer),
    )
    config.dtype = str(torch_dtype).removeprefix("torch.")
    if preset is not None:
        check_preset(preset, config)

    plan = WeightPlan()
    plan_vision(read_tensor_index(vision_dir), vision_kind, plan)
    n_vision = len(plan.moves)
    n_dropped_vision = len(plan.dropped)
    plan_llm(llm_tensors, tie, plan)
    with torch.device("meta"):
        target = OmniVMedForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    if tie:
        expected.pop("lm_head.weight", None)
    resized = {"model.language_model.embed_tokens.weight", "lm_head.weight"} if rows != old_rows else set()
    unknown = sorted(set(plan.moves) - set(expected))
    mismatched = []
    for name, (ref, transform) in plan.moves.items():
        if name not in expected:
            continue
        shape = ref.shape if transform == "copy" else (ref.shape[0], math.prod(ref.shape[1:]))
        if name in resized:
            shape = (rows, *shape[1:])
        if shape != expected[name]:
            mismatched.append(f"{ref.key} {ref.shape} -> {name} {shape}, expected {expected[name]}")
    missing = sorted(k for k in set(expected) - set(plan.moves) if not k.startswith("model.projector."))
    problems = [
        f"{what}: {short(names)}"
        for what, names in (("no place in OmniV-Med", unknown), ("shape mismatches", mismatched),
                            ("not provided by the parts", missing))  # fmt: skip
        if names
    ]
    if problems:
        raise BuildError("the parts do not compose exactly:\n  " + "\n  ".join(problems))
    plan.new = [(k, "projector (fresh)") for k in sorted(expected) if k.startswith("model.projector.")]
    if resized:
        for name in sorted(resized & set(plan.moves)):
            plan.new.append((f"{name}[{old_rows}:{rows}]", "new token rows = mean of the old rows"))
    print_plan_table(plan)

    state_dict, handles = {}, {}
    try:
        for name, (ref, transform) in plan.moves.items():
            tensor = _load_tensor(ref, transform, handles)
            if name in resized:
                row_mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
                tensor = torch.cat([tensor, row_mean.expand(rows - old_rows, -1)])
            state_dict[name] = tensor.to(torch_dtype).contiguous()
    finally:
        handles.clear()
    torch.manual_seed(seed)  # the projector's initialisation
    model, info = OmniVMedForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=torch_dtype, output_loading_info=True
    )
    del state_dict
    new_keys = {k for k, _ in plan.new if k.startswith("model.projector.")}
    if set(info["missing_keys"]) != new_keys or info["unexpected_keys"] or info["mismatched_keys"]:
        raise BuildError(f"loading the composed weights did not go as planned: {info}")
    model.eval()

    image_processor = OmniVMedImageProcessor(
        patch_size=config.vision_config.patch_size,
        image_merge_size=config.image_merge_size,
        video_merge_size=config.video_merge_size,
        **config.processor_settings(),  # pruning rule and mean / std: the config's, written once in config.json
    )
    processor = OmniVMedProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    def hub_name(source: str) -> str | None:
        return None if Path(source).expanduser().exists() else source

    def short_name(source: str, folder: Path) -> str:
        return (hub_name(source) or folder.name).split("/")[-1]

    parents = [name for name in (hub_name(vision), hub_name(llm)) if name]
    extra_meta = ("base_model:\n" + "".join(f"- {p}\n" for p in parents)) if parents else ""
    description = PRETRAINED_DESCRIPTION.format(
        vision=hub_name(vision) or vision_dir.name,
        vision_ref=f"[{vision}](https://huggingface.co/{vision})" if hub_name(vision) else f"`{vision_dir.name}`",
        llm=hub_name(llm) or llm_dir.name,
        llm_ref=f"[{llm}](https://huggingface.co/{llm})" if hub_name(llm) else f"`{llm_dir.name}`",
        n_vision=n_vision,
        n_dropped_vision=n_dropped_vision,
        n_llm=len(plan.moves) - n_vision,
        resize=f"; embeddings resized {old_rows} -> {rows} rows" if resized else "",
        n_new=len(new_keys),
        seed=seed,
        reused=reused or "none",
        added=added or "none",
    )
    if out.exists() and overwrite:
        shutil.rmtree(out)
    title = f"OmniV-Med ({preset})" if preset else "OmniV-Med"
    save_hub_folder(
        model,
        processor,
        out,
        max_shard_size=max_shard_size,
        title=f"{title}: {short_name(vision, vision_dir)} + {short_name(llm, llm_dir)}",
        description=description,
        repo=push_to_hub or out.name,
        extra_meta=extra_meta,
        parts=[(f"vision tower: {public_name(vision)}", part_license(vision_dir)),
               (f"language model: {public_name(llm)}", part_license(llm_dir))],
        training_data="The parts' own pretraining (see their model cards). The composed model has not been trained "
        "as a whole: `train_trl.py` aligns and instruction-tunes it.",
        evaluation="Not evaluated: the projector is random until stage-1 alignment.",
    )
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, message="Build OmniV-Med from pretrained parts")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Either --preset tiny, or --vision and --llm (defaults from --preset 1.5b / 7b).",
    )
    parser.add_argument("--preset", choices=["tiny", *PRESETS], default=None)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0, help="weights of the tiny preset / the fresh projector")
    parser.add_argument("--vision", default=None, help="SigLIP / SigLIP2 checkpoint: Hub id or local folder")
    parser.add_argument("--llm", default=None, help="Qwen2 / Qwen2.5 / Qwen3 checkpoint: Hub id or local folder")
    parser.add_argument("--dtype", default="auto", help="output dtype (auto = the LLM's config dtype)")
    parser.add_argument("--max-shard-size", "--max_shard_size", dest="max_shard_size", default="5GB")
    parser.add_argument("--revision", default=None, help="Hub revision of --vision / --llm")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--push_to_hub", "--push-to-hub", dest="push_to_hub", default=None, metavar="REPO_ID")
    parser.add_argument("--private", action="store_true", help="create the --push_to_hub repo as private")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.preset == "tiny":
        if args.vision or args.llm or args.push_to_hub:
            parser.error("--preset tiny builds a random model: it takes no --vision / --llm / --push_to_hub")
        print(build_tiny(args.out, args.seed))
        return
    defaults = PRESETS.get(args.preset, {})
    vision, llm = args.vision or defaults.get("vision"), args.llm or defaults.get("llm")
    if not (vision and llm):
        parser.error("give --preset tiny, or --vision and --llm (or --preset 1.5b / 7b for the paper's parents)")
    try:
        folder = build_pretrained(
            vision, llm, args.out, preset=args.preset, seed=args.seed, dtype=args.dtype,
            max_shard_size=args.max_shard_size, revision=args.revision, overwrite=args.overwrite,
            push_to_hub=args.push_to_hub, private=args.private,
        )  # fmt: skip
    except BuildError as error:
        parser.exit(2, f"error: {error}\n")
    print(folder)


if __name__ == "__main__":
    main()
