"""generate() in every mode that repeats the inputs (beams, returned sequences, sampling, chunked prefill): each beam /
returned sequence must see its own prompt's media. The reference is a plain forward of that prompt alone: the first
generated step's logits of every row equal its last-token logits."""

import numpy as np
import pytest
import torch
from conftest import tiny_config_dict

from omnivmed.configuration_omnivmed import OmniVMedConfig
from omnivmed.media_omnivmed import Media
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration
from omnivmed.processing_omnivmed import OmniVMedImageProcessor
from omnivmed.pruning_omnivmed import tokens_per_frame


IMG, START, END, FRAME, PAD = 5, 6, 7, 8, 0
VISUAL_KEYS = ("pixel_values", "patch_positions", "grid_thw", "merge_sizes", "visual_keep_mask")

# every mode of generate that repeats the prompt (expand size = max(num_beams, num_return_sequences)); greedy search
# with num_return_sequences > 1 is refused by transformers itself. Chunked prefill feeds the repeated features in
# slices. The rows of the first step's logits are (prompt, copy) in prompt-major order.
MODES = {
    "beam_search": dict(num_beams=3),
    "beam_search_return_2": dict(num_beams=3, num_return_sequences=2),
    "sample_return_3": dict(do_sample=True, num_return_sequences=3),
    "beam_sample_return_2": dict(do_sample=True, num_beams=2, num_return_sequences=2),
    "beam_search_chunked_prefill": dict(num_beams=2, prefill_chunk_size=7),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = OmniVMedConfig(**tiny_config_dict(text_config={"pad_token_id": PAD}))
    return OmniVMedForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def image_processor():
    return OmniVMedImageProcessor(patch_size=4, min_pixels=64, max_pixels=32 * 32, video_max_pixels=16 * 20)


def moving_square(t, h, w, seed):
    """A static random scene with a bright square moving across it: pruning drops the unchanged blocks."""
    rng = np.random.default_rng(seed)
    frames = np.repeat(rng.random((1, h, w, 3), dtype=np.float32), t, axis=0)
    for f in range(t):
        frames[f, 2:8, 2 * f : 2 * f + 6] = 0.95
    return frames


MEDIA = {
    "image": lambda: Media(frames=np.random.default_rng(1).random((1, 16, 24, 3), dtype=np.float32), kind="image",
                           source="image"),  # fmt: skip
    "volume": lambda: Media(frames=moving_square(6, 16, 16, 2), kind="volume", source="volume"),
    "video": lambda: Media(frames=moving_square(5, 16, 20, 3), kind="video", source="video"),
}


def prompt(processor, kinds, prefix):
    """Token ids as the processor writes them (vision_start, per frame frame_sep + kept placeholders, vision_end) and
    the visual inputs, for one prompt with the given media."""
    visual = processor([MEDIA[k]() for k in kinds], return_tensors="pt")
    ids = list(prefix)
    for kind, per_frame in zip(kinds, tokens_per_frame(visual["visual_keep_mask"], visual["grid_thw"],
                                                       visual["merge_sizes"])):  # fmt: skip
        ids.append(START)
        ids += [IMG] * per_frame[0] if kind == "image" else [t for k in per_frame for t in [FRAME] + [IMG] * k]
        ids.append(END)
    ids += [30, 31]
    return ids, visual


def batch_of(prompts):
    """Left-padded batch of several prompts, their media packed in order."""
    width = max(len(ids) for ids, _ in prompts)
    input_ids = torch.tensor([[PAD] * (width - len(ids)) + ids for ids, _ in prompts])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in prompts])
    visual = {k: torch.cat([v[k] for _, v in prompts]) for k in VISUAL_KEYS}
    visual["media_metadata"] = [m for _, v in prompts for m in v["media_metadata"]]
    # as the processor returns it: a per-row tensor, which generate repeats row by row (right for it)
    visual["mm_token_type_ids"] = (input_ids == IMG).long()
    return dict(input_ids=input_ids, attention_mask=attention_mask, **visual)


def alone_logits(model, prompts):
    """Last-token logits of a plain forward of each prompt by itself (no padding, no generate)."""
    out = []
    with torch.no_grad():
        for ids, visual in prompts:
            inputs = {k: visual[k] for k in VISUAL_KEYS}
            out.append(model(input_ids=torch.tensor([ids]), **inputs).logits[0, -1])
    return torch.stack(out)


def first_step_logits(model, batch, mode):
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, **MODES[mode], max_new_tokens=2, pad_token_id=PAD, eos_token_id=None,
                             return_dict_in_generate=True, output_logits=True)  # fmt: skip
    return out.logits[0]


CASES = {
    "image": [(("image",), (1, 2))],
    "pruned_volume": [(("volume",), (1, 2))],
    "pruned_video": [(("video",), (1, 2))],
    # two prompts with different media and lengths, left padded: an image + a video, and a pruned volume
    "mixed_batch": [(("image", "video"), (1, 2, 9)), (("volume",), (3,))],
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_every_expanded_row_sees_its_own_media(model, image_processor, case, mode):
    prompts = [prompt(image_processor, kinds, prefix) for kinds, prefix in CASES[case]]
    for (ids, visual), (kinds, _) in zip(prompts, CASES[case]):
        keep = visual["visual_keep_mask"]
        if any(k != "image" for k in kinds):  # pruning really drops tokens of the volume / video
            assert int(keep.sum()) < keep.numel()
        assert ids.count(IMG) == int(keep.sum())
    expected = alone_logits(model, prompts)
    logits = first_step_logits(model, batch_of(prompts), mode)
    copies = logits.shape[0] // len(prompts)
    assert copies == max(MODES[mode].get("num_beams", 1), MODES[mode].get("num_return_sequences", 1))
    torch.testing.assert_close(logits, expected.repeat_interleave(copies, dim=0), atol=2e-5, rtol=1e-5)
    # and the media matter: another prompt's media would give other logits
    assert (expected[:, None] - expected[None, :]).abs().amax() > 1e-3 or len(prompts) == 1


def test_beam_search_from_inputs_embeds(model, image_processor):
    """Without input_ids, the prompts' items are found by the placeholder embedding."""
    prompts = [prompt(image_processor, kinds, prefix) for kinds, prefix in CASES["mixed_batch"]]
    batch = batch_of(prompts)
    batch["inputs_embeds"] = model.get_input_embeddings()(batch.pop("input_ids")).detach()
    logits = first_step_logits(model, batch, "beam_search")
    expected = alone_logits(model, prompts)
    torch.testing.assert_close(logits, expected.repeat_interleave(3, dim=0), atol=2e-5, rtol=1e-5)


def test_inputs_embeds_without_placeholder_embeddings_is_a_clear_error(model, image_processor):
    """Embeddings whose placeholders were already replaced cannot show which rows hold which media: refused before
    anything is repeated, not scattered into the wrong beams."""
    prompts = [prompt(image_processor, kinds, prefix) for kinds, prefix in CASES["mixed_batch"]]
    batch = batch_of(prompts)
    ids = batch.pop("input_ids")
    batch["inputs_embeds"] = model.get_input_embeddings()(ids).detach() + 0.01
    with pytest.raises(ValueError, match="The text has 0 image placeholder tokens"):
        model.generate(**batch, num_beams=2, max_new_tokens=1, pad_token_id=PAD)


def test_media_metadata_follows_its_items_into_every_copy(model, image_processor):
    prompts = [prompt(image_processor, kinds, prefix) for kinds, prefix in CASES["mixed_batch"]]
    batch = batch_of(prompts)
    seen = []

    def record(module, args, kwargs):
        if kwargs.get("mm_encoder_outputs"):
            seen.append([m["source"] for m in kwargs["media_metadata"]])

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(**batch, num_beams=2, max_new_tokens=1, pad_token_id=PAD)
    finally:
        handle.remove()
    assert seen[0] == ["image", "video", "image", "video", "volume", "volume"]


def test_generate_encodes_the_media_once(model, image_processor):
    """The tower runs once per generate call, not once per beam nor once per step."""
    prompts = [prompt(image_processor, kinds, prefix) for kinds, prefix in CASES["mixed_batch"]]
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        model.generate(**batch_of(prompts), num_beams=3, max_new_tokens=3, pad_token_id=PAD, eos_token_id=None)
        model.generate(**batch_of(prompts), num_beams=3, max_new_tokens=3, pad_token_id=PAD, eos_token_id=None,
                       use_cache=False)  # fmt: skip
    finally:
        handle.remove()
    n_patches = sum(v["pixel_values"].shape[0] for _, v in prompts)
    assert calls == [n_patches, n_patches]


def test_media_split_across_prompts_is_a_clear_error(model, image_processor):
    """Placeholder counts that cut an item in two (so beams would get parts of another prompt's media) are refused
    before anything is repeated."""
    (ids_a, vis_a), (ids_b, vis_b) = [prompt(image_processor, k, p) for k, p in CASES["mixed_batch"]]
    batch = batch_of([(ids_a, vis_a), (ids_b, vis_b)])
    # move the volume's first frame into the first prompt, keeping the total
    first_frame = tokens_per_frame(vis_b["visual_keep_mask"], vis_b["grid_thw"], vis_b["merge_sizes"])[0][0]
    ids = batch["input_ids"]
    ids[1, (ids[1] == IMG).nonzero()[:first_frame, 0]] = 40
    ids[0, (ids[0] == 9).nonzero()[0, 0]] = IMG  # one more placeholder in prompt 0 ...
    with pytest.raises(ValueError, match="do not split the media into whole items|image placeholder tokens"):
        model.generate(**batch, num_beams=2, max_new_tokens=1, pad_token_id=PAD)


@pytest.fixture(scope="module")
def qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=320, max_position_embeddings=1024, pad_token_id=PAD,
                bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})  # fmt: skip
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=9,
                              vision_start_token_id=START, vision_end_token_id=END)  # fmt: skip
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.mark.parametrize("mode", list(MODES))
def test_the_harness_on_transformers_qwen2_5_vl(qwen2_5_vl, mode):
    """The reference semantics: transformers' own Qwen2.5-VL, in the same harness (a left-padded batch of a prompt
    with two images and one with a third of another size), gives every row its own prompt's logits too."""
    prompts = []
    for seed, (prefix, grids) in enumerate([((1, 2), [(4, 6), (4, 4)]), ((3,), [(8, 4)])]):
        ids, pixels = list(prefix), []
        for h, w in grids:
            pixels.append(torch.randn(h * w, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(10 * seed + h)))
            ids += [START] + [IMG] * (h * w // 4) + [END]
        prompts.append((ids + [30, 31], dict(pixel_values=torch.cat(pixels),
                                             image_grid_thw=torch.tensor([[1, h, w] for h, w in grids]))))  # fmt: skip
    with torch.no_grad():
        expected = torch.stack([
            qwen2_5_vl(input_ids=torch.tensor([ids]), mm_token_type_ids=(torch.tensor([ids]) == IMG).long(),
                       **visual).logits[0, -1]
            for ids, visual in prompts
        ])  # fmt: skip
    width = max(len(ids) for ids, _ in prompts)
    input_ids = torch.tensor([[PAD] * (width - len(ids)) + ids for ids, _ in prompts])
    batch = dict(
        input_ids=input_ids,
        attention_mask=torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in prompts]),
        mm_token_type_ids=(input_ids == IMG).long(),
        pixel_values=torch.cat([v["pixel_values"] for _, v in prompts]),
        image_grid_thw=torch.cat([v["image_grid_thw"] for _, v in prompts]),
    )
    logits = first_step_logits(qwen2_5_vl, batch, mode)
    copies = logits.shape[0] // len(prompts)
    torch.testing.assert_close(logits, expected.repeat_interleave(copies, dim=0), atol=2e-5, rtol=1e-5)
