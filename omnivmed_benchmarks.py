"""Readers of the public medical VQA benchmarks (VQA-RAD, SLAKE, PathVQA, M3D-VQA, Cholec80-VQA, EndoVis18-VQA,
PSI-AVA-VQA) and of OmniV-Med-mini, each in its published layout, as `Sample`s with their media blocks.

Shared by the tools: evaluate_omnivmed.py scores the test splits; build_instruct_omnivmed.py builds training rows
from the train splits and keeps the test splits out of them. A folder that does not hold what a reader expects is a
`DataError` naming the files it looked for.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np

from omnivmed_tools import first_existing, normalize_answer


CHOICE_LETTERS = ("A", "B", "C", "D")


class DataError(ValueError):
    """The data folder does not hold what the benchmark's loader expects; the message names the expected files."""


@dataclasses.dataclass
class Sample:
    id: str
    media: list[dict]  # content blocks: {"type": kind, "path"|"image"|"volume"|...: source}; see `materialise`
    question: str  # the prompt text after the media
    answer: str  # the reference answer
    meta: dict = dataclasses.field(default_factory=dict)  # answer_type, question_type, choices, task, modality, ...

# ================================================================================================= loading helpers
def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not readable JSON ({error})") from error
    if isinstance(data, dict):  # some copies wrap the list
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of question records")
    return data


def _require_keys(path: Path, record: dict, keys: tuple, index: int):
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{path}: record {index} lacks {missing}; expected keys {list(keys)}, got {sorted(record)}")


def _check_files(samples: list[Sample], what: str):
    missing = [
        (s.id, block["path"])
        for s in samples
        for block in s.media
        if "path" in block and not Path(block["path"]).exists()
    ]
    if missing:
        shown = ", ".join(f"{sid}: {path}" for sid, path in missing[:5])
        raise DataError(f"{len(missing)} {what} file(s) missing, e.g. {shown}")


def _record_error(errors: list | None, error: DataError) -> None:
    """Evaluation stops at the first bad record (a score over part of a split would mislead); the instruction builder
    (build_instruct_omnivmed.py) reads the same files through these loaders and passes a list instead, so one bad
    record is reported and skipped."""
    if errors is None:
        raise error
    errors.append(str(error))


def _parquet_rows(files: list[Path]) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    return rows


def _parquet_files(data: Path, split: str) -> list[Path]:
    return sorted(data.glob(f"data/{split}-*.parquet")) + sorted(data.glob(f"{split}-*.parquet"))


def _image_block_from_parquet(value, where: str) -> dict:
    """HF `datasets` Image feature stored in parquet: {"bytes": ..., "path": ...}."""
    if isinstance(value, dict) and value.get("bytes"):
        return {"type": "image", "bytes": value["bytes"]}
    raise DataError(f"{where}: the 'image' column holds no image bytes (expected the HF Image feature)")


def _answer_type_from_answer(answer: str) -> str:
    return "CLOSED" if normalize_answer(answer) in ("yes", "no") else "OPEN"


def _strip_media_tags(text: str) -> str:
    return re.sub(r"<(image|video|volume)>\s*", "", str(text)).strip()


def _llava_conversation_samples(path: Path, image_root: Path, name: str, errors: list | None = None) -> list[Sample]:
    """LLaVA-Med's evaluation JSON: [{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
    {"from": "gpt", "value": "A"}], "answer_type": "CLOSED" | "OPEN"}, ...]."""
    samples = []
    for i, rec in enumerate(_read_json_list(path)):
        try:
            _require_keys(path, rec, ("image", "conversations"), i)
            turns = rec["conversations"]
            question = next((t["value"] for t in turns if t.get("from") == "human"), None)
            answer = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
            if question is None or answer is None:
                raise DataError(f"{path}: record {i} needs a human and a gpt turn in 'conversations'")
        except DataError as error:
            _record_error(errors, error)
            continue
        samples.append(Sample(
            id=str(rec.get("id", rec.get("question_id", i))),
            media=[{"type": "image", "path": str(image_root / rec["image"])}],
            question=_strip_media_tags(question),
            answer=str(answer),
            meta={"answer_type": str(rec.get("answer_type") or _answer_type_from_answer(answer)).upper()},
        ))  # fmt: skip
    return samples


def _is_llava_json(path: Path) -> bool:
    try:
        data = _read_json_list(path)
    except DataError:
        return False
    return bool(data) and isinstance(data[0], dict) and "conversations" in data[0]


# ================================================================================================= the loaders
def load_vqa_rad(data: Path, split: str, errors: list | None = None, **_) -> list[Sample]:
    """VQA-RAD, any of:
    1. the OSF release: `VQA_RAD Dataset Public.json` (records with image_name, question, answer, answer_type
       CLOSED / OPEN, phrase_type; test = phrase_type test_freeform / test_para) + images in `VQA_RAD Image Folder/`
       (or `images/`);
    2. LLaVA-Med's evaluation JSON `{split}.json` (conversations + answer_type) + `images/`;
    3. the HF parquet copy (flaviagiammarino/vqa-rad): `data/{split}-*.parquet` with image bytes, question, answer;
       it has no answer_type, so yes/no answers are CLOSED and the rest OPEN (the usual convention)."""
    osf = first_existing(data / "VQA_RAD Dataset Public.json", data / "VQA_RAD_Dataset_Public.json")
    llava = data / f"{split}.json"
    parquet = _parquet_files(data, split)
    if osf is not None:
        images = first_existing(data / "VQA_RAD Image Folder", data / "VQA_RAD_Image_Folder", data / "images") or data
        samples = []
        for i, rec in enumerate(_read_json_list(osf)):
            try:
                _require_keys(osf, rec, ("image_name", "question", "answer", "answer_type"), i)
            except DataError as error:
                _record_error(errors, error)
                continue
            is_test = str(rec.get("phrase_type", "")).startswith("test")
            if (split == "test") != is_test:
                continue
            samples.append(Sample(
                id=str(rec.get("qid", i)),
                media=[{"type": "image", "path": str(images / rec["image_name"])}],
                question=str(rec["question"]),
                answer=str(rec["answer"]),
                meta={"answer_type": str(rec["answer_type"]).strip().upper(),
                      "question_type": rec.get("question_type")},
            ))  # fmt: skip
        return samples
    if llava.is_file() and _is_llava_json(llava):
        return _llava_conversation_samples(llava, data / "images" if (data / "images").is_dir() else data, "vqa-rad",
                                           errors)  # fmt: skip
    if parquet:
        return _hf_parquet_samples(parquet, errors)
    raise DataError(
        f"{data}: no VQA-RAD data found. Expected one of: 'VQA_RAD Dataset Public.json' with 'VQA_RAD Image Folder/' "
        f"(OSF release); {split}.json in LLaVA-Med's conversation format with images/; data/{split}-*.parquet "
        "(HF flaviagiammarino/vqa-rad)"
    )


def _hf_parquet_samples(files: list[Path], errors: list | None = None) -> list[Sample]:
    samples = []
    for i, row in enumerate(_parquet_rows(files)):
        for key in ("image", "question", "answer"):
            if key not in row:
                raise DataError(f"{files[0]}: column {key!r} missing; expected image, question, answer")
        try:
            block = _image_block_from_parquet(row["image"], f"{files[0]} row {i}")
        except DataError as error:
            _record_error(errors, error)
            continue
        samples.append(Sample(
            id=str(i),
            media=[block],
            question=str(row["question"]),
            answer=str(row["answer"]),
            meta={"answer_type": _answer_type_from_answer(row["answer"])},
        ))  # fmt: skip
    return samples


def load_slake(data: Path, split: str, all_languages: bool = False, errors: list | None = None, **_) -> list[Sample]:
    """SLAKE 1.0: `{split}.json` (records with img_name, question, answer, answer_type CLOSED / OPEN, q_lang
    en / zh, content_type, modality) + images in `imgs/<img_name>`. English questions only unless all_languages.
    LLaVA-Med's conversation JSON (`{split}.json` with conversations) + `imgs/` or `images/` also works."""
    path = data / f"{split}.json"
    if not path.is_file():
        raise DataError(f"{data}: expected SLAKE's {split}.json (with img_name, question, answer, answer_type, q_lang) "
                        "and the imgs/ folder")  # fmt: skip
    images = first_existing(data / "imgs", data / "images") or data
    if _is_llava_json(path):
        return _llava_conversation_samples(path, images, "slake", errors)
    samples = []
    for i, rec in enumerate(_read_json_list(path)):
        try:
            _require_keys(path, rec, ("img_name", "question", "answer", "answer_type"), i)
        except DataError as error:
            _record_error(errors, error)
            continue
        if not all_languages and rec.get("q_lang", "en") != "en":
            continue
        samples.append(Sample(
            id=str(rec.get("qid", i)),
            media=[{"type": "image", "path": str(images / rec["img_name"])}],
            question=str(rec["question"]),
            answer=str(rec["answer"]),
            meta={"answer_type": str(rec["answer_type"]).strip().upper(), "q_lang": rec.get("q_lang"),
                  "modality": rec.get("modality"), "content_type": rec.get("content_type")},
        ))  # fmt: skip
    return samples


def load_pathvqa(data: Path, split: str, errors: list | None = None, **_) -> list[Sample]:
    """PathVQA without pickle: the HF parquet copy (flaviagiammarino/path-vqa: `data/{split}-*.parquet` with image
    bytes, question, answer), `{split}.json` (LLaVA-Med's conversation format, or records with image, question,
    answer), or `{split}.csv` (columns image, question, answer); images in `images/{split}/`, `images/` or the data
    folder (file names with or without `.jpg`). yes/no answers are CLOSED, the rest OPEN. The original release's
    `qas/{split}/{split}_qa.pkl` is a pickle and is refused (loading a pickle runs arbitrary code)."""
    parquet = _parquet_files(data, split)
    if parquet:
        return _hf_parquet_samples(parquet, errors)
    images = first_existing(data / "images" / split, data / "images") or data

    def image_path(name: str) -> str:
        path = images / name
        return str(path if path.suffix or path.exists() else path.with_suffix(".jpg"))

    json_path, csv_path = data / f"{split}.json", data / f"{split}.csv"
    if json_path.is_file():
        if _is_llava_json(json_path):
            return _llava_conversation_samples(json_path, images, "pathvqa", errors)
        records = _read_json_list(json_path)
        where = json_path
    elif csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
        where = csv_path
    else:
        pickled = list(data.glob("qas/**/*.pkl")) + list(data.glob("*.pkl"))
        hint = (f" ({pickled[0]} is a pickle: pickle loads are refused since they can run arbitrary code; use the HF "
                "parquet copy or convert it to JSON / CSV yourself)") if pickled else ""  # fmt: skip
        raise DataError(
            f"{data}: no PathVQA data found{hint}. Expected data/{split}-*.parquet (HF flaviagiammarino/path-vqa), "
            f"{split}.json or {split}.csv (image, question, answer) with images/{split}/"
        )
    samples = []
    for i, rec in enumerate(records):
        try:
            _require_keys(where, rec, ("image", "question", "answer"), i)
        except DataError as error:
            _record_error(errors, error)
            continue
        samples.append(Sample(
            id=str(rec.get("id", i)),
            media=[{"type": "image", "path": image_path(str(rec["image"]))}],
            question=str(rec["question"]),
            answer=str(rec["answer"]),
            meta={"answer_type": str(rec.get("answer_type") or _answer_type_from_answer(rec["answer"])).upper()},
        ))  # fmt: skip
    return samples


M3D_COLUMNS = ("Image Path", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "Answer Choice",
               "Question Type")  # fmt: skip
M3D_QUESTION_TYPES = {"1": "plane", "2": "phase", "3": "organ", "4": "abnormality", "5": "location"}


def load_m3d_vqa(data: Path, split: str, m3d_mode: str = "both", errors: list | None = None, **_) -> list[Sample]:
    """M3D-VQA: `M3D_VQA_{split}.csv` (in the data folder or its M3D-VQA/ subfolder; columns Image Path, Question,
    Choice A-D, Answer, Answer Choice, Question Type) with the volumes at `<data>/<Image Path>`: M3D's preprocessed
    `.npy` arrays ((1, D, H, W) in [0, 1], read with numpy, allow_pickle=False) or NIfTI / DICOM. Every row is asked
    twice, as M3D evaluates it: closed (the question + "Choices: A. .. B. .. C. .. D. ..") and open (the question)."""
    path = first_existing(data / f"M3D_VQA_{split}.csv", data / "M3D-VQA" / f"M3D_VQA_{split}.csv",
                           data / f"{split}.csv")  # fmt: skip
    if path is None:
        raise DataError(f"{data}: expected M3D_VQA_{split}.csv (columns {list(M3D_COLUMNS)}) and the volumes under "
                        "the paths in its 'Image Path' column")  # fmt: skip
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in M3D_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: columns {missing} missing; expected {list(M3D_COLUMNS)}")
        rows = list(reader)
    samples = []
    for i, row in enumerate(rows):
        volume = data / row["Image Path"]
        block = {"type": "volume", "npy" if volume.suffix == ".npy" else "path": str(volume)}
        qtype = M3D_QUESTION_TYPES.get(str(row["Question Type"]).strip(), str(row["Question Type"]).strip())
        choices = {letter: row[f"Choice {letter}"] for letter in CHOICE_LETTERS}
        if m3d_mode in ("both", "closed"):
            text = "Choices: " + " ".join(f"{k}. {v}" for k, v in choices.items())
            samples.append(Sample(
                id=f"{i}-closed", media=[block], question=f"{row['Question']} {text}",
                answer=f"{row['Answer Choice']}. {row['Answer']}",
                meta={"answer_type": "CLOSED", "choices": choices, "answer_choice": row["Answer Choice"].strip(),
                      "question_type": qtype},
            ))  # fmt: skip
        if m3d_mode in ("both", "open"):
            samples.append(Sample(id=f"{i}-open", media=[block], question=row["Question"], answer=row["Answer"],
                                  meta={"answer_type": "OPEN", "question_type": qtype}))  # fmt: skip
    for s in samples if errors is None else []:  # the builder checks every medium per row itself
        if "npy" in s.media[0] and not Path(s.media[0]["npy"]).exists():
            raise DataError(f"{path}: volume {s.media[0]['npy']} (row {s.id.split('-')[0]}) is missing")
    return samples


# published splits (the sequences the surgical VQA papers test on)
CHOLEC80_TEST = ("5", "11", "12", "17", "19", "26", "27", "31")
ENDOVIS18_TEST = ("1", "5", "16")


def _qa_lines(path: Path, errors: list | None = None) -> list[tuple[str, str]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 2:
            _record_error(errors, DataError(f"{path}:{n}: expected 'question|answer', got {line!r}"))
            continue
        out.append((parts[0].strip(), parts[1].strip()))
    return out


def _frame_number(name: str) -> int | None:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else None


def _surgical_samples(entries, frame_stride: int | None, errors: list | None = None) -> tuple[list[Sample], list[str]]:
    """entries: (seq, qa_file, image_path, in_split). Returns the split's samples and the answer set (all files)."""
    samples, answers = [], set()
    for seq, qa_file, image, in_split in entries:
        qas = _qa_lines(qa_file, errors)
        answers.update(a for _, a in qas)
        if not in_split:
            continue
        if frame_stride and (_frame_number(image.stem) or 0) % frame_stride:
            continue
        for k, (question, answer) in enumerate(qas):
            samples.append(Sample(
                id=f"{seq}/{image.stem}/{k}", media=[{"type": "image", "path": str(image)}], question=question,
                answer=answer, meta={"sequence": seq},
            ))  # fmt: skip
    return samples, sorted(answers)


def _sequences(split: str, test: tuple, found: list[str], override: str | None) -> set[str]:
    if override:
        return {s.strip() for s in override.split(",")}
    return set(test) if split == "test" else set(found) - set(test)


def load_endovis18_vqa(data: Path, split: str, sequences: str | None = None, frame_stride: int | None = None,
                       errors: list | None = None, **_):  # fmt: skip
    """EndoVis18-VQA (Surgical-VQA / SurgicalGPT layout): `seq_<N>/vqa/Classification/<frame>_QA.txt` (lines
    `question|answer`) with frames `seq_<N>/left_frames/<frame>.png`; test = sequences 1, 5, 16, train = the rest."""
    seq_dirs = sorted(p for p in data.glob("seq_*") if p.is_dir())
    if not seq_dirs:
        raise DataError(f"{data}: expected EndoVis18-VQA's seq_<N>/vqa/Classification/*_QA.txt and "
                        "seq_<N>/left_frames/*.png")  # fmt: skip
    found = [p.name.removeprefix("seq_") for p in seq_dirs]
    wanted = _sequences(split, ENDOVIS18_TEST, found, sequences)
    entries = []
    for seq_dir, seq in zip(seq_dirs, found):
        for qa in sorted((seq_dir / "vqa" / "Classification").glob("*.txt")):
            frame = qa.stem.split("_")[0]
            entries.append((seq, qa, seq_dir / "left_frames" / f"{frame}.png", seq in wanted))
    if not entries:
        raise DataError(f"{data}: no seq_<N>/vqa/Classification/*_QA.txt files")
    return _surgical_samples(entries, frame_stride, errors)


def load_cholec80_vqa(data: Path, split: str, sequences: str | None = None, frame_stride: int | None = None,
                      errors: list | None = None, **_):  # fmt: skip
    """Cholec80-VQA (Surgical-VQA / SurgicalGPT layout): `Classification/<seq>/<frame>_QA.txt` (lines
    `question|answer`) with frames `cropped_image/<seq>/<frame>.png`; test = sequences 5, 11, 12, 17, 19, 26, 27, 31,
    train = the rest. (SurgicalGPT keeps only frames whose number is a multiple of 100: --frame-stride 100.)"""
    root = data / "Classification"
    seq_dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name) if root.is_dir() else []
    if not seq_dirs:
        raise DataError(f"{data}: expected Cholec80-VQA's Classification/<seq>/*_QA.txt and "
                        "cropped_image/<seq>/<frame>.png")  # fmt: skip
    found = [p.name for p in seq_dirs]
    wanted = _sequences(split, CHOLEC80_TEST, found, sequences)
    entries = []
    for seq_dir in seq_dirs:
        for qa in sorted(seq_dir.glob("*.txt")):
            frame = qa.stem.split("_")[0]
            entries.append((seq_dir.name, qa, data / "cropped_image" / seq_dir.name / f"{frame}.png",
                            seq_dir.name in wanted))  # fmt: skip
    return _surgical_samples(entries, frame_stride, errors)


def load_psi_ava_vqa(data: Path, split: str, errors: list | None = None, **_):
    """PSI-AVA-VQA (SurgicalGPT layout): `Train/` and `Val/` with C1_location.txt, C2_action.txt, C3_phase.txt,
    C4_step.txt (lines `image|question|answer`, image relative to `keyframes/`); `--split test` reads Val (the
    published evaluation split), `--split train` reads Train."""
    folder = {"test": "Val", "val": "Val", "train": "Train"}.get(split, split)
    files = {f: sorted((data / f).glob("C*.txt")) for f in ("Train", "Val") if (data / f).is_dir()}
    if not files.get(folder):
        raise DataError(f"{data}: expected PSI-AVA-VQA's {folder}/C1_location.txt, C2_action.txt, C3_phase.txt, "
                        "C4_step.txt (lines image|question|answer) and keyframes/")  # fmt: skip
    samples, answers = [], set()
    for part, paths in files.items():
        for path in paths:
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split("|")
                if len(fields) != 3:
                    _record_error(errors, DataError(f"{path}:{n}: expected 'image|question|answer', got {line!r}"))
                    continue
                image, question, answer = (f.strip() for f in fields)
                answers.add(answer)
                if part == folder:
                    samples.append(Sample(
                        id=f"{path.stem}:{n}", media=[{"type": "image", "path": str(data / "keyframes" / image)}],
                        question=question, answer=answer, meta={"category": path.stem},
                    ))  # fmt: skip
    return samples, sorted(answers)


MEDIA_KEYS = ("image", "video", "volume")


def load_omnivmed_mini(data: Path, split: str, **_) -> list[Sample]:
    """Any JSONL of held-out questions in the training formats of train_trl.py: LLaVA / VideoLLaMA3 rows
    {"image" | "video" | "volume": path, "conversations": [{"from": "human", ...}, {"from": "gpt", ...}], "task": ...,
    "modality" | "kind": ...} or TRL rows {"messages": [...], "task": ...}. `--data` is the JSONL file or a folder
    holding eval.jsonl / {split}.jsonl; media paths are relative to the JSONL's folder and may not leave it. The
    reference is the row's "answer", else the first gpt / assistant turn; modality is the row's "modality", else
    "kind", else the media key."""
    if data.is_file():
        path = data
    else:
        path = first_existing(data / f"{split}.jsonl", data / "eval.jsonl", data / "test.jsonl")
        if path is None:
            raise DataError(f"{data}: expected a JSONL file ({split}.jsonl or eval.jsonl) of held-out questions")
    root = path.parent.resolve()

    def resolve(source, n):
        full = (root / str(source)).resolve()
        if not full.is_relative_to(root):
            raise DataError(f"{path}:{n}: media path {source!r} leaves the data folder {root}")
        return str(full)

    samples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise DataError(f"{path}:{n}: not JSON ({error})") from error
        if "task" not in row:
            raise DataError(f"{path}:{n}: a held-out row needs a 'task' tag")
        if "conversations" in row:
            kinds = [k for k in MEDIA_KEYS if k in row]
            if len(kinds) != 1 or isinstance(row[kinds[0]], list):
                raise DataError(f"{path}:{n}: expected exactly one media key of {MEDIA_KEYS} holding one path")
            media = [{"type": kinds[0], "path": resolve(row[kinds[0]], n)}]
            turns = row["conversations"]
            question = next((t["value"] for t in turns if t.get("from") == "human"), "")
            reference = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        elif "messages" in row:
            user = next((m for m in row["messages"] if m.get("role") == "user"), {"content": []})
            content = user["content"]
            if not isinstance(content, list):
                content = [{"type": "text", "text": content}]
            media = []
            for block in content:
                if block.get("type") in MEDIA_KEYS:
                    block = dict(block)  # load options (window, slice_axis, ...) travel with it
                    keys = [k for k in (block["type"], "path") if k in block]
                    if len(keys) != 1:
                        raise DataError(f"{path}:{n}: a {block['type']} block needs one of '{block['type']}' or 'path'")
                    block["path"] = resolve(block.pop(keys[0]), n)
                    media.append(block)
            question = " ".join(b.get("text", "") for b in content if b.get("type") == "text")
            assistant = next((m for m in row["messages"] if m.get("role") == "assistant"), None)
            reference = None
            if assistant is not None:
                c = assistant["content"]
                texts = [c] if isinstance(c, str) else [b.get("text", "") for b in c if b.get("type") == "text"]
                reference = " ".join(texts)
        else:
            raise DataError(f"{path}:{n}: expected 'conversations' (LLaVA style) or 'messages' (TRL style)")
        reference = row.get("answer", reference)
        if reference is None:
            raise DataError(f"{path}:{n}: no reference answer ('answer' or an assistant / gpt turn)")
        modality = row.get("modality") or row.get("kind") or (media[0]["type"] if media else "text")
        samples.append(Sample(id=str(row.get("id", n)), media=media, question=_strip_media_tags(question),
                              answer=str(reference), meta={"task": row["task"], "modality": modality}))  # fmt: skip
    return samples


LOADERS = {
    "vqa-rad": load_vqa_rad,
    "slake": load_slake,
    "pathvqa": load_pathvqa,
    "m3d-vqa": load_m3d_vqa,
    "cholec80-vqa": load_cholec80_vqa,
    "endovis18-vqa": load_endovis18_vqa,
    "psi-ava-vqa": load_psi_ava_vqa,
    "omnivmed-mini": load_omnivmed_mini,
}
SURGICAL = ("cholec80-vqa", "endovis18-vqa", "psi-ava-vqa")


def load_benchmark(name: str, data: str | Path, split: str = "test", **options) -> tuple[list[Sample], list | None]:
    """(samples, answer set for the surgical classification sets else None); raises DataError naming what it
    expected when the folder does not hold the benchmark's files."""
    if name not in LOADERS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {list(LOADERS)}")
    data = Path(data)
    if not data.exists():
        raise DataError(f"--data {data} does not exist")
    loaded = LOADERS[name](data, split, **options)
    samples, classes = loaded if isinstance(loaded, tuple) else (loaded, None)
    if not samples:
        raise DataError(f"{data}: the {name} loader found no questions for split {split!r}")
    _check_files(samples, f"{name} media")
    return samples, classes

def materialise(block: dict) -> dict:
    """A sample's media block as the processor takes it: parquet image bytes -> PIL image, M3D .npy -> a (D, H, W)
    array (numpy.load with allow_pickle=False)."""
    if "bytes" in block:
        from PIL import Image

        return {"type": "image", "image": Image.open(io.BytesIO(block["bytes"]))}
    if "npy" in block:
        array = np.load(block["npy"], allow_pickle=False)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3:
            raise DataError(f"{block['npy']}: expected a (1, D, H, W) or (D, H, W) volume, got shape {array.shape}")
        return {"type": "volume", "volume": array}
    return dict(block)
