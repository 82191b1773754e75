import numpy as np
from PIL import Image

from visualize_pruning import main, patches_to_frames, visualize
from omnivmed.processing_omnivmed import OmniVMedImageProcessor


def clip(n=4, side=112):
    rng = np.random.default_rng(0)
    base = (0.5 + 0.1 * rng.standard_normal((side, side, 3))).clip(0, 1).astype(np.float32)
    frames = np.stack([base] * n)
    for f in range(1, n):
        frames[f, 30:50, 28 * f : 28 * f + 20] = 1.0  # a square in block row 1, column f
    return frames


def test_patches_round_trip_to_the_frames_the_tower_sees():
    processor = OmniVMedImageProcessor(video_max_pixels=112 * 112)
    frames = clip()
    batch = processor([{"type": "video", "video": frames}], return_tensors="pt", prune_threshold=0.0)
    back = patches_to_frames(batch["pixel_values"], batch["grid_thw"][0], 2, 14, processor.image_mean, processor.image_std)
    np.testing.assert_allclose(back, frames, atol=1e-6)


def test_montage_dims_pruned_blocks_and_reports_kept_fraction(tmp_path):
    processor = OmniVMedImageProcessor(video_max_pixels=112 * 112)
    out = tmp_path / "montage.png"
    report = visualize({"type": "video", "video": clip()}, out, processor=processor, columns=4)
    assert report["per_frame"] == [16, 1, 2, 2]  # first frame whole; then the square's new (and old) block
    image = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert image.shape[1] > image.shape[0]  # four tiles in one row
    # tile 1 (frame 1): its kept block (row 1, col 1) is outlined in green and brighter than the pruned ones
    scale = 160 // 112
    x0, y0 = 4 + (112 * scale + 4), 22
    kept = image[y0 + 28 * scale + 3 : y0 + 56 * scale - 3, x0 + 28 * scale + 3 : x0 + 56 * scale - 3]
    pruned = image[y0 + 84 * scale + 3 : y0 + 112 * scale - 3, x0 + 3 : x0 + 28 * scale - 3]
    assert kept.mean() > 2 * pruned.mean()


def test_cli_writes_the_png(tmp_path, capsys):
    from bench.bench_pruning import write_instrument_video

    video = write_instrument_video(tmp_path / "clip.mp4", seconds=4, fps=4, size=112)
    main([str(video), "--out", str(tmp_path / "m.png"), "--threshold", "0.2"])
    assert (tmp_path / "m.png").exists() and "kept" in capsys.readouterr().out
