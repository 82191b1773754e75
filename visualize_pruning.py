"""Show what token pruning keeps: a montage of the slices/frames as the tower sees them, pruned blocks dimmed, kept
blocks outlined, the kept fraction in the title.

    python visualize_pruning.py scan.nii.gz --out montage.png [--threshold 0.1] [--reference last_kept]
    python visualize_pruning.py clip.mp4 --out montage.png --max-frames 16
    python visualize_pruning.py dicom_folder/ --kind volume --window lung --out montage.png
"""

import argparse
import logging
from pathlib import Path

from omnivmed.processing_omnivmed import OmniVMedImageProcessor
from omnivmed_tools import frame_labels, montage, patches_to_frames  # noqa: F401 (moved there; re-exported)


logger = logging.getLogger("visualize_pruning")


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
