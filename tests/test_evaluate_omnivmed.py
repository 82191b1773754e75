"""evaluate_omnivmed.py: metric definitions against hand-computed values, every benchmark's loader on a fixture in its
published layout, the tiny model run through each, and clear errors for wrong or missing files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate_omnivmed as ev
import omnivmed_benchmarks


ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------- metrics
def test_open_recall_clean_and_llava_med_compatible():
    precision, recall, f1 = ev.token_overlap("left left left", "left lung")
    assert (precision, recall) == (pytest.approx(1 / 3), 0.5) and f1 == pytest.approx(0.4)
    assert ev.llava_med_recall("left left left", "left lung") == 0.75  # repeated words count: its quirk
    assert ev.token_overlap("the right kidney", "Right kidney.")[1] == 1.0
    assert ev.token_overlap("", "kidney") == (0.0, 0.0, 0.0)


def test_closed_accuracy_clean_vs_llava_med_where_its_quirks_bite():
    def sample(answer, answer_type="CLOSED"):
        return ev.Sample(id=answer, media=[], question="?", answer=answer, meta={"answer_type": answer_type})

    samples = [sample("yes"), sample("no"), sample("yes"), sample("left"), sample("right lung", "OPEN")]
    predictions = ["Yes, it is", "normal", "I cannot tell", "left", "the right lung is abnormal"]
    m = ev.vqa_2d_metrics(samples, predictions)
    # clean: "yes, it is" and "left" are right; "normal" is not "no"; "I cannot tell" is wrong: 2 / 4
    assert m["closed_accuracy"] == 0.5 and m["n_closed"] == 4 and m["n_open"] == 1
    # LLaVA-Med: "normal" contains "no" (hit), "cannot" contains "no" (counted, miss), "left" has neither yes nor no
    # (dropped from the denominator): 2 / 3
    assert m["llava_med_compatible"]["closed_accuracy"] == pytest.approx(2 / 3)
    assert m["llava_med_compatible"]["closed_counted"] == 3
    assert m["open_recall"] == 1.0 and m["open_exact_match"] == 0.0
    assert m["open_token_f1"] == pytest.approx(2 * (2 / 4) / (2 / 4 + 1))


def test_classification_metrics_clean_and_surgicalgpt_compatible():
    from sklearn.metrics import precision_recall_fscore_support

    gold = ["grasping", "grasping", "cutting", "suction"]
    pred = ["Grasping.", "cutting", "cutting", "the tool is grasping the tissue"]
    m = ev.classification_metrics(gold, pred, ["grasping", "cutting", "suction", "idle"])
    assert m["accuracy"] == 0.5 and m["invalid_rate"] == 0.25 and m["n_classes"] == 4
    # per reference class: grasping P 1 R .5, cutting P .5 R 1, suction P 0 (never predicted) R 0
    assert m["macro_precision"] == pytest.approx(0.5) and m["macro_recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["per_class_recall"] == {"cutting": 1.0, "grasping": 0.5, "suction": 0.0}
    mapped = ["grasping", "cutting", "cutting", ev.INVALID]
    p, r, f, _ = precision_recall_fscore_support(gold, mapped, average="macro", zero_division=1)
    compat = m["surgicalgpt_compatible"]
    assert (compat["macro_precision"], compat["macro_recall"], compat["macro_f1"]) == pytest.approx((p, r, f))
    assert compat["macro_precision"] != m["macro_precision"]  # zero_division=1 over predicted labels too


def test_multiple_choice_parsing_and_m3d_rule():
    choices = {"A": "liver", "B": "kidney", "C": "spleen", "D": "lung"}
    cases = [("B", "B"), ("B. kidney", "B"), ("(C) spleen", "C"), ("Answer: D", "D"), ("The answer is A.", "A"),
             ("kidney", "B"), ("A lesion is seen", None), ("", None)]
    for text, letter in cases:
        assert ev.parse_choice(text, choices) == letter, text
    samples = [
        ev.Sample("0", [], "q", "B. kidney", {"answer_type": "CLOSED", "choices": choices, "answer_choice": "B",
                                              "question_type": "organ"}),
        ev.Sample("1", [], "q", "A. liver", {"answer_type": "CLOSED", "choices": choices, "answer_choice": "A",
                                             "question_type": "organ"}),
        ev.Sample("2", [], "q", "C. spleen", {"answer_type": "CLOSED", "choices": choices, "answer_choice": "C",
                                              "question_type": "plane"}),
        ev.Sample("3", [], "q", "a small lesion in the liver", {"answer_type": "OPEN", "question_type": "abnormality"}),
    ]  # fmt: skip
    predictions = ["kidney", "liver or kidney (A.)", "C. spleen", "a small lesion in the liver"]
    m = ev.m3d_metrics(samples, predictions)
    # clean: "kidney" is the text of choice B (right), "liver or kidney (A.)" picks no single choice, "C. spleen" right
    assert m["closed_accuracy"] == pytest.approx(2 / 3)
    assert m["closed_accuracy_by_question_type"] == {"organ": 0.5, "plane": 1.0}
    # M3D's rule needs "X." somewhere: "kidney" fails, "liver or kidney (A.)" passes
    assert m["m3d_compatible"]["closed_accuracy"] == pytest.approx(2 / 3)
    assert m["open"]["bleu1"] == pytest.approx(1.0) and m["open"]["rouge1"] == pytest.approx(1.0)
    assert m["open"]["bertscore"].startswith("not computed")
    assert isinstance(m["open"]["meteor"], float) or m["open"]["meteor"].startswith("unavailable")


def test_text_metrics_hand_computed():
    out = ev.text_generation_metrics(["the liver is enlarged"], ["the liver is normal in size"])
    # BLEU-1: 3 of 4 unigrams match, brevity penalty exp(1 - 6/4)
    assert out["bleu1"] == pytest.approx(0.75 * np.exp(1 - 6 / 4), abs=1e-4)
    # ROUGE-1 F: overlap 3, P 3/4, R 3/6
    assert out["rouge1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)


def test_meteor_with_debian_wordnet_laid_out_for_nltk(tmp_path, monkeypatch):
    nltk = pytest.importorskip("nltk")
    code = "import evaluate_omnivmed as ev; print(ev.meteor(['a b'], ['a b']))"
    empty = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NLTK_DATA": str(tmp_path / "none")})
    assert empty.stdout.startswith("unavailable: nltk's WordNet corpus not found"), empty.stderr[-2000:]
    if not (ev.DEBIAN_WORDNET.is_dir() and ev.DEBIAN_LEXNAMES.is_file()):
        pytest.skip("Debian's WordNet is not installed (apt-get install wordnet-base wordnet-sense-index)")
    corpus = ev.setup_wordnet(tmp_path)
    assert (corpus / "lexnames").read_text().splitlines()[44] == "44\tadj.ppl\t3"
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)] + list(nltk.data.path))
    # identical 4-word answers: F-mean 1, one chunk of 4 matches -> penalty 0.5 * (1/4)**3
    assert ev.meteor(["the liver is normal"], ["the liver is normal"]) == pytest.approx(1 - 0.5 / 64)
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score

    tokens = {"enlarged liver, no lesion": ["enlarged", "liver", ",", "no", "lesion"],
              "the liver is large, with no lesion.": ["the", "liver", "is", "large", ",", "with", "no", "lesion", "."]}
    assert {t: nltk.word_tokenize(t, preserve_line=True) for t in tokens} == tokens
    expected = meteor_score([tokens["the liver is large, with no lesion."]], tokens["enlarged liver, no lesion"],
                            wordnet=wordnet)  # fmt: skip
    assert ev.meteor(["enlarged liver, no lesion"], ["the liver is large, with no lesion."]) == pytest.approx(expected)


class _NoSynonyms:
    """A WordNet stand-in without synonyms, so METEOR's exact and stem stages are compared without the corpus."""

    def synsets(self, *args, **kwargs):
        return []


# (text, its sentences as the English Punkt model splits them)
PUNCTUATED = [
    ("A small lesion, in the liver.", ["A small lesion, in the liver."]),
    ("Hypodense mass (3.5 cm), right lobe; no ascites", ["Hypodense mass (3.5 cm), right lobe; no ascites"]),
    ("The liver is enlarged. No lesion, 3.5 cm in size.", ["The liver is enlarged.", "No lesion, 3.5 cm in size."]),
    ('Is it "normal"? Yes. The spleen doesn\'t show it.', ['Is it "normal"?', "Yes.", "The spleen doesn't show it."]),
    ("Mass in the right lobe, i.e. segment 4.", ["Mass in the right lobe, i.e. segment 4."]),
    ("Kidney, spleen, and liver: all normal!", ["Kidney, spleen, and liver: all normal!"]),
]


@pytest.mark.parametrize("text,sentences", PUNCTUATED)
def test_word_tokenize_gives_nltk_word_tokenize_tokens(text, sentences):
    nltk = pytest.importorskip("nltk")
    # nltk.word_tokenize = NLTKWordTokenizer on each Punkt sentence (preserve_line=True skips only the Punkt step)
    expected = [token for sentence in sentences for token in nltk.word_tokenize(sentence, preserve_line=True)]
    assert ev.word_tokenize(text) == expected
    assert "," not in text or "," in expected  # punctuation is split off, unlike str.split


def test_meteor_scores_punctuated_answers_as_the_published_scorer():
    nltk = pytest.importorskip("nltk")
    from nltk.translate.meteor_score import meteor_score

    predictions = ["A small lesion in the liver", "kidney, spleen and liver", "The liver is enlarged. No lesion."]
    references = ["a small lesion, in the liver.", "Kidney, spleen, and liver.", "The liver is enlarged. No lesion."]
    sentences = {  # the English Punkt split of each text
        "The liver is enlarged. No lesion.": ["The liver is enlarged.", "No lesion."],
    }

    def published(text):
        parts = sentences.get(text, [text])
        return [t for part in parts for t in nltk.word_tokenize(part, preserve_line=True)]

    stub = _NoSynonyms()
    expected = np.mean([meteor_score([published(r)], published(p), wordnet=stub)
                        for p, r in zip(predictions, references)])  # fmt: skip
    assert ev.meteor(predictions, references, wordnet=stub) == pytest.approx(expected, abs=1e-12)
    whitespace = np.mean([meteor_score([r.split()], p.split(), wordnet=stub) for p, r in zip(predictions, references)])
    assert abs(expected - whitespace) > 0.05  # the commas and periods change the score


# ------------------------------------------------------------------------------------------------------- fixtures
def _png(path: Path, seed: int = 0, size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _png_bytes(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _hf_parquet(path: Path, rows: list[tuple[str, str]]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "image": [{"bytes": _png_bytes(i), "path": f"{i}.png"} for i in range(len(rows))],
        "question": [q for q, _ in rows],
        "answer": [a for _, a in rows],
    })  # fmt: skip
    pq.write_table(table, path)


def make_vqa_rad_osf(root: Path) -> Path:
    records = [
        dict(qid=1, image_name="synpic1.jpg", question="Is there a pneumothorax?", answer="No", answer_type="CLOSED",
             phrase_type="test_freeform", question_type="PRES"),
        dict(qid=2, image_name="synpic1.jpg", question="Which lung is affected?", answer="Left lung",
             answer_type="OPEN", phrase_type="test_para", question_type="POS"),
        dict(qid=3, image_name="synpic2.jpg", question="Is this a CT?", answer="yes", answer_type="CLOSED",
             phrase_type="freeform", question_type="MODALITY"),
    ]  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    _png(root / "VQA_RAD Image Folder" / "synpic1.jpg")
    _png(root / "VQA_RAD Image Folder" / "synpic2.jpg", 1)
    return root


def make_slake(root: Path) -> Path:
    records = [
        dict(img_id=1, img_name="xmlab1/source.jpg", question="Is the lung healthy?", answer="No", q_lang="en",
             answer_type="CLOSED", modality="X-Ray", content_type="Abnormality", qid=11),
        dict(img_id=1, img_name="xmlab1/source.jpg", question="肺部健康吗?", answer="不", q_lang="zh",
             answer_type="CLOSED", modality="X-Ray", content_type="Abnormality", qid=12),
        dict(img_id=2, img_name="xmlab2/source.jpg", question="Which organ is abnormal?", answer="Liver",
             q_lang="en", answer_type="OPEN", modality="CT", content_type="Organ", qid=13),
    ]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "test.json").write_text(json.dumps(records, ensure_ascii=False))
    _png(root / "imgs" / "xmlab1" / "source.jpg")
    _png(root / "imgs" / "xmlab2" / "source.jpg", 2)
    return root


def make_m3d(root: Path) -> Path:
    import csv

    root.mkdir(parents=True, exist_ok=True)
    volume = root / "M3D_Cap_npy" / "ct_case" / "000001" / "Axial.npy"
    volume.parent.mkdir(parents=True)
    np.save(volume, np.random.default_rng(0).random((1, 6, 56, 56), dtype=np.float32))
    with (root / "M3D_VQA_test.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(omnivmed_benchmarks.M3D_COLUMNS))
        writer.writerow(["M3D_Cap_npy/ct_case/000001/Axial.npy", "Which organ shows the lesion?", "Liver", "Kidney",
                         "Spleen", "Lung", "Liver", "A", "3"])  # fmt: skip
        writer.writerow(["M3D_Cap_npy/ct_case/000001/Axial.npy", "In which plane is the image?", "Axial", "Coronal",
                         "Sagittal", "Oblique", "Axial", "A", "1"])  # fmt: skip
    return root


def make_cholec80(root: Path) -> Path:
    for seq, frames in (("5", ("100", "150")), ("1", ("100",))):
        for frame in frames:
            qa = root / "Classification" / seq / f"{frame}_QA.txt"
            qa.parent.mkdir(parents=True, exist_ok=True)
            qa.write_text("What is the phase?|calot triangle dissection\nIs grasper used in calot triangle "
                          f"dissection?|{'yes' if seq == '5' else 'no'}\n")  # fmt: skip
            _png(root / "cropped_image" / seq / f"{frame}.png")
    return root


def make_endovis18(root: Path) -> Path:
    for seq in ("1", "2"):
        qa = root / f"seq_{seq}" / "vqa" / "Classification" / "frame000_QA.txt"
        qa.parent.mkdir(parents=True)
        where = "left-top" if seq == "1" else "right-top"
        qa.write_text("What organ is being operated?|kidney\nWhat is the state of bipolar_forceps?|Grasping\n"
                      f"Where is monopolar_curved_scissors located?|{where}\n")
        _png(root / f"seq_{seq}" / "left_frames" / "frame000.png")
    return root


def make_psi_ava(root: Path) -> Path:
    for part, answer in (("Train", "top left"), ("Val", "bottom right")):
        (root / part).mkdir(parents=True)
        (root / part / "C1_location.txt").write_text(f"CASE001/00001.jpg|Where is the grasper?|{answer}\n")
        (root / part / "C3_phase.txt").write_text("CASE001/00001.jpg|What is the phase?|Espacio_de_Retzius\n")
    _png(root / "keyframes" / "CASE001" / "00001.jpg")
    return root


def make_mini(root: Path) -> Path:
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    _png(root / "images" / "a.png")
    volume = np.zeros((20, 24, 6), dtype=np.float32)
    volume[4:10, 6:12, 2:4] = 1.0
    (root / "volumes").mkdir()
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0])), root / "volumes" / "v.nii.gz")
    rows = [
        {"image": "images/a.png", "task": "lesion", "kind": "image",
         "conversations": [{"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "no"}]},
        {"volume": "volumes/v.nii.gz", "conversations": [{"from": "human", "value": "<volume>\nWhich side?"},
                                                          {"from": "gpt", "value": "left"}], "task": "side",
         "kind": "volume"},
        {"messages": [{"role": "user", "content": [{"type": "volume", "path": "volumes/v.nii.gz",
                                                    "slice_axis": "coronal"},
                                                   {"type": "text", "text": "What modality is this?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "MR"}]}],
         "task": "modality", "kind": "volume", "answer": "MR"},
    ]  # fmt: skip
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ------------------------------------------------------------------------------------------------------- loaders
def test_loaders_read_each_published_layout(tmp_path):
    samples, _ = ev.load_benchmark("vqa-rad", make_vqa_rad_osf(tmp_path / "rad"))
    assert [s.answer for s in samples] == ["No", "Left lung"]  # test_* phrase types only
    assert [s.meta["answer_type"] for s in samples] == ["CLOSED", "OPEN"]
    assert len(ev.load_benchmark("vqa-rad", tmp_path / "rad", split="train")[0]) == 1

    _hf_parquet(tmp_path / "radhf" / "data" / "test-00000-of-00001.parquet", [("is it normal?", "yes"),
                                                                               ("what organ?", "lung")])  # fmt: skip
    samples, _ = ev.load_benchmark("vqa-rad", tmp_path / "radhf")
    assert [s.meta["answer_type"] for s in samples] == ["CLOSED", "OPEN"] and "bytes" in samples[0].media[0]

    samples, _ = ev.load_benchmark("slake", make_slake(tmp_path / "slake"))
    assert [s.answer for s in samples] == ["No", "Liver"]
    assert len(ev.load_benchmark("slake", tmp_path / "slake", all_languages=True)[0]) == 3

    (tmp_path / "pvqa").mkdir()
    (tmp_path / "pvqa" / "test.csv").write_text("image,question,answer\ntest_0001,is this necrosis?,yes\n")
    _png(tmp_path / "pvqa" / "images" / "test" / "test_0001.jpg")
    samples, _ = ev.load_benchmark("pathvqa", tmp_path / "pvqa")
    assert samples[0].media[0]["path"].endswith("test_0001.jpg") and samples[0].meta["answer_type"] == "CLOSED"

    samples, _ = ev.load_benchmark("m3d-vqa", make_m3d(tmp_path / "m3d"))
    assert [s.id for s in samples] == ["0-closed", "0-open", "1-closed", "1-open"]
    assert samples[0].question.endswith("Choices: A. Liver B. Kidney C. Spleen D. Lung")
    assert samples[0].meta["question_type"] == "organ" and samples[0].answer == "A. Liver"

    samples, classes = ev.load_benchmark("cholec80-vqa", make_cholec80(tmp_path / "cholec"))
    assert len(samples) == 4 and {s.meta["sequence"] for s in samples} == {"5"}  # sequence 5 is a test sequence
    assert classes == ["calot triangle dissection", "no", "yes"]  # the answer set spans every sequence found
    assert len(ev.load_benchmark("cholec80-vqa", tmp_path / "cholec", frame_stride=100)[0]) == 2

    samples, classes = ev.load_benchmark("endovis18-vqa", make_endovis18(tmp_path / "endo"))
    assert len(samples) == 3 and samples[0].media[0]["path"].endswith("seq_1/left_frames/frame000.png")
    assert "right-top" in classes  # from the training sequence

    samples, classes = ev.load_benchmark("psi-ava-vqa", make_psi_ava(tmp_path / "psi"))
    assert [s.answer for s in samples] == ["bottom right", "Espacio_de_Retzius"]  # Val
    assert classes == ["Espacio_de_Retzius", "bottom right", "top left"]

    samples, _ = ev.load_benchmark("omnivmed-mini", make_mini(tmp_path / "mini"))
    assert [(s.meta["task"], s.meta["modality"]) for s in samples] == [("lesion", "image"), ("side", "volume"),
                                                                        ("modality", "volume")]  # fmt: skip
    assert samples[0].question == "Is there a lesion?" and samples[2].media[0]["slice_axis"] == "coronal"


def test_wrong_or_missing_files_name_what_was_expected(tmp_path):
    with pytest.raises(ev.DataError, match="VQA_RAD Dataset Public.json"):
        ev.load_benchmark("vqa-rad", tmp_path)
    with pytest.raises(ev.DataError, match="test.json"):
        ev.load_benchmark("slake", tmp_path)
    (tmp_path / "qas" / "test").mkdir(parents=True)
    (tmp_path / "qas" / "test" / "test_qa.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(ev.DataError, match="pickle loads are refused"):
        ev.load_benchmark("pathvqa", tmp_path)
    with pytest.raises(ev.DataError, match="M3D_VQA_test.csv"):
        ev.load_benchmark("m3d-vqa", tmp_path)
    with pytest.raises(ev.DataError, match=r"Classification/<seq>/\*_QA.txt"):
        ev.load_benchmark("cholec80-vqa", tmp_path)
    with pytest.raises(ev.DataError, match="seq_<N>"):
        ev.load_benchmark("endovis18-vqa", tmp_path)
    with pytest.raises(ev.DataError, match="Val/C1_location.txt"):
        ev.load_benchmark("psi-ava-vqa", tmp_path)
    with pytest.raises(ev.DataError, match="eval.jsonl"):
        ev.load_benchmark("omnivmed-mini", tmp_path)
    with pytest.raises(ev.DataError, match="does not exist"):
        ev.load_benchmark("slake", tmp_path / "nowhere")

    slake = make_slake(tmp_path / "slake")
    (slake / "imgs" / "xmlab2" / "source.jpg").unlink()
    with pytest.raises(ev.DataError, match=r"1 slake media file\(s\) missing.*xmlab2/source.jpg"):
        ev.load_benchmark("slake", slake)
    (slake / "test.json").write_text(json.dumps([{"img_name": "x.jpg", "question": "q"}]))
    with pytest.raises(ev.DataError, match=r"lacks \['answer', 'answer_type'\]"):
        ev.load_benchmark("slake", slake)
    m3d = make_m3d(tmp_path / "m3d")
    (m3d / "M3D_VQA_test.csv").write_text("Image Path,Question\nx.npy,q\n")
    with pytest.raises(ev.DataError, match=r"columns \['Choice A'"):
        ev.load_benchmark("m3d-vqa", m3d)
    endo = make_endovis18(tmp_path / "endo")
    (endo / "seq_1" / "vqa" / "Classification" / "frame000_QA.txt").write_text("no separator here\n")
    with pytest.raises(ev.DataError, match="expected 'question|answer'"):
        ev.load_benchmark("endovis18-vqa", endo)
    mini = tmp_path / "mini"
    mini.mkdir()
    (mini / "eval.jsonl").write_text(json.dumps({"image": "../escape.png", "conversations": [], "task": "t"}) + "\n")
    with pytest.raises(ev.DataError, match="leaves the data folder"):
        ev.load_benchmark("omnivmed-mini", mini)


def test_loaders_collect_record_errors_when_given_a_list(tmp_path):
    """build_instruct_omnivmed.py reads the training splits through these loaders and passes a list: a bad record
    is reported there and skipped, the rest is read; without the list evaluation still stops at it."""
    endo = make_endovis18(tmp_path / "endo")
    qa = endo / "seq_1" / "vqa" / "Classification" / "frame000_QA.txt"
    qa.write_text(qa.read_text() + "no separator here\n")
    errors = []
    samples, _ = ev.load_endovis18_vqa(endo, "test", errors=errors)
    assert len(samples) == 3 and len(errors) == 1 and "frame000_QA.txt:4: expected 'question|answer'" in errors[0]
    with pytest.raises(ev.DataError, match="expected 'question|answer'"):
        ev.load_endovis18_vqa(endo, "test")
    slake = make_slake(tmp_path / "slake")
    records = json.loads((slake / "test.json").read_text()) + [{"img_name": "x.jpg", "question": "q"}]
    (slake / "test.json").write_text(json.dumps(records))
    errors = []
    assert len(ev.load_slake(slake, "test", errors=errors)) == 2 and "lacks ['answer', 'answer_type']" in errors[0]
    m3d = make_m3d(tmp_path / "m3d")
    (m3d / "M3D_Cap_npy" / "ct_case" / "000001" / "Axial.npy").unlink()
    assert len(ev.load_m3d_vqa(m3d, "test", errors=[])) == 4  # the builder checks each medium itself
    with pytest.raises(ev.DataError, match="is missing"):
        ev.load_m3d_vqa(m3d, "test")


# ------------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from build_omnivmed import build_tiny

    return build_tiny(tmp_path_factory.mktemp("evaltiny") / "omnivmed-tiny", seed=0)


@pytest.mark.parametrize(
    "benchmark, make",
    [
        ("vqa-rad", make_vqa_rad_osf),
        ("slake", make_slake),
        ("m3d-vqa", make_m3d),
        ("cholec80-vqa", make_cholec80),
        ("endovis18-vqa", make_endovis18),
        ("psi-ava-vqa", make_psi_ava),
        ("omnivmed-mini", make_mini),
    ],
)
def test_tiny_model_runs_through_each_benchmark(benchmark, make, tiny_model_dir, tmp_path):
    data = make(tmp_path / "data")
    out = tmp_path / "results.json"
    result = ev.evaluate(str(tiny_model_dir), benchmark, data, limit=3, batch_size=2, max_new_tokens=3, out=out,
                         progress=False)  # fmt: skip
    assert result["n"] == min(3, len(ev.load_benchmark(benchmark, data)[0]))
    assert len(result["predictions"]) == result["n"]
    assert all(isinstance(p["prediction"], str) for p in result["predictions"])
    saved = json.loads(out.read_text())
    assert saved["metrics"] == json.loads(json.dumps(result["metrics"]))
    table = out.with_suffix(".md").read_text()
    assert table.startswith(f"### {benchmark}") and "| metric | value |" in table
    if benchmark == "omnivmed-mini":
        assert "| task | image | volume |" in table
    key = {"vqa-rad": "closed_accuracy", "slake": "open_recall", "m3d-vqa": "closed_accuracy",
           "omnivmed-mini": "accuracy_by_task_x_modality"}.get(benchmark, "macro_f1")  # fmt: skip
    assert key in result["metrics"]


def test_pathvqa_parquet_through_the_cli_and_a_clear_error_exit(tiny_model_dir, tmp_path):
    _hf_parquet(tmp_path / "pvqa" / "data" / "test-00000-of-00001.parquet",
                [("is this necrosis?", "yes"), ("what is shown?", "granuloma"), ("is it benign?", "no")])  # fmt: skip
    cmd = [sys.executable, str(ROOT / "evaluate_omnivmed.py"), "--model", str(tiny_model_dir), "--benchmark",
           "pathvqa", "--data", str(tmp_path / "pvqa"), "--limit", "2", "--batch-size", "2", "--max-new-tokens", "2",
           "--out", str(tmp_path / "r.json")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| closed_accuracy |" in result.stdout and "llava_med_compatible / closed_accuracy" in result.stdout
    assert "generating" in result.stderr  # the tqdm bar
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 2
    bad = subprocess.run(cmd[:6] + ["--data", str(tmp_path / "empty_dir_missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
