"""The prepared GPU check: one command, under 8 minutes on one H100, prints and writes a table naming the card.

    python bench/gpu_check.py [--out DIR]            # on a machine with a CUDA GPU
    OMP_NUM_THREADS=1 python bench/gpu_check.py --cpu-quick [--out DIR]   # tiny shapes on the CPU (the test suite)

Checks (each runs on its own; one that fails is a row saying so, the others still run):
  flash_varlen  flash-attention varlen (cu_seqlens) == sdpa on a packed batch of differently sized images and a
                video, bf16, so400m-width tower; says so when no flash-attention build is installed. sdpa == eager on
                the same batch is checked beside it (the reference both paths must agree with).
  tower_mfu     tower train step (forward + backward + AdamW) on a packed batch in bf16: model FLOPs / time / the
                card's dense bf16 peak (goal >= 40 %); also against a measured bf16 matmul rate.
  llm_mfu       the same for the 1.5B shape (root config.json: tower + projector + Qwen2.5-1.5B LLM), image + text.
  device_split  tower (+ projector) on the GPU and the LLM on the CPU, and the reverse (accelerate device_map),
                give the same logits as the whole model on one device (fp32; a 2D image and a pruned video, both
                prune stages).
  generation    generate tokens/s at the 1.5B shape in bf16 (batch 1, a 448 px image prompt, greedy, KV cache).
`--cpu-quick` runs every check at tiny shapes on the CPU (the "GPU" side of device_split is the CPU too): a smoke
test of the script, not a measurement.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, machine_facts  # noqa: E402

import omnivmed_tools  # noqa: E402
from omnivmed.configuration_omnivmed import OmniVMedVisionConfig  # noqa: E402
from omnivmed.media_omnivmed import Media  # noqa: E402
from omnivmed.modeling_omnivmed import OmniVMedVisionModel  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor, OmniVMedProcessor  # noqa: E402
from shapes import build_ours, shape_configs, to_patches, tower_flops  # noqa: E402


# dense bf16 tensor-core peaks from NVIDIA's data sheets (no sparsity), by device-name fragment; first match wins
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]  # fmt: skip
MFU_GOAL = 0.40
# mixed image sizes of a medical batch (pixels), packed without padding; plus a short video
PACKED_SIZES = [(448, 448), (224, 336), (112, 448), (224, 224), (336, 168), (112, 112), (280, 196), (168, 168)]


class Check:
    """One row of the table: name, status ("pass" / "fail" / "info" / "skipped" / "error"), measured, goal."""

    def __init__(self, name, status, measured, goal="-", detail=""):
        self.name, self.status, self.measured, self.goal, self.detail = name, status, measured, goal, detail

    def as_dict(self):
        return dict(name=self.name, status=self.status, measured=self.measured, goal=self.goal, detail=self.detail)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def card_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)

    return f"CPU: {cpu_model()}"


def spec_peak_flops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in name:
            return tflops * 1e12
    return None


def matmul_peak_flops(device, n: int) -> float:
    """A measured bf16 matmul rate (n x n @ n x n): what this device reaches on a plain GEMM."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * n**3 / seconds


# --------------------------------------------------------------------------------------------------------- inputs
def packed_images(sizes, patch: int, device, dtype, frames: int = 0, seed: int = 0):
    """Patches of images of `sizes` packed in one sequence (+ a `frames`-frame 224 px video): (N, 3p^2), grid."""
    gen = torch.Generator().manual_seed(seed)
    pieces, grid = [], []
    for h, w in sizes:
        pieces.append(to_patches(torch.rand(1, 3, h, w, generator=gen), patch))
        grid.append([1, h // patch, w // patch])
    if frames:
        pieces.append(to_patches(torch.rand(frames, 3, 224, 224, generator=gen), patch))
        grid.append([frames, 224 // patch, 224 // patch])
    return torch.cat(pieces).to(device, dtype), torch.tensor(grid, device=device)


def image_prompt(processor, image_px: int, seed: int = 0):
    """Our processor's inputs for one random `image_px` image and a question (the tiny tokenizer's ids)."""
    import numpy as np


    pixels = np.random.default_rng(seed).random((1, image_px, image_px, 3), dtype=np.float32)
    media = Media(frames=pixels, kind="image", source="random-image")
    messages = [{"role": "user", "content": [{"type": "image", "image": media},
                                             {"type": "text", "text": "What does the image show?"}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    inputs.pop("media_metadata", None)
    return inputs


def processor(image_px: int, video_px: int = 112):

    tokenizer = omnivmed_tools.build_tiny_tokenizer()
    return OmniVMedProcessor(OmniVMedImageProcessor(max_pixels=image_px**2, video_max_pixels=video_px**2), tokenizer)


# --------------------------------------------------------------------------------------------------------- checks
def check_flash_varlen(device, quick: bool) -> list[Check]:
    """Each bf16 attention path against the same tower in fp32 (eager): flash-attention varlen must be no less accurate
    than sdpa (bf16 rounding over several layers makes a direct bf16-vs-bf16 comparison a matter of tolerance)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available


    vision, _ = shape_configs("tiny" if quick else "1.5B", omnivmed_tools.build_tiny_tokenizer() if quick else None)
    vision = dict(vision, num_hidden_layers=2 if quick else 4)
    torch.manual_seed(0)
    tower = OmniVMedVisionModel(OmniVMedVisionConfig(**vision)).to(device).eval()
    sizes = PACKED_SIZES[:3] if quick else PACKED_SIZES
    pv, grid = packed_images(sizes, vision["patch_size"], device, torch.float32, frames=2 if quick else 8)
    # pre_encoder_reuse: the video's later frames keep a quarter of their patches as queries but attend to every
    # position, so its varlen call has cu_seqlens_q != cu_seqlens_k
    keep = torch.ones(pv.shape[0], dtype=torch.bool)
    per_frame = int(grid[-1, 1] * grid[-1, 2])
    later = torch.rand(pv.shape[0] - int(grid[:-1].prod(-1).sum()) - per_frame, generator=torch.Generator().manual_seed(1))
    keep[pv.shape[0] - later.numel() :] = later < 0.25
    keep = keep.to(device)
    with torch.inference_mode():
        tower.set_attn_implementation("eager")
        reference = tower(pv, grid).last_hidden_state
        reference_reuse = tower(pv, grid, patch_keep_mask=keep, reuse=True).last_hidden_state
        tower.to(torch.bfloat16)
        tower.set_attn_implementation("sdpa")
        sdpa = tower(pv.bfloat16(), grid).last_hidden_state.float()
        sdpa_reuse = tower(pv.bfloat16(), grid, patch_keep_mask=keep, reuse=True).last_hidden_state.float()
    sdpa_err, sdpa_reuse_err = _mean_rel(sdpa, reference), _mean_rel(sdpa_reuse, reference_reuse)
    detail = (f"{pv.shape[0]} patches in {len(grid)} items ({len(sizes)} image sizes + a video), "
              f"{vision['num_hidden_layers']} layers")
    rows = [Check("sdpa (bf16) vs the fp32 eager tower", "pass" if sdpa_err <= 2e-2 else "fail",
                  f"mean rel err {sdpa_err:.2e}", "<= 2e-2", detail),
            Check("sdpa (bf16) vs the fp32 eager tower, pre_encoder_reuse", "pass" if sdpa_reuse_err <= 2e-2 else "fail",
                  f"mean rel err {sdpa_reuse_err:.2e}", "<= 2e-2", f"{int(keep.sum())} of {keep.numel()} patches kept")]  # fmt: skip
    cuda = torch.device(device).type == "cuda"
    available = [name for name, ok in (("flash_attention_3", is_flash_attn_3_available()),
                                       ("flash_attention_2", is_flash_attn_2_available())) if ok]  # fmt: skip
    if not cuda or not available:
        why = "no CUDA device" if not cuda else "no flash-attention build installed (pip install flash-attn)"
        rows.append(Check("flash-attention varlen == sdpa", "skipped", why))
        return rows
    for implementation in available:
        with torch.inference_mode():
            tower.set_attn_implementation(implementation)
            flash = tower(pv.bfloat16(), grid).last_hidden_state.float()
            flash_reuse = tower(pv.bfloat16(), grid, patch_keep_mask=keep, reuse=True).last_hidden_state.float()
        for label, got, ref, sdpa_out, sdpa_e in (("", flash, reference, sdpa, sdpa_err),
                                                  (", pre_encoder_reuse", flash_reuse, reference_reuse, sdpa_reuse,
                                                   sdpa_reuse_err)):  # fmt: skip
            err = _mean_rel(got, ref)
            rows.append(Check(f"{implementation} varlen (bf16) vs the fp32 eager tower{label}, no worse than sdpa",
                              "pass" if err <= 1.5 * sdpa_e + 1e-3 else "fail",
                              f"mean rel err {err:.2e} (sdpa {sdpa_e:.2e}); flash vs sdpa {_mean_rel(got, sdpa_out):.2e}",
                              "<= 1.5 x sdpa's", detail))  # fmt: skip
    return rows


def _mean_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference relative to the mean magnitude of `b`."""
    return float((a.float() - b.float()).abs().mean() / b.float().abs().mean().clamp_min(1e-12))


def _mfu_checks(name: str, flops: float, seconds: float, device, quick: bool, extra: str) -> list[Check]:
    spec = spec_peak_flops(device)
    measured_peak = matmul_peak_flops(device, 512 if quick else 8192)
    rate = flops / seconds
    rows = []
    if spec is not None:
        mfu = rate / spec
        rows.append(Check(f"{name} MFU (vs the card's dense bf16 peak)", "pass" if mfu >= MFU_GOAL else "fail",
                          f"{100 * mfu:.1f} % ({rate / 1e12:.1f} of {spec / 1e12:.0f} TFLOP/s)",
                          f">= {100 * MFU_GOAL:.0f} %", extra))  # fmt: skip
    else:
        rows.append(Check(f"{name} MFU (vs the card's dense bf16 peak)", "skipped",
                          "no data-sheet peak for this device", f">= {100 * MFU_GOAL:.0f} %", extra))  # fmt: skip
    rows.append(Check(f"{name}: model FLOP/s vs a bf16 matmul's FLOP/s", "info",
                      f"{100 * rate / measured_peak:.1f} % ({rate / 1e12:.2f} vs {measured_peak / 1e12:.2f} TFLOP/s)",
                      "-", f"{seconds * 1000:.1f} ms per step"))  # fmt: skip
    return rows


def check_tower_mfu(device, quick: bool) -> list[Check]:

    tokenizer = omnivmed_tools.build_tiny_tokenizer() if quick else None
    vision, _ = shape_configs("tiny" if quick else "1.5B", tokenizer)
    cfg = OmniVMedVisionConfig(**vision)
    torch.manual_seed(0)
    tower = OmniVMedVisionModel(cfg).to(device, torch.bfloat16).train()
    tower.set_attn_implementation("sdpa")
    sizes = [(112, 112)] * 2 if quick else [(448, 448)] * 16  # 16 x 1024 patches per step
    pv, grid = packed_images(sizes, cfg.patch_size, device, torch.bfloat16)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-5)

    def step():
        loss = tower(pv, grid).last_hidden_state.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, device, repeats=2 if quick else 10, warmup=1 if quick else 3)
    segments = [h * w // cfg.patch_size**2 for h, w in sizes]
    flops = 3 * tower_flops(cfg, segments)  # backward ~ 2x forward
    return _mfu_checks("tower train step", flops, seconds, device, quick,
                       f"{len(sizes)} images {sizes[0][0]} px packed ({pv.shape[0]} patches), "
                       f"{cfg.num_hidden_layers} layers, sdpa, AdamW")  # fmt: skip


def llm_flops(text_config, tokens: int, seq_len: int) -> float:
    """Forward FLOPs of a Qwen2 decoder + lm_head over `tokens` tokens in sequences of `seq_len` (causal)."""
    d, i, layers = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    kv = text_config.num_key_value_heads * (d // text_config.num_attention_heads)
    per_token_params = layers * (d * d * 2 + 2 * d * kv + 3 * d * i) + d * text_config.vocab_size
    attention = layers * 2 * seq_len * d * tokens  # QK^T and AV: 4 s^2 d per sequence, halved by the causal mask
    return 2 * per_token_params * tokens + attention


def check_llm_mfu(device, quick: bool, batch: int) -> list[Check]:
    shape = "tiny" if quick else "1.5B"
    proc = processor(112 if quick else 448)
    tokenizer = proc.tokenizer
    model = build_ours(shape, tokenizer, device=device).train()
    model.config.use_cache = False
    one = image_prompt(proc, 112 if quick else 448)
    seq_len = 128 if quick else 2048
    gen = torch.Generator().manual_seed(0)
    extra = seq_len - one["input_ids"].shape[1]
    ids = torch.cat([one["input_ids"].repeat(batch, 1), torch.randint(10, 500, (batch, extra), generator=gen)], 1)
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    inputs = dict(input_ids=ids.to(device), labels=labels.to(device),
                  pixel_values=one["pixel_values"].repeat(batch, 1).to(device, torch.bfloat16),
                  grid_thw=one["grid_thw"].repeat(batch, 1).to(device))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, device, repeats=2 if quick else 5, warmup=1 if quick else 2)
    v = model.config.vision_config
    patches = int(one["grid_thw"][0].prod())
    flops = 3 * (batch * tower_flops(v, [patches]) + llm_flops(model.config.text_config, batch * seq_len, seq_len))
    return _mfu_checks(f"{shape}-shape train step", flops, seconds, device, quick,
                       f"batch {batch} x {seq_len} tokens, one {112 if quick else 448} px image each, sdpa, AdamW, "
                       "loss on text")  # fmt: skip


def check_device_split(device, quick: bool) -> list[Check]:
    """Logits of the model split over two devices == the model on one device (fp32)."""
    from accelerate import dispatch_model

    import numpy as np


    proc = processor(112, 112)
    tokenizer = proc.tokenizer
    frames = np.random.default_rng(0).random((4, 112, 112, 3), dtype=np.float32)
    frames[1] = frames[0]  # a repeated frame: pruned
    messages = [{"role": "user", "content": [
        {"type": "image", "image": Media(frames=frames[:1], kind="image", source="random")},
        {"type": "video", "video": Media(frames=frames, kind="video", source="random")},
        {"type": "text", "text": "Compare."}]}]  # fmt: skip
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")  # fmt: skip
    inputs.pop("media_metadata", None)
    kept = int(inputs["visual_keep_mask"].sum())
    assert kept < inputs["visual_keep_mask"].numel(), "the repeated frame should have been pruned"
    other = torch.device(device)
    rows = []
    for stage in ("post_encoder", "pre_encoder", "pre_encoder_reuse"):
        # the 1.5B shape's width with 4 layers each side: fp32 at full depth is 7 GB per copy, and the check is
        # about placement (every tensor following its layer), which 4 layers exercise as well as 28
        shape, layers = ("tiny", None) if quick else ("1.5B", 4)
        reference = build_ours(shape, tokenizer, stage, dtype=torch.float32, layers=layers)
        state = {k: v.clone() for k, v in reference.state_dict().items()}
        with torch.inference_mode():
            on_one = reference.to(other)(**{k: v.to(other) for k, v in inputs.items()}).logits.float().cpu()
        splits = {
            "tower on the accelerator, LLM on the CPU": {"model.vision_tower": other, "model.projector": other,
                                                          "model.language_model": "cpu", "lm_head": "cpu"},
            "tower on the CPU, LLM on the accelerator": {"model.vision_tower": "cpu", "model.projector": "cpu",
                                                          "model.language_model": other, "lm_head": other},
        }  # fmt: skip
        for label, device_map in splits.items():
            model = build_ours(shape, tokenizer, stage, dtype=torch.float32, layers=layers)
            model.load_state_dict(state)
            model = dispatch_model(model, device_map={k: str(v) for k, v in device_map.items()}, main_device="cpu")
            with torch.inference_mode():
                logits = model(**inputs).logits.float().cpu()
            err = float((logits - on_one).abs().max() / on_one.abs().max())
            rows.append(Check(f"device split ({stage}): {label} == one device", "pass" if err <= 1e-4 else "fail",
                              f"max rel diff {err:.2e}", "<= 1e-4",
                              f"fp32; a 2D image + a 4-frame video, {kept} of "
                              f"{inputs['visual_keep_mask'].numel()} visual tokens kept"))  # fmt: skip
            del model
        del reference
    return rows


def check_generation(device, quick: bool) -> list[Check]:
    proc = processor(112 if quick else 448)
    model = build_ours("tiny" if quick else "1.5B", proc.tokenizer, device=device)
    inputs = {k: v.to(device) for k, v in image_prompt(proc, 112 if quick else 448).items()}
    new = 8 if quick else 128
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        seconds = timed(lambda: model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                               pad_token_id=eos), device, repeats=1 if quick else 3)  # fmt: skip
        prefill = timed(lambda: model(**inputs, logits_to_keep=1), device, repeats=1 if quick else 3)
    rate = (new - 1) / max(seconds - prefill, 1e-9)
    return [Check(f"generation ({'tiny' if quick else '1.5B'} shape, bf16, batch 1)", "info",
                  f"{rate:.1f} tokens/s after the first; first token (prefill) {prefill * 1000:.0f} ms",
                  "-", f"{inputs['input_ids'].shape[1]}-token prompt with a {112 if quick else 448} px image, "
                  f"{new} new tokens, greedy, KV cache, sdpa")]  # fmt: skip


CHECKS = ("flash_varlen", "tower_mfu", "llm_mfu", "device_split", "generation")


def run(device, quick: bool, only=CHECKS, batch: int = 4) -> list[Check]:
    rows = []
    for name in only:
        start = time.perf_counter()
        try:
            if name == "flash_varlen":
                got = check_flash_varlen(device, quick)
            elif name == "tower_mfu":
                got = check_tower_mfu(device, quick)
            elif name == "llm_mfu":
                got = check_llm_mfu(device, quick, batch)
            elif name == "device_split":
                got = check_device_split(device, quick)
            elif name == "generation":
                got = check_generation(device, quick)
            else:
                raise ValueError(f"unknown check {name!r}; choose from {CHECKS}")
        except Exception as error:  # one failing check must not cost the others' rows on a lent GPU
            got = [Check(name, "error", f"{type(error).__name__}: {error}"[:300], "-",
                         traceback.format_exc(limit=3)[-600:])]  # fmt: skip
        for row in got:
            row.detail = (row.detail + "; " if row.detail else "") + f"check took {time.perf_counter() - start:.0f} s"
        rows += got
        print(f"[{name}] " + "; ".join(f"{r.name}: {r.status} ({r.measured})" for r in got), flush=True)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def render(rows: list[Check], card: str, facts: dict, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"## GPU check on {card}", "", f"`{command}`, {now:%Y-%m-%d %H:%M} UTC", "",
             "| check | status | measured | goal | detail |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = [r.name, r.status, r.measured, r.goal, r.detail]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    lines += ["", "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-quick", action="store_true", help="tiny shapes on the CPU (a smoke test)")
    parser.add_argument("--only", default=",".join(CHECKS))
    parser.add_argument("--batch", type=int, default=4, help="sequences per 1.5B train step")
    parser.add_argument("--out", type=Path, default=Path("."), help="writes gpu_check.json and gpu_check.md here")
    args = parser.parse_args(argv)
    if args.cpu_quick:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda:0"
    else:
        parser.error("no CUDA device: run with --cpu-quick for the CPU smoke test")
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = run(device, args.cpu_quick, tuple(args.only.split(",")), args.batch)
    card = card_name(device)
    facts = machine_facts()
    facts["device"] = card
    facts["CUDA"] = torch.version.cuda or "-"
    facts["wall time"] = f"{time.perf_counter() - start:.0f} s"
    command = "python bench/gpu_check.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = render(rows, card, facts, command)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps(
        {"device": card, "facts": facts, "checks": [r.as_dict() for r in rows]}, indent=1))  # fmt: skip
    return 0 if all(r.status in ("pass", "info", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
