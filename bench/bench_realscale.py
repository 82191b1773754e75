"""Real-scale shapes with random weights in bf16: time to first token and peak RSS, ours vs transformers' Qwen2.5-VL.

    OMP_NUM_THREADS=1 python bench/bench_realscale.py [--shapes 1.5B,7B] [--media image,volume,video] [--repeats 1]
                                                      [--threads 1] [--json FILE] [--markdown FILE] [--quick]

Shapes: "1.5B" is the root config.json (so400m-shaped tower + Qwen2.5-1.5B LLM); "7B" the same tower with the
Qwen2.5-7B LLM (hyperparameters below, from Qwen2.5-7B's published config.json); "tiny" (--quick) the test-suite model.
Inputs: a 448 x 448 image, the MNI152 T1 volume (nilearn) at 64 axial slices, a 64-frame 448 px video (a synthetic
static-camera scene with an instrument sweeping across, 64 s sampled at 1 fps).
Arms per input: ours with pruning off (threshold 0), default pruning post-encoder, pre-encoder and pre-encoder
reuse (config.json's prune_stage, pre-encoder reuse, marks the default), and Qwen2.5-VL (random weights, the same LLM shape, its own ViT of Qwen2.5-VL-3B/7B's shape) given the
same number of visual tokens and the same sequence length as our unpruned arm. 2D images are never pruned, so the
image has two arms.

Each arm runs in a fresh child process (bench/common.py run_child): the model is built there (random init, bf16),
then the clock runs over processor + generate(max_new_tokens=1) (ours) or generate alone (Qwen2.5-VL, fed patch
tensors: its processor is not timed); peak RSS is the child's VmHWM over the whole child (model + activations).
Rounds interleave the arms (arm A, B, C, ... then again), so machine noise hits every arm alike and the ratios within
one run are what count. Qwen2.5-VL merges 2 frames per token (temporal patch 2); to give it the same visual token
count its grid gets t = our frame count, i.e. it sees 2x the pixels per token row of a video: the comparison is at
equal LLM tokens, which is where the LLM's cost lies.

`--lowmem`: the low-memory path a user takes. A random checkpoint of the shape is written to a folder (a complete Hub
folder: code, config, processor, tokenizer, sharded safetensors; written shard by shard from a meta-device model, so
the writer never holds the model); for the int8 arm its int8 weight-only variant is made once from that folder in a
child process (`omnivmed_tools.quantize_int8`, what `quantize_omnivmed.py SRC OUT` runs: torchao's
Int8WeightOnlyConfig through transformers' TorchAoConfig, saved as safetensors; its time and peak RSS are reported).
Then each arm's child loads its folder alone with
`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` (bf16: `dtype=torch.bfloat16`; int8:
no quantization config, config.json carries it; safetensors are memory-mapped, no fp32 copy), answers a question about
a 448 px image (8 new tokens) and reports its peak RSS, load time, TTFT and decode tokens/s. `--lowmem-arms` adds
`int8_at_load` (the bf16 folder loaded with `quantization_config=TorchAoConfig(Int8WeightOnlyConfig())`, quantized at
every load: the bf16 pages stay mapped beside the int8 copy). The folders are deleted afterwards.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Row, machine_facts, peak_rss_bytes, run_child  # noqa: E402

import omnivmed_tools  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor, OmniVMedProcessor  # noqa: E402
from shapes import build_ours, random_model, shape_configs  # noqa: E402


COMMAND = "OMP_NUM_THREADS=1 python bench/bench_realscale.py"
MNI = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

# Qwen2.5-VL-3B/7B's ViT: 32 layers, hidden 1280, SwiGLU MLP 3420, 16 heads, windowed attention but in 4 layers
QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
TINY_QWEN_VL_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1])  # fmt: skip


def build_qwen_vl(shape: str, tokenizer, dtype=torch.bfloat16, device="cpu"):
    """transformers' Qwen2_5_VLForConditionalGeneration with our LLM shape, random weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _, text = shape_configs(shape, tokenizer)
    text = {k: v for k, v in text.items() if k not in ("model_type", "layer_types")}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # Qwen2.5-VL's 3D rotary split of head_dim/2 frequencies over (t, h, w): [16, 24, 24] at head_dim 128
    unit = head_dim // 16
    text["rope_parameters"] = dict(text["rope_parameters"], rope_type="default",
                                   mrope_section=[unit * 2, unit * 3, unit * 3])  # fmt: skip
    vision = dict(TINY_QWEN_VL_VISION if shape == "tiny" else QWEN25_VL_VISION, out_hidden_size=text["hidden_size"])
    ids = qwen_token_ids(text["vocab_size"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids,
                              tie_word_embeddings=text.get("tie_word_embeddings", True))  # fmt: skip
    return random_model(Qwen2_5_VLForConditionalGeneration, config, dtype, device)


def qwen_token_ids(vocab_size: int) -> dict:
    """Qwen2.5-VL's special ids (the real vocabulary's) or, in a tiny vocabulary, its last rows."""
    if vocab_size > 151656:
        return dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)  # fmt: skip
    return dict(image_token_id=vocab_size - 2, video_token_id=vocab_size - 1, vision_start_token_id=vocab_size - 4,
                vision_end_token_id=vocab_size - 3)  # fmt: skip


# --------------------------------------------------------------------------------------------------------- inputs
def sizes(quick: bool) -> dict:
    if quick:
        return dict(image_px=112, slices=4, frames=4, video_px=112, volume_px=112)
    return dict(image_px=448, slices=64, frames=64, video_px=448, volume_px=224)


def write_media(workdir: Path, quick: bool) -> dict:
    """The three inputs as chat content blocks (files in `workdir`)."""
    import nilearn
    from PIL import Image


    s = sizes(quick)
    image = workdir / "image.png"
    Image.fromarray((omnivmed_tools.endoscopic_scene(s["image_px"], seed=1) * 255).astype(np.uint8)).save(image)
    # 2 fps native, sampled at 1 fps: 64 s -> 64 frames
    video = omnivmed_tools.write_instrument_video(workdir / "video.mp4", seconds=s["frames"], fps=2, size=s["video_px"])
    volume = Path(nilearn.__file__).parent / "datasets" / "data" / MNI
    return {
        "image": {"type": "image", "image": str(image)},
        "volume": {"type": "volume", "path": str(volume)},
        "video": {"type": "video", "path": str(video)},
    }


def processor_for(media: str, tokenizer, quick: bool):

    s = sizes(quick)
    per_frame = s["video_px"] if media == "video" else s["volume_px"]
    image_processor = OmniVMedImageProcessor(max_pixels=s["image_px"] ** 2, video_max_pixels=per_frame**2,
                                             max_slices=s["slices"], max_frames=s["frames"])  # fmt: skip
    return OmniVMedProcessor(image_processor, tokenizer)


def our_inputs(processor, block: dict, threshold: float | None):
    conversation = [{"role": "user", "content": [block, {"type": "text", "text": "Describe the findings."}]}]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"prune_threshold": threshold},
    )  # fmt: skip
    inputs.pop("media_metadata", None)
    return inputs


def qwen_inputs(grid_thw: list[int], seq_len: int, ids: dict, video: bool, dtype=torch.bfloat16, seed: int = 0):
    """Qwen2.5-VL inputs with grid (t, h, w) patches -> t*h*w/4 visual tokens, padded with text to `seq_len`."""
    t, h, w = grid_thw
    tokens = t * h * w // 4
    pad = ids["video_token_id" if video else "image_token_id"]
    text = seq_len - tokens - 2
    if text < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for text around {tokens} visual tokens")
    head = text // 2
    rng = torch.Generator().manual_seed(seed)
    words = torch.randint(10, 200, (text,), generator=rng)
    input_ids = torch.cat([words[:head], torch.tensor([ids["vision_start_token_id"]]), torch.full((tokens,), pad),
                           torch.tensor([ids["vision_end_token_id"]]), words[head:]])[None]  # fmt: skip
    pixels = torch.rand(t * h * w, 3 * 2 * 14 * 14, generator=rng).to(dtype)
    grid = torch.tensor([[t, h, w]])
    out = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if video:
        out.update(pixel_values_videos=pixels, video_grid_thw=grid)
    else:
        out.update(pixel_values=pixels, image_grid_thw=grid)
    return out


# --------------------------------------------------------------------------------------------------------- child
def child(args) -> dict:
    torch.set_num_threads(args.threads)
    tokenizer = omnivmed_tools.build_tiny_tokenizer()
    block = json.loads(args.block)
    start = time.perf_counter()
    if args.arm == "qwen":
        model = build_qwen_vl(args.shape, tokenizer)
    else:
        model = build_ours(args.shape, tokenizer, STAGES.get(args.arm, "post_encoder"))
    build_s = time.perf_counter() - start
    eos = model.generation_config.eos_token_id
    out = {"build_s": build_s}
    with torch.inference_mode():
        start = time.perf_counter()
        if args.arm == "qwen":
            ids = qwen_token_ids(model.config.text_config.vocab_size)
            inputs = qwen_inputs(json.loads(args.grid), args.seq_len, ids, video=block["type"] != "image")
            out["processor_s"] = 0.0
            out["visual_tokens"] = int((inputs["input_ids"] == ids["image_token_id"]).sum()
                                       + (inputs["input_ids"] == ids["video_token_id"]).sum())  # fmt: skip
        else:
            processor = processor_for(block["type"], tokenizer, args.quick)
            inputs = our_inputs(processor, block, 0.0 if args.arm == "off" else None)
            out["processor_s"] = time.perf_counter() - start
            out["visual_tokens"] = int(inputs["visual_keep_mask"].sum())
            out["all_visual_tokens"] = int(inputs["visual_keep_mask"].numel())
            out["grid"] = inputs["grid_thw"][0].tolist()
        out["seq_len"] = int(inputs["input_ids"].shape[1])
        generated = model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=eos)
        out["ttft_s"] = time.perf_counter() - start
    assert generated.shape[1] == out["seq_len"] + 1
    out["peak_rss"] = peak_rss_bytes()
    return out


# --------------------------------------------------------------------------------------------------------- low memory
_BANK_SIZE = 2**24 + 7  # odd length: consecutive rows of a matrix do not repeat the same values


def _random_value(name: str, shape, gen: torch.Generator, bank: torch.Tensor) -> torch.Tensor:
    """What initialisation gives, cheaply: norms' weights 1, biases 0, matrices N(0, 0.02) values in bf16, read from
    a bank of 16 M draws at a random offset (drawing 7.6 B normals one by one takes minutes on one thread, and only
    the shapes and the absence of structure matter to time and memory)."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1:  # LayerNorm / RMSNorm weights
        return torch.ones(shape, dtype=torch.bfloat16)
    n = int(torch.Size(shape).numel())
    offset = int(torch.randint(0, bank.numel(), (1,), generator=gen))
    reps = -(-(n + offset) // bank.numel())
    return bank.repeat(reps)[offset : offset + n].view(shape).clone()


def write_random_checkpoint(shape: str, out: Path, shard_bytes: int = 2 * 2**30) -> Path:
    """A complete Hub folder of `shape` with random bf16 weights in safetensors shards of <= `shard_bytes`."""
    import shutil

    from safetensors.torch import save_file
    from transformers import GenerationConfig


    out.mkdir(parents=True, exist_ok=True)
    tokenizer = omnivmed_tools.build_tiny_tokenizer()
    model = build_ours(shape, tokenizer, device="meta")
    model.config.auto_map = dict(omnivmed_tools.AUTO_MAP)
    model.config.architectures = ["OmniVMedForConditionalGeneration"]
    model.config.save_pretrained(out)
    GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids(omnivmed_tools.IM_END),
                     pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(out)  # fmt: skip
    image_processor = OmniVMedImageProcessor(max_pixels=448 * 448, **model.config.processor_settings())
    OmniVMedProcessor(image_processor, tokenizer).save_pretrained(out)
    for name in omnivmed_tools.REMOTE_CODE_FILES:
        shutil.copyfile(ROOT / name, out / name)
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    bank = (torch.randn(_BANK_SIZE, generator=gen) * 0.02).to(torch.bfloat16)
    weight_map, shard, size, total, files = {}, {}, 0, 0, []

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})

    for key, meta in state.items():
        nbytes = meta.numel() * 2
        if shard and size + nbytes > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key] = _random_value(key, tuple(meta.shape), gen, bank)
        size += nbytes
        total += nbytes
    flush()
    # the shard files were named before their count was known: rename to transformers' -of- pattern
    n = len(files)
    renames = {f: f.replace(".safetensors", f"-of-{n:05d}.safetensors") for f in files}
    for old, new in renames.items():
        (out / old).rename(out / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renames[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return out


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def child_lowmem(args) -> dict:
    """Load the folder as a user does (bf16, the saved int8 variant, or bf16 quantized at load), answer one image
    question."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(args.threads)
    kwargs = dict(dtype=torch.bfloat16, trust_remote_code=True)
    if args.arm == "int8":  # the saved int8 folder: its config.json says how to rebuild the int8 weights
        kwargs = dict(trust_remote_code=True)
    elif args.arm == "int8_at_load":
        kwargs["quantization_config"] = omnivmed_tools.int8_config()
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(args.folder, **kwargs).eval()
    load_s = time.perf_counter() - start
    after_load = {"peak_rss": peak_rss_bytes(), "rss_anon": _status_bytes("RssAnon"),
                  "rss_file": _status_bytes("RssFile")}  # fmt: skip
    processor = AutoProcessor.from_pretrained(args.folder, trust_remote_code=True)
    block = json.loads(args.block)
    new = 8
    with torch.inference_mode():
        # cold: the first forward also pages the memory-mapped weights in
        start = time.perf_counter()
        inputs = our_inputs(processor, block, None)
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        total = time.perf_counter() - start
    assert out.shape[1] == inputs["input_ids"].shape[1] + new
    linear_types = sorted({type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
    return {"load_s": load_s, "after_load": after_load, "ttft_s": ttft, "warm_ttft_s": warm,
            "decode_tokens_per_s": (new - 1) / (total - warm),
            "peak_rss": peak_rss_bytes(), "rss_anon": _status_bytes("RssAnon"), "rss_file": _status_bytes("RssFile"),
            "linear_weight_types": linear_types, "seq_len": int(inputs["input_ids"].shape[1])}  # fmt: skip


def child_quantize(args) -> dict:
    """Make the int8 variant of the bf16 folder once (what quantize_omnivmed.py does), in its own process."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    omnivmed_tools.quantize_int8(args.folder, args.out)
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    return {"quantize_s": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "safetensors_bytes": size}


LOWMEM_ARMS = ("bf16", "int8")


def measure_lowmem(shape: str, repeats: int, threads: int, quick: bool, folder: Path, arms=LOWMEM_ARMS) -> dict:
    folder.parent.mkdir(parents=True, exist_ok=True)
    blocks = write_media(folder.parent, quick)
    start = time.perf_counter()
    if not (folder / "model.safetensors.index.json").exists():  # a folder left by an interrupted run is reused
        write_random_checkpoint(shape, folder)
    print(f"[{shape}] wrote {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    int8_folder = folder.with_name(folder.name + "-int8")
    results = {arm: [] for arm in arms}
    try:
        if "int8" in arms:
            import shutil

            shutil.rmtree(int8_folder, ignore_errors=True)  # a half-written variant is never reused
            q = run_child("bench_realscale", ["--lowmem", "--quantize", "--folder", str(folder), "--out",
                                              str(int8_folder), "--threads", str(threads)], timeout=3600)  # fmt: skip
            results["quantize"] = q
            print(f"[{shape} lowmem quantize] {q['quantize_s']:.0f} s, peak RSS {q['peak_rss'] / 2**30:.2f} GiB, "
                  f"{q['safetensors_bytes'] / 2**30:.2f} GiB of safetensors", file=sys.stderr, flush=True)  # fmt: skip
        for _ in range(repeats):
            for arm in arms:
                args = ["--lowmem", "--arm", arm, "--folder", str(int8_folder if arm == "int8" else folder),
                        "--threads", str(threads), "--block", json.dumps(blocks["image"])]  # fmt: skip
                r = run_child("bench_realscale", args, timeout=3600)
                results[arm].append(r)
                print(f"[{shape} lowmem {arm}] peak RSS {r['peak_rss'] / 2**30:.2f} GiB, load {r['load_s']:.1f} s, "
                      f"TTFT {r['ttft_s']:.2f} s, {r['decode_tokens_per_s']:.2f} tokens/s", file=sys.stderr,
                      flush=True)  # fmt: skip
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(int8_folder, ignore_errors=True)
    return results


def summarise_lowmem(shape: str, results: dict, command: str) -> list[Row]:
    rows = []
    goal = {"bf16": 16, "int8": 10, "int8_at_load": 10}
    what = {"bf16": "bf16 folder", "int8": "saved int8 folder (no quantization config)",
            "int8_at_load": "bf16 folder quantized to int8 at load"}  # fmt: skip
    if "quantize" in results:
        q = results["quantize"]
        rows.append(Row(
            f"Low memory {shape}", "making the int8 variant once (quantize_omnivmed.py: bf16 folder -> int8 folder)",
            f"{q['quantize_s']:.0f} s, peak RSS {q['peak_rss'] / 2**30:.2f} GiB, "
            f"{q['safetensors_bytes'] / 2**30:.2f} GiB of safetensors", None, "-", None, command,
        ))  # fmt: skip
    arms = [a for a in results if a != "quantize"]
    for arm in arms:
        rs = results[arm]
        r = rs[0]
        peak = max(x["peak_rss"] for x in rs) / 2**30
        rows.append(Row(
            f"Low memory {shape}", f"{what[arm]}: from_pretrained + one 448 px image question (8 new tokens)",
            f"peak RSS {peak:.2f} GiB (after load {r['after_load']['peak_rss'] / 2**30:.2f}; at end anon "
            f"{r['rss_anon'] / 2**30:.2f} + file-backed {r['rss_file'] / 2**30:.2f}); load {r['load_s']:.1f} s, "
            f"TTFT {statistics.median(x['ttft_s'] for x in rs):.2f} s cold (processor + paging the weights in), "
            f"{statistics.median(x['warm_ttft_s'] for x in rs):.2f} s warm, decode "
            f"{statistics.median(x['decode_tokens_per_s'] for x in rs):.2f} tokens/s; Linear weights: "
            f"{', '.join(r['linear_weight_types'])}", None, f"<= {goal[arm]} GiB" if shape == "7B" else "-",
            (peak <= goal[arm]) if shape == "7B" else None, command,
        ))  # fmt: skip
    if {"bf16", "int8"} <= set(arms):
        speed = {a: statistics.median(x["decode_tokens_per_s"] for x in results[a]) for a in arms}
        ttft = {a: statistics.median(x["warm_ttft_s"] for x in results[a]) for a in arms}
        rows.append(Row(
            f"Low memory {shape}", "int8 vs bf16: decode speed and TTFT",
            f"{speed['int8']:.2f} vs {speed['bf16']:.2f} tokens/s; "
            f"warm TTFT {ttft['int8']:.2f} s vs {ttft['bf16']:.2f} s",
            speed["int8"] / speed["bf16"], "-", None, command, "ratio = int8 / bf16 decode tokens/s",
        ))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------------- parent
ARMS = {"image": ("off", "qwen"), "volume": ("off", "post", "pre", "reuse", "qwen"),
        "video": ("off", "post", "pre", "reuse", "qwen")}  # fmt: skip
STAGES = {"post": "post_encoder", "pre": "pre_encoder", "reuse": "pre_encoder_reuse"}  # the arms' prune_stage
LABEL = {"off": "ours, pruning off", "post": "ours, default pruning post-encoder",
         "pre": "ours, default pruning pre-encoder", "reuse": "ours, default pruning pre-encoder reuse",
         "qwen": "Qwen2.5-VL, same visual tokens"}  # fmt: skip


def measure(shape: str, media_names, repeats: int, threads: int, quick: bool, workdir: Path, only=None) -> dict:
    """{media: {arm: [child results, one per round]}}; the arms of one input interleave round by round."""
    blocks = write_media(workdir, quick)
    results = {}
    common = ["--shape", shape, "--threads", str(threads)] + (["--quick"] if quick else [])
    for media in media_names:
        block = json.dumps(blocks[media])
        arms = [a for a in ARMS[media] if only is None or a in only or a == "off"]  # off: every ratio's reference
        results[media] = {arm: [] for arm in arms}
        for _ in range(repeats):
            off = None
            for arm in arms:
                extra = []
                if arm == "qwen":  # same grid and sequence length as our unpruned arm of this round
                    extra = ["--grid", json.dumps(off["grid"]), "--seq-len", str(off["seq_len"])]
                r = run_child("bench_realscale", [*common, "--arm", arm, "--block", block, *extra], timeout=3600)
                off = r if arm == "off" else off
                results[media][arm].append(r)
                print(f"[{shape} {media} {arm}] ttft {r['ttft_s']:.2f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB, "
                      f"{r['visual_tokens']} visual tokens, seq {r['seq_len']}, build {r['build_s']:.1f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    return results


def summarise(shape: str, results: dict, command: str) -> list[Row]:
    rows = []
    default_stage = json.loads((ROOT / "config.json").read_text())["prune_stage"]
    for media, arms in results.items():
        ttft = {arm: statistics.median(r["ttft_s"] for r in rs) for arm, rs in arms.items()}
        first = {arm: rs[0] for arm, rs in arms.items()}
        for arm in arms:
            r = first[arm]
            proc = f", processor {r['processor_s']:.2f} s" if arm != "qwen" else ", patch tensors given"
            rows.append(Row(
                f"Real scale {shape}", f"{media}: {LABEL[arm]}",
                f"TTFT {ttft[arm]:.2f} s{proc}; peak RSS {r['peak_rss'] / 2**30:.2f} GiB; {r['visual_tokens']} "
                f"visual tokens, {r['seq_len']}-token prompt", None, "-", None, command,
            ))  # fmt: skip
        model_s = {arm: statistics.median(r["ttft_s"] - r["processor_s"] for r in rs) for arm, rs in arms.items()}
        if "qwen" in model_s:  # absent when --arms leaves it out
            ratio = model_s["qwen"] / model_s["off"]
            rows.append(Row(
                f"Real scale {shape}", f"{media}: ours unpruned vs Qwen2.5-VL at equal visual tokens (model: generate)",
                f"{model_s['off']:.2f} s vs {model_s['qwen']:.2f} s", ratio, ">= 1.0x", ratio >= 1.0, command,
                "ratio = Qwen2.5-VL time / our time; both generate(max_new_tokens=1) from ready tensors (processors "
                "not timed here; ours is in the TTFT rows)",
            ))  # fmt: skip
        for stage in STAGES:
            if stage not in ttft:
                continue
            ratio = ttft["off"] / ttft[stage]
            default = default_stage == STAGES[stage]
            rows.append(Row(
                f"Real scale {shape}", f"{media}: pruning {STAGES[stage].replace('_', '-')} vs off, end to end (TTFT)"
                + (" [default]" if default else ""),
                f"{first[stage]['visual_tokens']} of {first[stage]['all_visual_tokens']} tokens kept; "
                f"{ttft['off']:.2f} s vs {ttft[stage]:.2f} s", ratio, ">= 3x" if default else "-",
                (ratio >= 3) if default else None, command, "ratio = unpruned / pruned",
            ))  # fmt: skip
    return rows


def render(rows: list[Row], facts: dict, note: str) -> str:
    lines = ["| section | measurement | measured | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "-" if r.met is None else ("met" if r.met else "**not met**")
        lines.append(f"| {r.section} | {r.name} | {r.measured} | {ratio} | {r.goal} | {met} |")
    lines += ["", note, "", "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts.items()]
    return "\n".join(lines) + "\n"


def run(shapes=("1.5B",), media=("image", "volume", "video"), repeats: int = 1, threads: int = 1,
        quick: bool = False, only=None) -> tuple[list[Row], dict]:  # fmt: skip
    if quick:
        shapes = ("tiny",)
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            raw[shape] = measure(shape, media, repeats, threads, quick, Path(tmp), only)
            rows += summarise(shape, raw[shape], COMMAND + (" --quick" if quick else f" --shapes {shape}"))
    return rows, raw


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help="internal: one arm in this process, JSON on stdout")
    parser.add_argument("--shape", default="1.5B")
    parser.add_argument("--arm")
    parser.add_argument("--block")
    parser.add_argument("--grid")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--shapes", default="1.5B")
    parser.add_argument("--media", default="image,volume,video")
    parser.add_argument("--arms", default=None, help="only these arms (comma-separated: post, pre, reuse, qwen); "
                        "the unpruned arm always runs, every ratio is against it")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (one arm at a time)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and inputs (a smoke test)")
    parser.add_argument("--lowmem", action="store_true", help="load a saved random checkpoint: bf16 vs torchao int8")
    parser.add_argument("--lowmem-arms", default=",".join(LOWMEM_ARMS),
                        help="--lowmem: bf16, int8 (the saved int8 variant), int8_at_load")  # fmt: skip
    parser.add_argument("--folder", type=Path, help="--lowmem: where the checkpoint is written (deleted after)")
    parser.add_argument("--quantize", action="store_true", help="internal: --lowmem child making the int8 variant")
    parser.add_argument("--out", type=Path, help="internal: --quantize's output folder")
    args = parser.parse_args(argv)
    if args.child and args.lowmem and args.quantize:
        print(json.dumps(child_quantize(args)))
        return
    if args.child and args.lowmem:
        print(json.dumps(child_lowmem(args)))
        return
    if args.child:
        print(json.dumps(child(args)))
        return
    start = time.perf_counter()
    load = os.getloadavg()
    if args.lowmem:
        rows, raw = [], {}
        for shape in ("tiny",) if args.quick else args.shapes.split(","):
            folder = args.folder or Path(tempfile.mkdtemp(prefix="omnivmed-lowmem-")) / "checkpoint"
            arms = tuple(args.lowmem_arms.split(","))
            if set(arms) - {"bf16", "int8", "int8_at_load"}:
                raise SystemExit(f"--lowmem-arms: choose from bf16, int8, int8_at_load (got {args.lowmem_arms})")
            raw[shape] = measure_lowmem(shape, args.repeats, args.threads, args.quick, folder, arms)
            rows += summarise_lowmem(shape, raw[shape], COMMAND + f" --lowmem --shapes {shape}")
    else:
        only = None if args.arms is None else set(args.arms.split(","))
        rows, raw = run(tuple(args.shapes.split(",")), tuple(args.media.split(",")), args.repeats, args.threads,
                        args.quick, only)  # fmt: skip
    facts = machine_facts()
    facts["torch threads per arm"] = args.threads
    facts["load average (1, 5, 15 min) at start / end"] = (
        ", ".join(f"{x:.1f}" for x in load) + " / " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    facts["wall time"] = f"{time.perf_counter() - start:.0f} s"
    note = ("Low-memory rows: each arm loads the saved random checkpoint in a fresh process; " if args.lowmem else "")
    note += (f"bf16, sdpa, random weights; {args.repeats} round(s) of interleaved arms, each arm in a fresh process "
            f"with {args.threads} torch thread(s); TTFT = processor + generate(max_new_tokens=1); peak RSS = the "
            "child's VmHWM (model included).")
    text = render(rows, facts, note)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "results": raw}, indent=1, default=str))


if __name__ == "__main__":
    main()
