"""Show what token pruning keeps: a montage of the slices/frames as the tower sees them, pruned blocks dimmed, kept
blocks outlined, the kept fraction in the title.

    python visualize_pruning.py scan.nii.gz --out montage.png [--threshold 0.1] [--reference last_kept]
    python visualize_pruning.py clip.mp4 --out montage.png --max-frames 16
    python visualize_pruning.py dicom_folder/ --kind volume --window lung --out montage.png
"""

import argparse
import logging
from pathlib import Path

from omnivmed_tools import frame_labels, montage, patches_to_frames, visualize  # noqa: F401 (moved there; re-exported)


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
