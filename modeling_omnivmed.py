"""OmniV-Med: one RoPE vision tower for 2D images, 3D volumes and videos, a merge + MLP projector and a Qwen LLM.

Data flow (shapes):
    pixel_values (N, C*p*p)  patches of every item in the batch, packed in one sequence, merge-block order per frame
    patch_positions (N, 3)   integer (t, h, w) of each patch: slice/frame index, patch row, patch column
    grid_thw (n_items, 3)    frames, patch rows, patch columns of each item
    merge_sizes (n_items,)   merge x merge patches -> one LLM token
    visual_keep_mask (T,)    which of the T = sum(t * h/m * w/m) visual tokens survive pruning
 -> tower (N_kept or N, D) -> projector (T_kept, D_llm) -> scattered into the <|image_pad|> positions of the text.

These packed inputs cannot be repeated row by row, as generate does for beams and returned sequences. So, as in
transformers' own VLMs, generate encodes them once (`get_image_features`: features split per item) and repeats each
prompt's whole items with it (`mm_encoder_outputs`); the text is checked against the unrepeated batch first.
A long video is encoded chunk by chunk (`encode_video_chunks`, fed by the processor's `iter_video_chunks`) into the
same `OmniVMedVisualOutput`, which generate takes as `mm_encoder_outputs`.
Device placement: the tower, the projector and the LLM may sit on different devices (device_map); every index
tensor follows the activations it indexes, and the features reach the embeddings' device before the scatter.
"""

import bisect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .configuration_omnivmed import PRUNE_STAGES, OmniVMedConfig, OmniVMedVisionConfig
from .pruning_omnivmed import (
    compute_keep_mask,
    compute_keep_mask_chunk,
    patch_grid_positions,
    patch_keep_mask,
    tokens_per_frame,
)


logger = logging.get_logger(__name__)


def patch_positions_from_grid(grid_thw: torch.Tensor, merge_sizes: torch.Tensor, frame_offsets=None) -> torch.Tensor:
    """(t, h, w) of every patch, in merge-block order within each frame: (n_items, 3) -> (N, 3); `frame_offsets`
    (n_items,) shifts each item's t (a streamed chunk's frames continue the clip's)."""
    out = [patch_grid_positions(t, h, w, m) for (t, h, w), m in zip(grid_thw.tolist(), merge_sizes.tolist())]
    if frame_offsets is not None:
        for positions, offset in zip(out, torch.as_tensor(frame_offsets).tolist()):
            positions[:, 0] += offset
    return (torch.cat(out) if out else torch.zeros(0, 3, dtype=torch.long)).to(grid_thw.device)


def segment_lengths(
    grid_thw: torch.Tensor, attention_scope: str, patch_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Lengths of the attention segments of the packed sequence: one per frame ("frame") or per item ("clip")."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])  # (n_frames,)
    if patch_keep is not None:
        frame_id = torch.repeat_interleave(torch.arange(per_frame.numel(), device=per_frame.device), per_frame)
        per_frame = torch.bincount(frame_id[patch_keep], minlength=per_frame.numel())
    if attention_scope == "frame":
        return per_frame
    item_id = torch.repeat_interleave(torch.arange(grid_thw.shape[0], device=grid_thw.device), grid_thw[:, 0])
    return torch.zeros(grid_thw.shape[0], dtype=per_frame.dtype, device=per_frame.device).index_add_(
        0, item_id, per_frame
    )


@dataclass
class PackedSegments:
    """Where the attention segments of a packed sequence are, in the forms the attention backends want."""

    cu_seqlens: torch.Tensor  # (S + 1,) int32, for flash-attention varlen
    max_seqlen: int
    groups: list[torch.Tensor]  # for eager/sdpa: (G, L) token indices of G segments of equal length L
    # per group: the first row when its G segments lie back to back (rows start .. start + G*L), else None; such a
    # group is read as a view instead of gathered and scattered (a video's frames are one such group)
    group_starts: list[int | None]

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor) -> "PackedSegments":
        lengths = lengths[lengths > 0]
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
        cu[1:] = torch.cumsum(lengths, 0)
        starts = cu[:-1].long()
        groups, group_starts = [], []
        # segments of one length run as one batch, so a video's frames cost one attention call, not one each
        for length in torch.unique(lengths).tolist():
            seg_starts = starts[lengths == length]
            groups.append(seg_starts[:, None] + torch.arange(length, device=lengths.device)[None, :])
            back_to_back = bool((torch.diff(seg_starts) == length).all())
            group_starts.append(int(seg_starts[0]) if back_to_back else None)
        max_seqlen = int(lengths.max()) if lengths.numel() else 0
        return cls(cu_seqlens=cu, max_seqlen=max_seqlen, groups=groups, group_starts=group_starts)

    def to(self, device, **kwargs) -> "PackedSegments":
        """The index tensors on `device` (no copy when they are there already). accelerate's hooks move a layer's
        arguments with `.to`, so under a device_map that splits the tower the segments follow its layers."""
        if self.cu_seqlens.device == torch.device(device):
            return self
        return PackedSegments(
            cu_seqlens=self.cu_seqlens.to(device, **kwargs),
            max_seqlen=self.max_seqlen,
            groups=[g.to(device, **kwargs) for g in self.groups],
            group_starts=self.group_starts,
        )


@dataclass
class ReuseCache:
    """pre_encoder_reuse across the chunks of one streamed clip (`encode_video_chunks`): per tower layer, the key
    (already rotated) and value each position of a frame was last computed with, and which positions have been
    computed at all. The tower reads it and replaces its contents after each chunk, as an LLM's KV cache is updated
    in place. Keys are rotated with frame index 0: within one frame's attention the frame index cancels out of
    every query-key angle, so a key is valid for any later frame as it is."""

    keys: list[torch.Tensor] | None = None  # per layer (n, heads, head_dim)
    values: list[torch.Tensor] | None = None
    seen: torch.Tensor | None = None  # (n,) bool, on the CPU

    @property
    def rows(self) -> int:
        return 0 if self.seen is None else self.seen.numel()


@dataclass
class ReuseSegments:
    """Attention layout of `pre_encoder_reuse`: the queries are the kept patches, the keys / values of each frame are
    every position computed so far, a pruned position's taken from the row where it was last computed. Rows are
    counted in [the cache's n rows | this call's kept rows]."""

    kv_source: torch.Tensor  # (N_kv,) the row each key / value of each (frame, position) is read from
    cu_seqlens_q: torch.Tensor  # (F + 1,) int32 over the F frames that have queries, for flash-attention varlen
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    groups: list[tuple[torch.Tensor, torch.Tensor]]  # frames of equal (queries, keys): (G, Lq) query rows, (G, Lk) rows
    last: torch.Tensor  # (n,) the row each position was last computed in after the last frame (-1: never); for caching
    cache: ReuseCache | None = None
    cached_rows: int = 0  # rows the cache held before this call (0 for none)

    @classmethod
    def from_keep(cls, grid_thw: torch.Tensor, keep: torch.Tensor, cache: ReuseCache | None = None) -> "ReuseSegments":
        """grid_thw (n_items, 3) and keep (N,) on the CPU; `cache` (one item only) holds the frames before these."""
        base = cache.rows if cache is not None else 0
        kept_row = torch.cumsum(keep.long(), 0) - 1 + base
        sources, q_lens, kv_lens = [], [], []
        offset, last = 0, torch.zeros(0, dtype=torch.long)
        for t, h, w in grid_thw.tolist():
            n = h * w
            k = keep[offset : offset + t * n].view(t, n)
            row = torch.where(k, kept_row[offset : offset + t * n].view(t, n), -1)
            if cache is not None and cache.seen is not None:
                if cache.rows != n:
                    raise ValueError(f"the reuse cache holds frames of {cache.rows} patches, this chunk's have {n}")
                row = torch.cat([torch.where(cache.seen, torch.arange(n), -1)[None], row])
            # rows grow with the frame (cache rows first), so the running maximum is the latest computed row
            running = torch.cummax(row, dim=0).values[-t:]
            has_query = k.any(1)
            seen = running[has_query] >= 0
            sources.append(running[has_query][seen])
            q_lens.append(k.sum(1)[has_query])
            kv_lens.append(seen.sum(1))
            offset, last = offset + t * n, running[-1]
        empty = torch.zeros(0, dtype=torch.long)
        q_lens, kv_lens = torch.cat([empty, *q_lens]), torch.cat([empty, *kv_lens])
        cu_q = torch.nn.functional.pad(torch.cumsum(q_lens, 0), (1, 0)).to(torch.int32)
        cu_k = torch.nn.functional.pad(torch.cumsum(kv_lens, 0), (1, 0)).to(torch.int32)
        kv_source = torch.cat([empty, *sources])
        groups = []
        pairs = torch.stack([q_lens, kv_lens], 1)
        for lq, lk in torch.unique(pairs, dim=0).tolist():
            frames = ((q_lens == lq) & (kv_lens == lk)).nonzero().squeeze(-1)
            q_rows = cu_q[frames].long()[:, None] + torch.arange(lq)[None, :]  # this call's kept rows
            kv_rows = kv_source[cu_k[frames].long()[:, None] + torch.arange(lk)[None, :]]
            groups.append((q_rows, kv_rows))
        return cls(kv_source=kv_source, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                   max_seqlen_q=int(q_lens.max()) if q_lens.numel() else 0,
                   max_seqlen_k=int(kv_lens.max()) if kv_lens.numel() else 0,
                   groups=groups, last=last, cache=cache, cached_rows=base)  # fmt: skip

    def to(self, device, **kwargs) -> "ReuseSegments":
        if self.kv_source.device == torch.device(device):
            return self
        return ReuseSegments(
            self.kv_source.to(device, **kwargs), self.cu_seqlens_q.to(device, **kwargs),
            self.cu_seqlens_k.to(device, **kwargs), self.max_seqlen_q, self.max_seqlen_k,
            [(q.to(device, **kwargs), k.to(device, **kwargs)) for q, k in self.groups], self.last, self.cache,
            self.cached_rows,
        )  # fmt: skip


class OmniVMedVisionRotaryEmbedding(nn.Module):
    """cos/sin of rotary angles over the (t, h, w) axes, laid out [t | h | w | unrotated] and repeated twice."""

    def __init__(self, config: OmniVMedVisionConfig):
        super().__init__()
        self.axes_dims = list(config.rope_axes_dims)
        self.theta = config.rope_theta
        self.half = config.head_dim // 2

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (N, 3) -> cos, sin: (N, head_dim) float32
        # Computed on the fly rather than kept in a buffer: a non-persistent buffer is left uninitialised when
        # transformers 5 materialises a model from the meta device, which is how the successor code breaks.
        pieces = []
        for axis, n in enumerate(self.axes_dims):
            if n == 0:
                continue
            inv_freq = self.theta ** (-torch.arange(n, dtype=torch.float32, device=positions.device) / n)
            pieces.append(positions[:, axis, None].float() * inv_freq[None, :])
        used = sum(self.axes_dims)
        if used < self.half:
            pieces.append(torch.zeros(positions.shape[0], self.half - used, device=positions.device))
        angles = torch.cat(pieces, dim=-1)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (N, heads, head_dim); cos/sin: (N, head_dim); rotation in float32 whatever the model dtype
    dtype = x.dtype
    x = x.float()
    cos, sin = cos.to(x.device), sin.to(x.device)  # no-op unless a device_map put this layer elsewhere
    out = x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
    return out.to(dtype)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    # query/key/value: (B, heads, L, head_dim) -> (B, L, heads, head_dim)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class OmniVMedVisionAttention(nn.Module):
    def __init__(self, config: OmniVMedVisionConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx  # which of a ReuseCache's layers is this one
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        segments: PackedSegments,
        **kwargs,
    ) -> torch.Tensor:
        n = hidden_states.shape[0]  # (N, D), the whole packed batch
        q = self.q_proj(hidden_states).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(n, self.num_heads, self.head_dim)
        segments = segments.to(hidden_states.device)
        implementation = self.config._attn_implementation or "eager"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        dropout = self.config.attention_dropout if self.training else 0.0
        if isinstance(segments, ReuseSegments):
            return self._reuse_attention(q, k, v, position_embeddings, segments, attention_interface, dropout, kwargs)
        if position_embeddings is not None:  # None: absolute positions already in the input (absolute_positions)
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if "flash" in implementation:
            # varlen kernels take the packed sequence with its cu_seqlens: no padding, no mask
            out = self._attend(attention_interface, q[None], k[None], v[None], dropout, kwargs,
                               cu_seq_lens_q=segments.cu_seqlens, cu_seq_lens_k=segments.cu_seqlens,
                               max_length_q=segments.max_seqlen, max_length_k=segments.max_seqlen)  # fmt: skip
            out = out.reshape(n, self.num_heads * self.head_dim)
        else:
            out = None
            for index, start in zip(segments.groups, segments.group_starts):
                # (G, L): G segments of length L batched together, no N x N mask
                g, length = index.shape
                flat = index.reshape(-1) if start is None else slice(start, start + g * length)

                def gather(x):
                    return x[flat].view(g, length, self.num_heads, self.head_dim)

                group_out = self._attend(attention_interface, gather(q), gather(k), gather(v), dropout, kwargs)
                group_out = group_out.reshape(g * length, self.num_heads, self.head_dim)
                if g * length == n:  # one group holds every row (e.g. frames of one size): no scatter
                    out = group_out
                    break
                if out is None:
                    out = q.new_empty(n, self.num_heads, self.head_dim)
                out[flat] = group_out
            # reshape(n, -1) is ambiguous for n = 0 (a batch without visual patches)
            out = q.new_empty(n, self.num_heads, self.head_dim) if out is None else out
            out = out.reshape(n, self.num_heads * self.head_dim)
        return self.out_proj(out)

    def _attend(self, attention_interface, q, k, v, dropout, kwargs, **varlen) -> torch.Tensor:
        """One non-causal, unmasked attention call: q (B, Lq, heads, head_dim), k / v (B, Lk, heads, head_dim) ->
        (B, Lq, heads, head_dim). `varlen`: flash-attention's cu_seq_lens_q / _k and max_length_q / _k for B = 1 rows
        packed from several segments."""
        out, _ = attention_interface(
            self,
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attention_mask=None,
            scaling=self.scaling,
            dropout=dropout,
            is_causal=False,
            **varlen,
            **kwargs,
        )
        return out

    def _reuse_attention(self, q, k, v, position_embeddings, segments, attention_interface, dropout, kwargs):
        # every row is rotated with frame index 0 (see ReuseCache), so a key is gathered for later frames as it is
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache = segments.cache
        if cache is not None:
            if segments.cached_rows:
                k = torch.cat([cache.keys[self.layer_idx].to(k.device), k])
                v = torch.cat([cache.values[self.layer_idx].to(v.device), v])
            last = segments.last.to(k.device).clamp(min=0)
            if k.shape[0]:
                cache.keys[self.layer_idx] = k.index_select(0, last)
                cache.values[self.layer_idx] = v.index_select(0, last)
            else:  # nothing computed yet: no position is seen, the rows are never read
                cache.keys[self.layer_idx] = k.new_zeros(last.numel(), *k.shape[1:])
                cache.values[self.layer_idx] = v.new_zeros(last.numel(), *v.shape[1:])
        n_q = q.shape[0]
        if n_q and "flash" in (self.config._attn_implementation or "eager"):
            # varlen kernels take queries and keys packed with their own cu_seqlens (a frame's keys outnumber its
            # queries)
            keys, values = k.index_select(0, segments.kv_source), v.index_select(0, segments.kv_source)
            out = self._attend(attention_interface, q[None], keys[None], values[None], dropout, kwargs,
                               cu_seq_lens_q=segments.cu_seqlens_q, cu_seq_lens_k=segments.cu_seqlens_k,
                               max_length_q=segments.max_seqlen_q, max_length_k=segments.max_seqlen_k)  # fmt: skip
            return self.out_proj(out.reshape(n_q, self.num_heads * self.head_dim))

        def gather(x, rows):  # (G, L) row indices -> (G, L, heads, head_dim)
            return x[rows.reshape(-1)].view(*rows.shape, self.num_heads, self.head_dim)

        out = q.new_empty(q.shape)
        for q_rows, kv_rows in segments.groups:
            group_out = self._attend(attention_interface, gather(q, q_rows), gather(k, kv_rows), gather(v, kv_rows),
                                     dropout, kwargs)  # fmt: skip
            out[q_rows.reshape(-1)] = group_out.reshape(q_rows.numel(), self.num_heads, self.head_dim)
        return self.out_proj(out.reshape(n_q, self.num_heads * self.head_dim))


class OmniVMedVisionMLP(nn.Module):
    def __init__(self, config: OmniVMedVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OmniVMedVisionLayer(GradientCheckpointingLayer):
    def __init__(self, config: OmniVMedVisionConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = OmniVMedVisionAttention(config, layer_idx)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = OmniVMedVisionMLP(config)

    def forward(self, hidden_states, position_embeddings, segments, **kwargs):
        hidden_states = hidden_states + self.self_attn(
            self.layer_norm1(hidden_states), position_embeddings, segments, **kwargs
        )
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class OmniVMedPreTrainedModel(PreTrainedModel):
    config_class = OmniVMedConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["OmniVMedVisionLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"]
    _skip_keys_device_placement = "cache"
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @staticmethod
    def lora_target_modules(names=("q_proj", "v_proj")) -> str:
        """PEFT `target_modules` for the language model's projections only: `LoraConfig(target_modules=
        model.lora_target_modules())`. The vision tower's attention keeps SigLIP's q_proj / k_proj / v_proj /
        out_proj names (so composed and converted checkpoints load by name), so the usual list ["q_proj", "v_proj"]
        would adapt the tower too; this regex (PEFT full-matches a string) does not."""
        return rf".*language_model\..*\.({'|'.join(re.escape(name) for name in names)})"


class OmniVMedVisionModel(OmniVMedPreTrainedModel):
    """Packed RoPE ViT: every patch of a batch in one sequence, attention limited to segments, no position table."""

    config_class = OmniVMedVisionConfig
    base_model_prefix = "vision_tower"
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    _no_split_modules = ["OmniVMedVisionLayer"]

    def __init__(self, config: OmniVMedVisionConfig):
        super().__init__(config)
        # a Linear over (C, p, p)-flattened patches == a Conv2d(kernel p, stride p) whose weight is flattened
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        self.rotary_emb = OmniVMedVisionRotaryEmbedding(config)
        self.layers = nn.ModuleList([OmniVMedVisionLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        patch_positions: torch.Tensor | None = None,
        merge_sizes: torch.Tensor | None = None,
        patch_keep_mask: torch.Tensor | None = None,
        frame_offsets: torch.Tensor | None = None,
        reuse: bool = False,
        reuse_cache: ReuseCache | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """
        pixel_values: (N, C*p*p); grid_thw: (n_items, 3); patch_positions: (N, 3), derived from the grid (merge-block
        order, `merge_sizes`) when omitted; patch_keep_mask: (N,) bool, run the tower only on these patches;
        frame_offsets: (n_items,) first frame index of each item within a longer clip (a streamed chunk), 0 if None.
        reuse: the kept patches attend to every position of their frame (prune_stage "pre_encoder_reuse");
        reuse_cache: with `reuse`, one clip streamed in chunks: the keys / values of the frames before this chunk,
        updated in place for the next one.
        Returns last_hidden_state (N or N_kept, D) after post_layernorm.
        """
        # The tower may sit on another device than the inputs, and under a device_map its layers on several. The
        # segment layout (a few integers per frame) is worked out on the CPU, where it costs no device syncs; the
        # index tensors then go where the activations are (PackedSegments.to, per layer when the layers move).
        device = self.patch_embedding.weight.device
        grid_cpu = grid_thw.detach().to("cpu").long()
        # checked where the caller made them (their values are read)
        validate_visual_inputs(pixel_values, grid_cpu, self.config.patch_dim, patch_positions, patch_keep_mask,
                               frame_offsets)  # fmt: skip
        pixel_values = pixel_values.to(device)
        if patch_positions is not None:
            patch_positions = patch_positions.to(device)
        if patch_positions is None:
            if merge_sizes is None:
                merge_sizes = torch.ones(grid_cpu.shape[0], dtype=torch.long)
            patch_positions = patch_positions_from_grid(grid_cpu, merge_sizes.cpu(), frame_offsets).to(device)
        keep_cpu = None
        if reuse and patch_keep_mask is None:
            patch_keep_mask = torch.ones(pixel_values.shape[0], dtype=torch.bool)
        if reuse_cache is not None and not reuse:
            raise ValueError("reuse_cache is for the pre_encoder_reuse tower (reuse=True)")
        if patch_keep_mask is not None:
            keep_cpu = patch_keep_mask.detach().to("cpu").bool()
            kept = keep_cpu.nonzero().squeeze(-1).to(device)
            if reuse:
                return self._forward_reuse(pixel_values, grid_cpu, patch_positions, keep_cpu, kept, reuse_cache,
                                           **kwargs)  # fmt: skip
            pixel_values = pixel_values.index_select(0, kept)
            patch_positions = patch_positions.index_select(0, kept)
        lengths = segment_lengths(grid_cpu, self.config.attention_scope, keep_cpu)
        absolute = self.absolute_positions(grid_cpu, patch_positions, keep_cpu)
        chunks = []
        for start, end, chunk_lengths in chunk_segments(lengths, self.config.max_patches_per_chunk):
            segments = PackedSegments.from_lengths(chunk_lengths).to(device)
            hidden_states = self.patch_embedding(pixel_values[start:end].to(self.patch_embedding.weight.dtype))
            if absolute is None:
                position_embeddings = self.rotary_emb(patch_positions[start:end])
            else:  # absolute positions in place of RoPE, read once for every patch; each chunk takes its rows
                hidden_states = hidden_states + absolute[start:end]
                position_embeddings = None
            for layer in self.layers:
                hidden_states = layer(hidden_states, position_embeddings, segments, **kwargs)
            chunks.append(self.post_layernorm(hidden_states))
        return BaseModelOutput(last_hidden_state=chunks[0] if len(chunks) == 1 else torch.cat(chunks))

    def _forward_reuse(self, pixel_values, grid_cpu, patch_positions, keep_cpu, kept, cache=None, **kwargs):
        """pre_encoder_reuse: the kept patches only, each attending to every position of its frame (ReuseSegments).
        The whole sequence runs at once (a frame's keys come from earlier frames, so it is not cut into runs); a
        longer clip is streamed a chunk at a time with a ReuseCache."""
        if self.config.attention_scope != "frame":
            raise ValueError("prune_stage='pre_encoder_reuse' needs attention_scope='frame'")
        if self.absolute_positions(grid_cpu, patch_positions) is not None:
            raise ValueError("prune_stage='pre_encoder_reuse' needs the rotary tower")
        if cache is not None:
            if grid_cpu.shape[0] != 1:
                raise ValueError(f"a reuse cache follows one clip: grid_thw must be (1, 3), got {list(grid_cpu.shape)}")
            if cache.keys is None:
                cache.keys, cache.values = [None] * len(self.layers), [None] * len(self.layers)
        segments = ReuseSegments.from_keep(grid_cpu, keep_cpu, cache).to(pixel_values.device)
        # frame index 0 for every row: it cancels within a frame's attention, and a cached key stays valid as it is
        positions = patch_positions.index_select(0, kept) * torch.tensor([0, 1, 1], device=patch_positions.device)
        hidden_states = self.patch_embedding(pixel_values.index_select(0, kept).to(self.patch_embedding.weight.dtype))
        position_embeddings = self.rotary_emb(positions)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, segments, **kwargs)
        if cache is not None:
            cache.seen = segments.last >= 0
        return BaseModelOutput(last_hidden_state=self.post_layernorm(hidden_states))

    def absolute_positions(
        self, grid_thw: torch.Tensor, patch_positions: torch.Tensor, patch_keep_mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Position vectors added to the patch embeddings in place of RoPE, (N or N_kept, D); None: the tower's
        positions are rotary only. ablate_omnivmed.py's learned-table arm (SigLIP's scheme) overrides this."""
        return None


def chunk_segments(lengths: torch.Tensor, max_patches: int) -> list[tuple[int, int, torch.Tensor]]:
    """Cut a packed sequence into runs of whole segments of at most `max_patches` rows (a longer segment runs
    alone; 0 = one run): (start row, end row, segment lengths) per run. Every op of the tower is per row or per
    segment, so the runs give the same result as the whole sequence while its activations (e.g. a 1-hour video's
    230k patches) never exist all at once, and the tensors stay small enough to be reused from the allocator."""
    lengths = lengths[lengths > 0]
    total = int(lengths.sum())
    if max_patches <= 0 or total <= max_patches:
        return [(0, total, lengths)]
    runs, start, first = [], 0, 0
    ends = torch.cumsum(lengths, 0).tolist()
    for i, end in enumerate(ends):
        # close the run before segment i + 1 if adding it would overflow
        if i + 1 == len(ends) or ends[i + 1] - start > max_patches:
            runs.append((start, end, lengths[first : i + 1]))
            start, first = end, i + 1
    return runs


def validate_visual_inputs(pixel_values, grid_thw, patch_dim, patch_positions=None, patch_keep_mask=None,
                           frame_offsets=None):  # fmt: skip
    """Clear errors for inputs that would otherwise produce silently wrong tensors. `frame_offsets` (n_items,): each
    item is frames offset .. offset + t - 1 of a longer clip (a streamed chunk), so its positions' t lie there."""
    if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(
            f"pixel_values must be (num_patches, {patch_dim}) flattened (C, p, p) patches, got {tuple(pixel_values.shape)}"
        )
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be (num_items, 3), got {tuple(grid_thw.shape)}")
    if (grid_thw <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {grid_thw.tolist()}")
    n = int((grid_thw.prod(-1)).sum())
    if n != pixel_values.shape[0]:
        raise ValueError(f"grid_thw describes {n} patches but pixel_values has {pixel_values.shape[0]}")
    if patch_positions is not None:
        if tuple(patch_positions.shape) != (n, 3):
            raise ValueError(f"patch_positions must be ({n}, 3), got {tuple(patch_positions.shape)}")
        lows = torch.zeros_like(grid_thw)
        if frame_offsets is not None:
            lows[:, 0] = torch.as_tensor(frame_offsets).to(grid_thw.device).long()
        counts = grid_thw.prod(-1)
        lows = torch.repeat_interleave(lows, counts, dim=0).to(patch_positions.device)
        limits = lows + torch.repeat_interleave(grid_thw, counts, dim=0).to(patch_positions.device)
        if (patch_positions < lows).any() or (patch_positions >= limits).any():
            bad = ((patch_positions < lows) | (patch_positions >= limits)).any(-1).nonzero()[0].item()
            raise ValueError(
                f"patch_positions out of range: patch {bad} has (t, h, w) = {patch_positions[bad].tolist()} "
                f"outside its item's grid {limits[bad].tolist()}"
                + (f" (frames from {lows[bad, 0].item()})" if frame_offsets is not None else "")
            )
    if patch_keep_mask is not None and patch_keep_mask.shape != (n,):
        raise ValueError(f"patch_keep_mask must be ({n},), got {tuple(patch_keep_mask.shape)}")


class OmniVMedProjector(nn.Module):
    """Merge merge x merge patch features into one token (concatenate or average), then Linear-act-Linear."""

    def __init__(self, config: OmniVMedConfig):
        super().__init__()
        self.merge_kind = config.merge_kind
        vision_dim = config.vision_config.hidden_size
        in_dim = vision_dim * config.image_merge_size**2 if self.merge_kind == "concat" else vision_dim
        text_dim = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_dim, text_dim)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def merge(self, features: torch.Tensor, token_merge: torch.Tensor) -> torch.Tensor:
        # features: (N, D) in merge-block order; token_merge: (T,) merge size of each token -> (T, D_in)
        token_merge = token_merge.to(features.device)
        if self.merge_kind == "concat":
            return features.reshape(token_merge.numel(), -1)
        if bool((token_merge == token_merge[0]).all()):
            m = int(token_merge[0])
            return features.view(-1, m * m, features.shape[-1]).mean(dim=1)
        token_id = torch.repeat_interleave(torch.arange(token_merge.numel(), device=features.device), token_merge**2)
        summed = features.new_zeros(token_merge.numel(), features.shape[-1]).index_add_(0, token_id, features)
        return summed / (token_merge**2).to(features.dtype)[:, None]

    def forward(self, features: torch.Tensor, token_merge: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.merge(features, token_merge))))


@dataclass
class OmniVMedModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor] | None = None
    attentions: tuple[torch.FloatTensor] | None = None
    visual_keep_mask: torch.BoolTensor | None = None
    num_tower_tokens: int | None = None


@dataclass
class OmniVMedCausalLMOutputWithPast(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor] | None = None
    attentions: tuple[torch.FloatTensor] | None = None
    visual_keep_mask: torch.BoolTensor | None = None
    num_tower_tokens: int | None = None


@dataclass
class OmniVMedVisualOutput(ModelOutput):
    """Visual features of a batch's media items, encoded once (see `OmniVMedModel.get_image_features`).

    pooler_output: one (T_kept_i, D_llm) tensor per item, in order of appearance: transformers' generate repeats
        these whole, per prompt, for beams and returned sequences (the name is the one it reads).
    visual_keep_mask / grid_thw / merge_sizes: the items as encoded (not repeated), for checking the text against.
    """

    pooler_output: tuple[torch.FloatTensor, ...] | list[torch.FloatTensor] | None = None
    visual_keep_mask: torch.BoolTensor | None = None
    grid_thw: torch.LongTensor | None = None
    merge_sizes: torch.LongTensor | None = None
    num_tower_tokens: int | None = None


VISUAL_INPUT_NAMES = ("pixel_values", "grid_thw", "merge_sizes", "patch_positions", "visual_keep_mask")


class OmniVMedModel(OmniVMedPreTrainedModel):
    def __init__(self, config: OmniVMedConfig):
        super().__init__(config)
        self.vision_tower = OmniVMedVisionModel(config.vision_config)
        self.projector = OmniVMedProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        trained = config.train_prune_stage
        if trained is not None and trained != config.prune_stage:
            # the two stages give the LLM different features for the same pixels: answering with a stage the model
            # was not trained with cost 1.3 ± 1.4 points on volumes and videos (post-encoder-trained, answering with
            # pre_encoder_reuse; EVIDENCE.md, 10 seeds)
            logger.warning(
                f"this model trains with prune_stage {trained!r} but answers with {config.prune_stage!r}: on volumes "
                "and videos its answers may be less accurate than with the stage it was trained with"
            )

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def default_merge_sizes(self, grid_thw: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.config.merge_size_for(int(t)) for t in grid_thw[:, 0]], device=grid_thw.device)

    def pruning_rule(self, prune_threshold: float | None = None) -> dict:
        """This model's pruning settings as `pruning_omnivmed.compute_keep_mask`'s keyword arguments (`prune_threshold`
        in place of the config's threshold when given)."""
        c = self.config
        return dict(threshold=c.prune_threshold if prune_threshold is None else prune_threshold,
                    reference=c.prune_reference, unit=c.prune_unit, image_mean=c.image_mean, image_std=c.image_std,
                    keep_first_frame=c.prune_keep_first_frame, min_tokens=c.prune_min_tokens,
                    min_tokens_pick=c.prune_min_tokens_pick, num_channels=c.vision_config.num_channels)  # fmt: skip

    def active_prune_stage(self) -> str:
        """The pruning stage this forward runs: `train_prune_stage` in training mode when set, else `prune_stage`."""
        c = self.config
        training = self.training and c.train_prune_stage is not None
        stage = c.train_prune_stage if training else c.prune_stage
        if stage not in PRUNE_STAGES:  # set after loading (from_pretrained kwargs do) skips the config's check
            name = "train_prune_stage" if training else "prune_stage"
            raise ValueError(f"{name} must be one of {PRUNE_STAGES}, got {stage!r}")
        return stage

    def visual_keep_mask(
        self, pixel_values, grid_thw, merge_sizes, prune_threshold: float | None = None
    ) -> torch.Tensor:
        """The pruning rule (pruning_omnivmed.compute_keep_mask) with this model's settings."""
        return compute_keep_mask(pixel_values, grid_thw, merge_sizes, **self.pruning_rule(prune_threshold))

    def get_visual_features(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        merge_sizes: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        visual_keep_mask: torch.Tensor | None = None,
        prune_threshold: float | None = None,
        frame_offsets: torch.Tensor | None = None,
        reuse_cache: ReuseCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Returns (features of the kept visual tokens (T_kept, D_llm), keep mask (T,), patches the tower ran on).

        The keep mask is `visual_keep_mask` (what the processor expanded the text to) when given, else recomputed
        from the pixels with this model's config (the one source of the pruning settings), or with
        `prune_threshold` in place of the config's threshold when that is given. `frame_offsets`, `reuse_cache`:
        see the tower (a streamed clip's chunks)."""
        grid_thw = grid_thw.to(pixel_values.device).long()
        merge_sizes = self._merge_sizes(grid_thw, merge_sizes)
        validate_visual_inputs(pixel_values, grid_thw, self.config.vision_config.patch_dim, patch_positions,
                               frame_offsets=frame_offsets)  # fmt: skip
        token_counts = grid_thw[:, 0] * (grid_thw[:, 1] // merge_sizes) * (grid_thw[:, 2] // merge_sizes)
        token_merge = torch.repeat_interleave(merge_sizes, token_counts)  # (T,)
        if visual_keep_mask is None or prune_threshold is not None:
            visual_keep_mask = self.visual_keep_mask(pixel_values, grid_thw, merge_sizes, prune_threshold)
        visual_keep_mask = visual_keep_mask.to(pixel_values.device).bool()
        if visual_keep_mask.shape != token_merge.shape:
            raise ValueError(
                f"visual_keep_mask has {visual_keep_mask.numel()} entries but the grids give {token_merge.numel()} "
                "visual tokens"
            )
        if patch_positions is None:
            patch_positions = patch_positions_from_grid(grid_thw, merge_sizes, frame_offsets)

        # the projector may sit on another device than the tower (device_map): its input goes there explicitly, so
        # the model is right without accelerate's hooks too
        projector_device = self.projector.linear_1.weight.device
        stage = self.active_prune_stage()
        reuse = stage == "pre_encoder_reuse"
        if reuse and reuse_cache is None and frame_offsets is not None and bool((frame_offsets != 0).any()):
            raise ValueError("prune_stage='pre_encoder_reuse': a chunk that continues a clip needs the reuse_cache of "
                             "the chunks before it (encode_video_chunks keeps one)")  # fmt: skip
        if reuse_cache is not None and not reuse:
            raise ValueError(f"reuse_cache is for prune_stage='pre_encoder_reuse', not {stage!r}")
        # a streamed chunk that keeps everything still fills the reuse cache, so it takes the reuse path too
        if stage != "post_encoder" and (reuse_cache is not None or not bool(visual_keep_mask.all())):
            patch_keep = patch_keep_mask(visual_keep_mask, grid_thw, merge_sizes)
            features = self.vision_tower(
                pixel_values, grid_thw, patch_positions, patch_keep_mask=patch_keep, frame_offsets=frame_offsets,
                **({"reuse": True, "reuse_cache": reuse_cache} if reuse else {}), **kwargs,
            ).last_hidden_state
            features = self.projector(features.to(projector_device), token_merge[visual_keep_mask])
            return features, visual_keep_mask, int(patch_keep.sum())
        features = self.vision_tower(
            pixel_values, grid_thw, patch_positions, frame_offsets=frame_offsets, **kwargs
        ).last_hidden_state
        features = self.projector(features.to(projector_device), token_merge)
        if not bool(visual_keep_mask.all()):
            # rows picked by index, found where the mask is: a boolean index would need the mask on this device
            features = features.index_select(0, visual_keep_mask.nonzero().squeeze(-1).to(features.device))
        return features, visual_keep_mask, pixel_values.shape[0]

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        merge_sizes: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        visual_keep_mask: torch.Tensor | None = None,
        prune_threshold: float | None = None,
        **kwargs,
    ) -> "OmniVMedVisualOutput":
        """The visual features split per media item (2D image, volume or video alike), in the form transformers'
        `generate` encodes once and then repeats per beam / returned sequence (whole items of each prompt, see
        `GenerationMixin._expand_multimodal_outputs`), and `forward` takes back as `mm_encoder_outputs={"image": ...}`.
        The packed inputs (pixel_values, patch_positions, grid_thw, merge_sizes, visual_keep_mask) cannot be repeated
        row by row, so they never reach that expansion."""
        kwargs.pop("return_dict", None)  # generate asks for a ModelOutput, which this always is
        grid_thw = grid_thw.to(pixel_values.device).long()
        merge_sizes = self._merge_sizes(grid_thw, merge_sizes)
        features, keep, tower_tokens = self.get_visual_features(
            pixel_values, grid_thw, merge_sizes, patch_positions, visual_keep_mask, prune_threshold, **kwargs
        )
        token_counts = grid_thw[:, 0] * (grid_thw[:, 1] // merge_sizes) * (grid_thw[:, 2] // merge_sizes)
        kept_per_item = [int(k.sum()) for k in keep.cpu().split(token_counts.tolist())]
        return OmniVMedVisualOutput(
            pooler_output=features.split(kept_per_item),
            visual_keep_mask=keep,
            grid_thw=grid_thw,
            merge_sizes=merge_sizes,
            num_tower_tokens=tower_tokens,
        )

    def encode_video_chunks(self, chunks, prune_threshold: float | None = None) -> "OmniVMedVisualOutput":
        """The visual features of one long video (or volume) encoded a chunk at a time, as
        `OmniVMedImageProcessor.iter_video_chunks` yields it, so neither its patches nor the tower's activations
        ever exist for the whole clip (call it under `torch.inference_mode()`). Returns what `get_image_features`
        returns for the clip in one piece: one item, its kept tokens' features, its whole keep mask, grid_thw
        (1, 3) and merge_sizes; give it to `generate` / `forward` as `mm_encoder_outputs={"image": ...}` with a
        prompt expanded to its keep mask (`OmniVMedProcessor.prompt_inputs`).

        Each chunk: pixel_values, grid_thw (1, 3), optionally merge_sizes, patch_positions (the clip's frame index
        in t; derived when absent) and visual_keep_mask (recomputed with this model's config when absent or when
        `prune_threshold` is given, with the pruning reference carried from the previous chunk). prune_stage
        "pre_encoder" drops each chunk's pruned patches before the tower. With attention_scope "clip" a frame attends
        to the whole clip, which no chunking can reproduce: that is refused. "pre_encoder_reuse" carries each tower
        layer's keys / values of the positions computed so far from chunk to chunk (a ReuseCache: 2 x layers x one
        frame's patches x width), so its pruned positions read what the frames before the chunk computed."""
        if self.config.vision_config.attention_scope != "frame":
            raise ValueError(
                f"encode_video_chunks needs attention_scope='frame' (this tower's is "
                f"{self.config.vision_config.attention_scope!r}): with 'clip' every frame attends to the whole clip, "
                "so encoding it in chunks would change the features; process the clip in one call instead"
            )
        rule = self.pruning_rule(prune_threshold)
        features, keeps, frames, tower_tokens, layout, carry = [], [], 0, 0, None, None
        cache = ReuseCache() if self.active_prune_stage() == "pre_encoder_reuse" else None
        for index, chunk in enumerate(chunks):
            pixel_values = torch.as_tensor(chunk["pixel_values"])
            grid_thw = torch.as_tensor(chunk["grid_thw"]).to(pixel_values.device).long()
            if grid_thw.shape != (1, 3):
                raise ValueError(
                    f"chunk {index}: grid_thw must be (1, 3), one clip's frames; got {tuple(grid_thw.shape)}"
                )
            merge = chunk.get("merge_sizes")
            merge_sizes = self._merge_sizes(grid_thw, None if merge is None else torch.as_tensor(merge))
            shape = (*grid_thw[0, 1:].tolist(), int(merge_sizes[0]))
            if layout is None:
                layout = shape
            elif shape != layout:
                raise ValueError(f"chunk {index}: (patch rows, patch columns, merge) {shape} differ from the first "
                                 f"chunk's {layout}; the chunks must be one clip's")  # fmt: skip
            keep = chunk.get("visual_keep_mask")
            if keep is None or prune_threshold is not None:
                metadata = (chunk.get("media_metadata") or [{}])[0]
                whole = frames == 0 and bool(metadata.get("chunk", {}).get("last", False))
                keep, carry = compute_keep_mask_chunk(pixel_values, grid_thw, merge_sizes, carry, whole_item=whole,
                                                      **rule)  # fmt: skip
            positions = chunk.get("patch_positions")
            out, keep, n_tower = self.get_visual_features(
                pixel_values, grid_thw, merge_sizes, None if positions is None else torch.as_tensor(positions),
                torch.as_tensor(keep), frame_offsets=torch.tensor([frames]), reuse_cache=cache,
            )  # fmt: skip
            features.append(out)
            keeps.append(keep)
            tower_tokens += n_tower
            frames += int(grid_thw[0, 0])
            del chunk, pixel_values, positions  # the next chunk is made while nothing of this one is held here
        if not features:
            raise ValueError("encode_video_chunks got no chunks")
        return OmniVMedVisualOutput(
            pooler_output=(torch.cat(features),),
            visual_keep_mask=torch.cat(keeps),
            grid_thw=torch.tensor([[frames, *layout[:2]]], device=keeps[0].device),
            merge_sizes=torch.tensor([layout[2]], device=keeps[0].device),
            num_tower_tokens=tower_tokens,
        )

    def _merge_sizes(self, grid_thw: torch.Tensor, merge_sizes: torch.Tensor | None) -> torch.Tensor:
        merge_sizes = self.default_merge_sizes(grid_thw) if merge_sizes is None else merge_sizes.long()
        merge_sizes = merge_sizes.to(grid_thw.device)
        if merge_sizes.shape != (grid_thw.shape[0],):
            raise ValueError(f"merge_sizes must be ({grid_thw.shape[0]},), got {tuple(merge_sizes.shape)}")
        if ((grid_thw[:, 1] % merge_sizes) != 0).any() or ((grid_thw[:, 2] % merge_sizes) != 0).any():
            raise ValueError(
                f"every item's patch grid must be divisible by its merge size: grid_thw={grid_thw.tolist()}, "
                f"merge_sizes={merge_sizes.tolist()}"
            )
        return merge_sizes

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        grid_thw: torch.LongTensor | None = None,
        merge_sizes: torch.LongTensor | None = None,
        patch_positions: torch.LongTensor | None = None,
        visual_keep_mask: torch.BoolTensor | None = None,
        prune_threshold: float | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        media_metadata: list | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> OmniVMedModelOutputWithPast:
        """mm_token_type_ids and media_metadata are named here only because the processor returns them and
        `generate(**inputs)` refuses keyword arguments forward does not name (its model_kwargs check); they are not
        read (placeholders are found by id; the metadata is for the caller). mm_encoder_outputs: {"image":
        get_image_features(...)}, visual features encoded beforehand (generate does this), in place of the pixel
        inputs. The visual arguments are named one by one for the same check (an Unpack'ed TypedDict would hide
        them from it)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids and inputs_embeds")
        visual = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None and visual is not None:
            raise ValueError("Give either pixel_values or mm_encoder_outputs, not both")
        # transformers 5 renamed past_key_values to cache; accept the old name from older callers
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if inputs_embeds is None:
            embed = self.get_input_embeddings()
            inputs_embeds = embed(input_ids.to(embed.weight.device))
        # RoPE runs past max_position_embeddings without complaint, on positions the LLM never saw: refuse them
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        length = inputs_embeds.shape[1] + (cache.get_seq_length() if cache is not None else 0)
        if limit and length > limit:
            raise ValueError(
                f"the sequence reaches {length} tokens (prompt and cache, media expanded), more than the LLM's "
                f"max_position_embeddings={limit}; shorten the prompt or lower max_new_tokens"
            )
        placeholders = self._placeholder_mask(input_ids, inputs_embeds)
        if pixel_values is not None:
            if grid_thw is None:
                raise ValueError("pixel_values were given without grid_thw")
            visual = self.get_image_features(
                pixel_values, grid_thw, merge_sizes, patch_positions, visual_keep_mask, prune_threshold
            )
            check_visual_text(placeholders, visual, self.config.image_token_id)
        keep, tower_tokens = None, None
        if visual is not None:
            # a pre-encoded output may be a chunk of a prompt (chunked prefill) or repeated per beam, so only the
            # total is checked here; generate checks the whole batch against the text before it expands it
            pieces = list(visual.pooler_output)
            features = torch.cat(pieces) if pieces else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
            n_placeholders = int(placeholders.sum())
            if n_placeholders != features.shape[0]:
                raise ValueError(
                    f"The text has {n_placeholders} image placeholder tokens (id {self.config.image_token_id}) but "
                    f"the media give {features.shape[0]} visual tokens"
                )
            inputs_embeds = inputs_embeds.masked_scatter(
                placeholders[..., None].to(inputs_embeds.device),
                features.to(inputs_embeds.device, inputs_embeds.dtype),
            )
            keep, tower_tokens = visual.visual_keep_mask, visual.num_tower_tokens
        elif placeholders.any():
            raise ValueError(
                f"The text has {int(placeholders.sum())} image placeholder tokens but no pixel_values were given"
            )
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return OmniVMedModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            visual_keep_mask=keep,
            num_tower_tokens=tower_tokens,
        )

    def _placeholder_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        if input_ids is not None and input_ids.numel():
            return input_ids == self.config.image_token_id
        embed = self.get_input_embeddings()
        token = embed(torch.tensor(self.config.image_token_id, device=embed.weight.device))
        return (inputs_embeds == token.to(inputs_embeds.device)).all(-1)


def check_visual_text(placeholders: torch.Tensor, visual: "OmniVMedVisualOutput", image_token_id: int):
    """The text's placeholders (B, L) against the media of the whole batch: the total, then (when the output knows its
    keep mask and grids) that every prompt holds whole items and every run of placeholders whole frames."""
    n_placeholders = int(placeholders.sum())
    n_visual = sum(len(f) for f in visual.pooler_output)
    keep = visual.visual_keep_mask
    if n_placeholders != n_visual:
        before = f" ({keep.numel()} before)" if keep is not None else ""
        raise ValueError(
            f"The text has {n_placeholders} image placeholder tokens (id {image_token_id}) but the pixels give "
            f"{n_visual} visual tokens after pruning{before}. The processor expands each placeholder to the kept "
            "count: pass the model the visual_keep_mask the processor returned (or the same prune_threshold), and "
            "load processor and model from the same folder, whose config.json holds the pruning settings"
        )
    if keep is not None and visual.grid_thw is not None and visual.merge_sizes is not None:
        check_placeholder_runs(placeholders, keep, visual.grid_thw, visual.merge_sizes)


def check_placeholder_runs(placeholders, keep, grid_thw, merge_sizes):
    """Each prompt of the batch must hold whole media items, and each run of consecutive placeholders in the text
    whole frames: with frame separators one run per frame, without them (e.g. converted checkpoints' formats) several
    consecutive frames or items. A keep mask that merely has the right total would otherwise put visual tokens into
    the wrong frames, or one item's tokens into two prompts (and so into the wrong beams of generate), silently."""
    per_frame = tokens_per_frame(keep, grid_thw.cpu(), merge_sizes.cpu())
    item_ends = set(itertools.accumulate(sum(item) for item in per_frame))
    row_ends = set(itertools.accumulate(placeholders.sum(-1).tolist())) - {0}
    if not row_ends <= item_ends:
        raise ValueError(
            f"the prompts of the batch hold {placeholders.sum(-1).tolist()} image placeholders each, which do not "
            f"split the media into whole items (kept tokens per item: {[sum(item) for item in per_frame]}); give "
            "each prompt its own media, in order"
        )
    runs = []
    for row in placeholders.int():
        edges = torch.diff(torch.nn.functional.pad(row, (1, 1)))
        runs += ((edges == -1).nonzero()[:, 0] - (edges == 1).nonzero()[:, 0]).tolist()
    frames = [n for item in per_frame for n in item]
    frame_ends = set(itertools.accumulate(frames))
    if not set(itertools.accumulate(runs)) <= frame_ends:
        raise ValueError(
            f"visual_keep_mask disagrees with input_ids: the text's runs of placeholders have lengths {runs[:16]}"
            f"{'...' if len(runs) > 16 else ''}, which do not end at frame boundaries of the mask's kept tokens "
            f"per frame {frames[:16]}{'...' if len(frames) > 16 else ''}; the text was expanded with other pruning "
            "settings than the mask's: pass the model the visual_keep_mask the processor returned (or the same "
            "prune_threshold), and load processor and model from the same folder, whose config.json holds the "
            "pruning settings"
        )


class OmniVMedForConditionalGeneration(OmniVMedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: OmniVMedConfig):
        super().__init__(config)
        self.model = OmniVMedModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values, grid_thw, **kwargs) -> OmniVMedVisualOutput:
        return self.model.get_image_features(pixel_values, grid_thw, **kwargs)

    def encode_video_chunks(self, chunks, prune_threshold: float | None = None) -> OmniVMedVisualOutput:
        return self.model.encode_video_chunks(chunks, prune_threshold=prune_threshold)

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def language_model(self):
        return self.model.language_model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        grid_thw: torch.LongTensor | None = None,
        merge_sizes: torch.LongTensor | None = None,
        patch_positions: torch.LongTensor | None = None,
        visual_keep_mask: torch.BoolTensor | None = None,
        prune_threshold: float | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: torch.Tensor | None = None,
        media_metadata: list | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> OmniVMedCausalLMOutputWithPast:
        """labels: (B, L) token ids, -100 where no loss is taken (prompt, visual tokens, padding).
        prune_threshold overrides the config's for this call (the processor must have used the same one). The other
        arguments are OmniVMedModel.forward's (named here too: generate checks its keyword arguments against this
        signature); mm_token_type_ids and media_metadata are accepted and not read, see there."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            grid_thw=grid_thw,
            merge_sizes=merge_sizes,
            patch_positions=patch_positions,
            visual_keep_mask=visual_keep_mask,
            prune_threshold=prune_threshold,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return OmniVMedCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            visual_keep_mask=outputs.visual_keep_mask,
            num_tower_tokens=outputs.num_tower_tokens,
        )

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None,
                                      **model_kwargs):  # fmt: skip
        # generate has encoded the media once (`mm_encoder_outputs`, because forward takes it) and now repeats each
        # prompt `expand_size` times (beams, returned sequences); transformers repeats the features of each prompt's
        # items with it, finding the prompts' items by counting placeholders. Check here, on the batch as given, that
        # those counts split the media into whole items and frames, so no beam can get another prompt's pixels.
        visual = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if visual is not None and visual.pooler_output is not None:
            embeds = model_kwargs.get("inputs_embeds")
            ids = input_ids if input_ids is not None and input_ids.numel() else None
            if ids is None and embeds is None:
                raise ValueError("generate got media but no input_ids or inputs_embeds to find their placeholders in")
            placeholders = self.model._placeholder_mask(ids, embeds)
            check_visual_text(placeholders, visual, self.config.image_token_id)
            metadata = model_kwargs.get("media_metadata")
            if expand_size > 1 and isinstance(metadata, list) and len(metadata) == len(visual.pooler_output):
                # per-item metadata follows its items into every copy of their prompt, as the features do
                ends = list(itertools.accumulate(len(f) for f in visual.pooler_output))
                rows, start = [], 0
                for row_end in itertools.accumulate(placeholders.sum(-1).tolist()):
                    stop = bisect.bisect_right(ends, row_end)
                    rows.append(metadata[start:stop])
                    start = stop
                model_kwargs["media_metadata"] = [m for row in rows for _ in range(expand_size) for m in row]
        return super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, is_first_iteration: bool | None = False, **kwargs
    ):  # inputs_embeds named: generate accepts them only from models whose signature shows it
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        # the pixels are consumed by the prefill; later steps only feed the new token against the KV cache
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in VISUAL_INPUT_NAMES:
                model_inputs.pop(name, None)
        return model_inputs


__all__ = [
    "OmniVMedPreTrainedModel",
    "OmniVMedVisionModel",
    "OmniVMedModel",
    "OmniVMedForConditionalGeneration",
]
