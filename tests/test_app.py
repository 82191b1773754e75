"""app.py: the Gradio demo. What it shows (views, pruning overlay, zip uploads, errors, streamed answers) is tested
directly; then the whole app is started on 127.0.0.1 and driven in headless Chromium (Selenium + chromedriver)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
CT_SERIES = ("dicomdirtests", "98892001", "CT5N")  # a real 5-slice CT series inside the pydicom wheel


def _mni_t1() -> Path:
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    assert path.is_file(), path
    return path


def _ct_series() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / Path(*CT_SERIES)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from build_omnivmed import build_tiny

    return build_tiny(tmp_path_factory.mktemp("apptiny") / "omnivmed-tiny", seed=0)


@pytest.fixture(scope="module")
def holder(tiny_dir):
    import app

    return app.ModelHolder(str(tiny_dir))


# --------------------------------------------------------------------------------------------------- without browser
def test_view_shows_what_the_processor_keeps(holder, tmp_path):
    import app

    processor = holder.image_processor()
    view = app.build_view(_mni_t1(), processor, "axial", "auto", 0.1, tmp_path)
    batch = processor([str(_mni_t1())], return_tensors="pt", prune_threshold=0.1)
    report = batch["media_metadata"][0]["pruning_report"]
    assert view.report == report and int(view.keep.sum()) == report["tokens_after"] < report["tokens_before"]
    assert view.frames.shape[0] == view.keep.shape[0] == processor.max_slices and view.media.kind == "volume"
    assert view.keep[0].all()  # the first slice is always whole

    middle = view.frames.shape[0] // 2
    everything = app.build_view(_mni_t1(), processor, "axial", "auto", 0.0, tmp_path, media=view.media)
    assert everything.keep.all() and everything.report["kept_fraction"] == 1.0
    pruned_here = not view.keep[middle].all()
    assert pruned_here, "the MNI middle slice should lose some blocks at 0.1"
    # pruned blocks are dimmed in the overlay: the same slice looks darker with pruning on
    dim = np.asarray(app.model_image(view, middle), dtype=float).mean()
    full = np.asarray(app.model_image(everything, middle), dtype=float).mean()
    assert dim < full
    assert f"{report['tokens_after']}/{report['tokens_before']}" in app.describe_view(view, middle)
    assert app.strip_image(view).size[0] > 0

    coronal = app.build_view(_mni_t1(), processor, "coronal", "auto", 0.1, tmp_path)
    assert coronal.media.metadata["slice_axis"] == "coronal"
    assert coronal.frames.shape[1:3] != view.frames.shape[1:3]  # 197 x 189 mm instead of 197 x 233 mm
    scan = app.scan_image(coronal, 0)
    assert max(scan.size) == app.VIEW_SIDE


def test_zip_of_a_dicom_series_is_one_volume_and_the_window_applies(holder, tmp_path):
    import app

    upload = tmp_path / "upload" / "series.zip"
    upload.parent.mkdir()
    with zipfile.ZipFile(upload, "w") as archive:
        for f in sorted(_ct_series().iterdir()):
            archive.write(f, f"patient/CT5N/{f.name}")
        archive.writestr("__MACOSX/patient/._junk", b"resource fork")
    processor = holder.image_processor()
    view = app.build_view(upload, processor, "axial", "lung", None, tmp_path)
    assert view.media.kind == "volume" and view.frames.shape[0] == 5
    assert view.media.metadata["intensity"]["windows"][0]["name"] == "lung"
    assert "lung (C -600 / W 1500)" in app.describe_view(view, 0)
    soft = app.build_view(upload, processor, "axial", "auto", None, tmp_path)
    assert not np.allclose(soft.media.frames, view.media.frames)
    assert not list(tmp_path.glob("series-*"))  # unpacked slices are deleted once loaded


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"../escape.dcm": b"x"}, "outside the archive's folder"),
        ({}, "holds no files"),
        ({"scans/notes.txt": b"hello"}, "no DICOM image files found"),
        (None, "not a readable zip archive"),
    ],
)
def test_bad_zips_are_refused_with_their_name(holder, tmp_path, entries, message):
    import app

    upload = tmp_path / "scans.zip"
    if entries is None:
        upload.write_bytes(b"this is not a zip")
    else:
        with zipfile.ZipFile(upload, "w") as archive:
            for name, data in entries.items():
                archive.writestr(name, data)
    with pytest.raises(ValueError, match=message) as caught:
        app.build_view(upload, holder.image_processor(), workdir=tmp_path)
    assert "scans.zip" in str(caught.value)
    assert not (tmp_path.parent / "escape.dcm").exists()


def test_an_unreadable_upload_names_the_file_not_the_server_path(holder, tmp_path):
    import app

    upload = tmp_path / "gradio-cache" / "0123abcd" / "broken.nii.gz"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"not a nifti at all" * 10)
    with pytest.raises(ValueError) as caught:
        app.build_view(upload, holder.image_processor(), workdir=tmp_path)
    text = str(caught.value)
    assert text.startswith("broken.nii.gz: ") and "NIfTI" in text and str(tmp_path) not in text


def test_the_answer_streams_and_equals_the_chat_script(holder, tmp_path):
    import app
    import chat_omnivmed

    view = app.build_view(_mni_t1(), holder.image_processor(), "coronal", "auto", 0.1, tmp_path)
    messages = [{"role": "user", "content": [{"type": "volume", "volume": view.media},
                                             {"type": "text", "text": "Is there a lesion?"}]}]  # fmt: skip
    pieces = list(holder.stream(messages, 6, 0.1))
    assert len(pieces) >= 3 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))

    class Sink:
        def write(self, text):
            pass

        def flush(self):
            pass

    reference = chat_omnivmed.answer(holder.model, holder.processor, messages, 6, 0.1, out=Sink())
    assert pieces[-1].strip() == reference


def test_while_training_the_viewer_uses_the_processor_training_will_save(tmp_path):
    """The embedded default is trained from `train_trl._build_base`'s folder; the viewer's stand-in processor must
    match it setting for setting (else the overlay would show other tokens than the model gets)."""
    import app
    import train_trl

    train_trl._build_base(tmp_path / "base", 0, embedded=True)
    from transformers import AutoProcessor

    saved = AutoProcessor.from_pretrained(str(tmp_path / "base"), trust_remote_code=True).image_processor
    standin = app.ModelHolder.__new__(app.ModelHolder)
    standin.processor, standin._base_processor = None, None
    assert standin.image_processor()._settings() == saved._settings()


FAKE_TRAINER = """
import shutil, sys, time
print("12:00:00 train_trl: stage 1 (alignment) from base: trains projector; 8 rows", flush=True)
for i in range(1, 4):
    sys.stderr.write(f"\\r {i * 33}%|###| {i}/3 [00:0{i}<00:00, 1.00it/s]")
    sys.stderr.flush()
    time.sleep(0.3)
print(flush=True)
shutil.copytree(sys.argv[2], sys.argv[1] + "/final")  # a tiny model stands for the trained one
"""


def test_a_missing_default_is_trained_in_the_background_with_progress_then_served(tiny_dir, tmp_path):
    """The training path with a stand-in for train_trl.py (the real one takes minutes): the page's status follows
    the trainer's stage and progress bar, the viewer works meanwhile, and the model is served once written."""
    import app

    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    out = tmp_path / "omnivmed-default"
    holder = app.ModelHolder(None, output_dir=out, train_command=[sys.executable, str(script), str(out), str(tiny_dir)])
    assert not holder.ready and "Training the embedded default" in holder.status()
    assert holder.image_processor() is not None  # the viewer does not wait for the model
    seen = set()
    end = time.time() + 120
    while holder.training.is_alive() and time.time() < end:
        seen.add((holder.stage, holder.progress))
        time.sleep(0.05)
    assert holder.error is None and holder.ready, holder.status()
    assert any(stage == "stage 1 of 3 (alignment)" and "/3 [" in progress for stage, progress in seen), seen
    assert holder.status() == f"Model: `{out / 'final'}`"


def test_a_failed_training_is_reported(tmp_path):
    import app

    command = [sys.executable, "-c", "import sys; print('boom: no data'); sys.exit(3)"]
    holder = app.ModelHolder(None, output_dir=tmp_path / "x", train_command=command)
    holder.training.join(60)
    assert not holder.ready and "code 3" in holder.status() and "boom: no data" in holder.status()


def test_examples_are_built_from_bundled_data_and_load(holder, tmp_path):
    import app

    paths = app.build_examples(tmp_path / "examples")
    kinds = {}
    for path in paths:
        view = app.build_view(path, holder.image_processor(), workdir=tmp_path)
        kinds[path.name] = (view.media.kind, view.frames.shape[0])
    assert kinds["mni152_t1.nii.gz"][0] == "volume" and kinds["ct_small.dcm"] == ("image", 1)
    assert kinds["ct_chest_512.dcm"] == ("image", 1)
    # the CT example is a real 512 x 512 slice shown at (about) its own size, not a 16 px crop blown up
    chest = app.build_view(paths[1], holder.image_processor(), workdir=tmp_path)
    assert chest.media.frames.shape[1:3] == (512, 512) and app.is_ct(chest.media)
    assert min(chest.media.frames.shape[1:3]) >= app.VIEW_SIDE
    assert kinds["instrument_sweep.mp4"][0] == "video" and kinds["instrument_sweep.mp4"][1] > 1
    assert app.build_examples(tmp_path / "examples") == paths  # second start: reused, not rewritten


# ------------------------------------------------------------------------------- issue 23: honest, bounded, readable
def test_an_answer_of_invisible_characters_is_a_notice_not_an_empty_bubble():
    import app

    for raw in ("\x07\x1b\x00", "\u200b\u200d\ufeff", " \x0b\u2060 \n"):
        shown = app.visible_answer(raw)
        assert shown.startswith("(an empty answer") and "none visible" in shown, (raw, shown)
    assert app.visible_answer("left\x07 side\u200b") == "left side"
    assert app.visible_answer("a\nb") == "a\nb"


def _write_video(path, width, height, seconds):
    """Two black frames `seconds` apart: a tiny file whose header promises `seconds` of width x height video."""
    import fractions

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = np.zeros((height, width, 3), np.uint8)
        for pts in (0, seconds - 1):
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts, f.time_base = pts, fractions.Fraction(1, 1)
            for packet in stream.encode(f):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_video_promising_tens_of_gb_is_refused_from_its_header(holder, tmp_path):
    import app

    video = _write_video(tmp_path / "huge.mp4", 8000, 6000, 100)  # 48 MP frames over 100 s: ~50 KB on disk
    assert video.stat().st_size < 1_000_000
    processor = holder.image_processor()
    start = time.time()
    with pytest.raises(ValueError, match=r"huge\.mp4: 32 frames of 8000x6000 would decode to 18\.4 GB") as caught:
        app.build_view(video, processor, workdir=tmp_path)
    assert time.time() - start < 5 and "nothing was decoded" in str(caught.value)
    small = _write_video(tmp_path / "small.mp4", 64, 48, 3)  # an ordinary video still loads
    assert app.build_view(small, processor, workdir=tmp_path).media.kind == "video"


def test_zip_bombs_and_huge_archives_are_refused_from_the_directory(holder, tmp_path, monkeypatch):
    import app

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("CT/slice1.dcm", "w", force_zip64=True) as entry:
            zeros = bytes(1024**2)
            for _ in range(200):  # 200 MB of zeros: ~200 KB compressed, under the 1 GB total
                entry.write(zeros)
    assert bomb.stat().st_size < 2_000_000
    start = time.time()
    with pytest.raises(ValueError, match=r"bomb\.zip: entry 'CT/slice1\.dcm' inflates \d+ times"):
        app.build_view(bomb, holder.image_processor(), workdir=tmp_path)
    assert time.time() - start < 5 and not list(tmp_path.glob("series-*/CT"))  # nothing unpacked

    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(app.ZIP_MAX_FILES + 1):
            archive.writestr(f"s/{i}.dcm", b"")
    with pytest.raises(ValueError, match=rf"many\.zip: {app.ZIP_MAX_FILES + 1} files in the archive"):
        app.build_view(many, holder.image_processor(), workdir=tmp_path)
    assert app.ZIP_MAX_FILES <= 2000 and app.ZIP_MAX_BYTES <= 1024**3 and app.MAX_UPLOAD_BYTES <= 1024**3

    monkeypatch.setattr(app, "ZIP_MAX_BYTES", 3 * 1024**2)  # the total, with entries that do not compress
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as archive:
        for i in range(2):
            archive.writestr(f"s/{i}.dcm", np.random.default_rng(i).bytes(2 * 1024**2))
    with pytest.raises(ValueError, match=r"big\.zip: unpacks to 0\.00 GB|big\.zip: unpacks to"):
        app.build_view(big, holder.image_processor(), workdir=tmp_path)


def test_launch_bounds_uploads_and_share_warns_loudly(tiny_dir, monkeypatch, capsys):
    import gradio as gr

    import app

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs))
    app.main(["--model", str(tiny_dir), "--no-examples", "--share"])
    assert seen["max_file_size"] == app.MAX_UPLOAD_BYTES and seen["share"] is True
    err = capsys.readouterr().err
    assert "PUBLIC" in err and "patient data" in err


def test_stop_cancels_the_answer_and_frees_the_model_at_once(holder, tmp_path):
    import threading

    import app

    view = app.build_view(_mni_t1(), holder.image_processor(), "axial", "auto", 0.1, tmp_path)
    messages = [{"role": "user", "content": [{"type": "volume", "volume": view.media},
                                             {"type": "text", "text": "Describe."}]}]  # fmt: skip
    cancel = threading.Event()
    stream = holder.stream(messages, 2000, 0.1, cancel)
    first = next(stream)
    cancel.set()
    stopped = time.time()
    with pytest.raises(app.Cancelled):
        for first in stream:
            pass
    assert holder.lock.acquire(timeout=1.0), "the generation lock was not released within 1 s of the stop"
    holder.lock.release()
    assert time.time() - stopped < 1.0
    # a page that goes away closes its generator (Gradio cancels the event): that stops the answer too
    stream = holder.stream(messages, 2000, 0.1)
    next(stream)
    stream.close()
    assert holder.lock.acquire(timeout=1.0), "closing the answer's generator did not free the model within 1 s"
    holder.lock.release()


def test_one_slice_numbering_with_the_dicom_instance_number(holder, tmp_path):
    import pydicom

    import app

    upload = tmp_path / "series.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for f in sorted(_ct_series().iterdir()):
            archive.write(f, f"CT5N/{f.name}")
    view = app.build_view(upload, holder.image_processor(), "axial", "auto", None, tmp_path)
    # reference: pydicom's headers, sorted along the slice normal (z in LPS and RAS alike for axial slices)
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in _ct_series().iterdir()),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))  # fmt: skip
    assert view.instance_numbers == [int(ds.InstanceNumber) for ds in headers]
    for i, ds in enumerate(headers):
        z = float(ds.ImagePositionPatient[2])
        label = app.slice_label(view, i)
        assert label == (f"slice {view.media.slice_indices[i]} · {z:.1f} mm · DICOM InstanceNumber "
                         f"{int(ds.InstanceNumber)}")  # fmt: skip
        assert view.labels[i] == label.replace("InstanceNumber ", "#")  # the strip uses the same numbers
        assert f"shown: **{label}**" in app.describe_view(view, i)
    # coronal slices are resliced from every file: no InstanceNumber is claimed
    coronal = app.build_view(upload, holder.image_processor(), "coronal", "auto", None, tmp_path)
    assert coronal.instance_numbers is None and "DICOM" not in app.slice_label(coronal, 0)
    # NIfTI: index in the volume and mm, the same in the label, the info line and the strip
    mni = app.build_view(_mni_t1(), holder.image_processor(), "axial", "auto", 0.1, tmp_path)
    k = 7
    expected = f"slice {mni.media.slice_indices[k]} · {mni.media.slice_positions_mm[k]:.1f} mm"
    assert mni.labels[k] == app.slice_label(mni, k) == expected and expected in app.describe_view(mni, k)


def test_a_16_bit_png_is_not_washed_out_and_level_width_applies(holder, tmp_path):
    from PIL import Image

    import app

    ramp = np.linspace(0, 4000, 96 * 96).reshape(96, 96).astype(np.uint16)  # an X-ray-like 12-bit range in 16 bits
    path = tmp_path / "xray16.png"
    Image.fromarray(ramp).save(path)
    view = app.build_view(path, holder.image_processor(), workdir=tmp_path)
    shown = np.asarray(app.scan_image(view, 0).convert("L"))
    assert shown.max() >= 250 and shown.min() <= 5  # main showed it with its brightest pixel at 16/255
    assert view.level_width is not None and "level" in app.describe_view(view, 0)
    # a narrower window: more contrast, in what the model gets as well
    narrow = app.build_view(path, holder.image_processor(), workdir=tmp_path, media=view.raw,
                            level_width=(view.level_width[0], view.level_width[1] / 4))  # fmt: skip
    assert (narrow.media.frames == 1).mean() > (view.media.frames == 1).mean() + 0.2
    assert not np.allclose(narrow.frames, view.frames)
    # MR: level / width in % of the loader's range; the identity leaves it as loaded
    from pydicom.data import get_testdata_file

    mr = app.build_view(get_testdata_file("MR_small.dcm"), holder.image_processor(), workdir=tmp_path)
    assert mr.level_width == (50.0, 100.0) and np.array_equal(mr.media.frames, mr.raw.frames)
    assert not app.is_ct(mr.media) and app.is_grayscale(mr.media)
    # CT: a custom window in HU goes to the loader; "rgb" gets its legend
    ct = app.build_view(get_testdata_file("CT_small.dcm"), holder.image_processor(), window="custom",
                        level_width=(-600, 1500), workdir=tmp_path)  # fmt: skip
    assert ct.media.metadata["intensity"]["windows"][0]["center"] == -600
    rgb = app.build_view(get_testdata_file("CT_small.dcm"), holder.image_processor(), window="rgb", workdir=tmp_path)
    assert "false colour: red = abdomen, green = lung, blue = bone" in app.describe_view(rgb, 0)


def test_the_training_estimate_comes_from_measured_progress(tiny_dir, tmp_path):
    import app

    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER.replace("time.sleep(0.3)", "time.sleep(0.6)"))
    out = tmp_path / "omnivmed-default"
    holder = app.ModelHolder(None, output_dir=out, train_command=[sys.executable, str(script), str(out), str(tiny_dir)])
    assert "8-10 min" not in holder.status() and "no estimate" in holder.status()
    seen = set()
    end = time.time() + 120
    while holder.training.is_alive() and time.time() < end:
        seen.add(holder.status())
        time.sleep(0.05)
    measured = [s for s in seen if "left at the measured" in s]
    assert measured, seen
    # the bar said 1/3 after 1 s -> 2 s left; the bar line itself is not pasted into the page
    assert any("1/3 done, ~2 s left at the measured 1.0 s per step" in s for s in measured), measured
    assert not any("it/s]" in s for s in seen)
    assert holder.ready


def test_a_trained_model_folder_is_served_without_training(tiny_dir):
    import app

    holder = app.ModelHolder(str(tiny_dir), output_dir=Path("/nonexistent"))
    assert holder.training is None and holder.ready and holder.status() == f"Model: `{tiny_dir}`"


def _question(view, text):
    return [{"role": "user", "content": [{"type": view.media.kind, view.media.kind: view.media},
                                         {"type": "text", "text": text}]}]  # fmt: skip


def test_attention_shares_equal_transformers_attentions(holder, tmp_path):
    """The hook-based shares against transformers' own output_attentions (eager) on the same prompt + answer."""
    import torch

    import app

    view = app.build_view(_mni_t1(), holder.image_processor(), "axial", "auto", 0.1, tmp_path)
    messages = _question(view, "Is there a lesion on the left?")
    found = {}
    *_, text = holder.stream(messages, 8, 0.1, attribution=found)
    shares = found["attention_shares"]
    assert shares["answer_tokens"] == 8 and abs(shares["visual"].sum() - 1) < 1e-9

    inputs = holder._inputs(messages, 0.1)
    with torch.inference_mode():
        ids = holder.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    lm = holder.model.model.language_model
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            out = holder.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, **extra)
    finally:
        lm.config._attn_implementation = previous
    prompt = inputs["input_ids"].shape[1]
    visual = (inputs["input_ids"][0] == holder.model.config.image_token_id).nonzero().flatten()
    stack = torch.stack([a[0].double() for a in out.attentions])  # (layers, heads, L, L)
    rows = stack[:, :, prompt - 1 : ids.shape[1] - 1, :].mean((0, 1))  # (answer tokens, L)
    reference = rows[:, visual].mean(0)
    np.testing.assert_allclose(shares["visual"], (reference / reference.sum()).numpy(), rtol=1e-5, atol=1e-9)
    assert abs(shares["visual_fraction"] - float(reference.sum())) < 1e-6
    frames, blocks = app.attribution_maps(view, shares["visual"])
    assert frames.shape == (view.frames.shape[0],) and abs(frames.sum() - 1) < 1e-9
    assert (blocks[~view.keep] == 0).all()


def test_the_heat_map_changes_when_the_question_is_about_another_slice(holder, tmp_path):
    """A volume whose slices differ clearly (one bright square, moving through the slices), asked about two slices:
    the per-slice shares and the strip / overlay drawn from them differ."""
    import nibabel as nib

    import app

    data = np.zeros((64, 64, 8), np.uint8)
    for z in range(8):
        data[8 * (z % 4) : 8 * (z % 4) + 24, 8 * (z // 2) : 8 * (z // 2) + 24, z] = 40 + 25 * z
    path = tmp_path / "moving_square.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 5.0, 1.0])), path)
    view = app.build_view(path, holder.image_processor(), "axial", "auto", 0.0, tmp_path)
    maps = []
    for question in ("What is on slice 1?", "Describe the bright square on the last slice, slice 7, in detail."):
        found = {}
        list(holder.stream(_question(view, question), 6, 0.0, attribution=found))
        maps.append(app.attribution_maps(view, found["attention_shares"]["visual"]))
    (f1, b1), (f2, b2) = maps
    assert np.abs(f1 - f2).sum() > 1e-3, (f1, f2)
    strips = [np.asarray(app.strip_image(view, f, b), dtype=float) for f, b in maps]
    assert np.abs(strips[0] - strips[1]).mean() > 0.01
    overlays = [np.asarray(app.model_image(view, 7, b[7]), dtype=float) for _, b in maps]
    plain = np.asarray(app.model_image(view, 7), dtype=float)
    assert np.abs(overlays[0] - plain).mean() > 1 and np.abs(overlays[0] - overlays[1]).mean() > 0.01


# ------------------------------------------------------------------------------------------------------ in a browser
def _browser_or_skip():
    pytest.importorskip("gradio", reason="gradio is not installed: pip install --no-deps -r requirements-demo.txt")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install --no-deps -r requirements-demo.txt")
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver (.ci/run installs them)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, log=None):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            print(f"[{time.strftime('%H:%M:%S')}] {what}: ok")
            return value
        time.sleep(0.2)
    shown = f"\n--- app log ---\n{log()}" if log else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{shown}")


def test_the_app_in_headless_chromium(tiny_dir, tmp_path):
    chromium, chromedriver = _browser_or_skip()
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    port = _free_port()
    log_path = tmp_path / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log_file:
        app_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--model", str(tiny_dir), "--host", "127.0.0.1", "--port",
             str(port), "--max-new-tokens", "6", "--examples-dir", str(tmp_path / "examples")],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    log = log_path.read_text
    url = f"http://127.0.0.1:{port}/"

    def up():
        assert app_proc.poll() is None, f"app.py exited with {app_proc.returncode}:\n{log()}"
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,2400", f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(arg)
    browser = None
    try:
        _wait(up, 90, "app.py to serve its page", log)
        browser = webdriver.Chrome(service=Service(chromedriver), options=options)
        browser.get(url)

        def text_of(element_id):
            try:
                return browser.find_element(By.ID, element_id).text
            except StaleElementReferenceException:
                return ""

        def upload(path):
            field = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), 30,
                          "the upload field")  # fmt: skip
            field[0].send_keys(str(path))

        # the MNI volume, then the coronal plane
        upload(_mni_t1())
        _wait(lambda: "32 axial slices" in text_of("view-info"), 60, "the MNI volume to load", log)
        assert "visual tokens kept" in text_of("view-info")
        browser.find_element(By.XPATH, "//*[@id='plane']//label[contains(., 'coronal')]").click()
        _wait(lambda: "32 coronal slices" in text_of("view-info"), 60, "the coronal view", log)

        # move the slice slider three steps with the keyboard, as a user would
        slider = browser.find_element(By.CSS_SELECTOR, "#slice input[type=range]")
        browser.execute_script("arguments[0].focus()", slider)  # a click would also move it
        start = int(text_of("view-info").split("slice ")[1].split(" of")[0])
        assert start == 17  # the middle slice (index 16, shown 1-based) comes first
        for _ in range(3):
            slider.send_keys(Keys.ARROW_RIGHT)
        _wait(lambda: f"slice {start + 3} of 32" in text_of("view-info"), 30, f"slice {start + 3}", log)

        # ask; the streamed answer ends in the bot's bubble
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("Is there a lesion?")
        browser.find_element(By.ID, "ask").click()
        bot = _wait(lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")
                             if e.text.strip()], 60, "an answer", log)  # fmt: skip
        answer = bot[-1]
        assert answer and not answer.startswith("error")
        shot = tmp_path / "app_mni_coronal_answer.png"
        browser.save_screenshot(str(shot))
        print(f"\nscreenshot: {shot}\nanswer: {answer!r}")

        # a higher pruning threshold: fewer tokens kept, same slice shown
        kept_before = text_of("view-info").split("visual tokens kept: ")[1].split(" ")[0]
        threshold = browser.find_element(By.CSS_SELECTOR, "#threshold input[type=range]")
        browser.execute_script("arguments[0].focus()", threshold)
        for _ in range(10):
            threshold.send_keys(Keys.ARROW_RIGHT)
        _wait(lambda: "at threshold 0.2" in text_of("view-info"), 30, "threshold 0.2", log)
        info = text_of("view-info")
        assert f"slice {start + 3} of 32" in info
        kept_after = info.split("visual tokens kept: ")[1].split(" ")[0]
        assert int(kept_after.split("/")[0]) < int(kept_before.split("/")[0]), (kept_before, kept_after)

        # a bad upload shows the loader's message; the next upload is served as usual
        bad = tmp_path / "broken.nii.gz"
        bad.write_bytes(b"not a nifti" * 20)
        browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label=Clear]").click()
        upload(bad)
        _wait(lambda: "Could not read" in text_of("view-info"), 30, "the error message", log)
        message = text_of("view-info")
        assert "broken.nii.gz" in message and "NIfTI" in message
        assert not browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")  # a new file, a new chat
        browser.save_screenshot(str(tmp_path / "app_bad_upload.png"))
        browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label=Clear]").click()
        series = tmp_path / "ct5n.zip"
        with zipfile.ZipFile(series, "w") as archive:
            for f in sorted(_ct_series().iterdir()):
                archive.write(f, f"CT5N/{f.name}")
        upload(series)
        # the plane is still coronal: the 5 axial 16x16 slices are resliced into 16 coronal ones
        _wait(lambda: "ct5n.zip: volume, 16 coronal slices" in text_of("view-info"), 60, "the CT series", log)
        assert "CT window: dicom" in text_of("view-info")
        browser.find_element(By.XPATH, "//button[contains(., 'ct_small.dcm')]").click()  # an example
        _wait(lambda: "ct_small.dcm: image" in text_of("view-info"), 30, "the CT example", log)
        assert not any(e.is_displayed() for e in browser.find_elements(By.ID, "strip"))  # one frame: no strip
        assert app_proc.poll() is None
    except BaseException:
        if browser is not None:
            browser.save_screenshot(str(tmp_path / "app_failure.png"))
            print(f"\nscreenshot at the failure: {tmp_path / 'app_failure.png'}")
        raise
    finally:
        if browser is not None:
            browser.quit()
        app_proc.terminate()
        try:
            app_proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            app_proc.kill()
