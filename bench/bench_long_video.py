"""Long video: 3600 frames (1 h at 1 fps, 112x112) through processor + tower + pruning with the tiny config; peak RSS
and time against 10x a 360-frame run. Each run is a fresh process, so its peak RSS is its own.

    python bench/bench_long_video.py [--frames 3600] [--repeats 2]
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
from common import Row, fmt_s, peak_rss_bytes, run_child  # noqa: E402

import omnivmed_tools  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor  # noqa: E402


COMMAND = "python bench/bench_long_video.py"
GIB = 1024**3


def write_video(path: Path, n_frames: int, size: int = 112, period: int = 120, seed: int = 0) -> Path:
    """A static scene with an instrument sweeping across and back every `period` frames, at 1 fps (Motion-JPEG AVI:
    fast to write; the instrument moves at the same speed whatever the length, so the work per frame is the same)."""
    import av

    scene = omnivmed_tools.endoscopic_scene(size, seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=1)
        stream.width = stream.height = size
        stream.pix_fmt = "yuvj420p"
        for i in range(n_frames):
            frame = scene.copy()
            phase = (i % period) / period * 2
            x = int((phase if phase < 1 else 2 - phase) * (size - 20))
            y = size // 2
            frame[y - 3 : y + 3, : x + 15] = 0.75
            frame[y - 6 : y + 6, x + 15 : x + 20] = 0.9
            for packet in stream.encode(av.VideoFrame.from_ndarray((frame * 255).astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def child(video: str, frames: int, max_patches_per_chunk: int | None) -> dict:
    """One run in this process: processor + tower + pruning (the model's visual features) of `video`."""
    import torch

    tokenizer = omnivmed_tools.build_tiny_tokenizer()
    model = omnivmed_tools.tiny_model(tokenizer, 0)
    model.set_attn_implementation("sdpa")
    if max_patches_per_chunk is not None:
        model.config.vision_config.max_patches_per_chunk = max_patches_per_chunk
    processor = OmniVMedImageProcessor(
        **dict(omnivmed_tools.TINY_IMAGE_PROCESSOR, max_frames=frames, max_total_visual_tokens=10**7)
    )
    before = peak_rss_bytes()
    start = time.perf_counter()
    inputs = processor([video], kind="video", return_tensors="pt")
    mid = time.perf_counter()
    with torch.inference_mode():
        features, keep, _ = model.model.get_visual_features(
            inputs["pixel_values"], inputs["grid_thw"], inputs["merge_sizes"], inputs["patch_positions"],
            inputs["visual_keep_mask"],
        )
    end = time.perf_counter()
    return {
        "frames": int(inputs["grid_thw"][0, 0]),
        "tokens": int(keep.numel()),
        "kept": int(keep.sum()),
        "features": list(features.shape),
        "processor_s": mid - start,
        "tower_s": end - mid,
        "total_s": end - start,
        "peak_rss": peak_rss_bytes(),
        "rss_before": before,
    }


def run(repeats: int = 2, frames: int = 3600, quick: bool = False, max_patches_per_chunk: int | None = None) -> list[Row]:
    if quick:
        frames, repeats = 40, 1
    short = frames // 10
    workdir = Path(tempfile.mkdtemp())
    videos = {n: str(write_video(workdir / f"video_{n}.avi", n)) for n in (short, frames)}
    extra = [] if max_patches_per_chunk is None else ["--max-patches-per-chunk", str(max_patches_per_chunk)]
    results = {short: [], frames: []}
    for _ in range(repeats):  # interleaved: short, long, short, long, ...
        for n in (short, frames):
            results[n].append(run_child("bench_long_video", ["--video", videos[n], "--frames", str(n), *extra]))
    t_short = statistics.median(r["total_s"] for r in results[short])
    t_long = statistics.median(r["total_s"] for r in results[frames])
    long = results[frames][0]
    rss = max(r["peak_rss"] for r in results[frames])
    ratio = t_long / (10 * t_short)
    detail = (
        f"processor {fmt_s(statistics.median(r['processor_s'] for r in results[frames]))}, tower + pruning "
        f"{fmt_s(statistics.median(r['tower_s'] for r in results[frames]))}; {long['tokens']} tokens, "
        f"{long['kept']} kept ({100 * long['kept'] / long['tokens']:.1f} %)"
    )
    return [
        Row(
            "Long video", f"{frames} frames at 112x112, tiny config: peak RSS (processor + tower + pruning)",
            f"{rss / GIB:.2f} GiB (process, including ~{long['rss_before'] / GIB:.2f} GiB of Python, torch and the "
            "model before the video is read)", rss / GIB, "<= 4 GiB", rss <= 4 * GIB, COMMAND,
        ),
        Row(
            "Long video", f"time of {frames} frames vs 10x {short} frames",
            f"{fmt_s(t_long)} vs 10 x {fmt_s(t_short)}; {detail}", ratio, "<= 1.2x", ratio <= 1.2, COMMAND,
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help="internal: one measured run, JSON on stdout")
    parser.add_argument("--video")
    parser.add_argument("--frames", type=int, default=3600)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-patches-per-chunk", type=int, help="override the tower's chunking (0 = off)")
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(torch.get_num_threads())
        print(json.dumps(child(args.video, args.frames, args.max_patches_per_chunk)))
    else:
        for row in run(args.repeats, args.frames, max_patches_per_chunk=args.max_patches_per_chunk):
            print(row)
