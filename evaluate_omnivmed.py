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
import json
import logging
import math
import re
import sys
from pathlib import Path

from omnivmed.configuration_omnivmed import PRUNE_STAGES
from omnivmed_benchmarks import (  # noqa: F401 (the loaders are re-exported: `evaluate_omnivmed.load_slake`, ...)
    CHOICE_LETTERS,
    LOADERS,
    SURGICAL,
    DataError,
    Sample,
    load_benchmark,
    load_cholec80_vqa,
    load_endovis18_vqa,
    load_m3d_vqa,
    load_omnivmed_mini,
    load_pathvqa,
    load_psi_ava_vqa,
    load_slake,
    load_vqa_rad,
    materialise,
)
from omnivmed_tools import (
    ARTICLES,
    NUMBER_WORDS,
    PUNCTUATION,
    closed_correct,
    load_model,
    normalize_answer,
    token_overlap,
)


logger = logging.getLogger("evaluate_omnivmed")

BENCHMARKS = ("vqa-rad", "slake", "pathvqa", "m3d-vqa", "cholec80-vqa", "endovis18-vqa", "psi-ava-vqa", "omnivmed-mini")


# ---------------------------------------------------------------------------- LLaVA-Med-compatible (labelled so)
def _llava_med_words(text: str) -> list[str]:
    text = PUNCTUATION.sub(" ", str(text).lower())
    return [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]


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
             prune_stage: str | None = None, **loader_options) -> dict:  # fmt: skip
    samples, classes = load_benchmark(benchmark, data, split, **loader_options)
    if limit is not None:
        samples = samples[:limit]
    rank, world, device, started = _join_processes(device)
    # each process answers one contiguous block of questions; the blocks, gathered in rank order, are the whole list
    per_rank = -(-len(samples) // world)
    model, processor = load_model(model_path, device, dtype, prune_stage)
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
    parser.add_argument("--prune-stage", choices=PRUNE_STAGES, default=None,
                        help="override the checkpoint's pruning stage (pre_encoder: less tower work, see README)")
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
                          prune_stage=args.prune_stage, **options)  # fmt: skip
    except DataError as error:
        parser.exit(2, f"error: {error}\n")
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(markdown_table(result))


if __name__ == "__main__":
    main()
