"""What the tools share (train_trl.py, evaluate_omnivmed.py, build_omnivmed.py, convert_omnivmed.py, ...): JSON and
JSONL files, Hub folders and pushing, loading a model and processor, answer normalisation and scoring, media
statistics.

Not remote code: the Hub copies only the `*_omnivmed.py` files the model and processor import (see REMOTE_CODE_FILES);
this module stays in the checkout. It imports the core through the `omnivmed` package (omnivmed.py) and never a tool;
tools import it and the core, never each other (tests/test_layout.py checks it).
"""

import json
import logging
import os
from pathlib import Path


ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("omnivmed_tools")


# ================================================================================================= the embedded default
# Its questions and answers: data_omnivmed.py builds rows from them and scores against them; the tiny tokenizer's
# corpus holds them so the tiny model reads them at about a token a word.
QUESTIONS = {
    "modality": ["What imaging modality is this?", "Which modality was used to acquire this image?"],
    "plane": ["In which plane is this slice?", "What is the imaging plane?"],
    "lesion": ["Is there a lesion?", "Is a focal lesion present?"],
    "side": ["On which side of the patient is the lesion?", "Is the lesion in the patient's left or right side?"],
    "level": ["Is the lesion in the upper, middle or lower slices?", "Which part of the volume holds the lesion?"],
    "direction": ["In which direction does the instrument move?", "Where does the instrument move?"],
}
ANSWERS = {
    "modality": ("CT", "MR", "ultrasound"),
    "plane": ("axial", "coronal", "sagittal"),
    "lesion": ("yes", "no"),
    "side": ("left", "right"),
    "level": ("upper", "middle", "lower"),
    "direction": ("left", "right", "up", "down"),
}
CAPTION_QUESTION = "Describe this image briefly."


# ================================================================================================= files
def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def short(names, limit: int = 20) -> str:
    names = list(names)
    shown = ", ".join(map(str, names[:limit]))
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"


def first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ================================================================================================= Hub folders
def push_folder(folder: Path, repo_id: str, private: bool = False, token: str | None = None, message: str = "") -> str:
    """Create the Hub repo (if needed) and upload the folder in one commit; honours HF_ENDPOINT at call time."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    url = api.create_repo(repo_id, exist_ok=True, private=private)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message or "Upload OmniV-Med")
    logger.info("pushed %s to %s (%s)", folder, url, getattr(info, "commit_url", info))
    return str(url)


# ================================================================================================= media statistics
def image_statistics(folder: Path, default: tuple, default_name: str) -> tuple[list[float], list[float]]:
    """image_mean / image_std of a pretrained part's preprocessor_config.json, else `default` (with a warning)."""
    pre = read_json(folder / "preprocessor_config.json")
    if "image_mean" in pre and "image_std" in pre:
        return [float(v) for v in pre["image_mean"]], [float(v) for v in pre["image_std"]]
    logger.warning("%s has no preprocessor_config.json with image_mean/std: using %s", folder, default_name)
    return default
