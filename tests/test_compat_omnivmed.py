"""compat_omnivmed.py: a converted folder, given raw media and a conversation with no per-call settings, gives the
logits of the source's own pipeline.

The reference pipeline is written here, independently of compat_omnivmed.py, from the published code (each rule
names its file; Hulu-Med at commit a0060ad, the version the shared fixtures were made with):
- sizes: image_processing_hulumed.py `simple_batched_resize` (one merge size in the call) / `batched_resize` (mixed);
  its PIL branch reads `image.size` as (height, width), so files and NIfTI slices (PIL in `mm_utils.load_images`)
  are sized with their sides exchanged;
- pixels: `_preprocess`: transformers' `resize` of a uint8 image (Pillow bicubic), rescale 1/255, normalise with the
  image processor's mean / std, patches in merge-block order;
- volumes: mm_utils.py `slice_nifti_to_images` (get_fdata, np.linspace slice indices, per-slice min-max, uint8);
- prompt: processor.py `DEFAULT_CHAT_TEMPLATE` (its output for these conversations, written as Python) and
  `_process_text_without_label` (each `<image>` -> the frame's tokens); README "Original Method" (3D = video, merge 2
  for video, 1 for images);
- compression: hulumed_arch.py `_get_compression_mask` and `_compress_visual_tokens` (placeholders of pruned tokens
  dropped);
- model: Hulu-Med's code is not shipped here; transformers' own `VideoLlama3ForConditionalGeneration` (the same tower,
  projector and LLM) with the Hulu-Med weights under its names stands in, and
  `test_reference_model_gives_the_fixture_logits` proves it gives the Hulu-Med code's logits stored in the fixtures.
The `<image>` placeholder is spelled `<|image_pad|>` on both sides (its embedding is replaced, never seen by the LLM).

VideoLLaMA3 (transformers 5.24 format): transformers' `VideoLlama3ImageProcessorPil`, `VideoLlama3Processor`'s
placeholder rule and `VideoLlama3ForConditionalGeneration` are the reference; its video processor imports torchvision,
which cannot be installed here, so videos are given at their target size (no resampling: pixel-identical on both
sides) and their patches and compression mask are built from video_processing_video_llama_3.py's rules.
"""

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert_omnivmed import convert  # noqa: E402
from omnivmed.compat_omnivmed import chat_template, read_hulumed_nifti, target_sizes  # noqa: E402
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration  # noqa: E402
from omnivmed.processing_omnivmed import IMAGE_TOKEN, OmniVMedProcessor  # noqa: E402


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
QWEN2, QWEN3 = FIXTURES / "hulumed-qwen2-tiny", FIXTURES / "hulumed-qwen3-tiny"
ATOL = 1e-5
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PATCH = 14


# --------------------------------------------------------------------------------------- Hulu-Med format checkpoints
def to_videollama3_key(key: str) -> str:
    """Hulu-Med's published key names -> transformers' VideoLLaMA3 names (the same modules)."""
    for old, new in (("model.vision_encoder.", "model.vision_model."), ("model.mm_projector.", "model.projector.")):
        if key.startswith(old):
            return new + key[len(old) :]
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "model.language_model." + key[len("model.") :]
    return key


def to_hulumed_key(key: str) -> str:
    for new, old in (("model.vision_encoder.", "model.vision_model."), ("model.mm_projector.", "model.projector."),
                     ("model.", "model.language_model.")):  # fmt: skip
        if key.startswith(old):
            return new + key[len(old) :]
    return key


TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
             "tie_word_embeddings")  # fmt: skip
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "patch_size", "layer_norm_eps", "hidden_act")  # fmt: skip


def reference_model(folder: Path, image_token_id: int, video_token_id: int):
    """transformers' VideoLLaMA3 carrying a Hulu-Med folder's weights."""
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

    cfg = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    text = {k: cfg[k] for k in TEXT_KEYS if k in cfg}
    text["model_type"] = "qwen3" if any(".q_norm." in k for k in state) else "qwen2"
    if text["model_type"] == "qwen2":
        text.pop("head_dim", None)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    vision = {k: cfg["vision_encoder_config"][k] for k in VISION_KEYS}
    config = VideoLlama3Config(text_config=text, vision_config=vision, image_token_id=image_token_id,
                               video_token_id=video_token_id,
                               tie_word_embeddings=cfg.get("tie_word_embeddings", False))  # fmt: skip
    model = VideoLlama3ForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict({to_videollama3_key(k): v for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or config.tie_word_embeddings)
    model.set_attn_implementation("sdpa")
    return model


def make_hulumed_checkpoint(folder: Path, seed: int, text_type: str, max_tokens: int, min_tokens: int,
                            compression: bool) -> Path:  # fmt: skip
    """A random checkpoint in Hulu-Med's published format (keys, config, preprocessor_config.json), made from a random
    transformers VideoLLaMA3 with noisy norms and biases."""
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

    text = dict(model_type=text_type, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1 if text_type == "qwen2" else 2, vocab_size=512,
                max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    if text_type == "qwen3":
        text["head_dim"] = 24  # not hidden / heads, as in the 14B checkpoint
    vision = dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH,
                  num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")  # fmt: skip
    torch.manual_seed(seed)
    model = VideoLlama3ForConditionalGeneration(VideoLlama3Config(text_config=text, vision_config=vision))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    folder.mkdir(parents=True)
    save_file({to_hulumed_key(k): v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    flat = {k: v for k, v in text.items() if k not in ("model_type", "rope_parameters")}
    config = dict(flat, rope_theta=10000.0, rope_scaling=None, model_type="hulumed_qwen2",
                  architectures=["HulumedQwen2ForCausalLM"], mm_projector_type="mlp2x_gelu", image_token_index=500,
                  use_token_compression=compression,
                  vision_encoder_config=dict(vision, model_type="hulumed_vision_encoder"))  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    pre = dict(image_processor_type="HulumedImageProcessor", image_mean=CLIP_MEAN.tolist(),
               image_std=CLIP_STD.tolist(), min_tokens=min_tokens, max_tokens=max_tokens, patch_size=PATCH,
               resample=3, rescale_factor=1 / 255)  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


# ------------------------------------------------------------------------------------------------ the reference
def ref_sizes(items, min_tokens, max_tokens):
    """image_processing_hulumed.py a0060ad: (height, width) per item of one call. items: (kind, frames u8, pil)."""
    merges = [1 if kind == "image" else 2 for kind, _, _ in items]
    dims = []
    for kind, frames, pil in items:
        if pil:  # `height, width = image.size` on a PIL image: (W, H)
            dims.append((frames.shape[2], frames.shape[1]))
        else:  # get_image_size on an array
            dims.append((frames.shape[1], frames.shape[2]))
    if len(set(merges)) == 1:  # simple_batched_resize
        factor = PATCH * merges[0]
        min_pixels, max_pixels = min_tokens * factor * factor, max_tokens * factor * factor
        num_images = sum(len(frames) if kind != "image" else 1 for kind, frames, _ in items)
        out = []
        for height, width in dims:
            h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
            if h_bar * w_bar > (max_pixels // num_images):
                beta = math.sqrt((height * width) / (max_pixels // num_images))
                h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
            if h_bar * w_bar < min_pixels:
                beta = math.sqrt(min_pixels / (height * width))
                h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
            out.append((h_bar, w_bar))
        return out, merges
    factors = [PATCH * m for m in merges]  # batched_resize
    total = sum(len(f) * math.ceil(h / fa) * math.ceil(w / fa) for (h, w), fa, (_, f, _) in zip(dims, factors, items))
    if total > max_tokens:
        beta = math.sqrt(total / max_tokens)
        sizes = [(math.floor(h / beta / fa) * fa, math.floor(w / beta / fa) * fa) for (h, w), fa in zip(dims, factors)]
        return sizes, merges
    return [(round(h / fa) * fa, round(w / fa) * fa) for (h, w), fa in zip(dims, factors)], merges


def ref_patches(frames_u8, height, width, merge, mean, std):
    """_preprocess: Pillow bicubic resize of each uint8 frame to (height, width), rescale, normalise, merge-block
    order, (C, p, p) flattened."""
    out = []
    for frame in frames_u8:
        image = Image.fromarray(frame).resize((width, height), Image.BICUBIC)
        x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(((x - mean) / std).transpose(2, 0, 1))
    x = np.stack(out)
    t, c = x.shape[:2]
    gh, gw = height // PATCH, width // PATCH
    x = x.reshape(t, c, gh // merge, merge, PATCH, gw // merge, merge, PATCH).transpose(0, 2, 5, 3, 6, 1, 4, 7)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(t * gh * gw, c * PATCH * PATCH)), [t, gh, gw]


def ref_compression(patches, grid, merge, threshold=0.1, min_tokens=1):
    """hulumed_arch.py a0060ad `_get_compression_mask` for a 'video' item (images: all kept)."""
    t, h, w = grid
    if t == 1:
        return torch.ones(h * w // merge**2, dtype=torch.bool)
    blocks = patches.view(t, (h // merge) * (w // merge), -1)
    diff = (blocks[1:] - blocks[:-1]).abs().mean(dim=-1) * 255
    diff = torch.cat([torch.full_like(diff[0:1], threshold + 1), diff], dim=0)
    mask = (diff / 255.0) > threshold
    mask[torch.nonzero(mask.sum(dim=1) < min_tokens)[:, 0], :min_tokens] = True
    return mask.flatten()


def ref_nifti_slices(path, num_slices, axis=2):
    """mm_utils.py a0060ad `slice_nifti_to_images`, as uint8 (T, X, Y, 3) frames (the PIL images' pixels)."""
    import nibabel as nib

    data = nib.load(str(path)).get_fdata()
    frames = []
    for index in np.linspace(0, data.shape[axis] - 1, num_slices, dtype=int):
        s = [slice(None)] * 3
        s[axis] = index
        plane = data[tuple(s)]
        if plane.max() > plane.min():
            plane = (plane - plane.min()) / (plane.max() - plane.min()) * 255.0
        frames.append(np.repeat(plane.astype(np.uint8)[..., None], 3, axis=-1))
    return np.stack(frames)


def ref_video_file(path, fps, max_frames):
    """mm_utils.py a0060ad `load_video` (no start / end): decord, every int(avg_fps / fps)-th frame from 0, or
    np.linspace over all frames when that exceeds max_frames."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    video_fps, total = reader.get_avg_fps(), len(reader)
    indices = list(range(0, total))[:: max(1, int(video_fps / fps))]
    if len(indices) > max_frames:
        indices = np.linspace(0, total - 1, max_frames, dtype=int)
    return reader.get_batch(indices).asnumpy()


def write_mp4(path, frames, rate):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def ref_prompt(messages, frame_tokens):
    """processor.py a0060ad DEFAULT_CHAT_TEMPLATE's output (add_generation_prompt=True) after its placeholder expansion:
    an image is `<image>\\n`, a video `<image>,` per frame but the last, then `<image>\\n`; each `<image>` becomes its
    frame's kept tokens (frame_tokens: per medium, per frame)."""
    media = iter(frame_tokens)
    out = ""
    for message in messages:
        out += f"<|im_start|>{message['role']}\n"
        content = message["content"]
        if isinstance(content, str):
            out += content
        else:
            for block in content:
                if block["type"] == "text":
                    out += block["text"]
                else:
                    out += ",".join(IMAGE_TOKEN * k for k in next(media)) + "\n"
        out += "<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


class HulumedReference:
    """The source pipeline for one conversation (their processor takes one conversation per call)."""

    def __init__(self, folder: Path, tokenizer, use_compression: bool):
        path = folder / "preprocessor_config.json"  # absent: their image processor's defaults
        pre = json.loads(path.read_text()) if path.is_file() else {}
        self.min_tokens, self.max_tokens = pre.get("min_tokens", 16), pre.get("max_tokens", 16384)
        self.mean = np.array(pre.get("image_mean", CLIP_MEAN), dtype=np.float32)
        self.std = np.array(pre.get("image_std", CLIP_STD), dtype=np.float32)
        self.tokenizer = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_id = tokenizer.convert_tokens_to_ids("<|frame_sep|>")  # any id the text never holds
        self.model = reference_model(folder, self.image_id, self.video_id)
        self.use_compression = use_compression

    def logits(self, messages, raw):
        """raw: per medium (kind, uint8 frames, held as PIL by the source)."""
        sizes, merges = ref_sizes(raw, self.min_tokens, self.max_tokens)
        images, videos, tokens, kinds = [], [], [], []
        for (kind, frames, _), (h, w), merge in zip(raw, sizes, merges):
            patches, grid = ref_patches(frames, h, w, merge, self.mean, self.std)
            keep = ref_compression(patches, grid, merge) if self.use_compression and kind != "image" else \
                torch.ones(grid[0] * grid[1] * grid[2] // merge**2, dtype=torch.bool)  # fmt: skip
            (images if kind == "image" else videos).append((patches, grid, merge, keep))
            tokens.append([int(k.sum()) for k in keep.view(grid[0], -1)])
            kinds.append(kind)
        ids = self.tokenizer(ref_prompt(messages, tokens))["input_ids"]
        # the video media's placeholders get the model's video id, in order of appearance
        positions = [i for i, t in enumerate(ids) if t == self.image_id]
        cursor = 0
        for kind, per_frame in zip(kinds, tokens):
            n = sum(per_frame)
            if kind != "image":
                for i in positions[cursor : cursor + n]:
                    ids[i] = self.video_id
            cursor += n
        assert cursor == len(positions)
        kwargs = {}
        if images:
            kwargs.update(pixel_values=torch.cat([p for p, *_ in images]),
                          image_grid_thw=torch.tensor([g for _, g, _, _ in images]),
                          image_merge_sizes=torch.tensor([m for _, _, m, _ in images]))  # fmt: skip
        if videos:
            kwargs.update(pixel_values_videos=torch.cat([p for p, *_ in videos]),
                          video_grid_thw=torch.tensor([g for _, g, _, _ in videos]),
                          video_merge_sizes=torch.tensor([m for _, _, m, _ in videos]),
                          video_compression_mask=torch.cat([k for *_, k in videos]))  # fmt: skip
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids]), **kwargs).logits, ids


# ----------------------------------------------------------------------------------------------------- the inputs
RNG = np.random.default_rng(7)


def u8(*shape):
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def moving_clip(frames, height, width):
    """A static background with a bright square moving across it: compression keeps the blocks it crosses."""
    base = u8(height, width, 3)
    clip = np.repeat(base[None], frames, axis=0)
    for f in range(frames):
        top, left = (7 * f) % max(1, height - 16), (11 * f) % max(1, width - 16)
        clip[f, top : top + 16, left : left + 16] = 255
    return clip


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import nibabel as nib

    root = tmp_path_factory.mktemp("media")
    png = root / "photo.png"
    Image.fromarray(u8(45, 70, 3)).save(png)  # non-square: the source's PIL size swap shows
    volume = (RNG.normal(size=(30, 44, 9)) * 300 + 40).astype(np.int16)
    image = nib.Nifti1Image(volume, np.diag([0.8, 0.8, 3.0, 1.0]))
    image.header.set_slope_inter(0.5, -1024)
    nib.save(image, root / "ct.nii.gz")
    write_mp4(root / "clip.mp4", moving_clip(35, 64, 96), rate=10)  # 3.5 s at 10 fps: frames 0, 10, 20, 30 at fps 1
    video16 = moving_clip(16, 84, 112)
    # frame 9: frame 8 with a faint change in a later block, below the threshold everywhere: compression keeps the
    # frame's FIRST token (their `mask[padding_ids, :min_tokens] = 1`), not its most changed one
    video16[9] = video16[8]
    video16[9, 5:15, 60:70] = np.clip(video16[9, 5:15, 60:70].astype(int) + 3, 0, 255).astype(np.uint8)
    return {
        "mp4": root / "clip.mp4",
        "png": png,
        "nii": root / "ct.nii.gz",
        "image_a": u8(120, 174, 3),
        "image_b": u8(33, 29, 3),
        "video4": moving_clip(4, 50, 64),
        "video16": video16,
        "video64": moving_clip(64, 60, 80),
    }


def case_conversations(media, num_slices, fps=1.0, max_frames=1800):
    """name -> (messages with our blocks, the source's raw media: (kind, uint8 frames, held as PIL))."""
    png = np.asarray(Image.open(media["png"]).convert("RGB"))
    slices = ref_nifti_slices(media["nii"], num_slices)

    def user(blocks, text):
        return [{"role": "user", "content": blocks + [{"type": "text", "text": text}]}]

    return {
        "one_image": (user([{"type": "image", "path": str(media["png"])}], "What is this?"),
                      [("image", png[None], True)]),
        "two_images": (user([{"type": "image", "image": media["image_a"]},
                             {"type": "image", "image": media["image_b"]}], "Compare them."),
                       [("image", media["image_a"][None], False), ("image", media["image_b"][None], False)]),
        "video4": (user([{"type": "video", "video": media["video4"]}], "Describe."),
                   [("video", media["video4"], False)]),
        "video16": (user([{"type": "video", "video": media["video16"]}], "Describe."),
                    [("video", media["video16"], False)]),
        "video64": (user([{"type": "video", "video": media["video64"]}], "Describe."),
                    [("video", media["video64"], False)]),
        "volume": (user([{"type": "volume", "path": str(media["nii"])}], "Report."), [("volume", slices, True)]),
        "video_file": (user([{"type": "video", "path": str(media["mp4"])}], "Describe."),
                       [("video", ref_video_file(media["mp4"], fps, max_frames), False)]),
        "image_and_video": (user([{"type": "image", "image": media["image_a"]},
                                  {"type": "video", "video": media["video4"]}], "Same patient?"),
                            [("image", media["image_a"][None], False), ("video", media["video4"], False)]),
    }  # fmt: skip


def our_logits(model, processor, conversations):
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    inputs.pop("media_metadata")
    with torch.no_grad():
        return model(**inputs).logits, inputs


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(label, Hulu-Med-format folder, converted folder, compression on): the two fixtures and two random ones."""
    root = tmp_path_factory.mktemp("compat")
    sources = []
    if QWEN2.is_dir() and QWEN3.is_dir():
        sources += [("fixture-qwen2", QWEN2), ("fixture-qwen3", QWEN3)]
    sources += [
        # a small budget: its sharing among the frames and images of a prompt decides the sizes of two_images,
        # video16, video64 and image_and_video (each alone would get more)
        ("random-qwen2-gqa", make_hulumed_checkpoint(root / "r1", seed=3, text_type="qwen2", max_tokens=96,
                                                     min_tokens=2, compression=True)),
        ("random-qwen3", make_hulumed_checkpoint(root / "r2", seed=4, text_type="qwen3", max_tokens=700,
                                                 min_tokens=16, compression=False)),
    ]  # fmt: skip
    out = {}
    for label, folder in sources:
        converted = convert("hulumed", str(folder), root / f"{label}-converted", tiny_tokenizer=True)
        compression = json.loads((folder / "config.json").read_text()).get("use_token_compression", False)
        out[label] = (folder, converted, compression)
    return out


_LOADED = {}


def loaded(checkpoints, label):
    if label not in _LOADED:
        source, converted, compression = checkpoints[label]
        model = OmniVMedForConditionalGeneration.from_pretrained(converted, attn_implementation="sdpa").eval()
        processor = OmniVMedProcessor.from_pretrained(converted, trust_remote_code=True)
        _LOADED[label] = (model, processor, HulumedReference(source, processor.tokenizer, compression))
    return _LOADED[label]


LABELS = ["fixture-qwen2", "fixture-qwen3", "random-qwen2-gqa", "random-qwen3"]
CASES = ["one_image", "two_images", "video4", "video16", "video64", "video_file", "volume", "image_and_video"]


def _need(checkpoints, label):
    if label not in checkpoints:
        pytest.fail(f"the Hulu-Med fixtures are missing from {FIXTURES}")


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("case", CASES)
def test_raw_media_through_the_saved_processor_give_the_source_logits(checkpoints, media, label, case):
    _need(checkpoints, label)
    model, processor, reference = loaded(checkpoints, label)
    ip = processor.image_processor
    messages, raw = case_conversations(media, ip.max_slices, ip.fps, ip.max_frames)[case]
    ours, inputs = our_logits(model, processor, messages)
    expected, expected_ids = reference.logits(messages, raw)
    # the same tokens (the source's video placeholders carry the reference model's video id)
    ids = inputs["input_ids"][0].tolist()
    assert [reference.image_id if t == reference.video_id else t for t in expected_ids] == ids
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("label", ["fixture-qwen2", "random-qwen2-gqa", "random-qwen3"])
def test_a_batch_mixing_media_gives_each_sample_the_source_logits(checkpoints, media, label):
    """The source runs one conversation per call (its token compression asserts batch size 1): each padded row of our
    batch must equal its sample alone through the source."""
    _need(checkpoints, label)
    model, processor, reference = loaded(checkpoints, label)
    cases = case_conversations(media, processor.image_processor.max_slices)
    names = ["image_and_video", "volume", "two_images", "video_file"]
    ours, inputs = our_logits(model, processor, [cases[n][0] for n in names])
    for row, name in enumerate(names):
        expected, _ = reference.logits(*cases[name])
        real = inputs["attention_mask"][row].bool()
        assert int(real.sum()) == expected.shape[1]
        torch.testing.assert_close(ours[row][real], expected[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("label", ["fixture-qwen2", "fixture-qwen3"])
def test_reference_model_gives_the_fixture_logits(checkpoints, label):
    """The stand-in for Hulu-Med's model code reproduces what that code computed (the fixtures' stored logits)."""
    _need(checkpoints, label)
    folder = checkpoints[label][0]
    _, _, reference = loaded(checkpoints, label)
    model = reference.model
    cases = load_file(folder / "cases.safetensors")
    for case in json.loads((folder / "cases.json").read_text())["cases"]:
        name = case["name"]
        ids = cases[f"{name}.input_ids"].clone()
        grid, merges = cases[f"{name}.grid_sizes"], cases[f"{name}.merge_sizes"]
        # their placeholder is 500; their random text may hold any other id, so the other medium gets an unused one
        unused = next(i for i in range(501, 512) if i not in ids[0].tolist())
        image_id, video_id = (500, unused) if case["modal"] == "image" else (unused, 500)
        for config in (model.config, model.model.config):
            config.image_token_id, config.video_token_id = image_id, video_id
        kwargs = {}
        if case["modal"] == "image":
            kwargs.update(pixel_values=cases[f"{name}.pixel_values"], image_grid_thw=grid, image_merge_sizes=merges)
        else:
            keep = cases[f"{name}.keep_mask"].bool() if case["token_compression"] else None
            if keep is not None:  # their text holds the placeholders of the kept tokens only
                select = torch.ones(ids.shape[1], dtype=torch.bool)
                select[(ids[0] == 500).nonzero()[:, 0][~keep]] = False
                ids = ids[:, select]
            kwargs.update(pixel_values_videos=cases[f"{name}.pixel_values"], video_grid_thw=grid,
                          video_merge_sizes=merges, video_compression_mask=keep)  # fmt: skip
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, **kwargs).logits
        finally:
            for config in (model.config, model.model.config):
                config.image_token_id, config.video_token_id = reference.image_id, reference.video_id
        torch.testing.assert_close(logits, cases[f"{name}.logits"], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ sizes and text
def test_the_issue_example_an_8_frame_480x640_clip_gets_17x23_tokens_per_frame(checkpoints):
    """Hulu-Med shares its budget among the frames present: 16384 tokens over 8 frames leaves 480 x 640 unscaled."""
    _, processor, _ = loaded(checkpoints, "random-qwen3")
    settings = dict(processor.image_processor._settings(), max_total_visual_tokens=16384, min_pixels=16 * 196)
    [(h, w, merge)] = target_sizes("hulumed", [("video", 8, 480, 640, False)], settings)
    assert (h // 28, w // 28, merge) == (17, 23, 2)
    assert ref_sizes([("video", np.zeros((8, 480, 640, 3), np.uint8), False)], 16, 16384)[0] == [(h, w)]
    # the budget follows the frame count: 64 frames of the same clip get smaller frames
    [(h64, w64, _)] = target_sizes("hulumed", [("video", 64, 480, 640, False)], settings)
    assert (h64, w64) == ref_sizes([("video", np.zeros((64, 480, 640, 3), np.uint8), False)], 16, 16384)[0][0]
    assert h64 * w64 < h * w


def test_two_images_share_the_budget_and_files_are_sized_like_the_source(checkpoints, media):
    _, processor, _ = loaded(checkpoints, "random-qwen2-gqa")  # max_tokens 96, min_tokens 2
    settings = processor.image_processor._settings()
    one = target_sizes("hulumed", [("image", 1, 300, 420, False)], settings)
    two = target_sizes("hulumed", [("image", 1, 300, 420, False)] * 2, settings)
    assert two[0][0] * two[0][1] < one[0][0] * one[0][1] <= 96 * 196
    # a PNG file: the source holds it as a PIL image and sizes it with its sides exchanged
    out = processor.image_processor([str(media["png"])], return_tensors="pt")
    [(h, w)], _ = ref_sizes([("image", np.zeros((1, 45, 70, 3), np.uint8), True)], 2, 96)
    assert out["media_metadata"][0]["resized_size"] == [h, w] and h > w  # a wide photo comes out tall, as theirs
    relative = processor.image_processor(["photo.png"], data_root=str(media["png"].parent), return_tensors="pt")
    assert relative["media_metadata"][0]["resized_size"] == [h, w]
    # the same pixels as an array: the source sizes arrays as they are
    array = processor.image_processor([np.asarray(Image.open(media["png"]))], kind="image", return_tensors="pt")
    [(ah, aw)], _ = ref_sizes([("image", np.zeros((1, 45, 70, 3), np.uint8), False)], 2, 96)
    assert array["media_metadata"][0]["resized_size"] == [ah, aw] and ah < aw


def test_rendered_prompt_is_the_source_chat_template_output(checkpoints):
    """Text and image conversations render as the source's template does (`<image>` spelled `<|image_pad|>`)."""
    _, processor, _ = loaded(checkpoints, "fixture-qwen2")
    conversation = [
        {"role": "system", "content": "You read scans."},
        {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "image", "image": "y.png"},
                                     {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "Why?"},
    ]  # fmt: skip
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == ref_prompt(conversation, [[1], [1]])  # one token per image marks the placeholder
    assert processor.chat_template == chat_template("hulumed") and "frame_sep" not in rendered
    # no system prompt is added where the conversation has none (their template adds none)
    assert processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # fmt: skip


def test_volume_and_video_readers_follow_the_source_and_ours_stays_available(checkpoints, media):
    _, processor, _ = loaded(checkpoints, "fixture-qwen2")
    n = processor.image_processor.max_slices
    assert n == 180  # mm_utils.load_images' nii_num_slices default
    volume = processor.image_processor.to_media(str(media["nii"]))
    expected = ref_nifti_slices(media["nii"], n)
    assert volume.frames.shape == expected.shape and np.array_equal(np.round(volume.frames * 255), expected)
    assert read_hulumed_nifti(media["nii"], 5, "sagittal").frames.shape == (5, 44, 9, 3)
    # a video file: every 10th frame of a 10 fps clip at fps 1, the decoded bytes as they are
    clip = processor.image_processor.to_media(str(media["mp4"]))
    assert clip.metadata["frame_indices"] == [0, 10, 20, 30] and clip.timestamps_s == [0.0, 1.0, 2.0, 3.0]
    assert np.array_equal(np.round(clip.frames * 255), ref_video_file(media["mp4"], 1.0, 1800))
    # OmniV-Med's processing explicitly: RAS reorientation, our slice sampling, frame separators
    ours = processor.image_processor.to_media(str(media["nii"]), compat_mode="off")
    assert ours.frames.shape[0] == 9 and ours.metadata.get("compat_reader") is None
    text = processor(text=f"<|vision_start|>{IMAGE_TOKEN}<|vision_end|>", media=[str(media["nii"])], compat_mode="off")
    assert processor.tokenizer.convert_tokens_to_ids("<|frame_sep|>") in text["input_ids"][0]


def test_omnivmed_processing_folder_keeps_our_rules(tmp_path):
    folder = make_hulumed_checkpoint(tmp_path / "src", seed=5, text_type="qwen2", max_tokens=160, min_tokens=4,
                                     compression=True)  # fmt: skip
    out = convert("hulumed", str(folder), tmp_path / "ours", tiny_tokenizer=True, processing="omnivmed")
    processor = OmniVMedProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.image_processor.compat_mode is None and "frame_sep" not in processor.chat_template
    assert "You are a helpful medical imaging assistant." in processor.apply_chat_template(
        [{"role": "user", "content": "Hi"}])  # fmt: skip
    assert json.loads((out / "config.json").read_text())["prune_reference"] == "last_kept"


# ------------------------------------------------------------------------------------------------ VideoLLaMA3
def tiny_native_videollama3(folder: Path, seed: int):
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

    config = VideoLlama3Config(
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
                         tie_word_embeddings=True),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=PATCH),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = VideoLlama3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    return model


def test_videollama3_native_folder_matches_transformers_processor_and_model(tmp_path):
    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import VideoLlama3ImageProcessorPil
    from transformers.models.video_llama_3.processing_video_llama_3 import VideoLlama3Processor

    reference = tiny_native_videollama3(tmp_path / "vl3", seed=11)
    out = convert("videollama3", str(tmp_path / "vl3"), tmp_path / "out", tiny_tokenizer=True)
    model = OmniVMedForConditionalGeneration.from_pretrained(out, attn_implementation="sdpa").eval()
    processor = OmniVMedProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.image_processor.compat_mode == "videollama3"
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    video_id = processor.tokenizer.convert_tokens_to_ids("<|frame_sep|>")
    reference.config.image_token_id, reference.config.video_token_id = image_id, video_id
    reference.model.config.image_token_id, reference.model.config.video_token_id = image_id, video_id
    reference.set_attn_implementation("sdpa")

    image, image2 = u8(61, 90, 3), u8(300, 170, 3)  # resized by transformers' own PIL image processor
    # a 4-frame clip already at its target size: transformers' video resize needs torchvision (not installable here).
    # Its default budget (size.longest_edge 28*28*768 for the clip, shortest_edge 128*28*28 per frame) leaves
    # 280 x 392 (10 x 14 tokens) as is for 4 frames
    settings = processor.image_processor._settings()
    frames, vh, vw = 4, 280, 392
    assert target_sizes("videollama3", [("video", frames, vh, vw, False)], settings) == [(vh, vw, 2)]
    clip = moving_clip(frames, vh, vw)
    clip[3] = clip[2]  # a repeated frame: compression keeps one token of it
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image2},
                                             {"type": "video", "video": clip},
                                             {"type": "text", "text": "Describe."}]}]  # fmt: skip
    ours, inputs = our_logits(model, processor, messages)

    image_inputs = VideoLlama3ImageProcessorPil()(images=[image, image2], return_tensors="pt")
    video = (clip.astype(np.float32) / 255 - 0.5) / 0.5  # IMAGENET_STANDARD mean / std, rescale 1/255
    gh, gw = vh // PATCH, vw // PATCH  # t, c, gh/m, m, p, gw/m, m, p -> t, gh/m, gw/m, m, m, c, p, p
    video = video.transpose(0, 3, 1, 2).reshape(frames, 3, gh // 2, 2, PATCH, gw // 2, 2, PATCH)
    video = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 2, 5, 3, 6, 1, 4, 7)).reshape(-1, 3 * PATCH**2))
    grid, merges = torch.tensor([[frames, gh, gw]]), torch.tensor([2])
    # video_processing_video_llama_3.py `_get_compression_mask`: read from its source (the module imports torchvision)
    import ast

    import transformers

    path = Path(transformers.__file__).parent / "models" / "video_llama_3" / "video_processing_video_llama_3.py"
    function = next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)
                    and n.name == "_get_compression_mask")  # fmt: skip
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)
    keep = namespace["_get_compression_mask"](None, video, grid, merges)
    video_inputs = {"video_grid_thw": grid, "video_merge_sizes": merges, "video_compression_mask": keep,
                    "video_metadata": [types.SimpleNamespace(fps=None, timestamps=[float(i) for i in range(frames)])]}
    this = types.SimpleNamespace(video_token="<|frame_sep|>", image_token=IMAGE_TOKEN,
                                 image_processor=types.SimpleNamespace(merge_size=1))  # fmt: skip
    video_text = VideoLlama3Processor.replace_video_token(this, video_inputs, 0)
    image_text = "".join(VideoLlama3Processor.replace_image_token(this, image_inputs, i) for i in range(2))
    prompt = f"<|im_start|>user\n{image_text}{video_text}Describe.<|im_end|>\n<|im_start|>assistant\n"
    ids = processor.tokenizer(prompt)["input_ids"]
    assert [image_id if t == video_id else t for t in ids] == inputs["input_ids"][0].tolist()
    torch.testing.assert_close(inputs["pixel_values"][: image_inputs["pixel_values"].shape[0]],
                               image_inputs["pixel_values"], atol=1e-6, rtol=0)  # fmt: skip
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids]), pixel_values=image_inputs["pixel_values"],
                             image_grid_thw=image_inputs["image_grid_thw"],
                             image_merge_sizes=image_inputs["image_merge_sizes"], pixel_values_videos=video,
                             video_grid_thw=grid, video_merge_sizes=merges,
                             video_compression_mask=keep).logits  # fmt: skip
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_pipeline_uses_the_folder_mode_without_flags(checkpoints, media):
    """transformers' image-text-to-text pipeline on a converted folder generates what apply_chat_template + generate
    give through the compatibility mode."""
    from transformers import pipeline

    _need(checkpoints, "random-qwen2-gqa")
    folder = checkpoints["random-qwen2-gqa"][1]
    model, processor, _ = loaded(checkpoints, "random-qwen2-gqa")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(media["png"])},
                                             {"type": "text", "text": "What is shown?"}]}]  # fmt: skip
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    assert pipe.processor.image_processor.compat_mode == "hulumed"
    out = pipe(text=messages, max_new_tokens=4, do_sample=False, return_full_text=False)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    inputs.pop("media_metadata")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out[0]["generated_text"] == expected


def test_videollama3_video_sizes_follow_transformers_rule(tmp_path):
    """Its video budget is the clip's, divided by the frames present (`size.longest_edge // videos.shape[1]`); the
    video processor module imports torchvision, so the rule is checked with the identical `smart_resize` of its PIL
    image processor module."""
    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import smart_resize

    tiny_native_videollama3(tmp_path / "vl3", seed=2)
    out = convert("videollama3", str(tmp_path / "vl3"), tmp_path / "out", tiny_tokenizer=True)
    settings = OmniVMedProcessor.from_pretrained(out, trust_remote_code=True).image_processor._settings()
    for frames in (4, 16, 64, 180):
        for height, width in ((480, 640), (1080, 1920), (96, 100)):
            expected = smart_resize(height, width, 28, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768 // frames)
            assert target_sizes("videollama3", [("video", frames, height, width, False)], settings) == [(*expected, 2)]


# ------------------------------------------------------------------------------------------------ VideoLLaMA3 original
# The original VideoLLaMA3 remote-code checkpoints (`videollama3_qwen2`: DAMO-NLP-SG/VideoLLaMA3-2B / -7B) convert with
# compat_mode "videollama3_remote". The reference below follows github.com/DAMO-NLP-SG/VideoLLaMA3 at commit 05cee23,
# inference/transformers_api/ (the Hub repos' remote code), written here from its rules:
# - sizes and pixels: image_processing_videollama3.py `simple_batched_resize` / `batched_resize` / `_preprocess`, the
#   same rules (PIL `.size` read as (height, width) included) as Hulu-Med's, so `ref_sizes` / `ref_patches` serve;
# - image files: processing_videollama3.py `load_images` (`Image.open(path).convert("RGB")`: PIL-held);
# - video files: processing_videollama3.py `Videollama3Qwen2Processor.load_video`: ffmpeg's `fps` filter (fps=1,
#   round=down; run here through PyAV's libavfilter, the filter itself), rgb24, timestamps `np.arange(start, start +
#   duration + 1 / fps, 1 / fps)[:n]`, `np.linspace` down to max_frames (default 128, `__init__`);
# - prompt: the chat template its processor takes from the tokenizer (its output written as Python in
#   `ref_vl3_prompt`), `process_text` (each `<image>` is one frame, expanded to all its tokens);
# - compression: modeling_videollama3.py `_get_compression_mask` (mean |delta| * 255 > 0.1, first frame kept whole,
#   `mask[padding_ids, :min_tokens] = 1`) and `_compress_visual_tokens` (the placeholders of compressed tokens are
#   removed from the ids);
# - model: transformers' VideoLlama3ForConditionalGeneration, transformers' port of this model code, with the weights
#   under its names (`reference_model`). Its equality with Hulu-Med's code is proven by
#   test_reference_model_gives_the_fixture_logits, and VideoLLaMA3's modeling_videollama3_encoder.py (05cee23) differs
#   from Hulu-Med's modeling_hulumed_encoder.py (a0060ad) only in the class names and in its sdpa path calling
#   `self.proj` (a module it does not have: that path raises; eager / flash-attention use `out_proj`); the projector is
#   Linear-GELU-Linear (`build_mlp`) and the LLM Qwen2ForCausalLM in both.
VL3_SYSTEM = ("You are VideoLLaMA3 created by Alibaba DAMO Academy, a helpful assistant to help people understand "
              "images and videos.")  # fmt: skip
VL3_RNG = np.random.default_rng(21)


def vl3_u8(*shape):
    return VL3_RNG.integers(0, 256, shape, dtype=np.uint8)


def make_vl3_checkpoint(folder: Path, seed: int, max_tokens: int, min_tokens: int, processor_config=None) -> Path:
    """A random checkpoint in the original VideoLLaMA3 format: Hulu-Med's keys and flat config (the same layout,
    test_convert_omnivmed.py) with VideoLLaMA3's model_type, image processor type and SigLIP mean / std."""
    make_hulumed_checkpoint(folder, seed=seed, text_type="qwen2", max_tokens=max_tokens, min_tokens=min_tokens,
                            compression=True)  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="videollama3_qwen2", architectures=["Videollama3Qwen2ForCausalLM"])
    config["vision_encoder_config"]["model_type"] = "videollama3_vision_encoder"
    (folder / "config.json").write_text(json.dumps(config))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(image_processor_type="Videollama3ImageProcessor", image_mean=[0.5] * 3, image_std=[0.5] * 3)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    if processor_config is not None:
        (folder / "processor_config.json").write_text(json.dumps(processor_config))
    return folder


def ref_vl3_video_file(path, fps, max_frames):
    """processing_videollama3.py 05cee23 `load_video`: (uint8 frames, timestamps)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base)  # ffmpeg.probe's stream start_time
        duration = container.duration / av.time_base  # ffmpeg.probe's format duration
        graph = av.filter.Graph()
        source, sink = graph.add_buffer(template=stream), graph.add("buffersink")
        fps_filter = graph.add("fps", f"fps={fps}:round=down")
        source.link_to(fps_filter)
        fps_filter.link_to(sink)
        graph.configure()
        frames = []
        for frame in [*container.decode(stream), None]:
            graph.push(frame)
            while True:
                try:
                    frames.append(graph.pull().to_ndarray(format="rgb24"))
                except (av.BlockingIOError, av.EOFError):
                    break
    frames = np.stack(frames)
    timestamps = np.arange(start, start + duration + 1 / fps, 1 / fps)[: len(frames)]
    if len(frames) > max_frames:
        indices = np.linspace(0, len(frames) - 1, max_frames, dtype=int)
        frames, timestamps = frames[indices], timestamps[indices]
    return frames, [float(t) for t in timestamps]


def ref_vl3_compression(patches, grid, merge, threshold=0.1, min_tokens=1):
    """modeling_videollama3.py 05cee23 `_get_compression_mask` for a 'video' item of t > 1 frames."""
    t, h, w = grid
    if t == 1:
        return torch.ones(h * w // merge**2, dtype=torch.bool)
    blocks = patches.view(t, (h // merge) * (w // merge), -1)
    diff = (blocks[1:] - blocks[:-1]).abs().mean(dim=-1) * 255
    diff = torch.cat([torch.full_like(diff[0:1], threshold + 1), diff], dim=0)
    mask = diff > threshold
    mask[torch.nonzero(mask.sum(dim=1) < min_tokens)[:, 0], :min_tokens] = True
    return mask.flatten()


def ref_vl3_prompt(messages, media, add_system_prompt=False, image_token=IMAGE_TOKEN):
    """The original checkpoints' chat template output, media blocks as its `_load_multimodal_data` leaves them (a
    video carries num_frames and, read from a file, timestamps); media: per medium (kind, num_frames, timestamps or
    None). `<image>` is spelled image_token."""
    media = iter(media)
    out = ""
    for index, message in enumerate(messages):
        if add_system_prompt and index == 0 and message["role"] != "system":
            out += f"<|im_start|>system\n{VL3_SYSTEM}<|im_end|>\n"
        out += f"<|im_start|>{message['role']}\n"
        content = message["content"]
        if isinstance(content, str):
            out += content + "<|im_end|>\n"
            continue
        for block in content:
            if block["type"] == "text":
                out += block["text"]
                continue
            kind, frames, timestamps = next(media)
            if kind == "image":
                out += image_token + "\n"
                continue
            for f in range(frames):
                if timestamps is not None:
                    out += "Time " + str(round(timestamps[f], 1)) + "s:"  # `| round(1) | string`
                out += image_token + ("," if f < frames - 1 else "\n")
        out += "<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


class Vl3RemoteReference:
    """The original VideoLLaMA3 pipeline for one conversation (its compression asserts batch size 1)."""

    def __init__(self, folder: Path, tokenizer):
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        self.min_tokens, self.max_tokens = pre.get("min_tokens", 16), pre.get("max_tokens", 16384)
        self.mean = np.array(pre["image_mean"], dtype=np.float32)
        self.std = np.array(pre["image_std"], dtype=np.float32)
        path = folder / "processor_config.json"
        proc = json.loads(path.read_text()) if path.is_file() else {}
        self.fps, self.max_frames = proc.get("fps", 1), proc.get("max_frames", 128)  # `__init__` defaults
        self.tokenizer = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_id = tokenizer.convert_tokens_to_ids("<|frame_sep|>")  # any id the text never holds
        self.model = reference_model(folder, self.image_id, self.video_id)

    def logits(self, messages, raw):
        """raw: per medium (kind, uint8 frames, PIL-held, timestamps or None)."""
        sizes, merges = ref_sizes([(k, f, pil) for k, f, pil, _ in raw], self.min_tokens, self.max_tokens)
        images, videos, keeps = [], [], []
        for (kind, frames, _, _), (h, w), merge in zip(raw, sizes, merges):
            patches, grid = ref_patches(frames, h, w, merge, self.mean, self.std)
            keep = ref_vl3_compression(patches, grid, merge) if kind != "image" else \
                torch.ones(grid[1] * grid[2] // merge**2, dtype=torch.bool)  # fmt: skip
            (images if kind == "image" else videos).append((patches, grid, merge, keep))
            keeps.append((kind, keep))
        prompt = ref_vl3_prompt(messages, [(k, len(f), ts) for k, f, _, ts in raw])
        # process_text: each <image> (one frame) -> all its tokens
        pieces = prompt.split(IMAGE_TOKEN)
        counts = []
        for (_, frames, _, _), (h, w), m in zip(raw, sizes, merges):
            counts += [(h // PATCH // m) * (w // PATCH // m)] * len(frames)
        assert len(pieces) == len(counts) + 1
        text = pieces[0] + "".join(IMAGE_TOKEN * n + piece for n, piece in zip(counts, pieces[1:]))
        ids = torch.tensor(self.tokenizer(text)["input_ids"])
        # _compress_visual_tokens: the placeholders of compressed tokens leave the ids; the video media's kept
        # placeholders get the reference model's video id
        image_positions = (ids == self.image_id).nonzero()[:, 0]
        mask = torch.cat([k for _, k in keeps])
        kinds = torch.cat([torch.full((len(k),), kind != "image") for kind, k in keeps])
        assert len(image_positions) == len(mask)
        ids[image_positions[kinds]] = self.video_id
        select = torch.ones(len(ids), dtype=torch.bool)
        select[image_positions[~mask]] = False
        ids = ids[select]
        kwargs = {}
        if images:
            kwargs.update(pixel_values=torch.cat([p for p, *_ in images]),
                          image_grid_thw=torch.tensor([g for _, g, _, _ in images]),
                          image_merge_sizes=torch.tensor([m for _, _, m, _ in images]))  # fmt: skip
        if videos:
            kwargs.update(pixel_values_videos=torch.cat([p for p, *_ in videos]),
                          video_grid_thw=torch.tensor([g for _, g, _, _ in videos]),
                          video_merge_sizes=torch.tensor([m for _, _, m, _ in videos]),
                          video_compression_mask=torch.cat([k for *_, k in videos]))  # fmt: skip
        with torch.no_grad():
            return self.model(input_ids=ids[None], **kwargs).logits, ids.tolist()


@pytest.fixture(scope="module")
def vl3_media(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl3-media")
    png = root / "photo.png"
    Image.fromarray(vl3_u8(50, 83, 3)).save(png)  # non-square: the PIL size order shows
    rng_state = RNG.bit_generator.state  # moving_clip draws from the module RNG: keep the Hulu-Med tests' draws
    # 40 frames at 10 fps (4 s): fps=1, round=down picks frames 9, 19, 29, 39 (the last of each second)
    write_mp4(root / "clip4.mp4", moving_clip(40, 64, 96), rate=10)
    # 64 frames at 4 fps (16 s): 16 frames at fps 1 (max_frames 8 in one checkpoint takes 8 of them)
    write_mp4(root / "clip16.mp4", moving_clip(64, 56, 84), rate=4)
    video4 = moving_clip(4, 50, 64)
    video16 = moving_clip(16, 84, 112)
    video64 = moving_clip(64, 60, 80)
    RNG.bit_generator.state = rng_state
    video16[9] = video16[8]  # a static frame: compression keeps its FIRST token only
    return {"png": png, "mp4_4": root / "clip4.mp4", "mp4_16": root / "clip16.mp4", "image_a": vl3_u8(120, 174, 3),
            "image_b": vl3_u8(33, 29, 3), "video4": video4, "video16": video16, "video64": video64}  # fmt: skip


def vl3_cases(media, fps, max_frames):
    """name -> (messages, the source's raw media: (kind, uint8 frames, PIL-held, timestamps or None))."""
    png = np.asarray(Image.open(media["png"]).convert("RGB"))
    clip4, times4 = ref_vl3_video_file(media["mp4_4"], fps, max_frames)
    clip16, times16 = ref_vl3_video_file(media["mp4_16"], fps, max_frames)

    def user(blocks, text):
        return [{"role": "user", "content": blocks + [{"type": "text", "text": text}]}]

    return {
        "one_image": (user([{"type": "image", "path": str(media["png"])}], "What is this?"),
                      [("image", png[None], True, None)]),
        "two_images": (user([{"type": "image", "image": media["image_a"]},
                             {"type": "image", "image": media["image_b"]}], "Compare them."),
                       [("image", media["image_a"][None], False, None),
                        ("image", media["image_b"][None], False, None)]),
        "video4": (user([{"type": "video", "video": media["video4"]}], "Describe."),
                   [("video", media["video4"], False, None)]),
        "video16": (user([{"type": "video", "video": media["video16"]}], "Describe."),
                    [("video", media["video16"], False, None)]),
        "video64": (user([{"type": "video", "video": media["video64"]}], "Describe."),
                    [("video", media["video64"], False, None)]),
        "video4_file": (user([{"type": "video", "path": str(media["mp4_4"])}], "Describe."),
                        [("video", clip4, False, times4)]),
        "video16_file": (user([{"type": "video", "path": str(media["mp4_16"])}], "When does it move?"),
                         [("video", clip16, False, times16)]),
        "image_and_video": (user([{"type": "image", "image": media["image_a"]},
                                  {"type": "video", "path": str(media["mp4_4"])}], "Same scene?"),
                            [("image", media["image_a"][None], False, None), ("video", clip4, False, times4)]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def vl3_checkpoints(tmp_path_factory):
    """label -> (converted model, its saved processor, the source reference)."""
    root = tmp_path_factory.mktemp("vl3")
    sources = {
        # a small budget shared by the media of a prompt (two images, 16 frames, image + video)
        "vl3-small-budget": make_vl3_checkpoint(root / "a", seed=8, max_tokens=96, min_tokens=2),
        # the Hub defaults' min_tokens; a processor_config.json that lowers max_frames
        "vl3-max-frames-8": make_vl3_checkpoint(root / "b", seed=9, max_tokens=700, min_tokens=16,
                                                processor_config={"fps": 1, "max_frames": 8}),
    }  # fmt: skip
    out = {}
    for label, folder in sources.items():
        converted = convert("videollama3", str(folder), root / f"{label}-converted", tiny_tokenizer=True)
        model = OmniVMedForConditionalGeneration.from_pretrained(converted, attn_implementation="sdpa").eval()
        processor = OmniVMedProcessor.from_pretrained(converted, trust_remote_code=True)
        out[label] = (model, processor, Vl3RemoteReference(folder, processor.tokenizer))
    return out


VL3_LABELS = ["vl3-small-budget", "vl3-max-frames-8"]
VL3_CASES = ["one_image", "two_images", "video4", "video16", "video64", "video4_file", "video16_file",
             "image_and_video"]


def _same_ids(ours, expected, reference):
    assert [reference.image_id if t == reference.video_id else t for t in expected] == ours


@pytest.mark.parametrize("label", VL3_LABELS)
@pytest.mark.parametrize("case", VL3_CASES)
def test_videollama3_original_raw_media_give_the_source_logits(vl3_checkpoints, vl3_media, label, case):
    model, processor, reference = vl3_checkpoints[label]
    assert processor.image_processor.compat_mode == "videollama3_remote"
    messages, raw = vl3_cases(vl3_media, reference.fps, reference.max_frames)[case]
    ours, inputs = our_logits(model, processor, messages)
    expected, expected_ids = reference.logits(messages, raw)
    _same_ids(inputs["input_ids"][0].tolist(), expected_ids, reference)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("label", VL3_LABELS)
def test_videollama3_original_batch_mixing_media_gives_each_sample_the_source_logits(vl3_checkpoints, vl3_media,
                                                                                     label):  # fmt: skip
    model, processor, reference = vl3_checkpoints[label]
    cases = vl3_cases(vl3_media, reference.fps, reference.max_frames)
    names = ["image_and_video", "two_images", "video16", "one_image", "video16_file"]
    ours, inputs = our_logits(model, processor, [cases[n][0] for n in names])
    for row, name in enumerate(names):
        expected, expected_ids = reference.logits(*cases[name])
        real = inputs["attention_mask"][row].bool()
        _same_ids(inputs["input_ids"][row][real].tolist(), expected_ids, reference)
        torch.testing.assert_close(ours[row][real], expected[0], atol=ATOL, rtol=0)


def test_videollama3_original_rendered_prompt_is_the_source_template_output(vl3_checkpoints, vl3_media):
    _, processor, reference = vl3_checkpoints["vl3-small-budget"]
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "image", "image": "y.png"},
                                     {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "Why?"},
    ]  # fmt: skip
    media = [("image", 1, None), ("image", 1, None)]  # an image's `<image>` stands for all its tokens there
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == ref_vl3_prompt(conversation,
                                                                                                     media)
    # its processor's default leaves the system prompt out; asked for, it comes before the first (non-system) message
    assert processor.apply_chat_template(conversation, add_generation_prompt=True, add_system_prompt=True) == \
        ref_vl3_prompt(conversation, media, add_system_prompt=True)  # fmt: skip
    with_system = [{"role": "system", "content": "Be brief."}] + conversation
    assert processor.apply_chat_template(with_system, add_generation_prompt=True, add_system_prompt=True) == \
        ref_vl3_prompt(with_system, media, add_system_prompt=True)  # fmt: skip
    # a video file: the whole expanded prompt (timestamps from the fps-1 clock, frames joined by ",", then "\n")
    messages, raw = vl3_cases(vl3_media, reference.fps, reference.max_frames)["video4_file"]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    expected = ref_vl3_prompt(messages, [("video", 4, raw[0][3])])
    assert raw[0][3] == [0.0, 1.0, 2.0, 3.0]
    # the placeholders' counts are the logits tests' business; the text around them must be the template's
    assert text.replace(IMAGE_TOKEN, "") == expected.replace(IMAGE_TOKEN, "")
    assert "Time 0.0s:" in text and "Time 3.0s:" in text


def test_videollama3_original_video_reader_follows_the_fps_filter(vl3_checkpoints, vl3_media):
    """The frames the reader picks are the ones libavfilter's fps filter (round=down) outputs, pixel for pixel."""
    _, processor, reference = vl3_checkpoints["vl3-small-budget"]
    clip = processor.image_processor.to_media(str(vl3_media["mp4_16"]))
    frames, times = ref_vl3_video_file(vl3_media["mp4_16"], 1, 128)
    assert clip.metadata["frame_indices"] == list(range(3, 64, 4)) and clip.timestamps_s == times
    assert np.array_equal(np.round(clip.frames * 255), frames)
    # a processor_config.json's max_frames: evenly spaced among the sampled frames, timestamps with them
    _, processor8, _ = vl3_checkpoints["vl3-max-frames-8"]
    clip8 = processor8.image_processor.to_media(str(vl3_media["mp4_16"]))
    assert clip8.timestamps_s == [times[i] for i in np.linspace(0, 15, 8, dtype=int)]
    # frames given as an array are never sampled by the source, whatever max_frames says
    assert processor8.image_processor.to_media(vl3_media["video16"], kind="video").frames.shape[0] == 16


def test_videollama3_original_omnivmed_processing_stays_available(tmp_path):
    folder = make_vl3_checkpoint(tmp_path / "src", seed=5, max_tokens=160, min_tokens=4)
    out = convert("videollama3", str(folder), tmp_path / "ours", tiny_tokenizer=True, processing="omnivmed")
    processor = OmniVMedProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.image_processor.compat_mode is None and "Time" not in processor.chat_template
    assert json.loads((out / "config.json").read_text())["prune_reference"] == "last_kept"
