import copy

import pytest
import torch
from conftest import tiny_config_dict
from transformers import Qwen2Config, Qwen2ForCausalLM

from omnivmed.configuration_omnivmed import OmniVMedConfig
from omnivmed.modeling_omnivmed import (
    OmniVMedForConditionalGeneration,
    OmniVMedModel,
    OmniVMedVisionModel,
    patch_positions_from_grid,
)


IMG, START, END = 5, 6, 7


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return OmniVMedForConditionalGeneration(OmniVMedConfig(**tiny_config_dict(**overrides))).eval()


def visual_inputs(grids, seed=0, patch_dim=48):
    """Random patches for items with the given (t, h, w) grids."""
    g = torch.tensor(grids)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(int(g.prod(-1).sum()), patch_dim, generator=gen), g


def prompt_ids(n_visual, prefix=(1, 2), suffix=(3, 4)):
    return list(prefix) + [START] + [IMG] * n_visual + [END] + list(suffix)


def n_tokens(grids, merge=2):
    return sum(t * (h // merge) * (w // merge) for t, h, w in grids)


def tower(model):
    return model.model.vision_tower


# --- the vision tower -------------------------------------------------------------------------------------------


def test_tower_has_no_absolute_position_parameters():
    model = make_model()
    names = [n for n, _ in tower(model).named_parameters()]
    assert not [n for n in names if "position" in n or "pos_embed" in n]
    assert not [n for n, _ in tower(model).named_buffers()]


@pytest.mark.parametrize("scope", ["frame", "clip"])
def test_rope_translation_invariance(scope):
    """Shifting every patch's (h, w) by a constant leaves the tower unchanged: only relative positions matter."""
    model = make_model(vision_config={"attention_scope": scope})
    pv, grid = visual_inputs([[1, 6, 4], [3, 4, 4]])
    pos = patch_positions_from_grid(grid, torch.tensor([2, 2]))
    ref = tower(model)(pv, grid, pos).last_hidden_state
    shifted = pos.clone()
    shifted[:, 1:] += torch.tensor([7, 3])
    # shifted positions leave the item's grid, which the public forward refuses as a likely bug; the layers below
    # it take any integers, so check the maths there
    out = _tower_raw(tower(model), pv, grid, shifted)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_tower_raw(tower(model), pv, grid, pos), ref)
    # and positions do matter: permuting the first image's positions changes its output
    perm = pos.clone()
    perm[:24] = pos[:24][torch.randperm(24, generator=torch.Generator().manual_seed(1))]
    assert not torch.allclose(tower(model)(pv, grid, perm).last_hidden_state[:24], ref[:24], atol=1e-4)


def _tower_raw(vision, pv, grid, positions):
    from omnivmed.modeling_omnivmed import PackedSegments, segment_lengths

    segments = PackedSegments.from_lengths(segment_lengths(grid, vision.config.attention_scope))
    hidden = vision.patch_embedding(pv)
    emb = vision.rotary_emb(positions)
    for layer in vision.layers:
        hidden = layer(hidden, emb, segments)
    return vision.post_layernorm(hidden)


def test_clip_scope_sees_time_axis_frame_scope_does_not():
    pv, grid = visual_inputs([[3, 4, 4]])
    pos = patch_positions_from_grid(grid, torch.tensor([2]))
    swapped_t = pos.clone()
    swapped_t[:, 0] = 2 - swapped_t[:, 0]  # reverse the slice order labels, pixels unchanged
    frame = make_model(vision_config={"attention_scope": "frame"})
    torch.testing.assert_close(
        tower(frame)(pv, grid, swapped_t).last_hidden_state, tower(frame)(pv, grid, pos).last_hidden_state
    )
    clip = make_model(vision_config={"attention_scope": "clip"})
    assert not torch.allclose(
        tower(clip)(pv, grid, swapped_t).last_hidden_state, tower(clip)(pv, grid, pos).last_hidden_state, atol=1e-4
    )


@pytest.mark.parametrize("hw", [(2, 2), (4, 14), (30, 6), (16, 16)])
def test_any_image_size_runs(hw):
    model = make_model()
    pv, grid = visual_inputs([[1, *hw]])
    out = tower(model)(pv, grid, merge_sizes=torch.tensor([2])).last_hidden_state
    assert out.shape == (hw[0] * hw[1], 48) and torch.isfinite(out).all()


def test_tower_is_rope_over_the_patches_and_nothing_else():
    """Positions reach the tower only through RoPE: the forward equals patch embedding + layers with the rotary
    embedding of the positions + final norm (absolute_positions adds nothing)."""
    model = make_model(seed=3)
    pv, grid = visual_inputs([[1, 4, 6], [3, 4, 4]])
    pos = patch_positions_from_grid(grid, torch.tensor([2, 2]))
    assert tower(model).absolute_positions(grid, pos) is None
    out = tower(model)(pv, grid, pos).last_hidden_state
    torch.testing.assert_close(out, _tower_raw(tower(model), pv, grid, pos), atol=0, rtol=0)


def test_packed_batch_equals_each_alone():
    model = make_model()
    grids = [[1, 4, 6], [1, 8, 2], [2, 4, 4], [1, 2, 2]]
    pv, grid = visual_inputs(grids)
    merge = torch.full((len(grids),), 2)
    packed = tower(model)(pv, grid, merge_sizes=merge).last_hidden_state
    offset = 0
    for g in grids:
        n = g[0] * g[1] * g[2]
        alone = tower(model)(pv[offset : offset + n], torch.tensor([g]), merge_sizes=torch.tensor([2]))
        torch.testing.assert_close(packed[offset : offset + n], alone.last_hidden_state, atol=1e-5, rtol=1e-5)
        offset += n


@pytest.mark.parametrize("scope,impl", [("frame", "eager"), ("clip", "eager"), ("frame", "sdpa"), ("clip", "sdpa")])
def test_chunked_tower_equals_whole(scope, impl):
    """Encoding in runs of whole segments (a long video's memory bound) gives the whole sequence's features, for a
    mixed batch whose segments come in several lengths, interleaved, with and without a patch keep mask."""
    grids = [[1, 4, 6], [5, 4, 4], [1, 2, 2], [3, 4, 4], [1, 8, 2]]
    pv, grid = visual_inputs(grids)
    merge = torch.full((len(grids),), 2)
    keep = torch.rand(pv.shape[0], generator=torch.Generator().manual_seed(2)) > 0.3
    results = {}
    for max_patches in (0, 16, 40, 1):  # 1: every segment alone; 40 never divides the segments evenly
        model = make_model(vision_config={"attention_scope": scope, "max_patches_per_chunk": max_patches})
        model.set_attn_implementation(impl)
        results[max_patches] = [
            tower(model)(pv, grid, merge_sizes=merge, patch_keep_mask=mask).last_hidden_state for mask in (None, keep)
        ]
    for max_patches in (16, 40, 1):
        for whole, chunked in zip(results[0], results[max_patches]):
            torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_chunked_video_through_processor_equals_whole():
    """A short video through the processor and the model's visual features (tower + pruning): encoding it a few
    frames at a time keeps the same keep mask and gives the same features as encoding it whole."""
    import numpy as np

    from build_omnivmed import build_tiny_tokenizer, tiny_model
    from omnivmed.media_omnivmed import Media
    from omnivmed.processing_omnivmed import OmniVMedImageProcessor

    rng = np.random.default_rng(0)
    frames = np.repeat(rng.random((1, 56, 56, 3), dtype=np.float32), 12, axis=0)
    for f in range(12):  # a square moving across a static scene: pruning keeps a few blocks per frame
        frames[f, 10:26, 3 * f : 3 * f + 16] = 0.9
    inputs = OmniVMedImageProcessor(video_max_pixels=56 * 56)(
        [Media(frames=frames, kind="video", source="moving-square")], return_tensors="pt"
    )
    keep = inputs["visual_keep_mask"]
    assert 0 < int(keep.sum()) < keep.numel()
    model = tiny_model(build_tiny_tokenizer(), seed=0)
    args = [inputs[k] for k in ("pixel_values", "grid_thw", "merge_sizes", "patch_positions")]
    out = {}
    with torch.inference_mode():
        for max_patches in (0, 3 * 16):  # whole, 3 frames of 4x4 patches per run
            model.config.vision_config.max_patches_per_chunk = max_patches
            features, model_keep, _ = model.model.get_visual_features(*args)  # the model recomputes the mask
            out[max_patches] = features, model_keep
    assert torch.equal(out[48][1], out[0][1]) and torch.equal(out[0][1], keep)
    torch.testing.assert_close(out[48][0], out[0][0], atol=1e-5, rtol=1e-5)


def test_chunk_segments_cuts_at_segment_boundaries():
    from omnivmed.modeling_omnivmed import chunk_segments

    lengths = torch.tensor([4, 4, 0, 10, 3, 3, 3])
    runs = chunk_segments(lengths, 8)
    assert [(a, b, c.tolist()) for a, b, c in runs] == [(0, 8, [4, 4]), (8, 18, [10]), (18, 24, [3, 3]), (24, 27, [3])]
    assert [(a, b) for a, b, _ in chunk_segments(lengths, 0)] == [(0, 27)]
    with pytest.raises(ValueError, match="max_patches_per_chunk"):
        OmniVMedConfig(**tiny_config_dict(vision_config={"max_patches_per_chunk": -1}))


@pytest.mark.parametrize("scope", ["frame", "clip"])
def test_tower_on_no_patches_returns_no_features(scope):
    """A batch whose media were all filtered out reaches the tower with zero patches: an empty (0, D) output, not a
    reshape error."""
    model = make_model(vision_config={"attention_scope": scope})
    out = tower(model)(torch.zeros(0, 48), torch.zeros(0, 3, dtype=torch.long)).last_hidden_state
    assert out.shape == (0, model.config.vision_config.hidden_size)
    if scope == "frame":  # the pre_encoder_reuse tower too
        out = tower(model)(torch.zeros(0, 48), torch.zeros(0, 3, dtype=torch.long), reuse=True).last_hidden_state
        assert out.shape == (0, model.config.vision_config.hidden_size)


def test_eager_and_sdpa_agree():
    model = make_model()
    pv, grid = visual_inputs([[1, 4, 6], [3, 4, 4]])
    ids = torch.tensor([prompt_ids(n_tokens([[1, 4, 6], [3, 4, 4]]))])
    outs = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        outs[impl] = model(input_ids=ids, pixel_values=pv, grid_thw=grid, prune_threshold=0.0).logits
    torch.testing.assert_close(outs["eager"], outs["sdpa"], atol=1e-5, rtol=1e-4)


def test_reuse_cache_carries_a_clip_across_tower_calls_and_refuses_other_clips():
    """The tower streamed a few frames at a time with one ReuseCache gives the one-shot reuse features; a cache is one
    clip's: a packed batch of two items, or frames of another size, are refused."""
    from omnivmed.modeling_omnivmed import ReuseCache

    model = make_model(seed=1)
    t, h, w = 7, 4, 4
    pv, grid = visual_inputs([[t, h, w]])
    keep = torch.rand(t * h * w, generator=torch.Generator().manual_seed(3)) > 0.6
    keep[: h * w] = True
    with torch.no_grad():
        whole = tower(model)(pv, grid, patch_keep_mask=keep, reuse=True).last_hidden_state
        cache, parts, start = ReuseCache(), [], 0
        for frames in (2, 1, 4):
            rows = slice(start * h * w, (start + frames) * h * w)
            parts.append(tower(model)(pv[rows], torch.tensor([[frames, h, w]]), patch_keep_mask=keep[rows],
                                      frame_offsets=torch.tensor([start]), reuse=True,
                                      reuse_cache=cache).last_hidden_state)  # fmt: skip
            start += frames
        torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-5)
        assert len(cache.keys) == model.config.vision_config.num_hidden_layers and cache.seen.all()
        with pytest.raises(ValueError, match="one clip: grid_thw must be \\(1, 3\\)"):
            two, two_grid = visual_inputs([[1, h, w], [1, h, w]])
            tower(model)(two, two_grid, reuse=True, reuse_cache=ReuseCache())
        with pytest.raises(ValueError, match="holds frames of 16 patches, this chunk's have 8"):
            tower(model)(pv[:8], torch.tensor([[1, 2, 4]]), reuse=True, reuse_cache=cache)
        with pytest.raises(ValueError, match="reuse_cache is for the pre_encoder_reuse tower"):
            tower(model)(pv, grid, reuse_cache=ReuseCache())


def _varlen_reference(module, query, key, value, attention_mask, scaling, dropout=0.0, cu_seq_lens_q=None,
                      cu_seq_lens_k=None, max_length_q=None, max_length_k=None, is_causal=False, **kwargs):
    """What flash_attn_varlen_func computes, in plain torch: query (1, H, Nq, D) and key / value (1, H, Nk, D) cut
    into segments by their own cu_seqlens, each query segment attending to its key segment only."""
    assert attention_mask is None and not is_causal and query.shape[0] == 1
    cu_q, cu_k = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
    assert len(cu_q) == len(cu_k) and cu_q[-1] == query.shape[2] and cu_k[-1] == key.shape[2]
    assert max_length_q == max(b - a for a, b in zip(cu_q, cu_q[1:]))
    assert max_length_k == max(b - a for a, b in zip(cu_k, cu_k[1:]))
    outs = [torch.nn.functional.scaled_dot_product_attention(query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1],
                                                             scale=scaling)
            for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:])]  # fmt: skip
    return torch.cat(outs, dim=2).transpose(1, 2), None


@pytest.mark.parametrize("reuse", [False, True])
def test_flash_varlen_packing_equals_sdpa(reuse):
    """The flash-attention branch (packed rows + cu_seqlens, no per-segment batching) run on the CPU through a
    reference varlen function registered in transformers' AttentionInterface under a "flash" name: a mixed batch
    with a keep mask gives the sdpa features, pre-encoder (kept patches only) and pre_encoder_reuse (a frame's
    queries are its kept patches, its keys every position, so cu_seqlens_q and cu_seqlens_k differ)."""
    from transformers import AttentionInterface

    calls = []
    AttentionInterface.register("flash_varlen_reference", lambda *a, **k: calls.append(1) or _varlen_reference(*a, **k))
    grids = [[1, 4, 6], [5, 4, 4], [1, 2, 2], [3, 4, 4]]
    pv, grid = visual_inputs(grids)
    keep = torch.rand(pv.shape[0], generator=torch.Generator().manual_seed(2)) > 0.5
    keep[24:40] = True  # the volume's first frame whole, as pruning keeps it
    keep[40 + 16 : 40 + 32] = False  # and a frame with no query at all
    out = {}
    model = make_model()
    for impl in ("sdpa", "flash_varlen_reference"):
        tower(model).config._attn_implementation = impl
        with torch.no_grad():
            out[impl] = tower(model)(pv, grid, merge_sizes=torch.full((4,), 2), patch_keep_mask=keep,
                                     reuse=reuse).last_hidden_state  # fmt: skip
    assert out["sdpa"].shape[0] == int(keep.sum())
    assert len(calls) == model.config.vision_config.num_hidden_layers  # one packed call per layer
    torch.testing.assert_close(out["flash_varlen_reference"], out["sdpa"], atol=1e-5, rtol=1e-5)


def test_bfloat16_forward_runs_on_cpu():
    model = make_model().to(torch.bfloat16)
    pv, grid = visual_inputs([[2, 4, 4]])
    ids = torch.tensor([prompt_ids(n_tokens([[2, 4, 4]]))])
    out = model(input_ids=ids, pixel_values=pv.bfloat16(), grid_thw=grid, prune_threshold=0.0)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_gradient_checkpointing_gives_same_gradients():
    pv, grid = visual_inputs([[1, 4, 4], [2, 4, 4]])
    ids = torch.tensor([prompt_ids(n_tokens([[1, 4, 4], [2, 4, 4]]))])
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.model.vision_tower.layers[0].gradient_checkpointing
        out = model(input_ids=ids, pixel_values=pv, grid_thw=grid, labels=ids, prune_threshold=0.0)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("vision_tower" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


# --- the language model side ------------------------------------------------------------------------------------


def test_text_only_equals_plain_qwen2():
    model = make_model()
    qwen = Qwen2ForCausalLM(Qwen2Config(**tiny_config_dict()["text_config"])).eval()
    state = {k.replace("model.language_model.", "model."): v for k, v in model.state_dict().items()}
    missing, unexpected = qwen.load_state_dict(
        {k: v for k, v in state.items() if k.startswith(("model.", "lm_head"))}, strict=False
    )
    assert not missing
    ids = torch.tensor([[1, 2, 3, 9, 10, 11], [4, 4, 12, 13, 14, 15]])
    torch.testing.assert_close(model(input_ids=ids).logits, qwen(input_ids=ids).logits, atol=1e-6, rtol=1e-5)


def test_loss_only_on_labelled_tokens():
    model = make_model()
    pv, grid = visual_inputs([[1, 4, 4]])
    ids = torch.tensor([prompt_ids(n_tokens([[1, 4, 4]]), suffix=(30, 31, 32))])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    out = model(input_ids=ids, pixel_values=pv, grid_thw=grid, labels=labels)
    logits = out.logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits[-3:], ids[0, -3:])
    torch.testing.assert_close(out.loss, expected)


def test_visual_features_land_in_placeholders():
    model = make_model()
    pv, grid = visual_inputs([[1, 4, 4]])
    ids = torch.tensor([prompt_ids(n_tokens([[1, 4, 4]]))])
    a = model(input_ids=ids, pixel_values=pv, grid_thw=grid).logits
    b = model(input_ids=ids, pixel_values=pv + 1.0, grid_thw=grid).logits
    # text before the image cannot see it (causal); everything from the first visual token on does
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def _left_pad(seqs, pad=0):
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def test_left_padded_batch_generation_equals_each_alone():
    model = make_model(text_config={"pad_token_id": 0})
    grids = [[[1, 4, 4]], [[2, 4, 6]]]
    seqs = [prompt_ids(n_tokens(grids[0])), [9, 10, 11] + prompt_ids(n_tokens(grids[1]), suffix=(3, 4, 12, 13))]
    pvs = [visual_inputs(g, seed=i) for i, g in enumerate(grids)]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, prune_threshold=0.0)
    alone = [
        model.generate(input_ids=torch.tensor([s]), pixel_values=pv, grid_thw=g, **kwargs)[0, len(s) :]
        for s, (pv, g) in zip(seqs, pvs)
    ]
    ids, mask = _left_pad(seqs)
    batch = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=torch.cat([pv for pv, _ in pvs]),
        grid_thw=torch.cat([g for _, g in pvs]),
        **kwargs,
    )[:, ids.shape[1] :]
    for i in range(2):
        assert batch[i].tolist() == alone[i].tolist()
    # the cache is used: the same tokens as a generation that recomputes everything each step
    no_cache = model.generate(
        input_ids=torch.tensor([seqs[0]]), pixel_values=pvs[0][0], grid_thw=pvs[0][1], use_cache=False, **kwargs
    )[0, len(seqs[0]) :]
    assert no_cache.tolist() == alone[0].tolist()


# --- errors ------------------------------------------------------------------------------------------------------


def test_placeholder_count_mismatch_is_a_clear_error():
    model = make_model()
    pv, grid = visual_inputs([[1, 4, 4]])
    ids = torch.tensor([prompt_ids(n_tokens([[1, 4, 4]]) - 1)])
    with pytest.raises(ValueError, match=r"3 image placeholder tokens .* 4 visual tokens"):
        model(input_ids=ids, pixel_values=pv, grid_thw=grid)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)


def test_wrong_pixel_shape_is_a_clear_error():
    model = make_model()
    pv, grid = visual_inputs([[1, 4, 4]])
    ids = torch.tensor([prompt_ids(4)])
    with pytest.raises(ValueError, match=r"flattened \(C, p, p\) patches"):
        model(input_ids=ids, pixel_values=pv[:, :40], grid_thw=grid)
    with pytest.raises(ValueError, match="describes 16 patches but pixel_values has 15"):
        model(input_ids=ids, pixel_values=pv[:15], grid_thw=grid)
    with pytest.raises(ValueError, match="divisible by its merge size"):
        model(input_ids=ids, pixel_values=torch.randn(15, 48), grid_thw=torch.tensor([[1, 3, 5]]))


def test_positions_out_of_range_are_a_clear_error():
    model = make_model()
    pv, grid = visual_inputs([[2, 4, 4]])
    pos = patch_positions_from_grid(grid, torch.tensor([2]))
    pos[5, 1] = 4
    with pytest.raises(ValueError, match=r"patch_positions out of range: patch 5"):
        tower(model)(pv, grid, pos)


def test_keep_mask_of_wrong_length_is_a_clear_error():
    model = make_model()
    pv, grid = visual_inputs([[2, 4, 4]])
    ids = torch.tensor([prompt_ids(8)])
    with pytest.raises(ValueError, match="visual_keep_mask has 7 entries"):
        model(input_ids=ids, pixel_values=pv, grid_thw=grid, visual_keep_mask=torch.ones(7, dtype=torch.bool))


# --- projector / merge --------------------------------------------------------------------------------------------


def test_average_merge_with_per_medium_merge_sizes():
    """Hulu-Med style: 2D images unmerged (1), video merged 2x2 by averaging, one projector."""
    model = make_model(merge_kind="average", image_merge_size=1, video_merge_size=2)
    assert model.model.projector.linear_1.in_features == 48
    grids = [[1, 4, 4], [2, 4, 4]]
    pv, grid = visual_inputs(grids)
    n = 16 + 2 * 4
    ids = torch.tensor([prompt_ids(n)])
    out = model(input_ids=ids, pixel_values=pv, grid_thw=grid, prune_threshold=0.0)
    assert out.visual_keep_mask.numel() == n
    # the video's merged token is the projector applied to the mean of its 4 patch features
    feats = tower(model)(pv, grid, merge_sizes=torch.tensor([1, 2])).last_hidden_state
    merged, _, _ = model.model.get_visual_features(pv, grid, torch.tensor([1, 2]), prune_threshold=0.0)
    proj = model.model.projector
    expected = proj.linear_2(proj.act(proj.linear_1(feats[16:20].mean(0))))
    torch.testing.assert_close(merged[16], expected, atol=1e-5, rtol=1e-5)


def test_concat_merge_needs_equal_merge_sizes():
    with pytest.raises(ValueError, match="must be equal"):
        OmniVMedConfig(**tiny_config_dict(image_merge_size=1, video_merge_size=2))


def test_base_model_shares_weights_layout_with_lm():
    model = make_model()
    base = OmniVMedModel(copy.deepcopy(model.config))
    assert set(base.state_dict()) == {k[len("model.") :] for k in model.state_dict() if k.startswith("model.")}


def test_sequence_past_max_position_embeddings_is_refused():
    # direct model call and generation (the cache counts): positions the LLM was never given are an error
    model = make_model()
    model.config.text_config.max_position_embeddings = 16
    ids = torch.tensor([[1, 2, 3, 4] * 4])
    assert model(input_ids=ids).logits.shape[1] == 16
    with pytest.raises(ValueError, match="17 tokens .* max_position_embeddings=16"):
        model(input_ids=torch.cat([ids, ids[:, :1]], 1))
    prompt = ids[:, :12]
    out = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)  # last step sees 16 positions
    assert out.shape[1] == 17
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)


# --- devices: tower and LLM on different devices (device_map) -------------------------------------------------------


class DeviceMixRecorder(torch.overrides.TorchFunctionMode):
    """Records every torch op whose tensor arguments sit on more than one device (0-d CPU tensors are scalars and
    may go anywhere). Some ops accept such a mix on the meta device without complaint, so the check is this record,
    not an exception."""

    def __init__(self):
        super().__init__()
        self.mixed, self.calls = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        name = getattr(func, "__name__", str(func))
        if len(devices) > 1:
            self.mixed.append((name, sorted(str(d) for d in devices)))
        self.calls.append((name, {str(d) for d in devices}))
        return func(*args, **kwargs)


def _dispatched(device_map, **overrides):
    """The tiny model dispatched by accelerate as from_pretrained(device_map=...) does; "meta" stands in for a second
    device on this CPU-only machine (its ops run on shapes only, which is all a placement check needs)."""
    from accelerate import dispatch_model

    model = dispatch_model(make_model(**overrides), device_map=device_map, main_device="cpu")
    model._hf_hook.io_same_device = False  # the logits stay on the LLM's device (no data to copy back from meta)
    return model


@pytest.mark.parametrize("stage", ["post_encoder", "pre_encoder", "pre_encoder_reuse"])
@pytest.mark.parametrize("device_map", [
    # tower and projector on one device, the LLM on another
    {"model.vision_tower": "cpu", "model.projector": "cpu", "model.language_model": "meta", "lm_head": "meta"},
    # the tower split between two devices (its segments must follow its layers), projector and LLM on the second
    {"model.vision_tower.patch_embedding": "cpu", "model.vision_tower.layers.0": "cpu",
     "model.vision_tower.layers.1": "meta", "model.vision_tower.post_layernorm": "meta", "model.projector": "meta",
     "model.language_model": "meta", "lm_head": "meta"},
])  # fmt: skip
def test_device_map_over_two_devices_never_mixes_devices(device_map, stage):
    """Every op of a forward (a 2D image and a pruned volume, packed) has all its tensors on one device, the visual
    features reach the LLM's device before the scatter, and the logits come out there; the same through the
    pre-encoded path generate uses. Inputs come from the processor's side, on the CPU."""
    model = _dispatched(device_map, prune_stage=stage)
    grids = [[1, 4, 6], [4, 4, 4]]
    pv, grid = visual_inputs(grids)
    pv[24 + 16 : 24 + 32] = pv[24:40]  # the volume's second slice repeats its first: pruned
    keep = model.model.visual_keep_mask(pv, grid, torch.tensor([2, 2]))
    assert int(keep.sum()) < keep.numel()
    runs = [6] + [int(k.sum()) for k in keep[6:].view(4, 4)]
    ids = torch.tensor([[1, 2, START] + [IMG] * runs[0] + [END, START] + [t for n in runs[1:] for t in [8] + [IMG] * n]
                        + [END, 3]])  # fmt: skip
    recorder = DeviceMixRecorder()
    with torch.no_grad(), recorder:
        out = model(input_ids=ids, pixel_values=pv, grid_thw=grid, visual_keep_mask=keep)
        visual = model.get_image_features(pv, grid, visual_keep_mask=keep)
        # the base model (no root hook, which would copy the meta features back to the main device)
        pre_encoded = model.model(input_ids=ids, mm_encoder_outputs={"image": visual})
    assert recorder.mixed == []
    llm_device = str(model.lm_head.weight.device)
    assert out.logits.device.type == pre_encoded.last_hidden_state.device.type == "meta"
    scatters = [devices for name, devices in recorder.calls if name == "masked_scatter"]
    assert scatters == [{llm_device}, {llm_device}]
    # the tower's attention ran on each of its layers' devices
    assert all(f.device == model.model.projector.linear_1.weight.device for f in visual.pooler_output)


def test_tower_on_another_device_than_its_inputs():
    """Without accelerate's hooks (a model moved by hand, inputs left on the CPU), the tower takes its inputs to
    its own device and every index tensor with them."""
    model = make_model()
    model.model.vision_tower.to("meta")
    model.model.projector.to("meta")
    model.model.language_model.to("meta")
    model.lm_head.to("meta")
    pv, grid = visual_inputs([[2, 4, 4]])
    recorder = DeviceMixRecorder()
    with torch.no_grad(), recorder:
        out = model(input_ids=torch.tensor([prompt_ids(8)]), pixel_values=pv, grid_thw=grid, prune_threshold=0.0)
    assert recorder.mixed == [] and out.logits.device.type == "meta"


def test_lora_target_modules_adapt_the_language_model_only():
    """The usual target_modules list also matches the tower's SigLIP-named projections; the model's regex does not."""
    from peft import LoraConfig, get_peft_model

    def adapted(target_modules):
        peft_model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=target_modules))
        return {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}

    usual = adapted(["q_proj", "v_proj"])
    assert any("vision_tower" in name for name in usual)  # why the regex exists
    ours = adapted(OmniVMedForConditionalGeneration.lora_target_modules())
    layers = tiny_config_dict()["text_config"]["num_hidden_layers"]
    assert ours == {n for n in usual if "language_model" in n} and len(ours) == 2 * layers


# --------------------------------------------------------------------------------------------------------- streaming
def _streaming_setup(square_clip, stage, reference):
    from build_omnivmed import TINY_IMAGE_PROCESSOR, build_tiny_tokenizer, tiny_model
    from omnivmed.processing_omnivmed import OmniVMedImageProcessor, OmniVMedProcessor

    tokenizer = build_tiny_tokenizer()
    model = tiny_model(tokenizer, seed=0)
    model.config.prune_stage, model.config.prune_reference = stage, reference
    settings = dict(TINY_IMAGE_PROCESSOR, video_max_pixels=112 * 112, max_frames=100, prune_reference=reference)
    processor = OmniVMedProcessor(OmniVMedImageProcessor(**settings), tokenizer)
    conversation = [{"role": "user", "content": [{"type": "video", "video": str(square_clip)},
                                                 {"type": "text", "text": "What moves?"}]}]  # fmt: skip
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return model, processor, prompt


@pytest.mark.parametrize("stage", ["post_encoder", "pre_encoder", "pre_encoder_reuse"])
@pytest.mark.parametrize("reference", ["last_kept", "previous"])
def test_streamed_video_answers_as_the_one_shot_inputs(square_clip, stage, reference):
    """A PyAV-written clip streamed in chunks (of 1 frame; of 5, not dividing its 13) through the processor and
    `encode_video_chunks` gives the one-shot call's keep mask, tower work and features (to float rounding: the tower
    multiplies other row counts), a prompt expanded to the same ids, and the same generated answer through
    `generate(mm_encoder_outputs=...)` as `generate(**one_shot_inputs)`. pre_encoder_reuse carries its keys / values
    across the chunk borders (a ReuseCache), so a chunk's pruned positions read the earlier chunks' rows."""
    model, processor, prompt = _streaming_setup(square_clip, stage, reference)
    one = processor(text=prompt, videos=[str(square_clip)], return_tensors="pt")
    keep = one["visual_keep_mask"]
    assert 0 < int(keep.sum()) < keep.numel() // 2
    with torch.inference_mode():
        expected = model.get_image_features(
            one["pixel_values"], one["grid_thw"], merge_sizes=one["merge_sizes"],
            patch_positions=one["patch_positions"], visual_keep_mask=keep,
        )  # fmt: skip
        answer = model.generate(**one, max_new_tokens=6, do_sample=False)
        for chunk_frames in (1, 5):
            chunks = processor.iter_video_chunks(str(square_clip), chunk_frames=chunk_frames, return_tensors="pt")
            visual = model.encode_video_chunks(chunks)
            assert torch.equal(visual.visual_keep_mask, keep)
            assert visual.grid_thw.tolist() == one["grid_thw"].tolist() == [[13, 8, 8]]
            assert visual.merge_sizes.tolist() == one["merge_sizes"].tolist()
            assert visual.num_tower_tokens == expected.num_tower_tokens
            assert (visual.num_tower_tokens < 13 * 64) == (stage != "post_encoder")
            torch.testing.assert_close(visual.pooler_output[0], expected.pooler_output[0], atol=1e-5, rtol=1e-5)
            inputs = processor.prompt_inputs(prompt, visual, return_tensors="pt")
            assert torch.equal(inputs["input_ids"], one["input_ids"])
            streamed = model.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                mm_encoder_outputs={"image": visual}, max_new_tokens=6, do_sample=False,
            )  # fmt: skip
            assert torch.equal(streamed, answer)


def test_streamed_chunks_without_a_mask_are_pruned_by_the_model(square_clip):
    """Chunks without a keep mask: the model applies its config's rule, carrying the reference across chunks, so the
    mask is the processor's (same settings) and not each chunk's own."""
    model, processor, _ = _streaming_setup(square_clip, "pre_encoder", "last_kept")
    chunks = list(processor.iter_video_chunks(str(square_clip), chunk_frames=3, return_tensors="pt"))
    bare = [{k: c[k] for k in ("pixel_values", "grid_thw", "merge_sizes")} for c in chunks]
    with torch.inference_mode():
        with_mask = model.encode_video_chunks(chunks)
        recomputed = model.encode_video_chunks(bare)
        other = model.encode_video_chunks(chunks, prune_threshold=0)
    assert torch.equal(recomputed.visual_keep_mask, with_mask.visual_keep_mask)
    torch.testing.assert_close(recomputed.pooler_output[0], with_mask.pooler_output[0], atol=1e-5, rtol=1e-5)
    assert other.visual_keep_mask.all() and other.pooler_output[0].shape[0] == 13 * 16


def test_streaming_refuses_clip_attention_and_mismatched_chunks(square_clip):
    model, processor, _ = _streaming_setup(square_clip, "post_encoder", "last_kept")
    chunks = list(processor.iter_video_chunks(str(square_clip), chunk_frames=5, return_tensors="pt"))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="out of range.*frames from 0"):  # chunks out of order: wrong frame index
            model.encode_video_chunks([chunks[1], chunks[0]])
        other = processor.iter_video_chunks(str(square_clip), 5, return_tensors="pt", video_max_pixels=56 * 56)
        with pytest.raises(ValueError, match="chunk 1: .*differ from the first chunk's"):
            model.encode_video_chunks([chunks[0], list(other)[1]])
        with pytest.raises(ValueError, match="got no chunks"):
            model.encode_video_chunks([])
        model.config.vision_config.attention_scope = "clip"
        with pytest.raises(ValueError, match="attention_scope='frame'"):
            model.encode_video_chunks(chunks)
