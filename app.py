"""OmniV-Med demo (Gradio): upload a scan or a video, see what the model sees, ask a question.

    python app.py                          # the embedded default, runs/omnivmed-default/final (trained if missing)
    python app.py --model DIR_OR_HUB_ID    # any OmniV-Med folder or Hub repo
    python app.py --model DIR --host 0.0.0.0 --port 7860 --max-new-tokens 64

On a Hugging Face Space (sdk: gradio) the Space runs `python app.py`; set the Space variable OMNIVMED_MODEL to a Hub
id to serve a trained model instead of training the embedded default at start-up (~8-10 min on 2 CPU cores).

Inputs: PNG / JPEG (and the other pictures Pillow reads), a single DICOM file, NIfTI (.nii, .nii.gz), a .zip of a
DICOM series (nested folders are fine; one series per zip: the loader lists the series of a zip holding more), or a
video (MP4, AVI, MOV, WebM, MKV). Everything is read by the processor's own loader (`media_omnivmed.load_media`), so
the demo shows what the model gets: volumes in RAS with the radiological display convention, sliced along the chosen
plane; CT through the chosen Hounsfield window; videos sampled by the model's fps / frame limit. The "model view"
panels are the resized frames the tower patches, with the token pruning of the chosen threshold drawn on them
(`visualize_pruning`): pruned blocks dimmed, kept blocks outlined. The answer streams as it is generated
(`chat_omnivmed.answer`) with that same threshold.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `omnivmed` (see omnivmed.py) and the scripts live next to this file
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a demo that does not need them

import data_omnivmed  # noqa: E402
from omnivmed.media_omnivmed import WINDOW_PRESETS, Media  # noqa: E402
from omnivmed.processing_omnivmed import OmniVMedImageProcessor  # noqa: E402
from omnivmed_tools import (  # noqa: E402
    TINY_IMAGE_PROCESSOR,
    answer,
    frame_labels,
    load_model,
    montage,
    patches_to_frames,
    write_instrument_video,
)


logger = logging.getLogger("app")

DEFAULT_OUTPUT_DIR = ROOT / "runs" / "omnivmed-default"
DEFAULT_MODEL = DEFAULT_OUTPUT_DIR / "final"
EXAMPLES_DIR = ROOT / "runs" / "demo-examples"
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom", ".nii", ".gz", ".mgz",
                ".zip", ".mp4", ".avi", ".mov", ".webm", ".mkv"]  # fmt: skip
PLANES = ("axial", "coronal", "sagittal")
WINDOWS = ["auto", *WINDOW_PRESETS, "rgb"]
# a zip of a DICOM series is unpacked on the server: bound what one upload may unpack to
ZIP_MAX_FILES = 5000
ZIP_MAX_BYTES = 2 * 1024**3
VIEW_SIDE = 448  # longest side, in screen pixels, of the slice panels
STRIP_TILE = 150  # least width, in pixels, of a slice / frame in the strip (room for its label)
# radiological display (media_omnivmed): the letters at the top / bottom / left / right edges of a slice
ORIENTATION_LETTERS = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}


# ---------------------------------------------------------------------------------------------------------- uploads
def unpack_zip(path: Path, into: Path) -> Path:
    """Unpack a zip of a DICOM series into `into`, refusing entries that would land outside it and archives that
    unpack to more than ZIP_MAX_FILES files or ZIP_MAX_BYTES bytes. Returns `into`."""
    name = path.name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{name}: not a readable zip archive ({error})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise ValueError(f"{name}: the zip archive holds no files")
        if len(members) > ZIP_MAX_FILES:
            raise ValueError(f"{name}: {len(members)} files in the archive, more than the {ZIP_MAX_FILES} allowed")
        total = sum(m.file_size for m in members)
        if total > ZIP_MAX_BYTES:
            raise ValueError(f"{name}: unpacks to {total / 1e9:.1f} GB, more than {ZIP_MAX_BYTES / 1e9:.1f} GB")
        root = into.resolve()
        for member in members:
            target = (root / member.filename).resolve()
            if root not in target.parents:
                raise ValueError(f"{name}: entry {member.filename!r} would be written outside the archive's folder")
        for member in members:
            if Path(member.filename).name.startswith(".") or member.filename.startswith("__MACOSX/"):
                continue  # Finder's resource forks and hidden files are not slices
            archive.extract(member, root)
    return into


def media_source(path: str | Path, workdir: Path) -> Path:
    """What `load_media` should read for an uploaded file: the file itself, or the folder a zip unpacks to."""
    path = Path(path)
    if path.suffix.lower() == ".zip":
        return unpack_zip(path, Path(tempfile.mkdtemp(prefix="series-", dir=workdir)))
    return path


def readable_error(error: Exception, upload: Path, shown_as: str, unpacked: Path | None = None) -> str:
    """The loader's message with the server-side paths replaced by the name the user uploaded (a file inside an
    unpacked zip becomes `name.zip/inner/path`)."""
    text = str(error)
    if unpacked is not None and unpacked != upload:
        for long in {str(unpacked), str(unpacked.resolve())}:
            text = text.replace(long, shown_as)
    for long in sorted({str(upload), str(upload.resolve()), str(upload.parent), str(upload.parent.resolve())},
                       key=len, reverse=True):  # fmt: skip
        text = text.replace(long + os.sep, "").replace(long, shown_as)
    return text


# ------------------------------------------------------------------------------------------------------------- views
@dataclass
class View:
    """One upload as the model sees it under one (plane, window, threshold)."""

    media: Media  # full-resolution frames as loaded (display orientation), for the "scan" panel
    name: str  # the uploaded file's name
    frames: np.ndarray  # (T, h, w, 3) in [0, 1]: the resized frames the tower patches
    keep: np.ndarray  # (T, h / block, w / block) bool: the visual tokens kept by pruning
    block: int  # pixels per visual token side (patch * merge)
    labels: list[str]
    report: dict  # the processor's pruning report
    meta: dict  # the processor's media_metadata entry
    threshold: float
    plane: str
    window: str
    key: tuple = field(default_factory=tuple)  # (upload, plane, window): a new key starts a new conversation


def build_view(upload, image_processor, plane: str = "axial", window: str = "auto", threshold: float | None = None,
               workdir: Path | None = None, media: Media | None = None, name: str | None = None) -> View:  # fmt: skip
    """Load `upload` with the processor's settings (plane and window chosen here) and compute what pruning keeps.
    `media` reuses an already loaded file (only the threshold changed)."""
    upload = Path(upload)
    name = name or upload.name
    workdir = Path(workdir or tempfile.gettempdir())
    options = {"slice_axis": plane}
    if window != "auto":
        options["window"] = window
    source = upload
    try:
        if media is None:
            source = media_source(upload, workdir)
            media = image_processor.to_media(str(source), **options)
        overrides = {} if threshold is None else {"prune_threshold": float(threshold)}
        batch = image_processor([media], return_tensors="pt", **overrides)
    except (ValueError, OSError, RuntimeError) as error:  # MediaError is a ValueError naming the file
        raise ValueError(readable_error(error, upload, name, source)) from None
    finally:
        if source != upload:  # an unpacked zip: the slices are in memory now
            shutil.rmtree(source, ignore_errors=True)
    meta = batch["media_metadata"][0]
    merge, patch = int(batch["merge_sizes"][0]), image_processor.patch_size
    frames = patches_to_frames(batch["pixel_values"], batch["grid_thw"][0], merge, patch,
                               image_processor.image_mean, image_processor.image_std)  # fmt: skip
    t, gh, gw = (int(v) for v in batch["grid_thw"][0])
    keep = batch["visual_keep_mask"].reshape(t, gh // merge, gw // merge).numpy()
    used = image_processor.prune_threshold if threshold is None else float(threshold)
    return View(media, name, frames, keep, merge * patch, frame_labels(meta), meta["pruning_report"], meta, used,
                plane, window, key=(str(upload), plane, window))  # fmt: skip


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without scalable default font
        return ImageFont.load_default()


def scan_image(view: View, index: int) -> Image.Image:
    """Slice / frame `index` at the loaded resolution, scaled for the screen, with orientation letters for volumes."""
    frame = view.media.frames[index]
    image = Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype(np.uint8))
    scale = VIEW_SIDE / max(image.size)
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    metadata = view.media.metadata or {}
    if view.media.kind == "volume" and metadata.get("display") == "radiological":
        top, bottom, left, right = ORIENTATION_LETTERS[metadata.get("slice_axis", view.plane)]
        draw, font = ImageDraw.Draw(image), _font(max(12, image.height // 24))
        w, h = image.size
        for text, xy, anchor in ((top, (w / 2, 4), "mt"), (bottom, (w / 2, h - 4), "mb"), (left, (4, h / 2), "lm"),
                                 (right, (w - 4, h / 2), "rm")):  # fmt: skip
            draw.text(xy, text, fill=(255, 220, 0), font=font, anchor=anchor, stroke_width=2, stroke_fill="black")
    return image


def model_image(view: View, index: int) -> Image.Image:
    """Frame `index` as the tower sees it, pruned blocks dimmed and kept blocks outlined, scaled for the screen."""
    h, w = view.frames.shape[1:3]
    scale = max(1, VIEW_SIDE // max(h, w))
    frames = np.repeat(np.repeat(view.frames[index : index + 1], scale, 1), scale, 2)  # crisp blocks when enlarged
    kept, total = int(view.keep[index].sum()), view.keep[index].size
    title = f"the model sees {kept}/{total} tokens"
    return montage(frames, view.keep[index : index + 1], view.block * scale, [view.labels[index]], title, columns=1)


def strip_image(view: View) -> Image.Image:
    """Every slice / frame the model gets, with the pruning drawn on each: the video's frame strip, the volume's
    slice stack."""
    r = view.report
    title = (f"{view.name}: {r['tokens_after']}/{r['tokens_before']} visual tokens kept "
             f"({100 * r['kept_fraction']:.0f} %) at threshold {view.threshold:g}")  # fmt: skip
    t, h, w = view.frames.shape[:3]
    scale = max(1, math.ceil(STRIP_TILE / w))
    frames = np.repeat(np.repeat(view.frames, scale, 1), scale, 2)  # montage then leaves them as they are
    columns = min(t, max(math.ceil(math.sqrt(t * h / w)), math.ceil(7 * len(title) / (w * scale))))  # title fits
    return montage(frames, view.keep, view.block * scale, view.labels, title, columns)


def describe_view(view: View, index: int) -> str:
    m, r = view.media, view.report
    t = view.frames.shape[0]
    lines = [f"**{view.name}**: {m.kind}"]
    if m.kind == "volume":
        axis = (m.metadata or {}).get("slice_axis", view.plane)
        spacing = "unknown" if m.spacing_mm is None else " x ".join(f"{s:.2g}" for s in m.spacing_mm) + " mm"
        lines[0] += f", {t} {axis} slices (spacing {spacing})"
        if m.slice_positions_mm:
            lines.append(f"slice {index + 1} of {t}, at {m.slice_positions_mm[index]:.1f} mm")
        else:
            lines.append(f"slice {index + 1} of {t}")
    elif m.kind == "video":
        lines[0] += f", {t} frames sampled"
        lines.append(f"frame {index + 1} of {t}" + (f", at {m.timestamps_s[index]:.2f} s" if m.timestamps_s else ""))
    intensity = (m.metadata or {}).get("intensity") or {}
    modality = (m.metadata or {}).get("modality")
    if intensity.get("method") == "window":
        shown = ", ".join(f"{w['name']} (C {w['center']:g} / W {w['width']:g})" for w in intensity["windows"])
        lines.append(f"{modality or 'intensity'} window: {shown}")
    elif intensity.get("method"):
        lines.append(f"{modality + ', ' if modality else ''}intensity: {intensity['method']}")
    lines.append(f"{m.frames.shape[2]}x{m.frames.shape[1]} loaded -> {view.frames.shape[2]}x{view.frames.shape[1]} "
                 f"for the model; visual tokens kept: {r['tokens_after']}/{r['tokens_before']} "
                 f"({100 * r['kept_fraction']:.1f} %) at threshold {view.threshold:g}")  # fmt: skip
    for warning in (m.metadata or {}).get("warnings", []):
        lines.append(f"note: {warning}")
    return "  \n".join(lines)


# ------------------------------------------------------------------------------------------------------------- model
_PROGRESS = re.compile(r"(\d+)/(\d+) \[")  # a tqdm bar: "... 12/400 [00:05<02:41, ...]"
_STAGE = re.compile(r"\bstage (\d+) \((\w+)\) from ")  # train_trl.py's log line when a stage starts


class ModelHolder:
    """The model and processor the demo serves, loaded at once or after training the embedded default in a
    background process (its output is echoed to the terminal and summarised in the page)."""

    def __init__(self, model_path: str | None, device: str = "auto", dtype: str = "auto",
                 output_dir: Path = DEFAULT_OUTPUT_DIR, train_command: list[str] | None = None):  # fmt: skip
        """`model_path` None: the embedded default in `output_dir`/final, trained by `train_command` (default:
        `python train_trl.py --output_dir output_dir`) when missing."""
        self.device, self.dtype = device, dtype
        self.output_dir = Path(output_dir)
        self.train_command = train_command or [sys.executable, "-u", str(ROOT / "train_trl.py"), "--output_dir",
                                               str(self.output_dir)]  # fmt: skip
        self.model = self.processor = None
        self.error = None
        self.lock = threading.Lock()  # one generation at a time: the CPU has no spare cores for two
        self.stage = self.progress = ""
        self.training = None
        self._base_processor = None
        final = self.output_dir / "final"
        if model_path is None and not (final / "config.json").is_file():
            self.path = str(final)
            self.training = threading.Thread(target=self._train_then_load, daemon=True)
            self.training.start()
        else:
            self.path = str(model_path or final)
            self._load()

    def _load(self):
        logger.info("loading %s", self.path)
        self.model, self.processor = load_model(self.path, self.device, self.dtype)

    def _train_then_load(self):
        command = self.train_command
        logger.info("no trained embedded default at %s: training it (%s)", self.path, " ".join(command))
        self.stage = "starting the training (python train_trl.py)"
        try:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            tail = self._follow(proc)
            if proc.wait() != 0 or not (Path(self.path) / "config.json").is_file():
                raise RuntimeError(f"the training exited with code {proc.returncode}: ...{tail[-1500:]}")
            self.stage, self.progress = "trained; loading the model", ""
            self._load()
        except Exception as error:  # shown in the page; the viewer keeps working
            logger.exception("training the embedded default failed")
            self.error = f"{type(error).__name__}: {error}"

    def _follow(self, proc) -> str:
        """Echo the trainer's output (tqdm bars included) and keep the current stage and progress bar line."""
        tail, pending = "", b""
        while chunk := proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096):
            echo = getattr(sys.stderr, "buffer", None)
            if echo is not None:  # the trainer's own progress bars, as they are, in the terminal
                echo.write(chunk)
                sys.stderr.flush()
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for raw in lines:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                tail = (tail + "\n" + line)[-4000:]
                if stage := _STAGE.search(line):
                    self.stage, self.progress = f"stage {stage[1]} of 3 ({stage[2]})", ""
                elif _PROGRESS.search(line):
                    self.progress = line[-160:]
        return tail

    @property
    def ready(self) -> bool:
        return self.model is not None

    def image_processor(self):
        """The model's image processor; while the embedded default trains, one with the settings train_trl.py gives
        it (the tiny preset's, then data_omnivmed.DEFAULT_PROCESSOR), so the viewer shows what it will see."""
        if self.processor is not None:
            return self.processor.image_processor
        if self._base_processor is None:
            settings = {**TINY_IMAGE_PROCESSOR, **data_omnivmed.DEFAULT_PROCESSOR}
            self._base_processor = OmniVMedImageProcessor(**settings)
        return self._base_processor

    def status(self) -> str:
        if self.ready:
            return f"Model: `{self.path}`"
        if self.error:
            return f"**Training the embedded default failed**: {self.error}"
        progress = f"  \n`{self.progress}`" if self.progress else ""
        return (f"**Training the embedded default** (first start only, ~8-10 min on 2 CPU cores; the viewer works "
                f"meanwhile): {self.stage}{progress}")  # fmt: skip

    def stream(self, messages: list[dict], max_new_tokens: int, threshold: float | None):
        """Yield the growing answer text while `chat_omnivmed.answer` generates it in a worker thread."""
        pieces: queue.Queue = queue.Queue()

        class Writer:
            def write(self, text):
                pieces.put(text)

            def flush(self):
                pass

        outcome = {}

        def run():
            try:
                with self.lock:
                    outcome["text"] = answer(self.model, self.processor, messages, max_new_tokens, threshold, Writer())
            except BaseException as error:  # re-raised in the caller's thread
                outcome["error"] = error
            finally:
                pieces.put(None)

        threading.Thread(target=run, daemon=True).start()
        text = ""
        while (piece := pieces.get()) is not None:
            text += piece
            yield text
        if "error" in outcome:
            raise outcome["error"]


# --------------------------------------------------------------------------------------------------------- examples
def build_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """Example inputs from data that ships inside the installed wheels: nilearn's MNI152 T1 (a real 1 mm MR volume),
    pydicom's CT_small.dcm (one real CT slice) and a real 5-slice CT series zipped (dicomdirtests CT5N, 16x16),
    plus a synthesised endoscopy-like video (bench/bench_pruning.py's instrument sweep)."""
    import nilearn
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    mni = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    target = folder / "mni152_t1.nii.gz"
    if not target.is_file():
        shutil.copyfile(mni, target)
    out.append(target)
    target = folder / "ct_small.dcm"
    if not target.is_file():
        shutil.copyfile(get_testdata_file("CT_small.dcm"), target)
    out.append(target)
    target = folder / "ct_series_ct5n.zip"
    if not target.is_file():
        series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
        with zipfile.ZipFile(target.with_suffix(".tmp"), "w", zipfile.ZIP_DEFLATED) as archive:
            for f in sorted(series.iterdir()):
                archive.write(f, f"CT5N/{f.name}.dcm")
        target.with_suffix(".tmp").replace(target)
    out.append(target)
    target = folder / "instrument_sweep.mp4"
    if not target.is_file():
        partial = folder / "instrument_sweep.tmp.mp4"
        write_instrument_video(partial, seconds=8, fps=8, size=224)
        partial.replace(target)
    out.append(target)
    return out


# ---------------------------------------------------------------------------------------------------------------- UI
def build_app(holder: ModelHolder, examples: list[Path] | None = None, max_new_tokens: int = 64):
    import gradio as gr

    workdir = Path(tempfile.mkdtemp(prefix="omnivmed-app-"))
    default_threshold = float(holder.image_processor().prune_threshold)

    def empty_outputs(message: str):
        return (None, message, None, None, None, gr.Slider(minimum=0, maximum=1, value=0, visible=False), [], [])

    def load(upload, plane, window, threshold, view, index):
        """(Re)load on a new upload, plane or window; recompute pruning only on a threshold change (and stay on
        the same slice)."""
        if upload is None:
            return empty_outputs("Upload a scan or a video, or pick an example below.")
        processor = holder.image_processor()
        name = Path(upload).name
        same_file = view is not None and view.key == (str(upload), plane, window)
        try:
            new = build_view(upload, processor, plane, window, threshold, workdir,
                             media=view.media if same_file else None, name=name)  # fmt: skip
        except ValueError as error:
            logger.info("unreadable upload %s: %s", name, error)
            return empty_outputs(f"**Could not read `{name}`**: {error}")
        index = int(min(index or 0, new.frames.shape[0] - 1)) if same_file else new.frames.shape[0] // 2
        label = "slice" if new.media.kind == "volume" else "frame"
        slider = gr.Slider(minimum=0, maximum=max(1, new.frames.shape[0] - 1), value=index, step=1,
                           visible=new.frames.shape[0] > 1, label=label)  # fmt: skip
        chat_reset = ([], []) if not same_file else (gr.skip(), gr.skip())
        strip = gr.Image(strip_image(new), visible=new.frames.shape[0] > 1)
        return (new, describe_view(new, index), scan_image(new, index), model_image(new, index), strip,
                slider, *chat_reset)  # fmt: skip

    def show(index, view):
        if view is None:
            return gr.skip(), gr.skip(), gr.skip()
        index = int(min(max(0, index or 0), view.frames.shape[0] - 1))
        return describe_view(view, index), scan_image(view, index), model_image(view, index)

    def ask(question, history, messages, view, max_tokens):
        question = (question or "").strip()
        if not question:
            yield history, messages, gr.skip()
            return
        history = [*history, {"role": "user", "content": question}]
        if not holder.ready:
            reply = "The model is not ready yet. " + holder.status()
            yield [*history, {"role": "assistant", "content": reply}], messages, ""
            return
        content = [{"type": "text", "text": question}]
        if view is not None and not any(m["role"] == "user" for m in messages):
            content = [{"type": view.media.kind, view.media.kind: view.media}, *content]  # media go with turn one
        turn = [*messages, {"role": "user", "content": content}]
        threshold = None if view is None else view.threshold  # the one the overlay shows
        text = ""
        try:
            for text in holder.stream(turn, int(max_tokens), threshold):
                yield [*history, {"role": "assistant", "content": text}], messages, ""
        except Exception as error:  # e.g. a conversation longer than the model's context
            logger.exception("generation failed")
            yield [*history, {"role": "assistant", "content": f"error: {error}"}], messages, ""
            return
        text = text.strip() or f"(an empty answer: {len(text)} whitespace characters)"
        yield ([*history, {"role": "assistant", "content": text}],
               [*turn, {"role": "assistant", "content": text}], "")  # fmt: skip

    with gr.Blocks(title="OmniV-Med") as demo:
        gr.Markdown("# OmniV-Med\nA medical vision-language model for 2D images, 3D CT / MR volumes and surgical "
                    "videos. Upload a file, look at what the model sees after token pruning, then ask.")  # fmt: skip
        model_status = gr.Markdown(holder.status(), elem_id="model-status")
        view_state = gr.State(None)
        messages_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image, NIfTI, DICOM file, zip of a DICOM series, or video",
                                 file_types=UPLOAD_TYPES, type="filepath", elem_id="upload")  # fmt: skip
                plane = gr.Radio(list(PLANES), value="axial", label="plane (volumes)", elem_id="plane")
                window = gr.Dropdown(WINDOWS, value="auto", label="CT window",
                                     info="auto: the DICOM file's own window, else abdomen for CT; rgb: "
                                          "abdomen / lung / bone as three channels", elem_id="window")  # fmt: skip
                threshold = gr.Slider(0.0, 1.0, value=default_threshold, step=0.01, label="pruning threshold",
                                      info="0 keeps every token; 2D images are never pruned",
                                      elem_id="threshold")  # fmt: skip
                info = gr.Markdown("Upload a scan or a video, or pick an example below.", elem_id="view-info")
            with gr.Column(scale=2):
                index = gr.Slider(0, 1, value=0, step=1, label="slice", visible=False, elem_id="slice")
                with gr.Row():
                    scan = gr.Image(label="scan (display orientation)", type="pil", interactive=False,
                                    format="png", elem_id="scan")  # fmt: skip
                    seen = gr.Image(label="what the model sees (kept blocks outlined)", type="pil", show_label=False,
                                    interactive=False, format="png", elem_id="model-view")  # its title is drawn
                strip = gr.Image(label="all slices / frames given to the model", type="pil", interactive=False,
                                 show_label=False, format="png", elem_id="strip")  # its title is drawn
        with gr.Row():
            with gr.Column():
                chatbot = gr.Chatbot(label="answer", height=260, elem_id="chat")
                with gr.Row():
                    question = gr.Textbox(label="question", placeholder="e.g. Is there a lesion? Which side?",
                                          scale=4, elem_id="question")  # fmt: skip
                    ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                max_tokens = gr.Slider(1, 512, value=max_new_tokens, step=1, label="max new tokens")
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[upload], label="examples (bundled real data)")

        load_inputs = [upload, plane, window, threshold, view_state, index]
        load_outputs = [view_state, info, scan, seen, strip, index, chatbot, messages_state]
        upload.change(load, load_inputs, load_outputs)
        plane.change(load, load_inputs, load_outputs)
        window.change(load, load_inputs, load_outputs)
        threshold.change(load, load_inputs, load_outputs, trigger_mode="always_last")  # drag, keys or typing
        index.change(show, [index, view_state], [info, scan, seen], show_progress="hidden")
        ask_inputs = [question, chatbot, messages_state, view_state, max_tokens]
        ask_outputs = [chatbot, messages_state, question]
        question.submit(ask, ask_inputs, ask_outputs, concurrency_limit=1)
        ask_button.click(ask, ask_inputs, ask_outputs, concurrency_limit=1)
        if not holder.ready:
            timer = gr.Timer(2.0)

            def tick():
                return holder.status(), gr.Timer(active=not holder.ready and holder.error is None)

            timer.tick(tick, None, [model_status, timer], show_progress="hidden")
    demo.queue(default_concurrency_limit=2)
    return demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--model", default=os.environ.get("OMNIVMED_MODEL"),
                        help=f"OmniV-Med folder or Hub id (default: $OMNIVMED_MODEL, else the embedded default at "
                             f"{DEFAULT_MODEL.relative_to(ROOT)}, trained first when missing)")  # fmt: skip
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1 locally)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--examples-dir", type=Path, default=EXAMPLES_DIR, help="where the example inputs are written")
    parser.add_argument("--no-examples", action="store_true", help="do not build the example inputs")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link (needs the network)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up checks of its local URL
    if args.model is not None and not Path(args.model).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        parser.error(f"--model {args.model}: no such folder (and HF_HUB_OFFLINE=1, so no Hub download)")

    started = time.time()
    holder = ModelHolder(args.model, args.device, args.dtype)
    examples = None if args.no_examples else build_examples(args.examples_dir)
    demo = build_app(holder, examples, args.max_new_tokens)
    logger.info("ready in %.1f s", time.time() - started)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
                allowed_paths=[str(args.examples_dir)] if examples else None)  # fmt: skip


if __name__ == "__main__":
    main()
