"""convert_omnivmed.py: Hulu-Med / VideoLLaMA3 checkpoints -> OmniV-Med Hub folders, proven exact.

The Hulu-Med fixtures (shared/fixtures/hulumed-qwen{2,3}-tiny, see their README) hold tiny random checkpoints in the
published key layout with the public code's logits for raw uint8 images; transformers' own VideoLLaMA3 port is the
independent reference for the VideoLLaMA3 path.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert_omnivmed import ConversionError, convert, map_key  # noqa: E402
from omnivmed.media_omnivmed import Media  # noqa: E402
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration, patch_positions_from_grid  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedProcessor  # noqa: E402
from omnivmed.pruning_omnivmed import tokens_per_frame  # noqa: E402


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
QWEN2, QWEN3 = FIXTURES / "hulumed-qwen2-tiny", FIXTURES / "hulumed-qwen3-tiny"
needs_fixtures = pytest.mark.skipif(
    not (QWEN2.is_dir() and QWEN3.is_dir()),
    reason=f"the Hulu-Med reference fixtures are not at {FIXTURES} (shared/fixtures next to the repo)",
)
PLACEHOLDER = 500  # the fixtures' image placeholder id
ATOL = 1e-5


def case_names(folder):
    return [case["name"] for case in json.loads((folder / "cases.json").read_text())["cases"]]


def case_info(folder, name):
    return next(c for c in json.loads((folder / "cases.json").read_text())["cases"] if c["name"] == name)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both fixtures converted in compatibility mode (the default), and the qwen2 one with OmniV-Med's processing."""
    if not (QWEN2.is_dir() and QWEN3.is_dir()):
        pytest.skip(f"the Hulu-Med reference fixtures are not at {FIXTURES}")
    root = tmp_path_factory.mktemp("converted")
    return {
        "qwen2": convert("hulumed", str(QWEN2), root / "q2", tiny_tokenizer=True),
        "qwen3": convert("hulumed", str(QWEN3), root / "q3", tiny_tokenizer=True),
        "qwen2-default": convert("hulumed", str(QWEN2), root / "q2d", tiny_tokenizer=True, processing="omnivmed"),
    }


_LOADED = {}


def load(folder):
    if folder not in _LOADED:
        model = OmniVMedForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa").eval()
        model.config.image_token_id = PLACEHOLDER  # the fixtures' texts use their own placeholder id
        # trust_remote_code: our own folder; without it AutoTokenizer asks interactively (config auto_map)
        _LOADED[folder] = (model, OmniVMedProcessor.from_pretrained(folder, trust_remote_code=True))
    return _LOADED[folder]


def raw_media(cases, name, info):
    """The case's raw uint8 images as OmniV-Med media (float in [0, 1]: exactly u8 / 255)."""
    images = [cases[f"{name}.image{i}"].numpy() for i in range(info["n_images"])]
    if info["modal"] == "video":
        frames = np.stack(images).astype(np.float32) / 255.0
        return [Media(frames=frames, kind="video", source=name)]
    return [Media(frames=im[None].astype(np.float32) / 255.0, kind="image", source=f"{name}.{i}") for i, im in
            enumerate(images)]  # fmt: skip


def their_call_settings(info):
    """Per-call settings where a fixture case calls their processor unlike their inference code: one image case uses
    merge 2 for an image; the fixtures switch compression per case. The sizes come from the folder's compatibility
    mode (their budget rule), with no per-call pixel bounds."""
    merge = info["merge_size"]
    settings = {}
    if info["modal"] == "image" and merge != 1:
        settings["image_merge_size"] = merge
    if not info["token_compression"]:
        settings["prune_threshold"] = 0.0
    return settings


def fixture_text(cases, name, keep):
    """Their input_ids with the placeholders of pruned tokens removed (their text holds one per kept token)."""
    ids = cases[f"{name}.input_ids"]
    positions = (ids[0] == PLACEHOLDER).nonzero()[:, 0]
    assert positions.numel() == keep.numel()
    select = torch.ones(ids.shape[1], dtype=torch.bool)
    select[positions[~keep]] = False
    return ids[:, select]


def logits_for(model, cases, name, inputs):
    keep = inputs["visual_keep_mask"].bool()
    with torch.no_grad():
        out = model(
            input_ids=fixture_text(cases, name, keep),
            pixel_values=inputs["pixel_values"],
            grid_thw=inputs["grid_thw"],
            merge_sizes=inputs["merge_sizes"],
            patch_positions=inputs.get("patch_positions"),
            visual_keep_mask=keep,
        )
    return out.logits


def all_cases():
    params = []
    for label, folder in (("qwen2", QWEN2), ("qwen3", QWEN3)):
        for name in case_names(folder) if folder.is_dir() else []:
            params.append(pytest.param(label, name, id=f"{label}-{name}"))
    return params


# ------------------------------------------------------------------------------------------------------ exactness
@needs_fixtures
@pytest.mark.parametrize("label,name", all_cases())
def test_logits_from_raw_images_through_our_processor(converted, label, name):
    folder = QWEN2 if label == "qwen2" else QWEN3
    cases = load_file(folder / "cases.safetensors")
    info = case_info(folder, name)
    model, processor = load(converted[label])
    inputs = processor.image_processor(raw_media(cases, name, info), return_tensors="pt", **their_call_settings(info))

    assert inputs["grid_thw"].tolist() == cases[f"{name}.grid_sizes"].tolist()
    assert inputs["merge_sizes"].tolist() == cases[f"{name}.merge_sizes"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], cases[f"{name}.pixel_values"], atol=ATOL, rtol=0)
    if f"{name}.keep_mask" in cases:
        expected_keep = cases[f"{name}.keep_mask"].bool() if info["token_compression"] else torch.ones_like(
            cases[f"{name}.keep_mask"], dtype=torch.bool)  # fmt: skip
        assert torch.equal(inputs["visual_keep_mask"], expected_keep)
    logits = logits_for(model, cases, name, inputs)
    expected = cases[f"{name}.logits"]
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@needs_fixtures
@pytest.mark.parametrize("label", ["qwen2", "qwen3"])
def test_logits_from_their_pixel_values(converted, label):
    """The weight map alone (their stored pixels): every case, including the resized ones."""
    folder = QWEN2 if label == "qwen2" else QWEN3
    cases = load_file(folder / "cases.safetensors")
    model, _ = load(converted[label])
    for name in case_names(folder):
        info = case_info(folder, name)
        grid, merges = cases[f"{name}.grid_sizes"], cases[f"{name}.merge_sizes"]
        n_tokens = int((grid.prod(-1) // merges**2).sum())
        keep = torch.ones(n_tokens, dtype=torch.bool)
        if info["token_compression"]:
            keep = cases[f"{name}.keep_mask"].bool()
        inputs = {"pixel_values": cases[f"{name}.pixel_values"], "grid_thw": grid, "merge_sizes": merges,
                  "visual_keep_mask": keep}  # fmt: skip
        torch.testing.assert_close(logits_for(model, cases, name, inputs), cases[f"{name}.logits"], atol=ATOL, rtol=0)


@needs_fixtures
def test_pruned_video_compat_mode_and_default_mode(converted):
    cases = load_file(QWEN2 / "cases.safetensors")
    name = "video_m2_pruned"
    info = case_info(QWEN2, name)
    media = raw_media(cases, name, info)

    # compatibility: the successor's mask, from the config the converter wrote (no per-call pruning settings)
    model, processor = load(converted["qwen2"])
    compat = processor.image_processor(media, return_tensors="pt")
    expected_keep = cases[f"{name}.keep_mask"].bool()
    assert torch.equal(compat["visual_keep_mask"], expected_keep)
    # the model recomputes the same mask from pixels when called without one
    assert torch.equal(model.model.visual_keep_mask(compat["pixel_values"], compat["grid_thw"], compat["merge_sizes"]),
                       expected_keep)  # fmt: skip
    torch.testing.assert_close(logits_for(model, cases, name, compat), cases[f"{name}.logits"], atol=ATOL, rtol=0)
    compat_per_frame = tokens_per_frame(expected_keep, compat["grid_thw"], compat["merge_sizes"])[0]

    # OmniV-Med's default: first frame whole, reference = last kept version of each block
    default_model, default_processor = load(converted["qwen2-default"])
    cfg = default_model.config
    assert (cfg.prune_keep_first_frame, cfg.prune_reference, cfg.prune_threshold) == (True, "last_kept", 0.1)
    ours = default_processor.image_processor(media, return_tensors="pt")
    per_frame = tokens_per_frame(ours["visual_keep_mask"], ours["grid_thw"], ours["merge_sizes"])[0]
    blocks = (8 // 2) * (8 // 2)
    assert compat_per_frame[0] == 1 and per_frame[0] == blocks  # the first frame is kept whole
    assert per_frame[1:] == compat_per_frame[1:]  # here a moving square: the later frames agree
    assert sum(per_frame) - sum(compat_per_frame) == blocks - 1  # 15 more tokens: 26 instead of 11 of 96
    with torch.no_grad():
        out = default_model(
            input_ids=fixture_text(cases, name, ours["visual_keep_mask"]),
            pixel_values=ours["pixel_values"],
            grid_thw=ours["grid_thw"],
            merge_sizes=ours["merge_sizes"],
        )
    assert torch.equal(out.visual_keep_mask, ours["visual_keep_mask"]) and out.logits.shape[1] == 5 + sum(per_frame)


# ------------------------------------------------------------------------------------------------------ controls
@needs_fixtures
def test_negative_controls_break_the_match(converted):
    """The check is sharp: a wrong RoPE layout or a wrong merge grouping misses the reference by orders of magnitude."""
    cases = load_file(QWEN2 / "cases.safetensors")
    model, _ = load(converted["qwen2"])

    def stored(name):
        info = case_info(QWEN2, name)
        grid, merges = cases[f"{name}.grid_sizes"], cases[f"{name}.merge_sizes"]
        keep = cases[f"{name}.keep_mask"].bool() if info["token_compression"] else None
        if keep is None:
            keep = torch.ones(int((grid.prod(-1) // merges**2).sum()), dtype=torch.bool)
        positions = patch_positions_from_grid(grid, merges)
        return {"pixel_values": cases[f"{name}.pixel_values"], "grid_thw": grid, "merge_sizes": merges,
                "visual_keep_mask": keep, "patch_positions": positions}  # fmt: skip

    def error(name, inputs):
        return (logits_for(model, cases, name, inputs) - cases[f"{name}.logits"]).abs().max().item()

    # h and w swapped (square 8x8 grid, so the positions stay in range)
    inputs = stored("video_m2_pruned")
    assert error("video_m2_pruned", inputs) < ATOL
    inputs["patch_positions"] = inputs["patch_positions"][:, [0, 2, 1]]
    assert error("video_m2_pruned", inputs) > 1e-3

    # the frequencies on (t, w) instead of (h, w)
    rotary = model.model.vision_tower.rotary_emb
    dims = list(rotary.axes_dims)
    assert dims[0] == 0 and dims[1] == dims[2]
    rotary.axes_dims = [dims[1], 0, dims[2]]
    try:
        assert error("video_m2", stored("video_m2")) > 1e-3
    finally:
        rotary.axes_dims = dims

    # average over 1x4 strips instead of 2x2 blocks: the same patches and positions, in raster order
    inputs = stored("video_m2")
    t, h, w = inputs["grid_thw"][0].tolist()
    raster = torch.arange(t * h * w).view(t, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(-1)
    inputs["pixel_values"] = inputs["pixel_values"][raster]
    inputs["patch_positions"] = inputs["patch_positions"][raster]
    assert error("video_m2", inputs) > 1e-3


# ------------------------------------------------------------------------------------------------------ the folder
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder, fixture = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    cases = load_file(fixture + "/cases.safetensors")
    image = cases["image_m1.image0"].numpy()
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is this?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    inputs.pop("media_metadata")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        # the fixture's own text (placeholder 500) with this processor's pixels
        model.config.image_token_id = 500
        logits = model(input_ids=cases["image_m1.input_ids"], pixel_values=inputs["pixel_values"],
                       grid_thw=inputs["grid_thw"], merge_sizes=inputs["merge_sizes"]).logits
    print(json.dumps({"classes": [type(processor).__name__, type(model).__name__],
                      "generated": generated[0, inputs["input_ids"].shape[1]:].tolist(),
                      "max_diff": (logits - cases["image_m1.logits"]).abs().max().item()}))
    """
)


@needs_fixtures
def test_converted_folder_loads_through_auto_classes_in_a_new_process(converted, tmp_path):
    folder = converted["qwen2"]
    names = {p.name for p in folder.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                     "preprocessor_config.json", "tokenizer.json", "chat_template.jinja", "README.md",
                     "modeling_omnivmed.py", "configuration_omnivmed.py", "processing_omnivmed.py",
                     "pruning_omnivmed.py", "media_omnivmed.py", "compat_omnivmed.py"):  # fmt: skip
        assert required in names, f"{required} missing from {sorted(names)}"
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["rope_axes_dims"] == [0, 9, 9] and config["merge_kind"] == "average"
    assert (config["image_merge_size"], config["video_merge_size"], config["projector_hidden_act"]) == (1, 2, "gelu")
    assert (config["prune_reference"], config["prune_keep_first_frame"]) == ("previous", False)
    # the source runs its tower on every patch and drops tokens after it: pinned, whatever our class default becomes
    assert config["prune_stage"] == "post_encoder"
    assert "AutoModelForImageTextToText" in config["auto_map"]
    assert json.loads((converted["qwen3"] / "config.json").read_text())["text_config"]["model_type"] == "qwen3"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")

    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(QWEN2)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repo: the code comes from the folder
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classes"] == ["OmniVMedProcessor", "OmniVMedForConditionalGeneration"]
    assert len(report["generated"]) >= 1
    assert report["max_diff"] < ATOL


def test_cli_writes_card_metadata_and_sharded_output(tmp_path):
    if not QWEN2.is_dir():
        pytest.skip(f"the Hulu-Med reference fixtures are not at {FIXTURES}")
    # a sharded source (index + two files) and a small --max-shard-size: streamed in, streamed out
    source = tmp_path / "sharded-source"
    source.mkdir()
    shutil.copy(QWEN2 / "config.json", source / "config.json")
    shutil.copy(QWEN2 / "preprocessor_config.json", source / "preprocessor_config.json")
    tensors = load_file(QWEN2 / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, source / shard)
        weight_map.update({k: shard for k in part})
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "convert_omnivmed.py"), "--from", "hulumed", "--src", str(source), "--out",
         str(out), "--tiny-tokenizer", "--max-shard-size", "300KB", "--base-model", "example-org/source-model"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    converted_tensors = {}
    for shard in shards:
        assert (out / shard).stat().st_size < 300_000 + 10_000
        converted_tensors.update(load_file(out / shard))
    assert set(converted_tensors) == set(index["weight_map"])
    for key, value in tensors.items():
        target = map_key(key, "remote")
        expected = value.reshape(value.shape[0], -1) if target.endswith("patch_embedding.weight") else value
        assert torch.equal(converted_tensors[target], expected), key
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: apache-2.0" in front and "base_model: example-org/source-model" in front
    # the default: compatibility mode, the source's token compression and input path
    config = json.loads((out / "config.json").read_text())
    assert (config["prune_reference"], config["prune_keep_first_frame"]) == ("previous", False)
    assert json.loads((out / "processor_config.json").read_text())["image_processor"]["compat_mode"] == "hulumed"
    assert "compatibility mode `hulumed`" in card


# ------------------------------------------------------------------------------------------------------ refusals
def test_unknown_and_missing_keys_are_listed(tmp_path):
    if not QWEN2.is_dir():
        pytest.skip(f"the Hulu-Med reference fixtures are not at {FIXTURES}")
    source = tmp_path / "broken"
    source.mkdir()
    shutil.copy(QWEN2 / "config.json", source / "config.json")
    tensors = load_file(QWEN2 / "model.safetensors")
    del tensors["model.mm_projector.readout.2.bias"]
    tensors["model.vision_encoder.head.probe"] = torch.zeros(3)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(96)  # maps, but Qwen2 has no o_proj bias
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 96)
    save_file(tensors, source / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as error:
        convert("hulumed", str(source), out, tiny_tokenizer=True)
    message = str(error.value)
    assert "unknown keys" in message and "model.vision_encoder.head.probe" in message
    assert "model.layers.0.self_attn.o_proj.bias -> model.language_model.layers.0.self_attn.o_proj.bias" in message
    assert "missing keys" in message and "model.projector.linear_2.bias" in message
    assert "shape mismatches" in message and "model.layers.1.mlp.up_proj.weight (5, 96)" in message
    assert not out.exists()  # refused before anything was written

    (source / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors"):
        convert("hulumed", str(source), out, tiny_tokenizer=True)
    with pytest.raises(ConversionError, match="not videollama3"):
        convert("videollama3", str(QWEN2), out, tiny_tokenizer=True)
    with pytest.raises(ConversionError, match="no tokenizer"):
        convert("hulumed", str(QWEN2), out)


# ------------------------------------------------------------------------------------------------------ VideoLLaMA3
def tiny_videollama3(folder: Path, seed: int = 0):
    """A random transformers-native VideoLLaMA3 (the independent reference), with noisy norms and biases."""
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

    config = VideoLlama3Config(
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                         tie_word_embeddings=True),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=14),
        image_token_id=500, video_token_id=501,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = VideoLlama3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    model.set_attn_implementation("sdpa")
    return model


def their_compression_mask():
    """transformers' VideoLLaMA3 token-compression rule, taken from its source (its class needs torchvision, which
    cannot be installed beside the CPU torch build here)."""
    import ast

    import transformers

    path = Path(transformers.__file__).parent / "models" / "video_llama_3" / "video_processing_video_llama_3.py"
    tree = ast.parse(path.read_text())
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_get_compression_mask")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)
    return lambda *args: namespace["_get_compression_mask"](None, *args)


def test_videollama3_native_checkpoint_matches_transformers(tmp_path):
    reference = tiny_videollama3(tmp_path / "vl3")
    with safe_open(tmp_path / "vl3" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: the converter must not ask for it
    out = convert("videollama3", str(tmp_path / "vl3"), tmp_path / "out", tiny_tokenizer=True, compat_pruning=True)
    model = OmniVMedForConditionalGeneration.from_pretrained(out, attn_implementation="sdpa").eval()
    assert model.config.tie_word_embeddings and model.config.prune_keep_first_frame
    assert abs(model.config.prune_threshold - 0.1 / 255) < 1e-12 and model.config.image_mean == [0.5] * 3

    generator = torch.Generator().manual_seed(1)
    image_grid = torch.tensor([[1, 4, 6]])
    image = torch.randn(24, 588, generator=generator)
    # a 3-frame video whose second and third frames repeat some 2x2 blocks exactly
    video_grid = torch.tensor([[3, 4, 4]])
    frames = torch.randn(3, 4, 4 * 588, generator=generator)  # (t, blocks, 2x2 patches)
    frames[1, :2] = frames[0, :2]
    frames[2, 1:] = frames[1, 1:]
    video = frames.reshape(48, 588)
    merges = {"image": torch.tensor([1]), "video": torch.tensor([2])}

    theirs_keep = their_compression_mask()(video, video_grid, merges["video"])
    ours_keep = model.model.visual_keep_mask(video, video_grid, merges["video"])
    assert torch.equal(ours_keep, theirs_keep) and int(theirs_keep.sum()) == 4 + 2 + 1

    n_image, n_video = 24, int(theirs_keep.sum())
    text = [1, 2, 3]
    their_ids = torch.tensor([text + [500] * n_image + [7, 8] + [501] * n_video + [9]])
    with torch.no_grad():
        expected = reference(
            input_ids=their_ids, pixel_values=image, image_grid_thw=image_grid, image_merge_sizes=merges["image"],
            pixel_values_videos=video, video_grid_thw=video_grid, video_merge_sizes=merges["video"],
            video_compression_mask=theirs_keep,
        ).logits  # fmt: skip
        # one placeholder id for images and videos: the converted tokenizer's <|image_pad|>
        image_token = model.config.image_token_id
        assert image_token not in text + [7, 8, 9]
        ours = model(
            input_ids=torch.where((their_ids == 500) | (their_ids == 501), image_token, their_ids),
            pixel_values=torch.cat([image, video]),
            grid_thw=torch.cat([image_grid, video_grid]),
            merge_sizes=torch.cat([merges["image"], merges["video"]]),
            visual_keep_mask=torch.cat([torch.ones(n_image, dtype=torch.bool), ours_keep]),
        ).logits
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@needs_fixtures
def test_videollama3_remote_code_layout_is_the_hulumed_layout(tmp_path):
    """The original VideoLLaMA3 checkpoints (model_type videollama3_qwen2) store the same keys as Hulu-Med."""
    source = tmp_path / "vl3-remote"
    source.mkdir()
    config = json.loads((QWEN2 / "config.json").read_text())
    config.update(model_type="videollama3_qwen2", architectures=["Videollama3Qwen2ForCausalLM"])
    (source / "config.json").write_text(json.dumps(config))
    shutil.copy(QWEN2 / "model.safetensors", source / "model.safetensors")
    out = convert("videollama3", str(source), tmp_path / "out", tiny_tokenizer=True, compat_pruning=True)
    model = OmniVMedForConditionalGeneration.from_pretrained(out, attn_implementation="sdpa").eval()
    model.config.image_token_id = PLACEHOLDER
    # no preprocessor_config.json: VideoLLaMA3's 0.5 / 0.5; compression at 0.1 / 255 keeping the first frame whole
    assert model.config.image_mean == [0.5] * 3 and model.config.prune_keep_first_frame
    cases = load_file(QWEN2 / "cases.safetensors")
    name = "video_m2"
    inputs = {"pixel_values": cases[f"{name}.pixel_values"], "grid_thw": cases[f"{name}.grid_sizes"],
              "merge_sizes": cases[f"{name}.merge_sizes"], "visual_keep_mask": torch.ones(80, dtype=torch.bool)}
    torch.testing.assert_close(logits_for(model, cases, name, inputs), cases[f"{name}.logits"], atol=ATOL, rtol=0)


@needs_fixtures
@pytest.mark.parametrize("label,name", [("qwen2", "image_m2"), ("qwen2", "video_m2"), ("qwen3", "video_m2")])
def test_resized_cases_match_once_frames_are_resized_like_theirs(converted, label, name):
    """The resize kernel is what the resized cases hinge on: frames resized by PIL bicubic on uint8 outside the
    processor give the converted processor's pixels exactly (its resize_backend="pil"), and the float torch kernel
    does not reproduce their logits."""
    from PIL import Image

    folder = QWEN2 if label == "qwen2" else QWEN3
    cases = load_file(folder / "cases.safetensors")
    info = case_info(folder, name)
    model, processor = load(converted[label])
    settings = their_call_settings(info)
    planned = processor.image_processor(raw_media(cases, name, info), return_tensors="pt", **settings)
    t, gh, gw = planned["grid_thw"][0].tolist()
    size = (gw * 14, gh * 14)  # PIL takes (width, height)
    frames = [np.asarray(Image.fromarray(cases[f"{name}.image{i}"].numpy()).resize(size, Image.BICUBIC))
              for i in range(info["n_images"])]  # fmt: skip
    media = Media(frames=np.stack(frames).astype(np.float32) / 255.0, kind=info["modal"], source=name)
    inputs = processor.image_processor([media], return_tensors="pt", **settings)  # at the planned size: no resampling
    torch.testing.assert_close(inputs["pixel_values"], cases[f"{name}.pixel_values"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_for(model, cases, name, inputs), cases[f"{name}.logits"], atol=ATOL, rtol=0)
    assert torch.equal(planned["pixel_values"], inputs["pixel_values"])  # the converted processor resizes like theirs
    # the negative control: our float torch bicubic differs by up to ~7 % of full intensity, which the logits show
    float_resize = processor.image_processor(
        raw_media(cases, name, info), return_tensors="pt", resize_backend="torch", **settings
    )
    assert (logits_for(model, cases, name, float_resize) - cases[f"{name}.logits"]).abs().max() > ATOL


def test_source_tokenizer_gets_the_missing_media_tokens(tmp_path):
    """A Qwen2.5-like tokenizer in the source folder (no <|frame_sep|>): kept, the missing token added inside the
    checkpoint's padded embedding rows, and the config's token ids taken from it."""
    if not QWEN2.is_dir():
        pytest.skip(f"the Hulu-Med reference fixtures are not at {FIXTURES}")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    words = ["a", "b", "c", "user", "assistant", "system", "\n"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    source = tmp_path / "with-tokenizer"
    source.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(QWEN2 / name, source / name)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(source)
    out = convert("hulumed", str(source), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    processor = OmniVMedProcessor.from_pretrained(out, trust_remote_code=True)
    vocab = processor.tokenizer.get_vocab()
    assert config["frame_token_id"] == vocab["<|frame_sep|>"] == len(words) + len(specials)
    assert config["image_token_id"] == vocab["<|image_pad|>"] == len(words) + 5
    assert processor.chat_template == processor.tokenizer.chat_template and "<|image_pad|>" in processor.chat_template


def test_dtype_cast_is_recorded(tmp_path):
    if not QWEN2.is_dir():
        pytest.skip(f"the Hulu-Med reference fixtures are not at {FIXTURES}")
    out = convert("hulumed", str(QWEN2), tmp_path / "bf16", tiny_tokenizer=True, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    expected = load_file(QWEN2 / "model.safetensors")["model.norm.weight"].to(torch.bfloat16)
    assert torch.equal(tensors["model.language_model.norm.weight"], expected)


def test_compat_pruning_fills_a_static_frame_like_theirs(tmp_path):
    """A frame whose every block changed, but by less than the threshold: both keep min_tokens (1) of it; theirs keeps
    the first block, ours the most changed one."""
    tiny_videollama3(tmp_path / "vl3")
    out = convert("videollama3", str(tmp_path / "vl3"), tmp_path / "out", tiny_tokenizer=True, compat_pruning=True)
    model = OmniVMedForConditionalGeneration.from_pretrained(out).eval()
    grid, merges = torch.tensor([[2, 4, 4]]), torch.tensor([2])
    frames = torch.randn(2, 4, 4 * 588, generator=torch.Generator().manual_seed(0))
    frames[1] = frames[0] + 1e-6
    frames[1, 2] += 1e-5  # block 2 moved most, still far below 0.1 / 255
    video = frames.reshape(32, 588)
    theirs = their_compression_mask()(video, grid, merges)
    assert theirs.tolist() == [True] * 4 + [True, False, False, False]
    assert torch.equal(model.model.visual_keep_mask(video, grid, merges), theirs)
