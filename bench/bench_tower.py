"""Vision tower speed: ours vs transformers' SiglipVisionModel at the so400m shape on one 384x384 image (same weights),
GFLOP/s against this machine's torch.matmul at the same dtype, and a packed batch of 8 differently sized images vs the
same images padded to the largest.

    python bench/bench_tower.py [--repeats 3] [--quick]
"""

import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, Timer, fmt_s  # noqa: E402
from shapes import to_patches, tower_flops  # noqa: E402

from omnivmed.configuration_omnivmed import OmniVMedVisionConfig  # noqa: E402
from omnivmed.modeling_omnivmed import OmniVMedVisionModel  # noqa: E402


COMMAND = "python bench/bench_tower.py"
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
# 8 sizes (pixels) a medical batch mixes; the padded arm pads each to the largest (448 x 448)
PACKED_SIZES = [(448, 448), (224, 336), (112, 448), (224, 224), (336, 168), (112, 112), (280, 196), (168, 168)]


def siglip_pair(shape: dict, image_size: int, dtype=torch.float32):
    """transformers' SiglipVisionModel (no pooling head) and our tower holding the same weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    siglip = SiglipVisionModel(
        SiglipVisionConfig(**shape, image_size=image_size, vision_use_head=False, attn_implementation="sdpa")
    ).eval()
    ours = OmniVMedVisionModel(OmniVMedVisionConfig(**shape)).eval()
    ours.set_attn_implementation("sdpa")
    state = {}
    for key, value in siglip.state_dict().items():
        if key == "embeddings.position_embedding.weight":
            continue  # ours has rotary positions instead of a table
        key = key.replace("embeddings.patch_embedding", "patch_embedding").replace("encoder.layers", "layers")
        state[key] = value.reshape(value.shape[0], -1) if key == "patch_embedding.weight" else value
    missing, unexpected = ours.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight map incomplete: missing {missing}, unexpected {unexpected}")
    return siglip.to(dtype), ours.to(dtype)


MATMULS_PER_ROUND = 20


def matmul_arm(m: int, k: int, n: int, dtype):
    """An arm timed beside the towers (same rounds, same noise): MATMULS_PER_ROUND (m, k) @ (k, n) products."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)

    def arm():
        for _ in range(MATMULS_PER_ROUND):
            torch.matmul(a, b, out=out)

    return arm, 2 * m * k * n * MATMULS_PER_ROUND


def bench_vs_siglip(repeats: int, shape: dict = SO400M, image_size: int = 384, dtype=torch.float32) -> list[Row]:
    siglip, ours = siglip_pair(shape, image_size, dtype)
    p = shape["patch_size"]
    image = torch.randn(1, 3, image_size, image_size, dtype=dtype)
    side = image_size // p * p  # SigLIP's stride-p convolution ignores the last 384 - 378 pixels; so do we
    patches = to_patches(image[..., :side, :side], p)
    grid = torch.tensor([[1, image_size // p, image_size // p]])
    cfg = ours.config
    n = patches.shape[0]
    mm_arm, mm_flops = matmul_arm(n, cfg.hidden_size, cfg.intermediate_size, dtype)
    with torch.inference_mode():
        times = Timer().run(
            {"ours": lambda: ours(patches, grid), "siglip": lambda: siglip(pixel_values=image), "matmul": mm_arm},
            repeats,
        )
    flops = tower_flops(cfg, [n])
    mm = mm_flops / times["matmul"] / 1e9
    ours_gf, siglip_gf = flops / times["ours"] / 1e9, flops / times["siglip"] / 1e9
    label = f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {image_size}x{image_size} ({n} patches), {dtype}"
    return [
        Row(
            "Vision tower", f"ours vs SiglipVisionModel, same weights ({label})",
            f"{fmt_s(times['ours'])} vs {fmt_s(times['siglip'])}", times["siglip"] / times["ours"], ">= 0.95x",
            times["siglip"] / times["ours"] >= 0.95, COMMAND, "ratio = SigLIP time / our time (speed relative to it)",
        ),
        Row(
            "Vision tower", "ours: GFLOP/s vs torch.matmul GFLOP/s (same dtype)",
            f"{ours_gf:.1f} vs {mm:.1f} GFLOP/s ({flops / 1e9:.0f} GFLOP per image; matmul "
            f"{n}x{cfg.hidden_size} @ {cfg.hidden_size}x{cfg.intermediate_size})",
            ours_gf / mm, ">= 0.85x", ours_gf / mm >= 0.85, COMMAND,
        ),
        Row(
            "Vision tower", "SiglipVisionModel: GFLOP/s vs torch.matmul GFLOP/s (reference)",
            f"{siglip_gf:.1f} vs {mm:.1f} GFLOP/s", siglip_gf / mm, "-", None, COMMAND,
        ),
    ]


def bench_packed_vs_padded(repeats: int, sizes=PACKED_SIZES, layers: int = 2, shape: dict = SO400M) -> list[Row]:
    torch.manual_seed(0)
    tower = OmniVMedVisionModel(OmniVMedVisionConfig(**dict(shape, num_hidden_layers=layers))).eval()
    tower.set_attn_implementation("sdpa")
    p = shape["patch_size"]
    images = [torch.rand(1, 3, h, w) for h, w in sizes]
    packed = torch.cat([to_patches(x, p) for x in images])
    packed_grid = torch.tensor([[1, h // p, w // p] for h, w in sizes])
    # padded: every image zero-padded to the largest, i.e. 8 segments of the largest length (what a padded batch
    # computes; no mask, so this arm is if anything cheaper than a masked padded batch)
    big_h, big_w = max(h for h, _ in sizes), max(w for _, w in sizes)
    padded_images = torch.zeros(len(sizes), 3, big_h, big_w)
    for k, x in enumerate(images):
        padded_images[k, :, : x.shape[2], : x.shape[3]] = x[0]
    padded = to_patches(padded_images, p)
    padded_grid = torch.tensor([[1, big_h // p, big_w // p]] * len(sizes))
    with torch.inference_mode():
        times = Timer().run(
            {"packed": lambda: tower(packed, packed_grid), "padded": lambda: tower(padded, padded_grid)}, repeats
        )
    ratio = times["padded"] / times["packed"]
    return [
        Row(
            "Vision tower", f"packed batch of {len(sizes)} images of different sizes vs padded to the largest "
            f"(so400m width, {layers} layers)",
            f"{fmt_s(times['packed'])} ({packed.shape[0]} patches) vs {fmt_s(times['padded'])} ({padded.shape[0]})",
            ratio, ">= 1.5x", ratio >= 1.5, COMMAND, "sizes: " + ", ".join(f"{h}x{w}" for h, w in sizes),
        )
    ]


def run(repeats: int = 3, quick: bool = False) -> list[Row]:
    if quick:
        small = dict(SO400M, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
        return bench_vs_siglip(1, small, 112) + bench_packed_vs_padded(1, PACKED_SIZES[:3], 1, small)
    return bench_vs_siglip(repeats) + bench_packed_vs_padded(repeats, layers=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.repeats, args.quick):
        print(row)
