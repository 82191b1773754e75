"""chat_omnivmed.py: one-shot and interactive questions about a PNG and a NIfTI volume (streamed answers), clear
errors for bad files, and transformers' image-text-to-text pipeline on a 2D image."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


ROOT = Path(__file__).resolve().parents[1]


def _mni_t1() -> Path:
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from build_omnivmed import build_tiny

    return build_tiny(tmp_path_factory.mktemp("chattiny") / "omnivmed-tiny", seed=0)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "xray.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 72), dtype=np.uint8)).save(path)
    return path


def _run(args, stdin=None, tmp_path=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "chat_omnivmed.py"), *map(str, args)],
        input=stdin, capture_output=True, text=True, cwd=tmp_path or ROOT, timeout=300,
    )  # fmt: skip


def test_one_shot_on_a_png_and_a_nifti_volume(tiny_dir, png, tmp_path):
    result = _run(["--model", tiny_dir, png, _mni_t1(), "Which side is the lesion on?", "--max-new-tokens", "6",
                   "--prune-threshold", "0.1"], tmp_path=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "xray.png (image)" in result.stderr and "mni_icbm152_t1" in result.stderr and "slices)" in result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout) >= 2


def test_prune_stage_flag_runs_pre_encoder_and_rejects_unknown_stages(tiny_dir, tmp_path):
    result = _run(["--model", tiny_dir, _mni_t1(), "Which side is the lesion on?", "--max-new-tokens", "4",
                   "--prune-stage", "pre_encoder"], tmp_path=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout) >= 2
    bad = _run(["--model", tiny_dir, _mni_t1(), "?", "--prune-stage", "pre-encoder"], tmp_path=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'pre-encoder'" in bad.stderr


def test_answers_stream_piece_by_piece(tiny_dir, png):
    import chat_omnivmed

    model, processor = chat_omnivmed.load(str(tiny_dir))
    blocks = chat_omnivmed.media_blocks(processor, [str(png), str(_mni_t1())])
    assert [b["type"] for b in blocks] == ["image", "volume"]

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    out = Recorder()
    messages = [{"role": "user", "content": blocks + [{"type": "text", "text": "Describe the scan."}]}]
    reply = chat_omnivmed.answer(model, processor, messages, max_new_tokens=6, out=out)
    pieces = [w for w in out.writes[:-1] if w]
    assert len(pieces) >= 2, out.writes  # more than one piece reached the terminal before the end
    assert "".join(out.writes).strip() == reply and out.writes[-1] == "\n"


def test_interactive_loop_reads_questions_from_stdin(tiny_dir, png, tmp_path):
    stdin = "What is this?\n\nAnd this?\nquit\nnever\n"
    result = _run(["--model", tiny_dir, png, "--max-new-tokens", "3"], stdin=stdin, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\n") >= 2  # two answers, each closed by a newline; "never" is not asked


def test_bad_files_give_clear_errors(tiny_dir, tmp_path):
    missing = _run(["--model", tiny_dir, tmp_path / "a.png", tmp_path / "b.nii.gz", "q"], tmp_path=tmp_path)
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr and "a.png" in missing.stderr
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti at all")
    bad = _run(["--model", tiny_dir, broken, "q"], tmp_path=tmp_path)
    assert bad.returncode == 2 and "broken.nii.gz" in bad.stderr and "Traceback" not in bad.stderr


def test_image_text_to_text_pipeline_on_a_2d_image(tiny_dir, png):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(tiny_dir), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(png)},
                                             {"type": "text", "text": "What is shown?"}]}]  # fmt: skip
    out = pipe(text=messages, max_new_tokens=4, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)
    image = Image.open(png)
    out = pipe(text=[{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": "Normal?"}]}], max_new_tokens=3)  # fmt: skip
    assert out[0]["generated_text"][-1]["role"] == "assistant"


def test_reply_fits_the_model_length_and_an_over_long_conversation_is_a_clear_error(tiny_dir):
    import chat_omnivmed

    model, processor = chat_omnivmed.load(str(tiny_dir))
    messages = [{"role": "user", "content": "Describe the scan."}]
    n_prompt = len(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    model.config.text_config.max_position_embeddings = n_prompt + 3

    class Sink:
        def write(self, text):
            pass

        def flush(self):
            pass

    generated = []
    original = model.generate
    model.generate = lambda **kw: generated.append(kw["max_new_tokens"]) or original(**kw)
    chat_omnivmed.answer(model, processor, messages, max_new_tokens=20, out=Sink())
    assert generated == [3]  # the model's own check would refuse a 4th new token (see test_modeling_omnivmed)
    model.config.text_config.max_position_embeddings = n_prompt
    with pytest.raises(ValueError, match=f"{n_prompt} tokens long .* at most {n_prompt}, leaving no room for a reply"):
        chat_omnivmed.answer(model, processor, messages, max_new_tokens=5, out=Sink())
