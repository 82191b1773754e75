"""quantize_omnivmed.py (omnivmed_tools.quantize_int8): the int8 weight-only variant of a tiny checkpoint, checked
against torchao's own quantizer (the same int8 values and scales), against the float model its weights came from (a
bound derived from the rounding) and against transformers' loading (no quantization config, no quantization step)."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_

import omnivmed_tools
import quantize_omnivmed


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("int8")
    src = omnivmed_tools.build_tiny(base / "tiny", seed=0)
    out = base / "tiny-int8"
    quantize_omnivmed.main([str(src), str(out)])
    return src, out


def image_inputs(processor):
    import numpy as np
    from PIL import Image

    picture = Image.fromarray((omnivmed_tools.endoscopic_scene(56, seed=3) * 255).astype(np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                             {"type": "text", "text": "Which side is the lesion on?"}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    inputs.pop("media_metadata", None)
    return inputs


def test_the_folder_is_safetensors_only_with_its_code_processor_and_card(folders):
    src, out = folders
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert [n for n in names if n.endswith(".safetensors")]
    # everything but the weights and config is the source's, unchanged; the card says what was done
    for p in src.iterdir():
        if p.suffix == ".py" or p.name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert "## int8 weight-only variant" in (out / "README.md").read_text()
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "torchao" and quant["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"
    assert "quantization_config" not in json.loads((src / "config.json").read_text())


def test_loads_as_int8_without_quantizing_again(folders, monkeypatch):
    """from_pretrained(folder) rebuilds torchao's Int8Tensor from the safetensors: torchao's quantizer
    (Int8Tensor.from_hp) runs when the source is quantized at load, and never when the int8 folder is loaded."""
    src, out = folders
    calls = []
    from_hp = Int8Tensor.from_hp.__func__

    def counted(cls, *args, **kwargs):
        calls.append(1)
        return from_hp(cls, *args, **kwargs)

    monkeypatch.setattr(Int8Tensor, "from_hp", classmethod(counted))
    AutoModelForImageTextToText.from_pretrained(src, trust_remote_code=True,
                                                quantization_config=omnivmed_tools.int8_config())  # fmt: skip
    assert len(calls) > 10  # the counter sits on the quantizing path
    calls.clear()
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert calls == []
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = sorted(n for n, m in linear.items() if not omnivmed_tools.is_int8_linear(m))
    assert kept == ["lm_head"]  # the output head (tied to the embeddings here) keeps the source dtype
    for name, module in linear.items():
        if name != "lm_head":
            assert module.weight.qdata.dtype == torch.int8, name


def test_int8_values_are_torchaos_and_logits_stay_close_to_the_float_model(folders):
    src, out = folders
    source = AutoModelForImageTextToText.from_pretrained(src, trust_remote_code=True).eval()
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    assert model.dtype == source.dtype
    # reference: torchao's quantize_ applied to the source model in memory gives the same int8 values and scales
    reference = AutoModelForImageTextToText.from_pretrained(src, trust_remote_code=True).eval()
    quantize_(reference, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
              and fqn != "lm_head")  # fmt: skip
    ref = dict(reference.named_modules())
    for name, module in model.named_modules():
        if omnivmed_tools.is_int8_linear(module):
            assert torch.equal(module.weight.qdata, ref[name].weight.qdata), name
            assert torch.equal(module.weight.scale, ref[name].weight.scale), name
    # per output row, symmetric: |w - dequantized w| <= scale / 2 = max|w_row| / 254
    src_modules = dict(source.named_modules())
    for name, module in model.named_modules():
        if omnivmed_tools.is_int8_linear(module):
            w = src_modules[name].weight.detach()
            bound = w.abs().amax(dim=1, keepdim=True) / 254 + 1e-7
            assert ((module.weight.dequantize().to(w.dtype) - w).abs() <= bound).all(), name

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = image_inputs(processor)
    with torch.no_grad():
        want = source(**inputs).logits
        got = model(**inputs).logits
        # the same dequantized weights in plain float Linears: the int8 kernel computes x @ (q * s)^T up to rounding
        dequant = AutoModelForImageTextToText.from_pretrained(src, trust_remote_code=True).eval()
        dq = dict(dequant.named_modules())
        for name, module in model.named_modules():
            if omnivmed_tools.is_int8_linear(module):
                dq[name].weight.copy_(module.weight.dequantize().to(dq[name].weight.dtype))
        exact = dequant(**inputs).logits
    assert torch.allclose(got, exact, rtol=1e-4, atol=1e-4 * exact.abs().max())
    # The rounding error of a weight is uniform within +-scale/2, scale = max|w_row| / 127; for N(0, sigma) rows of
    # 32..512 entries max|w_row| ~ 3-3.5 sigma, so the error's std is ~0.8 % of sigma: each Linear's output moves by
    # ~0.8 % of its size, and the ~15 Linears on the path of a token (patch embedding, 2 tower and 2 LLM layers,
    # projector) add in quadrature to ~3 % RMS of the logits' spread about their mean (measured: 1.8 %, seeds 0 and 1).
    # 5 % leaves room for that estimate; a wrong scale, transposed or unsigned int8 data gives ~100 %.
    centred = want - want.mean(dim=-1, keepdim=True)
    assert (got - want).pow(2).mean().sqrt() < 0.05 * centred.pow(2).mean().sqrt()
    assert (got - want).abs().max() > 0  # the weights were really rounded


def test_generate_answers_from_the_int8_folder(folders):
    _, out = folders
    model, processor = omnivmed_tools.load_model(str(out), device="cpu")
    inputs = image_inputs(processor)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert ids.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert isinstance(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:])[0], str)


def test_bad_sources_are_refused_with_the_reason(folders, tmp_path):
    src, out = folders
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        quantize_omnivmed.main([str(tmp_path), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="another folder than its source"):
        quantize_omnivmed.main([str(src), str(src)])
    with pytest.raises(SystemExit, match="already quantized"):
        quantize_omnivmed.main([str(out), str(tmp_path / "again")])
    with pytest.raises(SystemExit, match="no eval.jsonl"):
        quantize_omnivmed.main([str(src), str(tmp_path / "out"), "--evaluate-default", str(tmp_path)])
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_evaluate_default_scores_source_and_variant_as_train_trl_does(folders, tmp_path, capsys):
    """--evaluate-default: both tables are data_omnivmed.evaluate_default's (train_trl's scorer) for each folder, and
    the printed change is int8 minus source per (task, input)."""
    import data_omnivmed

    src, _ = folders
    data = tmp_path / "data"
    paths = data_omnivmed.build_default_dataset(data, seed=0, size="small")
    quantize_omnivmed.main([str(src), str(tmp_path / "int8"), "--evaluate-default", str(data), "--json",
                            str(tmp_path / "eval.json")])  # fmt: skip
    reports = json.loads((tmp_path / "eval.json").read_text())
    for name, folder in (("source", src), ("int8", tmp_path / "int8")):
        direct = data_omnivmed.evaluate_default(folder, paths["eval"], data)
        assert reports[name]["table"] == direct["table"] and reports[name]["n"] == direct["n"], name
    printed = capsys.readouterr().out.split("int8 vs source, held-out accuracy:")[1]
    for before, after in zip(reports["source"]["table"], reports["int8"]["table"]):
        change = (after["accuracy"] - before["accuracy"]) * 100
        assert f"| {before['task']} | {before['kind']} | {before['n']} | {before['accuracy']:.1%} | " \
               f"{after['accuracy']:.1%} | {change:+.1f} pt |" in printed  # fmt: skip
