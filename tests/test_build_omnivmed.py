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
    with torch.device("meta"):
        model = OmniVMedForConditionalGeneration(config)
    counts = {
        part: sum(p.numel() for p in getattr(model.model, part).parameters())
        for part in ("vision_tower", "projector", "language_model")
    }
    # SigLIP-so400m without its position table and pooling head; Qwen2.5-1.5B with tied embeddings
    assert counts == {"vision_tower": 412_147_440, "projector": 9_440_256, "language_model": 1_543_714_304}
    assert sum(p.numel() for p in model.parameters()) == 1_965_302_000
