"""Medical-aware token pruning: the rule on synthetic clips whose answer is known, and the model applying it."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import build_omnivmed
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration
from omnivmed.processing_omnivmed import OmniVMedImageProcessor, OmniVMedProcessor
from omnivmed.pruning_omnivmed import compute_keep_mask


SIDE = 112  # 8 x 8 patches of 14 = 4 x 4 blocks of 28 px per frame: no resampling at the tiny processor's budget
BLOCK = 28
BLOCKS = SIDE // BLOCK


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_omnivmed.build_tiny_tokenizer()
    return OmniVMedProcessor(OmniVMedImageProcessor(**build_omnivmed.TINY_IMAGE_PROCESSOR), tokenizer)


@pytest.fixture(scope="module")
def model(processor):
    return build_omnivmed.tiny_model(processor.tokenizer, seed=0)


def background(seed=0):
    rng = np.random.default_rng(seed)
    return (0.5 + 0.1 * rng.standard_normal((SIDE, SIDE, 3))).clip(0, 1).astype(np.float32)


def keep_grid(processor, frames, **kwargs):
    """(T, 4, 4) bool: which blocks of each frame the processor keeps."""
    out = processor.image_processor([{"type": "video", "video": np.stack(frames)}], return_tensors="pt", **kwargs)
    return out["visual_keep_mask"].reshape(len(frames), BLOCKS, BLOCKS)


def conversation(block, question="What is shown?"):
    return [{"role": "user", "content": [block, {"type": "text", "text": question}]}]


def inputs_for(processor, conversations, **kwargs):
    return processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


def moving_square_clip(n=5):
    frames, touched = [], []
    for f in range(n):
        frame = background().copy()
        col = f % BLOCKS  # a 20 px square stepping one block right per frame in block row 1, wrapping around
        frame[32:52, 4 + BLOCK * col : 24 + BLOCK * col] = 1.0
        frames.append(frame)
        touched.append({(1, col)})
    return frames, touched


def nifti_volume(tmp_path: Path) -> str:
    nilearn = pytest.importorskip("nilearn")
    return str(Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


# --- the rule ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["last_kept", "previous"])
def test_static_video_keeps_first_frame_and_one_token_per_later_frame(processor, reference):
    frames = [background()] * 5
    keep = keep_grid(processor, frames, prune_reference=reference)
    assert keep[0].all()
    assert keep[1:].flatten(1).sum(1).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("reference", ["last_kept", "previous"])
def test_moving_square_keeps_exactly_the_blocks_it_touches(processor, reference):
    frames, touched = moving_square_clip()
    keep = keep_grid(processor, frames, prune_reference=reference)
    for f in range(1, len(frames)):
        kept = {tuple(rc) for rc in keep[f].nonzero().tolist()}
        # where the square is now, and where it was (that block changed back to background)
        assert kept == touched[f] | touched[f - 1], f


def drift_clip(n=25, step=0.01):
    frames = []
    for f in range(n):
        frame = background().copy()
        frame[:56, :56] = 0.3 + step * f  # 2 x 2 blocks brightening slowly
        frame[84:, 84:] = (f % 2) * 1.0  # a flickering corner block: every frame has a clearly changed token
        frames.append(frame)
    return frames


def kept_frames(keep, row, col):
    return [f for f in range(keep.shape[0]) if keep[f, row, col]]


@pytest.mark.parametrize("unit, max_gap", [("normalized", 10), ("intensity", 11)])
def test_slow_drift_is_refreshed_in_last_kept_mode_and_never_in_previous_mode(processor, unit, max_gap):
    frames = drift_clip()
    last_kept = keep_grid(processor, frames, prune_reference="last_kept", prune_unit=unit)
    previous = keep_grid(processor, frames, prune_reference="previous", prune_unit=unit)
    for row in (0, 1):
        for col in (0, 1):
            refreshed = kept_frames(last_kept, row, col)
            gaps = np.diff(refreshed)
            assert len(refreshed) >= 3 and gaps.max() <= max_gap, refreshed
            assert kept_frames(previous, row, col) == [0]
    # the flicker is kept in both modes, the static background in neither
    assert kept_frames(previous, 3, 3) == list(range(25))
    assert not last_kept[1:, 2, 0].any() and not previous[1:, 2, 0].any()


def test_two_d_images_are_never_pruned(processor):
    out = processor.image_processor([{"type": "image", "image": background()}], return_tensors="pt", prune_threshold=10.0)
    assert out["visual_keep_mask"].all()


def test_threshold_zero_keeps_everything(processor):
    out = processor.image_processor([{"type": "video", "video": np.stack([background()] * 4)}], prune_threshold=0.0)
    assert np.asarray(out["visual_keep_mask"]).all()


def test_rule_works_per_item_in_a_packed_batch(processor):
    frames, _ = moving_square_clip()
    items = [
        {"type": "video", "video": np.stack([background(1)] * 3)},
        {"type": "image", "image": background(2)},
        {"type": "video", "video": np.stack(frames)},
    ]
    batch = processor.image_processor(items, return_tensors="pt")
    alone = [processor.image_processor([item], return_tensors="pt")["visual_keep_mask"] for item in items]
    assert torch.equal(batch["visual_keep_mask"], torch.cat(alone))


# --- the model applying it ---------------------------------------------------------------------------------------


def three_media(tmp_path):
    frames, _ = moving_square_clip(6)
    return [
        conversation({"type": "image", "image": (background(3) * 255).astype(np.uint8)}),
        conversation({"type": "volume", "path": nifti_volume(tmp_path), "max_slices": 6}, "Which slice?"),
        conversation({"type": "video", "video": np.stack(frames)}, "Where does it move?"),
    ]


def test_threshold_zero_logits_equal_the_unpruned_model(processor, model, tmp_path):
    conversations = three_media(tmp_path)
    config = copy.deepcopy(model.config)
    config.prune_threshold = 0.0
    unpruned = OmniVMedForConditionalGeneration(config)
    unpruned.load_state_dict(model.state_dict())
    unpruned.eval()
    for conv in conversations:
        inputs = inputs_for(processor, [conv], processor_kwargs={"prune_threshold": 0.0})
        assert inputs["visual_keep_mask"].all()
        without_mask = {k: v for k, v in inputs.items() if k != "visual_keep_mask"}
        with torch.no_grad():
            reference = unpruned(**without_mask).logits
            for stage in ("post_encoder", "pre_encoder"):
                model.config.prune_stage = stage
                out = model(**inputs, prune_threshold=0.0)
                torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=1e-5)
        model.config.prune_stage = "post_encoder"


def test_batch_of_three_media_equals_each_alone(processor, model, tmp_path):
    conversations = three_media(tmp_path)
    batch = inputs_for(processor, conversations)
    assert not batch["visual_keep_mask"].all()  # the volume and the video were pruned
    with torch.no_grad():
        batch_logits = model(**batch).logits
        for i, conv in enumerate(conversations):
            alone = inputs_for(processor, [conv])
            logits = model(**alone).logits
            n = logits.shape[1]
            torch.testing.assert_close(batch_logits[i, -n:], logits[0], atol=1e-4, rtol=1e-4)


def test_model_recomputes_the_mask_when_none_is_given(processor, model, tmp_path):
    inputs = inputs_for(processor, [three_media(tmp_path)[2]])
    with torch.no_grad():
        given = model(**inputs)
        recomputed = model(**{k: v for k, v in inputs.items() if k != "visual_keep_mask"})
    assert torch.equal(given.visual_keep_mask, recomputed.visual_keep_mask)
    torch.testing.assert_close(given.logits, recomputed.logits)


def test_pre_and_post_encoder_keep_the_same_tokens_and_pre_runs_fewer(processor, model, tmp_path):
    inputs = inputs_for(processor, three_media(tmp_path))
    outs = {}
    with torch.no_grad():
        for stage in ("post_encoder", "pre_encoder"):
            model.config.prune_stage = stage
            outs[stage] = model(**inputs)
    model.config.prune_stage = "post_encoder"
    assert torch.equal(outs["pre_encoder"].visual_keep_mask, outs["post_encoder"].visual_keep_mask)
    total_patches = inputs["pixel_values"].shape[0]
    assert outs["post_encoder"].num_tower_tokens == total_patches
    kept_patches = int(outs["pre_encoder"].visual_keep_mask.sum()) * 4  # every item here merges 2 x 2
    assert outs["pre_encoder"].num_tower_tokens < 0.7 * total_patches
    assert outs["pre_encoder"].num_tower_tokens == kept_patches
    assert torch.isfinite(outs["pre_encoder"].logits).all()


def test_per_call_threshold_on_processor_and_model(processor, model, tmp_path):
    conv = three_media(tmp_path)[2]
    strict = inputs_for(processor, [conv], processor_kwargs={"prune_threshold": 0.0})
    loose = inputs_for(processor, [conv], processor_kwargs={"prune_threshold": 0.5})
    assert loose["input_ids"].shape[1] < strict["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**{k: v for k, v in loose.items() if k != "visual_keep_mask"}, prune_threshold=0.5)
        generated = model.generate(**loose, prune_threshold=0.5, max_new_tokens=3, do_sample=False)
    assert out.visual_keep_mask.sum() < out.visual_keep_mask.numel()
    assert generated.shape[1] > loose["input_ids"].shape[1]
    with pytest.raises(ValueError, match="placeholder"):
        model(**{k: v for k, v in loose.items() if k != "visual_keep_mask"}, prune_threshold=0.0)


def test_a_mask_disagreeing_with_the_text_is_a_clear_error(processor, model, tmp_path):
    inputs = inputs_for(processor, [three_media(tmp_path)[2]])
    keep = inputs["visual_keep_mask"].clone()
    # same total, different frames: move one kept token of frame 2 into frame 1
    per_frame = keep.reshape(-1, BLOCKS * BLOCKS)
    f2 = per_frame[2].nonzero()[0, 0]
    f1 = (~per_frame[1]).nonzero()[0, 0]
    per_frame[2, f2], per_frame[1, f1] = False, True
    with pytest.raises(ValueError, match="disagrees with input_ids"):
        model(**{**inputs, "visual_keep_mask": per_frame.reshape(-1)})
    with pytest.raises(ValueError, match="placeholder tokens"):
        model(**{**inputs, "visual_keep_mask": torch.ones_like(keep)})


def test_pruning_report_per_item(processor, tmp_path):
    inputs = inputs_for(processor, [three_media(tmp_path)[2]])
    report = inputs["media_metadata"][0]["pruning_report"]
    assert report["tokens_before"] == 6 * 16
    assert report["per_frame"][0] == 16 and report["tokens_after"] == sum(report["per_frame"])
    assert report["tokens_after"] == int(inputs["visual_keep_mask"].sum())


def test_compute_keep_mask_validates_its_input():
    with pytest.raises(ValueError, match="reference"):
        compute_keep_mask(torch.zeros(8, 12), torch.tensor([[2, 2, 2]]), torch.tensor([2]), reference="next")
    with pytest.raises(ValueError, match="describes 8 patches"):
        compute_keep_mask(torch.zeros(9, 12), torch.tensor([[2, 2, 2]]), torch.tensor([2]))


def test_min_tokens_pick_first_or_most_changed():
    """A static frame keeps one token: the most changed block by default, the first block with pick="first"."""
    blocks = torch.zeros(2, 4, 4 * 12)  # 2 frames, 4 blocks of 2x2 patches of 12 values
    blocks[1, 2] += 0.01  # block 2 changed most, still below the threshold
    pixel_values = blocks.reshape(2 * 4 * 4, 12)
    grid, merge = torch.tensor([[2, 4, 4]]), torch.tensor([2])
    most = compute_keep_mask(pixel_values, grid, merge, num_channels=3)
    first = compute_keep_mask(pixel_values, grid, merge, num_channels=3, min_tokens_pick="first")
    assert most[4:].tolist() == [False, False, True, False]
    assert first[4:].tolist() == [True, False, False, False]


def test_an_unknown_prune_stage_set_after_loading_is_an_error_not_post_encoder(processor, model, tmp_path):
    # from_pretrained(..., prune_stage=...) and attribute writes bypass the config's own check
    inputs = inputs_for(processor, [three_media(tmp_path)[2]])
    saved, model.config.prune_stage = model.config.prune_stage, "pre-encoder"
    try:
        with pytest.raises(ValueError, match="prune_stage must be one of .*'pre-encoder'"):
            model(**inputs)
    finally:
        model.config.prune_stage = saved


def test_training_mode_runs_train_prune_stage(tiny_config):
    """model.train() runs `train_prune_stage` (here post_encoder: the tower sees every patch), model.eval() runs
    `prune_stage` (here pre_encoder_reuse: only the kept patches); None (the class default) trains with prune_stage."""
    from omnivmed.configuration_omnivmed import OmniVMedConfig
    from omnivmed.modeling_omnivmed import OmniVMedModel

    assert OmniVMedConfig().prune_stage == "pre_encoder_reuse" and OmniVMedConfig().train_prune_stage is None
    torch.manual_seed(0)
    model = OmniVMedModel(tiny_config)
    model.config.prune_stage, model.config.train_prune_stage = "pre_encoder_reuse", "post_encoder"
    t, h, w = 4, 4, 4
    pixels = torch.randn(h * w, tiny_config.vision_config.patch_dim).repeat(t, 1)  # a static clip: pruned
    grid, merge = torch.tensor([[t, h, w]]), torch.tensor([2])

    def tower_patches():
        with torch.no_grad():
            return model.get_visual_features(pixels, grid, merge)[2]

    assert tower_patches() == t * h * w  # a fresh module is in training mode: post-encoder
    model.eval()
    assert tower_patches() < t * h * w
    model.train()
    model.config.train_prune_stage = None
    assert tower_patches() < t * h * w
    model.config.train_prune_stage = "pre-encoder"
    with pytest.raises(ValueError, match="train_prune_stage must be one of .*'pre-encoder'"):
        tower_patches()
    with pytest.raises(ValueError, match="train_prune_stage must be one of"):
        OmniVMedConfig(train_prune_stage="later")


def test_answering_with_another_stage_than_trained_warns(caplog):
    """A checkpoint names the stage it was trained with; a model built to answer with another (from_pretrained's
    prune_stage=...) says so, since its volume / video answers may be worse (EVIDENCE.md); the same stage, or
    train_prune_stage None (the same by definition), is silent."""
    import logging

    from conftest import tiny_config_dict
    from omnivmed.configuration_omnivmed import OmniVMedConfig
    from omnivmed.modeling_omnivmed import OmniVMedModel

    def warnings_for(**stages):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            OmniVMedModel(OmniVMedConfig(**tiny_config_dict(**stages)))
        return [r.getMessage() for r in caplog.records if "answers with" in r.getMessage()]

    assert warnings_for(prune_stage="pre_encoder_reuse", train_prune_stage="pre_encoder_reuse") == []
    assert warnings_for(prune_stage="post_encoder", train_prune_stage=None) == []
    (message,) = warnings_for(prune_stage="pre_encoder_reuse", train_prune_stage="post_encoder")
    assert "trains with prune_stage 'post_encoder' but answers with 'pre_encoder_reuse'" in message


@pytest.mark.parametrize(
    "rule",
    [
        {},
        {"reference": "previous"},
        {"keep_first_frame": False, "min_tokens": 2, "min_tokens_pick": "first"},
        {"unit": "intensity", "threshold": 0.03, "image_mean": (0.4, 0.5, 0.6), "image_std": (0.2, 0.3, 0.25)},
        {"threshold": 0.0},
    ],
)
def test_keep_mask_chunks_carry_the_reference_across_borders(rule):
    """A clip's mask computed chunk by chunk, the reference carried over each border, is the whole clip's mask for
    every split (chunks of 1, of a size not dividing the clip, uneven ones); starting each chunk afresh is not (the
    first frame of every chunk would be kept whole), so the carry is what makes them equal."""
    from omnivmed.pruning_omnivmed import compute_keep_mask_chunk

    rng = np.random.default_rng(0)
    t, n_blocks, patch_dim = 11, 4, 3 * 2 * 2
    base = rng.normal(0, 1, (n_blocks, 4, patch_dim)).astype(np.float32)
    drift = rng.normal(0, 0.06, (t, n_blocks, 4, patch_dim)).astype(np.float32).cumsum(0)  # slow drift, some jumps
    drift[[3, 7]] += rng.normal(0, 0.5, (2, n_blocks, 4, patch_dim)).astype(np.float32)
    pixel_values = torch.from_numpy((base + drift).reshape(-1, patch_dim))  # (t * 4 blocks * 4 patches, 12)
    grid, merge = torch.tensor([[t, 4, 4]]), torch.tensor([2])
    settings = {"threshold": 0.1, **rule}
    whole = compute_keep_mask(pixel_values, grid, merge, **settings)
    if settings["threshold"] > 0:
        assert 0 < int(whole.sum()) < whole.numel()
    per_frame = 16
    for sizes in ([1] * t, [4, 4, 3], [5, 6], [2, 1, 7, 1], [t]):
        masks, carry, start = [], None, 0
        fresh = []
        for size in sizes:
            rows = pixel_values[start * per_frame : (start + size) * per_frame]
            g = torch.tensor([[size, 4, 4]])
            mask, carry = compute_keep_mask_chunk(rows, g, merge, carry, whole_item=len(sizes) == 1, **settings)
            masks.append(mask)
            fresh.append(compute_keep_mask_chunk(rows, g, merge, None, **settings)[0])
            start += size
        assert torch.equal(torch.cat(masks), whole), sizes
        if settings["threshold"] > 0 and len(sizes) == t:  # afresh, every 1-frame chunk starts a clip
            assert not torch.equal(torch.cat(fresh), whole)


def test_keep_mask_chunk_of_a_single_frame_clip_and_bad_input():
    """A clip of one frame is a 2D image for the rule (kept whole) only when the chunk is the whole clip."""
    from omnivmed.pruning_omnivmed import compute_keep_mask_chunk

    frame = torch.randn(4, 12)
    grid, merge = torch.tensor([[1, 2, 2]]), torch.tensor([2])
    rule = {"keep_first_frame": False, "threshold": 0.5}
    assert compute_keep_mask_chunk(frame, grid, merge, whole_item=True, **rule)[0].all()
    assert torch.equal(compute_keep_mask(frame, grid, merge, **rule), torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="grid_thw must be \\(1, 3\\)"):
        compute_keep_mask_chunk(torch.randn(8, 12), torch.tensor([[1, 2, 2], [1, 2, 2]]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="describes 8 patches but pixel_values has 4"):
        compute_keep_mask_chunk(frame, torch.tensor([[2, 2, 2]]), merge)


def test_reuse_stage_on_a_static_clip_gives_the_post_encoder_features_pre_encoder_does_not(tiny_config):
    """Frames 1.. are copies of frame 0: pruning keeps one block of each (min_tokens). Post-encoder, each copy's
    features are frame 0's. pre_encoder_reuse runs only the kept patches but lets them attend to frame 0's keys and
    values at the pruned positions, which are exactly what the copy would compute: the same features (to rounding).
    pre_encoder, whose kept patches see only each other, differs."""
    from omnivmed.modeling_omnivmed import OmniVMedModel

    torch.manual_seed(0)
    model = OmniVMedModel(tiny_config).eval()
    patch_dim = tiny_config.vision_config.patch_dim
    t, h, w, m = 4, 4, 4, 2
    frame = torch.randn(h * w, patch_dim)
    pixels = frame.repeat(t, 1)
    grid, merge = torch.tensor([[t, h, w]]), torch.tensor([m])
    keep = torch.zeros(t, (h // m) * (w // m), dtype=torch.bool)
    keep[0] = True
    keep[1:, 1] = True
    keep = keep.reshape(-1)
    out = {}
    with torch.no_grad():
        for stage in ("post_encoder", "pre_encoder", "pre_encoder_reuse"):
            model.config.prune_stage = stage
            out[stage], kept, _ = model.get_visual_features(pixels, grid, merge, visual_keep_mask=keep)
    assert out["pre_encoder_reuse"].shape == out["post_encoder"].shape
    assert out["post_encoder"].shape[0] == int(keep.sum())
    torch.testing.assert_close(out["pre_encoder_reuse"], out["post_encoder"], atol=1e-5, rtol=1e-5)
    reuse_error = (out["pre_encoder_reuse"] - out["post_encoder"]).abs().max()
    pre_error = (out["pre_encoder"][4:] - out["post_encoder"][4:]).abs().max()
    assert pre_error > 1e-3 and pre_error > 100 * reuse_error, (pre_error, reuse_error)


def test_reuse_stage_with_everything_kept_is_the_plain_tower_and_changing_frames_differ(tiny_config):
    from omnivmed.modeling_omnivmed import OmniVMedVisionModel

    torch.manual_seed(0)
    tower = OmniVMedVisionModel(tiny_config.vision_config).eval()
    t, h, w = 3, 4, 4
    pixels = torch.randn(t * h * w, tiny_config.vision_config.patch_dim)
    grid = torch.tensor([[t, h, w]])
    with torch.no_grad():
        plain = tower(pixels, grid).last_hidden_state
        every = tower(pixels, grid, patch_keep_mask=torch.ones(t * h * w, dtype=torch.bool), reuse=True)
        torch.testing.assert_close(every.last_hidden_state, plain, atol=1e-5, rtol=1e-5)
        # frame 1 drops half its patches: frame 0's outputs do not move, frame 1's kept ones see stale keys
        keep = torch.ones(t * h * w, dtype=torch.bool)
        keep[h * w : h * w + 8] = False
        reused = tower(pixels, grid, patch_keep_mask=keep, reuse=True).last_hidden_state
        torch.testing.assert_close(reused[: h * w], plain[: h * w], atol=1e-5, rtol=1e-5)
        assert reused.shape[0] == int(keep.sum())
