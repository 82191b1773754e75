"""OmniV-Med's data collator for fine-tuning: conversations with media -> one training batch with labels.

Remote code (the Hub copies it with the other `*_omnivmed.py` files; `processor.data_collator()` returns one), so a
checkpoint is fine-tuned with plain TRL and no checkout of this repo:

    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="out"), train_dataset=rows,
                         data_collator=processor.data_collator(), processing_class=processor)

A row is `{"messages": [...], "images": [...]}`: messages in the chat format (content blocks `{"type": "image" |
"volume" | "video", "path": ...}` and `{"type": "text", "text": ...}`; a JSON string of them works too). The "images"
column is TRL's sign of a vision dataset: with it SFTTrainer keeps the rows as they are for the collator (no
tokenising pass, no column removal), so no SFTConfig option needs changing; it may be empty, or hold PIL images for
blocks written TRL's way (`{"type": "image"}` without a source, filled in order).
"""

import json
from collections import OrderedDict

import torch

from .media_omnivmed import MediaError


class OmniVMedCollator:
    """Batches conversations through the processor (media loaded, resized, patched, pruned; placeholders expanded).

    Returns input_ids / attention_mask / labels (B, L) padded on the right, mm_token_type_ids, and the packed visual
    tensors of the whole batch concatenated (pixel_values (N, C*p*p), patch_positions, grid_thw, merge_sizes,
    visual_keep_mask), which is what the model expects. labels = input_ids where the processor's assistant mask is 1
    (assistant replies and their <|im_end|>), else -100. media_metadata is dropped.

    prune_threshold: per-batch override of the processor's threshold (0 = no pruning); the processor's keep mask
    travels with the batch, so the model uses exactly the tokens the text was expanded for.
    cache_size: keep up to this many loaded media in memory (small datasets read many times; 0 = off).
    """

    def __init__(self, processor, prune_threshold: float | None = None, cache_size: int = 0):
        self.processor = processor
        self.prune_threshold = prune_threshold
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    def _media(self, block: dict, data_root: str | None) -> dict:
        if data_root is not None:
            block = {**block, "data_root": data_root}
        if not self.cache_size:
            return block
        key = json.dumps(block, sort_keys=True)
        media = self._cache.get(key)
        if media is None:
            media = self.processor.image_processor.to_media(block)
            self._cache[key] = media
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return {"type": block["type"], block["type"]: media}

    def conversation(self, example: dict, drop_last_assistant: bool = False) -> list[dict]:
        messages = example["messages"]
        messages = json.loads(messages) if isinstance(messages, str) else messages
        if drop_last_assistant and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        root = example.get("data_root")
        images = list(example.get("images") or ())
        out = []
        for m in messages:
            content = []
            for b in m["content"]:
                b = {k: v for k, v in b.items() if v is not None}  # a datasets column fills absent keys with None
                if b["type"] != "text" and len(b) == 1 and images:  # TRL's way: the image is in the "images" column
                    b = {"type": b["type"], b["type"]: images.pop(0)}
                content.append(b if b["type"] == "text" else self._media(b, root))
            out.append({"role": m["role"], "content": content})
        return out

    def __call__(self, examples: list[dict]) -> dict:
        kwargs = {} if self.prune_threshold is None else {"prune_threshold": self.prune_threshold}
        try:
            batch = self.processor.apply_chat_template(
                [self.conversation(ex) for ex in examples],
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                return_assistant_tokens_mask=True,
                padding=True,
                padding_side="right",
                **kwargs,
            )
        except (MediaError, ValueError) as e:
            sources = ", ".join(ex.get("source", "?") for ex in examples)
            raise RuntimeError(f"could not build a batch from rows [{sources}]: {e}") from e
        batch.pop("media_metadata", None)
        assistant = torch.as_tensor(batch.pop("assistant_masks"))
        batch["labels"] = batch["input_ids"].masked_fill((assistant == 0) | (batch["attention_mask"] == 0), -100)
        return dict(batch)
