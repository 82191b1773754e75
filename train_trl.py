"""Staged fine-tuning of OmniV-Med with TRL's SFTTrainer: 2D alignment -> 2D instructions -> mixed 2D/3D/video.

    python train_trl.py                                   # the embedded default: tiny model, data built from pip wheels
    python train_trl.py --model DIR_OR_ID --stages 1,2,3 --data_root DATA \\
        --stage1_data captions.jsonl --stage2_data instruct2d.jsonl --stage3_data mixed.jsonl
    torchrun --nproc_per_node 2 train_trl.py ...          # DDP (gloo on CPU, NCCL on GPUs)
    accelerate launch --config_file configs/accelerate_zero2.yaml train_trl.py ...   # e.g. DeepSpeed ZeRO-2 (requirements-scaleout.txt)

Stages (presets; each runs alone or chained, each starting from the previous stage's saved model):
    1 alignment   2D image-caption data; vision tower and LLM frozen, projector trained (lr 1e-3)
    2 instruct2d  2D instruction data; projector + LLM (1e-5) and tower (2e-6) trained
    3 mixed       2D + 3D + video instruction data, token pruning on (the model's prune_threshold)
Each stage writes `OUTPUT_DIR/stage{N}-{name}/` (Trainer checkpoints) and `.../model/` (a complete Hub folder); the
last stage's model is also written to `OUTPUT_DIR/final/`.

Data: JSONL rows in the LLaVA / VideoLLaMA3 style
    {"image" | "video" | "volume": path or [paths], "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                      {"from": "gpt", "value": "..."}]}
or TRL's conversational style
    {"messages": [{"role": "user", "content": [{"type": "volume", "path": "ct/scan.nii.gz", "window": "lung"},
                                               {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}
Media paths are relative to --data_root (default: the JSONL file's folder) and may not escape it. See `load_rows`.

The loss is taken on assistant replies only (their closing <|im_end|> included): labels are -100 on the prompt,
on every visual / frame-separator token and on padding.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `omnivmed` (see omnivmed.py) and omnivmed_tools live next to this script
    sys.path.insert(0, str(ROOT))

import data_omnivmed  # noqa: E402 (the embedded default's dataset)
from omnivmed.collator_omnivmed import OmniVMedCollator  # noqa: E402
from omnivmed.configuration_omnivmed import PRUNE_STAGES  # noqa: E402
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedProcessor  # noqa: E402
from omnivmed_tools import (  # noqa: E402
    MEDIA_KINDS,
    BadRowsError,
    build_tiny,
    load_processor,
    load_rows,
    part_license,
    public_name,
    push_folder,
    save_hub_folder,
    write_model_card,
)


logger = logging.getLogger("train_trl")

MODULES = ("tower", "projector", "llm")


# ------------------------------------------------------------------------------------------------------------ stages
@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    train: tuple[str, ...]  # modules trained (the others are frozen)
    lr: dict  # module -> learning rate (paper-like values for real models)
    tiny_lr: dict  # module -> learning rate for the tiny embedded default (learns in minutes)
    prune: bool  # token pruning on (the model's prune_threshold) or off (threshold 0)
    description: str


STAGES = {
    1: Stage(
        1,
        "alignment",
        train=("projector",),
        lr={"projector": 1e-3},
        tiny_lr={"projector": 2e-4},
        prune=False,
        description="2D image-caption alignment: projector only",
    ),
    2: Stage(
        2,
        "instruct2d",
        train=("tower", "projector", "llm"),
        lr={"tower": 2e-6, "projector": 1e-5, "llm": 1e-5},
        tiny_lr={"tower": 2e-4, "projector": 2e-4, "llm": 2e-4},
        prune=False,
        description="2D instruction tuning: projector + LLM, tower at a lower rate",
    ),
    3: Stage(
        3,
        "mixed",
        train=("tower", "projector", "llm"),
        lr={"tower": 2e-6, "projector": 1e-5, "llm": 1e-5},
        tiny_lr={"tower": 2e-4, "projector": 2e-4, "llm": 2e-4},
        prune=True,
        description="mixed 2D + 3D + video instruction tuning with token pruning",
    ),
}


def module_of(parameter_name: str) -> str:
    """Which trainable group a parameter belongs to: 'tower', 'projector' or 'llm' (also under PEFT/DDP/FSDP
    wrappers, whose prefixes only add to the name)."""
    if "vision_tower." in parameter_name:
        return "tower"
    if "projector." in parameter_name:
        return "projector"
    if "language_model." in parameter_name or "lm_head" in parameter_name:
        return "llm"
    raise ValueError(f"parameter {parameter_name!r} belongs to none of the vision tower, projector or LLM")


def _numel(param: torch.nn.Parameter) -> int:
    # a ZeRO-3-partitioned parameter is an empty placeholder on each process; DeepSpeed records its full size
    return getattr(param, "ds_numel", param.numel())


def set_trainable(model: torch.nn.Module, modules) -> dict[str, int]:
    """Freeze every parameter outside `modules`; returns trainable parameter counts per module."""
    counts = dict.fromkeys(MODULES, 0)
    for name, param in model.named_parameters():
        module = module_of(name)
        param.requires_grad_(module in modules)
        if param.requires_grad:
            counts[module] += _numel(param)
    return counts


# ----------------------------------------------------------------------------------------------------------- trainer
def _sft_trainer_class():
    from trl import SFTTrainer

    class OmniVMedSFTTrainer(SFTTrainer):
        """SFTTrainer whose optimizer has one learning rate per module (vision tower, projector, LLM).

        Param groups: one per (module, weight decay or not), each carrying `lr` and a `module` key; frozen parameters
        are left out. The LR scheduler scales every group from its own initial lr."""

        def __init__(self, *args, module_lrs: dict, **kwargs):
            self.module_lrs = dict(module_lrs)
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model=None):
            if self.optimizer is not None:
                return self.optimizer
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict = {}
            for name, param in opt_model.named_parameters():
                if not param.requires_grad:
                    continue
                module = module_of(name)
                if module not in self.module_lrs:
                    raise ValueError(f"{name} is trainable but no learning rate was given for the {module}")
                wd = self.args.weight_decay if name in decay else 0.0
                group = groups.setdefault(
                    (module, wd), {"params": [], "lr": self.module_lrs[module], "weight_decay": wd, "module": module}
                )
                group["params"].append(param)
            if not groups:
                raise ValueError("nothing to train: every parameter is frozen")
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)
            for group in self.optimizer.param_groups:
                logger.info(
                    "optimizer group %-9s lr %.2e weight_decay %.3g: %d tensors, %d parameters",
                    group["module"], group["lr"], group["weight_decay"], len(group["params"]),
                    sum(_numel(p) for p in group["params"]),
                )  # fmt: skip
            return self.optimizer

    return OmniVMedSFTTrainer


# -------------------------------------------------------------------------------------------------------- arguments
def _per_stage(value, stages: list[int], cast, name: str) -> dict:
    """'5' -> the same for every stage; '5,10,20' -> one per stage of --stages; '2:1e-4,3:5e-5' -> by stage number;
    None -> {}."""
    if value is None:
        return {}
    parts = [p.strip() for p in str(value).split(",")]
    if any(":" in p for p in parts):
        out = {}
        for p in parts:
            stage, sep, v = p.partition(":")
            if not sep or not stage.strip().isdigit():
                raise SystemExit(f"--{name}: expected STAGE:VALUE pairs, got {p!r}")
            out[int(stage)] = cast(v)
        return {s: v for s, v in out.items() if s in stages}
    if len(parts) == 1:
        return {s: cast(parts[0]) for s in stages}
    if len(parts) != len(stages):
        raise SystemExit(f"--{name} gives {len(parts)} values for {len(stages)} stages ({stages})")
    return {s: cast(p) for s, p in zip(stages, parts)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Staged OmniV-Med fine-tuning with TRL (no arguments: the embedded default demo).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and stages")
    g.add_argument("--model", help="Hub folder or repo id to start from (None: a fresh tiny model)")
    g.add_argument("--stages", default="1,2,3", help="stages to run in order, e.g. 1,2,3 or 3")
    g.add_argument("--output_dir", default="runs/omnivmed-default", type=Path)
    g.add_argument("--train", help="override the stages' trained modules, e.g. projector,llm")
    g.add_argument("--lr_preset", choices=["paper", "tiny"], help="stage learning rates: the paper's, or larger ones "
                   "that make the tiny model learn in minutes (None: paper, tiny for the embedded default)")  # fmt: skip
    for module in MODULES:
        g.add_argument(f"--lr_{module}", help=f"learning rate of the {module}: one value, one per stage, or "
                       "STAGE:LR pairs (e.g. 2:1e-5,3:5e-6)")  # fmt: skip
    g.add_argument("--processor", action="append", default=[], metavar="KEY=VALUE",
                   help="processor setting for training and the saved model, e.g. max_slices=32 (repeatable)")
    g.add_argument("--prune_threshold", type=float, help="pruning threshold in stages with pruning on "
                   "(None: the model's)")  # fmt: skip
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights dtype (float32 + --bf16 = mixed precision)")
    g.add_argument("--attn_implementation", help="eager / sdpa / flash_attention_2")

    g = p.add_argument_group("data")
    g.add_argument("--data", help="JSONL file(s), comma-separated, used by every stage without its own")
    for stage in STAGES:
        g.add_argument(f"--stage{stage}_data", help=f"JSONL file(s) for stage {stage}")
    g.add_argument("--data_root", help="folder media paths are relative to (None: each JSONL file's folder)")
    g.add_argument("--skip_bad_rows", action="store_true", help="drop unusable rows (listed) instead of failing")
    g.add_argument("--validate_media", choices=["exists", "load"], default="exists",
                   help="before any model loads, check media from file headers (paths, pixel / voxel limits, "
                        "visual-token budget), or load every medium once")
    g.add_argument("--cache_media", type=int, default=0, help="keep this many loaded media in memory")

    g = p.add_argument_group("training")
    g.add_argument("--max_steps", help="optimizer steps per stage (one value or one per stage; -1: use epochs)")
    g.add_argument("--num_train_epochs", default="1", help="epochs per stage (one value or one per stage)")
    g.add_argument("--per_device_train_batch_size", type=int, default=4)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr_scheduler_type", default="cosine")
    g.add_argument("--warmup_ratio", type=float, default=0.03)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                   help="bf16 mixed precision (auto: on where the GPU supports it, never on CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: only the final model)")
    g.add_argument("--save_total_limit", type=int, default=2)
    g.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'last': finished stages are kept and "
                   "the first unfinished one resumes from its latest checkpoint")  # fmt: skip
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--num_threads", type=int, help="torch intra-op threads per process (None: torch's; 1 for the "
                   "embedded default, whose tiny matrices run fastest on one thread and do not stall when other "
                   "processes share the cores)")  # fmt: skip
    g.add_argument("--train_prune_stage", choices=(*PRUNE_STAGES, "same"), default=None,
                   help="pruning stage while training (saved in the model's config as train_prune_stage; 'same': "
                   "the model's prune_stage; default: the model's train_prune_stage, pre_encoder_reuse for ours)")
    g.add_argument("--deepspeed", help="DeepSpeed JSON config (e.g. configs/ds_zero2.json)")
    g.add_argument("--check_replicas", action="store_true",
                   help="after each stage, check that all processes hold the same weights")

    g.add_argument("--tower_warmup_steps", type=int, help="fresh tiny model only: steps of caption-word pretraining "
                   "of its random tower before stage 1 (`warm_up_tower`; None: the embedded default's, else 0)")
    g.add_argument("--tower_warmup_lr", type=float, default=1e-3, help="learning rate of the tower warm-up")

    g = p.add_argument_group("LoRA (PEFT) on the language model")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the LLM weights")
    g.add_argument("--lora_r", type=int, default=16)
    g.add_argument("--lora_alpha", type=int, default=32)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_target_modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")

    g = p.add_argument_group("Hub")
    g.add_argument("--push_to_hub", action="store_true", help="upload OUTPUT_DIR/final (a complete Hub folder)")
    g.add_argument("--hub_model_id", help="user/name of the repo to push to")
    g.add_argument("--hub_private_repo", action="store_true")
    g.add_argument("--hub_token", help="token (None: the logged-in one / HF_TOKEN)")

    g = p.add_argument_group("embedded default")
    g.add_argument("--eval", choices=["auto", "yes", "no"], default="auto",
                   help="answer the held-out questions of the embedded default at the end")
    g.add_argument("--default_size", choices=["full", "small"], default="full",
                   help="size of the embedded default dataset (small: for smoke tests)")
    g.add_argument("--eval_prune_stage", choices=PRUNE_STAGES, default=None,
                   help="score the held-out questions with this pruning stage (default: the model's prune_stage; "
                   "the saved model is not changed)")
    return p


@dataclass
class StagePlan:
    stage: Stage
    data: list
    train: tuple
    lrs: dict
    max_steps: int
    epochs: float
    dir: Path = field(default=None)


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _bf16(choice: str) -> bool:
    if choice == "true":
        return True
    if choice == "false":
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


# ------------------------------------------------------------------------------------------------ tiny tower warm-up
CAPTION_WORD = re.compile(r"[a-z0-9]+")


def _caption_examples(rows: list[dict]) -> list[tuple[dict, str]]:
    """(media block with its data root, assistant text) for every row holding exactly one image."""
    examples = []
    for row in rows:
        messages = json.loads(row["messages"]) if isinstance(row["messages"], str) else row["messages"]
        media = [b for m in messages for b in m["content"] if b["type"] in MEDIA_KINDS]
        text = " ".join(b["text"] for m in messages if m["role"] == "assistant" for b in m["content"] if b["type"] == "text")
        if len(media) == 1 and media[0]["type"] == "image":
            root = row.get("data_root")
            examples.append(({**media[0], **({"data_root": root} if root else {})}, text))
    return examples


def warm_up_tower(start: Path, rows: list[dict], out: Path, steps: int, lr: float, batch_size: int, seed: int,
                  model_class=OmniVMedForConditionalGeneration) -> Path:
    """Give a randomly initialised tower visual features before stage 1, the job SigLIP's pretraining does for the
    real model (stage 1 freezes the tower: a random one would stay random through alignment). CatLIP-style
    (Mehta et al. 2024): predict which words a 2D image's caption holds from the tower's mean-pooled output
    (multi-label, binary cross-entropy; a linear head that is thrown away), plus a linear read-back of every patch's
    own pixels from its output (mean squared error). Without that second term the tower keeps only what the ~20
    distinct captions ask for and loses what later tasks need (a linear probe of instrument direction on its video
    features fell from 100 % to 83 %); SigLIP 2 adds local objectives for the same reason. Only 2D image-caption rows
    are used, as in SigLIP's pretraining. Writes a complete Hub folder at `out` (reused when it is already there)."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = Path(out)
    examples = _caption_examples(rows)
    if not examples:
        raise ValueError("tower warm-up: no 2D image-caption rows in the stage 1 data")
    recipe = dict(start=_file_digest(Path(start) / "model.safetensors"), steps=steps, lr=lr, batch_size=batch_size,
                  seed=seed, captions=_examples_digest(examples), code=_text_digest(inspect.getsource(warm_up_tower)))  # fmt: skip
    if _reusable(out, recipe, "tower warm-up"):
        return out
    words = sorted({w for _, text in examples for w in CAPTION_WORD.findall(text.lower())})
    targets = torch.zeros(len(examples), len(words))
    for i, (_, text) in enumerate(examples):
        targets[i, [words.index(w) for w in CAPTION_WORD.findall(text.lower())]] = 1.0
    processor = OmniVMedProcessor.from_pretrained(start)
    model = model_class.from_pretrained(start)
    tower = model.model.vision_tower
    torch.manual_seed(seed)
    head = torch.nn.Linear(tower.config.hidden_size, len(words))
    decoder = torch.nn.Linear(tower.config.hidden_size, tower.config.patch_dim)
    params = list(tower.parameters()) + list(head.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    media = [processor.image_processor.to_media(block) for block, _ in tqdm(examples, desc="tower warm-up: loading")]
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    logger.info("tower warm-up: %d steps on %d image-caption pairs, %d caption words, lr %.1e", steps, len(examples),
                len(words), lr)  # fmt: skip
    bar = tqdm(range(steps), desc="tower warm-up")
    for step in bar:
        index = torch.randint(len(examples), (batch_size,), generator=generator)
        batch = processor.image_processor([media[i] for i in index], return_tensors="pt")
        features = tower(batch["pixel_values"], batch["grid_thw"], batch["patch_positions"]).last_hidden_state
        per_item = batch["grid_thw"].prod(dim=1)
        item = torch.repeat_interleave(torch.arange(len(index)), per_item)
        pooled = features.new_zeros(len(index), features.shape[1]).index_add_(0, item, features) / per_item[:, None]
        words_loss = torch.nn.functional.binary_cross_entropy_with_logits(head(pooled), targets[index])
        pixels_loss = torch.nn.functional.mse_loss(decoder(features), batch["pixel_values"])
        loss = words_loss + pixels_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(words=f"{words_loss.item():.3f}", pixels=f"{pixels_loss.item():.3f}")
    logger.info("tower warm-up: final caption-word loss %.4f, pixel loss %.4f", words_loss.item(), pixels_loss.item())
    tower.eval()
    save_hub_folder(
        model,
        processor,
        out,
        title="OmniV-Med tiny (tower warmed up)",
        description=f"The tiny OmniV-Med with its vision tower warmed up for {steps} steps on caption words and "
        "pixel read-back (`train_trl.warm_up_tower`); projector and LLM still random.",
        training_data="The stage-1 image-caption rows (their caption words and pixels); projector and LLM untrained.",
        repo=out.name,
    )
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
    return out


# A folder an earlier run built (the fresh tiny model, its tower warm-up) is reused only if it was built from the
# same recipe: seed, steps, the code that builds it and the data it saw. Rerunning `python train_trl.py` after an
# update would otherwise train with the old tokenizer or tower without a word.
RECIPE_FILE = "omnivmed_recipe.json"


def _reusable(folder: Path, recipe: dict, what: str) -> bool:
    if not (folder / "config.json").exists():
        return False
    stamp = folder / RECIPE_FILE
    if stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(recipe)):
        logger.info("%s: reusing %s", what, folder)
        return True
    logger.warning("%s: %s was built from another recipe (seed, steps, code or data differ); building it again",
                   what, folder)  # fmt: skip
    shutil.rmtree(folder)
    return False


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sources_digest(names: list[str]) -> str:
    return _text_digest("".join((ROOT / name).read_text() for name in names))


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _examples_digest(examples: list[tuple[dict, str]]) -> str:
    """Caption texts and each image file's path, size and modification time: a rebuilt dataset is new data."""
    digest = hashlib.sha256()
    for block, text in examples:
        path = Path(block.get("data_root") or ".") / block["path"]
        stat = path.stat() if path.exists() else None
        digest.update(json.dumps([str(path), text, stat and stat.st_size, stat and stat.st_mtime_ns]).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------- running
def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _init_distributed():
    """Under torchrun / accelerate launch, join the process group before the Trainer does (Accelerate reuses it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not _accelerator_available())


def _engine(trainer) -> str:
    """What the Trainer's Accelerator actually runs: a shipped DeepSpeed / FSDP file may be read and still not engaged."""
    state = trainer.accelerator.state
    if trainer.is_deepspeed_enabled and state.distributed_type.name == "DEEPSPEED":
        return f"deepspeed zero-{state.deepspeed_plugin.zero_stage}"
    return state.distributed_type.name.lower()


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _lora_config(args, train: tuple):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        # only the LLM's linear layers: the tower has q/k/v projections of the same names
        target_modules=OmniVMedForConditionalGeneration.lora_target_modules(args.lora_target_modules.split(",")),
        modules_to_save=[name for module, name in (("tower", "vision_tower"), ("projector", "projector")) if module in train],
        task_type="CAUSAL_LM",
    )


def _card(plans: list[StagePlan], plan: StagePlan, args, lora: bool) -> dict:
    done = [p for p in plans if p.stage.number <= plan.stage.number]
    start = public_name(args.model_label)
    lines = [
        f"Fine-tuned from `{start}` with `train_trl.py` (TRL SFTTrainer), stage(s) "
        + ", ".join(f"{p.stage.number} ({p.stage.name})" for p in done) + ".",
        "",
        "| stage | trained | learning rates | steps | rows |",
        "|---|---|---|---|---|",
    ]
    for p in done:
        lrs = ", ".join(f"{m} {lr:g}" for m, lr in p.lrs.items() if m in p.train)
        trained = ", ".join(p.train) + (" (LLM via LoRA, merged)" if lora and "llm" in p.train else "")
        lines.append(f"| {p.stage.number} {p.stage.name} | {trained} | {lrs} | "
                     f"{p.max_steps if p.max_steps > 0 else f'{p.epochs:g} epoch(s)'} | {len(p.data)} |")  # fmt: skip
    if args.data is None and not any(getattr(args, f"stage{s}_data", None) for s in (1, 2, 3)):
        data = ("The embedded default dataset (`data_omnivmed.py`): MNI152, nibabel and pydicom test data with planted "
                "lesions and synthetic endoscopy videos; a toy task set for checking the pipeline, not clinical data.")
    else:
        files = {p.stage.number: getattr(args, f"stage{p.stage.number}_data", None) or args.data for p in done}
        data = "JSONL rows, per stage: " + "; ".join(
            f"stage {n}: " + ", ".join(Path(f).name for f in str(v).split(",")) for n, v in files.items()
        ) + " (file names as given to train_trl.py; their sources and licences are the data owner's to state)."
    return dict(
        title=f"OmniV-Med fine-tuned (stage {plan.stage.number}: {plan.stage.name})",
        description="\n".join(lines),
        repo=args.hub_model_id or "<your-name>/<this-repo>",
        training_data=data,
        evaluation="Not evaluated by train_trl.py (the embedded default appends its held-out table below); "
        "evaluate_omnivmed.py scores the public benchmarks.",
        parts=[(start, part_license(args.model_label) if Path(str(args.model_label)).exists() else None)],
    )


def _replica_fingerprint(model) -> torch.Tensor:
    with torch.no_grad():
        total = torch.zeros(2, dtype=torch.float64)
        for i, param in enumerate(p for p in model.parameters()):
            t = param.detach().to("cpu", torch.float64)
            total[0] += t.sum()
            total[1] += (t * (1 + (i % 7))).abs().sum()
    return total


def check_replicas(model) -> None:
    """All ranks hold the same weights (DDP); raises otherwise. Logs the fingerprint either way."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    local = _replica_fingerprint(model)
    gathered = [torch.zeros_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)  # gloo: CPU tensors
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    logger.info("replica check over %d processes: %s (fingerprint %s)", len(gathered),
                "weights agree" if same else "WEIGHTS DIFFER", gathered[0].tolist())  # fmt: skip
    if not same:
        raise RuntimeError(f"the processes hold different weights: {[g.tolist() for g in gathered]}")


@contextlib.contextmanager
def _unpartitioned_loading():
    """from_pretrained on the main process alone: under ZeRO-3 it would partition the weights over processes that are
    not loading (zero.Init's collectives then wait for ever). The ZeRO-3 switch is transformers' module-level weak
    reference to the active DeepSpeed config, set by TrainingArguments(deepspeed=...) or by accelerate's DeepSpeed
    plugin; it is cleared for the load and put back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


def save_model_folder(trainer, processor, out: Path, start_model: str, lora: bool, card: dict,
                      model_class=OmniVMedForConditionalGeneration) -> Path:
    """Write the trained model as a complete Hub folder (omnivmed_tools.save_hub_folder) on the main process.

    DeepSpeed / FSDP: the full weights are gathered by `trainer.save_model` first. LoRA: the adapter is saved to
    `out/adapter` (with the processor), then merged into a fresh copy of the start model."""
    out = Path(out)
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    if lora:
        adapter = out.parent / "adapter"
        trainer.save_model(str(adapter))  # PEFT: adapter weights (+ modules_to_save) only; gathered under DS/FSDP
        if trainer.accelerator.is_main_process:
            from peft import PeftModel

            processor.save_pretrained(adapter)
            with _unpartitioned_loading():
                base = model_class.from_pretrained(start_model)
            model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            # PEFT's own card is an empty template: the adapter gets the same card as the merged model
            write_model_card(adapter, model, **{**card, "title": card["title"] + " (LoRA adapter)"},
                             library_name="peft")
            save_hub_folder(model, processor, out, **card)
    elif sharded:
        gathered = out.parent / "gathered"
        trainer.save_model(str(gathered))
        if trainer.accelerator.is_main_process:
            with _unpartitioned_loading():
                model = model_class.from_pretrained(gathered)
            # ZeRO-3 loading keeps transformers' whole key-renaming table, legacy names included, so the gathered
            # weights come out as "model.language_model.model.*": written back under this code's own names
            save_hub_folder(model, processor, out, original_format=False, **card)
            shutil.rmtree(gathered, ignore_errors=True)
    elif trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_hub_folder(model, processor, out, **card)
    trainer.accelerator.wait_for_everyone()
    return out


def run_stage(plan: StagePlan, start_model: str, args, plans: list, callbacks=(), resume=None) -> Path:
    """Train one stage from `start_model`; returns the stage's saved Hub folder."""
    from datasets import Dataset
    from trl import SFTConfig

    stage = plan.stage
    # the training arguments come first: under DeepSpeed ZeRO-3 they make from_pretrained load the weights sharded
    config = SFTConfig(
        output_dir=str(plan.dir),
        max_steps=plan.max_steps,
        num_train_epochs=plan.epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=max(plan.lrs[m] for m in plan.train),  # logged; the param groups carry their own
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        bf16=_bf16(args.bf16),
        fp16=False,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,  # the collator reads the rows' "messages"
        dataset_kwargs={"skip_prepare_dataset": True},  # media are loaded on the fly by the collator
        max_length=None,  # no truncation: it would cut visual tokens away from their pixels
        report_to="none",
        dataloader_num_workers=args.dataloader_num_workers,
        # the collator's media cache lives in the worker: a new worker each epoch would load every file again
        dataloader_persistent_workers=args.dataloader_num_workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        deepspeed=args.deepspeed,
        # without an accelerator, Accelerate only sets up multi-process (gloo) training when told it runs on CPU
        use_cpu=not _accelerator_available(),
        disable_tqdm=False,
    )
    processor = load_processor(start_model, args.processor)
    load_kwargs = {"dtype": getattr(torch, args.dtype)}
    if args.train_prune_stage:  # a config attribute: from_pretrained sets it, save_pretrained keeps it
        load_kwargs["train_prune_stage"] = None if args.train_prune_stage == "same" else args.train_prune_stage
    if args.attn_implementation:
        load_kwargs["attn_implementation"] = args.attn_implementation
    if args.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
        # under ZeRO-3 from_pretrained partitions the weights as it loads them (zero.Init), sized by DeepSpeed's own
        # process group: Accelerate makes that one only later (and never on the CPU), so it joins the torch group here
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    model = args.model_class.from_pretrained(start_model, **load_kwargs)
    # the saved model names the stage it was trained with (None would follow a later prune_stage override)
    model.config.train_prune_stage = model.config.train_prune_stage or model.config.prune_stage
    lora = args.lora and "llm" in plan.train
    counts = set_trainable(model, [m for m in plan.train if not (lora and m == "llm")])
    logger.info(
        "stage %d (%s) from %s: trains %s%s; %d rows; lrs %s",
        stage.number, stage.name, start_model, ", ".join(plan.train), " (LLM via LoRA)" if lora else "",
        len(plan.data), {m: plan.lrs[m] for m in plan.train},
    )  # fmt: skip
    logger.info("trainable parameters before LoRA: %s", counts)
    if stage.prune:
        threshold = args.prune_threshold if args.prune_threshold is not None else model.config.prune_threshold
    else:
        threshold = 0.0
    collator = OmniVMedCollator(processor, prune_threshold=threshold, cache_size=args.cache_media)
    dataset = Dataset.from_list(plan.data)
    trainer = _sft_trainer_class()(
        model=model,
        args=config,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=_lora_config(args, plan.train) if lora else None,
        callbacks=list(callbacks),
        module_lrs={m: plan.lrs[m] for m in plan.train},
    )
    if lora:
        trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        logger.info("LoRA: %d trainable tensors, e.g. %s", len(trainable), trainable[:2])
    engine = _engine(trainer)
    logger.info(
        "stage %d: %s, world size %d, engine %s, device %s, bf16 %s, gradient checkpointing %s",
        stage.number, trainer.args.parallel_mode.value, trainer.args.world_size, engine, trainer.args.device,
        trainer.args.bf16, trainer.args.gradient_checkpointing,
    )  # fmt: skip
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        logger.warning("the launch config asks for FSDP but Accelerate runs %s (it engages FSDP on GPUs only): every "
                       "process holds the whole model", engine)  # fmt: skip
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    logger.info("stage %d trained in %.1f s", stage.number, time.time() - started)
    if args.check_replicas:
        check_replicas(trainer.accelerator.unwrap_model(trainer.model))
    out = save_model_folder(trainer, processor, plan.dir / "model", start_model, lora, _card(plans, plan, args, lora),
                            args.model_class)
    if _is_main():
        (out / "omnivmed_stage.json").write_text(
            json.dumps(
                {
                    "stage": stage.number,
                    "name": stage.name,
                    "start_model": start_model,
                    "train": list(plan.train),
                    "lrs": plan.lrs,
                    "lora": lora,
                    "max_steps": plan.max_steps,
                    "epochs": plan.epochs,
                    "rows": len(plan.data),
                    "prune_threshold": threshold,
                    "global_step": trainer.state.global_step,
                },
                indent=2,
            )
        )
    _barrier()
    return out


def _stage_done(plan: StagePlan) -> bool:
    return (plan.dir / "model" / "omnivmed_stage.json").exists() and (plan.dir / "model" / "config.json").exists()


def _resume_point(plan: StagePlan, resume: str | None):
    """What to pass to trainer.train(resume_from_checkpoint=...) for this stage."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume is None:
        return None
    if resume == "last":
        return get_last_checkpoint(str(plan.dir)) if plan.dir.is_dir() else None
    path = Path(resume).resolve()
    return str(path) if path.parent == plan.dir.resolve() else None


def main(argv=None, callbacks=(), model_class=OmniVMedForConditionalGeneration) -> Path:
    """`model_class`: what the stages load and save (ablate_omnivmed.py passes its learned-position-table arm)."""
    args = build_parser().parse_args(argv)
    args.model_class = model_class
    logging.basicConfig(
        level=logging.INFO if _is_main() else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return _main(args, callbacks)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # ranks abort at exit without it


def _stage_rows(data: str, args, validator) -> list[dict]:
    paths = [p for p in str(data).split(",") if p]
    return load_rows(paths, args.data_root, args.skip_bad_rows, validate_with=validator,
                     load_media=args.validate_media == "load")  # fmt: skip


def _main(args, callbacks) -> Path:
    started = time.time()
    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"--stages: unknown stage {s} (known: {sorted(STAGES)})")
    if args.push_to_hub:
        from huggingface_hub import constants

        if not args.hub_model_id:
            raise SystemExit("--push_to_hub needs --hub_model_id user/name")
        if constants.HF_HUB_OFFLINE:
            raise SystemExit("--push_to_hub needs the network: unset HF_HUB_OFFLINE")

    stage_data = {s: getattr(args, f"stage{s}_data") or args.data for s in stages}
    checked_rows: dict[int, list[dict]] = {}
    embedded = all(v is None for v in stage_data.values())
    if embedded and args.model is not None:
        raise SystemExit("--model was given without data: pass --data or --stage{N}_data (JSONL)")
    output_dir = args.output_dir.resolve()
    default_items = None
    if args.model is None:
        args.model_label = "a fresh tiny OmniV-Med (omnivmed_tools.build_tiny)"
        _init_distributed()  # the other ranks wait for rank 0 to build the tiny model and the dataset
        start = output_dir / "base"
        if _is_main():
            _build_base(start, args.seed, embedded)
        _barrier()
        if embedded:
            if _is_main():
                data_omnivmed.build_default_dataset(output_dir / "data", seed=args.seed, size=args.default_size)
            _barrier()
            default_items = data_omnivmed.default_paths(output_dir / "data")
            stage_data = {s: str(default_items[f"stage{s}"]) for s in stages}
            args.data_root = args.data_root or str(output_dir / "data")
            _apply_embedded_defaults(args, stages)
        if args.tower_warmup_steps and 1 in stages:
            if not stage_data[1]:
                raise SystemExit("--tower_warmup_steps reads the stage 1 image-caption data: pass --stage1_data")
            warm = output_dir / "tower-warmup"
            if _is_main():
                # every stage's data is checked before the warm-up trains anything
                validator = load_processor(start, args.processor)
                for s in stages:
                    checked_rows[s] = _stage_rows(stage_data[s], args, validator)
                rows = checked_rows[1]
                warm_up_tower(start, rows, warm, args.tower_warmup_steps, args.tower_warmup_lr,
                              args.per_device_train_batch_size * 2, args.seed, args.model_class)  # fmt: skip
            _barrier()
            start = warm
        start_model = str(start)
    else:
        args.model_label = args.model
        start_model = args.model

    if args.num_threads is None and args.model is None:
        args.num_threads = 1
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    preset = args.lr_preset or ("tiny" if embedded else "paper")
    overrides = {m: _per_stage(getattr(args, f"lr_{m}"), stages, float, f"lr_{m}") for m in MODULES}
    max_steps = _per_stage(args.max_steps, stages, int, "max_steps") or {s: -1 for s in stages}
    epochs = _per_stage(args.num_train_epochs, stages, float, "num_train_epochs")
    train_override = tuple(m.strip() for m in args.train.split(",")) if args.train else None
    if train_override and set(train_override) - set(MODULES):
        raise SystemExit(f"--train: modules are {MODULES}")

    # the media are checked against the processor (headers, or loading with --validate_media load) before any model
    # is loaded, so an unusable file stops the run here with its row, not at the first batch
    validator = load_processor(start_model, args.processor)
    plans = []
    for s in stages:
        stage = STAGES[s]
        lrs = dict(stage.tiny_lr if preset == "tiny" else stage.lr)
        for m in MODULES:
            if s in overrides[m]:
                lrs[m] = overrides[m][s]
        train = train_override or stage.train
        for m in train:
            lrs.setdefault(m, STAGES[2].tiny_lr[m] if preset == "tiny" else STAGES[2].lr[m])
        rows = checked_rows[s] if s in checked_rows else _stage_rows(stage_data[s], args, validator)
        plans.append(StagePlan(stage, rows, train, lrs, max_steps[s], epochs[s], output_dir / f"stage{s}-{stage.name}"))

    for plan in plans:
        if args.resume_from_checkpoint is not None and _stage_done(plan):
            logger.info("stage %d already finished in %s: reusing it", plan.stage.number, plan.dir / "model")
            start_model = str(plan.dir / "model")
            continue
        resume = _resume_point(plan, args.resume_from_checkpoint)
        if resume:
            logger.info("stage %d resumes from %s", plan.stage.number, resume)
        start_model = str(run_stage(plan, start_model, args, plans, callbacks, resume))

    final = output_dir / "final"
    if _is_main():
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(start_model, final, ignore=shutil.ignore_patterns("omnivmed_stage.json"))
        logger.info("final model: %s", final)
    _barrier()

    if embedded and _is_main() and args.eval != "no":
        report = data_omnivmed.evaluate_default(final, default_items["eval"], output_dir / "data",
                                                prune_stage=args.eval_prune_stage)  # fmt: skip
        data_omnivmed.append_results_to_card(final, report)
        print(report["text"])
    if args.push_to_hub and _is_main():
        push_folder(
            final, args.hub_model_id, args.hub_private_repo, args.hub_token,
            message="Upload OmniV-Med fine-tuned with train_trl.py",
        )
    _barrier()
    logger.info("done in %.1f s", time.time() - started)
    return final


def _build_base(out: Path, seed: int, embedded: bool):
    """The fresh tiny model (reused when an earlier run built it from the same recipe)."""
    # omnivmed_tools.py holds the tiny preset and the tokenizer's corpus (with the embedded default's questions)
    sources = ["omnivmed_tools.py", "configuration_omnivmed.py", "modeling_omnivmed.py", "processing_omnivmed.py",
               "data_omnivmed.py"]  # fmt: skip
    recipe = dict(seed=seed, embedded=embedded, code=_sources_digest(sources))
    if _reusable(out, recipe, "tiny model"):
        return
    build_tiny(out, seed)
    if embedded:  # the embedded default trains at a small pixel budget; the saved processor keeps it
        processor = OmniVMedProcessor.from_pretrained(out, trust_remote_code=True, **data_omnivmed.DEFAULT_PROCESSOR)
        processor.save_pretrained(out)
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))


def _apply_embedded_defaults(args, stages: list[int]):
    """Training settings of the embedded default, where the command line did not set them."""
    defaults = data_omnivmed.DEFAULT_TRAINING
    if args.max_steps is None:
        args.max_steps = ",".join(str(defaults["max_steps"][s]) for s in stages)
    if args.tower_warmup_steps is None:
        args.tower_warmup_steps = defaults["tower_warmup_steps"]
    parser_defaults = build_parser().parse_args([])
    for key in ("per_device_train_batch_size", "cache_media", "warmup_ratio", "logging_steps", "lr_scheduler_type"):
        if getattr(args, key) == getattr(parser_defaults, key):
            setattr(args, key, defaults[key])


if __name__ == "__main__":
    try:
        main()
    except (BadRowsError, FileNotFoundError) as e:
        logging.getLogger("train_trl").error("%s", e)
        raise SystemExit(2) from None
