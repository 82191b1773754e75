"""build_instruct_omnivmed.py: every converter on a fixture in its source's published layout, the contamination guard
against the evaluation harness's test fixtures, per-row errors, determinism, stage views, the report, and the
captioner hook with the tiny model (end to end, interrupted and resumed)."""

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import build_instruct_omnivmed as bi
import evaluate_omnivmed as ev
import omnivmed_benchmarks
import test_evaluate_omnivmed as evt  # the benchmark fixtures of the evaluation tests


ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------- fixtures
def smooth(seed: int, size=(48, 40)) -> np.ndarray:
    """A smooth picture (blobs on a gradient): its dHash is stable under resizing, unlike noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = 60 * x + 40 * y
    for _ in range(4):
        cy, cx, r = rng.random(3) * [1, 1, 0.3] + [0, 0, 0.1]
        img += 120 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / r**2)
    return np.clip(img, 0, 255).astype(np.uint8)


def png(path: Path, seed: int, size=(48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([smooth(seed, size)] * 3, -1)).save(path)
    return path


def make_vqa_rad(root: Path) -> Path:
    """OSF release: two test questions on synpic1; training rows that are clean, share the test image, are a
    resized copy of it, repeat a test question + answer, or point at a missing / corrupt image."""
    records = [
        dict(qid=1, image_name="synpic1.jpg", question="Is there a pneumothorax?", answer="No", answer_type="CLOSED",
             phrase_type="test_freeform", question_type="PRES"),
        dict(qid=2, image_name="synpic1.jpg", question="Which lung is affected?", answer="Left lung",
             answer_type="OPEN", phrase_type="test_para", question_type="POS"),
        dict(qid=3, image_name="synpic2.jpg", question="Is this a CT?", answer="yes", answer_type="CLOSED",
             phrase_type="freeform", question_type="MODALITY"),
        dict(qid=4, image_name="synpic2.jpg", question="Where is the mass?", answer="Right upper lobe",
             answer_type="OPEN", phrase_type="para", question_type="POS"),
        dict(qid=5, image_name="synpic1.jpg", question="Is the heart enlarged?", answer="no", answer_type="CLOSED",
             phrase_type="freeform", question_type="ABN"),
        dict(qid=6, image_name="synpic3.jpg", question="Is the heart enlarged?", answer="yes", answer_type="CLOSED",
             phrase_type="freeform", question_type="ABN"),
        dict(qid=7, image_name="synpic4.jpg", question="Which lung is affected?", answer="left lung",
             answer_type="OPEN", phrase_type="freeform", question_type="POS"),
        dict(qid=8, image_name="synpic5.jpg", question="What organ is shown?", answer="brain", answer_type="OPEN",
             phrase_type="freeform", question_type="ORGAN"),
        dict(qid=9, image_name="synpic6.jpg", question="What organ is shown?", answer="liver", answer_type="OPEN",
             phrase_type="freeform", question_type="ORGAN"),
        dict(qid=10, image_name="synpic7.jpg", question="Is the spleen normal in size?", answer="yes",
             answer_type="CLOSED", phrase_type="freeform", question_type="SIZE"),
        dict(qid=11, image_name="synpic8.jpg", question="Is the spleen normal in size?", answer="no",
             answer_type="CLOSED", phrase_type="test_freeform", question_type="SIZE"),
        dict(qid=12, image_name="synpic9.jpg", question="Is the liver normal in size?", answer="no",
             answer_type="CLOSED", phrase_type="freeform", question_type="SIZE"),
    ]  # fmt: skip
    root.mkdir(parents=True)
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    folder = root / "VQA_RAD Image Folder"
    png(folder / "synpic1.jpg", 1)
    png(folder / "synpic2.jpg", 2)
    big = Image.fromarray(smooth(1)).resize((80, 96), Image.Resampling.BICUBIC)  # synpic1, resized and re-encoded
    big.convert("RGB").save(folder / "synpic3.png")
    (folder / "synpic3.png").rename(folder / "synpic3.jpg")
    png(folder / "synpic4.jpg", 4)
    (folder / "synpic6.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # synpic5 is missing
    png(folder / "synpic7.jpg", 7)
    png(folder / "synpic8.jpg", 100)  # test image
    png(folder / "synpic9.jpg", 273)  # a different picture whose dHash is 1 bit from synpic8's
    return root


def make_slake(root: Path) -> Path:
    train = [
        dict(img_name="xmlab10/source.jpg", question="Which organ is enlarged?", answer="Liver", q_lang="en",
             answer_type="OPEN", modality="CT", content_type="Organ", qid=100),
        dict(img_name="xmlab10/source.jpg", question="肝脏正常吗?", answer="不", q_lang="zh",
             answer_type="CLOSED", modality="CT", content_type="Abnormality", qid=101),
        dict(img_name="xmlab11/source.jpg", question="Where is the lesion?", answer="Left lung", q_lang="en",
             answer_type="OPEN", modality="X-Ray", content_type="Position", qid=102),
        dict(img_name="xmlab12/source.jpg", question="How many kidneys are there?", answer="2", q_lang="en",
             answer_type="OPEN", modality="MRI", content_type="Quantity", qid=103),
    ]  # fmt: skip
    evt.make_slake(root)  # test.json + its images
    (root / "train.json").write_text(json.dumps(train, ensure_ascii=False))
    for i, name in enumerate(("xmlab10", "xmlab11", "xmlab12")):
        png(root / "imgs" / name / "source.jpg", 20 + i)
    return root


def make_pathvqa(root: Path) -> Path:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def encoded(seed):
        buffer = io.BytesIO()
        Image.fromarray(smooth(seed)).save(buffer, format="JPEG")
        return buffer.getvalue()

    splits = {"train": [("what is present?", "granuloma"), ("is this necrosis?", "yes"),
                        ("where is the tumor located?", "cortex")],
              "test": [("what is shown?", "fibrosis"), ("is this benign?", "no"), ("how many nuclei?", "3")]}
    for split, seeds in (("train", (30, 31, 32)), ("test", (40, 41, 42))):
        path = root / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": [{"bytes": encoded(s), "path": None} for s in seeds],
                                 "question": [q for q, _ in splits[split]], "answer": [a for _, a in splits[split]]}),
                       path)
    return root


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.

 FINDINGS:
 The lungs are clear without focal consolidation.  No pleural effusion or
 pneumothorax is seen.

 IMPRESSION:
 No acute cardiopulmonary process.
"""


def make_mimic(root: Path) -> Path:
    """MIMIC-CXR-JPG layout with the reports in the same tree, the split and metadata CSVs (gzip)."""
    study = root / "files" / "p10" / "p10000032" / "s50414267"
    png(study / "aaa-pa.jpg", 50)
    png(study / "bbb-lateral.jpg", 51)
    (study.parent / "s50414267.txt").write_text(REPORT)
    other = root / "files" / "p10" / "p10000032" / "s53189527"
    png(other / "ccc-ap.jpg", 52)
    (other.parent / "s53189527.txt").write_text("WET READ: ___ no sections here\n")
    held_out = root / "files" / "p11" / "p11000011" / "s51111111"
    png(held_out / "ddd-pa.jpg", 53)
    (held_out.parent / "s51111111.txt").write_text(REPORT)
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "study_id", "subject_id", "split"])
        w.writerows([["aaa-pa", 50414267, 10000032, "train"], ["bbb-lateral", 50414267, 10000032, "train"],
                     ["ccc-ap", 53189527, 10000032, "train"], ["ddd-pa", 51111111, 11000011, "test"]])
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "subject_id", "study_id", "ViewPosition"])
        w.writerows([["aaa-pa", 1, 1, "PA"], ["bbb-lateral", 1, 1, "LATERAL"], ["ccc-ap", 1, 1, "AP"],
                     ["ddd-pa", 1, 1, "PA"]])
    return root


def volume(path: Path, seed: int, shape=(1, 6, 32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).random(shape, dtype=np.float32))


def make_m3d(root: Path) -> Path:
    """One folder holding M3D-Cap (M3D_Cap_npy/M3D_Cap.json), M3D-VQA (train + test CSVs, evt.make_m3d's test) and
    their shared volumes: the M3D-Cap case 000001 is the M3D-VQA test volume."""
    evt.make_m3d(root)  # M3D_VQA_test.csv on M3D_Cap_npy/ct_case/000001/Axial.npy
    caps = root / "M3D_Cap_npy"
    volume(caps / "ct_case" / "000002" / "Axial.npy", 2)
    volume(caps / "mri_case" / "000003" / "T2.npy", 3)
    for case, text in (("ct_case/000001", "Test volume text."), ("ct_case/000002", "Hepatic cyst in segment VII."),
                       ("mri_case/000003", "Normal brain MRI.")):
        (caps / case / "text.txt").write_text(text)
    index = {"train": [{"image": "ct_case/000001/Axial.npy", "text": "ct_case/000001/text.txt"},
                       {"image": "ct_case/000002/Axial.npy", "text": "ct_case/000002/text.txt"},
                       {"image": "mri_case/000003/T2.npy", "text": "mri_case/000003/text.txt"},
                       {"image": "ct_case/000009/Axial.npy", "text": "ct_case/000009/text.txt"}],
             "validation": [], "test": []}  # fmt: skip
    (caps / "M3D_Cap.json").write_text(json.dumps(index))
    with (root / "M3D_VQA_train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(omnivmed_benchmarks.M3D_COLUMNS))
        w.writerow(["M3D_Cap_npy/ct_case/000002/Axial.npy", "Which organ has the cyst?", "Liver", "Kidney", "Spleen",
                    "Lung", "Liver", "A", "3"])  # fmt: skip
        w.writerow(["M3D_Cap_npy/ct_case/000004/Axial.npy", "In which plane?", "Axial", "Coronal", "Sagittal",
                    "Oblique", "Axial", "A", "1"])  # fmt: skip
    broken = caps / "ct_case" / "000004" / "Axial.npy"
    volume(broken, 4)
    broken.write_bytes(broken.read_bytes()[:200])  # truncated download
    return root


def make_refseg(root: Path) -> Path:
    image, mask = root / "M3D_RefSeg_npy" / "s0000" / "ct.npy", root / "M3D_RefSeg_npy" / "s0000" / "mask.npy"
    volume(image, 5, (1, 8, 20, 10))
    labels = np.zeros((1, 8, 20, 10), dtype=np.uint8)
    labels[0, 2:4, 5:15, 0:5] = 1
    labels[0, 6, 0, 9] = 2
    np.save(mask, labels)
    with (root / "M3D_RefSeg.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer"])
        w.writerow(["M3D_RefSeg_npy/s0000/ct.npy", "M3D_RefSeg_npy/s0000/mask.npy", 1, 0,
                    "Please segment the hepatic cyst.", "It is [SEG]."])  # fmt: skip
        w.writerow(["M3D_RefSeg_npy/s0000/ct.npy", "M3D_RefSeg_npy/s0000/mask.npy", 3, 0, "Where is the stone?",
                    "It is [SEG]."])  # region 3 does not exist: an error row
    return root


def make_cholec80(root: Path) -> Path:
    for seq, frames in (("5", ("100",)), ("1", ("100", "200"))):
        for frame in frames:
            qa = root / "Classification" / seq / f"{frame}_QA.txt"
            qa.parent.mkdir(parents=True, exist_ok=True)
            qa.write_text("What is the phase?|calot triangle dissection\nIs grasper used in calot triangle "
                          "dissection?|yes\n" + ("broken line without a separator\n" if frame == "200" else ""))
            png(root / "cropped_image" / seq / f"{frame}.png", 60 + int(seq) * 7 + int(frame))
    return root


def make_endovis18(root: Path) -> Path:
    for seq in ("1", "2"):
        qa = root / f"seq_{seq}" / "vqa" / "Classification" / "frame000_QA.txt"
        qa.parent.mkdir(parents=True)
        qa.write_text("What organ is being operated?|kidney\nWhat is the state of bipolar_forceps?|Grasping\n"
                      "Where is monopolar_curved_scissors located?|left-top\n")
        png(root / f"seq_{seq}" / "left_frames" / "frame000.png", 70 + int(seq))
    return root


def make_psi_ava(root: Path) -> Path:
    for part, image in (("Train", "CASE002/00007.jpg"), ("Val", "CASE001/00001.jpg")):
        (root / part).mkdir(parents=True)
        (root / part / "C2_action.txt").write_text(f"{image}|What is the action of the grasper?|Grasping\n")
        (root / part / "C4_step.txt").write_text(f"{image}|What is the step?|Identificacion_arteria\n")
    png(root / "keyframes" / "CASE001" / "00001.jpg", 80)
    png(root / "keyframes" / "CASE002" / "00007.jpg", 81)
    return root


def make_video(path: Path, frames: int = 6, size: int = 32):
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuvj420p"
        for t in range(frames):
            img = np.zeros((size, size, 3), np.uint8)
            img[:, : 4 + 4 * t] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_uncaptioned(root: Path) -> Path:
    make_video(root / "laparoscopy" / "clip1.avi")
    volume(root / "mri" / "case1.npy", 9, (1, 4, 28, 28))
    (root / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "mri" / "notes.txt").write_text("not a medium")
    (root / "endoscopy").mkdir()
    (root / "endoscopy" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    return root


def rows_of(out: Path, name: str = "all.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def convo(row):
    return row["conversations"][0]["value"], row["conversations"][1]["value"]


# ------------------------------------------------------------------------------------------------------- tests
def test_taxonomy_is_fixed_and_documented():
    assert len(bi.MODALITIES) == 14 and len(bi.TASKS) == 11
    assert all(isinstance(v, str) and v for v in list(bi.MODALITIES.values()) + list(bi.TASKS.values()))
    assert set(bi.VQA_RAD_TYPES.values()) | set(bi.SLAKE_TYPES.values()) | set(bi.M3D_TYPES.values()) <= set(bi.TASKS)
    assert bi.task_from_question("What is the imaging plane?") == "plane"
    assert bi.task_from_question("Where is the tumor located?") == "location"
    assert bi.task_from_question("is this necrosis?") == "abnormality"
    assert bi.task_from_question("what color is the stain?") == "general-vqa"
    assert bi.task_from_question("Is this an MRI?") == "modality"
    assert bi.task_from_question("Was IV contrast given?") == "modality"
    assert bi.task_from_question("Where is the lesion on this MRI?") == "location"
    assert bi.task_from_question("Is there a fracture on this CT?") == "abnormality"
    assert bi.task_from_question("Is this a PA view?") == "plane"
    assert bi.modality_from_text("X-Ray") == "x-ray" and bi.modality_from_text("MRI") == "mri"
    assert bi.modality_from_text("laparoscopy") == "surgery" and bi.modality_from_text("liver") is None


@pytest.fixture(scope="module")
def full_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instruct")
    m3d = make_m3d(tmp / "m3d")
    sources = [("vqa-rad", make_vqa_rad(tmp / "rad")), ("slake", make_slake(tmp / "slake")),
               ("pathvqa", make_pathvqa(tmp / "pvqa")), ("mimic-cxr", make_mimic(tmp / "mimic")),
               ("m3d-cap", m3d), ("m3d-vqa", m3d), ("m3d-refseg", make_refseg(tmp / "refseg")),
               ("cholec80-vqa", make_cholec80(tmp / "cholec")), ("endovis18-vqa", make_endovis18(tmp / "endo")),
               ("psi-ava-vqa", make_psi_ava(tmp / "psi"))]  # fmt: skip
    out = tmp / "out"
    report = bi.build(sources, out, seed=0, progress=False)
    return tmp, sources, out, report


def test_each_converter_writes_the_expected_rows(full_build):
    tmp, _, out, report = full_build
    rows = rows_of(out)
    by = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r)
    for r in rows:
        assert r["modality"] in bi.MODALITIES and r["task"] in bi.TASKS and r["kind"] in bi.KINDS
        assert (out / r[r["kind"]]).is_file() and not Path(r[r["kind"]]).is_absolute()
        assert r["conversations"][0]["value"].startswith(f"<{r['kind']}>\n") and r["answer"] == convo(r)[1]

    rad = {r["source_id"]: r for r in by["vqa-rad"]}
    assert sorted(rad) == ["10", "12", "3", "4"]  # 5, 6, 7 guarded; 8 missing, 9 corrupt
    assert (rad["3"]["task"], rad["3"]["modality"], rad["3"]["modality_source"]) == ("modality", "ct", "answer")
    assert convo(rad["4"]) == ("<image>\nWhere is the mass?", "Right upper lobe") and rad["4"]["task"] == "location"
    assert rad["4"]["modality"] == "ct"  # established by the image's other question ("Is this a CT?" yes)
    assert rad["4"]["image"] == "media/vqa-rad/VQA_RAD Image Folder/synpic2.jpg"
    assert (rad["10"]["task"], rad["10"]["modality_source"]) == ("general-vqa", "default")  # SIZE; no modality said

    slake = sorted(by["slake"], key=lambda r: r["source_id"])
    assert [(r["source_id"], r["task"], r["modality"]) for r in slake] == [
        ("100", "organ", "ct"), ("102", "location", "x-ray"), ("103", "general-vqa", "mri")]  # the zh row is skipped
    assert slake[0]["image"] == "media/slake/imgs/xmlab10/source.jpg"

    pvqa = sorted(by["pathvqa"], key=lambda r: r["source_id"])
    assert [(convo(r)[1], r["task"], r["modality"]) for r in pvqa] == [
        ("granuloma", "abnormality", "pathology"), ("yes", "abnormality", "pathology"),
        ("cortex", "location", "pathology")]
    assert pvqa[0]["image"] == "media/pathvqa/train/0.jpg" and Image.open(out / pvqa[0]["image"]).format == "JPEG"

    (mimic,) = by["mimic-cxr"]  # lateral view, test split and a report without sections left out
    assert mimic["image"] == "media/mimic-cxr/files/p10/p10000032/s50414267/aaa-pa.jpg"
    assert (mimic["task"], mimic["modality"]) == ("report", "x-ray")
    assert convo(mimic)[1] == ("Findings: The lungs are clear without focal consolidation. No pleural effusion or "
                               "pneumothorax is seen. Impression: No acute cardiopulmonary process.")
    assert convo(mimic)[0].removeprefix("<image>\n") in bi.TEMPLATES["report"]

    caps = {r["source_id"]: r for r in by["m3d-cap"]}
    # 000001 is the M3D-VQA test volume, 000009's caption is missing
    assert sorted(caps) == ["ct_case/000002/Axial.npy", "mri_case/000003/T2.npy"]
    assert convo(caps["mri_case/000003/T2.npy"])[1] == "Normal brain MRI."
    assert caps["mri_case/000003/T2.npy"]["modality"] == "mri" and caps["ct_case/000002/Axial.npy"]["modality"] == "ct"
    assert caps["ct_case/000002/Axial.npy"]["volume"] == "media/m3d-cap/M3D_Cap_npy/ct_case/000002/Axial.nii.gz"
    # M3D-VQA asks about the same volume: stored once, under the source that named it first
    assert {r["volume"] for r in by["m3d-vqa"]} == {caps["ct_case/000002/Axial.npy"]["volume"]}
    assert not (out / "media" / "m3d-vqa").exists()

    vqa3d = sorted(by["m3d-vqa"], key=lambda r: r["source_id"])
    assert [(r["source_id"], r["task"], r["kind"]) for r in vqa3d] == [("0-closed", "organ", "volume"),
                                                                        ("0-open", "organ", "volume")]  # fmt: skip
    assert convo(vqa3d[0]) == ("<volume>\nWhich organ has the cyst? Choices: A. Liver B. Kidney C. Spleen D. Lung",
                               "A. Liver")  # fmt: skip

    (ref,) = by["m3d-refseg"]
    assert ref["task"] == "positioning" and ref["box"] == [0.25, 0.25, 0.0, 0.5, 0.75, 0.5]
    assert convo(ref)[1] == "It is [0.25, 0.25, 0.00, 0.50, 0.75, 0.50]."
    assert convo(ref)[0].startswith("<volume>\nPlease segment the hepatic cyst. ")

    cholec = sorted(by["cholec80-vqa"], key=lambda r: r["id"])
    assert {(r["task"], convo(r)[1]) for r in cholec} == {("surgical-phase", "calot triangle dissection"),
                                                           ("surgical-instrument", "yes")}  # fmt: skip
    assert len(cholec) == 4 and all(r["sequence"] == "1" and r["modality"] == "surgery" for r in cholec)
    endo = {r["task"]: r for r in by["endovis18-vqa"]}
    assert sorted(endo) == ["location", "organ", "surgical-instrument"] and len(by["endovis18-vqa"]) == 3
    assert endo["organ"]["image"] == "media/endovis18-vqa/seq_2/left_frames/frame000.png"
    psi = {r["task"]: r for r in by["psi-ava-vqa"]}
    assert sorted(psi) == ["surgical-instrument", "surgical-phase"]
    assert psi["surgical-phase"]["image"] == "media/psi-ava-vqa/keyframes/CASE002/00007.jpg"

    assert report["rows"] == len(rows) and len({r["id"] for r in rows}) == len(rows)
    assert report["per_source"]["slake"]["rows"] == 3


def test_output_loads_in_train_trl_and_the_evaluation_harness(full_build):
    import train_trl

    _, _, out, _ = full_build
    loaded = train_trl.load_rows([out / "all.jsonl"], data_root=out)  # strict: any bad row raises
    assert len(loaded) == len(rows_of(out))
    samples = ev.load_omnivmed_mini(out / "all.jsonl", "test")  # the same rows as held-out questions, by task
    assert {s.meta["task"] for s in samples} == {r["task"] for r in rows_of(out)}


def test_guard_removes_benchmark_test_rows_and_reports_them(full_build):
    tmp, _, out, report = full_build
    removed = rows_of(out, "removed.jsonl")
    got = {(r["source"], r["source_id"]): (r["reason"], r["benchmark"]) for r in removed}
    assert got[("vqa-rad", "5")] == ("image-hash", "vqa-rad")  # same file as the test image
    assert got[("vqa-rad", "6")] == ("image-near-duplicate", "vqa-rad")  # the test image resized and re-encoded
    assert got[("vqa-rad", "7")] == ("question-answer", "vqa-rad")  # "Which lung is affected? left lung"
    assert got[("m3d-cap", "ct_case/000001/Axial.npy")] == ("image-hash", "m3d-vqa")  # M3D-VQA test volume
    s = report["per_source"]
    assert (s["vqa-rad"]["removed_image-hash"], s["vqa-rad"]["removed_image-near-duplicate"],
            s["vqa-rad"]["removed_question-answer"]) == (1, 1, 1)  # fmt: skip
    assert s["m3d-cap"]["removed_image-hash"] == 1
    md = (out / "report.md").read_text()
    assert "| vqa-rad | 9 | 4 | 2 | 1 / 1 / 1 |" in md  # read 9 (3 test), 4 rows, 2 errors, removed per reason
    # synpic9 is within the dHash radius of the test image synpic8 but another picture: the thumbnails tell
    gray = [np.asarray(Image.open(tmp / "rad" / "VQA_RAD Image Folder" / f"synpic{i}.jpg").convert("L"),
                       dtype=np.float32) / 255 for i in (8, 9)]  # fmt: skip
    (d8, t8), (d9, t9) = (bi.fingerprint(g) for g in gray)
    assert bi._POPCOUNT[d8 ^ d9].sum() <= 8 and float(t8 @ t9) < 0.99
    assert "not checked (no test split given" not in md  # every benchmark was given here
    assert report["guard"]["benchmarks"]["vqa-rad"]["questions"] == 3


def test_guard_on_the_evaluation_fixtures(tmp_path):
    """PSI-AVA's evaluation fixture has the same keyframe in Train and Val: its training rows are removed; a source
    whose test split lives elsewhere is guarded with --benchmark."""
    psi = evt.make_psi_ava(tmp_path / "psi")
    report = bi.build([("psi-ava-vqa", psi)], tmp_path / "out", progress=False)
    assert report["rows"] == 0 and report["per_source"]["psi-ava-vqa"]["removed_image-hash"] == 2
    assert {r["benchmark"] for r in rows_of(tmp_path / "out", "removed.jsonl")} == {"psi-ava-vqa"}

    slake = make_slake(tmp_path / "slake")
    # the SLAKE test image xmlab1 copied into a VQA-RAD training set
    rad = make_vqa_rad(tmp_path / "rad")
    (rad / "VQA_RAD Image Folder" / "synpic7.jpg").write_bytes((slake / "imgs" / "xmlab1" / "source.jpg").read_bytes())
    alone = bi.build([("vqa-rad", rad)], tmp_path / "o1", progress=False)
    guarded = bi.build([("vqa-rad", rad)], tmp_path / "o2", benchmarks=[("slake", slake)], progress=False)
    assert alone["per_source"]["vqa-rad"]["rows"] == guarded["per_source"]["vqa-rad"]["rows"] + 1
    assert "slake" in alone["guard"]["not_available"] and "slake" not in guarded["guard"]["not_available"]
    assert any(r["benchmark"] == "slake" for r in rows_of(tmp_path / "o2", "removed.jsonl"))


def test_bad_rows_are_reported_not_fatal(full_build):
    _, _, out, report = full_build
    errors = rows_of(out, "errors.jsonl")
    text = "\n".join(f"{e['where']}: {e['reason']}" for e in errors)
    assert "synpic5.jpg: file is missing" in text
    assert "synpic6.jpg" in text  # corrupt JPEG
    assert "200_QA.txt:3: expected 'question|answer'" in text
    assert "s53189527.txt: no FINDINGS or IMPRESSION section" in text
    assert "caption file" in text and "000009" in text
    assert "region 3 is empty" in text
    assert "000004/Axial.npy: not a readable .npy array" in text and report["per_source"]["m3d-vqa"]["errors"] == 2
    assert report["per_source"]["vqa-rad"]["errors"] == 2 and report["rows"] > 20


def test_deterministic_resumable_and_max_per_source(full_build, tmp_path):
    _, sources, out, _ = full_build
    first = (out / "all.jsonl").read_bytes()
    bi.build(sources, out, seed=0, progress=False)  # a rerun over the same output: same rows, no duplicates
    assert (out / "all.jsonl").read_bytes() == first
    small = bi.build(sources[:3], tmp_path / "a", max_per_source=2, seed=1, progress=False)
    again = bi.build(sources[:3], tmp_path / "b", max_per_source=2, seed=1, progress=False)
    assert (tmp_path / "a" / "all.jsonl").read_bytes() == (tmp_path / "b" / "all.jsonl").read_bytes()
    assert again["per_source"] == small["per_source"]
    picked = {r["id"] for r in rows_of(tmp_path / "a") if r["source"] == "vqa-rad"}
    others = [bi.build(sources[:1], tmp_path / f"s{k}", max_per_source=2, seed=k, progress=False) for k in (2, 3, 4)]
    assert any({r["id"] for r in rows_of(tmp_path / f"s{k}")} != picked for k in (2, 3, 4)) and others
    assert all(s["rows"] <= 2 for s in small["per_source"].values()) and small["per_source"]["vqa-rad"]["rows"] == 2
    assert small["per_source"]["vqa-rad"]["over_max_per_source"] == 2  # 4 clean rows
    # prompts are drawn per row from the templates, seeded
    caps = [r for r in rows_of(out) if r["task"] in ("caption", "report", "positioning")]
    assert caps and all(convo(r)[0].split("\n", 1)[1] for r in caps)


def test_stage_views_and_report(full_build):
    _, _, out, report = full_build
    all_rows = rows_of(out)
    s1, s2, s3 = (rows_of(out, f"stage{k}.jsonl") for k in (1, 2, 3))
    assert s1 and all(r["kind"] == "image" and r["task"] in ("caption", "report") for r in s1)
    assert s2 and all(r["kind"] == "image" and r["task"] not in ("caption", "report") for r in s2)
    other = [r for r in all_rows if r["kind"] != "image"]
    assert [r for r in s3 if r["kind"] != "image"] == other and sum(r["kind"] == "image" for r in s3) == len(other)
    grid = report["modality_x_task"]
    assert grid["surgery"]["surgical-phase"] == sum(r["modality"] == "surgery" and r["task"] == "surgical-phase"
                                                    for r in all_rows)  # fmt: skip
    assert report["per_kind"] == {"image": sum(r["kind"] == "image" for r in all_rows), "volume": len(other),
                                  "video": 0}  # fmt: skip
    md = (out / "report.md").read_text()
    assert "| modality | caption | report |" in md and md.count("\n| ") > 14
    assert Image.open(out / "report.png").size[1] > 200


def test_report_sections():
    assert bi.report_sections(REPORT) == {"findings": "The lungs are clear without focal consolidation. No pleural "
                                          "effusion or pneumothorax is seen.",
                                          "impression": "No acute cardiopulmonary process."}  # fmt: skip
    combined = "INDICATION: cough\nFINDINGS AND IMPRESSION:\n Heart size normal.\n Lungs clear.\nNOTIFICATION: none"
    assert bi.report_sections(combined) == {"findings": "Heart size normal. Lungs clear."}
    assert bi.report_sections("WET READ: no sections") == {}


def test_image_fingerprints_across_formats(tmp_path):
    """16-bit and 8-bit encodings, JPEG and a resize of one picture get the same fingerprint; --full-decode checks
    with the training reader and keeps the fingerprint."""
    picture = smooth(3, (60, 50)).astype(np.float32) / 255
    Image.fromarray((picture * 4000).astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray((picture * 255).astype(np.uint8)).save(tmp_path / "a8.jpg", quality=70)
    Image.fromarray((picture * 255).astype(np.uint8)).resize((100, 120)).save(tmp_path / "big.png")
    prints = []
    for name in ("a16.png", "a8.jpg", "big.png"):
        c = bi.Candidate("x", name, "image", {"path": str(tmp_path / name)}, name, "q", "a", "organ", "ct")
        hashes, fp = bi.inspect(c)
        _, full = bi.inspect(c, full=True)
        assert np.array_equal(fp[0], full[0]) and len(hashes) == 1
        prints.append(fp)
    for d, t in prints[1:]:
        assert bi._POPCOUNT[prints[0][0] ^ d].sum() <= 8 and float(prints[0][1] @ t) > 0.999


def test_npy_volumes_become_nifti_that_displays_like_the_array(tmp_path):
    from omnivmed.media_omnivmed import load_media

    array = np.random.default_rng(0).random((5, 12, 9), dtype=np.float32)
    array[:, :3, :2] = 1.0  # a corner marks the orientation
    bi.npy_to_nifti(array, tmp_path / "v.nii.gz")
    a, b = load_media(array, "volume").frames, load_media(tmp_path / "v.nii.gz", "volume").frames
    assert a.shape == b.shape == (5, 12, 9, 3)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_accept_caption_rule():
    ok, why = bi.accept_caption("Axial CT of the abdomen with a liver cyst", "Axial CT showing a liver cyst", "CT",
                                "ct")
    assert ok, why
    assert bi.accept_caption("CT", "CT", "CT", "ct") == (False, "too short (1 words < 3)")
    assert bi.accept_caption("cyst cyst cyst cyst cyst cyst cyst cyst cyst cyst", "x", "ct", "ct")[1].startswith(
        "repetitive")
    assert "disagrees" in bi.accept_caption("Axial CT of the abdomen", "a sagittal MRI of the knee", "ct", "ct")[1]
    assert "check question failed" in bi.accept_caption("Axial CT of the abdomen", "Axial CT of the abdomen",
                                                        "an MRI", "ct")[1]  # fmt: skip
    assert bi.accept_caption("Laparoscopic view of the gallbladder", "laparoscopic view of gallbladder",
                             "laparoscopic surgery", "surgery")[0]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from build_omnivmed import build_tiny

    return build_tiny(tmp_path_factory.mktemp("captiontiny") / "omnivmed-tiny", seed=0)


def test_captioner_end_to_end_with_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    data = make_uncaptioned(tmp_path / "raw")
    without = bi.build([("uncaptioned", data)], tmp_path / "none", progress=False)
    assert without["rows"] == 0 and without["per_source"]["uncaptioned"]["needs_captioner"] == 2
    captioner = bi.Captioner(str(tiny_model_dir), tries=2, max_new_tokens=6, device="cpu")
    generated = []
    real_generate = bi.Captioner.generate

    def counting(self, block, prompt, seed, sample=True):
        generated.append(block.get("path") or block.get("npy"))
        if len(generated) > 3 and "case1.npy" in generated[-1]:
            raise KeyboardInterrupt  # killed in the middle of the second medium, on the first run only
        return real_generate(self, block, prompt, seed, sample)

    monkeypatch.setattr(bi.Captioner, "generate", counting)
    with pytest.raises(KeyboardInterrupt):
        bi.build([("uncaptioned", data)], tmp_path / "out", captioner=captioner, progress=False)
    assert [r["media"] for r in rows_of(tmp_path / "out", "captions.jsonl")] == ["laparoscopy/clip1.avi"]
    monkeypatch.setattr(bi.Captioner, "generate", real_generate)
    generated.clear()
    monkeypatch.setattr(bi.Captioner, "generate", lambda self, block, *a, **k: (
        generated.append(block.get("path") or block.get("npy")) or real_generate(self, block, *a, **k)))
    report = bi.build([("uncaptioned", data)], tmp_path / "out", captioner=captioner, processor=str(tiny_model_dir),
                      progress=False)  # fmt: skip
    assert generated and all("case1.npy" in g for g in generated)  # the video was not captioned again
    records = rows_of(tmp_path / "out", "captions.jsonl")
    assert len(records) == 2 and {r["media"] for r in records} == {"laparoscopy/clip1.avi", "mri/case1.npy"}
    for r in records:  # the tiny model's words are noise: every attempt is judged, and judged by the rule
        assert 1 <= len(r["attempts"]) <= 2 and isinstance(r["check"], str)
        for a in r["attempts"]:
            modality = "surgery" if r["media"].startswith("laparoscopy") else "mri"
            assert (a["kept"], a["reason"]) == bi.accept_caption(a["draft"], a["second"], r["check"], modality)
        assert (r["caption"] is not None) == any(a["kept"] for a in r["attempts"])
    s = report["per_source"]["uncaptioned"]
    assert s["rows"] == sum(r["caption"] is not None for r in records) and s["errors"] == 2  # notes, broken.mp4
    errors = "\n".join(f"{e['where']}: {e['reason']}" for e in rows_of(tmp_path / "out", "errors.jsonl"))
    assert "notes.txt" in errors and "not a video / volume / image" in errors and "broken.mp4" in errors
    assert (s["captioned_before"], s["captioned_now"]) == (1, 1)
    assert report["tokens"]["lengths"] == [] or len(report["tokens"]["lengths"]) == report["rows"]
    assert len(rows_of(tmp_path / "out")) == len({r["id"] for r in rows_of(tmp_path / "out")}) == report["rows"]


def test_token_lengths_with_the_models_processor(full_build, tiny_model_dir):
    _, _, out, report = full_build
    tokens = bi.token_lengths(out / "all.jsonl", out, str(tiny_model_dir), sample=12, seed=0)
    assert tokens["all"]["n"] == 12 and sum(tokens["histogram"].values()) == 12
    assert set(tokens["by_kind"]) <= {"image", "volume"} and tokens["all"]["min"] > 10
    import train_trl

    processor = train_trl.load_processor(str(tiny_model_dir))
    row = train_trl.load_rows([out / "all.jsonl"], data_root=out)[0]
    n = len(processor.apply_chat_template(train_trl.OmniVMedCollator(processor).conversation(row), tokenize=True,
                                          return_dict=True)["input_ids"][0])  # fmt: skip
    assert n == bi.token_lengths(out / "all.jsonl", out, str(tiny_model_dir), sample=10**6, seed=0)["lengths"][0]
    bi.write_report({**report, "tokens": tokens}, out)
    assert "| tokens | rows |" in (out / "report.md").read_text()


def test_captioner_keeps_agreeing_drafts_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    data = make_uncaptioned(tmp_path / "raw")
    calls = []

    def scripted(self, block, prompt, seed, sample=True):
        calls.append(block.get("path") or block.get("npy"))
        if prompt.startswith("Which imaging modality"):
            return "laparoscopic surgery" if "clip1" in calls[-1] else "MRI"
        return "Laparoscopic view with a grasper at the gallbladder" if "clip1" in calls[-1] else "words"

    monkeypatch.setattr(bi.Captioner, "generate", scripted)
    real_caption = bi.Captioner.caption

    def interrupted(self, c):
        if c.rel.startswith("mri"):
            raise KeyboardInterrupt  # the run is killed while captioning the second medium
        return real_caption(self, c)

    captioner = bi.Captioner("some/model", tries=2)
    monkeypatch.setattr(bi.Captioner, "caption", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bi.build([("uncaptioned", data)], tmp_path / "out", captioner=captioner, progress=False)
    assert len(rows_of(tmp_path / "out", "captions.jsonl")) == 1
    with open(tmp_path / "out" / "captions.jsonl", "a") as f:
        f.write('{"key": "torn')  # a half-written line from the kill
    monkeypatch.setattr(bi.Captioner, "caption", real_caption)
    calls.clear()
    report = bi.build([("uncaptioned", data)], tmp_path / "out", captioner=captioner, progress=False)
    assert calls and all("clip1" not in c for c in calls)  # the video was not captioned again
    s = report["per_source"]["uncaptioned"]
    assert (s["captioned_before"], s["captioned_now"], s["captions_rejected"], s["rows"]) == (1, 1, 1, 1)
    records = rows_of(tmp_path / "out", "captions.jsonl")
    assert len(records) == len({r["key"] for r in records}) == 2
    (row,) = rows_of(tmp_path / "out")
    assert row["video"] == "media/uncaptioned/laparoscopy/clip1.avi" and row["modality"] == "surgery"
    assert convo(row)[1] == "Laparoscopic view with a grasper at the gallbladder" and row["task"] == "caption"
    mri = next(r for r in records if r["media"] == "mri/case1.npy")
    assert mri["caption"] is None and mri["attempts"][0]["reason"].startswith("too short")
    bi.build([("uncaptioned", data)], tmp_path / "out", captioner=captioner, progress=False)
    assert len(rows_of(tmp_path / "out", "captions.jsonl")) == 2 and len(rows_of(tmp_path / "out")) == 1


def test_cli(tmp_path):
    psi = make_psi_ava(tmp_path / "psi")
    cmd = [sys.executable, str(ROOT / "build_instruct_omnivmed.py"), "--source", f"psi-ava-vqa={psi}", "--out",
           str(tmp_path / "out"), "--stage", "2"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| psi-ava-vqa | 2 | 2 |" in result.stdout
    assert (tmp_path / "out" / "stage2.jsonl").is_file() and not (tmp_path / "out" / "stage1.jsonl").exists()
    bad = subprocess.run(cmd[:2] + ["--source", f"nope={psi}", "--out", str(tmp_path / "x")], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown source 'nope'" in bad.stderr
    missing = subprocess.run(cmd[:2] + ["--source", f"slake={tmp_path / 'none'}", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "no such folder" in missing.stderr
