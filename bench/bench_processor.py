"""Processor speed: 2D vs transformers' Qwen2VLImageProcessorPil, 3D (NIfTI) vs a plain per-slice Pillow route, video
frames/s decoded + patched at fps 1 (decord and PyAV).

    python bench/bench_processor.py [--repeats 5] [--quick]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, Timer, fmt_s  # noqa: E402

from omnivmed.processing_omnivmed import OmniVMedImageProcessor  # noqa: E402
from omnivmed_tools import write_instrument_video  # noqa: E402


MNI = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# 8 sizes a medical batch mixes: chest X-ray, dermoscopy, pathology tiles, fundus, thumbnails...
IMAGE_SIZES = [(512, 512), (300, 400), (1024, 768), (224, 224), (640, 480), (128, 160), (800, 600), (256, 512)]
COMMAND = "python bench/bench_processor.py"


def synthetic_images(sizes, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 60 * np.sin(xx / rng.uniform(8, 40)) * np.cos(yy / rng.uniform(8, 40))
        noise = rng.normal(0, 12, (h, w, 3))
        images.append(Image.fromarray(np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)))
    return images


def bench_2d(repeats: int, sizes=IMAGE_SIZES) -> list[Row]:
    from transformers import Qwen2VLImageProcessorPil

    images = synthetic_images(sizes)
    ours = OmniVMedImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448)
    theirs = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 448 * 448}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    ours_out = ours(images, kind="image", return_tensors="pt")
    theirs_out = theirs(images, return_tensors="pt")
    ours_tokens = int(ours_out["visual_keep_mask"].numel())
    theirs_tokens = int((theirs_out["image_grid_thw"].prod(-1) // 4).sum())
    if ours_tokens != theirs_tokens:
        raise RuntimeError(f"token counts differ: ours {ours_tokens}, Qwen2-VL {theirs_tokens}")
    ours_pil = OmniVMedImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448, resize_backend="pil")
    times = Timer().run(
        {
            "ours": lambda: ours(images, kind="image", return_tensors="pt"),
            "ours_pil": lambda: ours_pil(images, kind="image", return_tensors="pt"),
            "qwen2vl": lambda: theirs(images, return_tensors="pt"),
        },
        repeats,
    )
    sizes_text = f"{len(images)} RGB images {min(sizes)}..{max(sizes)} px -> {ours_tokens} tokens"
    return [
        Row(
            "Processor", "2D: ours (torch resize) vs Qwen2VLImageProcessorPil",
            f"{fmt_s(times['ours'])} vs {fmt_s(times['qwen2vl'])}; {sizes_text}",
            times["qwen2vl"] / times["ours"], ">= 1.0x", times["qwen2vl"] / times["ours"] >= 1.0, COMMAND,
        ),
        Row(
            "Processor", "2D: ours (resize_backend=pil) vs Qwen2VLImageProcessorPil",
            f"{fmt_s(times['ours_pil'])} vs {fmt_s(times['qwen2vl'])}",
            times["qwen2vl"] / times["ours_pil"], ">= 1.0x", times["qwen2vl"] / times["ours_pil"] >= 1.0, COMMAND,
        ),
    ]


def plain_volume_route(path, slice_indices, size_hw, patch=14, merge=2):
    """NIfTI -> patches the plain way: nibabel, closest canonical, then per slice uint8 -> Pillow resize -> float ->
    normalise -> (C, p, p) patches in merge-block order."""
    import nibabel as nib
    from PIL import Image

    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.dataobj)
    h, w = size_hw
    gh, gw = h // patch, w // patch
    out = []
    for k in slice_indices:
        s = data[:, :, k].T[::-1, ::-1]  # radiological display: anterior up, patient's right on the left
        s8 = np.clip(s, 0, 255).astype(np.uint8)
        x = np.asarray(Image.fromarray(s8).convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
        x = (torch.from_numpy(x).permute(2, 0, 1) - 0.5) / 0.5
        x = x.reshape(3, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
        out.append(x.reshape(gh * gw, 3 * patch * patch))
    return torch.cat(out)


def bench_3d(repeats: int, max_slices: int = 64) -> list[Row]:
    import nilearn

    path = str(Path(nilearn.__file__).parent / "datasets/data" / MNI)
    ours = OmniVMedImageProcessor(video_max_pixels=224 * 224, max_slices=max_slices)
    first = ours([path], kind="volume", return_tensors="pt")
    meta = first["media_metadata"][0]
    plain = plain_volume_route(path, meta["slice_indices"], meta["resized_size"])
    if plain.shape != first["pixel_values"].shape:
        raise RuntimeError(f"plain route gave {tuple(plain.shape)}, ours {tuple(first['pixel_values'].shape)}")
    times = Timer().run(
        {
            "ours": lambda: ours([path], kind="volume", return_tensors="pt"),
            "plain": lambda: plain_volume_route(path, meta["slice_indices"], meta["resized_size"]),
        },
        repeats,
    )
    t = meta["num_frames"]
    return [
        Row(
            "Processor", f"3D: MNI152 T1 NIfTI -> patches ({t} axial slices at {meta['resized_size'][0]} px), "
            "ours vs plain per-slice Pillow",
            f"{fmt_s(times['ours'])} vs {fmt_s(times['plain'])} (ours includes windowing, slice sampling, pruning)",
            times["plain"] / times["ours"], "-", None, COMMAND,
        )
    ]


def bench_video(repeats: int, seconds: int = 64) -> list[Row]:
    path = write_instrument_video(Path(tempfile.mkdtemp()) / "instrument.mp4", seconds=seconds)
    ours = OmniVMedImageProcessor(video_max_pixels=224 * 224, max_frames=seconds, fps=1.0)
    arms = {b: (lambda b=b: ours([str(path)], kind="video", video_backend=b)) for b in ("decord", "pyav")}
    times = Timer().run(arms, repeats)
    n = ours([str(path)], kind="video")["grid_thw"][0][0]
    fps = {b: n / times[b] for b in arms}
    return [
        Row(
            "Processor", f"Video: frames/s decoded + patched at fps 1 ({seconds} s H.264 224 px, 8 fps native)",
            f"decord {fps['decord']:.0f} frames/s, PyAV {fps['pyav']:.0f} frames/s", fps["decord"] / fps["pyav"],
            "-", None, COMMAND, "ratio = decord / PyAV",
        )
    ]


def run(repeats: int = 5, quick: bool = False) -> list[Row]:
    if quick:
        return bench_2d(1, IMAGE_SIZES[3:6]) + bench_3d(1, max_slices=4) + bench_video(1, seconds=4)
    return bench_2d(repeats) + bench_3d(repeats) + bench_video(repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.repeats, args.quick):
        print(row)
