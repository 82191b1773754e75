"""bench/bench_realscale.py --quick and bench/gpu_check.py --cpu-quick run end to end at tiny shapes (smoke tests of
the scripts: their timings are not checked), and the pieces their numbers rest on agree with references: the FLOP
count with the model's own parameter count, Qwen2.5-VL's visual token count with ours, the 7B shape with Qwen2.5-7B's
published size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_realscale  # noqa: E402
import build_omnivmed  # noqa: E402
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return build_omnivmed.build_tiny_tokenizer()


def test_quick_run_compares_every_arm_at_equal_visual_tokens(tmp_path):
    out_json, out_md = tmp_path / "rs.json", tmp_path / "rs.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_realscale.py"), "--quick", "--media", "image,volume",
         "--json", str(out_json), "--markdown", str(out_md)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out_json.read_text())["results"]["tiny"]
    assert set(results) == {"image", "volume"}
    assert set(results["image"]) == {"off", "qwen"} and set(results["volume"]) == {"off", "post", "pre", "reuse", "qwen"}
    for arms in results.values():
        off, qwen = arms["off"][0], arms["qwen"][0]
        # Qwen2.5-VL counted its own placeholder tokens: the same visual tokens and sequence length as ours unpruned
        assert qwen["visual_tokens"] == off["visual_tokens"] == off["all_visual_tokens"]
        assert qwen["seq_len"] == off["seq_len"]
        for r in (r for rs in arms.values() for r in rs):
            assert r["ttft_s"] > 0 and r["peak_rss"] > 2**20
    vol = results["volume"]
    # the MNI slices differ little: default pruning drops tokens, and both stages see the same keep mask
    assert vol["post"][0]["visual_tokens"] == vol["pre"][0]["visual_tokens"] < vol["off"][0]["visual_tokens"]
    assert vol["reuse"][0]["visual_tokens"] == vol["pre"][0]["visual_tokens"]
    text = out_md.read_text()
    assert "volume: pruning pre-encoder-reuse vs off, end to end (TTFT) [default]" in text  # config.json's stage
    assert "volume: pruning post-encoder vs off, end to end (TTFT) [default]" not in text
    assert "ours unpruned vs Qwen2.5-VL at equal visual tokens" in text
    assert "| torch threads per arm | 1 |" in text


def test_7b_shape_is_qwen25_7b(tokenizer):
    """Parameter count of the 7B shape's LLM on the meta device == Qwen2.5-7B's published 7.61 B."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, text = bench_realscale.shape_configs("7B", tokenizer)
    config = AutoConfig.for_model(**text)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 7.62  # 7,615,616,512 (model card: 7.61B)


def test_llm_flops_count_every_weight_matmul(tokenizer):
    """The MFU numerator: 2 x (the decoder's Linear weights + lm_head) per token, checked against the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, text = bench_realscale.shape_configs("1.5B", tokenizer)
    config = AutoConfig.for_model(**text)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    tokens = 10
    assert gpu_check.llm_flops(config, tokens, seq_len=1) - 2 * config.num_hidden_layers * config.hidden_size * tokens \
        == 2 * linear * tokens  # fmt: skip


def test_gpu_check_cpu_quick_runs_every_check(tmp_path):
    code = gpu_check.main(["--cpu-quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 0, report
    assert report["device"].startswith("CPU")
    assert checks["sdpa (bf16) vs the fp32 eager tower"]["status"] == "pass"
    assert checks["sdpa (bf16) vs the fp32 eager tower, pre_encoder_reuse"]["status"] == "pass"
    flash = checks["flash-attention varlen == sdpa"]
    assert flash["status"] == "skipped" and flash["measured"] == "no CUDA device"
    splits = [c for n, c in checks.items() if n.startswith("device split")]
    assert len(splits) == 6 and all(c["status"] == "pass" for c in splits)
    assert any("tokens/s" in c["measured"] for n, c in checks.items() if n.startswith("generation"))
    assert sum("MFU" in n for n in checks) == 2
    assert "## GPU check on CPU" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_reports_a_failing_check_as_a_row(tmp_path, monkeypatch):
    """A check that raises becomes an error row (the other checks still run) and the exit code says so."""

    def broken(device, quick):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_check, "check_generation", broken)
    code = gpu_check.main(["--cpu-quick", "--only", "flash_varlen,generation", "--out", str(tmp_path)])
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert code == 1
    assert [c["status"] for c in checks] == ["pass", "pass", "skipped", "error"]
    assert "kernel exploded" in checks[-1]["measured"]


def test_run_all_keeps_the_real_scale_section(tmp_path, monkeypatch):
    """bench/run_all.py rewrites BENCHMARKS.md but keeps the hand-placed real-scale section after its marker."""
    import run_all

    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# Benchmarks\n\nold table\n\n{run_all.KEEP_MARKER}\n## Real scale\n\n| a | b |\n")
    monkeypatch.setattr(run_all, "run_section", lambda name, repeats, quick: [])
    run_all.main(["--only", "processor", "--out", str(out)])
    text = out.read_text()
    assert "old table" not in text and text.count(run_all.KEEP_MARKER) == 1
    assert text.endswith(f"{run_all.KEEP_MARKER}\n## Real scale\n\n| a | b |\n")
    run_all.main(["--only", "processor", "--out", str(out)])  # a second run neither loses nor doubles it
    again = out.read_text()
    assert again.count(run_all.KEEP_MARKER) == 1
    assert again.endswith(f"{run_all.KEEP_MARKER}\n## Real scale\n\n| a | b |\n")


def test_random_checkpoint_is_a_sharded_hub_folder_transformers_loads(tmp_path):
    """write_random_checkpoint (shard by shard from a meta-device model) -> a folder that
    AutoModelForImageTextToText loads in bf16 with every weight from the files (none left to initialisation)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    folder = bench_realscale.write_random_checkpoint("tiny", tmp_path / "ckpt", shard_bytes=2**20)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(f"-of-{len(shards):05d}.safetensors" in s for s in shards)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, trust_remote_code=True)
    files = {k: v for s in shards for k, v in load_file(folder / s).items()}
    state = model.state_dict()
    assert set(files) == set(state) - {"lm_head.weight"}  # tied to the embeddings
    for key, value in files.items():
        assert torch.equal(state[key], value), key
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    norm = files["model.vision_tower.post_layernorm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    matrix = files["model.language_model.layers.0.mlp.up_proj.weight"].float()
    assert 0.015 < matrix.std() < 0.025 and matrix.unique().numel() > 1000


def test_lowmem_quick_loads_the_saved_int8_variant_alone(tmp_path):
    """--lowmem --quick: the int8 arm loads the folder quantize_int8 wrote (its Linears are torchao's Int8Tensor, no
    quantization config passed), the bf16 arm the plain folder; both answer, and the variant's making is reported."""
    out_json = tmp_path / "lm.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_realscale.py"), "--lowmem", "--quick", "--folder",
         str(tmp_path / "ckpt"), "--json", str(out_json)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out_json.read_text())["results"]["tiny"]
    assert set(results) == {"quantize", "bf16", "int8"}
    assert results["bf16"][0]["linear_weight_types"] == ["Parameter"]
    assert results["int8"][0]["linear_weight_types"] == ["Int8Tensor", "Parameter"]  # all but the output head
    assert results["quantize"]["safetensors_bytes"] > 0
    for arm in ("bf16", "int8"):
        assert results[arm][0]["decode_tokens_per_s"] > 0 and results[arm][0]["peak_rss"] > 2**20
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt-int8").exists()  # both folders deleted
    assert "saved int8 folder (no quantization config)" in done.stdout
