"""train_trl.py: staged TRL fine-tuning (freezing, per-module learning rates, assistant-only labels), LoRA, resume,
two-process DDP, push to a fake Hub, bad dataset rows, and the embedded default's data (labels match the pixels).

Everything is offline and small: the tiny preset (~5M parameters), 56x56 media, a few optimizer steps per run."""

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_trl  # noqa: E402
from train_trl import MODULES, BadRowsError, OmniVMedCollator, load_processor, load_rows, main, module_of  # noqa: E402


TEST_PROCESSOR = dict(max_pixels=56 * 56, video_max_pixels=56 * 56, max_slices=4, max_frames=4, fps=2.0)


# ------------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny preset with a 56x56 pixel budget (2x2 visual tokens per image / slice / frame)."""
    from build_omnivmed import build_tiny
    from omnivmed.processing_omnivmed import OmniVMedProcessor

    out = build_tiny(tmp_path_factory.mktemp("model") / "tiny", seed=0)
    OmniVMedProcessor.from_pretrained(out, trust_remote_code=True, **TEST_PROCESSOR).save_pretrained(out)
    return out


def _write_video(path: Path, direction: int = 1):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4, options={"threads": "1"})
        stream.width = stream.height = 56
        stream.pix_fmt = "yuv420p"
        for t in range(8):
            frame = np.full((56, 56, 3), 60, np.uint8)
            x = 4 + 6 * t if direction > 0 else 46 - 6 * t
            frame[20:36, x : x + 8] = 230
            for packet in stream.encode(__import__("av").VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny media (PNGs, a NIfTI, an MP4) and JSONL files for the three stages, in both row styles."""
    import nibabel as nib
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = (rng.random((56, 56)) * 80).astype(np.uint8)
        pixels[10:30, (8 if i % 2 else 30) : (26 if i % 2 else 48)] = 250
        Image.fromarray(pixels).save(root / f"img{i}.png")
    volume = (rng.random((24, 24, 8)) * 100).astype(np.uint8)
    volume[4:10, 6:14, 2:5] = 250
    (root / "vol").mkdir()
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0])), root / "vol" / "scan.nii.gz")
    _write_video(root / "clip.mp4")

    def llava(i, question, answer):
        return {"image": f"img{i}.png", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                          {"from": "gpt", "value": answer}]}  # fmt: skip

    stage1 = [llava(i, "Describe the image.", f"A bright block on the {'left' if i % 2 else 'right'}.") for i in range(8)]
    stage2 = [llava(i, "Where is the block?", "left" if i % 2 else "right") for i in range(8)]
    stage3 = stage2[:4] + [
        {"messages": [{"role": "user", "content": [{"type": "volume", "path": "vol/scan.nii.gz"},
                                                   {"type": "text", "text": "Is there a lesion?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]},
        {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nWhere does it move?"},
                                                {"from": "gpt", "value": "right"}]},
    ] * 2  # fmt: skip
    for name, rows in (("stage1", stage1), ("stage2", stage2), ("stage3", stage3)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _args(tiny_dir, data_dir, out, *extra):
    return [
        "--model", str(tiny_dir), "--output_dir", str(out), "--data_root", str(data_dir),
        "--stage1_data", str(data_dir / "stage1.jsonl"), "--stage2_data", str(data_dir / "stage2.jsonl"),
        "--stage3_data", str(data_dir / "stage3.jsonl"), "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--num_threads", "1", "--warmup_ratio", "0", *extra,
    ]  # fmt: skip


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _changed(before: dict, after: dict) -> dict:
    """module -> (number of tensors changed, number of tensors)."""
    out = {m: [0, 0] for m in MODULES}
    for name, tensor in before.items():
        module = module_of(name)
        out[module][1] += 1
        out[module][0] += int(not torch.equal(tensor, after[name]))
    return out


class Recorder:
    """A TrainerCallback that records the optimizer's param groups and the trainable parameter names per stage."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
                recorder.groups.append(
                    sorted((g["module"], g.get("initial_lr", g["lr"]), len(g["params"])) for g in optimizer.param_groups)
                )
                recorder.trainable.append([n for n, p in model.named_parameters() if p.requires_grad])

        self.groups, self.trainable = [], []
        self.callback = _Callback()


# ------------------------------------------------------------------------------------------------------------ collator
def test_labels_only_on_assistant_replies(tiny_dir, data_dir):
    processor = load_processor(tiny_dir)
    rows = load_rows([data_dir / "stage3.jsonl"], data_root=data_dir)[:6]
    # a multi-turn row: two assistant replies, the second one after a second image
    multi = {
        "image": ["img0.png", "img1.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "one"},
            {"from": "human", "value": "<image>\nSecond?"}, {"from": "gpt", "value": "two words"},
        ],
    }  # fmt: skip
    (data_dir / "multi.jsonl").write_text(json.dumps(multi) + "\n")
    rows += load_rows([data_dir / "multi.jsonl"], data_root=data_dir)
    batch = OmniVMedCollator(processor, prune_threshold=0.1)(rows)

    assert "media_metadata" not in batch and "assistant_masks" not in batch
    grid = batch["grid_thw"]
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())  # packed: every item's patches, concatenated
    assert sorted(set(grid[:, 0].tolist())) == [1, 4]  # images, and the volume / video at max_slices = max_frames = 4
    tok = processor.tokenizer
    media_ids = {processor.image_token_id, processor.frame_token_id, processor.vision_start_token_id,
                 processor.vision_end_token_id}  # fmt: skip
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, row in enumerate(rows):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        assert bool((labels[mask == 0] == -100).all())
        trained = labels != -100
        assert bool((labels[trained] == ids[trained]).all())
        assert not any(int(t) in media_ids for t in ids[trained])
        # exactly the assistant replies, each followed by its <|im_end|>
        messages = json.loads(row["messages"])
        replies = [b["text"] for m in messages if m["role"] == "assistant" for b in m["content"]]
        expected = [t for reply in replies for t in tok(reply, add_special_tokens=False)["input_ids"] + [im_end]]
        assert ids[trained].tolist() == expected
    # the visual placeholders are the kept tokens of the keep mask
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == int(batch["visual_keep_mask"].sum())


def test_per_stage_values_and_module_names():
    assert train_trl._per_stage("5", [1, 2, 3], int, "x") == {1: 5, 2: 5, 3: 5}
    assert train_trl._per_stage("1e-3,2e-5", [2, 3], float, "x") == {2: 1e-3, 3: 2e-5}
    assert train_trl._per_stage("3:2e-5,1:4", [1, 3], float, "x") == {3: 2e-5, 1: 4.0}
    with pytest.raises(SystemExit):
        train_trl._per_stage("1,2", [1, 2, 3], int, "x")
    assert module_of("base_model.model.model.vision_tower.layers.0.mlp.fc1.weight") == "tower"
    assert module_of("module.model.projector.linear_1.weight") == "projector"
    assert module_of("model.language_model.layers.1.self_attn.q_proj.lora_A.default.weight") == "llm"


# -------------------------------------------------------------------------------------------------------------- stages
def test_three_stages_freeze_train_and_learning_rates(tiny_dir, data_dir, tmp_path):
    recorder = Recorder()
    final = main(
        _args(tiny_dir, data_dir, tmp_path / "run", "--stages", "1,2,3", "--max_steps", "2",
              "--lr_tower", "2:3e-4,3:2e-4", "--lr_preset", "paper"),
        callbacks=[recorder.callback],
    )  # fmt: skip
    # per-module learning rates: stage 1 trains only the projector at the paper's 1e-3; stages 2 and 3 take the
    # tower's rate from --lr_tower (one value per stage) and the paper's 1e-5 for the projector and the LLM
    lrs = [{m: lr for m, lr, _ in groups} for groups in recorder.groups]
    assert lrs == [
        {"projector": 1e-3},
        {"tower": 3e-4, "projector": 1e-5, "llm": 1e-5},
        {"tower": 2e-4, "projector": 1e-5, "llm": 1e-5},
    ]
    assert all(module_of(n) == "projector" for n in recorder.trainable[0])

    base = _weights(tiny_dir)
    stage1, stage2, stage3 = (_weights(tmp_path / "run" / s / "model")
                              for s in ("stage1-alignment", "stage2-instruct2d", "stage3-mixed"))  # fmt: skip
    c1 = _changed(base, stage1)
    assert c1["tower"][0] == 0 and c1["llm"][0] == 0  # frozen: bit-identical
    assert c1["projector"][0] == c1["projector"][1]  # trained: every tensor moved
    for before, after in ((stage1, stage2), (stage2, stage3)):
        changed = _changed(before, after)
        assert all(changed[m][0] > 0 for m in MODULES), changed
    # each stage starts from the previous stage's output, and the last one is the final model
    assert json.loads((tmp_path / "run/stage2-instruct2d/model/omnivmed_stage.json").read_text())["start_model"] == str(
        tmp_path / "run/stage1-alignment/model"
    )
    info3 = json.loads((tmp_path / "run/stage3-mixed/model/omnivmed_stage.json").read_text())
    info1 = json.loads((tmp_path / "run/stage1-alignment/model/omnivmed_stage.json").read_text())
    assert info3["prune_threshold"] == pytest.approx(0.1) and info1["prune_threshold"] == 0.0
    assert all(torch.equal(stage3[k], v) for k, v in _weights(final).items())
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_omnivmed.py", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "README.md"} <= names  # fmt: skip


def test_lora_trains_only_adapters_and_reloads(tiny_dir, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from omnivmed.modeling_omnivmed import OmniVMedForConditionalGeneration

    recorder = Recorder()
    final = main(
        _args(tiny_dir, data_dir, tmp_path / "run", "--stages", "2", "--train", "llm", "--lora", "--max_steps", "3",
              "--lr_llm", "1e-2", "--lora_dropout", "0"),
        callbacks=[recorder.callback],
    )  # fmt: skip
    trainable = recorder.trainable[0]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(".language_model." in n for n in trainable)  # not the tower's q/k/v of the same names
    assert [g[0] for g in recorder.groups[0]] == ["llm"]

    base, merged = _weights(tiny_dir), _weights(final)
    changed = _changed(base, merged)
    assert changed["tower"][0] == 0 and changed["projector"][0] == 0
    assert 0 < changed["llm"][0] < changed["llm"][1]  # the adapted linear layers only (not embeddings, norms)
    assert torch.equal(base["model.language_model.embed_tokens.weight"], merged["model.language_model.embed_tokens.weight"])

    adapter = tmp_path / "run" / "stage2-instruct2d" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    card = (adapter / "README.md").read_text()  # ours, not PEFT's empty template
    assert "library_name: peft" in card and "(LoRA adapter)" in card and "Not for clinical use" in card
    assert str(tmp_path) not in card and str(tiny_dir) not in card
    processor = load_processor(final)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(data_dir / "img1.png")},
                                             {"type": "text", "text": "Where is the block?"}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    inputs.pop("media_metadata")
    with_adapter = PeftModel.from_pretrained(OmniVMedForConditionalGeneration.from_pretrained(tiny_dir), adapter)
    reloaded = AutoModelForImageTextToText.from_pretrained(final, trust_remote_code=True)
    with torch.no_grad():
        a = with_adapter.get_base_model().generate(**inputs, max_new_tokens=4, do_sample=False)
        b = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        logits_a = with_adapter(**inputs).logits
        logits_b = reloaded(**inputs).logits
    assert a.shape[1] > inputs["input_ids"].shape[1]
    assert torch.allclose(logits_a, logits_b, atol=1e-4)  # adapter on the base == the merged model
    assert torch.equal(a, b)


# -------------------------------------------------------------------------------------------------------------- resume
class _Crash(RuntimeError):
    pass


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_dir, data_dir, tmp_path):
    from transformers import TrainerCallback

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Crash("killed after the step-3 checkpoint")

    common = ("--stages", "2", "--max_steps", "6", "--save_steps", "3", "--seed", "3", "--lr_preset", "tiny")
    straight = main(_args(tiny_dir, data_dir, tmp_path / "straight", *common))
    with pytest.raises(_Crash):
        main(_args(tiny_dir, data_dir, tmp_path / "crashed", *common), callbacks=[CrashAfterSave()])
    assert (tmp_path / "crashed" / "stage2-instruct2d" / "checkpoint-3").is_dir()
    assert not (tmp_path / "crashed" / "final").exists()
    resumed = main(_args(tiny_dir, data_dir, tmp_path / "crashed", *common, "--resume_from_checkpoint", "last"))
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.projector.linear_1.weight"], _weights(tiny_dir)["model.projector.linear_1.weight"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_torchrun_agree(tiny_dir, data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(ROOT / "train_trl.py"),
        *_args(tiny_dir, data_dir, tmp_path / "ddp", "--stages", "2,3", "--max_steps", "2", "--check_replicas",
               "--lr_preset", "tiny"),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert log.count("replica check over 2 processes: weights agree") == 2, log[-4000:]  # after each stage
    assert log.count("distributed, world size 2") == 2, log[-4000:]  # the Trainer ran DDP (not 2 copies)
    assert (tmp_path / "ddp" / "final" / "model.safetensors").exists()
    changed = _changed(_weights(tiny_dir), _weights(tmp_path / "ddp" / "final"))
    assert all(changed[m][0] > 0 for m in MODULES)


# ----------------------------------------------------------------------------------------------------------------- Hub
def test_push_to_hub_uploads_a_complete_repo(tiny_dir, data_dir, tmp_path, httpserver, monkeypatch):
    from huggingface_hub import constants

    commits = []

    def commit(request):
        from werkzeug import Response

        commits.append([json.loads(line) for line in request.get_data().splitlines() if line.strip()])
        return Response(json.dumps({"commitUrl": f"{httpserver.url_for('/')}me/tiny/commit/{'a' * 40}",
                                    "commitOid": "a" * 40}), content_type="application/json")  # fmt: skip

    def preupload(request):
        files = request.get_json()["files"]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    validated = []

    def validate_yaml(request):
        from werkzeug import Response

        validated.append(request.get_json()["content"])
        return Response(json.dumps({"errors": [], "warnings": []}), content_type="application/json")

    # the endpoints huggingface_hub's create_repo + upload_folder call (README metadata check, preupload, commit)
    httpserver.expect_request("/api/validate-yaml", method="POST").respond_with_handler(validate_yaml)
    httpserver.expect_request("/api/repos/create", method="POST").respond_with_json(
        {"url": httpserver.url_for("/me/tiny")}
    )
    httpserver.expect_request("/api/models/me/tiny/preupload/main", method="POST").respond_with_handler(
        lambda r: __import__("werkzeug").Response(json.dumps(preupload(r)), content_type="application/json")
    )
    httpserver.expect_request("/api/models/me/tiny/commit/main", method="POST").respond_with_handler(commit)
    monkeypatch.setenv("HF_ENDPOINT", httpserver.url_for("").rstrip("/"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    main(_args(tiny_dir, data_dir, tmp_path / "run", "--stages", "1", "--max_steps", "1", "--push_to_hub",
               "--hub_model_id", "me/tiny"))  # fmt: skip
    assert len(commits) == 1
    assert validated and validated[0].startswith("---\n")
    assert 'from_pretrained("me/tiny"' in validated[0] and str(tmp_path) not in validated[0]
    header, *files = commits[0]
    assert header["key"] == "header"
    uploaded = {f["value"]["path"]: base64.b64decode(f["value"]["content"]) for f in files if f["key"] == "file"}
    for name in ("config.json", "model.safetensors", "generation_config.json", "configuration_omnivmed.py",
                 "modeling_omnivmed.py", "processing_omnivmed.py", "pruning_omnivmed.py", "media_omnivmed.py",
                 "processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "README.md"):  # fmt: skip
        assert name in uploaded, f"{name} not uploaded: {sorted(uploaded)}"
    config = json.loads(uploaded["config.json"])
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_omnivmed.OmniVMedForConditionalGeneration"
    assert uploaded["model.safetensors"] == (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    assert "<|im_start|>" in uploaded["chat_template.jinja"].decode()
    assert b"pipeline_tag: image-text-to-text" in uploaded["README.md"]
    assert not [p for p in uploaded if p.startswith("checkpoint") or p.endswith((".bin", ".pt"))]


# ------------------------------------------------------------------------------------------------------------ bad rows
def test_bad_rows_are_reported_not_crashed_on(tiny_dir, data_dir, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes((data_dir / "img0.png").read_bytes())
    (data_dir / "clip.wav").write_bytes(b"RIFF....WAVE")
    good = {"image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                   {"from": "gpt", "value": "A."}]}  # fmt: skip
    rows = [
        good,
        {**good, "image": "missing.png"},
        {**good, "image": "../" + outside.name},
        {"messages": [{"role": "user", "content": [{"type": "audio", "path": "clip.wav"}]},
                      {"role": "assistant", "content": "A."}]},
        {"audio": "clip.wav", "conversations": good["conversations"]},
        {"video": "clip.wav", "conversations": [{"from": "human", "value": "<video>\nQ?"},
                                                {"from": "gpt", "value": "A."}]},
        {"image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}]},
        "not json at all",
        {**good, "image": "vol/scan.nii.gz"},
    ]  # fmt: skip
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    with pytest.raises(BadRowsError) as info:
        load_rows([path], data_root=data_dir)
    bad = {int(b.source.rsplit(":", 1)[1]): b.reason for b in info.value.bad}
    assert sorted(bad) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "does not exist" in bad[2]
    assert "escapes the data root" in bad[3]
    assert "unknown media type 'audio'" in bad[4] and "unknown media type 'audio'" in bad[5]
    assert "unknown media type '.wav'" in bad[6]
    assert "no assistant turn" in bad[7]
    assert "not valid JSON" in bad[8]
    assert "volume file but the row uses it as a image" in bad[9]
    message = str(info.value)
    assert "8 of 9 dataset rows are unusable" in message and f"{path}:3" in message and "--skip_bad_rows" in message

    kept = load_rows([path], data_root=data_dir, skip_bad_rows=True)
    assert [r["source"] for r in kept] == [f"{path}:1"]
    # the command line fails with the listing by default and trains on the good rows with --skip_bad_rows
    args = ["--model", str(tiny_dir), "--stages", "1", "--stage1_data", str(path), "--data_root", str(data_dir),
            "--max_steps", "1", "--per_device_train_batch_size", "1", "--num_threads", "1"]  # fmt: skip
    with pytest.raises(BadRowsError):
        main([*args, "--output_dir", str(tmp_path / "fail")])
    assert (main([*args, "--output_dir", str(tmp_path / "skip"), "--skip_bad_rows"]) / "config.json").exists()
    # full validation loads every medium: a corrupt file is caught before training
    (data_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    path.write_text(json.dumps({**good, "image": "broken.png"}) + "\n")
    load_rows([path], data_root=data_dir)  # the cheap check only sees an existing .png
    with pytest.raises(BadRowsError, match="broken.png"):
        load_rows([path], data_root=data_dir, validate_with=load_processor(tiny_dir))


# ------------------------------------------------------------------------------------------------- embedded default
def _lesion_column(frame: np.ndarray) -> float:
    """Mean column of the brightest pixels of a displayed slice, as a fraction of the width."""
    gray = frame[..., 0] if frame.ndim == 3 else frame
    ys, xs = np.nonzero(gray >= gray.max() - 0.02)
    return float(xs.mean()) / gray.shape[1]


def test_embedded_default_labels_match_the_pixels(tmp_path):
    """The small embedded dataset: every side label agrees with where the lesion is drawn (patient left = image
    right, in 2D PNGs and in volumes, whether stored RAS or LAS), level labels with the slice, video directions
    with the motion."""
    import data_omnivmed as d

    from omnivmed.media_omnivmed import load_media

    root = tmp_path / "data"
    paths = d.build_default_dataset(root, seed=0, size="small")
    rows = [json.loads(line) for p in (paths["stage2"], paths["stage3"], paths["eval"]) for line in open(p)]
    # training rows are multi-turn (every question about one item in one conversation): check each turn
    rows = [{**r, "task": t, "answer": a} for r in rows for t, a in zip(r["task"].split("+"), r["answer"].split(" / "))]
    tasks = {(r["task"], r["kind"]) for r in rows}
    assert {("lesion", "image"), ("side", "image"), ("modality", "image"), ("plane", "image"), ("lesion", "volume"),
            ("side", "volume"), ("level", "volume"), ("plane", "volume"), ("modality", "volume"),
            ("direction", "video")} <= tasks  # fmt: skip
    load_rows([paths["stage3"], paths["eval"]], data_root=root)  # every row is valid

    checked = {"image": 0, "volume": 0, "stored LAS": 0}
    for row in rows:
        if row["task"] == "side" and row["kind"] == "image":
            frame = load_media(root / row["image"]).frames[0]
            column = _lesion_column(frame)
            assert (column > 0.5) == (row["answer"] == "left"), (row["image"], column, row["answer"])
            checked["image"] += 1
        if row["task"] in ("side", "level") and row["kind"] == "volume":
            block = row["messages"][0]["content"][0]
            media = load_media(root / block["path"], max_slices=64)  # every slice
            # the ring's equator: the slice with the most rim pixels (the bright rim is the brightest thing there)
            bright = (media.frames[..., 0] >= media.frames[..., 0].max() - 0.05).reshape(len(media.frames), -1).sum(1)
            k = int(np.argmax(bright))
            if row["task"] == "side":
                assert (_lesion_column(media.frames[k]) > 0.5) == (row["answer"] == "left")
                checked["volume"] += 1
                import nibabel as nib

                checked["stored LAS"] += nib.aff2axcodes(nib.load(root / block["path"]).affine)[0] == "L"
            else:
                third = ("lower", "middle", "upper")[min(2, 3 * k // len(media.frames))]
                assert third == row["answer"], (block["path"], k, len(media.frames))
    assert min(checked.values()) > 0, checked

    for row in rows:
        if row["task"] == "direction":
            frames = load_media(root / row["video"], fps=8, max_frames=64).frames
            motion = np.abs(frames[1:] - frames[:-1]).sum(-1)
            centres = [np.argwhere(m > m.max() * 0.5).mean(0) for m in motion]
            dy, dx = centres[-1] - centres[0]
            expected = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert expected == row["answer"], (row["video"], dy, dx)
            # at the size the default processor gives the model (56 x 56: 4 x 4 patches of 14 px) the instrument is
            # big enough to see: grey metal (blue >= red) against red tissue, over 80 px of a 196-px patch (the
            # first, smaller instrument covered 16-45 px and direction was not learned)
            side = int(round(d.DEFAULT_PROCESSOR["video_max_pixels"] ** 0.5))
            first = Image.fromarray((frames[0] * 255).round().astype(np.uint8)).resize((side, side), Image.BICUBIC)
            first = np.asarray(first, np.float32) / 255
            metal = (first[..., 2] >= first[..., 0] - 0.02) & (first[..., 1] > 0.4)
            assert metal.sum() > 80, (row["video"], int(metal.sum()))


def test_embedded_default_training_rows_are_multi_turn(tmp_path):
    """Every training question of an item sits in one conversation, media attached once, each answer supervised;
    held-out rows stay single-turn."""
    import data_omnivmed as d

    single = [
        d._llava("image", "a.png", "Is there a lesion?", "yes", "lesion", source="s"),
        d._llava("image", "b.png", "Is there a lesion?", "no", "lesion", source="s"),
        d._llava("image", "a.png", "Which side?", "left", "side", source="s"),
        d._messages("volume", {"path": "v.nii.gz"}, "Which level?", "upper", "level", source="s"),
        d._messages("volume", {"path": "v.nii.gz", "slice_axis": "coronal"}, "Plane?", "coronal", "plane", source="s"),
        d._messages("volume", {"path": "v.nii.gz"}, "Is there a lesion?", "yes", "lesion", source="s"),
    ]
    merged = d.multi_turn(np.random.default_rng(0), single)
    assert len(merged) == 4  # a.png, b.png, v.nii.gz axial, v.nii.gz coronal
    a = next(r for r in merged if r.get("image") == "a.png")
    humans = [t["value"] for t in a["conversations"] if t["from"] == "human"]
    assert len(humans) == 2 and humans[0].startswith("<image>\n") and "<image>" not in humans[1]
    assert sorted(t["value"] for t in a["conversations"] if t["from"] == "gpt") == ["left", "yes"]
    v = next(r for r in merged if "messages" in r and r["task"].count("+") == 1)
    media = [b for m in v["messages"] for b in m["content"] if b["type"] != "text"]
    assert media == [{"type": "volume", "path": "v.nii.gz"}] and len(v["messages"]) == 4
    assert sorted(v["answer"].split(" / ")) == ["upper", "yes"]
    for seed in range(8):  # the lesion question always precedes the ones that presume a lesion
        for row in d.multi_turn(np.random.default_rng(seed), single):
            tasks = row["task"].split("+")
            if "lesion" in tasks:
                assert all(tasks.index("lesion") < i for i, t in enumerate(tasks) if t in ("side", "level")), tasks

    root = tmp_path / "data"
    paths = d.build_default_dataset(root, seed=0, size="small")
    train = [json.loads(line) for p in (paths["stage2"], paths["stage3"]) for line in open(p)]
    held_out = [json.loads(line) for line in open(paths["eval"])]
    assert any("+" in r["task"] for r in train) and not any("+" in r["task"] for r in held_out)
    keys = [d._media_key(r) for r in train if r["kind"] != "image"]
    assert len(keys) == len(set(keys))  # one conversation per volume / video (and its load options)


def test_tower_warm_up_trains_only_the_tower_and_learns_caption_words(tmp_path):
    """The tiny default's stand-in for SigLIP pretraining: the tower changes, projector and LLM do not, the saved
    folder loads with the Auto classes, and a second call reuses the folder instead of training again."""
    import data_omnivmed as d
    from train_trl import _caption_examples, warm_up_tower

    from build_omnivmed import build_tiny
    from omnivmed.processing_omnivmed import OmniVMedProcessor

    base = build_tiny(tmp_path / "base", seed=0)
    OmniVMedProcessor.from_pretrained(base, **TEST_PROCESSOR).save_pretrained(base)
    paths = d.build_default_dataset(tmp_path / "data", seed=0, size="small")
    rows = load_rows([str(paths["stage1"])], str(tmp_path / "data"))
    examples = _caption_examples(rows)
    assert len(examples) > 20 and all(b["type"] == "image" for b, _ in examples)
    out = warm_up_tower(base, rows, tmp_path / "warm", steps=60, lr=1e-3, batch_size=8, seed=0)
    before, after = _weights(base), _weights(out)
    tower = [k for k in before if "vision_tower" in k]
    assert tower and all(not torch.equal(before[k], after[k]) for k in tower if "weight" in k)
    assert all(torch.equal(before[k], after[k]) for k in before if "vision_tower" not in k)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(model.state_dict()[tower[0]], after[tower[0]])
    assert warm_up_tower(base, rows, out, steps=60, lr=1e-3, batch_size=8, seed=0) == out  # reused, not retrained
    assert all(torch.equal(_weights(out)[k], after[k]) for k in tower)
    # built from another recipe (here another seed): trained again, not silently reused
    assert warm_up_tower(base, rows, out, steps=60, lr=1e-3, batch_size=8, seed=1) == out
    again = _weights(out)
    assert any(not torch.equal(again[k], after[k]) for k in tower)
    assert all(torch.equal(again[k], after[k]) for k in before if "vision_tower" not in k)


def test_fresh_tiny_model_is_reused_only_when_built_from_the_same_recipe(tmp_path, caplog):
    """`python train_trl.py` keeps OUTPUT_DIR/base between runs; a folder from another seed, or from before a code
    update (no recipe file), must be built again, not trained with its stale tokenizer or weights."""
    from train_trl import RECIPE_FILE, _build_base

    out = tmp_path / "base"
    _build_base(out, seed=0, embedded=False)
    first = _weights(out)
    stamp = (out / RECIPE_FILE).read_text()
    (out / "marker").write_text("")
    _build_base(out, seed=0, embedded=False)
    assert (out / "marker").exists()  # reused
    _build_base(out, seed=1, embedded=False)
    assert not (out / "marker").exists() and "another recipe" in caplog.text
    assert any(not torch.equal(first[k], v) for k, v in _weights(out).items())
    (out / RECIPE_FILE).unlink()  # as left by a run of the code before recipes were recorded
    (out / "marker").write_text("")
    _build_base(out, seed=0, embedded=False)
    assert not (out / "marker").exists() and (out / RECIPE_FILE).read_text() == stamp
    assert all(torch.equal(first[k], v) for k, v in _weights(out).items())


def test_config_files_parse():
    import yaml

    for name in ("accelerate_ddp.yaml", "accelerate_zero2.yaml", "accelerate_zero3.yaml", "accelerate_fsdp.yaml"):
        config = yaml.safe_load((ROOT / "configs" / name).read_text())
        assert config["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP")
        ds_file = config.get("deepspeed_config", {}).get("deepspeed_config_file")
        if ds_file:
            assert (ROOT / ds_file).exists()
    for stage in (2, 3):
        ds = json.loads((ROOT / "configs" / f"ds_zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
    fsdp = yaml.safe_load((ROOT / "configs" / "accelerate_fsdp.yaml").read_text())["fsdp_config"]
    assert "OmniVMedVisionLayer" in fsdp["fsdp_transformer_layer_cls_to_wrap"]


def test_embedded_default_end_to_end_is_deterministic(tmp_path, capsys):
    """`python train_trl.py` with no data: tiny model + embedded dataset + three stages + held-out table; the same
    seed gives the same data and the same weights."""
    args = ["--default_size", "small", "--max_steps", "1,2,2", "--seed", "5", "--per_device_train_batch_size", "2",
            "--tower_warmup_steps", "2"]
    first = main([*args, "--output_dir", str(tmp_path / "a"), "--eval_prune_stage", "pre_encoder_reuse"])
    report = capsys.readouterr().out
    assert "Held-out accuracy" in report and "| direction | video |" in report and "chance" in report
    assert "prune_stage pre_encoder_reuse" in report  # scored as asked; the saved model keeps its stages
    saved = json.loads((first / "config.json").read_text())
    # the stage it was trained with is named in the saved config (the tiny preset's None resolved)
    assert (saved["prune_stage"], saved["train_prune_stage"]) == ("pre_encoder_reuse", "pre_encoder_reuse")
    card = (first / "README.md").read_text()
    assert "Embedded default results" in card and "embedded default dataset" in card and str(tmp_path) not in card
    # the default training stage named explicitly: the same weights
    second = main([*args, "--output_dir", str(tmp_path / "b"), "--eval", "no", "--train_prune_stage", "pre_encoder_reuse"])
    import nibabel as nib

    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "data").rglob("*") if p.is_file())
    assert len(files) > 100
    for rel in files:  # every JSONL, PNG, AVI and DICOM byte for byte; NIfTI by content (gzip stores a time)
        a, b = tmp_path / "a" / rel, tmp_path / "b" / rel
        if a.name.endswith(".nii.gz"):
            assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel
    a, b = _weights(first), _weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    processor = json.loads((first / "processor_config.json").read_text())["image_processor"]
    import data_omnivmed

    assert all(processor[k] == v for k, v in data_omnivmed.DEFAULT_PROCESSOR.items())  # saved with the model


# -------------------------------------------------------------------------------------------- training-data errors
def _llava_row(kind, path, **options):
    source = {"path": path, **options} if options else path
    return {kind: source, "conversations": [{"from": "human", "value": f"<{kind}>\nQ?"}, {"from": "gpt", "value": "A."}]}


def test_missing_training_file_is_named(tiny_dir, data_dir, tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match=f"training data not found: {missing}"):
        load_rows([data_dir / "stage1.jsonl", missing], data_root=data_dir)
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        main(["--model", str(tiny_dir), "--stages", "1", "--stage1_data", str(missing), "--output_dir",
              str(tmp_path / "out"), "--num_threads", "1"])  # fmt: skip


def test_byte_order_mark_keeps_the_first_row(data_dir, tmp_path):
    rows = [_llava_row("image", f"img{i}.png") for i in range(2)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8-sig"))
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    loaded = load_rows([path], data_root=data_dir)
    assert [r["source"] for r in loaded] == [f"{path}:1", f"{path}:2"]
    assert json.loads(loaded[0]["messages"])[0]["content"][0]["path"] == "img0.png"


def test_duplicate_rows_are_counted_in_a_warning(data_dir, tmp_path, caplog):
    rows = [_llava_row("image", f"img{i}.png") for i in (0, 1, 0, 2, 0, 1)]
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="train_trl"):
        loaded = load_rows([path], data_root=data_dir)
    assert len(loaded) == 6
    assert "3 duplicate row(s) of 6" in caplog.text and f"{path}:3 repeats {path}:1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="train_trl"):
        load_rows([data_dir / "stage2.jsonl"], data_root=data_dir)
    assert "duplicate" not in caplog.text


def _png_header(path: Path, width: int, height: int):
    """A PNG whose header claims width x height (no pixel data): what a reader sees before decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_oversized_media_are_listed_before_any_model_loads(tiny_dir, data_dir, tmp_path, monkeypatch):
    import nibabel as nib

    from omnivmed.processing_omnivmed import OmniVMedProcessor

    Image.fromarray(np.zeros((2, 50000), np.uint8)).save(data_dir / "strip.png")
    _png_header(data_dir / "huge.png", 8000, 8000)
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.uint8)
    (data_dir / "huge.nii").write_bytes(header.binaryblock + b"\x00" * 4)
    rows = [
        _llava_row("image", "img0.png"),  # 4 visual tokens
        _llava_row("image", "strip.png"),  # 2 x 50000: aspect ratio
        _llava_row("image", "huge.png"),  # 64 M pixels
        _llava_row("volume", "huge.nii"),  # 1024**3 voxels
        _llava_row("volume", "vol/scan.nii.gz"),  # 4 slices x 4 = 16 tokens
        _llava_row("volume", "vol/scan.nii.gz", max_slices=2),  # 8 tokens
        _llava_row("video", "clip.mp4"),  # 4 frames x 4 = 16 tokens
    ]
    path = tmp_path / "sizes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    processor = OmniVMedProcessor.from_pretrained(tiny_dir, max_total_visual_tokens=12)
    for load in (False, True):
        with pytest.raises(BadRowsError) as info:
            load_rows([path], data_root=data_dir, validate_with=processor, load_media=load)
        bad = {int(b.source.rsplit(":", 1)[1]): b.reason for b in info.value.bad}
        assert sorted(bad) == [2, 3, 4, 5, 7], bad
        assert "strip.png" in bad[2] and "aspect ratio must be at most 200" in bad[2]
        assert "huge.png" in bad[3] and "max_image_pixels=50000000" in bad[3]
        assert "huge.nii" in bad[4] and "max_voxels=134217728" in bad[4]
        assert "scan.nii.gz" in bad[5] and "clip.mp4" in bad[7]
        for line, kind, name in ((5, "volume", "vol/scan.nii.gz"), (7, "video", "clip.mp4")):
            # the count is the processor's own: it refuses the same medium with the same number
            with pytest.raises(ValueError, match=r"give 16 visual tokens") as refused:
                processor.image_processor([{"type": kind, "path": name, "data_root": data_dir}])
            assert "16 visual tokens" in bad[line] and "max_total_visual_tokens=12" in str(refused.value)
    # the command line stops on these rows before it loads a model
    monkeypatch.setattr(train_trl.OmniVMedForConditionalGeneration, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the data was checked")))
    with pytest.raises(BadRowsError, match="strip.png"):
        main(["--model", str(tiny_dir), "--stages", "2", "--stage2_data", str(path), "--data_root", str(data_dir),
              "--output_dir", str(tmp_path / "out"), "--num_threads", "1"])  # fmt: skip
