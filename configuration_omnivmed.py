"""OmniV-Med configuration: a RoPE SigLIP-shaped vision tower, a merge + MLP projector and a Qwen2/Qwen3 LLM.

Everything the model does differently per checkpoint family (RoPE layout per axis, merge size per medium, merge
kind, pruning rule) is a config field, so converted checkpoints (Hulu-Med, VideoLLaMA3) are pure weight maps.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


@strict
class OmniVMedVisionConfig(PreTrainedConfig):
    r"""
    The vision tower: SigLIP-shaped pre-norm ViT over flattened (C, p, p) patches, with rotary position embeddings
    on q/k over three integer axes (t, h, w) instead of an absolute position table.

    rope_axes_dims (`list[int]`, *optional*):
        Number of rotary frequencies given to the (t, h, w) axes; their sum must be at most `head_dim // 2` (the
        rest of the head is not rotated). Each axis uses `inv_freq = rope_theta ** (-arange(n) / n)` and the angles
        are laid out `[t | h | w]`, repeated twice across the head (rotate-half). Default: a quarter of the
        frequencies for t, the rest split evenly between h and w. Hulu-Med / VideoLLaMA3 use `[0, hd/4, hd/4]`.
    attention_scope (`str`, defaults to `"frame"`):
        `"frame"`: attention limited to each image / slice / frame; `"clip"`: to each whole volume or video, which
        is where the t axis matters inside the tower.
    max_patches_per_chunk (`int`, defaults to 8192):
        The tower encodes the packed sequence in runs of whole attention segments of at most this many patches
        (a longer segment runs alone; 0 = all at once). Same result, bounded activation memory and time linear in
        the length of a long video.
    """

    model_type = "omnivmed_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float | int = 0.0
    rope_theta: float = 10000.0
    rope_axes_dims: list[int] | None = None
    attention_scope: str = "frame"
    max_patches_per_chunk: int = 8192
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 2:
            raise ValueError(f"The head dimension must be even for rotary embeddings, got {head_dim}")
        n_freqs = head_dim // 2
        if self.rope_axes_dims is None:
            t = n_freqs // 4
            hw = (n_freqs - t) // 2
            self.rope_axes_dims = [n_freqs - 2 * hw, hw, hw]
        self.rope_axes_dims = [int(d) for d in self.rope_axes_dims]
        if len(self.rope_axes_dims) != 3 or min(self.rope_axes_dims) < 0 or sum(self.rope_axes_dims) > n_freqs:
            raise ValueError(
                f"rope_axes_dims must be three non-negative frequency counts for (t, h, w) summing to at most "
                f"head_dim // 2 = {n_freqs}, got {self.rope_axes_dims}"
            )
        if self.attention_scope not in ("frame", "clip"):
            raise ValueError(f"attention_scope must be 'frame' or 'clip', got {self.attention_scope!r}")
        if self.max_patches_per_chunk < 0:
            raise ValueError(f"max_patches_per_chunk must be >= 0 (0 = no chunking), got {self.max_patches_per_chunk}")
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened (C, p, p) patch."""
        return self.num_channels * self.patch_size * self.patch_size


PRUNE_REFERENCES = ("last_kept", "previous")
PRUNE_UNITS = ("normalized", "intensity")
PRUNE_STAGES = ("post_encoder", "pre_encoder", "pre_encoder_reuse")
MERGE_KINDS = ("concat", "average")
# Settings the processor and the model must share: the processor computes the keep mask and expands the text with
# them, the model recomputes the mask from them when called without one (and measures intensity-unit pruning with
# image_mean / image_std). config.json is their one source: OmniVMedProcessor.from_pretrained reads them from it.
PROCESSOR_SETTINGS = (
    "prune_threshold",
    "prune_reference",
    "prune_unit",
    "prune_keep_first_frame",
    "prune_min_tokens",
    "prune_min_tokens_pick",
    "image_mean",
    "image_std",
)


@strict
class OmniVMedConfig(PreTrainedConfig):
    r"""
    vision_config (`OmniVMedVisionConfig` or `dict`): the tower.
    text_config (`PreTrainedConfig` or `dict`): the LLM, any Qwen2 (Qwen2.5) or Qwen3 config.
    image_merge_size / video_merge_size (`int`): merge x merge patches become one LLM token; video_merge_size
        applies to videos and volumes (any item with more than one frame), image_merge_size to 2D images.
    merge_kind (`str`): `"concat"` (concatenate the merge x merge features, then the MLP; needs equal merge sizes)
        or `"average"` (average them first, as Hulu-Med / VideoLLaMA3 do).
    projector_hidden_act (`str`): activation between the two projector Linear layers.
    image_token_id: the placeholder each visual token replaces; vision_start/end and frame token ids delimit media
        and frames in the text, so the LLM can tell which slice/frame a visual token came from.
    prune_threshold (`float`): mean |delta| below which a merged token repeating its reference is dropped; 0 = off.
    prune_reference (`str`): `"last_kept"` (default; slow drift is refreshed) or `"previous"` (the paper).
    prune_unit (`str`): `"normalized"` (pixels as the tower sees them) or `"intensity"` (the [0, 1] scale).
    prune_stage (`str`): where pruning happens when the model answers (eval mode). `"pre_encoder_reuse"` (default
        for our own checkpoints; 3.8-26x faster volumes and videos end to end at real scale): the tower runs only the
        kept patches, but a kept patch still attends to every position of its frame: a pruned position's key and
        value at each layer are those computed where that position was last kept (it changed less than the threshold
        since). `"post_encoder"` (the paper's, and what converted Hulu-Med / VideoLLaMA3 checkpoints keep): run the
        tower on every patch, drop tokens after it, so each kept token is computed with its whole slice / frame in
        view. `"pre_encoder"`: drop the pruned tokens' patches before the tower, so kept patches see only kept patches
        (fastest; it loses the level-in-volume task). A model must answer with the stage it was trained with:
        EVIDENCE.md ("Claim 2 at the embedded default's budget", 10 seeds) found pre_encoder_reuse within the spread
        of post-encoder on every volume and video task when it trains and answers (2D −0.4 ± 0.5 points), but a
        post-encoder-trained model answering with it 1.3 ± 1.4 points lower on 3D + video (a warning says so).
    train_prune_stage (`str` or None): the stage in training mode (`model.train()`); None (default): `prune_stage`.
        Our saved checkpoints name it, so the stage a model was trained with travels with it.
    prune_keep_first_frame (`bool`): keep the first frame whole (ours); False reproduces the successor code, whose
        first frame keeps only `prune_min_tokens` tokens.
    prune_min_tokens / prune_min_tokens_pick: every frame keeps at least this many tokens, the most changed ones
        (`"most_changed"`) or the frame's first ones (`"first"`, VideoLLaMA3's rule).
    image_mean / image_std: the processor's normalisation, needed to measure pruning in intensity units.

    The pruning settings and image_mean / image_std (PROCESSOR_SETTINGS) are the processor's too: a processor loaded
    from a folder takes them from its config.json, so the text is expanded with the rule the model recomputes.
    """

    model_type = "omnivmed"
    sub_configs_defaults = {
        "vision_config": OmniVMedVisionConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_merge_size: int = 2
    video_merge_size: int = 2
    merge_kind: str = "concat"
    projector_hidden_act: str = "gelu"
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    frame_token_id: int = 151665
    prune_threshold: float = 0.1
    prune_reference: str = "last_kept"
    prune_unit: str = "normalized"
    prune_stage: str = "pre_encoder_reuse"
    train_prune_stage: str | None = None
    prune_keep_first_frame: bool = True
    prune_min_tokens: int = 1
    prune_min_tokens_pick: str = "most_changed"
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.image_mean = list(self.image_mean) if self.image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(self.image_std) if self.image_std is not None else [0.5, 0.5, 0.5]
        super().__post_init__(**kwargs)
        for name, value, allowed in (
            ("merge_kind", self.merge_kind, MERGE_KINDS),
            ("prune_reference", self.prune_reference, PRUNE_REFERENCES),
            ("prune_unit", self.prune_unit, PRUNE_UNITS),
            ("prune_stage", self.prune_stage, PRUNE_STAGES),
            ("train_prune_stage", self.train_prune_stage, (None, *PRUNE_STAGES)),
            ("prune_min_tokens_pick", self.prune_min_tokens_pick, ("most_changed", "first")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if min(self.image_merge_size, self.video_merge_size) < 1:
            raise ValueError("merge sizes must be >= 1")
        if self.merge_kind == "concat" and self.image_merge_size != self.video_merge_size:
            raise ValueError(
                "merge_kind='concat' feeds merge**2 concatenated patches to one projector, so image_merge_size and "
                f"video_merge_size must be equal (got {self.image_merge_size} and {self.video_merge_size}); "
                "use merge_kind='average' for different sizes"
            )
        if self.prune_threshold < 0:
            raise ValueError(f"prune_threshold must be >= 0, got {self.prune_threshold}")
        # pre-v5 Qwen configs keep tie_word_embeddings in the text config; v5 ties from the outer config
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def processor_settings(self) -> dict:
        """The settings `OmniVMedImageProcessor` takes from this config (see PROCESSOR_SETTINGS)."""
        return {name: getattr(self, name) for name in PROCESSOR_SETTINGS}

    def merge_size_for(self, num_frames: int) -> int:
        """Merge size of an item: 2D images use image_merge_size, volumes and videos video_merge_size."""
        return self.image_merge_size if num_frames == 1 else self.video_merge_size


__all__ = ["OmniVMedVisionConfig", "OmniVMedConfig", "PROCESSOR_SETTINGS"]
