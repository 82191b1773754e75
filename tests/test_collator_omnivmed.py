"""collator_omnivmed.py: fine-tuning a saved Hub folder with plain TRL, with no checkout of this repo: SFTTrainer with
its default settings (on CPU: use_cpu) and `processor.data_collator()` trains on image + volume + video rows; rows
written TRL's way (an "images" column) are read too."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnivmed_tools import build_tiny, write_instrument_video


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("collator") / "omnivmed-tiny", seed=0)


SFT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, nibabel, torch
    from PIL import Image
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    folder, work, video = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    try:
        import omnivmed  # the checkout's package shim must not be reachable
        sys.exit("the repo is on sys.path")
    except ImportError:
        pass
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    png = work / "xray.png"
    Image.fromarray((np.arange(96 * 96) % 256).astype("uint8").reshape(96, 96)).save(png)
    nifti = str(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii")

    def row(kind, path, question, answer):
        return {"messages": [
            {"role": "user", "content": [{"type": kind, "path": path}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}], "images": []}

    rows = [row("image", str(png), "What modality is this?", "X-ray"),
            row("volume", nifti, "Which plane?", "axial"),
            row("video", video, "Where does the instrument move?", "right")]
    batch = processor.data_collator()(rows)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(work / "out"), max_steps=3, per_device_train_batch_size=3, learning_rate=1e-3,
                     logging_steps=1, report_to="none", save_strategy="no", use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         data_collator=processor.data_collator(), processing_class=processor)
    trainer.train()
    print(json.dumps({
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "changed": sorted({n.split(".")[1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}),
        "grid_t": batch["grid_thw"][:, 0].tolist(),
        "labelled": [int((lab != -100).sum()) for lab in batch["labels"]],
        "module": type(processor).__module__,
    }))
    """
)


def test_sft_trainer_from_a_saved_folder_trains_on_image_volume_and_video(tiny_dir, tmp_path):
    video = write_instrument_video(tmp_path / "clip.mp4", seconds=2, fps=4, size=64)
    (tmp_path / "work").mkdir()
    script = tmp_path / "sft.py"
    script.write_text(SFT_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(tiny_dir), str(tmp_path / "work"), str(video)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repo, and -I: no PYTHONPATH, no script folder; the code comes from the Hub folder
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")  # the folder's copy, not this repo's
    assert report["grid_t"][0] == 1 and report["grid_t"][1] > 1 and report["grid_t"][2] > 1  # image, volume, video
    # labels only on the replies: "X-ray" / "axial" / "right" and their <|im_end|> are a few tokens, not the prompt
    assert all(0 < n <= 8 for n in report["labelled"]), report["labelled"]
    assert len(report["losses"]) == 3 and report["losses"][-1] < report["losses"][0]
    assert report["changed"] == ["language_model", "projector", "vision_tower"]


def test_rows_written_trls_way_take_their_images_from_the_images_column(tiny_dir):
    from omnivmed.processing_omnivmed import OmniVMedProcessor

    processor = OmniVMedProcessor.from_pretrained(tiny_dir)
    images = [Image.fromarray(np.full((56, 56, 3), v, dtype=np.uint8)) for v in (10, 200)]
    row = {
        "messages": [
            {"role": "user", "content": [
                {"type": "image", "text": None}, {"type": "image", "text": None},
                {"type": "text", "text": "Which is brighter?"},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "the second"}]},
        ],
        "images": images,
    }  # fmt: skip
    conversation = processor.data_collator().conversation(row)
    assert [b.get("image") for b in conversation[0]["content"][:2]] == images
    batch = processor.data_collator()([row])
    reference = processor.image_processor(images, return_tensors="pt")
    assert batch["pixel_values"].equal(reference["pixel_values"])
    assert batch["grid_thw"].tolist() == reference["grid_thw"].tolist()
