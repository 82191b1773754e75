"""The whole tiny model: generation tokens/s with and without the KV cache, prefill time vs visual token count, and
the peak memory of a forward+backward step at a few sequence lengths (each in a fresh process).

    python bench/bench_llm.py [--repeats 3] [--quick]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, Timer, current_rss_bytes, fmt_s, peak_rss_bytes, reset_peak_rss, run_child  # noqa: E402

import omnivmed_tools  # noqa: E402
from omnivmed.media_omnivmed import Media  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor, OmniVMedProcessor  # noqa: E402


COMMAND = "python bench/bench_llm.py"


def tiny():
    tokenizer = omnivmed_tools.build_tiny_tokenizer()
    model = omnivmed_tools.tiny_model(tokenizer, 0)
    model.set_attn_implementation("sdpa")
    processor = OmniVMedProcessor(
        OmniVMedImageProcessor(**dict(omnivmed_tools.TINY_IMAGE_PROCESSOR, max_frames=4096,
                                      max_total_visual_tokens=10**6)),
        tokenizer,
    )
    return model, processor


def video_inputs(processor, frames: int, size: int = 112, seed: int = 0, labels: bool = False):
    """A random video of `frames` frames (no pruning: prune_threshold=0), as the model's inputs."""
    pixels = np.random.default_rng(seed).random((frames, size, size, 3), dtype=np.float32)
    media = Media(frames=pixels, kind="video", source="random-video")
    messages = [{"role": "user", "content": [{"type": "video", "video": media}, {"type": "text", "text": "Describe."}]}]
    if labels:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "A video of noise."}]})
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=not labels, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"prune_threshold": 0.0},
    )
    inputs.pop("media_metadata")
    if labels:
        inputs["labels"] = inputs["input_ids"].clone()
    return inputs


def bench_generation(repeats: int, new_tokens: int = 64) -> list[Row]:
    model, processor = tiny()
    inputs = video_inputs(processor, 4)  # 64 visual tokens + the prompt
    eos = model.generation_config.eos_token_id
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=eos)
    with torch.inference_mode():
        times = Timer().run(
            {
                "cache": lambda: model.generate(**inputs, use_cache=True, **kwargs),
                "no_cache": lambda: model.generate(**inputs, use_cache=False, **kwargs),
            },
            repeats,
        )
    rate = {k: new_tokens / v for k, v in times.items()}
    prompt = inputs["input_ids"].shape[1]
    return [
        Row(
            "Generation", f"tiny model: tokens/s with vs without KV cache ({prompt}-token prompt with a video, "
            f"{new_tokens} new tokens, greedy)",
            f"{rate['cache']:.0f} vs {rate['no_cache']:.0f} tokens/s", rate["cache"] / rate["no_cache"], "-", None,
            COMMAND, "ratio = with / without cache",
        )
    ]


def bench_prefill(repeats: int, frame_counts=(16, 64, 256)) -> list[Row]:
    model, processor = tiny()
    arms, tokens = {}, {}
    for t in frame_counts:
        inputs = video_inputs(processor, t)
        tokens[t] = int(inputs["visual_keep_mask"].sum())
        arms[t] = lambda inputs=inputs: model(**inputs, logits_to_keep=1)
    with torch.inference_mode():
        times = Timer().run(arms, repeats)
    per_token = {t: times[t] / tokens[t] for t in frame_counts}
    lo, hi = frame_counts[0], frame_counts[-1]
    listing = ", ".join(f"{tokens[t]} -> {fmt_s(times[t])}" for t in frame_counts)
    return [
        Row(
            "Generation", "tiny model: prefill (tower + projector + LLM forward) time vs visual token count",
            listing, per_token[hi] / per_token[lo], "-", None, COMMAND,
            f"ratio = time per visual token at {tokens[hi]} vs at {tokens[lo]} tokens (1.0 = linear)",
        )
    ]


def child_train_step(frames: int) -> dict:
    model, processor = tiny()
    model.train()
    inputs = video_inputs(processor, frames, labels=True)
    reset_peak_rss()
    before = current_rss_bytes()
    start = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    return {
        "seq_len": int(inputs["input_ids"].shape[1]),
        "visual_tokens": int(inputs["visual_keep_mask"].sum()),
        "seconds": time.perf_counter() - start,
        "rss_before": before,
        "peak_rss": peak_rss_bytes(),
    }


def bench_train_memory(frame_counts=(32, 128, 480)) -> list[Row]:
    results = [run_child("bench_llm", ["--frames", str(t)]) for t in frame_counts]
    growth = [(r["peak_rss"] - r["rss_before"]) / 2**20 for r in results]
    listing = ", ".join(f"{r['seq_len']} tokens: +{g:.0f} MiB ({fmt_s(r['seconds'])})" for r, g in zip(results, growth))
    slope = (growth[-1] - growth[0]) / (results[-1]["seq_len"] - results[0]["seq_len"]) * 1024
    return [
        Row(
            "Training memory", "tiny model: peak RSS growth of one forward+backward step (video inputs, fp32, sdpa)",
            listing, None, "-", None, COMMAND,
            f"~{slope:.0f} KiB per sequence token; growth = peak RSS during the step minus RSS before it",
        )
    ]


def run(repeats: int = 3, quick: bool = False) -> list[Row]:
    if quick:
        return bench_generation(1, 4) + bench_prefill(1, (1, 4)) + bench_train_memory((1, 4))
    return bench_generation(repeats) + bench_prefill(repeats) + bench_train_memory()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help="internal: one forward+backward step, JSON on stdout")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_train_step(args.frames)))
    else:
        for row in run(args.repeats, args.quick):
            print(row)
