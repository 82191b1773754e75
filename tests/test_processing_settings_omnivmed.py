"""One source of truth for the pruning settings (and image_mean / image_std): the model's config.json. A processor
loaded from a folder uses them, saves no copy of the pruning rule beside it, and a per-call override reaches the model
through the visual_keep_mask the processor returns."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from build_omnivmed import build_tiny
from omnivmed.configuration_omnivmed import PROCESSOR_SETTINGS
from omnivmed.media_omnivmed import Media
from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration
from omnivmed.processing_omnivmed import (
    IMAGE_TOKEN,
    VISION_END,
    VISION_START,
    OmniVMedImageProcessor,
    OmniVMedProcessor,
)


PRUNING = [name for name in PROCESSOR_SETTINGS if name.startswith("prune_")]
PROMPT = f"{VISION_START}{IMAGE_TOKEN}{VISION_END} What changes?"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("settings") / "tiny", seed=0)


@pytest.fixture
def folder(built, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    return out


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def video():
    """A static random scene with a square moving across it: pruning keeps a threshold-dependent share."""
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.random((1, 112, 112, 3), dtype=np.float32), 6, axis=0)
    for f in range(6):
        frames[f, 20:60, 10 * f : 10 * f + 40] = 0.2 + 0.1 * f
        frames[f] += np.float32(0.01 * f)  # a slow global drift, below or above the threshold by its size
    return Media(frames=np.clip(frames, 0, 1), kind="video", source="moving-square")


def test_build_writes_the_pruning_rule_once(built):
    config = json.loads((built / "config.json").read_text())
    assert all(name in config for name in PROCESSOR_SETTINGS)
    processor_config = json.loads((built / "processor_config.json").read_text())["image_processor"]
    preprocessor = json.loads((built / "preprocessor_config.json").read_text())
    for saved in (processor_config, preprocessor):
        assert not [name for name in PRUNING if name in saved]
        # mean / std stay for tools that read only this file, equal to the config's
        assert saved["image_mean"] == config["image_mean"] and saved["image_std"] == config["image_std"]


def test_processor_takes_the_settings_from_config_json(folder):
    edit_json(folder / "config.json", prune_threshold=0.37, prune_reference="previous", prune_unit="intensity",
              prune_keep_first_frame=False, prune_min_tokens=2, prune_min_tokens_pick="first",
              image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])  # fmt: skip
    expected = dict(prune_threshold=0.37, prune_reference="previous", prune_unit="intensity",
                    prune_keep_first_frame=False, prune_min_tokens=2, prune_min_tokens_pick="first",
                    image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])  # fmt: skip
    for image_processor in (
        OmniVMedProcessor.from_pretrained(folder).image_processor,
        OmniVMedImageProcessor.from_pretrained(folder),
    ):
        assert {name: getattr(image_processor, name) for name in expected} == expected
    # the model reads the same file
    model = OmniVMedForConditionalGeneration.from_pretrained(folder)
    assert model.config.processor_settings() == expected
    # an explicit setting still wins over both
    assert OmniVMedProcessor.from_pretrained(folder, prune_threshold=0.05).image_processor.prune_threshold == 0.05
    assert OmniVMedImageProcessor.from_pretrained(folder, prune_threshold=0.05).prune_threshold == 0.05


def test_override_travels_to_the_model_through_the_mask(built):
    """processor(prune_threshold=X) and its visual_keep_mask give the logits the model gives with its config set to X
    (recomputing the mask itself); the model with its own config and no mask refuses the text, naming the cause."""
    processor = OmniVMedProcessor.from_pretrained(built)
    model = OmniVMedForConditionalGeneration.from_pretrained(built).eval()
    default = processor(text=PROMPT, media=[video()], return_tensors="pt")
    inputs = processor(text=PROMPT, media=[video()], prune_threshold=0.3, return_tensors="pt")
    keep = inputs["visual_keep_mask"]
    assert 0 < int(keep.sum()) < int(default["visual_keep_mask"].sum()) < keep.numel()
    with torch.no_grad():
        with_mask = model(**inputs).logits
        without_mask = {k: v for k, v in inputs.items() if k != "visual_keep_mask"}
        with pytest.raises(ValueError, match="config.json holds the pruning settings"):
            model(**without_mask)
        model.config.prune_threshold = 0.3
        recomputed = model(**without_mask)
    assert torch.equal(recomputed.visual_keep_mask, keep)
    torch.testing.assert_close(recomputed.logits, with_mask, atol=0, rtol=0)


def _write_old_processor_settings(folder, **settings):
    """A folder as written before config.json became the one source: the rule in the processor files too."""
    processor_config = json.loads((folder / "processor_config.json").read_text())
    processor_config["image_processor"].update(settings)
    (folder / "processor_config.json").write_text(json.dumps(processor_config))
    edit_json(folder / "preprocessor_config.json", **settings)


def test_old_folders_with_settings_in_the_processor_files_still_load(folder, caplog):
    config = json.loads((folder / "config.json").read_text())
    same = {name: config[name] for name in PROCESSOR_SETTINGS}
    _write_old_processor_settings(folder, **same)
    with caplog.at_level(logging.WARNING):
        processor = OmniVMedProcessor.from_pretrained(folder)
    assert not [r for r in caplog.records if "differ from config.json" in r.getMessage()]
    assert {name: getattr(processor.image_processor, name) for name in PROCESSOR_SETTINGS} == same

    # a copy that was edited apart from config.json: config.json wins, with a warning naming both values
    _write_old_processor_settings(folder, prune_threshold=0.5, prune_reference="previous")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        processor = OmniVMedProcessor.from_pretrained(folder)
        image_processor = OmniVMedImageProcessor.from_pretrained(folder)
    warnings = [r.getMessage() for r in caplog.records if "differ from config.json" in r.getMessage()]
    assert len(warnings) == 2 and "0.5 -> 0.1" in warnings[0] and "'previous' -> 'last_kept'" in warnings[0]
    for ip in (processor.image_processor, image_processor):
        assert (ip.prune_threshold, ip.prune_reference) == (config["prune_threshold"], config["prune_reference"])

    # without a config.json (a processor-only folder), the processor files are all there is
    (folder / "config.json").unlink()
    alone = OmniVMedProcessor.from_pretrained(folder)
    assert (alone.image_processor.prune_threshold, alone.image_processor.prune_reference) == (0.5, "previous")


def test_saving_beside_a_config_that_disagrees_is_refused(folder):
    processor = OmniVMedProcessor.from_pretrained(folder)
    processor.save_pretrained(folder)  # agrees: fine, and still no copy of the rule
    assert "prune_threshold" not in json.loads((folder / "preprocessor_config.json").read_text())
    processor.image_processor.prune_threshold = 0.25
    with pytest.raises(ValueError, match=r"prune_threshold.*0\.25.*config\.json"):
        processor.save_pretrained(folder)
    with pytest.raises(ValueError, match="one source"):
        processor.image_processor.save_pretrained(folder)
    # a processor saved on its own keeps its settings
    processor.save_pretrained(folder / "processor-only")
    assert OmniVMedProcessor.from_pretrained(folder / "processor-only").image_processor.prune_threshold == 0.25
