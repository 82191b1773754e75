"""Rebuild an OmniV-Med-Instruct-style training set from the public medical datasets you have downloaded.

    python build_instruct_omnivmed.py --source vqa-rad=VQA_RAD/ --source slake=Slake1.0/ --source m3d-cap=M3D-Cap/ \\
        ... --out instruct/ [--max-per-source N] [--seed S] [--stage 1|2|3 ...] [--captioner MODEL_DIR] \\
        [--benchmark NAME=DIR ...] [--processor MODEL_DIR]

The paper's OmniV-Med-Instruct (252K samples, 14 modalities, 11 tasks) was never released; this writes the same kind
of data from the sources' published local layouts (nothing is downloaded):

    source          kind    reader and files
    vqa-rad         image   omnivmed_benchmarks.load_vqa_rad, split train (OSF json / LLaVA-Med json / HF parquet)
    slake           image   omnivmed_benchmarks.load_slake, train.json + imgs/ (English questions)
    pathvqa         image   omnivmed_benchmarks.load_pathvqa, split train (HF parquet / json / csv; never the .pkl)
    m3d-vqa         volume  omnivmed_benchmarks.load_m3d_vqa, M3D_VQA_train.csv (each row closed and open)
    cholec80-vqa    image   omnivmed_benchmarks.load_cholec80_vqa, the training sequences
    endovis18-vqa   image   omnivmed_benchmarks.load_endovis18_vqa, the training sequences
    psi-ava-vqa     image   omnivmed_benchmarks.load_psi_ava_vqa, Train/
    mimic-cxr       image   `read_mimic_cxr`: MIMIC-CXR-JPG files/pXX/pNNNNNNNN/sNNNNNNNN/*.jpg + the report
                            sNNNNNNNN.txt (same tree or mimic-cxr-reports/files/), split / metadata CSVs if present
    m3d-cap         volume  `read_m3d_cap`: M3D_Cap.json {"train": [{"image", "text"}]} + M3D_Cap_npy/ .npy + text.txt
    m3d-refseg      volume  `read_m3d_refseg` (positioning): M3D_RefSeg.csv (Image, Mask, Mask_ID, Question, Answer)
    uncaptioned     any     `read_uncaptioned`: <DIR>/<modality>/**/<video | volume | image> with no text: needs
                            --captioner (drafts filtered by rejection sampling; see `accept_caption`)

The seven benchmark sets are read by the evaluation harness's own loaders (one reader per source, used by both), on
their training splits; the others have readers here. Output (under --out):

    all.jsonl            every kept row: LLaVA / VideoLLaMA3 style {"id", "image" | "volume" | "video": path,
                         "conversations": [human "<kind>\\nprompt", gpt answer], "task", "modality", "kind",
                         "source", "answer", ...}; media paths relative to --out (train_trl.py --data_root OUT)
    stage1.jsonl ...     the --stage views (default all three): 1 = 2D captions and reports; 2 = 2D instructions;
                         3 = every 3D and video row plus as many 2D instruction rows (seeded replay), as
                         train_trl's embedded default mixes them
    media/<source>/...   the media, hard-linked (copied across file systems), one copy per content (the first source
                         naming a file holds it); M3D .npy volumes become NIfTI
    errors.jsonl         one line per unusable source row (missing / corrupt file, malformed record): the build goes on
    removed.jsonl        rows dropped by the contamination guard, with the benchmark and the reason
    captions.jsonl       the captioner's state (every draft and verdict); a rerun resumes from it
    report.md/.json/.png statistics: rows per source, modality x task, media kinds, token lengths (--processor)

Ids are deterministic (a hash of source, source record, question and answer); a rerun rewrites the same files (media
already in place are kept), so an interrupted build is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np


ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from omnivmed.collator_omnivmed import OmniVMedCollator  # noqa: E402
from omnivmed.media_omnivmed import (  # noqa: E402
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VOLUME_EXTENSIONS,
    MediaError,
    load_media,
)
from omnivmed_benchmarks import LOADERS, DataError, Sample, materialise  # noqa: E402
from omnivmed_tools import (  # noqa: E402
    first_existing,
    load_model,
    load_processor,
    load_rows,
    normalize_answer,
    token_overlap,
    tokens,
    write_jsonl,
    yes_no,
)


logger = logging.getLogger("build_instruct_omnivmed")

# ================================================================================================= the taxonomy
# Fixed lists. The paper names the counts (14 modalities, 11 tasks) but not the lists; these are ours, chosen to cover
# the public sources and the paper's benchmarks. Every row carries exactly one of each.
MODALITIES = {
    "x-ray": "projection radiography (chest, bone and abdominal films; MIMIC-CXR)",
    "ct": "computed tomography, 2D slices and 3D volumes",
    "mri": "magnetic resonance imaging, 2D slices and 3D volumes",
    "ultrasound": "ultrasonography",
    "pet": "PET, PET-CT, SPECT and other nuclear medicine",
    "mammography": "mammography and breast tomosynthesis",
    "angiography": "digital subtraction and fluoroscopic angiography",
    "pathology": "histopathology and cytology slides (PathVQA)",
    "microscopy": "microscopy other than pathology slides (cells, fluorescence)",
    "dermoscopy": "dermoscopy and clinical photographs of the skin",
    "fundus": "retinal fundus photography",
    "oct": "optical coherence tomography",
    "endoscopy": "diagnostic endoscopy (GI, bronchoscopy), stills and video",
    "surgery": "laparoscopic and robotic surgical scenes, frames and video (Cholec80, EndoVis18, PSI-AVA)",
}
TASKS = {
    "caption": "describe the image / volume / video (M3D-Cap, captioner drafts)",
    "report": "write the radiology report: findings and impression (MIMIC-CXR)",
    "modality": "which imaging modality, sequence or contrast phase",
    "plane": "which plane or view",
    "organ": "which organ or anatomical structure",
    "abnormality": "is there a finding, which one (presence, diagnosis)",
    "location": "where a finding or instrument is (side, lobe, quadrant, position)",
    "general-vqa": "other questions: size, count, colour, shape, medical knowledge, free-form",
    "positioning": "3D referring-expression localisation: the bounding box of a described region (M3D-RefSeg)",
    "surgical-phase": "surgical phase or step recognition",
    "surgical-instrument": "surgical instrument presence, state and action",
}
KINDS = ("image", "volume", "video")
# text -> modality; used on dataset modality fields, folder names and (VQA-RAD) the questions and answers of an image
MODALITY_PATTERNS = [
    ("mammography", r"mammogra\w*|tomosynthesis"),
    ("angiography", r"angiogra\w*|\bdsa\b"),
    ("pet", r"\bpet\b|pet[- ]ct|spect|nuclear medicine|scintigra\w*"),
    ("oct", r"\boct\b|optical coherence"),
    ("ct", r"\bct\b|\bcta\b|computed tomograph\w*|\bcat scan"),
    ("mri", r"\bmri?\b|magnetic resonance|\bt1\b|\bt2\b|\bflair\b|\bdwi\b|diffusion weighted"),
    ("x-ray", r"x[- ]?ray|radiograph\w*|\bcxr\b|\bfilm\b|\bplain film"),
    ("ultrasound", r"ultrasound|ultrasonograph\w*|sonograph\w*|\bus\b|doppler"),
    ("pathology", r"patholog\w*|histolog\w*|histopatholog\w*|\bh ?& ?e\b|cytolog\w*"),
    ("microscopy", r"microscop\w*"),
    ("dermoscopy", r"dermoscop\w*|dermatoscop\w*|dermatolog\w*"),
    ("fundus", r"fundus|retinal photo\w*"),
    ("surgery", r"surg\w*|laparoscop\w*|robotic"),
    ("endoscopy", r"endoscop\w*|colonoscop\w*|gastroscop\w*|bronchoscop\w*"),
]

# Question -> task for sources without a question type (PathVQA, VQA-RAD's parquet copy, LLaVA-style JSON): the first
# rule whose pattern occurs in the lower-cased question wins.
QUESTION_TASK_RULES = [
    ("plane", r"\bplane\b|\bview\b|\baxial\b|\bcoronal\b|\bsagittal\b|\bprojection\b|\bpa\b|\bap\b"),
    ("modality", r"modality|what (kind|type) of (image|scan|imaging)|how (was|is) (this|the) image (taken|acquired)|"
                 r"\bcontrast\b|\bweighted\b|imaging (technique|method)|^(is|was) (this|it|the (image|scan|film)) "
                 r"(an? )?(ct|mri?|x[- ]?ray|radiograph|ultrasound|pet|mammogram)\b"),  # fmt: skip
    ("location", r"^where\b|\bwhere is\b|located|location|which side|left or right|which (lobe|quadrant|part of the)|"
                 r"\bposition\b|\bside\b"),  # fmt: skip
    ("organ", r"\borgan\b|\bstructure\b|what part of the body|anatom\w*|which (bone|vessel|lobe)"),
    ("abnormality", r"abnormal|normal\b|lesion|tumou?r|mass\b|fracture|pneumo\w*|effusion|disease|diagnos\w*|"
                    r"finding|present|evidence|nodule|cyst|infarct|hemorrhage|haemorrhage|edema|oedema|cancer|"
                    r"malignan\w*|benign|necrosis|inflammation|carcinoma"),  # fmt: skip
]
VQA_RAD_TYPES = {"MODALITY": "modality", "PLANE": "plane", "ORGAN": "organ", "POS": "location", "PRES": "abnormality",
                 "ABN": "abnormality"}  # fmt: skip   (SIZE, ATTRIB, COLOR, COUNT, OTHER -> general-vqa)
SLAKE_TYPES = {"modality": "modality", "plane": "plane", "organ": "organ", "position": "location",
               "abnormality": "abnormality"}  # fmt: skip   (KG, Quantity, Color, Size, Shape -> general-vqa)
M3D_TYPES = {"plane": "plane", "phase": "modality", "organ": "organ", "abnormality": "abnormality",
             "location": "location"}  # fmt: skip   (M3D's "phase" is the CT contrast phase)
PSI_AVA_TYPES = {"C1_location": "location", "C2_action": "surgical-instrument", "C3_phase": "surgical-phase",
                 "C4_step": "surgical-phase"}  # fmt: skip

# Prompts for the tasks whose source gives no question; one is drawn per row from a seeded generator. VQA questions are
# kept verbatim (as the benchmarks ask them), answers always.
TEMPLATES = {
    "caption": ["Describe this {noun}.", "Write a short caption for this {noun}.",
                "What does this {noun} show? Describe it briefly.", "Summarise the findings visible in this {noun}.",
                "Provide a concise description of this medical {noun}."],
    "report": ["Write the radiology report for this chest X-ray.", "Describe the findings and give an impression.",
               "You are a radiologist. Report on this radiograph: findings, then impression.",
               "Generate the findings and impression sections for this image.",
               "What are the findings on this chest film? Conclude with an impression."],
    "positioning": ["{question} Answer with the bounding box [slice start, row start, column start, slice end, row "
                    "end, column end] as fractions of the volume.",
                    "{question} Give the 3D box as fractions of the volume: [z1, y1, x1, z2, y2, x2] (slice, row, "
                    "column).",
                    "{question} Locate it with a bounding box [slice, row, column start; slice, row, column end], "
                    "each a fraction of the volume size."],
}  # fmt: skip
NOUNS = {"image": "image", "volume": "scan", "video": "video"}
CHECK_QUESTION = "Which imaging modality is shown in this {noun}? Answer in a few words."

BENCHMARKS = tuple(b for b in LOADERS if b != "omnivmed-mini")  # the test splits the guard knows
QA_GUARDED = ("vqa-rad", "slake", "pathvqa", "m3d-vqa")  # free-text questions: a shared question + answer is a leak
STAGE_VIEWS = {1: "2D captions and reports", 2: "2D instructions", 3: "3D + video, with a 2D instruction replay"}


class BuildError(ValueError):
    """The command cannot run (unknown source, missing folder, bad option); per-row problems never raise."""


@dataclasses.dataclass
class Candidate:
    """A training row before its media are placed under --out."""

    source: str
    source_id: str
    kind: str
    media: dict  # {"path": file} | {"npy": file} | {"bytes": ..., "name": ...}
    rel: str  # where the medium goes under media/<source>/
    question: str | None  # the source's question; None -> a template of `task`
    answer: str | None  # None -> to be captioned
    task: str
    modality: str
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str:
        digest = hashlib.sha1(json.dumps([self.source, self.source_id, self.rel, self.question, self.answer],
                                         ensure_ascii=False).encode()).hexdigest()  # fmt: skip
        return f"{self.source}:{digest[:16]}"


# ================================================================================================= classification
def modality_from_text(text: str) -> str | None:
    text = str(text or "").lower().replace("_", " ")
    for modality, pattern in MODALITY_PATTERNS:
        if re.search(pattern, text):
            return modality
    return None


def task_from_question(question: str) -> str:
    q = str(question).lower()
    for task, pattern in QUESTION_TASK_RULES:
        if re.search(pattern, q):
            return task
    return "general-vqa"


def surgical_task(source: str, question: str, meta: dict) -> str:
    if source == "psi-ava-vqa" and meta.get("category") in PSI_AVA_TYPES:
        return PSI_AVA_TYPES[meta["category"]]
    q = question.lower()
    if "phase" in q or "step" in q:
        return "surgical-phase"
    if "organ" in q:
        return "organ"
    if re.search(r"\bwhere\b|located|location", q):
        return "location"
    return "surgical-instrument"  # tool presence ("Is grasper used ..."), state and action


def vqa_task(source: str, sample: Sample) -> str:
    if source in ("cholec80-vqa", "endovis18-vqa", "psi-ava-vqa"):
        return surgical_task(source, sample.question, sample.meta)
    if source == "m3d-vqa":
        return M3D_TYPES.get(str(sample.meta.get("question_type")).lower(), "general-vqa")
    qtype = str(sample.meta.get("question_type") or "")
    if source == "vqa-rad" and qtype:
        first = re.split(r"[,/ ]+", qtype.strip().upper())[0]
        return VQA_RAD_TYPES.get(first, "general-vqa")
    content = str(sample.meta.get("content_type") or "").strip().lower()
    if source == "slake" and content:
        return SLAKE_TYPES.get(content, "general-vqa")
    return task_from_question(sample.question)


def _vqa_rad_modalities(samples: list[Sample]) -> dict[str, tuple[str, str]]:
    """VQA-RAD gives no modality field: per image, the modality its own questions establish (an answer naming one,
    or a yes to "Is this a CT?"), else one named in a question, else x-ray (flagged "default" in modality_source)."""
    by_image = collections.defaultdict(list)
    for s in samples:
        by_image[_media_key(s.media[0])].append(s)
    out = {}
    for key, group in by_image.items():
        found = None
        for s in group:  # answers to modality questions first: they are the dataset's ground truth
            if vqa_task("vqa-rad", s) != "modality":
                continue
            yes = yes_no(s.answer)
            found = modality_from_text(s.question) if yes == "yes" else (None if yes else modality_from_text(s.answer))
            if found:
                break
        if found:
            out[key] = (found, "answer")
            continue
        # "Is there a fracture on this CT?": a modality named in another question (not "Is this an MRI?" -> no)
        named = next((m for s in group if vqa_task("vqa-rad", s) != "modality"
                      for m in [modality_from_text(s.question)] if m), None)  # fmt: skip
        out[key] = (named, "question") if named else ("x-ray", "default")
    return out


def _media_key(block: dict) -> str:
    return str(block.get("path") or block.get("npy") or hashlib.sha1(block.get("bytes", b"")).hexdigest())


# ================================================================================================= source readers
def _rel_under(path: Path, data: Path) -> str:
    try:
        return Path(os.path.relpath(path, data)).as_posix()
    except ValueError:
        return Path(path).name


def _safe_rel(rel: str) -> str:
    parts = [p for p in Path(rel).parts if p not in ("..", ".", "/", "")]
    return "/".join(parts) or "file"


def read_benchmark_source(name: str, data: Path, split: str = "train") -> tuple[list[Candidate], list[dict]]:
    """A benchmark's training split through the evaluation harness's loader (errors collected, not raised)."""
    errors: list[str] = []
    loaded = LOADERS[name](data, split, errors=errors)
    samples = loaded[0] if isinstance(loaded, tuple) else loaded
    rad = _vqa_rad_modalities(samples) if name == "vqa-rad" else {}
    candidates = []
    for s in samples:
        block = s.media[0]
        if "bytes" in block:  # HF parquet: the image has no file of its own
            ext = _image_ext(block["bytes"])
            media, rel = {"bytes": block["bytes"]}, f"{split}/{_safe_rel(s.id)}{ext}"
            where = f"{data} parquet row {s.id}"
        else:
            path = Path(block.get("path") or block.get("npy"))
            media = {"npy": str(path)} if "npy" in block else {"path": str(path)}
            rel, where = _rel_under(path, data), str(path)
        kind = "volume" if name == "m3d-vqa" else "image"
        if name == "vqa-rad":
            modality, how = rad[_media_key(block)]
        elif name == "slake":
            modality, how = modality_from_text(s.meta.get("modality")) or "x-ray", "dataset"
        elif name == "pathvqa":
            modality, how = "pathology", "dataset"
        elif name == "m3d-vqa":
            modality, how = modality_from_text(rel.replace("/", " ")) or "ct", "path"
        else:
            modality, how = "surgery", "dataset"
        meta = {k: v for k, v in s.meta.items() if k in ("answer_type", "question_type", "content_type", "sequence",
                                                          "category") and v is not None}  # fmt: skip
        candidates.append(Candidate(name, s.id, kind, media, _safe_rel(rel), s.question, s.answer, vqa_task(name, s),
                                    modality, {**meta, "modality_source": how, "where": where}))  # fmt: skip
    return candidates, [{"source": name, "where": str(data), "reason": e} for e in errors]


def _image_ext(data: bytes) -> str:
    from PIL import Image

    try:
        fmt = Image.open(io.BytesIO(data)).format or "PNG"
    except (OSError, ValueError):  # a corrupt image still gets a name; it is reported when it is inspected
        return ".png"
    return {"JPEG": ".jpg", "TIFF": ".tif"}.get(fmt, "." + fmt.lower())


def _read_csv(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


REPORT_SECTION = re.compile(r"^\s*(FINDINGS AND IMPRESSION|FINDINGS|IMPRESSION)\s*:", re.IGNORECASE | re.MULTILINE)
ANY_SECTION = re.compile(r"^\s*[A-Z][A-Z /&-]{2,}:", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """FINDINGS and IMPRESSION of a MIMIC-CXR free-text report, each with its line wrapping undone (the reports are
    hard-wrapped; the words are kept verbatim). A section ends at the next upper-case "HEADING:"."""
    out = {}
    for match in REPORT_SECTION.finditer(text):
        rest = text[match.end():]
        end = ANY_SECTION.search(rest)
        body = " ".join(rest[: end.start() if end else len(rest)].split())
        if body:
            out[match.group(1).lower().removesuffix(" and impression")] = body
    return out


def read_mimic_cxr(data: Path) -> tuple[list[Candidate], list[dict]]:
    """MIMIC-CXR-JPG + the MIMIC-CXR reports (PhysioNet layouts): images files/pXX/p<subject>/s<study>/<dicom>.jpg;
    reports files/pXX/p<subject>/s<study>.txt in the same tree or under mimic-cxr-reports/. With
    mimic-cxr-2.0.0-split.csv(.gz) only split == train is used (validate and test are left out); with
    mimic-cxr-2.0.0-metadata.csv(.gz) only frontal views (ViewPosition PA / AP). One row per image; the answer is
    "Findings: ... Impression: ..." from the study's report (a report with neither section is an error row)."""
    files = data / "files"
    if not files.is_dir():
        raise BuildError(f"mimic-cxr: {data} has no files/ folder (expected MIMIC-CXR-JPG's "
                         "files/pXX/p<subject>/s<study>/*.jpg and the reports s<study>.txt)")  # fmt: skip
    extra_roots = (data / "mimic-cxr-reports" / "files", data / "reports" / "files")
    report_roots = [files] + [p for p in extra_roots if p.is_dir()]
    split_csv = first_existing(data / "mimic-cxr-2.0.0-split.csv.gz", data / "mimic-cxr-2.0.0-split.csv")
    meta_csv = first_existing(data / "mimic-cxr-2.0.0-metadata.csv.gz", data / "mimic-cxr-2.0.0-metadata.csv")
    split = {r["dicom_id"]: r["split"] for r in _read_csv(split_csv)} if split_csv else None
    views = {r["dicom_id"]: r.get("ViewPosition", "") for r in _read_csv(meta_csv)} if meta_csv else None
    candidates, errors, reports = [], [], {}
    for image in sorted(files.glob("p*/p*/s*/*.jpg")):
        dicom_id, study = image.stem, image.parent
        if split is not None and split.get(dicom_id) != "train":
            continue
        if views is not None and views.get(dicom_id, "").upper() not in ("PA", "AP"):
            continue
        if study not in reports:
            rel = study.relative_to(files).as_posix() + ".txt"
            txt = next((r / rel for r in report_roots if (r / rel).is_file()), None)
            if txt is None:
                reports[study] = f"no report {rel} (looked under {', '.join(str(r) for r in report_roots)})"
            else:
                sections = report_sections(txt.read_text(encoding="utf-8", errors="replace"))
                if not sections:
                    reports[study] = f"{txt}: no FINDINGS or IMPRESSION section"
                else:
                    reports[study] = {"answer": " ".join(f"{k.capitalize()}: {v}" for k, v in sections.items()),
                                      "report": str(txt)}  # fmt: skip
        report = reports[study]
        if isinstance(report, str):
            errors.append({"source": "mimic-cxr", "where": str(image), "reason": report})
            continue
        rel = _rel_under(image, data)
        candidates.append(Candidate("mimic-cxr", dicom_id, "image", {"path": str(image)}, rel, None, report["answer"],
                                    "report", "x-ray", {"study": study.name, "modality_source": "dataset",
                                                        "where": str(image)}))  # fmt: skip
    return candidates, errors


def read_m3d_cap(data: Path, split: str = "train") -> tuple[list[Candidate], list[dict]]:
    """M3D-Cap (HF GoodBaiBai88/M3D-Cap, after M3D's preprocessing): M3D_Cap.json in the folder or in M3D_Cap_npy/,
    {"train": [{"image": "ct_case/000006/Axial_C__portal_venous_phase.npy", "text": "ct_case/000006/text.txt"}, ...],
    "validation": [...], "test": [...]}, paths relative to the JSON's folder; volumes .npy (1, D, H, W) in [0, 1] (or
    NIfTI). Modality from the path (an "mr" / "mri" folder -> mri), else ct. The caption is text.txt verbatim."""
    path = first_existing(data / "M3D_Cap.json", data / "M3D_Cap_npy" / "M3D_Cap.json")
    if path is None:
        raise BuildError(f"m3d-cap: expected {data}/M3D_Cap.json or {data}/M3D_Cap_npy/M3D_Cap.json")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise BuildError(f"{path}: not JSON ({error})") from error
    if not isinstance(index, dict) or split not in index:
        raise BuildError(f"{path}: expected a '{split}' list (keys found: {list(index)[:5]})")
    candidates, errors = [], []
    for i, entry in enumerate(index[split]):
        where = f"{path} {split}[{i}]"
        if not isinstance(entry, dict) or not {"image", "text"} <= set(entry):
            errors.append({"source": "m3d-cap", "where": where, "reason": "expected {'image': ..., 'text': ...}"})
            continue
        volume, text = path.parent / entry["image"], path.parent / entry["text"]
        if not text.is_file():
            errors.append({"source": "m3d-cap", "where": where, "reason": f"caption file {text} is missing"})
            continue
        caption = text.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            errors.append({"source": "m3d-cap", "where": where, "reason": f"caption file {text} is empty"})
            continue
        media = {"npy": str(volume)} if volume.suffix == ".npy" else {"path": str(volume)}
        rel = _rel_under(volume, data)
        modality = modality_from_text(Path(entry["image"]).parent.as_posix().replace("/", " ")) or "ct"
        candidates.append(Candidate("m3d-cap", entry["image"], "volume", media, rel, None, caption, "caption",
                                    modality, {"modality_source": "path", "where": str(volume)}))  # fmt: skip
    return candidates, errors


REFSEG_COLUMNS = ("Image", "Mask", "Mask_ID", "Question", "Answer")


def read_m3d_refseg(data: Path, split: str = "train") -> tuple[list[Candidate], list[dict]]:
    """M3D-RefSeg after M3D's preprocessing, as M3D's RefSegDataset reads it: a CSV (M3D_RefSeg_{split}.csv, else
    M3D_RefSeg.csv minus the images of M3D_RefSeg_test.csv) with columns Image, Mask, Mask_ID, Question, Answer
    (Question_Type optional), paths relative to the folder (or its M3D_RefSeg_npy/): image .npy (1, D, H, W), mask
    .npy of region ids. Each row becomes a positioning row: the question + an instruction for a box, and the answer
    with M3D's "[SEG]" placeholder replaced by the region's box [d0, h0, w0, d1, h1, w1] as fractions of (D, H, W)
    (start = first voxel / size, end = (last voxel + 1) / size, 2 decimals) of the volume as stored; the .npy is
    written as NIfTI whose axial slices display exactly as the array's (slice, row, column)."""
    path = first_existing(data / f"M3D_RefSeg_{split}.csv", data / "M3D_RefSeg.csv",
                              data / "M3D_RefSeg_npy" / "M3D_RefSeg.csv")  # fmt: skip
    if path is None:
        raise BuildError(f"m3d-refseg: expected {data}/M3D_RefSeg_{split}.csv or M3D_RefSeg.csv (columns "
                         f"{list(REFSEG_COLUMNS)})")  # fmt: skip
    rows = _read_csv(path)
    missing = [c for c in REFSEG_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise BuildError(f"{path}: columns {missing} missing; expected {list(REFSEG_COLUMNS)}")
    held_out = set()
    test_csv = path.parent / "M3D_RefSeg_test.csv"
    if path.name == "M3D_RefSeg.csv" and test_csv.is_file():
        held_out = {r["Image"] for r in _read_csv(test_csv)}
    candidates, errors = [], []
    for i, row in enumerate(rows):
        if row["Image"] in held_out:
            continue
        where = f"{path}:{i + 2}"
        image, mask = path.parent / row["Image"], path.parent / row["Mask"]
        try:
            box = refseg_box(mask, int(float(row["Mask_ID"])))
        except (ValueError, OSError) as error:
            errors.append({"source": "m3d-refseg", "where": where, "reason": str(error)})
            continue
        box_text = "[" + ", ".join(f"{v:.2f}" for v in box) + "]"
        answer = row["Answer"].strip()
        answer = answer.replace("[SEG]", box_text) if "[SEG]" in answer else f"{answer} {box_text}".strip()
        media = {"npy": str(image)} if image.suffix == ".npy" else {"path": str(image)}
        candidates.append(Candidate("m3d-refseg", f"{row['Image']}#{row['Mask_ID']}#{i}", "volume", media,
                                    _rel_under(image, data), None, answer, "positioning",
                                    modality_from_text(row["Image"].replace("/", " ")) or "ct",
                                    {"refer": row["Question"].strip(), "box": box, "modality_source": "path",
                                     "where": str(image)}))  # fmt: skip
    return candidates, errors


def refseg_box(mask_path: Path, region: int) -> list[float]:
    if mask_path.suffix != ".npy":
        raise ValueError(f"{mask_path}: only M3D's preprocessed .npy masks are read")
    if not mask_path.is_file():
        raise ValueError(f"mask {mask_path} is missing")
    mask = np.load(mask_path, allow_pickle=False)
    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 3:
        raise ValueError(f"{mask_path}: expected a (1, D, H, W) or (D, H, W) mask, got {mask.shape}")
    where = np.argwhere(mask == region)
    if not len(where):
        raise ValueError(f"{mask_path}: region {region} is empty")
    lo, hi = where.min(0), where.max(0) + 1
    return [round(float(v), 4) for v in np.concatenate([lo / mask.shape, hi / mask.shape])]


CAPTIONABLE = {**{e: "video" for e in VIDEO_EXTENSIONS}, **{e: "volume" for e in VOLUME_EXTENSIONS},
               **{e: "image" for e in IMAGE_EXTENSIONS}, ".npy": "volume"}  # fmt: skip


def read_uncaptioned(data: Path) -> tuple[list[Candidate], list[dict]]:
    """Media without text, for --captioner: <DIR>/<modality>/**/file, the first folder naming one of MODALITIES (or
    a word that `modality_from_text` maps to one, e.g. laparoscopy -> surgery). Videos, volumes (NIfTI, .npy) and
    images; anything else is an error row."""
    candidates, errors = [], []
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        rel = path.relative_to(data)
        name = path.name.lower()
        ext = next((e for e in sorted(CAPTIONABLE, key=len, reverse=True) if name.endswith(e)), None)
        top = rel.parts[0] if len(rel.parts) > 1 else ""
        modality = top.lower() if top.lower() in MODALITIES else modality_from_text(top)
        if ext is None or modality is None:
            why = f"not a video / volume / image ({path.suffix or 'no extension'})" if ext is None else \
                f"put it under a folder named after its modality (one of {', '.join(MODALITIES)})"  # fmt: skip
            errors.append({"source": "uncaptioned", "where": str(path), "reason": why})
            continue
        media = {"npy": str(path)} if ext == ".npy" else {"path": str(path)}
        candidates.append(Candidate("uncaptioned", rel.as_posix(), CAPTIONABLE[ext], media, rel.as_posix(), None,
                                    None, "caption", modality, {"modality_source": "folder", "where": str(path)}))
    return candidates, errors


SOURCES = {name: "benchmark" for name in BENCHMARKS} | {"mimic-cxr": read_mimic_cxr, "m3d-cap": read_m3d_cap,
                                                         "m3d-refseg": read_m3d_refseg,
                                                         "uncaptioned": read_uncaptioned}  # fmt: skip


def read_source(name: str, data: Path) -> tuple[list[Candidate], list[dict]]:
    if name not in SOURCES:
        raise BuildError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")
    if not data.is_dir():
        raise BuildError(f"--source {name}={data}: no such folder")
    if SOURCES[name] == "benchmark":
        try:
            return read_benchmark_source(name, data)
        except DataError as error:  # the layout itself is wrong (no files at all): nothing to build from
            raise BuildError(str(error)) from error
    return SOURCES[name](data)


# ================================================================================================= media and hashes
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def npy_volume(path: Path) -> np.ndarray:
    if not Path(path).is_file():
        raise MediaError(f"{path}: file is missing")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise MediaError(f"{path}: not a readable .npy array ({error})") from error
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.dtype.kind not in "biuf" or 0 in array.shape:
        raise MediaError(f"{path}: expected a (1, D, H, W) or (D, H, W) numeric volume, got {array.shape} "
                         f"{array.dtype}")  # fmt: skip
    return array


def npy_to_nifti(array: np.ndarray, out: Path) -> None:
    """(D, H, W) slices -> a NIfTI (1 mm, identity affine) whose axial slices, reoriented and displayed by
    media_omnivmed (radiological convention: x flipped, y up), are exactly array[d]; slice 0 is the most inferior."""
    import nibabel as nib

    ras = np.ascontiguousarray(np.transpose(array[:, ::-1, ::-1], (2, 1, 0)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    nib.save(nib.Nifti1Image(ras, np.eye(4)), str(tmp) + ".nii.gz")
    os.replace(str(tmp) + ".nii.gz", out)


def dhash(gray: np.ndarray, size: int = 16) -> np.ndarray:
    """Difference hash: the gray image resized to (size, size + 1), bit = right pixel brighter than left;
    size * size bits packed into bytes. Survives re-encoding and resizing, unlike a file hash."""
    from PIL import Image

    small = Image.fromarray(np.clip(gray * 255, 0, 255).astype(np.uint8)).resize((size + 1, size),
                                                                                 Image.Resampling.BILINEAR)
    a = np.asarray(small, dtype=np.int16)
    return np.packbits((a[:, 1:] > a[:, :-1]).ravel())


def thumbnail(gray: np.ndarray, size: int = 32) -> np.ndarray:
    """The gray image at size x size, zero mean, unit norm: the dot product of two is their correlation."""
    from PIL import Image

    small = Image.fromarray(np.clip(gray * 255, 0, 255).astype(np.uint8)).resize((size, size),
                                                                                 Image.Resampling.BILINEAR)
    a = np.asarray(small, dtype=np.float32).ravel()
    a -= a.mean()
    return a / (np.linalg.norm(a) + 1e-6)


def fingerprint(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return dhash(gray), thumbnail(gray)


def small_gray(image, size: int = 256) -> np.ndarray:
    """A Pillow image -> its gray version at most `size` pixels a side, in [0, 1], EXIF orientation applied. JPEGs are
    decoded at reduced scale (draft mode): a 3000 x 2500 radiograph takes milliseconds instead of a second, and a
    truncated file still fails, since every coefficient is read. 16-bit and float images are min-max scaled."""
    from PIL import Image, ImageOps

    image.draft("L", (size, size))
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        image = Image.fromarray(((a - lo) / (hi - lo) * 255 if hi > lo else a * 0).astype(np.uint8))
    image = image.convert("L")
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255


def inspect(c: Candidate, full: bool = False) -> tuple[set[str], tuple | None]:
    """Read the medium once, raising MediaError when it is missing or corrupt. Returns its exact hashes (sha256 of the
    file, or of the parquet bytes) and, for 2D images, its `fingerprint` (dHash, thumbnail). Volumes and videos are
    read by media_omnivmed as training reads them (two slices / frames); 2D images by `small_gray` (fast), or, with
    `full`, by media_omnivmed too (what `train_trl.py --validate_media load` does, ~1 s for a large radiograph)."""
    from PIL import Image

    if "bytes" in c.media or (c.kind == "image" and "path" in c.media):
        if "path" in c.media and not Path(c.media["path"]).exists():
            raise MediaError(f"{c.media['path']}: file is missing")
        source = io.BytesIO(c.media["bytes"]) if "bytes" in c.media else c.media["path"]
        where = c.meta.get("where") or c.media.get("path")
        try:
            if full:  # validation only: the fingerprint comes from small_gray either way, comparable across runs
                load_media(Image.open(io.BytesIO(c.media["bytes"])) if "bytes" in c.media else source, "image")
            gray = small_gray(Image.open(source))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            if isinstance(error, MediaError):
                raise
            raise MediaError(f"{where}: not a readable image ({type(error).__name__}: {error})") from error
        digest = hashlib.sha256(c.media["bytes"]).hexdigest() if "bytes" in c.media else file_sha256(Path(source))
        return {digest}, fingerprint(gray)
    if "npy" in c.media:
        npy_volume(Path(c.media["npy"]))
        return {file_sha256(Path(c.media["npy"]))}, None
    path = Path(c.media["path"])
    if not path.exists():
        raise MediaError(f"{path}: file is missing")
    load_media(path, c.kind, max_slices=2, max_frames=2)
    return ({file_sha256(path)} if path.is_file() else set()), None


def place(c: Candidate, out: Path, link: bool = True) -> str:
    """Put the medium under out/media/<source>/<rel> (hard link, else copy; .npy -> .nii.gz; parquet bytes ->
    file); a file already there with the same size is kept (a resumed build). Returns the path relative to out."""
    rel = Path("media") / c.source / c.rel
    if "npy" in c.media:
        rel = rel.with_name(rel.name.removesuffix(".npy") + ".nii.gz")
    dest = out / rel
    derived = "npy" in c.media or "bytes" in c.media
    if dest.exists() and (derived or dest.stat().st_size == Path(c.media["path"]).stat().st_size):
        return rel.as_posix()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if "npy" in c.media:
        npy_to_nifti(npy_volume(Path(c.media["npy"])), dest)
    elif "bytes" in c.media:  # written aside and renamed: a killed run never leaves a half file that looks done
        dest.with_name(dest.name + ".part").write_bytes(c.media["bytes"])
        os.replace(dest.with_name(dest.name + ".part"), dest)
    else:
        source = Path(c.media["path"])
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True)
        else:
            if dest.exists():
                dest.unlink()
            try:
                if not link:
                    raise OSError
                os.link(source, dest)
            except OSError:  # another file system (or --copy): a real copy
                shutil.copy2(source, dest)
    return rel.as_posix()


# ================================================================================================= contamination guard
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def qa_key(question: str, answer: str) -> str:
    return f"{normalize_answer(question)}\t{normalize_answer(answer)}"


class ContaminationGuard:
    """Every benchmark test split the evaluation harness knows (BENCHMARKS) that is available is indexed by
    (a) the sha256 of each medium's file (or parquet bytes): exact copies, e.g. an M3D-Cap volume that is also in
        M3D-VQA's test set;
    (b) the 256-bit dHash and a 32 x 32 thumbnail of each 2D image: a training image within `dhash_distance` bits
        (default 8; -1 = off) of a test image whose thumbnails correlate at >= `min_correlation` (default 0.99) is
        the same picture re-encoded or resized. Measured on 300 synthetic look-alike images (blobs on one gradient):
        JPEG at quality 60 and 0.6x-2x resizes stay within 6 dHash bits and correlate >= 0.9999 with the original;
        of the 44,850 distinct pairs, 3 are within 8 bits (the dHash alone would drop them) and correlate <= 0.90,
        and no pair correlates above 0.981;
    (c) the normalised question + answer (omnivmed_tools.normalize_answer of each) of the free-text VQA sets
        (QA_GUARDED): a training row whose source question and answer both match a test question's is dropped,
        whatever the image. Generic pairs ("is this a ct", "yes") match too: that is the conservative reading;
        `qa_min_words` > 0 exempts pairs of fewer words. The surgical sets are not indexed by (c): they ask a few
        template questions over a fixed answer set, so every training pair is also a test pair and only the frames
        (a, b) can tell a leak.
    Rows with templated prompts (captions, reports, positioning) are checked by (a) and (b) only."""

    def __init__(self, dhash_distance: int = 8, qa_min_words: int = 0, min_correlation: float = 0.99):
        self.dhash_distance, self.qa_min_words, self.min_correlation = dhash_distance, qa_min_words, min_correlation
        self.sha: dict[str, str] = {}
        self.qa: dict[str, str] = {}
        self.prints, self.print_names = [], []
        self.coverage: dict[str, dict] = {}

    def add(self, name: str, data: Path) -> None:
        errors: list[str] = []
        try:
            loaded = LOADERS[name](Path(data), "test", errors=errors)
        except DataError as error:
            self.coverage[name] = {"data": str(data), "error": str(error)}
            logger.warning("contamination guard: no %s test split in %s (%s)", name, data, error)
            return
        samples = loaded[0] if isinstance(loaded, tuple) else loaded
        seen, unreadable = {}, 0
        for s in samples:
            key = self._key(s.question, s.answer) if name in QA_GUARDED else None
            if key:
                self.qa.setdefault(key, name)
            block = s.media[0]
            mkey = _media_key(block)
            if mkey in seen:
                continue
            c = Candidate(name, s.id, "volume" if name == "m3d-vqa" else "image",
                          {"bytes": block["bytes"]} if "bytes" in block else
                          {"npy": block["npy"]} if "npy" in block else {"path": block["path"]}, "", s.question,
                          s.answer, "", "", {"where": mkey})  # fmt: skip
            try:
                hashes, fp = inspect(c)
            except (MediaError, ValueError, OSError):
                unreadable += 1
                seen[mkey] = True
                continue
            seen[mkey] = True
            for h in hashes:
                self.sha.setdefault(h, name)
            if fp is not None:
                self.prints.append(fp)
                self.print_names.append(name)
        self.coverage[name] = {"data": str(data), "questions": len(samples), "media": len(seen),
                               "unreadable_media": unreadable, "record_errors": len(errors)}  # fmt: skip
        self._matrix = None

    def _key(self, question, answer) -> str | None:
        key = qa_key(question, answer)
        return key if len(key.split()) >= self.qa_min_words and key.strip() else None

    def check(self, c: Candidate, hashes: set[str], fp: tuple | None) -> tuple[str, str] | None:
        """(reason, benchmark) when the row must go, else None."""
        for h in hashes:
            if h in self.sha:
                return "image-hash", self.sha[h]
        if fp is not None and self.prints and self.dhash_distance >= 0:
            if getattr(self, "_matrix", None) is None:
                self._matrix = np.stack([d for d, _ in self.prints])
                self._thumbs = np.stack([t for _, t in self.prints])
            close = np.flatnonzero(_POPCOUNT[self._matrix ^ fp[0]].sum(1, dtype=np.int32) <= self.dhash_distance)
            if len(close):
                correlation = self._thumbs[close] @ fp[1]
                best = int(correlation.argmax())
                if correlation[best] >= self.min_correlation:
                    return "image-near-duplicate", self.print_names[close[best]]
        if c.question is not None and c.answer is not None:
            key = self._key(c.question, c.answer)
            if key in self.qa:
                return "question-answer", self.qa[key]
        return None


# ================================================================================================= captioner
def mentions_modality(text: str, modality: str) -> bool:
    pattern = dict(MODALITY_PATTERNS).get(modality, re.escape(modality))
    return bool(re.search(pattern, str(text).lower().replace("_", " "))) or modality in str(text).lower()


def accept_caption(draft: str, second: str, check_answer: str, modality: str, agreement: float = 0.5,
                   min_words: int = 3) -> tuple[bool, str]:  # fmt: skip
    """The rejection-sampling rule (the paper filters VLM-written captions; it does not publish its rule; this is
    ours). A draft is kept only if all hold:
      1. it has at least `min_words` words and is not a loop (distinct words >= 30 % of its words);
      2. a second, independently sampled draft for the same medium agrees with it: token F1 (evaluate_omnivmed's
         token_overlap, normalised words) >= `agreement` (default 0.5);
      3. the check question (CHECK_QUESTION: which imaging modality is shown?) answered by the same model on the same
         medium names the modality the source states (MODALITY_PATTERNS).
    Returns (kept, reason)."""
    words = tokens(draft)
    if len(words) < min_words:
        return False, f"too short ({len(words)} words < {min_words})"
    if len(set(words)) < 0.3 * len(words):
        return False, "repetitive (distinct words < 30 %)"
    f1 = token_overlap(draft, second)[2]
    if f1 < agreement:
        return False, f"second draft disagrees (token F1 {f1:.2f} < {agreement})"
    if not mentions_modality(check_answer, modality):
        return False, f"check question failed (answer {check_answer[:60]!r} does not name {modality})"
    return True, f"kept (token F1 {f1:.2f}, check names {modality})"


class Captioner:
    """Drafts captions with any image-text-to-text model through transformers (omnivmed_tools.load_model: Auto
    classes, trust_remote_code) and filters them with `accept_caption`: up to `tries` rounds of (draft, second draft,
    check question) per medium, the first kept draft wins; a medium none passes gets no row. Media reach the model
    as chat content blocks ({"type": "image" | "video", "path"}; volumes as {"type": "volume", ...}, which only
    OmniV-Med's processor reads), so a captioner for volumes must be an OmniV-Med checkpoint."""

    def __init__(self, model_dir: str, seed: int = 0, tries: int = 3, agreement: float = 0.5,
                 max_new_tokens: int = 48, temperature: float = 0.7, device: str = "auto"):  # fmt: skip
        self.model_dir, self.seed, self.tries, self.agreement = str(model_dir), seed, tries, agreement
        self.max_new_tokens, self.temperature, self.device = max_new_tokens, temperature, device
        self._model = None

    @property
    def config_key(self) -> str:
        return hashlib.sha1(json.dumps([self.model_dir, self.seed, self.tries, self.agreement, self.max_new_tokens,
                                        self.temperature]).encode()).hexdigest()[:10]  # fmt: skip

    def generate(self, block: dict, prompt: str, seed: int, sample: bool = True) -> str:
        import torch

        if self._model is None:
            self._model = load_model(self.model_dir, self.device)
        model, processor = self._model
        conversation = [{"role": "user", "content": [materialise(block), {"type": "text", "text": prompt}]}]
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")  # fmt: skip
        inputs.pop("media_metadata", None)
        inputs = inputs.to(model.device)
        torch.manual_seed(seed)
        options = dict(do_sample=True, temperature=self.temperature, top_p=0.95) if sample else dict(do_sample=False)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=self.max_new_tokens, **options)
        return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def caption(self, c: Candidate) -> dict:
        block = {"type": c.kind, **({"npy": c.media["npy"]} if "npy" in c.media else {"path": c.media["path"]})}
        noun = NOUNS[c.kind]
        base = int(hashlib.sha1(f"{self.seed}:{c.id}".encode()).hexdigest()[:8], 16)
        check = self.generate(block, CHECK_QUESTION.format(noun=noun), base, sample=False)
        attempts = []
        for t in range(self.tries):
            prompt = TEMPLATES["caption"][t % len(TEMPLATES["caption"])].format(noun=noun)
            draft = self.generate(block, prompt, base + 2 * t + 1)
            second = self.generate(block, prompt, base + 2 * t + 2)
            kept, reason = accept_caption(draft, second, check, c.modality, self.agreement)
            attempts.append({"draft": draft, "second": second, "kept": kept, "reason": reason})
            if kept:
                return {"caption": draft, "check": check, "attempts": attempts}
        return {"caption": None, "check": check, "attempts": attempts}


class CaptionStore:
    """captions.jsonl: one line per captioned medium, written and flushed as soon as it is done, so an interrupted
    run loses at most the medium in progress; a torn last line is ignored (and rewritten) on resume."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                self.records[record["key"]] = record
            if len(self.records) != len(lines):  # drop torn / duplicate lines
                self._rewrite()

    def _rewrite(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()))
        os.replace(tmp, self.path)

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_captioner(candidates: list[Candidate], captioner: Captioner | None, store: CaptionStore,
                  hashes: dict[str, str], progress: bool = True) -> tuple[list[Candidate], dict]:  # fmt: skip
    """Fill the answers of uncaptioned candidates: from the store when this medium (same bytes, same captioner
    settings) was done before, else by running the captioner. Returns the captioned candidates and counts."""
    from tqdm.auto import tqdm

    counts = collections.Counter()
    todo = [c for c in candidates if c.answer is None]
    done = [c for c in candidates if c.answer is not None]
    if todo and captioner is None:
        counts["needs_captioner"] = len(todo)
        return done, dict(counts)
    for c in tqdm(todo, desc="captioning", unit="medium", disable=not progress or not todo):
        key = f"{c.source}:{c.rel}:{hashes.get(c.id, '')[:16]}:{captioner.config_key}"
        record = store.records.get(key)
        if record is None:
            record = {"key": key, "id": c.id, "media": c.rel, "modality": c.modality, **captioner.caption(c)}
            store.add(record)
            counts["captioned_now"] += 1
        else:
            counts["captioned_before"] += 1
        if record["caption"] is None:
            counts["captions_rejected"] += 1
            continue
        c.answer = record["caption"]
        c.meta["caption_by"] = captioner.model_dir
        done.append(c)
    return done, dict(counts)


# ================================================================================================= rows
def _rng_for(seed: int, row_id: str) -> random.Random:
    return random.Random(f"{seed}:{row_id}")


def make_row(c: Candidate, media_path: str, seed: int) -> dict:
    if c.question is not None:
        prompt = c.question
    elif c.task == "positioning":
        prompt = _rng_for(seed, c.id).choice(TEMPLATES["positioning"]).format(question=c.meta["refer"])
    else:
        prompt = _rng_for(seed, c.id).choice(TEMPLATES[c.task]).format(noun=NOUNS[c.kind])
    meta = {k: v for k, v in c.meta.items() if k != "where"}
    return {
        "id": c.id,
        c.kind: media_path,
        "conversations": [{"from": "human", "value": f"<{c.kind}>\n{prompt}"}, {"from": "gpt", "value": c.answer}],
        "task": c.task,
        "modality": c.modality,
        "kind": c.kind,
        "source": c.source,
        "source_id": c.source_id,
        "answer": c.answer,
        **meta,
    }


def stage_view(rows: list[dict], stage: int, seed: int) -> list[dict]:
    """1: 2D captions and reports (alignment); 2: 2D instruction rows; 3: every 3D and video row plus a seeded
    replay of 2D instruction rows, as many as there are 3D + video rows (as train_trl's embedded default mixes)."""
    captions = [r for r in rows if r["kind"] == "image" and r["task"] in ("caption", "report")]
    instruct = [r for r in rows if r["kind"] == "image" and r["task"] not in ("caption", "report")]
    if stage == 1:
        return captions
    if stage == 2:
        return instruct
    other = [r for r in rows if r["kind"] != "image"]
    pick = sorted(random.Random(f"{seed}:stage3").sample(range(len(instruct)), min(len(instruct), len(other))))
    return other + [instruct[i] for i in pick]


# ================================================================================================= build
def build(sources: list[tuple[str, Path]], out: Path, max_per_source: int | None = None, seed: int = 0,
          stages=(1, 2, 3), captioner: Captioner | None = None, benchmarks: list[tuple[str, Path]] = (),
          processor: str | None = None, token_sample: int = 2000, dhash_distance: int = 8, qa_min_words: int = 0,
          min_correlation: float = 0.99, full_decode: bool = False,
          link: bool = True, progress: bool = True) -> dict:  # fmt: skip
    """Read every source, guard, subsample, caption, place media, write the JSONL files and the report.
    Returns the report dict (also written to report.json)."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in sources]
    if len(set(names)) != len(names):
        raise BuildError(f"a source is given twice: {names}")
    read = [(name, Path(data), *read_source(name, Path(data))) for name, data in sources]  # layout errors first

    guard = ContaminationGuard(dhash_distance, qa_min_words, min_correlation)
    test_dirs = [(n, Path(d)) for n, d in sources if n in BENCHMARKS] + [(n, Path(d)) for n, d in benchmarks]
    for name, data in test_dirs:
        if name not in BENCHMARKS:
            raise BuildError(f"--benchmark {name}: the evaluation harness knows {', '.join(BENCHMARKS)}")
        guard.add(name, data)

    store = CaptionStore(out / "captions.jsonl")
    rows, errors, removed, per_source, inspected, placed = [], [], [], {}, {}, {}
    for name, data, candidates, read_errors in read:
        stats = collections.Counter(read=len(candidates), errors=len(read_errors))
        errors += read_errors
        kept, seen, hashes = [], set(), {}
        for c in tqdm(candidates, desc=f"{name}: checking", unit="row", disable=not progress):
            if c.id in seen:
                stats["duplicates"] += 1
                continue
            seen.add(c.id)
            key = _media_key(c.media)
            if key not in inspected:  # many questions share an image: read each medium once
                try:
                    inspected[key] = inspect(c, full_decode)
                except (MediaError, ValueError, OSError) as error:
                    inspected[key] = error
            if isinstance(inspected[key], Exception):
                error = inspected[key]
                errors.append({"source": name, "where": c.meta.get("where", c.source_id), "id": c.id,
                               "reason": str(error)})  # fmt: skip
                stats["errors"] += 1
                continue
            sha, fp = inspected[key]
            hit = guard.check(c, sha, fp)
            if hit:
                removed.append({"source": name, "id": c.id, "source_id": c.source_id, "reason": hit[0],
                                "benchmark": hit[1], "question": c.question, "answer": c.answer})  # fmt: skip
                stats[f"removed_{hit[0]}"] += 1
                continue
            hashes[c.id] = next(iter(sorted(sha)), "")
            kept.append(c)
        if max_per_source is not None and len(kept) > max_per_source:
            rng = random.Random(f"{seed}:{name}")
            keep = set(rng.sample(range(len(kept)), max_per_source))
            stats["over_max_per_source"] = len(kept) - max_per_source
            kept = [c for i, c in enumerate(kept) if i in keep]
        kept, caption_counts = run_captioner(kept, captioner, store, hashes, progress)
        stats.update(caption_counts)
        for c in tqdm(kept, desc=f"{name}: writing", unit="row", disable=not progress):
            digest = hashes.get(c.id)
            try:  # one copy per content: M3D-VQA's volumes are M3D-Cap's, SLAKE / VQA-RAD copies, ...
                path = placed[digest] if digest in placed else place(c, out, link)
            except (MediaError, ValueError, OSError) as error:
                errors.append({"source": name, "where": c.meta.get("where", c.source_id), "id": c.id,
                               "reason": f"could not write the medium: {error}"})  # fmt: skip
                stats["errors"] += 1
                continue
            if digest:
                placed[digest] = path
            rows.append(make_row(c, path, seed))
        stats["rows"] = sum(r["source"] == name for r in rows)
        per_source[name] = dict(stats)
        logger.info("%s: %s", name, dict(stats))

    write_jsonl(out / "all.jsonl", rows)
    write_jsonl(out / "errors.jsonl", errors)
    write_jsonl(out / "removed.jsonl", removed)
    views = {}
    for stage in stages:
        view = stage_view(rows, stage, seed)
        write_jsonl(out / f"stage{stage}.jsonl", view)
        views[stage] = len(view)
    report = statistics(rows, per_source, guard, views, errors)
    if processor:
        report["tokens"] = token_lengths(out / "all.jsonl", out, processor, token_sample, seed)
    write_report(report, out)
    return report


# ================================================================================================= statistics
def statistics(rows: list[dict], per_source: dict, guard: ContaminationGuard, views: dict, errors: list) -> dict:
    grid = {m: {t: 0 for t in TASKS} for m in MODALITIES}
    for r in rows:
        grid[r["modality"]][r["task"]] += 1
    return {
        "rows": len(rows),
        "per_source": per_source,
        "modality_x_task": grid,
        "per_modality": {m: sum(v.values()) for m, v in grid.items()},
        "per_task": {t: sum(grid[m][t] for m in MODALITIES) for t in TASKS},
        "per_kind": {k: sum(r["kind"] == k for r in rows) for k in KINDS},
        "stage_views": {f"stage{k}": v for k, v in views.items()},
        "guard": {"benchmarks": guard.coverage, "not_available": [b for b in BENCHMARKS if b not in guard.coverage
                                                                   or "error" in guard.coverage[b]]},  # fmt: skip
        "error_examples": errors[:10],
    }


def token_lengths(jsonl: Path, data_root: Path, processor_dir: str, sample: int, seed: int) -> dict:
    """Sequence length per row as training sees it: train_trl's row reader and collator with the model's processor
    (chat template, media loaded, visual placeholders expanded after pruning). A seeded sample of `sample` rows."""
    if not Path(jsonl).read_text().strip():
        return {"processor": str(processor_dir), "all": {}, "by_kind": {}, "histogram": {}, "lengths": []}
    rows = load_rows([jsonl], data_root=data_root, skip_bad_rows=True)
    if len(rows) > sample:
        rows = [rows[i] for i in sorted(random.Random(f"{seed}:tokens").sample(range(len(rows)), sample))]
    processor = load_processor(processor_dir)
    collate = OmniVMedCollator(processor)
    lengths, by_kind = [], collections.defaultdict(list)
    for row in rows:
        try:
            n = int(collate([row])["input_ids"].shape[1])
        except RuntimeError as error:
            logger.warning("token count skipped: %s", error)
            continue
        lengths.append(n)
        by_kind[json.loads(row["meta"]).get("kind", "?")].append(n)

    def summary(values):
        if not values:
            return {}
        v = np.asarray(values)
        return {"n": len(v), "min": int(v.min()), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
                "max": int(v.max()), "mean": float(v.mean())}  # fmt: skip

    edges = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 10**9]
    hist = {f"{a}-{b - 1}" if b < 10**9 else f">={a}": int(sum(a <= x < b for x in lengths))
            for a, b in zip(edges, edges[1:])}  # fmt: skip
    return {"processor": str(processor_dir), "all": summary(lengths), "by_kind": {k: summary(v) for k, v in
                                                                                  sorted(by_kind.items())},
            "histogram": hist, "lengths": lengths}  # fmt: skip


def markdown_report(report: dict) -> str:
    lines = [f"# OmniV-Med-Instruct build: {report['rows']} rows", "", "## Per source", "",
             "| source | read | rows | errors | removed (image / near-dup / q+a) | duplicates | over max | "
             "captions rejected | need --captioner |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in report["per_source"].items():
        removed = " / ".join(str(s.get(f"removed_{k}", 0)) for k in ("image-hash", "image-near-duplicate",
                                                                      "question-answer"))  # fmt: skip
        lines.append(f"| {name} | {s.get('read', 0)} | {s.get('rows', 0)} | {s.get('errors', 0)} | {removed} | "
                     f"{s.get('duplicates', 0)} | {s.get('over_max_per_source', 0)} | "
                     f"{s.get('captions_rejected', 0)} | {s.get('needs_captioner', 0)} |")  # fmt: skip
    lines += ["", "## Modality x task", "", "| modality | " + " | ".join(TASKS) + " | total |",
              "|---|" + "---|" * (len(TASKS) + 1)]  # fmt: skip
    for m, row in report["modality_x_task"].items():
        lines.append(f"| {m} | " + " | ".join(str(row[t]) for t in TASKS) + f" | {sum(row.values())} |")
    lines.append("| total | " + " | ".join(str(report["per_task"][t]) for t in TASKS) + f" | {report['rows']} |")
    lines += ["", "## Media kinds", "", "| kind | rows |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["per_kind"].items()]
    lines += ["", "## Stage views", ""] + [f"- {k}.jsonl: {v} rows" for k, v in report["stage_views"].items()]
    lines += ["", "## Contamination guard", ""]
    for name, cov in report["guard"]["benchmarks"].items():
        lines.append(f"- {name}: " + (f"NOT indexed ({cov['error']})" if "error" in cov else
                                      f"{cov['questions']} test questions, {cov['media']} media indexed"))  # fmt: skip
    if report["guard"]["not_available"]:
        lines.append(f"- not checked (no test split given; --benchmark NAME=DIR): "
                     f"{', '.join(report['guard']['not_available'])}")  # fmt: skip
    tokens = report.get("tokens")
    lines += ["", "## Token lengths", ""]
    if tokens and tokens.get("all"):
        a = tokens["all"]
        lines += [f"Processor {tokens['processor']}, {a['n']} rows: min {a['min']}, median {a['median']:.0f}, "
                  f"p95 {a['p95']:.0f}, max {a['max']}.", "", "| kind | n | median | p95 | max |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v['n']} | {v['median']:.0f} | {v['p95']:.0f} | {v['max']} |"
                  for k, v in tokens["by_kind"].items()]  # fmt: skip
        lines += ["", "| tokens | rows |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in tokens["histogram"].items() if v]
    else:
        lines.append("Not computed (pass --processor MODEL_DIR).")
    if report["error_examples"]:
        lines += ["", "## Errors (first 10; all in errors.jsonl)", ""]
        for e in report["error_examples"]:
            same = e["reason"].startswith(str(e["where"]))
            lines.append(f"- {e['source']}: " + (e["reason"] if same else f"{e['where']}: {e['reason']}"))
    lines += ["", "![statistics](report.png)"]
    return "\n".join(lines) + "\n"


# 11 distinguishable colours (one per task) for the stacked modality x task panel
PALETTE = ["#3b7dd8", "#e4572e", "#29a35a", "#f2a541", "#8e5bd3", "#17becf", "#d62790", "#7f7f7f", "#bcbd22",
           "#8c564b", "#1f3f77"]  # fmt: skip


def bar_chart(panels: list[tuple[str, dict]], path: Path) -> None:
    """Horizontal bar charts, one panel per (title, {label: count}) or, stacked, (title, {label: {part: count}});
    matplotlib when installed, else Pillow."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    stacked = [{k: (v if isinstance(v, dict) else {"": v}) for k, v in counts.items()} for _, counts in panels]
    parts = [list(dict.fromkeys(p for bars in s.values() for p in bars)) for s in stacked]
    colour = [{p: PALETTE[i % len(PALETTE)] for i, p in enumerate(ps)} for ps in parts]
    if plt is not None:
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2 + 0.3 * sum(len(s) for s in stacked)))
        for ax, (title, _), bars, ps, cs in zip(np.atleast_1d(axes), panels, stacked, parts, colour):
            labels = list(bars)[::-1]
            left = np.zeros(len(labels))
            for p in ps:
                values = np.array([bars[k].get(p, 0) for k in labels], dtype=float)
                ax.barh(labels, values, left=left, color=cs[p], label=p or None)
                left += values
            ax.set_title(title, fontsize=10)
            ax.tick_params(labelsize=8)
            if len(ps) > 1:
                ax.legend(fontsize=7, ncol=4, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    from PIL import Image, ImageColor, ImageDraw

    row_h, label_w, bar_w, pad = 18, 190, 420, 10
    legend_rows = [(len(ps) + 2) // 3 if len(ps) > 1 else 0 for ps in parts]
    height = sum(28 + row_h * (len(s) + n) + pad for s, n in zip(stacked, legend_rows)) + pad
    image = Image.new("RGB", (label_w + bar_w + 80, height), "white")
    draw = ImageDraw.Draw(image)
    y = pad
    for (title, _), bars, ps, cs, n_legend in zip(panels, stacked, parts, colour, legend_rows):
        draw.text((pad, y), title, fill="black")
        y += 24
        top = max((sum(b.values()) for b in bars.values()), default=0) or 1
        for label, counts in bars.items():
            draw.text((pad, y + 3), str(label)[:30], fill="black")
            x = label_w
            for p in ps:
                width = round(bar_w * counts.get(p, 0) / top)
                if width:
                    draw.rectangle([x, y + 2, x + width - 1, y + row_h - 3], fill=ImageColor.getrgb(cs[p]))
                x += width
            draw.text((x + 6, y + 3), str(sum(counts.values())), fill="black")
            y += row_h
        for i, p in enumerate(ps if n_legend else []):  # legend: three entries a line
            lx, ly = label_w + (i % 3) * 150, y + (i // 3) * row_h
            draw.rectangle([lx, ly + 4, lx + 10, ly + 14], fill=ImageColor.getrgb(cs[p]))
            draw.text((lx + 14, ly + 3), p, fill="black")
        y += n_legend * row_h + pad
    image.save(path)


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    panels = [("rows per source", {k: v.get("rows", 0) for k, v in report["per_source"].items()}),
              ("rows per modality, by task", report["modality_x_task"]),  # every task: fixed colours
              ("rows per task", report["per_task"]),
              ("rows per media kind", report["per_kind"])]  # fmt: skip
    if report.get("tokens", {}).get("histogram"):
        panels.append(("rows per token length", report["tokens"]["histogram"]))
    bar_chart(panels, out / "report.png")


# ================================================================================================= CLI
def _pair(text: str, flag: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{flag} takes NAME=DIR, got {text!r}")
    return name.strip().lower(), Path(path).expanduser()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--source", action="append", default=[], type=lambda t: _pair(t, "--source"),
                        metavar="NAME=DIR", help=f"a source and its folder; NAME one of {', '.join(SOURCES)}")
    parser.add_argument("--out", required=True, help="output folder (the data root for train_trl.py)")
    parser.add_argument("--max-per-source", type=int, default=None, help="keep at most N rows per source (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", action="append", type=int, choices=(1, 2, 3), default=None,
                        help="stage view(s) to write (repeatable; default 1, 2 and 3)")
    parser.add_argument("--captioner", default=None, metavar="MODEL_DIR",
                        help="image-text-to-text model drafting captions for the uncaptioned source")
    parser.add_argument("--caption-tries", type=int, default=3)
    parser.add_argument("--caption-agreement", type=float, default=0.5, help="min token F1 between two drafts")
    parser.add_argument("--benchmark", action="append", default=[], type=lambda t: _pair(t, "--benchmark"),
                        metavar="NAME=DIR", help="a benchmark's folder whose test split the guard should also index")
    parser.add_argument("--processor", default=None, metavar="MODEL_DIR", help="count token lengths with it")
    parser.add_argument("--token-sample", type=int, default=2000, help="rows sampled for token lengths")
    parser.add_argument("--dhash-distance", type=int, default=8, help="near-duplicate radius in bits (-1: off)")
    parser.add_argument("--min-correlation", type=float, default=0.99,
                        help="near-duplicate confirmation: thumbnail correlation at least this")
    parser.add_argument("--qa-min-words", type=int, default=0,
                        help="question+answer pairs shorter than this are not used by the guard (0: all are)")
    parser.add_argument("--copy", action="store_true", help="copy media instead of hard-linking them")
    parser.add_argument("--full-decode", action="store_true",
                        help="check 2D images with the training reader at full size (slow) instead of Pillow drafts")
    parser.add_argument("--device", default="auto", help="captioner device")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.source:
        parser.error("give at least one --source NAME=DIR")
    captioner = None
    if args.captioner:
        captioner = Captioner(args.captioner, args.seed, args.caption_tries, args.caption_agreement,
                              device=args.device)  # fmt: skip
    try:
        report = build(args.source, Path(args.out), args.max_per_source, args.seed, tuple(args.stage or (1, 2, 3)),
                       captioner, args.benchmark, args.processor, args.token_sample, args.dhash_distance,
                       args.qa_min_words, args.min_correlation, args.full_decode, link=not args.copy)  # fmt: skip
    except BuildError as error:
        parser.exit(2, f"error: {error}\n")
    sys.stdout.write(markdown_report(report))
    return 0


if __name__ == "__main__":
    main()
