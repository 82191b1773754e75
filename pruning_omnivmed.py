"""Medical-aware token pruning: the one function that decides which visual tokens of a volume or video are kept,
and the patch layout it (and the processor and model) rely on.

Unit: one LLM visual token, i.e. one merge x merge block of patches (patches arrive in merge-block order, so a
block is `merge**2` consecutive rows of `pixel_values`). A block of slice/frame f is dropped when the mean absolute
difference of its pixels against the reference block at the same (h, w) is at most `threshold`.

Reference: `"last_kept"` (default) compares with the last kept version of that block, so a slowly drifting region
is refreshed once the drift adds up; `"previous"` compares with frame f-1, as the paper describes.
Units: `"normalized"` measures the pixels as the tower sees them (after mean/std normalisation: the successor
code's rule, where 0.1 is ~2.7 % of full intensity with CLIP mean/std); `"intensity"` undoes the normalisation and
measures on the [0, 1] scale, so a threshold means the same whatever the normalisation.
The first frame is kept whole (unless `keep_first_frame=False`, the successor code's behaviour), every frame keeps
at least `min_tokens` tokens (the most changed ones, or with `min_tokens_pick="first"` the first ones), 2D images
(t == 1) are never pruned, threshold 0 keeps all.
"""

import torch


def patch_grid_positions(t: int, gh: int, gw: int, merge: int) -> torch.Tensor:
    """(t * gh * gw, 3) int64 (frame, patch row, patch column) in merge-block order."""
    bh = torch.arange(gh // merge).view(-1, 1, 1, 1)
    bw = torch.arange(gw // merge).view(1, -1, 1, 1)
    i = torch.arange(merge).view(1, 1, -1, 1)
    j = torch.arange(merge).view(1, 1, 1, -1)
    shape = (gh // merge, gw // merge, merge, merge)
    rows = (bh * merge + i).expand(shape).reshape(-1)
    cols = (bw * merge + j).expand(shape).reshape(-1)
    frame = torch.arange(t).repeat_interleave(gh * gw)
    return torch.stack([frame, rows.repeat(t), cols.repeat(t)], dim=1)


def frame_block_distances(frames: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean |frames - reference| per block: (..., n, d) x (..., n, d) -> (..., n)."""
    return (frames - reference).abs().mean(dim=-1)


def compute_keep_mask(
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    merge_sizes: torch.Tensor,
    *,
    threshold: float = 0.1,
    reference: str = "last_kept",
    unit: str = "normalized",
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    keep_first_frame: bool = True,
    min_tokens: int = 1,
    min_tokens_pick: str = "most_changed",
    num_channels: int = 3,
) -> torch.Tensor:
    """Keep mask over the LLM visual tokens of a packed batch.

    Args:
        pixel_values: (N_patches, C*p*p) normalised patches of all items, each frame in merge-block order.
        grid_thw: (n_items, 3) frames, patch rows, patch columns of each item.
        merge_sizes: (n_items,) merge size of each item.
    Returns:
        (N_tokens,) bool, N_tokens = sum over items of t * (h / m) * (w / m).
    """
    if reference not in ("last_kept", "previous"):
        raise ValueError(f"reference must be 'last_kept' or 'previous', got {reference!r}")
    if unit not in ("normalized", "intensity"):
        raise ValueError(f"unit must be 'normalized' or 'intensity', got {unit!r}")
    if min_tokens_pick not in ("most_changed", "first"):
        raise ValueError(f"min_tokens_pick must be 'most_changed' or 'first', got {min_tokens_pick!r}")
    masks = []
    offset = 0
    for (t, h, w), m in zip(grid_thw.tolist(), merge_sizes.tolist()):
        n_patches = t * h * w
        n_blocks = (h // m) * (w // m)
        if t == 1 or threshold <= 0:
            masks.append(torch.ones(t * n_blocks, dtype=torch.bool, device=pixel_values.device))
            offset += n_patches
            continue
        blocks = pixel_values[offset : offset + n_patches].float().reshape(t, n_blocks, m * m, num_channels, -1)
        if unit == "intensity":
            mean = torch.tensor(image_mean, dtype=blocks.dtype, device=blocks.device).view(-1, 1)
            std = torch.tensor(image_std, dtype=blocks.dtype, device=blocks.device).view(-1, 1)
            blocks = blocks * std + mean
        blocks = blocks.reshape(t, n_blocks, -1)
        masks.append(
            _frame_masks(
                blocks, threshold, reference, keep_first_frame, min(min_tokens, n_blocks), min_tokens_pick
            ).reshape(-1)
        )
        offset += n_patches
    if offset != pixel_values.shape[0]:
        raise ValueError(
            f"grid_thw describes {offset} patches but pixel_values has {pixel_values.shape[0]} rows"
        )
    if not masks:
        return torch.ones(0, dtype=torch.bool, device=pixel_values.device)
    return torch.cat(masks)


def _force_min(keep: torch.Tensor, dist: torch.Tensor, min_tokens: int, pick: str) -> torch.Tensor:
    if int(keep.sum()) >= min_tokens:
        return keep
    if pick == "first":  # VideoLLaMA3's rule: the frame's first blocks
        order = torch.arange(min_tokens, device=keep.device)
    else:  # the most changed blocks; a stable sort breaks ties by position
        order = torch.sort(dist, descending=True, stable=True).indices[:min_tokens]
    keep = keep.clone()
    keep[order] = True
    return keep


def _frame_masks(blocks, threshold, reference, keep_first_frame, min_tokens, pick) -> torch.Tensor:
    # blocks: (t, n, d) -> (t, n) bool
    t, n, _ = blocks.shape
    keep = torch.zeros(t, n, dtype=torch.bool, device=blocks.device)
    if keep_first_frame:
        keep[0] = True
    else:
        # the successor code scores the first frame with a sentinel that its /255 rescale makes tiny, so it
        # falls below any useful threshold and only `min_tokens` of it survive
        first = torch.full((n,), 1.0 / 255.0, device=blocks.device)
        keep[0] = _force_min(first > threshold, first, min_tokens, pick)
    if reference == "previous":
        dist = frame_block_distances(blocks[1:], blocks[:-1])  # (t-1, n)
        for f in range(1, t):
            keep[f] = _force_min(dist[f - 1] > threshold, dist[f - 1], min_tokens, pick)
        return keep
    ref = blocks[0].clone()
    for f in range(1, t):
        dist = frame_block_distances(blocks[f], ref)
        keep[f] = _force_min(dist > threshold, dist, min_tokens, pick)
        ref[keep[f]] = blocks[f][keep[f]]
    return keep


def tokens_per_frame(keep_mask: torch.Tensor, grid_thw: torch.Tensor, merge_sizes: torch.Tensor) -> list[list[int]]:
    """Kept visual tokens per frame of each item (what the processor expands placeholders to)."""
    out = []
    offset = 0
    for (t, h, w), m in zip(grid_thw.tolist(), merge_sizes.tolist()):
        n_blocks = (h // m) * (w // m)
        item = keep_mask[offset : offset + t * n_blocks].reshape(t, n_blocks)
        out.append(item.sum(dim=1).tolist())
        offset += t * n_blocks
    return out


def pruning_report(keep_mask: torch.Tensor, grid_thw: torch.Tensor, merge_sizes: torch.Tensor) -> list[dict]:
    """Per item: tokens before/after pruning and kept tokens per slice/frame."""
    report = []
    for (t, h, w), m, per_frame in zip(
        grid_thw.tolist(), merge_sizes.tolist(), tokens_per_frame(keep_mask, grid_thw, merge_sizes)
    ):
        before = t * (h // m) * (w // m)
        after = sum(per_frame)
        report.append(
            {"tokens_before": before, "tokens_after": after, "kept_fraction": after / before, "per_frame": per_frame}
        )
    return report


def patch_keep_mask(keep_mask: torch.Tensor, grid_thw: torch.Tensor, merge_sizes: torch.Tensor) -> torch.Tensor:
    """Token-level mask -> patch-level mask (each token covers merge**2 consecutive patches)."""
    per_token = torch.cat(
        [torch.full((t * (h // m) * (w // m),), m * m) for (t, h, w), m in zip(grid_thw.tolist(), merge_sizes.tolist())]
    ).to(keep_mask.device)
    return torch.repeat_interleave(keep_mask, per_token)
