"""The tiny Hub folder: complete, deterministic, and loadable through the Auto classes in a fresh process."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


def build(out: Path, seed: int = 0):
    subprocess.run(
        [sys.executable, str(ROOT / "build_omnivmed.py"), "--preset", "tiny", "--out", str(out), "--seed", str(seed)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny") / "omnivmed-tiny")


def test_folder_is_a_complete_hub_repo(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "configuration_omnivmed.py",
        "modeling_omnivmed.py",
        "processing_omnivmed.py",
        "pruning_omnivmed.py",
        "media_omnivmed.py",
        "collator_omnivmed.py",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
    ):
        assert required in names, f"{required} missing from {sorted(names)}"
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((tiny_dir / "config.json").read_text())
    for auto in ("AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoProcessor"):
        assert auto in config["auto_map"]
    card = (tiny_dir / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: image-text-to-text" in card and "library_name: transformers" in card


def test_same_seed_same_bytes(tiny_dir, tmp_path):
    again = build(tmp_path / "again" / tiny_dir.name, seed=0)
    other = build(tmp_path / "other" / tiny_dir.name, seed=1)

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    assert digest(again) == digest(tiny_dir)
    assert digest(other)["model.safetensors"] != digest(tiny_dir)["model.safetensors"]
    assert digest(other)["tokenizer.json"] == digest(tiny_dir)["tokenizer.json"]


LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from PIL import Image
    import numpy as np
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor)
    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    causal = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    image = Image.fromarray((np.arange(64 * 80 * 3) % 251).astype("uint8").reshape(64, 80, 3))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        causal_logits = causal(**inputs).logits
        hidden = base(**inputs).last_hidden_state
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.save({"logits": logits, "hidden": hidden, "causal": causal_logits, "inputs": dict(inputs)}, sys.argv[2])
    print(json.dumps({"classes": [type(config).__name__, type(processor).__name__, type(model).__name__,
                                  type(causal).__name__, type(base).__name__],
                      "generated": generated[0, inputs["input_ids"].shape[1]:].tolist()}))
    """
)


def test_loads_in_a_new_process_through_auto_classes_and_matches(tiny_dir, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_dir), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repo: the code must come from the folder
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classes"] == [
        "OmniVMedConfig",
        "OmniVMedProcessor",
        "OmniVMedForConditionalGeneration",
        "OmniVMedForConditionalGeneration",
        "OmniVMedModel",
    ]
    assert len(report["generated"]) >= 1
    saved = torch.load(tmp_path / "out.pt", weights_only=True)

    # the model that was saved, in this process, gives the same logits
    from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration

    model = OmniVMedForConditionalGeneration.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        logits = model(**saved["inputs"]).logits
    torch.testing.assert_close(saved["logits"], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saved["causal"], logits, atol=1e-5, rtol=1e-5)
    assert saved["hidden"].shape[:2] == logits.shape[:2]


READERS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, nibabel, pydicom.data
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
    try:
        import omnivmed  # the checkout's package shim must not be reachable: the code comes from the folder
        sys.exit("the repo is on sys.path")
    except ImportError:
        pass
    nifti = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    blocks = [{"type": "volume", "path": str(nifti)},
              {"type": "volume", "path": pydicom.data.get_testdata_file("CT_small.dcm")},
              {"type": "video", "video": np.zeros((3, 32, 32, 3), dtype=np.uint8)}]
    kinds = [processor.image_processor.to_media(b).kind for b in blocks]
    modules = sorted(m.split(".")[-1] for m, mod in sys.modules.items()
                     if m.split(".")[-1].endswith("_omnivmed") and getattr(mod, "__file__", None))
    print(json.dumps({"kinds": kinds, "modules": modules}))
    """
)


def test_every_remote_code_file_travels_and_the_readers_run_from_a_fresh_directory(tiny_dir, tmp_path):
    """A copy of the folder, a directory without the repo, no PYTHONPATH: NIfTI, DICOM and array readers all run from
    the files the folder carries (a code file missing from REMOTE_CODE_FILES fails the import here)."""
    from omnivmed_tools import REMOTE_CODE_FILES

    folder = tmp_path / "copy"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    script = tmp_path / "readers.py"
    script.write_text(READERS_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(folder)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kinds"] == ["volume", "volume", "video"]
    assert set(report["modules"]) == {name.removesuffix(".py") for name in REMOTE_CODE_FILES}


def test_loading_without_trust_remote_code_fails_with_transformers_message(tiny_dir, tmp_path):
    code = (
        "import sys; from transformers import AutoModelForImageTextToText\n"
        "AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tiny_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "trust_remote_code" in result.stderr


def test_default_config_is_the_1_5b_architecture():
    from omnivmed.configuration_omnivmed import OmniVMedConfig
    from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration

    config = OmniVMedConfig.from_pretrained(ROOT)
    assert config.vision_config.hidden_size == 1152 and config.vision_config.num_hidden_layers == 27
    assert config.vision_config.num_attention_heads == 16 and config.vision_config.patch_size == 14
    assert config.text_config.hidden_size == 1536 and config.text_config.num_hidden_layers == 28
    # pre-encoder reuse is the default, to train and to answer with (EVIDENCE.md, "Claim 2 at the embedded default's
    # budget"); the class default agrees with config.json, whose training stage is named (the class's None: the same)
    assert config.prune_stage == OmniVMedConfig().prune_stage == "pre_encoder_reuse"
    assert config.train_prune_stage == "pre_encoder_reuse" and OmniVMedConfig().train_prune_stage is None
    with torch.device("meta"):
        model = OmniVMedForConditionalGeneration(config)
    counts = {
        part: sum(p.numel() for p in getattr(model.model, part).parameters())
        for part in ("vision_tower", "projector", "language_model")
    }
    # SigLIP-so400m without its position table and pooling head; Qwen2.5-1.5B with tied embeddings
    assert counts == {"vision_tower": 412_147_440, "projector": 9_440_256, "language_model": 1_543_714_304}
    assert sum(p.numel() for p in model.parameters()) == 1_965_302_000


# ------------------------------------------------------------------------------------------------------------------
# Composing pretrained parts (issue #6): tiny SigLIP / Qwen2 checkpoints made with transformers' own classes
# ------------------------------------------------------------------------------------------------------------------


def _tiny_siglip_config(**vision):
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                image_size=56, **vision)  # fmt: skip


def _tiny_qwen2(vocab_size: int, tie: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, tie_word_embeddings=tie, max_position_embeddings=512,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def _tokenizer_without_media_tokens():
    """A Qwen2-like chat tokenizer that lacks <|vision_start|>, <|vision_end|>, <|image_pad|> and <|frame_sep|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from build_omnivmed import TINY_CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(TINY_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def pretrained_parts(tmp_path_factory):
    """A full SiglipModel (vision + text tower) and a tied Qwen2ForCausalLM whose tokenizer already has the media
    tokens (as Qwen2.5's has all but <|frame_sep|>; here all of them)."""
    from transformers import SiglipConfig, SiglipModel

    from build_omnivmed import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(
        vision_config=_tiny_siglip_config(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100),
    ))  # fmt: skip
    siglip.save_pretrained(root / "siglip")
    (root / "siglip" / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    _tiny_qwen2(vocab_size=1088, tie=True).save_pretrained(root / "qwen")
    build_tiny_tokenizer().save_pretrained(root / "qwen")
    return root


@pytest.fixture(scope="module")
def built_dir(pretrained_parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "omnivmed-composed"
    result = subprocess.run(
        [sys.executable, str(ROOT / "build_omnivmed.py"), "--vision", str(pretrained_parts / "siglip"),
         "--llm", str(pretrained_parts / "qwen"), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_pretrained_build_maps_every_siglip_tensor_and_prints_the_table(pretrained_parts, built_dir):
    from safetensors.torch import load_file

    out, stdout = built_dir
    source = load_file(pretrained_parts / "siglip" / "model.safetensors")
    built = load_file(out / "model.safetensors")
    dropped = {"vision_model.embeddings.position_embedding.weight"}
    vision_keys = [k for k in source if k.startswith("vision_model.") and not k.startswith("vision_model.head.")]
    assert len(vision_keys) == 2 + 2 * 16 + 2 + 1
    for key in vision_keys:
        if key in dropped:
            continue
        rest = key.removeprefix("vision_model.").replace("encoder.layers.", "layers.").replace("embeddings.", "")
        target = "model.vision_tower." + rest
        expected = source[key]
        if key.endswith("patch_embedding.weight"):
            assert expected.shape == (64, 3, 14, 14)
            expected = expected.reshape(64, 3 * 14 * 14)  # Conv2d (D, C, p, p) -> Linear over (C, p, p)
        assert torch.equal(built[target], expected), key
    assert not [k for k in built if "position_embedding" in k or ".head." in k]
    # the table: mapped, dropped (position table, pooling head, text tower) and new (projector) tensors
    for text in ("mapped", "absolute position table", "attention-pooling head", "text tower", "projector (fresh)"):
        assert text in stdout, text
    assert "62 mapped, 36 dropped, 4 newly initialised" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["image_mean"] == [0.5] * 3 and config["vision_config"]["hidden_size"] == 64
    assert config["vision_config"]["hidden_act"] == "gelu_pytorch_tanh" and config["tie_word_embeddings"] is True
    assert config["text_config"]["vocab_size"] == 1088  # every media token already fits: no resize
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [0.5] * 3


def test_pretrained_build_text_logits_equal_the_qwen2_model(pretrained_parts, built_dir):
    from transformers import Qwen2ForCausalLM

    from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration

    out, _ = built_dir
    qwen = Qwen2ForCausalLM.from_pretrained(pretrained_parts / "qwen").eval()
    model = OmniVMedForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[1, 40, 300, 77, 900, 2, 15]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, qwen(ids).logits, atol=1e-5, rtol=1e-5)


def test_pretrained_build_reloads_in_a_new_process_offline(built_dir, tmp_path):
    out, _ = built_dir
    card = (out / "README.md").read_text()
    assert "projector is random" in card and "pipeline_tag: image-text-to-text" in card
    # local parts are named, never located; their licences are unknown (no card), so the whole is `license: other`
    assert str(out.parent.parent) not in card and "siglip (a local folder)" in card
    assert "license: other" in card.split("---")[1] and "unknown (see its own model card)" in card
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "out.pt")],
        capture_output=True, text=True, cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["classes"][0] == "OmniVMedConfig"


def test_pretrained_build_standalone_tower_untied_llm_and_a_tokenizer_lacking_media_tokens(tmp_path):
    """A prefix-less SigLIP vision tower, an untied Qwen2 whose embedding has exactly len(tokenizer) rows and a
    tokenizer without the media tokens: they are added, the embeddings and lm_head grow (new rows = mean of the old
    ones), and old-vocabulary logits are unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, SiglipVisionConfig, SiglipVisionModel

    from build_omnivmed import build_pretrained

    torch.manual_seed(1)
    config = SiglipVisionConfig(**_tiny_siglip_config(hidden_act="gelu", layer_norm_eps=1e-5))
    tower = SiglipVisionModel(config)
    tower.save_pretrained(tmp_path / "siglip")  # transformers 5 writes it without the `vision_model.` prefix
    with safe_open(tmp_path / "siglip" / "model.safetensors", framework="pt") as f:
        assert "embeddings.patch_embedding.weight" in f.keys()
    tokenizer = _tokenizer_without_media_tokens()
    qwen = _tiny_qwen2(vocab_size=len(tokenizer), tie=False)
    qwen.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")

    out = build_pretrained(str(tmp_path / "siglip"), str(tmp_path / "qwen"), tmp_path / "out", seed=3)
    built_tok = AutoTokenizer.from_pretrained(out)
    added = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|frame_sep|>"]
    ids = built_tok.convert_tokens_to_ids(added)
    assert ids == list(range(len(tokenizer), len(tokenizer) + 4)) and built_tok.padding_side == "left"
    config = json.loads((out / "config.json").read_text())
    rows = -(-(len(tokenizer) + 4) // 64) * 64
    assert config["text_config"]["vocab_size"] == rows and config["tie_word_embeddings"] is False
    assert config["image_token_id"] == ids[2] and config["frame_token_id"] == ids[3]
    assert config["vision_config"]["hidden_act"] == "gelu" and config["vision_config"]["layer_norm_eps"] == 1e-5
    weights = load_file(out / "model.safetensors")
    old = qwen.state_dict()
    for name, source in (("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),
                         ("lm_head.weight", "lm_head.weight")):  # fmt: skip
        grown = weights[name]
        assert grown.shape == (rows, 64)
        assert torch.equal(grown[: len(tokenizer)], old[source])
        torch.testing.assert_close(grown[len(tokenizer) :], old[source].mean(0).expand(rows - len(tokenizer), -1))
    assert torch.equal(
        weights["model.vision_tower.patch_embedding.weight"],
        tower.embeddings.patch_embedding.weight.reshape(64, -1),
    )

    from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration

    model = OmniVMedForConditionalGeneration.from_pretrained(out).eval()
    text = torch.tensor([[1, 30, 200, 45, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=text).logits[..., : len(tokenizer)], qwen(text).logits, atol=1e-5, rtol=1e-5
        )


def test_siglip2_linear_patch_embedding_is_reordered_to_channel_first(tmp_path):
    """SigLIP2 embeds (p, p, C)-ordered patches with a Linear; the tower wants (C, p, p): same outputs after mapping."""
    from safetensors.torch import save_file
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    from build_omnivmed import TensorRef, _load_tensor

    torch.manual_seed(2)
    d, p = 8, 14
    linear = torch.nn.Linear(3 * p * p, d)
    save_file({"w": linear.weight.detach().contiguous()}, tmp_path / "w.safetensors")
    weight = _load_tensor(TensorRef(tmp_path, "w.safetensors", "w", (d, 3 * p * p), "F32"), "siglip2_patch", {})
    image = torch.rand(3, 2 * p, 3 * p)
    theirs = torch.from_numpy(convert_image_to_patches(image.numpy(), p)) @ linear.weight.T  # (6, d)
    ours = image.reshape(3, 2, p, 3, p).permute(1, 3, 0, 2, 4).reshape(6, -1) @ weight.T
    torch.testing.assert_close(ours, theirs)


def test_pretrained_build_errors_name_what_was_expected(pretrained_parts, tmp_path):
    import shutil as sh

    from safetensors.torch import load_file, save_file

    from build_omnivmed import BuildError, build_pretrained

    siglip, qwen = pretrained_parts / "siglip", pretrained_parts / "qwen"
    with pytest.raises(BuildError, match="not a SigLIP vision checkpoint"):
        build_pretrained(str(qwen), str(qwen), tmp_path / "a")
    with pytest.raises(BuildError, match="not a supported LLM"):
        build_pretrained(str(siglip), str(siglip), tmp_path / "b")
    empty = tmp_path / "empty"
    sh.copytree(siglip, empty, ignore=sh.ignore_patterns("*.safetensors"))
    with pytest.raises(BuildError, match="no model.safetensors"):
        build_pretrained(str(empty), str(qwen), tmp_path / "c")
    odd = tmp_path / "odd"
    sh.copytree(siglip, odd)
    tensors = load_file(siglip / "model.safetensors")
    tensors["vision_model.encoder.layers.0.adapter.weight"] = torch.zeros(2)
    save_file(tensors, odd / "model.safetensors")
    with pytest.raises(BuildError, match=r"unexpected tensors.*adapter"):
        build_pretrained(str(odd), str(qwen), tmp_path / "d")
    with pytest.raises(BuildError, match="--preset 1.5b expects"):
        build_pretrained(str(siglip), str(qwen), tmp_path / "e", preset="1.5b")
    with pytest.raises(BuildError, match="could not be fetched"):
        build_pretrained("no-such-org/no-such-siglip", str(qwen), tmp_path / "f")
    assert not any((tmp_path / n).exists() for n in "abcdef")  # nothing written on failure


def test_pretrained_build_pushes_the_folder(pretrained_parts, tmp_path, monkeypatch):
    import huggingface_hub

    from build_omnivmed import build_pretrained

    calls = []

    class FakeApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs.get("private")))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = build_pretrained(str(pretrained_parts / "siglip"), str(pretrained_parts / "qwen"), tmp_path / "pushed",
                           push_to_hub="someone/omnivmed-test", private=True)  # fmt: skip
    assert calls[0] == ("create_repo", "someone/omnivmed-test", True)
    assert calls[1][0] == "upload_folder" and "model.safetensors" in calls[1][2] and "config.json" in calls[1][2]
    assert 'from_pretrained("someone/omnivmed-test"' in (out / "README.md").read_text()


def test_pretrained_build_siglip2_tower_and_qwen3_llm(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Siglip2VisionConfig, Siglip2VisionModel

    from build_omnivmed import build_pretrained, build_tiny_tokenizer
    from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration

    torch.manual_seed(4)
    tower = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, patch_size=14, num_patches=16))  # fmt: skip
    tower.save_pretrained(tmp_path / "siglip2")
    qwen3 = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=1088, tie_word_embeddings=True, max_position_embeddings=512,
    )).eval()  # fmt: skip
    qwen3.save_pretrained(tmp_path / "qwen3")
    build_tiny_tokenizer().save_pretrained(tmp_path / "qwen3")

    out = build_pretrained(str(tmp_path / "siglip2"), str(tmp_path / "qwen3"), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen3"
    model = OmniVMedForConditionalGeneration.from_pretrained(out).eval()
    linear = tower.embeddings.patch_embedding.weight  # (D, p*p*C) over (p, p, C)-ordered patches
    expected = linear.detach().view(64, 14, 14, 3).permute(0, 3, 1, 2).reshape(64, -1)
    assert torch.equal(model.model.vision_tower.patch_embedding.weight, expected)
    ids = torch.tensor([[1, 40, 300, 77, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, qwen3(ids).logits, atol=1e-5, rtol=1e-5)
