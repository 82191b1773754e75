"""Scale-out that is run, on 2 CPU processes (gloo): configs/accelerate_ddp.yaml and the DeepSpeed ZeRO-2 / ZeRO-3
files drive train_trl.py (`accelerate launch`, torchrun --deepspeed) to the same weights as torchrun DDP; the model
sharded with FSDP2 as configs/accelerate_fsdp.yaml says (its layer classes as units) trains to the same weights as DDP
(tests/scaleout_worker.py; accelerate itself engages FSDP only on GPUs, see README "Scale-out"); evaluate_omnivmed.py
shards a benchmark over 2 processes (torchrun) and reports the same metrics as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_evaluate_omnivmed import make_mini, tiny_model_dir  # noqa: E402, F401  (fixtures)
from test_train_trl import _args, _free_port, _weights, data_dir, tiny_dir  # noqa: E402, F401  (fixtures)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TRAIN = ("--stages", "3", "--max_steps", "2", "--lr_preset", "tiny", "--seed", "0")


def _run(cmd, log_name: str):
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{log_name}:\n{log[-5000:]}"
    return log


def _final(out: Path) -> dict:
    return _weights(out / "final")


@pytest.fixture(scope="module")
def ddp_weights(tiny_dir, data_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "train_trl.py"),
           *_args(tiny_dir, data_dir, out, *TRAIN)]  # fmt: skip
    log = _run(cmd, "torchrun DDP")
    assert log.count("distributed, world size 2") == 1, log[-3000:]
    return _final(out)


def _accelerate(config: str, tiny_dir, data_dir, out: Path) -> str:  # noqa: F811
    # the shipped file as it is, but for 2 processes and fp32: the CPU has no bf16 autocast parity with DDP's fp32
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / config),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(_free_port()), str(ROOT / "train_trl.py"),
           *_args(tiny_dir, data_dir, out, *TRAIN)]  # fmt: skip
    return _run(cmd, f"accelerate launch {config}")


def test_shipped_ddp_config_trains_like_torchrun(tiny_dir, data_dir, ddp_weights, tmp_path):  # noqa: F811
    """configs/accelerate_ddp.yaml through `accelerate launch` (2 processes on the CPU: gloo) == torchrun DDP."""
    config = "accelerate_ddp.yaml"
    out = tmp_path / config.split(".")[0]
    log = _accelerate(config, tiny_dir, data_dir, out)
    assert "world size 2, engine multi_cpu," in log, log[-3000:]
    weights = _final(out)
    assert weights.keys() == ddp_weights.keys()
    start = _weights(tiny_dir)
    changed = [k for k in weights if not torch.equal(weights[k], start[k])]
    assert changed, "training changed nothing"
    for name in weights:
        torch.testing.assert_close(weights[name], ddp_weights[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("launch", ["accelerate_zero2.yaml", "accelerate_zero3.yaml", "ds_zero3.json"])
def test_shipped_deepspeed_configs_train_like_ddp(launch, tiny_dir, data_dir, ddp_weights, tmp_path):  # noqa: F811
    """DeepSpeed runs on the CPU (its CPU accelerator over gloo): the shipped ZeRO-2 / ZeRO-3 files through `accelerate
    launch` (each names its ds_zero*.json), and ds_zero3.json through torchrun with train_trl's --deepspeed, end two
    steps with DDP's weights, saved under this code's key names (ZeRO-3 loads the weights partitioned and gathers
    them to save)."""
    out = tmp_path / launch.split(".")[0]
    if launch.endswith(".yaml"):
        log = _accelerate(launch, tiny_dir, data_dir, out)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(ROOT / "train_trl.py"),
               *_args(tiny_dir, data_dir, out, *TRAIN, "--deepspeed", str(ROOT / "configs" / launch), "--bf16",
                      "false")]  # fmt: skip
        log = _run(cmd, f"torchrun --deepspeed {launch}")
    stage = 3 if "zero3" in launch else 2
    assert log.count(f"world size 2, engine deepspeed zero-{stage},") == 1, log[-3000:]
    weights = _final(out)
    assert weights.keys() == ddp_weights.keys()
    start = _weights(tiny_dir)
    assert sum(not torch.equal(weights[k], start[k]) for k in weights) > len(weights) // 2
    for name in weights:
        # ZeRO reduces the gradients in buckets, in another order than DDP: float32 sums differ in the last bits
        torch.testing.assert_close(weights[name], ddp_weights[name], rtol=1e-5, atol=1e-5, msg=name)


def test_evaluate_sharded_over_two_processes_scores_like_one(tiny_model_dir, tmp_path):  # noqa: F811
    """omnivmed-mini (7 questions: blocks of 4 and 3) under torchrun --nproc_per_node 2 == one process: the same
    predictions in the same order and the same metrics; only rank 0 writes."""
    data = make_mini(tmp_path / "mini")
    rows = (data / "eval.jsonl").read_text().splitlines()
    (data / "eval.jsonl").write_text("\n".join(rows * 2 + rows[:1]) + "\n")
    args = ["--model", str(tiny_model_dir), "--benchmark", "omnivmed-mini", "--data", str(data), "--batch-size", "2",
            "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
    _run([sys.executable, str(ROOT / "evaluate_omnivmed.py"), *args, "--out", str(tmp_path / "one.json")], "one")
    log = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), str(ROOT / "evaluate_omnivmed.py"), *args, "--out",
                str(tmp_path / "two.json")], "torchrun evaluate")  # fmt: skip
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["n"] == one["n"] == 7
    assert [p["id"] for p in two["predictions"]] == [p["id"] for p in one["predictions"]]
    assert [p["prediction"] for p in two["predictions"]] == [p["prediction"] for p in one["predictions"]]
    assert two["metrics"] == one["metrics"]
    assert log.count("### omnivmed-mini") == 1  # the table is printed once, by rank 0


def _worker(mode: str, out: Path) -> str:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                 "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "tests" / "scaleout_worker.py"), mode,
                 str(out)], f"worker {mode}")  # fmt: skip


def test_accelerate_fsdp_config_on_the_cpu_says_it_runs_ddp(tiny_dir, data_dir, tmp_path):  # noqa: F811
    """Accelerate engages FSDP on GPUs only: on the CPU the shipped FSDP file trains as DDP, and the log says so
    instead of leaving the user to believe the model is sharded (the sharding itself: the next test)."""
    log = _accelerate("accelerate_fsdp.yaml", tiny_dir, data_dir, tmp_path / "fsdp")
    assert "world size 2, engine multi_cpu," in log, log[-3000:]
    assert log.count("the launch config asks for FSDP but Accelerate runs multi_cpu") == 2, log[-3000:]


def test_fsdp2_with_the_shipped_wrap_classes_trains_like_ddp(tmp_path):
    """Every OmniVMedVisionLayer / Qwen2DecoderLayer a FSDP2 unit (configs/accelerate_fsdp.yaml), each rank holding
    half of the parameters: two AdamW steps on per-rank batches end with DDP's weights."""
    from safetensors.torch import load_file

    import build_omnivmed

    log = _worker("fsdp2", tmp_path / "fsdp2.safetensors")
    _worker("ddp", tmp_path / "ddp.safetensors")
    assert log.count("FSDP2 over 8 units + root, holds 0.5") == 2, log[-3000:]  # 4 tower + 4 LLM layers
    fsdp, ddp = load_file(tmp_path / "fsdp2.safetensors"), load_file(tmp_path / "ddp.safetensors")
    start = build_omnivmed.tiny_model(build_omnivmed.build_tiny_tokenizer(), 0).state_dict()
    assert fsdp.keys() == ddp.keys()
    assert sum(not torch.equal(ddp[k], start[k]) for k in ddp) > len(ddp) // 2  # the steps changed the weights
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-5, atol=1e-6, msg=name)
