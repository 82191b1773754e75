"""Evaluate an OmniV-Med checkpoint on the paper's benchmarks, from their published local layouts.

    python evaluate_omnivmed.py --model DIR_OR_HUB_ID --benchmark NAME --data DIR [--split test] [--limit N]
        [--batch-size B] [--max-new-tokens 64] [--out results.json]

Benchmarks (`--data` is the dataset's folder as published; nothing is downloaded):
    vqa-rad        2D   closed accuracy + open recall
    slake          2D   closed accuracy + open recall (English questions; --all-languages for Chinese too)
    pathvqa        2D   closed accuracy + open recall
    m3d-vqa        3D   closed (4-way multiple choice): accuracy; open: BLEU-1, ROUGE-1/L, METEOR (no BERTScore)
    cholec80-vqa   surgical frames   accuracy, macro precision / recall / F1 over the fixed answer set
    endovis18-vqa  surgical frames   the same
    psi-ava-vqa    surgical frames   the same
    omnivmed-mini  any  the embedded default's held-out JSONL (train_trl.py / data_omnivmed.py): exact match after
                        normalisation, accuracy per task x modality
The files each loader expects, and the metric definitions, are in README.md ("Evaluation") and in the loaders below.

Generation is greedy, batched with left padding; the prompt is the dataset's question (M3D closed questions add their
four choices as M3D does). Results: a JSON file (metrics, definitions, every prediction) and a markdown table.
Several processes (`torchrun --nproc_per_node N evaluate_omnivmed.py ...` or `accelerate launch`) each answer one
contiguous block of the questions; the answers are gathered and scored once, with the same metrics as one process.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import io
import json
import logging
import math
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np


logger = logging.getLogger("evaluate_omnivmed")

BENCHMARKS = ("vqa-rad", "slake", "pathvqa", "m3d-vqa", "cholec80-vqa", "endovis18-vqa", "psi-ava-vqa", "omnivmed-mini")


class DataError(ValueError):
    """The data folder does not hold what the benchmark's loader expects; the message names the expected files."""


@dataclasses.dataclass
class Sample:
    id: str
    media: list[dict]  # content blocks: {"type": kind, "path"|"image"|"volume"|...: source}; see `materialise`
    question: str  # the prompt text after the media
    answer: str  # the reference answer
    meta: dict = dataclasses.field(default_factory=dict)  # answer_type, question_type, choices, task, modality, ...


# ================================================================================================= normalisation
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_PUNCT = re.compile(r"[^\w\s]|_")


def normalize_answer(text: str) -> str:
    """Lower case, NFKC, punctuation and underscores -> spaces, articles (a, an, the) dropped, number words zero..ten
    -> digits, whitespace collapsed. "The LEFT lung." -> "left lung"; "Calot_Triangle dissection" -> "calot triangle
    dissection"; "two" -> "2"."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    words = _PUNCT.sub(" ", text).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def yes_no(text: str) -> str | None:
    """"yes" / "no" when the normalised answer starts with that word ("No, there is no effusion." -> "no"), else
    None ("There is no effusion." and "normal" are not answers to a yes/no question)."""
    words = tokens(text)
    return words[0] if words and words[0] in ("yes", "no") else None


def closed_correct(prediction: str, answer: str) -> bool:
    """Clean closed-ended rule: a yes/no reference is matched by `yes_no`; any other closed reference (e.g. "left",
    "axial", "ct") by exact match after `normalize_answer`."""
    reference = normalize_answer(answer)
    if reference in ("yes", "no"):
        return yes_no(prediction) == reference
    return normalize_answer(prediction) == reference


def token_overlap(prediction: str, answer: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of the normalised word multisets, counts clipped (a word repeated in the prediction
    counts at most as often as in the reference). Empty prediction or reference -> zeros."""
    pred, ref = collections.Counter(tokens(prediction)), collections.Counter(tokens(answer))
    overlap = sum((pred & ref).values())
    if not pred or not ref or not overlap:
        return 0.0, 0.0, 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return precision, recall, 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------- LLaVA-Med-compatible (labelled so)
def _llava_med_words(text: str) -> list[str]:
    text = _PUNCT.sub(" ", str(text).lower())
    return [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]


def llava_med_closed_hit(prediction: str, answer: str) -> int | None:
    """LLaVA-Med's closed-ended rule, reproduced for comparison: a question counts only if the normalised prediction
    CONTAINS the substring "yes" or "no" (so "normal", "nodule", "know" count, and an answer with neither is dropped
    from the denominator: None); it is a hit if the reference is a SUBSTRING of the prediction."""
    pred, ref = " ".join(_llava_med_words(prediction)), " ".join(_llava_med_words(answer))
    if "yes" not in pred and "no" not in pred:
        return None
    return int(ref in pred)


def llava_med_recall(prediction: str, answer: str) -> float:
    """LLaVA-Med's open-ended "recall", reproduced for comparison: true positives are counted with the PREDICTION's
    multiplicity, so repeating a reference word raises it (reference "left lung", prediction "left left left" ->
    3 / (3 + 1) = 0.75, where the clean recall is 0.5)."""
    pred, ref = collections.Counter(_llava_med_words(prediction)), collections.Counter(_llava_med_words(answer))
    if not pred or not ref:
        return 0.0
    tp = sum(count for word, count in pred.items() if word in ref)
    fn = sum(count for word, count in ref.items() if word not in pred)
    return tp / (tp + fn) if tp else 0.0


# ================================================================================================= metrics
def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def vqa_2d_metrics(samples: list[Sample], predictions: list[str]) -> dict:
    """Closed-ended accuracy (denominator: every closed question) and open-ended recall (mean clean token recall),
    plus open token F1 / exact match, and the LLaVA-Med-compatible figures under their own key."""
    closed = [(s, p) for s, p in zip(samples, predictions) if s.meta.get("answer_type") == "CLOSED"]
    opened = [(s, p) for s, p in zip(samples, predictions) if s.meta.get("answer_type") != "CLOSED"]
    overlaps = [token_overlap(p, s.answer) for s, p in opened]
    llava_hits = [llava_med_closed_hit(p, s.answer) for s, p in closed]
    counted = [h for h in llava_hits if h is not None]
    return {
        "closed_accuracy": _mean(closed_correct(p, s.answer) for s, p in closed),
        "open_recall": _mean(r for _, r, _ in overlaps),
        "open_token_f1": _mean(f for _, _, f in overlaps),
        "open_exact_match": _mean(normalize_answer(p) == normalize_answer(s.answer) for s, p in opened),
        "n_closed": len(closed),
        "n_open": len(opened),
        "llava_med_compatible": {
            "closed_accuracy": _mean(counted),
            "closed_counted": len(counted),
            "open_recall": _mean(llava_med_recall(p, s.answer) for s, p in opened),
        },
    }


CHOICE_LETTERS = ("A", "B", "C", "D")
# "B", "B.", "(B) ...", "B) ...", "Answer: B", "The answer is B." (a bare "A lesion ..." is an article, not a choice)
_CHOICE_AT_START = re.compile(
    r"^\s*(?i:(?:the\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*)?\(?([A-D])(?:[\.\):,]|\s*$)"
)


def parse_choice(prediction: str, choices: dict[str, str]) -> str | None:
    """The letter a multiple-choice answer picked: a leading letter ("B", "B.", "(B) ...", "Answer: B") or, failing
    that, a prediction equal (after normalisation) to exactly one choice's text; else None (counted wrong)."""
    match = _CHOICE_AT_START.match(prediction)
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    norm = normalize_answer(prediction)
    hits = [letter for letter, text in choices.items() if norm and normalize_answer(text) == norm]
    return hits[0] if len(hits) == 1 else None


def text_generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """M3D's open-ended metrics as far as they can be computed offline, each the mean of per-question scores as M3D
    computes them: BLEU-1 (sacrebleu, 13a tokens, brevity penalty, no smoothing), ROUGE-1 and ROUGE-L F1 (rouge-score),
    METEOR (nltk with the WordNet corpus over nltk's word tokens, see `meteor`; 'unavailable' when nltk or WordNet is
    missing), BERTScore (not computed:
    it needs the roberta-large weights)."""
    out: dict = {}
    try:
        from sacrebleu.metrics import BLEU

        bleu = BLEU(max_ngram_order=1, smooth_method="none", effective_order=True)
        out["bleu1"] = _mean(bleu.sentence_score(p, [r]).score / 100 for p, r in zip(predictions, references))
    except ImportError:
        out["bleu1"] = "unavailable: pip install sacrebleu"
    try:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
        scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
        out["rouge1"] = _mean(s["rouge1"].fmeasure for s in scores)
        out["rougeL"] = _mean(s["rougeL"].fmeasure for s in scores)
    except ImportError:
        out["rouge1"] = out["rougeL"] = "unavailable: pip install rouge-score"
    out["meteor"] = meteor(predictions, references)
    out["bertscore"] = "not computed: needs the roberta-large weights (not downloadable here)"
    return out


def word_tokenize(text: str) -> list[str]:
    """nltk's `word_tokenize` as M3D's scorer calls it (M3D's eval_vqa.py -> `evaluate`'s meteor -> nltk), offline.

    `word_tokenize` = Punkt sentence splitting (English model) + `NLTKWordTokenizer` per sentence; the split matters
    because the word tokenizer separates only a sentence's final period. The English Punkt model is nltk data, not
    shipped with nltk: with it installed (`tokenizers/punkt_tab/english`) it is used as is. Without it, nltk's Punkt
    algorithm runs with no trained abbreviations and a period followed by a lowercase word is not a sentence end, as
    the English model treats mid-sentence lowercase words; every token is then the same as the published one except
    after an abbreviation followed by a capitalised word ("Dr. Smith"), which the English model knows and this
    split does not."""
    import nltk
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return nltk.word_tokenize(text)
    except LookupError:
        pass
    sentences: list[str] = []
    for sentence in PunktSentenceTokenizer().tokenize(text):
        if sentences and sentence[:1].islower():
            sentences[-1] += " " + sentence
        else:
            sentences.append(sentence)
    words = NLTKWordTokenizer()
    return [token for sentence in sentences for token in words.tokenize(sentence)]


def meteor(predictions: list[str], references: list[str], wordnet=None) -> float | str:
    """Mean per-question METEOR as M3D computes it: `evaluate`'s meteor on stripped texts, i.e. nltk's `meteor_score`
    (alpha 0.9, beta 3, gamma 0.5, lowercased, Porter stems, WordNet synonyms) over `word_tokenize` tokens, so
    punctuation is its own token ("liver," is "liver" and ","). `wordnet`: a WordNet reader (default nltk's)."""
    try:
        from nltk.translate.meteor_score import meteor_score
    except ImportError:
        return "unavailable: pip install nltk"
    if wordnet is None:
        from nltk.corpus import wordnet

        try:
            wordnet.ensure_loaded()
        except LookupError:
            return "unavailable: nltk's WordNet corpus not found (see README: Evaluation)"
    return _mean(
        meteor_score([word_tokenize(r.strip())], word_tokenize(p.strip()), wordnet=wordnet)
        for p, r in zip(predictions, references)
    )


DEBIAN_WORDNET = Path("/usr/share/wordnet")
DEBIAN_LEXNAMES = Path("/usr/share/man/man5/lexnames.5WN.gz")
_LEX_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def setup_wordnet(nltk_data: str | Path, source: Path = DEBIAN_WORDNET, lexnames_man: Path = DEBIAN_LEXNAMES) -> Path:
    """Lay out Debian's WordNet 3.0 (`apt-get install wordnet-base wordnet-sense-index`) as nltk's `wordnet` corpus
    under `nltk_data` (then `export NLTK_DATA=...`): the database files are copied and the `lexnames` file nltk reads
    is built from the table in Debian's lexnames(5WN) manual page. Returns the corpus folder."""
    import gzip
    import shutil

    if not source.is_dir() or not lexnames_man.is_file():
        raise DataError(f"Debian's WordNet is not installed ({source}, {lexnames_man}): apt-get install wordnet-base "
                        "wordnet-sense-index")  # fmt: skip
    target = Path(nltk_data) / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copyfile(f, target / f.name)
    rows = re.findall(r"^(\d\d)\t(\w+\.\w+)\s*\t", gzip.open(lexnames_man, "rt").read(), flags=re.MULTILINE)
    if len(rows) != 45:
        raise DataError(f"{lexnames_man}: expected the 45 lexicographer files, found {len(rows)}")
    (target / "lexnames").write_text("".join(f"{n}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n" for n, name in rows))
    return target


def m3d_metrics(samples: list[Sample], predictions: list[str]) -> dict:
    closed = [(s, p) for s, p in zip(samples, predictions) if s.meta["answer_type"] == "CLOSED"]
    opened = [(s, p) for s, p in zip(samples, predictions) if s.meta["answer_type"] == "OPEN"]
    out: dict = {"n_closed": len(closed), "n_open": len(opened)}
    if closed:
        right = [parse_choice(p, s.meta["choices"]) == s.meta["answer_choice"] for s, p in closed]
        out["closed_accuracy"] = _mean(right)
        out["closed_accuracy_by_question_type"] = _by(closed, right, "question_type")
        # M3D's own rule: the correct letter followed by a period appears anywhere in the output
        out["m3d_compatible"] = {"closed_accuracy": _mean(f"{s.meta['answer_choice']}." in p for s, p in closed)}
    if opened:
        out["open"] = text_generation_metrics([p for _, p in opened], [s.answer for s, _ in opened])
    return out


def _by(pairs, values, key: str) -> dict:
    groups = collections.defaultdict(list)
    for (s, _), v in zip(pairs, values):
        groups[str(s.meta.get(key))].append(v)
    return {k: _mean(v) for k, v in sorted(groups.items())}


INVALID = "<not in the answer set>"


def classification_metrics(golds: list[str], predictions: list[str], classes: list[str]) -> dict:
    """Surgical VQA as classification over a fixed answer set. A prediction is mapped to the class whose normalised
    text it equals, else to INVALID (wrong, and a false positive of no class).
    Clean: accuracy; per class c among the classes present in the references: precision = TP / (TP + FP) (0 when c
    is never predicted), recall = TP / (TP + FN), F1 = 2PR / (P + R) (0 when P + R = 0); macro = their mean.
    SurgicalGPT-compatible (labelled so): sklearn's precision_recall_fscore_support(average="macro",
    zero_division=1) as the SurgicalGPT / Surgical-VQA code calls it: the average runs over every label that occurs
    in the references OR the predictions (INVALID included), and a class never predicted gets precision 1."""
    by_norm = {normalize_answer(c): c for c in classes}
    gold = [by_norm.get(normalize_answer(g), g) for g in golds]
    pred = [by_norm.get(normalize_answer(p), INVALID) for p in predictions]

    def per_class(labels, zero_division):
        rows = {}
        for c in labels:
            tp = sum(g == c and p == c for g, p in zip(gold, pred))
            fp = sum(g != c and p == c for g, p in zip(gold, pred))
            fn = sum(g == c and p != c for g, p in zip(gold, pred))
            precision = tp / (tp + fp) if tp + fp else zero_division
            recall = tp / (tp + fn) if tp + fn else zero_division
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            if tp + fp == 0 and tp + fn == 0:
                f1 = zero_division
            rows[c] = (precision, recall, f1)
        return rows

    clean = per_class(sorted(set(gold)), 0.0)
    compat = per_class(sorted(set(gold) | set(pred)), 1.0)
    macro = lambda rows, i: _mean(v[i] for v in rows.values())  # noqa: E731
    return {
        "accuracy": _mean(g == p for g, p in zip(gold, pred)),
        "macro_precision": macro(clean, 0),
        "macro_recall": macro(clean, 1),
        "macro_f1": macro(clean, 2),
        "invalid_rate": _mean(p == INVALID for p in pred),
        "n": len(gold),
        "n_classes": len(classes),
        "per_class_recall": {c: v[1] for c, v in clean.items()},
        "surgicalgpt_compatible": {"macro_precision": macro(compat, 0), "macro_recall": macro(compat, 1),
                                   "macro_f1": macro(compat, 2)},  # fmt: skip
    }


def mini_metrics(samples: list[Sample], predictions: list[str]) -> dict:
    """Exact match after normalisation (yes/no references by `yes_no`), overall, per task and per task x modality."""
    right = [closed_correct(p, s.answer) for s, p in zip(samples, predictions)]
    pairs = list(zip(samples, predictions))
    cells = collections.defaultdict(list)
    for s, r in zip(samples, right):
        cells[f"{s.meta['task']} x {s.meta['modality']}"].append(r)
    return {
        "accuracy": _mean(right),
        "n": len(right),
        "accuracy_by_task": _by(pairs, right, "task"),
        "accuracy_by_task_x_modality": {k: _mean(v) for k, v in sorted(cells.items())},
        "n_by_task_x_modality": {k: len(v) for k, v in sorted(cells.items())},
    }


DEFINITIONS = {
    "vqa": (
        "closed_accuracy: over every CLOSED question; a yes/no reference is matched when the normalised prediction "
        "starts with that word, any other reference by exact match after normalisation (lower case, punctuation "
        "removed, articles dropped, number words to digits). open_recall: mean over OPEN questions of the fraction "
        "of reference words present in the prediction (multisets, counts clipped). llava_med_compatible: LLaVA-Med's "
        "scorer reproduced for comparison with published tables: closed questions whose prediction contains neither "
        "'yes' nor 'no' as a SUBSTRING are dropped from the denominator ('normal' counts as 'no'), hits by substring; "
        "open recall counts true positives with the prediction's multiplicity."
    ),
    "m3d": (
        "closed_accuracy: the chosen letter (leading 'B', 'B.', '(B)', 'Answer: B', or a prediction equal to exactly "
        "one choice's text) equals 'Answer Choice'. m3d_compatible.closed_accuracy: M3D's rule, 'X.' (correct letter "
        "and a period) anywhere in the output. open: per-question BLEU-1 / ROUGE-1 F1 / ROUGE-L F1 / METEOR averaged, "
        "as M3D does; BERTScore not computed."
    ),
    "surgical": (
        "Classification over the fixed answer set (every answer found in the dataset's QA files). accuracy; macro "
        "precision / recall / F1 over the classes present in the references (a never-predicted class has precision "
        "0); predictions outside the answer set are wrong (invalid_rate). surgicalgpt_compatible: sklearn macro "
        "average with zero_division=1 over reference and predicted labels, as SurgicalGPT's code computes it. "
        "(Token-level F1 scorers such as MedEvalKit's are not used: its 'recall' is the precision.)"
    ),
    "mini": "Exact match after normalisation (yes/no references: the prediction's first word), per task x modality.",
}


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


def _first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


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
    osf = _first_existing(data / "VQA_RAD Dataset Public.json", data / "VQA_RAD_Dataset_Public.json")
    llava = data / f"{split}.json"
    parquet = _parquet_files(data, split)
    if osf is not None:
        images = _first_existing(data / "VQA_RAD Image Folder", data / "VQA_RAD_Image_Folder", data / "images") or data
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
    images = _first_existing(data / "imgs", data / "images") or data
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
    images = _first_existing(data / "images" / split, data / "images") or data

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
    path = _first_existing(data / f"M3D_VQA_{split}.csv", data / "M3D-VQA" / f"M3D_VQA_{split}.csv",
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
        path = _first_existing(data / f"{split}.jsonl", data / "eval.jsonl", data / "test.jsonl")
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


def score(name: str, samples: list[Sample], predictions: list[str], classes: list[str] | None = None) -> dict:
    if name in ("vqa-rad", "slake", "pathvqa"):
        return vqa_2d_metrics(samples, predictions)
    if name == "m3d-vqa":
        return m3d_metrics(samples, predictions)
    if name in SURGICAL:
        return classification_metrics([s.answer for s in samples], predictions, classes or [])
    return mini_metrics(samples, predictions)


def definitions_for(name: str) -> str:
    if name in ("vqa-rad", "slake", "pathvqa"):
        return DEFINITIONS["vqa"]
    if name == "m3d-vqa":
        return DEFINITIONS["m3d"]
    return DEFINITIONS["surgical"] if name in SURGICAL else DEFINITIONS["mini"]


# ================================================================================================= generation
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


def conversation(sample: Sample) -> list[dict]:
    content = [materialise(b) for b in sample.media] + [{"type": "text", "text": sample.question}]
    return [{"role": "user", "content": content}]


def generate_answers(model, processor, samples: list[Sample], batch_size: int = 4, max_new_tokens: int = 64,
                     prune_threshold: float | None = None, progress: bool = True) -> list[str]:  # fmt: skip
    """Greedy answers, `batch_size` conversations per call, left padding, a tqdm bar."""
    import torch
    from tqdm.auto import tqdm

    processor.tokenizer.padding_side = "left"
    extra = {} if prune_threshold is None else {"prune_threshold": prune_threshold}
    answers = []
    bar = tqdm(total=len(samples), desc="generating", unit="q", disable=not progress)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        inputs = processor.apply_chat_template(
            [conversation(s) for s in batch], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", padding=True, **extra,
        )  # fmt: skip
        inputs.pop("media_metadata", None)
        inputs = inputs.to(model.device)  # pixel values stay float32: the tower casts them, pruning measures them
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[:, inputs["input_ids"].shape[1] :]
        answers += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
        bar.update(len(batch))
    bar.close()
    return answers


def load_model(model_path: str, device: str = "auto", dtype: str = "auto"):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    return model.to(device).eval(), processor


# ================================================================================================= reporting
def _fmt(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{100 * value:.2f}"
    return "-" if value is None else str(value)


def markdown_table(result: dict) -> str:
    """Flat rows `metric | value` (rates as percentages); nested groups become `group / metric`."""
    lines = [f"### {result['benchmark']} ({result['split']}, {result['n']} questions): {result['model']}", "",
             "| metric | value |", "|---|---|"]  # fmt: skip

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix} / {k}" if prefix else k, v)
        else:
            shown = _fmt(value) if not (isinstance(value, int) and not isinstance(value, bool)) else str(value)
            lines.append(f"| {prefix} | {shown} |")

    grid = result["metrics"].get("accuracy_by_task_x_modality")
    hidden = {"per_class_recall", "accuracy_by_task_x_modality", "n_by_task_x_modality"}
    walk("", {k: v for k, v in result["metrics"].items() if k not in hidden})
    if grid:  # omnivmed-mini: task x modality as a table, "accuracy (n)" per cell
        counts = result["metrics"]["n_by_task_x_modality"]
        cells = {tuple(k.split(" x ", 1)): (v, counts[k]) for k, v in grid.items()}
        tasks, modalities = sorted({t for t, _ in cells}), sorted({m for _, m in cells})
        lines += ["", "| task | " + " | ".join(modalities) + " |", "|---|" + "---|" * len(modalities)]
        for t in tasks:
            row = [f"{_fmt(cells[t, m][0])} ({cells[t, m][1]})" if (t, m) in cells else "" for m in modalities]
            lines.append(f"| {t} | " + " | ".join(row) + " |")
    lines += ["", "Rates in percent. " + result["definitions"]]
    return "\n".join(lines) + "\n"


def _join_processes(device: str) -> tuple[int, int, str, bool]:
    """(rank, world size, device, whether this call started the process group). Under `torchrun` /
    `accelerate launch` (WORLD_SIZE > 1) every process joins one group (nccl on GPUs, else gloo) and takes its GPU."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, started


def evaluate(model_path: str, benchmark: str, data: str | Path, split: str = "test", limit: int | None = None,
             batch_size: int = 4, max_new_tokens: int = 64, out: str | Path | None = None, device: str = "auto",
             dtype: str = "auto", prune_threshold: float | None = None, progress: bool = True,
             **loader_options) -> dict:  # fmt: skip
    samples, classes = load_benchmark(benchmark, data, split, **loader_options)
    if limit is not None:
        samples = samples[:limit]
    rank, world, device, started = _join_processes(device)
    # each process answers one contiguous block of questions; the blocks, gathered in rank order, are the whole list
    per_rank = -(-len(samples) // world)
    model, processor = load_model(model_path, device, dtype)
    predictions = generate_answers(model, processor, samples[rank * per_rank : (rank + 1) * per_rank], batch_size,
                                   max_new_tokens, prune_threshold, progress and rank == 0)  # fmt: skip
    if world > 1:
        import torch.distributed as dist

        blocks = [None] * world
        dist.all_gather_object(blocks, predictions)
        predictions = [p for block in blocks for p in block]
        if started:
            dist.destroy_process_group()  # ranks abort at exit without it
        if rank != 0:
            out = None  # one writer
    result = {
        "benchmark": benchmark,
        "model": str(model_path),
        "data": str(data),
        "split": split,
        "n": len(samples),
        "metrics": score(benchmark, samples, predictions, classes),
        "definitions": definitions_for(benchmark),
        "answer_set": classes,
        "predictions": [
            {"id": s.id, "question": s.question, "answer": s.answer, "prediction": p,
             **{k: v for k, v in s.meta.items() if k != "choices"}}
            for s, p in zip(samples, predictions)
        ],  # fmt: skip
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        out.with_suffix(".md").write_text(markdown_table(result))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--setup-wordnet", metavar="NLTK_DATA", default=None,
                        help="only lay out Debian's WordNet as nltk data in this folder (for METEOR), then exit")
    parser.add_argument("--model", help="OmniV-Med folder or Hub id")
    parser.add_argument("--benchmark", choices=BENCHMARKS)
    parser.add_argument("--data", help="the dataset's folder (omnivmed-mini: also a JSONL file)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=None, help="results JSON (a markdown table is written beside it as .md)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    parser.add_argument("--prune-threshold", type=float, default=None, help="override the pruning threshold")
    parser.add_argument("--all-languages", action="store_true", help="slake: Chinese questions too")
    parser.add_argument("--m3d-mode", choices=["both", "closed", "open"], default="both")
    parser.add_argument("--sequences", default=None, help="cholec80 / endovis18: comma-separated sequences to use")
    parser.add_argument("--frame-stride", type=int, default=None,
                        help="cholec80 / endovis18: frames whose number is a multiple of this only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.setup_wordnet:
        try:
            print(setup_wordnet(args.setup_wordnet))
        except DataError as error:
            parser.exit(2, f"error: {error}\n")
        print(f"METEOR: export NLTK_DATA={Path(args.setup_wordnet).resolve()}")
        return
    if not (args.model and args.benchmark and args.data):
        parser.error("--model, --benchmark and --data are required")
    options = {"all_languages": args.all_languages, "m3d_mode": args.m3d_mode, "sequences": args.sequences,
               "frame_stride": args.frame_stride}  # fmt: skip
    try:
        result = evaluate(args.model, args.benchmark, args.data, args.split, args.limit, args.batch_size,
                          args.max_new_tokens, args.out, args.device, args.dtype, args.prune_threshold,
                          **options)  # fmt: skip
    except DataError as error:
        parser.exit(2, f"error: {error}\n")
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(markdown_table(result))


if __name__ == "__main__":
    main()
