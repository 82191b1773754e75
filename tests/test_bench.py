"""bench/run_all.py --quick writes BENCHMARKS.md with every measurement's row (a smoke test of the script; the
timings it prints are not checked: speed targets are measured by the benchmark itself, never by unit tests)."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
EXPECTED_ROWS = [
    "2D: ours (torch resize) vs Qwen2VLImageProcessorPil",
    "2D: ours (resize_backend=pil) vs Qwen2VLImageProcessorPil",
    "3D: MNI152 T1 NIfTI -> patches",
    "Video: frames/s decoded + patched at fps 1",
    "ours vs SiglipVisionModel, same weights",
    "ours: GFLOP/s vs torch.matmul GFLOP/s",
    "SiglipVisionModel: GFLOP/s vs torch.matmul GFLOP/s",
    "packed batch of 3 images of different sizes vs padded to the largest",
    "MNI152 T1, axial, 6 slices, tiny config: forward speed-up, post-encoder pruning",
    "MNI152 T1, axial, 6 slices, tiny config: forward speed-up, pre-encoder pruning",
    "MNI152 T1, axial, 6 slices, tiny config: forward speed-up, pre-encoder reuse pruning",
    "static-camera video, 4 s at 1 fps, 224 px, tiny config: forward speed-up, post-encoder pruning",
    "static-camera video, 4 s at 1 fps, 224 px, tiny config: forward speed-up, pre-encoder pruning",
    "static-camera video, 4 s at 1 fps, 224 px, tiny config: forward speed-up, pre-encoder reuse pruning",
    "40 frames at 448x448 (1 fps), streamed",
    "time of 40 frames vs 10x 4 frames (streamed)",
    "tokens/s with vs without KV cache",
    "prefill (tower + projector + LLM forward) time vs visual token count",
    "peak RSS growth of one forward+backward step",
]


def test_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "Quick mode" in text and "OMP_NUM_THREADS=1 python bench/run_all.py --quick" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.count(" | ") == 7]
    table = rows[1:]  # after the header row
    names = [row.split(" | ")[1] for row in table]
    for expected in EXPECTED_ROWS:
        assert sum(expected in name for name in names) == 1, f"no single row for {expected!r} in {names}"
    assert len(table) == len(EXPECTED_ROWS)
    for row in table:
        cells = row.strip("| ").split(" | ")
        goal, met = cells[4], cells[5]
        assert met in ("met", "**not met**", "-")
        assert (goal == "-") == (met == "-"), row  # a goal always gets a verdict, a verdict always has a goal
    for fact in ("CPU", "cores", "torch", "torch threads", "OMP_NUM_THREADS"):
        assert f"| {fact}" in text
