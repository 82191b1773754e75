"""ablate_omnivmed.py: the quick mode end to end on tiny sizes (every table and plot of EVIDENCE.md is written; the
numbers of a 3-step run mean nothing and are not checked), resume of finished runs, and the report's statistics."""

import json
import math

import pytest
import torch
from conftest import tiny_config_dict

import ablate_omnivmed as A
from omnivmed.configuration_omnivmed import OmniVMedConfig
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration, patch_positions_from_grid


TABLE_HEADERS = (
    "| task | input | n | chance / majority | RoPE, frame scope (model): after stage 2 |",  # claim 1 per task
    "| comparison (paired by seed, points of accuracy) | image | volume | video | all |",  # claim 1 paired
    "| stage | reference | threshold | visual tokens kept | prefill time vs no pruning |",  # claim 2
    "| stage | reference | threshold | direction / video |",  # claim 2 per task
    "| task | input | n | chance / majority | progressive 1→2→3 | joint | progressive − joint (paired) |",  # claim 3
    "| task | input | n | chance / majority | post-encoder | pre-encoder | pre-encoder reuse | pre-encoder − post (paired) |",  # noqa: E501
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    argv = ["--quick", "--seeds", "0", "--steps", "1,1,1", "--eval_limit", "24", "--sweep_rows", "6",
            "--out", str(tmp / "runs"), "--report", str(tmp / "EVIDENCE.md")]  # fmt: skip
    report = A.main(argv)
    return tmp, argv, report


def test_quick_mode_writes_every_table_and_plot(quick_run):
    tmp, _, report = quick_run
    text = report.read_text()
    for header in ("## Claim 1", "## Claim 2", "## Claim 2, deployed", "## Claim 3", "## Verdicts", "## Commands",
                   "## Time", "What a miniature result can say"):  # fmt: skip
        assert header in text, header
    for header in TABLE_HEADERS:
        assert header in text, header
    # every threshold x reference x stage of the sweep has a row (threshold 0 once)
    for stage in A.PRUNE_STAGES:
        for reference in A.REFERENCES:
            for threshold in A.THRESHOLDS[1:]:
                assert f"| {stage} | {reference} | {threshold:g} |" in text
    assert "| post_encoder | last_kept | 0 |" in text
    # the claim tables cover 3D and video rows, not only 2D
    assert "| direction | video" in text and "| volume" in text
    for arm in A.ARMS:
        assert f"- `{arm}`: `python train_trl.py " in text
    for png in ("accuracy_vs_tokens_kept.png", "loss_curves.png"):
        data = (tmp / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
        assert f"]({png})" in text


def test_hand_run_sections_survive_a_rewrite(quick_run):
    """EVIDENCE.md's hand-run sections (results this script does not produce) are carried into the regenerated file,
    before claim 3, and nothing else of the old file is."""
    tmp, argv, report = quick_run
    text = report.read_text()
    block = f"{A.HAND_RUN[0]}\n## A hand-run section\n\n| a | b |\n|---|---|\n{A.HAND_RUN[1]}"
    report.write_text(text.replace("## Claim 3", block + "\n\n## Claim 3", 1) + "\nstale line\n")
    try:
        A.main(argv + ["--report_only"])
        new = report.read_text()
        assert new.count(block) == 1 and new.index(block) < new.index("## Claim 3")
        assert "stale line" not in new
    finally:
        report.write_text(text)


def test_finished_runs_are_kept_and_results_complete(quick_run):
    tmp, argv, _ = quick_run
    paths = {arm: tmp / "runs" / "arms" / arm / "seed0" / "results.json" for arm in A.ARMS}
    stamps = {arm: p.stat().st_mtime_ns for arm, p in paths.items()}
    for arm, path in paths.items():
        res = json.loads(path.read_text())
        assert res["arm"] == arm and res["losses"], arm
        assert ("after_stage2" in res) == (arm != "joint")
        assert {s["stage"] for s in res["losses"]} == (
            {"stage3-mixed"} if arm == "joint" else {"stage1-alignment", "stage2-instruct2d", "stage3-mixed"}
        )
        assert not (path.parent / "final").exists()  # models are removed unless --keep_models
        # the stage arms trained and scored with their pinned stage; the others with the config default
        assert res["final"]["prune_stage"] == A.STAGE_ARMS.get(arm, "post_encoder"), arm
        assert not (path.parent / "claim.pid").exists()
    sweep = json.loads(paths["rope_frame"].read_text())["final"]["sweep"]
    assert len(sweep) == 1 + 4 * 4
    kept = {(s["stage"], s["reference"], s["threshold"]): s["kept"] / s["total"] for s in sweep}
    assert kept[("post_encoder", "last_kept", 0.0)] == 1.0
    assert kept[("post_encoder", "last_kept", 0.3)] == kept[("pre_encoder", "last_kept", 0.3)] < 1.0
    timing = json.loads((tmp / "runs" / "timing.json").read_text())
    assert len(timing["points"]) == len(sweep) and all(p["seconds"] > 0 for p in timing["points"])
    A.main(argv)  # nothing left to run: the report is rewritten from the same results
    assert {arm: p.stat().st_mtime_ns for arm, p in paths.items()} == stamps


def test_spread_and_learned_rule():
    assert A.mean_sd([0.5, 0.7, 0.6]) == pytest.approx((0.6, 0.1))
    assert A.fmt([0.5, 0.7, 0.6]) == "60 ± 10"
    assert A.learned([0.9, 0.92, 0.88], floor=0.5)
    assert not A.learned([0.3, 0.9, 0.6], floor=0.5)  # above the floor on average, not beyond the spread
    assert not A.learned([0.52, 0.53, 0.54], floor=0.5)  # beyond the spread but under 5 points
    assert math.isnan(A.mean_sd([])[0]) and A.fmt([]) == "—"


def test_sweep_rows_are_a_seeded_sample_not_a_stride():
    """The dataset writes its items in a fixed rhythm (here left / right alternating); an even stride of 2 would keep
    one answer only. The sample keeps both, in the dataset's order, the same every call, video / volume rows only."""
    rows = [{"meta": json.dumps({"kind": "video", "answer": ("left", "right")[i % 2], "i": i})} for i in range(40)]
    rows += [{"meta": json.dumps({"kind": "image", "answer": "yes", "i": 40 + i})} for i in range(10)]
    picked = A.sweep_selection(rows, 20)
    meta = [json.loads(r["meta"]) for r in picked]
    assert len(picked) == 20 and {m["answer"] for m in meta} == {"left", "right"}
    assert all(m["kind"] == "video" for m in meta) and [m["i"] for m in meta] == sorted(m["i"] for m in meta)
    assert picked == A.sweep_selection(rows, 20)
    assert len(A.sweep_selection(rows, 0)) == 40


# --- the learned absolute position table (claim 1's comparison arm, kept out of the model) ------------------------


def learned_model(seed=0, **vision):
    torch.manual_seed(seed)
    config = OmniVMedConfig(**tiny_config_dict(vision_config={"position_embedding": "learned", **vision}))
    assert A.model_class_for(config.vision_config) is A.LearnedPositionOmniVMed
    return A.LearnedPositionOmniVMed(config).eval()


def visual_inputs(grids, seed=0, patch_dim=48):
    grid = torch.tensor(grids)
    n = int(grid.prod(-1).sum())
    return torch.randn(n, patch_dim, generator=torch.Generator().manual_seed(seed)), grid


@pytest.mark.parametrize("grids", [[[1, 2, 2]], [[1, 4, 14], [3, 6, 4]], [[1, 16, 16], [2, 30, 6]]])
def test_learned_table_any_grid_positions_matter_time_does_not(grids):
    vision = learned_model(position_table_size=5, attention_scope="clip").model.vision_tower
    assert vision.position_embedding.weight.shape == (25, 48)
    pv, grid = visual_inputs(grids)
    pos = patch_positions_from_grid(grid, torch.full((len(grids),), 2))
    out = vision(pv, grid, pos).last_hidden_state
    assert out.shape == (pv.shape[0], 48) and torch.isfinite(out).all()
    # interpolated to the item's grid: a 5 x 5 grid reads the table as it is
    if grids == [[1, 2, 2]]:
        pos5 = torch.tensor([[0, i, j] for i in range(5) for j in range(5)])
        emb = vision.absolute_positions(torch.tensor([[1, 5, 5]]), pos5)
        torch.testing.assert_close(emb, vision.position_embedding.weight, atol=1e-6, rtol=1e-6)
    # (h, w) positions matter (no RoPE, so only through the table) ...
    n0 = grids[0][0] * grids[0][1] * grids[0][2]
    perm = pos.clone()
    perm[:n0] = pos[:n0][torch.randperm(n0, generator=torch.Generator().manual_seed(1))]
    assert not torch.allclose(vision(pv, grid, perm).last_hidden_state[:n0], out[:n0], atol=1e-4)
    # ... the slice / frame index does not, even in clip scope (SigLIP's table has no t)
    swapped_t = pos.clone()
    swapped_t[:, 0] = torch.repeat_interleave(grid[:, 0], grid.prod(-1)) - 1 - pos[:, 0]
    torch.testing.assert_close(vision(pv, grid, swapped_t).last_hidden_state, out, atol=1e-5, rtol=1e-5)
    # a keep mask runs the kept patches with the same table entries
    keep = torch.rand(pv.shape[0], generator=torch.Generator().manual_seed(2)) > 0.3
    assert vision(pv, grid, pos, patch_keep_mask=keep).last_hidden_state.shape == (int(keep.sum()), 48)
    emb = vision.absolute_positions(grid, pos)
    torch.testing.assert_close(vision.absolute_positions(grid, pos[keep], keep), emb[keep])


def test_learned_table_arm_save_load_round_trip_and_chunking(tmp_path):
    model = learned_model(position_table_size=6)
    model.save_pretrained(tmp_path)
    config = OmniVMedConfig.from_pretrained(tmp_path)
    assert config.vision_config.position_embedding == "learned" and config.vision_config.position_table_size == 6
    loaded = A.model_class_for(config.vision_config).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.model.vision_tower.position_embedding.weight,
                               model.model.vision_tower.position_embedding.weight)  # fmt: skip
    grids = [[1, 4, 6], [2, 4, 4]]
    pv, grid = visual_inputs(grids)
    n_visual = sum(t * (h // 2) * (w // 2) for t, h, w in grids)
    ids = torch.tensor([[1, 2] + [5] * n_visual + [3, 4]])
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pv, grid_thw=grid, prune_threshold=0.0).logits
        out = loaded(input_ids=ids, pixel_values=pv, grid_thw=grid, prune_threshold=0.0).logits
    torch.testing.assert_close(out, ref)
    # the model's own class does not carry the table (the arm is the ablation's, not the product's)
    assert not hasattr(OmniVMedForConditionalGeneration(config).model.vision_tower, "position_embedding")
    # encoding in runs of whole segments gives the whole sequence's features with the table too
    merge = torch.full((2,), 2)
    vision = model.model.vision_tower
    whole = vision(pv, grid, merge_sizes=merge).last_hidden_state
    vision.config.max_patches_per_chunk = 16
    torch.testing.assert_close(vision(pv, grid, merge_sizes=merge).last_hidden_state, whole, atol=1e-5, rtol=1e-5)
