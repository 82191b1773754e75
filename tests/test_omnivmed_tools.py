"""omnivmed_tools.py: the one answer normaliser (against hand-computed values; the embedded default and the evaluator
score through it), JSONL writing, checkpoint index reading against safetensors' own headers."""

import json

import pytest
import torch
from safetensors.torch import save_file

import data_omnivmed
import evaluate_omnivmed
import omnivmed_tools as tools


def test_normalisation_and_yes_no():
    assert tools.normalize_answer("The LEFT lung.") == "left lung"
    assert tools.normalize_answer("Calot_Triangle  dissection!") == "calot triangle dissection"
    assert tools.normalize_answer("Two nodules") == "2 nodules"
    assert tools.yes_no("No, there is no effusion.") == "no"
    assert tools.yes_no("Yes") == "yes"
    assert tools.yes_no("There is no effusion") is None
    assert tools.yes_no("normal") is None
    assert tools.closed_correct("Yes, it is.", "yes") and not tools.closed_correct("normal", "no")
    assert tools.closed_correct("Axial.", "axial") and not tools.closed_correct("axial plane", "axial")


def test_the_embedded_default_and_the_evaluator_score_with_the_same_normaliser():
    assert data_omnivmed.normalize_answer is tools.normalize_answer is evaluate_omnivmed.normalize_answer
    rows = [
        {"meta": json.dumps({"task": "side", "kind": "volume", "answer": answer})}
        for answer in ("left", "right", "left", "right")
    ]
    # case and punctuation do not matter; the reply's first line is the answer; a wrong word is wrong
    table = data_omnivmed.score_rows(rows, ["Left.", "right\nthe lesion is large", "right", ""])["table"]
    assert table == [dict(task="side", kind="volume", n=4, accuracy=0.5, chance=0.5, majority=0.5)]
    # every answer of the embedded default normalises to itself in lower case (no article or number word is lost)
    for answers in tools.ANSWERS.values():
        for answer in answers:
            assert tools.normalize_answer(answer) == answer.lower()


def test_write_jsonl_round_trips_and_leaves_no_temporary_file(tmp_path):
    rows = [{"a": 1, "text": "größe 5 mm"}, {"b": [1, 2]}]
    path = tmp_path / "rows.jsonl"
    tools.write_jsonl(path, rows)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_read_tensor_index_matches_the_safetensors_headers(tmp_path):
    tensors = {"a.weight": torch.zeros(3, 4), "b.bias": torch.ones(5, dtype=torch.float16)}
    save_file(tensors, tmp_path / "model.safetensors")
    index = tools.read_tensor_index(tmp_path)
    assert {k: (v.shape, v.dtype) for k, v in index.items()} == {"a.weight": ((3, 4), "F32"), "b.bias": ((5,), "F16")}
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(tools.BuildError, match="pickle checkpoints"):
        tools.read_tensor_index(tmp_path)


def test_short_names_how_many_were_left_out():
    assert tools.short(range(3)) == "[0, 1, 2]"
    assert tools.short(range(25), limit=2) == "[0, 1, ... (23 more)]"


def test_card_has_the_sections_a_medical_model_needs_and_its_licence_from_the_parts(tmp_path):
    from omnivmed.configuration_omnivmed import OmniVMedConfig
    from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration

    from conftest import tiny_config_dict

    model = OmniVMedForConditionalGeneration(OmniVMedConfig(**tiny_config_dict()))
    part = tmp_path / "qwen-part"
    part.mkdir()
    (part / "README.md").write_text("---\nlicense: other\nlicense_name: qwen-research\n---\n# a part\n")
    tools.write_model_card(tmp_path, model, title="T", description="D", repo="me/omnivmed-x",
                           parts=[("language model: " + tools.public_name(str(part)), tools.part_license(part)),
                                  ("vision tower: google/siglip", "apache-2.0")],
                           training_data="rows.jsonl", evaluation="none yet")  # fmt: skip
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: other" in front and "license_name: omnivmed-parts" in front
    for section in ("## Intended use", "**Not for clinical use.**", "## Out of scope", "## Limitations",
                    "## Training data\n\nrows.jsonl", "## Evaluation\n\nnone yet", "## Licence", "## Citation"):
        assert section in card, section
    assert "arXiv:2504.14692" in card and 'from_pretrained("me/omnivmed-x"' in card
    assert "- language model: qwen-part (a local folder): other" in card and "- vision tower: google/siglip: apache-2.0" in card
    assert str(tmp_path) not in card

    # every part under one licence: that licence
    tools.write_model_card(tmp_path, model, title="T", description="D", repo="r", parts=[("p", "apache-2.0")])
    assert (tmp_path / "README.md").read_text().startswith("---\nlicense: apache-2.0\nlibrary_name: transformers\n")


def test_load_model_overrides_the_checkpoints_prune_stage(tmp_path):
    folder = tools.build_tiny(tmp_path / "tiny", seed=0)
    saved = json.loads((folder / "config.json").read_text())["prune_stage"]
    model, _ = tools.load_model(str(folder), "cpu", "float32")
    assert model.config.prune_stage == saved == "pre_encoder_reuse"
    model, _ = tools.load_model(str(folder), "cpu", "float32", prune_stage="pre_encoder")
    assert model.config.prune_stage == "pre_encoder"
    assert json.loads((folder / "config.json").read_text())["prune_stage"] == saved  # the folder is not changed
