"""The paper's three claims, measured in miniature on the embedded default's tasks, on CPU; writes EVIDENCE.md.

    python ablate_omnivmed.py            # the full evidence run (3 seeds per training arm; see EVIDENCE.md for time)
    python ablate_omnivmed.py --quick    # smoke run: the 'small' dataset and a few steps per stage (minutes)
    python ablate_omnivmed.py --report_only   # rewrite EVIDENCE.md + PNGs from the results already on disk

Claims and arms (every training arm starts from a fresh tiny OmniV-Med built with the seed, and runs train_trl.py's
stages on the embedded default dataset of data_omnivmed.py; the dataset is built once, seed 0):
  1. Position encoding: the RoPE tower (`rope_frame`, the model) vs the same tower with a learned absolute (S x S)
     table bilinearly interpolated to each grid and no RoPE (`learned_frame`, SigLIP's scheme), and frame vs clip
     attention scope (`rope_clip`). Trained on 2D (stages 1-2), scored on every held-out task (3D / video rows are
     zero-shot there), then after stage 3.
  2. Token pruning: one sweep at evaluation time over each trained `rope_frame` model (threshold 0 / 0.05 / 0.1 /
     0.2 / 0.3 x reference last_kept / previous x stage post_encoder / pre_encoder) on the held-out volume and video
     rows: visual tokens kept, prefill time (tower + LLM forward) relative to no pruning, accuracy per task.
  3. Curriculum: progressive (stage 1 -> 2 -> 3, the `rope_frame` arm) vs `joint` (all three stages' rows in one
     run with every module trained, stage 3's learning rates), at equal total optimizer steps and batch size.

Every arm x seed runs in its own process (`--jobs` at a time, one torch thread each) and leaves
OUT/arms/ARM/seedN/results.json; a rerun skips finished ones, so an interrupted run resumes where it stopped.
"""

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn


ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import data_omnivmed  # noqa: E402
import train_trl  # noqa: E402 (an ablation arm is a training run: train_trl.main with a loss-recording callback)
from omnivmed.collator_omnivmed import OmniVMedCollator  # noqa: E402
from omnivmed.configuration_omnivmed import OmniVMedConfig  # noqa: E402
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration, OmniVMedVisionModel  # noqa: E402
from omnivmed.processing_omnivmed import IM_END, OmniVMedProcessor  # noqa: E402
from omnivmed_tools import (  # noqa: E402
    TINY_TEXT,
    TINY_VISION,
    build_tiny,
    build_tiny_tokenizer,
    load_processor,
    load_rows,
    save_hub_folder,
    token_ids,
)

logger = logging.getLogger("ablate_omnivmed")

ARMS = {
    # name: (vision config overrides, schedule); the prune-stage arms are in STAGE_ARMS
    "rope_frame": ({}, "progressive"),
    "learned_frame": ({"position_embedding": "learned", "position_table_size": 16}, "progressive"),
    "rope_clip": ({"attention_scope": "clip"}, "progressive"),
    "joint": ({}, "joint"),
    "post_encoder": ({}, "progressive"),
    "pre_encoder": ({}, "progressive"),
    "pre_encoder_reuse": ({}, "progressive"),
}
# The model arm with its prune stage pinned, so the comparison does not move when the config default does: trained
# (stage 3) and scored with the same stage, as a user of each checkpoint would run it.
STAGE_ARMS = {"post_encoder": "post_encoder", "pre_encoder": "pre_encoder", "pre_encoder_reuse": "pre_encoder_reuse"}
ARM_LABELS = {
    "rope_frame": "RoPE, frame scope (model)",
    "learned_frame": "learned table, frame scope",
    "rope_clip": "RoPE, clip scope",
    "joint": "joint (all data at once)",
    "post_encoder": "RoPE, frame scope, post-encoder pruning",
    "pre_encoder": "RoPE, frame scope, pre-encoder pruning",
    "pre_encoder_reuse": "RoPE, frame scope, pre-encoder pruning reusing pruned keys / values",
}
THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3)
REFERENCES = ("last_kept", "previous")
PRUNE_STAGES = ("post_encoder", "pre_encoder")
FULL = dict(size="full", steps=(20, 200, 300), seeds=(0, 1, 2), tower_warmup_steps=1500)
QUICK = dict(size="small", steps=(2, 6, 8), seeds=(0, 1, 2), tower_warmup_steps=3)
TRAINING = dict(per_device_train_batch_size=8, cache_media=4096, warmup_ratio=0.05, lr_scheduler_type="cosine")


# ------------------------------------------------------------------------------------ the learned position table arm
class LearnedPositionVisionModel(OmniVMedVisionModel):
    """Claim 1's comparison arm, SigLIP's scheme: no RoPE; a learned absolute (S x S x D) table (S =
    `vision_config.position_table_size`, default 16), bilinearly interpolated to each frame's (h, w) patch grid and
    added after the patch embedding (t gets nothing)."""

    def __init__(self, config):
        super().__init__(config)
        size = getattr(config, "position_table_size", 16)
        if size < 1:
            raise ValueError(f"position_table_size must be >= 1, got {size}")
        self.position_embedding = nn.Embedding(size**2, config.hidden_size)
        self._init_weights(self.position_embedding)

    def absolute_positions(
        self, grid_thw: torch.Tensor, patch_positions: torch.Tensor, patch_keep_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The learned (S, S, D) table resized (bilinear) to each patch's frame grid (h, w), read at the patch's
        (h, w): (N or N_kept, D). The t axis gets nothing, as in SigLIP applied frame by frame."""
        size = getattr(self.config, "position_table_size", 16)
        table = self.position_embedding.weight.view(size, size, -1).permute(2, 0, 1).unsqueeze(0)  # (1, D, S, S)
        # which frame grid each patch has is worked out on the CPU; the reads happen on the table's device
        grid_thw, patch_positions = grid_thw.cpu(), patch_positions.to(table.device)
        grids = torch.repeat_interleave(grid_thw[:, 1:], grid_thw.prod(-1), dim=0)  # (N, 2) frame grid per patch
        if patch_keep_mask is not None:
            grids = grids[patch_keep_mask.cpu()]
        out = table.new_zeros(patch_positions.shape[0], table.shape[1])
        for h, w in torch.unique(grids, dim=0).tolist():
            resized = nn.functional.interpolate(table, size=(h, w), mode="bilinear", align_corners=False)[0]
            rows = ((grids[:, 0] == h) & (grids[:, 1] == w)).nonzero().squeeze(-1).to(table.device)
            out[rows] = resized[:, patch_positions[rows, 1], patch_positions[rows, 2]].t()
        return out


class LearnedPositionOmniVMed(OmniVMedForConditionalGeneration):
    """OmniV-Med with the learned-table tower: what the `learned_frame` arm trains, saves and loads."""

    def __init__(self, config):
        super().__init__(config)
        self.model.vision_tower = LearnedPositionVisionModel(config.vision_config)


def model_class_for(vision_config) -> type:
    """The arm's model class: a vision config (dict or config) with position_embedding="learned" gets the table."""
    get = vision_config.get if isinstance(vision_config, dict) else lambda k: getattr(vision_config, k, None)
    return LearnedPositionOmniVMed if get("position_embedding") == "learned" else OmniVMedForConditionalGeneration


# ------------------------------------------------------------------------------------------------------ one arm x seed
def build_base(out: Path, seed: int, vision_overrides: dict, prune_stage: str | None = None) -> Path:
    """A fresh tiny model at the embedded default's pixel budget; the model arm is exactly train_trl's base."""
    if (out / "config.json").exists():
        return out
    build_tiny(out, seed)
    if vision_overrides:  # same text model and tokenizer as build_tiny, other tower config
        tokenizer = build_tiny_tokenizer(seed=0)
        text = dict(TINY_TEXT, vocab_size=-(-len(tokenizer) // 64) * 64, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.convert_tokens_to_ids(IM_END), bos_token_id=None)  # fmt: skip
        config = OmniVMedConfig(text_config=text, vision_config=dict(TINY_VISION, **vision_overrides),
                                tie_word_embeddings=True, **token_ids(tokenizer))  # fmt: skip
        torch.manual_seed(seed)
        model = model_class_for(vision_overrides)(config).eval()
        processor = OmniVMedProcessor.from_pretrained(out, trust_remote_code=True)
        save_hub_folder(model, processor, out, title="OmniV-Med tiny ablation arm (random weights)",
                        description=f"vision overrides {vision_overrides}", repo=out.name)  # fmt: skip
    if prune_stage is not None:  # config.json is the one source of pruning settings; the weights are unchanged
        config = OmniVMedConfig.from_pretrained(out)
        config.prune_stage = config.train_prune_stage = prune_stage  # the arm trains and answers with its stage
        config.save_pretrained(out)
    processor = OmniVMedProcessor.from_pretrained(out, trust_remote_code=True, **data_omnivmed.DEFAULT_PROCESSOR)
    processor.save_pretrained(out)
    return out


def _loss_recorder():
    from transformers import TrainerCallback

    class LossRecorder(TrainerCallback):
        """Training loss of every logging step, with the stage folder it came from."""

        def __init__(self):
            self.logs, self.stage = [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.stage = Path(args.output_dir).name

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(stage=self.stage, step=state.global_step, loss=float(logs["loss"])))

    return LossRecorder()


def answer_rows(model, processor, collator, rows, batch_size=16, prune: dict | None = None, time_forward=False):
    """Greedy answers (as data_omnivmed.evaluate_default), visual tokens kept, and the summed prefill time."""
    answers, kept, total, forward_s = [], 0, 0, 0.0
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        conversations = [collator.conversation(r, drop_last_assistant=True) for r in batch_rows]
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            padding=True, padding_side="left", **(prune or {}),
        )  # fmt: skip
        inputs.pop("media_metadata", None)
        keep = inputs.get("visual_keep_mask")
        if keep is not None:
            kept, total = kept + int(keep.sum()), total + keep.numel()
        with torch.no_grad():
            if time_forward:
                t0 = time.perf_counter()
                model(**inputs)
                forward_s += time.perf_counter() - t0
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers, kept, total, forward_s


def eval_selection(rows, eval_limit: int):
    if eval_limit and len(rows) > eval_limit:  # an even stride over the held-out rows
        rows = rows[:: math.ceil(len(rows) / eval_limit)]
    return rows


def sweep_selection(rows, sweep_rows: int):
    multi = [r for r in rows if json.loads(r["meta"])["kind"] in ("volume", "video")]
    if sweep_rows and len(multi) > sweep_rows:
        # a seeded random sample: an even stride falls in step with the order the dataset writes its items in
        # (every other row was a left / up video and a lesion-present volume)
        keep = sorted(random.Random(0).sample(range(len(multi)), sweep_rows))
        multi = [multi[i] for i in keep]
    return multi


def sweep_configs():
    for stage in PRUNE_STAGES:
        for reference in REFERENCES:
            for threshold in THRESHOLDS:
                if threshold == 0 and (stage, reference) != (PRUNE_STAGES[0], REFERENCES[0]):
                    continue  # threshold 0 is the same unpruned model in every mode
                yield stage, reference, threshold


def measure_prefill(out: Path, data: Path, eval_limit: int, sweep_rows: int, repeats: int = 5) -> dict:
    """Prefill time of the sweep's rows per pruning config, measured apart from training: one process, one thread,
    configs interleaved, median of `repeats` (the time does not depend on the weights, so a fresh model serves)."""
    torch.set_num_threads(1)
    base = build_base(out / "timing-base", 0, {})
    model = OmniVMedForConditionalGeneration.from_pretrained(base).eval()
    processor = load_processor(base)
    collator = OmniVMedCollator(processor, cache_size=100000)
    rows = sweep_selection(eval_selection(load_rows([data / "eval.jsonl"], data), eval_limit), sweep_rows)
    inputs = {}
    for stage, reference, threshold in sweep_configs():
        batches = []
        for start in range(0, len(rows), 16):
            conversations = [collator.conversation(r, drop_last_assistant=True) for r in rows[start : start + 16]]
            batch = processor.apply_chat_template(
                conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                padding=True, padding_side="left", prune_threshold=threshold, prune_reference=reference,
            )  # fmt: skip
            batch.pop("media_metadata", None)
            batches.append(batch)
        inputs[(stage, reference, threshold)] = batches
    times = defaultdict(list)
    with torch.no_grad():
        for _ in range(repeats):
            for (stage, reference, threshold), batches in inputs.items():
                model.config.prune_stage = stage
                t0 = time.perf_counter()
                for batch in batches:
                    model(**batch)
                times[(stage, reference, threshold)].append(time.perf_counter() - t0)
    shutil.rmtree(out / "timing-base", ignore_errors=True)
    return {"repeats": repeats, "rows": len(rows), "points": [
        dict(stage=s, reference=r, threshold=t, seconds=statistics.median(v)) for (s, r, t), v in times.items()]}


def evaluate(model_dir: Path, rows, data_root, prune_sweep=False, sweep_rows=0) -> dict:

    model_class = model_class_for(OmniVMedConfig.from_pretrained(model_dir).vision_config)
    model = model_class.from_pretrained(model_dir).eval()
    processor = load_processor(model_dir)
    collator = OmniVMedCollator(processor, cache_size=100000)  # media are read once, then every config reuses them
    answers, kept, total, _ = answer_rows(model, processor, collator, rows)
    out = dict(table=data_omnivmed.score_rows(rows, answers)["table"], kept=kept, total=total,
               processor_prune_threshold=processor.image_processor.prune_threshold,
               prune_stage=model.config.prune_stage)  # fmt: skip
    if not prune_sweep:
        return out
    multi = sweep_selection(rows, sweep_rows)
    sweep = []
    for stage, reference, threshold in sweep_configs():
        model.config.prune_stage = stage  # read at every forward
        prune = dict(prune_threshold=threshold, prune_reference=reference)
        answers, kept, total, forward_s = answer_rows(model, processor, collator, multi, prune=prune, time_forward=True)
        sweep.append(dict(stage=stage, reference=reference, threshold=threshold, kept=kept, total=total,
                          forward_s=forward_s, table=data_omnivmed.score_rows(multi, answers)["table"]))  # fmt: skip
    out["sweep"] = sweep
    return out


def run_worker(spec: dict) -> None:
    """Train one arm with one seed through train_trl.main, score it, write results.json."""
    torch.set_num_threads(1)
    started = time.time()
    out = Path(spec["dir"])
    data = Path(spec["data"])
    vision, schedule = ARMS[spec["arm"]]
    # the claim 1 / 3 arms pinned to post-encoder, as they were measured (and the learned-table and clip-scope
    # towers cannot run pre_encoder_reuse)
    base = build_base(out / "base", spec["seed"], vision, STAGE_ARMS.get(spec["arm"], "post_encoder"))
    if spec.get("tower_warmup_steps"):  # as train_trl does for its fresh tiny model: the same start for every arm
        stage1 = load_rows([data / "stage1.jsonl"], data)
        base = train_trl.warm_up_tower(base, stage1, out / "tower-warmup", spec["tower_warmup_steps"], 1e-3,
                                       2 * TRAINING["per_device_train_batch_size"], spec["seed"],
                                       model_class_for(vision))  # fmt: skip
    s1, s2, s3 = spec["steps"]
    common = ["--model", str(base), "--data_root", str(data), "--lr_preset", "tiny", "--seed", str(spec["seed"]),
              "--output_dir", str(out), "--num_threads", "1", "--eval", "no",
              "--logging_steps", str(max(1, spec["logging_steps"]))]  # fmt: skip
    common += [f"--{k}={v}" for k, v in TRAINING.items()]
    if schedule == "progressive":
        argv = common + ["--stages", "1,2,3", "--max_steps", f"{s1},{s2},{s3}"]
        argv += [f"--stage{s}_data={data / f'stage{s}.jsonl'}" for s in (1, 2, 3)]
    else:
        argv = common + ["--stages", "3", "--max_steps", str(s1 + s2 + s3),
                         "--stage3_data=" + ",".join(str(data / f"stage{s}.jsonl") for s in (1, 2, 3))]  # fmt: skip
    recorder = _loss_recorder()
    logging.getLogger("train_trl").info("ablation %s seed %d: train_trl.py %s", spec["arm"], spec["seed"], " ".join(argv))
    final = train_trl.main(argv, callbacks=[recorder], model_class=model_class_for(vision))
    trained = time.time() - started

    rows = load_rows([data / "eval.jsonl"], data)
    rows = eval_selection(rows, spec.get("eval_limit", 0))
    result = dict(arm=spec["arm"], seed=spec["seed"], steps=spec["steps"], schedule=schedule, vision=vision,
                  argv=argv, losses=recorder.logs, train_s=trained,
                  tower_warmup_steps=spec.get("tower_warmup_steps", 0))  # fmt: skip
    if schedule == "progressive":
        result["after_stage2"] = evaluate(out / "stage2-instruct2d" / "model", rows, data)
    result["final"] = evaluate(final, rows, data, prune_sweep=spec.get("sweep", False),
                               sweep_rows=spec.get("sweep_rows", 0))
    result["wall_s"] = time.time() - started
    result["cpu_s"] = time.process_time()  # one torch thread: what the run costs a free core, whatever the load
    if not spec.get("keep_models"):  # keep only what a rerun of the report could need: nothing but results
        for name in ("base", "stage1-alignment", "stage2-instruct2d", "stage3-mixed", "final"):
            shutil.rmtree(out / name, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------------------- orchestration
def _claim(spec: dict) -> bool:
    """Take an arm x seed run for this orchestrator unless it is finished or a live process holds it (several
    orchestrators may share one output folder: each claims runs right before starting them)."""
    d = Path(spec["dir"])
    d.mkdir(parents=True, exist_ok=True)
    if (d / "results.json").exists():
        return False
    claim = d / "claim.pid"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(claim.read_text().split()[0])
                os.kill(pid, 0)
                return False  # alive: someone else runs it
            except (ValueError, IndexError, ProcessLookupError, PermissionError, FileNotFoundError):
                claim.unlink(missing_ok=True)  # stale claim of a process that died
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def run_all(args, specs: list[dict]) -> float:
    """Run the specs whose results.json is missing, `args.jobs` processes at a time; returns the wall time."""
    todo = [s for s in specs if not (Path(s["dir"]) / "results.json").exists()]
    logger.info("%d of %d arm x seed runs to do (%d jobs)", len(todo), len(specs), args.jobs)
    started = time.time()
    running: list[tuple[subprocess.Popen, dict, float]] = []
    failed = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TQDM_DISABLE="1")  # fmt: skip
    from tqdm.auto import tqdm

    progress = tqdm(total=len(todo), desc="ablation runs", unit="run")
    while todo or running:
        while todo and len(running) < args.jobs:
            spec = todo.pop(0)
            if not _claim(spec):
                progress.update()
                continue
            d = Path(spec["dir"])
            (d / "spec.json").write_text(json.dumps(spec))
            log = open(d / "log.txt", "w")
            proc = subprocess.Popen([sys.executable, str(ROOT / "ablate_omnivmed.py"), "--_worker", str(d / "spec.json")],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))  # fmt: skip
            (d / "claim.pid").write_text(str(proc.pid))
            running.append((proc, spec, time.time()))
        time.sleep(0.5)
        for item in list(running):
            proc, spec, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            (Path(spec["dir"]) / "claim.pid").unlink(missing_ok=True)
            progress.update()
            if proc.returncode:
                failed.append(spec)
                logger.error("%s seed %d failed (exit %d): see %s", spec["arm"], spec["seed"], proc.returncode,
                             Path(spec["dir"]) / "log.txt")  # fmt: skip
            else:
                logger.info("%s seed %d done in %.0f s", spec["arm"], spec["seed"], time.time() - t0)
    progress.close()
    if failed:
        logger.error("%d runs failed; the report covers the others", len(failed))
    return time.time() - started


def make_specs(args, out: Path, data: Path) -> list[dict]:
    specs = []
    for seed in args.seeds:  # seed-major: a run cut short still has every arm at its first seeds
        for arm in args.arms:
            specs.append(dict(arm=arm, seed=seed, dir=str(out / "arms" / arm / f"seed{seed}"), data=str(data),
                              steps=list(args.steps), sweep=(arm == "rope_frame"), eval_limit=args.eval_limit,
                              sweep_rows=args.sweep_rows, tower_warmup_steps=args.tower_warmup_steps,
                              logging_steps=max(1, sum(args.steps) // 40), keep_models=args.keep_models))  # fmt: skip
    return specs


# ------------------------------------------------------------------------------------------------------------- report
def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], pct=True) -> str:
    if not values:
        return "—"
    m, s = mean_sd(values)
    scale = 100 if pct else 1
    return f"{m * scale:.0f} ± {s * scale:.0f}" if pct else f"{m:.2f} ± {s:.2f}"


def learned(values: list[float], floor: float) -> bool:
    """Above both chance and the majority-answer rate beyond the seed spread: mean - 2 SEM > floor, and >= 5 points
    above it (with one seed: 10 points)."""
    if not values:
        return False
    m, s = mean_sd(values)
    if len(values) == 1:
        return m > floor + 0.10
    return m - 2 * s / math.sqrt(len(values)) > floor and m > floor + 0.05


def _rows_by_key(table):
    return {(r["task"], r["kind"]): r for r in table}


def collect(out: Path, arms, seeds, steps, tower_warmup_steps: int = 0) -> dict:
    results = defaultdict(dict)
    for arm in arms:
        for seed in seeds:
            path = out / "arms" / arm / f"seed{seed}" / "results.json"
            if path.exists():
                res = json.loads(path.read_text())
                if tuple(res["steps"]) != tuple(steps):
                    raise SystemExit(f"{path} was trained with steps {res['steps']}, not {list(steps)}: use another "
                                     "--out folder for other steps (finished runs are reused by folder)")  # fmt: skip
                if res.get("tower_warmup_steps", 0) != tower_warmup_steps:
                    raise SystemExit(f"{path} had {res.get('tower_warmup_steps', 0)} tower warm-up steps, not "
                                     f"{tower_warmup_steps}: use another --out folder")  # fmt: skip
                results[arm][seed] = res
    return results


def accuracy_values(results, arm, point, key) -> list[float]:
    vals = []
    for res in results.get(arm, {}).values():
        if point in res:
            row = _rows_by_key(res[point]["table"]).get(key)
            if row:
                vals.append(row["accuracy"])
    return vals


def overall(table, kinds=None, keys=None) -> float:
    rows = [r for r in table if (kinds is None or r["kind"] in kinds) and (keys is None or (r["task"], r["kind"]) in keys)]
    n = sum(r["n"] for r in rows)
    return sum(r["accuracy"] * r["n"] for r in rows) / n if n else math.nan


def reference_rows(results) -> dict:
    """(task, kind) -> row with n, chance, majority, from any finished run (the same eval rows in every run)."""
    for arm_results in results.values():
        for res in arm_results.values():
            return _rows_by_key(res["final"]["table"])
    return {}


def claim1_tables(results) -> tuple[str, list[str]]:
    ref = reference_rows(results)
    arms = [a for a in ("rope_frame", "learned_frame", "rope_clip") if results.get(a)]
    head = "| task | input | n | chance / majority | " + " | ".join(
        f"{ARM_LABELS[a]}: after stage 2 | {ARM_LABELS[a]}: after stage 3" for a in arms) + " |"  # fmt: skip
    lines = [head, "|" + "---|" * (4 + 2 * len(arms))]
    notes = []
    for key, r in ref.items():
        floor = max(r["chance"], r["majority"])
        cells = []
        any_learned = False
        for a in arms:
            for point in ("after_stage2", "final"):
                vals = accuracy_values(results, a, point, key)
                mark = " ✓" if learned(vals, floor) else ""
                any_learned |= bool(mark)
                cells.append(fmt(vals) + mark)
        zero = " (3D/video zero-shot after stage 2)" if key[1] != "image" else ""
        lines.append(f"| {key[0]} | {key[1]}{zero} | {r['n']} | {r['chance']:.0%} / {r['majority']:.0%} | "
                     + " | ".join(cells) + " |")  # fmt: skip
        if not any_learned:
            notes.append(f"{key[0]} / {key[1]}")
    return "\n".join(lines), notes


def paired_diff(results, arm_a, arm_b, point_a, point_b, key=None, kinds=None, keys=None) -> list[float]:
    diffs = []
    for seed in sorted(set(results.get(arm_a, {})) & set(results.get(arm_b, {}))):
        ta, tb = results[arm_a][seed][point_a]["table"], results[arm_b][seed][point_b]["table"]
        if key is not None:
            ra, rb = _rows_by_key(ta).get(key), _rows_by_key(tb).get(key)
            if ra and rb:
                diffs.append(ra["accuracy"] - rb["accuracy"])
        else:
            a, b = overall(ta, kinds, keys), overall(tb, kinds, keys)
            if not (math.isnan(a) or math.isnan(b)):
                diffs.append(a - b)
    return diffs


def claim1_summary(results) -> str:
    lines = ["| comparison (paired by seed, points of accuracy) | image | volume | video | all |", "|---|---|---|---|---|"]
    for a, b, label in (("rope_frame", "learned_frame", "RoPE − learned table"),
                        ("rope_clip", "rope_frame", "clip − frame scope")):  # fmt: skip
        if not (results.get(a) and results.get(b)):
            continue
        for point, name in (("after_stage2", "after stage 2"), ("final", "after stage 3")):
            cells = [fmt(paired_diff(results, a, b, point, point, kinds=k)) for k in (("image",), ("volume",),
                     ("video",), None)]  # fmt: skip
            lines.append(f"| {label}, {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


STAGE_LABELS = {"post_encoder": "post-encoder", "pre_encoder": "pre-encoder", "pre_encoder_reuse": "pre-encoder reuse"}


def stage_table(results) -> str:
    """The prune-stage arms, each trained and scored with its own stage: per task, 2D, 3D + video and overall, each
    pre-encoder arm paired with post-encoder."""
    ref = reference_rows(results)
    arms = [arm for arm in STAGE_LABELS if results.get(arm)]
    others = [arm for arm in arms if arm != "post_encoder"]
    lines = ["| task | input | n | chance / majority | " + " | ".join(STAGE_LABELS[a] for a in arms) + " | "
             + " | ".join(f"{STAGE_LABELS[a]} − post (paired)" for a in others) + " |",
             "|" + "---|" * (4 + len(arms) + len(others))]  # fmt: skip
    for key, r in ref.items():
        floor = max(r["chance"], r["majority"])
        cells = []
        for arm in arms:
            vals = accuracy_values(results, arm, "final", key)
            cells.append(fmt(vals) + (" ✓" if learned(vals, floor) else ""))
        cells += [fmt(paired_diff(results, arm, "post_encoder", "final", "final", key=key)) for arm in others]
        lines.append(f"| {key[0]} | {key[1]} | {r['n']} | {r['chance']:.0%} / {r['majority']:.0%} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    for kinds, label in ((("volume", "video"), "**3D + video**"), (("image",), "**2D**"), (None, "**all**")):
        cells = [fmt([overall(res["final"]["table"], kinds) for res in results[arm].values()]) for arm in arms]
        cells += [fmt(paired_diff(results, arm, "post_encoder", "final", "final", kinds=kinds)) for arm in others]
        lines.append(f"| {label} | | | | " + " | ".join(cells) + " |")
    kept = [fmt([res["final"]["kept"] / max(1, res["final"]["total"]) for res in results[arm].values()]) for arm in arms]
    lines.append("| visual tokens kept (%) | | | | " + " | ".join(kept) + " |" + " |" * len(others))
    return "\n".join(lines)


def claim3_table(results) -> str:
    ref = reference_rows(results)
    lines = ["| task | input | n | chance / majority | progressive 1→2→3 | joint | progressive − joint (paired) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in ref.items():
        floor = max(r["chance"], r["majority"])
        p, j = accuracy_values(results, "rope_frame", "final", key), accuracy_values(results, "joint", "final", key)
        d = paired_diff(results, "rope_frame", "joint", "final", "final", key=key)
        lines.append(f"| {key[0]} | {key[1]} | {r['n']} | {r['chance']:.0%} / {r['majority']:.0%} | "
                     f"{fmt(p)}{' ✓' if learned(p, floor) else ''} | {fmt(j)}{' ✓' if learned(j, floor) else ''} | "
                     f"{fmt(d)} |")  # fmt: skip
    d = paired_diff(results, "rope_frame", "joint", "final", "final")
    p = [overall(res["final"]["table"]) for res in results.get("rope_frame", {}).values()]
    j = [overall(res["final"]["table"]) for res in results.get("joint", {}).values()]
    lines.append(f"| **all** | | | | {fmt(p)} | {fmt(j)} | {fmt(d)} |")
    return "\n".join(lines)


def sweep_points(results):
    """(stage, reference, threshold) -> per seed dict(kept, rel_time, table)."""
    points = defaultdict(list)
    for res in results.get("rope_frame", {}).values():
        sweep = res["final"].get("sweep") or []
        base = next((s for s in sweep if s["threshold"] == 0), None)
        for s in sweep:
            rel = s["forward_s"] / base["forward_s"] if base and base["forward_s"] else math.nan
            points[(s["stage"], s["reference"], s["threshold"])].append(
                dict(kept=s["kept"] / max(1, s["total"]), rel_time=rel, table=s["table"],
                     acc=overall(s["table"]), base_acc=overall(base["table"]) if base else math.nan))  # fmt: skip
    return points


def claim2_tables(results, timing: dict | None = None) -> tuple[str, str, list[str]]:
    points = sweep_points(results)
    if not points:
        return "", "", []
    clean = {}
    if timing:
        base = next(p["seconds"] for p in timing["points"] if p["threshold"] == 0)
        clean = {(p["stage"], p["reference"], p["threshold"]): p["seconds"] / base for p in timing["points"]}
    tasks = sorted({(r["task"], r["kind"]) for p in points.values() for run in p for r in run["table"]},
                   key=lambda k: (k[1], k[0]))  # fmt: skip
    lines = ["| stage | reference | threshold | visual tokens kept | prefill time vs no pruning | same, timed during "
             "the runs (noisy) | accuracy (3D + video) | change vs threshold 0 (paired) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    per_task = ["| stage | reference | threshold | " + " | ".join(f"{t} / {k}" for t, k in tasks) + " |",
                "|" + "---|" * (3 + len(tasks))]  # fmt: skip
    first_run = next(iter(points.values()))[0]["table"]
    floors = _rows_by_key(first_run)
    per_task.append("| chance / majority answer on these rows | | | " + " | ".join(
        f"{floors[k]['chance']:.0%} / {floors[k]['majority']:.0%}" if k in floors else "—" for k in tasks) + " |")
    drops = []
    for (stage, reference, threshold), runs in sorted(points.items(), key=lambda kv: (PRUNE_STAGES.index(kv[0][0]),
                                                      REFERENCES.index(kv[0][1]), kv[0][2])):  # fmt: skip
        diffs = [r["acc"] - r["base_acc"] for r in runs]
        rel = clean.get((stage, reference, threshold))
        lines.append(f"| {stage} | {reference} | {threshold:g} | {fmt([r['kept'] for r in runs])} % | "
                     f"{f'{rel:.2f}x' if rel is not None else '—'} | "
                     f"{fmt([r['rel_time'] for r in runs], pct=False)}x | {fmt([r['acc'] for r in runs])} | "
                     f"{fmt(diffs)} |")  # fmt: skip
        cells = []
        for key in tasks:
            cells.append(fmt([_rows_by_key(r["table"])[key]["accuracy"] for r in runs if key in _rows_by_key(r["table"])]))
        per_task.append(f"| {stage} | {reference} | {threshold:g} | " + " | ".join(cells) + " |")
        m, s = mean_sd(diffs)
        first = not any(d.startswith(f"{stage} / {reference}:") for d in drops)
        if threshold > 0 and first and m < 0 and (len(diffs) == 1 or -m > 2 * s / math.sqrt(len(diffs))):
            drops.append(f"{stage} / {reference}: {threshold:g} ({m * 100:+.0f} ± {s * 100:.0f} points, "
                         f"n={len(diffs)}{', no spread to compare with' if len(diffs) == 1 else ''})")  # fmt: skip
    return "\n".join(lines), "\n".join(per_task), drops


# PNG plots with Pillow (no plotting library among the project's requirements)
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(path: Path, series: list[tuple[str, list[float], list[float]]], title: str, xlabel: str, ylabel: str,
              vlines=(), size=(900, 560), ylim=None) -> None:  # fmt: skip
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 80, size[0] - 230, 40, size[1] - 60
    xs = [x for _, sx, _ in series for x in sx if not math.isnan(x)]
    ys = [y for _, _, sy in series for y in sy if not math.isnan(y)]
    if not xs or not ys:
        xs, ys = [0, 1], [0, 1]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = ylim if ylim else (y0 - pad, y1 + pad)

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    d.rectangle([left, top, right, bottom], outline="black")
    for i in range(6):
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        X, _ = px(xv, y0)
        _, Y = px(x0, yv)
        d.line([X, bottom, X, bottom + 5], fill="black")
        d.text((X - 12, bottom + 8), f"{xv:.3g}", fill="black")
        d.line([left - 5, Y, left, Y], fill="black")
        d.text((left - 48, Y - 6), f"{yv:.3g}", fill="black")
    for xv in vlines:
        X, _ = px(xv, y0)
        d.line([X, top, X, bottom], fill=(180, 180, 180))
    d.text((left, 12), title, fill="black")
    d.text(((left + right) / 2 - 40, bottom + 30), xlabel, fill="black")
    d.text((8, top - 30), ylabel, fill="black")
    for i, (label, sx, sy) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pts = [px(x, y) for x, y in zip(sx, sy) if not (math.isnan(x) or math.isnan(y))]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for X, Y in pts:
            d.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=color)
        d.rectangle([right + 15, top + 20 * i + 4, right + 30, top + 20 * i + 14], fill=color)
        d.text((right + 36, top + 20 * i + 3), label, fill="black")
    img.save(path)


def plot_sweep(results, path: Path) -> bool:
    points = sweep_points(results)
    if not points:
        return False
    series = []
    for stage in PRUNE_STAGES:
        for reference in REFERENCES:
            pts = sorted((t, runs) for (s, r, t), runs in points.items() if (s == stage and r == reference) or t == 0)
            xs = [mean_sd([r["kept"] * 100 for r in runs])[0] for _, runs in pts]
            ys = [mean_sd([r["acc"] * 100 for r in runs])[0] for _, runs in pts]
            series.append((f"{stage}, {reference}", xs, ys))
    line_plot(path, series, "Claim 2: accuracy on held-out volume + video questions vs visual tokens kept "
              "(thresholds 0-0.3, mean over seeds)", "visual tokens kept (%)", "accuracy (%)", ylim=(0, 100))  # fmt: skip
    return True


def plot_losses(results, path: Path) -> bool:
    stages = ("stage1-alignment", "stage2-instruct2d", "stage3-mixed")
    series, vlines = [], []
    for arm in ARMS:
        runs = list(results.get(arm, {}).values())
        if not runs:
            continue
        steps = runs[0]["steps"]
        # progressive: stages laid end to end; joint: its one run (logged as stage 3) from step 0
        offsets = {st: sum(steps[:i]) for i, st in enumerate(stages)} if ARMS[arm][1] == "progressive" else {}
        by_step = defaultdict(list)
        for res in runs:
            for log in res["losses"]:
                by_step[offsets.get(log["stage"], 0) + log["step"]].append(log["loss"])
        if offsets and not vlines:
            vlines = [sum(steps[: i + 1]) for i in range(3)]
        xs = sorted(by_step)
        series.append((ARM_LABELS[arm], xs, [statistics.fmean(by_step[x]) for x in xs]))
    if not series:
        return False
    line_plot(path, series, "Training loss per logging step, stages laid end to end (grey: stage ends of the "
              "progressive arms; mean over seeds)", "optimizer step (cumulative)", "loss", vlines=vlines)  # fmt: skip
    return True


HAND_RUN = ("<!-- hand-run: kept as it is when this file is regenerated -->", "<!-- /hand-run -->")


def hand_run_blocks(report: Path) -> list[str]:
    """The report's hand-run sections (between HAND_RUN's markers, markers included): results of runs this script
    does not make (e.g. the embedded default over many seeds), carried into the regenerated report."""
    if not report.exists():
        return []
    return re.findall(re.escape(HAND_RUN[0]) + r".*?" + re.escape(HAND_RUN[1]), report.read_text(), flags=re.S)


def write_report(args, out: Path, results, timing: dict) -> Path:
    report = ROOT / "EVIDENCE.md" if args.report is None else Path(args.report)
    hand_run = hand_run_blocks(report)
    fig_dir = report.parent / "docs" / "evidence" if args.report is None else report.parent
    fig_dir.mkdir(parents=True, exist_ok=True)
    sweep_png, loss_png = fig_dir / "accuracy_vs_tokens_kept.png", fig_dir / "loss_curves.png"
    have_sweep, have_loss = plot_sweep(results, sweep_png), plot_losses(results, loss_png)
    counts = {a: len(results.get(a, {})) for a in args.arms}
    missing = [f"{a} (seeds done: {sorted(results.get(a, {}))})" for a in args.arms if counts[a] < len(args.seeds)]
    wall = [r["wall_s"] for a in results.values() for r in a.values()]
    run_dirs = [out / "arms" / a / f"seed{seed}" for a in results for seed in results[a]]
    span = (max((d / "results.json").stat().st_mtime for d in run_dirs)
            - min((d / "spec.json").stat().st_mtime for d in run_dirs)) if run_dirs else 0.0  # fmt: skip
    t1, notes1 = claim1_tables(results)
    timing_path = out / "timing.json"
    prefill = json.loads(timing_path.read_text()) if timing_path.exists() else None
    t2, t2_tasks, drops = claim2_tables(results, prefill)
    command = "python ablate_omnivmed.py" + (" --quick" if args.quick else "") + "".join(
        f" {flag}" for flag in args.extra_flags)  # fmt: skip
    example = next((r for a in results.values() for r in a.values()), None)
    rel = os.path.relpath

    lines = [
        "# EVIDENCE: the paper's three claims, measured in miniature" + (" (QUICK SMOKE RUN: numbers mean nothing)" if args.quick else ""),
        "",
        f"Generated by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Rerunning the command "
        "regenerates this file and the plots; finished runs are reused (delete the output folder "
        f"`{rel(out, ROOT)}` to start over), `--report_only` rewrites the report from them.",
        "",
        "## Setup",
        "",
        f"- Data: the embedded default dataset (`data_omnivmed.build_default_dataset`, size `{args.size}`, built once "
        "with seed 0): 2D MNI152 / CT / other slices with planted ring lesions, NIfTI and DICOM volumes, synthetic "
        "endoscopy videos with a moving instrument. Held-out rows scored by greedy exact match "
        "(`data_omnivmed.score_rows`), 6 new tokens, as `evaluate_default` does" + (
            f"; at most {args.eval_limit} held-out rows, an even stride" if args.eval_limit else "") + ".",
        f"- Model: the tiny preset (~5M parameters, 56x56 px budget: 2x2 visual tokens per image / slice / frame, up "
        "to 8 slices or frames), fresh weights from each seed" + (
            f", its tower warmed up for {args.tower_warmup_steps} steps on the stage-1 captions before stage 1 "
            "(`train_trl.warm_up_tower`, the tiny model's stand-in for SigLIP pretraining; same for every arm)"
            if args.tower_warmup_steps else "") + ".",
        f"- Training: `train_trl.py` stages with `--lr_preset tiny`, batch 8, cosine schedule; steps per stage "
        f"{tuple(args.steps)} (the embedded default uses {(40, 400, 600)}); joint arm: {sum(args.steps)} steps on "
        "stage 1 + 2 + 3 rows at once. Seeds: " + ", ".join(map(str, args.seeds)) + ".",
        "- Spread: `mean ± sd` over seeds (sample standard deviation); differences are paired by seed. ✓ = above "
        "both chance and the majority-answer rate beyond the spread (mean − 2·SEM above it and ≥ 5 points).",
        f"- Evaluation-time pruning for the claim 1 / 3 tables: the processor's saved threshold "
        f"({example['final']['processor_prune_threshold'] if example else '?'}, reference last_kept, "
        f"{model_stage(results)}), as `evaluate_default`.",
        "",
        "## Time",
        "",
        (f"- This invocation: {timing['this_run_s'] / 60:.1f} min wall for {timing['ran']} new arm x seed runs "
         f"with {args.jobs} parallel processes." if timing.get("ran") else "- This invocation ran no new arm x seed run "
         "(the report was rewritten from finished ones)."),
        f"- All finished runs: {span / 60:.0f} min from the first one's start to the last one's end, on a machine "
        f"with {os.cpu_count()} cores, one torch thread per process (load average when the report was written: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; other sessions shared the cores, so times are upper "
        "bounds for 2 free cores).",
        f"- Per arm x seed run (train + evaluations{' + pruning sweep for rope_frame' if have_sweep else ''}): "
        + (f"{min(wall) / 60:.1f}-{max(wall) / 60:.1f} min, {sum(wall) / 60:.0f} min of process time in all"
           if wall else "none finished") + ".",  # fmt: skip
        cpu_line(results, args),
        "",
    ]
    if missing:
        lines += ["**Incomplete**: runs missing for " + "; ".join(missing) + f". Rerun `{command}` to finish them "
                  "(finished runs are kept).", ""]  # fmt: skip
    lines += [
        "## What a miniature result can say",
        "",
        "Everything here is a ~5M-parameter model trained for a few hundred steps on a 56x56 pixel budget (2x2 "
        "visual tokens per frame), on synthetic findings. A row where no arm is above chance says nothing about a "
        "claim: the model has not learned that task, whichever arm it is; a row that every arm gets near 100 % says "
        "little either (a ceiling hides differences). The "
        "claims concern a 400M-parameter tower on 384-px images and 252K real samples, where grids differ between "
        "images, slices and frames; here every grid is the same 4x4 patches, so the interpolation that a learned table "
        "needs for new grid sizes is never exercised, and what is compared is only how positions within one grid and "
        "across slices / frames are encoded. A difference found here is a hypothesis for the full-size model, and no "
        "difference here is weak evidence of none there.",
        "",
        f"At this run's budget ({' + '.join(map(str, args.steps))} steps, against the embedded default's 40 + 400 + "
        "600), the rows above chance in at least one arm of claim 1 (✓) are: "
        + (", ".join(f"{t} / {k}" for t, k in reference_rows(results) if f"{t} / {k}" not in notes1) or "none")
        + "; every other row says nothing about any claim.",
        "",
        "## Claim 1: RoPE tower vs a learned absolute position table; frame vs clip attention scope",
        "",
        "Trained on 2D (stages 1-2), then scored on every held-out task (volume and video rows are zero-shot after "
        "stage 2: stage 2 has no 3D or video data), then after stage 3 (mixed 2D + 3D + video). Accuracy in %.",
        "",
        t1 or "(no finished runs)",
        "",
        "Paired differences (overall accuracy per input kind, points):",
        "",
        claim1_summary(results) if t1 else "",
        "",
    ]
    if notes1:
        lines += ["Rows where no arm is above chance (they say nothing about claim 1): " + ", ".join(notes1) + ".", ""]
    lines += ["Accuracy far below chance (e.g. 0 %) means the answers are not among the task's options at all: after "
              "stage 2 the model has never seen a volume or video question, so it answers them with 2D answers.", ""]
    lines += ["## Claim 2: token pruning threshold sweep", ""]
    if t2:
        lines += [
            "One evaluation-time sweep over each trained `rope_frame` model (stages 1-3; stage 3 trained with pruning "
            f"at the model's threshold 0.1, last_kept, {model_stage(results)}) on held-out volume and video rows "
            + (f"(a seeded random sample of {args.sweep_rows})" if args.sweep_rows else "(all of them)")
            + "; 2D images are never pruned. Cheap, but it measures a model trained at one threshold, not one "
            "trained at each. "
            "Visual tokens kept and accuracy in %. Prefill time = one forward of the whole prompt (tower + projector "
            "+ LLM) over the sweep's rows, relative to threshold 0: "
            + (f"measured apart from training on a fresh model of the same shape (time does not depend on the weights), "
               f"one thread, configs interleaved, median of {prefill['repeats']} repeats"
               if prefill else "not measured apart from training yet") +
            "; the next column is the same ratio timed inside the training runs while other work shared the cores "
            "(per seed, too noisy to read). The prompts here are mostly text (at most 8 frames x 4 tokens), so "
            "pruning moves prefill time little; bench/bench_pruning.py measures the tower on long inputs.",
            "",
            t2,
            "",
            "Per task (accuracy %, mean ± sd over seeds). The sweep scores a sample of the held-out volume / video "
            "rows, so its per-task mix differs from the claim 1 tables: compare each column with its chance and "
            "majority-answer rate on these rows (first line).",
            "",
            t2_tasks,
            "",
            ("Accuracy (volume + video, paired with threshold 0) drops first at: " + "; ".join(drops) + ".")
            if drops else "No threshold lowers the overall volume + video accuracy beyond the seed spread.",
            "",
            f"![accuracy vs tokens kept]({rel(sweep_png, report.parent)})" if have_sweep else "",
            "",
        ]
    else:
        lines += ["(no finished `rope_frame` run yet)", ""]
    if results.get("post_encoder") and (results.get("pre_encoder") or results.get("pre_encoder_reuse")):
        lines += [
            "## Claim 2, deployed: pre- vs post-encoder pruning, each trained and scored with its own stage",
            "",
            "The sweep above changes the stage of a model trained with one stage. Here each arm is the model arm "
            "with `prune_stage` pinned in its config: stage 3 trains with it and the held-out rows are scored with "
            "it (threshold 0.1, last_kept), as a user of that checkpoint runs it. Pre-encoder pruning drops the "
            "pruned blocks' patches before the tower, so kept patches attend only to kept patches of their frame; "
            "pre-encoder reuse runs only the kept patches too, but each attends to every position of its frame, a "
            "pruned position's key and value taken from where it was last computed; post-encoder runs the tower on "
            "every patch and drops tokens after it. Accuracy in %.",
            "",
            stage_table(results),
            "",
        ]
    for block in hand_run:
        lines += [block, ""]
    lines += [
        "## Claim 3: progressive (1 → 2 → 3) vs joint training at equal total steps",
        "",
        f"Progressive = the `rope_frame` arm ({' + '.join(map(str, args.steps))} steps); joint = one run of "
        f"{sum(args.steps)} steps over all stage 1 + 2 + 3 rows, every module trained at stage 3's learning rates, "
        "pruning as in stage 3. Accuracy in % after training.",
        "",
        claim3_table(results) if results.get("rope_frame") or results.get("joint") else "(no finished runs)",
        "",
        f"![loss curves]({rel(loss_png, report.parent)})" if have_loss else "",
        "",
        "## Verdicts",
        "",
    ]
    lines += verdicts(results, drops, learned_keys(results, notes1))
    if not learned_keys(results, notes1) and not args.quick:
        longer = tuple(2 * n for n in args.steps)
        estimate = cpu_total(results, args) * 2 / 60 / 2  # training dominates: about twice the CPU time
        lines += ["", f"Next: the same command with twice the steps, `python ablate_omnivmed.py --steps "
                  f"{','.join(map(str, longer))} --out runs/ablate-x2` (the embedded default's own budget), should "
                  f"take about {estimate:.0f} min on 2 free cores (from this run's CPU time); whether the tiny model "
                  "then learns more rows is what it would show."]  # fmt: skip
    lines += ["", "## Commands", "", "Each arm x seed ran (its folder's spec.json / log.txt; `--model` is a fresh "
              "base built by `ablate_omnivmed.build_base`):", ""]  # fmt: skip
    for arm in args.arms:
        res = next(iter(results.get(arm, {}).values()), None)
        if res:
            shown = " ".join(res["argv"]).replace(str(ROOT) + os.sep, "")  # paths relative to the repository
            lines.append(f"- `{arm}`: `python train_trl.py {shown}`")
    report.write_text("\n".join(lines) + "\n")
    return report


def cpu_total(results, args) -> float:
    """CPU seconds of the whole command, from the runs that recorded theirs (the others counted at the mean)."""
    per_arm = {a: [r["cpu_s"] for r in results.get(a, {}).values() if "cpu_s" in r] for a in args.arms}
    known = [v for vals in per_arm.values() for v in vals]
    if not known:
        return math.nan
    return len(args.seeds) * sum(statistics.fmean(per_arm[a]) if per_arm[a] else statistics.fmean(known)
                                 for a in args.arms)  # fmt: skip


def model_stage(results) -> str:
    """The prune stage the `rope_frame` (model) arm ran with; runs from before it was recorded were post-encoder."""
    stages = {res["final"].get("prune_stage", "post_encoder") for res in results.get("rope_frame", {}).values()}
    return "/".join(sorted(stages)).replace("_", "-") or "the config's stage"


def cpu_line(results, args) -> str:
    """What the full command costs on free cores, from the CPU time the runs used (one thread each)."""
    per_arm = {a: [r["cpu_s"] for r in results.get(a, {}).values() if "cpu_s" in r] for a in args.arms}
    if not any(per_arm.values()):
        return "- CPU time per run was not recorded by these runs."
    known = [v for vals in per_arm.values() for v in vals]
    total = cpu_total(results, args)
    return (f"- CPU time (recorded for {len(known)} runs): " + ", ".join(
        f"{a} {statistics.fmean(v) / 60:.1f} min" for a, v in per_arm.items() if v) + f" per run; the whole command "
        f"({len(args.arms)} arms x {len(args.seeds)} seeds) needs about {total / 60:.0f} CPU-minutes, i.e. about "
        f"{total / 60 / 2:.0f} min on 2 free cores with `--jobs 2` (runs without a record counted at the mean).")


def learned_keys(results, notes1) -> set:
    return {(t, k) for t, k in reference_rows(results) if f"{t} / {k}" not in notes1}


def verdicts(results, drops, keys) -> list[str]:
    """Claim 1 and 3 verdicts on the rows some arm has learned (✓): the others are noise around chance."""
    names = ", ".join(f"{t} / {k}" for t, k in sorted(keys)) or "none"
    out = [f"Claims 1 and 3 are judged on the rows above chance in some arm of claim 1 ({names}); the other rows are "
           "noise around chance.", ""]
    if not keys:
        out.append("- No row is above chance in any arm: at this budget the miniature model cannot test claims 1 "
                   "and 3 (the numbers are in the tables, but they say nothing).")

    def verdict(diffs, label):
        if len(diffs) < 2:
            return (f"{label}: {mean_sd(diffs)[0] * 100:+.1f} points from {len(diffs)} seed(s), no spread: not a "
                    "result yet." if diffs else f"{label}: no paired runs.")
        m, s = mean_sd(diffs)
        sem = s / math.sqrt(len(diffs))
        if abs(m) <= 2 * sem:
            return f"{label}: no difference beyond the spread ({m * 100:+.1f} ± {s * 100:.1f} points, n={len(diffs)})."
        return f"{label}: {m * 100:+.1f} ± {s * 100:.1f} points (n={len(diffs)}), beyond the spread."

    if results.get("rope_frame") and results.get("learned_frame"):
        out.append("- Claim 1 (RoPE generalises 2D → 3D / video): " + verdict(
            paired_diff(results, "rope_frame", "learned_frame", "after_stage2", "after_stage2", kinds=("volume", "video"),
                        keys=keys),
            "RoPE − learned on the learned 3D + video rows, zero-shot after stage 2") + " " + verdict(
            paired_diff(results, "rope_frame", "learned_frame", "final", "final", kinds=("volume", "video"), keys=keys),
            "After stage 3"))  # fmt: skip
    if results.get("rope_frame") and results.get("rope_clip"):
        out.append("- Claim 1 (attention scope): " + verdict(
            paired_diff(results, "rope_clip", "rope_frame", "final", "final", kinds=("volume", "video"), keys=keys),
            "clip − frame on the learned 3D + video rows after stage 3"))  # fmt: skip
    points = sweep_points(results)
    base = next((runs for (st, ref, t), runs in points.items() if t == 0), None)
    sweep_learned = [f"{k[0]} / {k[1]}" for k in {(r["task"], r["kind"]) for run in (base or []) for r in run["table"]}
                     if learned([_rows_by_key(run["table"])[k]["accuracy"] for run in base],
                                max(_rows_by_key(base[0]["table"])[k]["chance"], _rows_by_key(base[0]["table"])[k]["majority"]))]  # fmt: skip
    if points and not sweep_learned:
        out.append("- Claim 2 (pruning keeps accuracy): not testable here: unpruned, the trained model is above the "
                   "majority-answer rate on none of the sweep's rows, so accuracy has nothing to lose; visual tokens "
                   "kept and prefill time per threshold are in the table" + "".join(
                       f"; threshold {t:g} ({st}, {ref}) keeps {mean_sd([r['kept'] for r in runs])[0]:.0%} of the "
                       "visual tokens" for (st, ref, t), runs in sorted(points.items())
                       if (st, ref) == (PRUNE_STAGES[0], REFERENCES[0]) and t in (0.1, 0.3)) + ".")  # fmt: skip
    elif drops is not None and points:
        out.append("- Claim 2 (pruning keeps accuracy): " + ("accuracy drops first at " + "; ".join(drops)
                   if drops else "no threshold up to 0.3 lowers volume + video accuracy beyond the seed spread") +
                   "; tokens kept and time in the table.")  # fmt: skip
    for arm in ("pre_encoder", "pre_encoder_reuse"):
        if not (results.get(arm) and results.get("post_encoder")):
            continue
        ref = reference_rows(results)  # judged on the 3D + video rows either stage arm has learned
        stage_keys = {k for k, r in ref.items() if k[1] != "image" and any(
            learned(accuracy_values(results, a, "final", k), max(r["chance"], r["majority"]))
            for a in (arm, "post_encoder"))}  # fmt: skip
        per_task = [f"{t} / {k} {mean_sd(d)[0] * 100:+.0f} ± {mean_sd(d)[1] * 100:.0f}" for t, k in sorted(stage_keys)
                    if len(d := paired_diff(results, arm, "post_encoder", "final", "final", key=(t, k))) > 1
                    and abs(mean_sd(d)[0]) > 2 * mean_sd(d)[1] / math.sqrt(len(d))]  # fmt: skip
        out.append(f"- Claim 2, deployed (which stage to ship), {STAGE_LABELS[arm]}: " + verdict(
            paired_diff(results, arm, "post_encoder", "final", "final", kinds=("volume", "video"), keys=stage_keys),
            f"{STAGE_LABELS[arm]} − post-encoder, each trained and scored with its stage, on the learned 3D + video "
            "rows") + (" Single tasks beyond their spread: " + ", ".join(per_task) + " points." if per_task else ""))  # fmt: skip
    if results.get("rope_frame") and results.get("joint"):
        out.append("- Claim 3 (progressive beats joint): " + verdict(
            paired_diff(results, "rope_frame", "joint", "final", "final", keys=keys), "progressive − joint, learned rows"))
    out.append("- These verdicts are about the miniature model on tasks it can learn; see 'What a miniature result "
               "can say' above.")
    return out


# ------------------------------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 'small' dataset, a few steps per stage")
    p.add_argument("--out", type=Path, default=None, help="runs folder (default: runs/ablate, runs/ablate-quick)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default: 0,1,2)")
    p.add_argument("--tower_warmup_steps", type=int, default=None, help="caption-word warm-up of every arm's random "
                   "tower before stage 1 (train_trl.warm_up_tower; default: full 1500, quick 3; 0: none)")
    p.add_argument("--steps", default=None, help="steps of stages 1,2,3 (default: full 20,200,300; quick 2,6,8)")
    p.add_argument("--size", choices=("full", "small"), default=None, help="embedded dataset size")
    p.add_argument("--arms", default=",".join(ARMS), help="training arms to run")
    p.add_argument("--jobs", type=int, default=2, help="arm x seed runs in parallel (one thread each)")
    p.add_argument("--eval_limit", type=int, default=0, help="score at most N held-out rows, an even "
                   "stride over them (0: all)")
    p.add_argument("--sweep_rows", type=int, default=160, help="pruning sweep: at most N held-out volume / video "
                   "rows, a seeded random sample of them (0: all)")  # fmt: skip
    p.add_argument("--keep_models", action="store_true", help="keep every stage's model folder")
    p.add_argument("--report", default=None, help="report path (default: EVIDENCE.md at the repository root, "
                   "plots in docs/evidence/)")  # fmt: skip
    p.add_argument("--report_only", action="store_true", help="only rewrite the report from finished runs")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> Path | None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args._worker:
        run_worker(json.loads(Path(args._worker).read_text()))
        return None
    raw = sys.argv[1:] if argv is None else list(argv)
    args.extra_flags = [a for a in raw if a not in ("--quick", "--report_only")]
    preset = QUICK if args.quick else FULL
    args.size = args.size or preset["size"]
    args.steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else preset["steps"]
    if args.tower_warmup_steps is None:
        args.tower_warmup_steps = preset["tower_warmup_steps"]
    if len(args.steps) != 3:
        raise SystemExit("--steps: three values, one per stage")
    args.seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else preset["seeds"]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"--arms: unknown {sorted(unknown)} (known: {list(ARMS)})")
    out = (args.out or ROOT / "runs" / ("ablate-quick" if args.quick else "ablate")).resolve()
    data = out / "data"
    timing = {}
    collect(out, args.arms, args.seeds, args.steps, args.tower_warmup_steps)  # refuses a folder of runs made with other steps
    if not args.report_only:
        started = time.time()
        data_omnivmed.build_default_dataset(data, seed=0, size=args.size)
        specs = make_specs(args, out, data)
        timing["ran"] = sum(not (Path(s["dir"]) / "results.json").exists() for s in specs)
        run_all(args, specs)
        if not (out / "timing.json").exists():
            logger.info("timing the prefill per pruning config (one thread)")
            (out / "timing.json").write_text(json.dumps(measure_prefill(out, data, args.eval_limit, args.sweep_rows)))
        timing["this_run_s"] = time.time() - started
    results = collect(out, args.arms, args.seeds, args.steps, args.tower_warmup_steps)
    report = write_report(args, out, results, timing)
    logger.info("wrote %s", report)
    return report


if __name__ == "__main__":
    main()
