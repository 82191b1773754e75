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
A long clip may be pruned a chunk of frames at a time (`compute_keep_mask_chunk`), the reference carried across chunk
borders: the chunks' masks are exactly the whole clip's.
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
    rule = _checked_rule(threshold, reference, unit, image_mean, image_std, keep_first_frame, min_tokens,
                         min_tokens_pick, num_channels)  # fmt: skip
    masks = []
    offset = 0
    for (t, h, w), m in zip(grid_thw.tolist(), merge_sizes.tolist()):
        n_patches = t * h * w
        mask, _ = _item_mask(pixel_values[offset : offset + n_patches], t, h, w, m, None, t == 1, rule)
        masks.append(mask)
        offset += n_patches
    if offset != pixel_values.shape[0]:
        raise ValueError(
            f"grid_thw describes {offset} patches but pixel_values has {pixel_values.shape[0]} rows"
        )
    if not masks:
        return torch.ones(0, dtype=torch.bool, device=pixel_values.device)
    return torch.cat(masks)


def compute_keep_mask_chunk(
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    merge_sizes: torch.Tensor,
    carry: torch.Tensor | None = None,
    *,
    whole_item: bool = False,
    threshold: float = 0.1,
    reference: str = "last_kept",
    unit: str = "normalized",
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    keep_first_frame: bool = True,
    min_tokens: int = 1,
    min_tokens_pick: str = "most_changed",
    num_channels: int = 3,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The keep mask of one chunk of consecutive frames of a volume or video, and what the next chunk continues from.

    The rule of `compute_keep_mask`, with the reference carried across chunk borders, so the chunks of an item give
    exactly the item's mask: `carry` None means the chunk starts the item (its first frame is the item's first frame),
    otherwise it is what the previous chunk returned (the last kept version of every block, or the previous frame's
    blocks). `whole_item`: the chunk is the whole item (then a single frame is a 2D image's: never pruned).

    Args:
        pixel_values: (t * h * w, C*p*p) the chunk's patches; grid_thw: (1, 3) its (t, h, w); merge_sizes: (1,).
    Returns:
        (keep mask (t * h/m * w/m,) bool, carry for the next chunk: (h/m * w/m, C*p*p) float, or None when the rule
        needs none (threshold 0, or the whole item is one frame)).
    """
    rule = _checked_rule(threshold, reference, unit, image_mean, image_std, keep_first_frame, min_tokens,
                         min_tokens_pick, num_channels)  # fmt: skip
    if grid_thw.shape[0] != 1 or merge_sizes.numel() != 1:
        raise ValueError(f"a chunk is one item's frames: grid_thw must be (1, 3), got {list(grid_thw.shape)}")
    (t, h, w), m = grid_thw[0].tolist(), int(merge_sizes.reshape(-1)[0])
    if t * h * w != pixel_values.shape[0]:
        raise ValueError(f"grid_thw describes {t * h * w} patches but pixel_values has {pixel_values.shape[0]} rows")
    return _item_mask(pixel_values, t, h, w, m, carry, whole_item and carry is None and t == 1, rule)


def _checked_rule(threshold, reference, unit, image_mean, image_std, keep_first_frame, min_tokens, min_tokens_pick,
                  num_channels) -> dict:  # fmt: skip
    if reference not in ("last_kept", "previous"):
        raise ValueError(f"reference must be 'last_kept' or 'previous', got {reference!r}")
    if unit not in ("normalized", "intensity"):
        raise ValueError(f"unit must be 'normalized' or 'intensity', got {unit!r}")
    if min_tokens_pick not in ("most_changed", "first"):
        raise ValueError(f"min_tokens_pick must be 'most_changed' or 'first', got {min_tokens_pick!r}")
    return dict(threshold=threshold, reference=reference, unit=unit, image_mean=image_mean, image_std=image_std,
                keep_first_frame=keep_first_frame, min_tokens=min_tokens, pick=min_tokens_pick,
                num_channels=num_channels)  # fmt: skip


def _item_mask(pixel_values, t, h, w, m, carry, single_frame_item, rule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One item's (or chunk's) mask, (t * n_blocks,) bool, and the reference the frame after it is compared with."""
    n_blocks = (h // m) * (w // m)
    if single_frame_item or rule["threshold"] <= 0:
        return torch.ones(t * n_blocks, dtype=torch.bool, device=pixel_values.device), None
    blocks = pixel_values.float().reshape(t, n_blocks, m * m, rule["num_channels"], -1)
    if rule["unit"] == "intensity":
        mean = torch.tensor(rule["image_mean"], dtype=blocks.dtype, device=blocks.device).view(-1, 1)
        std = torch.tensor(rule["image_std"], dtype=blocks.dtype, device=blocks.device).view(-1, 1)
        blocks = blocks * std + mean
    blocks = blocks.reshape(t, n_blocks, -1)
    keep, carry = _frame_masks(blocks, rule["threshold"], rule["reference"], rule["keep_first_frame"],
                               min(rule["min_tokens"], n_blocks), rule["pick"], carry)  # fmt: skip
    return keep.reshape(-1), carry


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


def _frame_masks(blocks, threshold, reference, keep_first_frame, min_tokens, pick, carry=None):
    # blocks: (t, n, d) -> keep (t, n) bool, and the reference for the frame after the last: with `carry` None,
    # blocks[0] is the item's first frame; otherwise `carry` is what the chunk before this one returned
    t, n, _ = blocks.shape
    keep = torch.zeros(t, n, dtype=torch.bool, device=blocks.device)
    start = 0
    if carry is None:
        if keep_first_frame:
            keep[0] = True
        else:
            # the successor code scores the first frame with a sentinel that its /255 rescale makes tiny, so it
            # falls below any useful threshold and only `min_tokens` of it survive
            first = torch.full((n,), 1.0 / 255.0, device=blocks.device)
            keep[0] = _force_min(first > threshold, first, min_tokens, pick)
        carry, start = blocks[0], 1
    # one frame at a time, also for "previous": a chunk's frames are measured exactly as the whole item's
    ref = carry.clone()
    for f in range(start, t):
        dist = frame_block_distances(blocks[f], ref)
        keep[f] = _force_min(dist > threshold, dist, min_tokens, pick)
        if reference == "previous":
            ref = blocks[f]
        else:
            ref[keep[f]] = blocks[f][keep[f]]
    return keep, ref.clone()


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
