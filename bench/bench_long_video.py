"""Long video, streamed: 3600 frames (1 h at 1 fps, 448x448) decoded, processed, pruned and encoded a chunk at a time
(`OmniVMedImageProcessor.iter_video_chunks` -> `OmniVMedModel.encode_video_chunks`) with the tiny config; peak RSS,
and time against 10x a 360-frame run. Each run is a fresh process, so its peak RSS is its own.

    python bench/bench_long_video.py [--frames 3600] [--size 448] [--chunk-frames 64] [--repeats 2]
        [--prune-stage pre_encoder|post_encoder|pre_encoder_reuse] [--tower tiny|root]

`--tower root` puts the root config.json's vision tower (so400m shape) behind the tiny LLM; it is for trying a few
frames (`--frames 20`): at that width an hour takes hours on a CPU.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Row, fmt_s, peak_rss_bytes, run_child  # noqa: E402

import omnivmed_tools  # noqa: E402
from omnivmed.configuration_omnivmed import OmniVMedConfig  # noqa: E402
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor  # noqa: E402


COMMAND = "python bench/bench_long_video.py"
GIB = 1024**3


def write_video(path: Path, n_frames: int, size: int = 112, period: int = 120, seed: int = 0) -> Path:
    """A static scene with an instrument sweeping across and back every `period` frames, at 1 fps (Motion-JPEG AVI:
    fast to write; the instrument moves at the same speed whatever the length, so the work per frame is the same).
    The instrument is drawn to scale, so every size shows the same picture."""
    scene = omnivmed_tools.endoscopic_scene(size, seed)
    unit = size / 112  # the drawing's sizes are those of a 112 px frame
    shaft, jaws, head, tip = (max(1, round(v * unit)) for v in (3, 6, 15, 20))

    def frames():
        for i in range(n_frames):
            frame = scene.copy()
            phase = (i % period) / period * 2
            x = int((phase if phase < 1 else 2 - phase) * (size - tip))
            y = size // 2
            frame[y - shaft : y + shaft, : x + head] = 0.75
            frame[y - jaws : y + jaws, x + head : x + tip] = 0.9
            yield (frame * 255).astype(np.uint8)

    omnivmed_tools.write_mjpeg(path, frames(), fps=1)
    return path


def build_model(tower: str) -> OmniVMedForConditionalGeneration:
    """The tiny preset, or (tower "root") the root config.json's vision tower behind the tiny LLM (random weights)."""
    tokenizer = omnivmed_tools.build_tiny_tokenizer()
    model = omnivmed_tools.tiny_model(tokenizer, 0)
    if tower == "root":
        vision = json.loads((ROOT / "config.json").read_text())["vision_config"]
        config = OmniVMedConfig(**{**model.config.to_dict(), "vision_config": vision})
        model = OmniVMedForConditionalGeneration(config).eval()
    return model


class TimedChunks:
    """Iterates the processor's chunks, adding up the time spent making them (decoding, resizing, patches, pruning)."""

    def __init__(self, chunks):
        self.chunks, self.seconds, self.count, self.backend = iter(chunks), 0.0, 0, None

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            chunk = next(self.chunks)
        finally:
            self.seconds += time.perf_counter() - start
            self.count += 1
        self.backend = chunk["media_metadata"][0]["metadata"]["video_backend"]
        return chunk


def child(video: str, frames: int, size: int, chunk_frames: int, max_patches_per_chunk: int | None,
          prune_stage: str | None, tower: str, video_backend: str | None = None) -> dict:  # fmt: skip
    """One run in this process: the streamed visual features (processor + tower + pruning) of `video`."""
    import torch

    model = build_model(tower)
    model.set_attn_implementation("sdpa")
    if max_patches_per_chunk is not None:
        model.config.vision_config.max_patches_per_chunk = max_patches_per_chunk
    if prune_stage is not None:
        model.config.prune_stage = prune_stage
    processor = OmniVMedImageProcessor(
        **dict(omnivmed_tools.TINY_IMAGE_PROCESSOR, video_max_pixels=size * size, max_frames=frames,
               max_total_visual_tokens=10**9)  # fmt: skip
    )
    before = peak_rss_bytes()
    start = time.perf_counter()
    chunks = TimedChunks(processor.iter_video_chunks(video, chunk_frames=chunk_frames, return_tensors="pt",
                                                     video_backend=video_backend))  # fmt: skip
    with torch.inference_mode():
        visual = model.model.encode_video_chunks(chunks)
    end = time.perf_counter()
    keep = visual.visual_keep_mask
    return {
        "frames": int(visual.grid_thw[0, 0]),
        "chunks": chunks.count - 1,  # the last call found none
        "tokens": int(keep.numel()),
        "kept": int(keep.sum()),
        "tower_patches": int(visual.num_tower_tokens),
        "features": list(visual.pooler_output[0].shape),
        "prune_stage": model.config.prune_stage,
        "video_backend": chunks.backend,
        "processor_s": chunks.seconds,
        "tower_s": end - start - chunks.seconds,
        "total_s": end - start,
        "peak_rss": peak_rss_bytes(),
        "rss_before": before,
    }


def run(repeats: int = 2, frames: int = 3600, quick: bool = False, max_patches_per_chunk: int | None = None,
        size: int = 448, chunk_frames: int = 64, prune_stage: str | None = None, tower: str = "tiny",
        video_backend: str | None = None) -> list[Row]:  # fmt: skip
    if quick:
        frames, repeats = 40, 1
    short = frames // 10
    workdir = Path(tempfile.mkdtemp())
    videos = {n: str(write_video(workdir / f"video_{n}.avi", n, size)) for n in (short, frames)}
    extra = ["--size", str(size), "--chunk-frames", str(chunk_frames), "--tower", tower]
    extra += [] if max_patches_per_chunk is None else ["--max-patches-per-chunk", str(max_patches_per_chunk)]
    extra += [] if prune_stage is None else ["--prune-stage", prune_stage]
    extra += [] if video_backend is None else ["--video-backend", video_backend]
    results = {short: [], frames: []}
    for _ in range(repeats):  # interleaved: short, long, short, long, ...
        for n in (short, frames):
            args = ["--video", videos[n], "--frames", str(n), *extra]
            results[n].append(run_child("bench_long_video", args, timeout=3600))
    for path in videos.values():
        Path(path).unlink()
    t_short = statistics.median(r["total_s"] for r in results[short])
    t_long = statistics.median(r["total_s"] for r in results[frames])
    long = results[frames][0]
    rss = max(r["peak_rss"] for r in results[frames])
    ratio = t_long / (10 * t_short)
    model = "tiny config" if tower == "tiny" else "root config.json tower + tiny LLM"
    what = (f"{frames} frames at {size}x{size} (1 fps), streamed {chunk_frames} frames at a time, {model}, "
            f"{long['prune_stage']} pruning")  # fmt: skip
    detail = (
        f"decoding + processor {fmt_s(statistics.median(r['processor_s'] for r in results[frames]))}, tower + "
        f"projector {fmt_s(statistics.median(r['tower_s'] for r in results[frames]))}; {long['tokens']} tokens, "
        f"{long['kept']} kept ({100 * long['kept'] / long['tokens']:.1f} %), tower ran on {long['tower_patches']} "
        f"patches; frames read by {long['video_backend']}"
    )
    return [
        Row(
            "Long video", f"{what}: peak RSS (decoding + processor + tower + pruning)",
            f"{rss / GIB:.2f} GiB (process, including ~{long['rss_before'] / GIB:.2f} GiB of Python, torch and the "
            "model before the video is read)", rss / GIB, "<= 4 GiB", rss <= 4 * GIB, COMMAND,
        ),
        Row(
            "Long video", f"time of {frames} frames vs 10x {short} frames (streamed)",
            f"{fmt_s(t_long)} vs 10 x {fmt_s(t_short)}; {detail}", ratio, "<= 1.2x", ratio <= 1.2, COMMAND,
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help="internal: one measured run, JSON on stdout")
    parser.add_argument("--video")
    parser.add_argument("--frames", type=int, default=3600)
    parser.add_argument("--size", type=int, default=448, help="frame side in pixels (the video's and the tower's)")
    parser.add_argument("--chunk-frames", type=int, default=64, help="frames decoded, processed and encoded at once")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-patches-per-chunk", type=int, help="override the tower's chunking (0 = off)")
    parser.add_argument("--prune-stage", choices=("pre_encoder", "post_encoder", "pre_encoder_reuse"),
                        help="default: the config's")
    parser.add_argument("--tower", choices=("tiny", "root"), default="tiny")
    parser.add_argument("--video-backend", choices=("decord", "pyav"), help="default: load_media's (decord first)")
    args = parser.parse_args()
    if args.child:
        result = child(args.video, args.frames, args.size, args.chunk_frames, args.max_patches_per_chunk,
                       args.prune_stage, args.tower, args.video_backend)  # fmt: skip
        print(json.dumps(result))
    else:
        rows = run(args.repeats, args.frames, max_patches_per_chunk=args.max_patches_per_chunk, size=args.size,
                   chunk_frames=args.chunk_frames, prune_stage=args.prune_stage, tower=args.tower,
                   video_backend=args.video_backend)  # fmt: skip
        for row in rows:
            print(row)
