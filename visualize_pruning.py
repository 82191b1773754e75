"""Show what token pruning keeps: a montage of the slices/frames as the tower sees them, pruned blocks dimmed, kept
blocks outlined, the kept fraction in the title.

    python visualize_pruning.py scan.nii.gz --out montage.png [--threshold 0.1] [--reference last_kept]
    python visualize_pruning.py clip.mp4 --out montage.png --max-frames 16
    python visualize_pruning.py dicom_folder/ --kind volume --window lung --out montage.png
"""

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from omnivmed.processing_omnivmed import OmniVMedImageProcessor


logger = logging.getLogger("visualize_pruning")


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="image, NIfTI, DICOM file/folder or video")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--kind", choices=["image", "volume", "video"])
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--reference", choices=["last_kept", "previous"])
    parser.add_argument("--unit", choices=["normalized", "intensity"])
    parser.add_argument("--max-frames", type=int)
    parser.add_argument("--max-slices", type=int)
    parser.add_argument("--window", help="CT window preset, e.g. brain, lung, abdomen")
    parser.add_argument("--columns", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = {
        "prune_reference": args.reference,
        "prune_unit": args.unit,
        "max_frames": args.max_frames,
        "max_slices": args.max_slices,
        "window": args.window,
    }
    report = visualize(
        args.input,
        args.out,
        kind=args.kind,
        threshold=args.threshold,
        columns=args.columns,
        **{k: v for k, v in options.items() if v is not None},
    )
    print(f"kept {report['tokens_after']}/{report['tokens_before']} tokens; per frame {report['per_frame']}")


if __name__ == "__main__":
    main()
