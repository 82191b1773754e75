"""torchrun worker for tests/test_scaleout.py: two training steps of the tiny model on 2 CPU processes (gloo), either
DDP or FSDP2 sharded as configs/accelerate_fsdp.yaml says (every listed layer class a unit, then the root), each rank
on its own batch; rank 0 writes the full final weights (safetensors) to OUT.

    torchrun --nproc_per_node 2 tests/scaleout_worker.py {ddp,fsdp2} OUT
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_omnivmed  # noqa: E402
from omnivmed.media_omnivmed import Media  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor, OmniVMedProcessor  # noqa: E402


def batch(processor, rank: int):
    """Two conversations (an image, a short video) with answers; different pixels per rank."""
    rng = np.random.default_rng(rank)
    image = Media(frames=rng.random((1, 56, 56, 3), dtype=np.float32), kind="image", source="random")
    video = Media(frames=rng.random((3, 56, 56, 3), dtype=np.float32), kind="video", source="random")
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A bright block on the left."}]}],
        [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "Where?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "right"}]}],
    ]  # fmt: skip
    inputs = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                           padding=True)  # fmt: skip
    inputs.pop("media_metadata", None)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return dict(inputs, labels=labels)


def main(mode: str, out: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    tokenizer = build_omnivmed.build_tiny_tokenizer()
    processor = OmniVMedProcessor(OmniVMedImageProcessor(max_pixels=56 * 56, video_max_pixels=56 * 56), tokenizer)
    model = build_omnivmed.tiny_model(tokenizer, 0).train()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        config = yaml.safe_load((ROOT / "configs" / "accelerate_fsdp.yaml").read_text())["fsdp_config"]
        classes = set(config["fsdp_transformer_layer_cls_to_wrap"].split(","))
        units = [m for m in model.modules() if type(m).__name__ in classes]
        assert units, f"no module of {classes} in the model"
        for module in units:
            fully_shard(module, reshard_after_forward=config["fsdp_reshard_after_forward"])
        fully_shard(model, reshard_after_forward=config["fsdp_reshard_after_forward"])
        wrapped = model
        local = sum(p.to_local().numel() for p in model.parameters())
        full = sum(p.numel() for p in model.parameters())
        print(f"rank {rank}: FSDP2 over {len(units)} units + root, holds {local / full:.3f} of the parameters",
              flush=True)
    else:
        raise ValueError(mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = batch(processor, rank)
    for _ in range(2):
        loss = wrapped(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().clone() for k, v in state.items() if k != "lm_head.weight"}  # tied
        save_file(state, out)
        print(f"rank 0: wrote {len(state)} tensors, loss {loss.item():.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
