"""Model shapes and builders the benchmark scripts share (the benchmarks' harness beside common.py): the 1.5B and 7B
shapes with random weights built directly in their dtype, and the tower's patch layout and FLOP count."""

import json

import torch

from common import ROOT

import omnivmed_tools
from omnivmed.configuration_omnivmed import OmniVMedConfig, OmniVMedVisionConfig
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration


# Qwen2.5-7B (Qwen/Qwen2.5-7B config.json): 28 layers, hidden 3584, MLP 18944, 28 query / 4 key-value heads
QWEN25_7B_TEXT = dict(
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    vocab_size=152064,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    hidden_act="silu",
)

def shape_configs(shape: str, tokenizer) -> tuple[dict, dict]:
    """(vision_config, text_config) dicts of a named shape."""
    if shape == "tiny":
        text = dict(omnivmed_tools.TINY_TEXT, vocab_size=-(-len(tokenizer) // 64) * 64)
        return dict(omnivmed_tools.TINY_VISION), text
    root = json.loads((ROOT / "config.json").read_text())
    vision = {k: v for k, v in root["vision_config"].items() if k != "model_type"}
    if shape == "1.5B":
        text = dict(root["text_config"])
        text.pop("layer_types", None)
        return vision, text
    if shape == "7B":
        return vision, dict(QWEN25_7B_TEXT)
    raise ValueError(f"unknown shape {shape!r}; choose tiny, 1.5B or 7B")


def build_ours(shape: str, tokenizer, prune_stage: str | None = None, dtype=torch.bfloat16, device="cpu",
               layers: int | None = None):
    """Our model at `shape`, random weights, built directly in `dtype` on `device` (no fp32 copy ever exists);
    `prune_stage` None = the config default; `layers` cuts both the tower and the LLM to that many layers (checks
    about placement, not speed)."""
    vision, text = shape_configs(shape, tokenizer)
    if layers is not None:
        vision, text = dict(vision, num_hidden_layers=layers), dict(text, num_hidden_layers=layers)
    text = dict(text, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.convert_tokens_to_ids(omnivmed_tools.IM_END), bos_token_id=None)  # fmt: skip
    stage = {} if prune_stage is None else {"prune_stage": prune_stage}
    config = OmniVMedConfig(text_config=text, vision_config=vision, **stage,
                            tie_word_embeddings=text.get("tie_word_embeddings", True),
                            **omnivmed_tools.token_ids(tokenizer))  # fmt: skip
    return random_model(OmniVMedForConditionalGeneration, config, dtype, device)


def random_model(model_class, config, dtype=torch.bfloat16, device="cpu"):
    """`model_class(config)` with seeded random weights, built directly in `dtype` on `device` (no fp32 copy ever
    exists), in eval mode with sdpa attention."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    model.set_attn_implementation("sdpa")
    return model


def to_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B * H/p * W/p, 3*p*p) in row-major patch order (merge size 1)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c * patch * patch)


def tower_flops(cfg: OmniVMedVisionConfig, segment_lengths: list[int]) -> float:
    """Multiply-add FLOPs (x2) of the tower's matmuls for these attention segments."""
    n = sum(segment_lengths)
    d, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * n * d * d * 4 + 2 * n * d * i * 2 + sum(4 * s * s * d for s in segment_lengths)
    return cfg.num_hidden_layers * per_layer + 2 * n * cfg.patch_dim * d
