"""Token pruning: tokens kept and forward-time speed-up, measured in one run.

    python bench/bench_pruning.py [--configs tiny,mid] [--repeats 3] [--montage-dir docs]

Inputs: the MNI152 T1 volume (axial, every 1 mm slice) and a synthetic static-camera video (64 s at 1 fps, 224 px)
with an instrument sweeping across. For each model config: forward time of the whole model (tower + projector +
LLM prefill) without pruning and with pruning at the default threshold, post-encoder and pre-encoder, as ratios
unpruned / pruned. Timings are medians of interleaved repetitions in one process, so the machine's noise hits all
arms alike.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import omnivmed_tools  # noqa: E402
from common import Row  # noqa: E402
from omnivmed.configuration_omnivmed import OmniVMedConfig  # noqa: E402
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor, OmniVMedProcessor  # noqa: E402
from omnivmed_tools import endoscopic_scene, visualize, write_instrument_video  # noqa: E402,F401 (re-exported)


MNI = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
CONFIGS = {
    "tiny": dict(vision=omnivmed_tools.TINY_VISION, text=omnivmed_tools.TINY_TEXT),
    # a ViT-S-sized tower and a half-depth Qwen2.5-0.5B-shaped LLM
    "mid": dict(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, patch_size=14),
        text=dict(
            omnivmed_tools.TINY_TEXT,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=12,
            num_attention_heads=14,
            num_key_value_heads=2,
        ),
    ),
}


def model_for(name: str, tokenizer) -> OmniVMedForConditionalGeneration:
    c = CONFIGS[name]
    # every 1 mm MNI slice unpruned is a 10.8k-token prompt, beyond the tiny LLM's 8192 positions (which the model
    # refuses): the timed models get room for it (random weights, so nothing is extrapolated)
    text = dict(c["text"], vocab_size=-(-len(tokenizer) // 64) * 64, pad_token_id=tokenizer.pad_token_id,
                max_position_embeddings=max(c["text"].get("max_position_embeddings", 0), 16384))
    config = OmniVMedConfig(text_config=text, vision_config=c["vision"], **omnivmed_tools.token_ids(tokenizer))
    torch.manual_seed(0)
    model = OmniVMedForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def inputs_for(processor, block, threshold):
    conversation = [{"role": "user", "content": [block, {"type": "text", "text": "Describe."}]}]
    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"prune_threshold": threshold},
    )
    inputs.pop("media_metadata")
    return inputs


def time_arms(model, arms: dict, repeats: int) -> dict:
    times = {name: [] for name in arms}
    with torch.inference_mode():
        for name, (inputs, stage) in arms.items():  # warm-up
            model.config.prune_stage = stage
            model(**inputs)
        for _ in range(repeats):
            for name, (inputs, stage) in arms.items():
                model.config.prune_stage = stage
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(model, processor, block: dict, repeats: int) -> tuple[torch.Tensor, dict]:
    """(keep mask, median seconds per arm) of one input: unpruned, post-encoder, pre-encoder and pre-encoder-reuse
    pruning."""
    full = inputs_for(processor, block, 0.0)
    pruned = inputs_for(processor, block, None)
    arms = {"unpruned": (full, "post_encoder"), "post": (pruned, "post_encoder"), "pre": (pruned, "pre_encoder"),
            "reuse": (pruned, "pre_encoder_reuse")}  # fmt: skip
    times = time_arms(model, arms, repeats)
    return pruned["visual_keep_mask"], times


def run(configs=("tiny",), repeats: int = 3, quick: bool = False) -> list:
    """The measurements of `main` as rows of BENCHMARKS.md (bench/run_all.py)."""
    import nilearn

    slices, seconds = (6, 4) if quick else (256, 64)
    tokenizer = omnivmed_tools.build_tiny_tokenizer()
    processor = OmniVMedProcessor(
        OmniVMedImageProcessor(video_max_pixels=224 * 224, max_slices=slices, max_frames=seconds), tokenizer
    )
    workdir = Path(tempfile.mkdtemp())
    media = {
        ("MNI152 T1, axial, every 1 mm slice (189)" if not quick else f"MNI152 T1, axial, {slices} slices"): {
            "type": "volume", "path": str(Path(nilearn.__file__).parent / "datasets/data" / MNI)
        },
        f"static-camera video, {seconds} s at 1 fps, 224 px": {
            "type": "video", "path": str(write_instrument_video(workdir / "instrument.mp4", seconds=seconds))
        },
    }
    rows = []
    for config_name in configs:
        model = model_for(config_name, tokenizer)
        for name, block in media.items():
            kept, times = measure(model, processor, block, 1 if quick else repeats)
            for stage, label in (("post", "post-encoder"), ("pre", "pre-encoder"), ("reuse", "pre-encoder reuse")):
                ratio = times["unpruned"] / times[stage]
                rows.append(
                    Row(
                        "Pruning", f"{name}, {config_name} config: forward speed-up, {label} pruning",
                        f"{100 * kept.float().mean():.1f} % of {kept.numel()} tokens kept; "
                        f"{times['unpruned']:.2f} s unpruned vs {times[stage]:.2f} s pruned",
                        ratio, "-", None, f"python bench/bench_pruning.py --configs {config_name}",
                        "whole model forward (tower + projector + LLM prefill); ratio = unpruned / pruned",
                    )
                )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--montage-dir", type=Path, help="also write pruning montages (PNG) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    import nilearn

    tokenizer = omnivmed_tools.build_tiny_tokenizer()
    # 224 px per slice/frame, every MNI slice (189 at 1 mm), 64 video frames at 1 fps
    processor = OmniVMedProcessor(
        OmniVMedImageProcessor(video_max_pixels=224 * 224, max_slices=256, max_frames=64), tokenizer
    )
    workdir = Path(tempfile.mkdtemp())
    media = {
        "MNI T1 axial 1 mm": {"type": "volume", "path": str(Path(nilearn.__file__).parent / "datasets/data" / MNI)},
        "static-camera video": {"type": "video", "path": str(write_instrument_video(workdir / "instrument.mp4"))},
    }
    if args.montage_dir:
        args.montage_dir.mkdir(parents=True, exist_ok=True)
        for name, block in media.items():
            out = args.montage_dir / f"pruning_{name.split()[0].lower()}.png"
            visualize(
                block["path"], out, kind=block["type"], processor=processor.image_processor, max_slices=24, max_frames=16
            )
            print(f"montage: {out}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sdpa attention, float32")
    print("| input | config | tokens | kept % | unpruned s | post s | pre s | reuse s | speed-up post | speed-up pre | "
          "speed-up reuse |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for config_name in args.configs.split(","):
        model = model_for(config_name, tokenizer)
        for name, block in media.items():
            kept, times = measure(model, processor, block, args.repeats)
            print(
                f"| {name} | {config_name} | {kept.numel()} | {100 * kept.float().mean():.1f} | "
                f"{times['unpruned']:.2f} | {times['post']:.2f} | {times['pre']:.2f} | {times['reuse']:.2f} | "
                f"{times['unpruned'] / times['post']:.2f}x | {times['unpruned'] / times['pre']:.2f}x | "
                f"{times['unpruned'] / times['reuse']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
