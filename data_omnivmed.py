"""The embedded default of `train_trl.py`: a small medical VQA dataset built from real data that ships inside pip
wheels, with procedurally planted findings, and the held-out evaluation that goes with it.

Sources (nothing is downloaded):
    nilearn   MNI152 2009a T1 (1 mm, RAS) and its grey / white matter maps
    nibabel   tests/data/anatomical.nii (2 mm, LAS) and tests/data/example4d.nii.gz (4D EPI, LAS)
    pydicom   CT: CT_small.dcm, 693_J2KI.dcm, J2K_pixelrep_mismatch.dcm; MR: MR_small.dcm, examples_overlay.dcm;
              ultrasound: examples_jpeg2k.dcm, examples_rgb_color.dcm, examples_palette.dcm, ExplVR_BigEnd.dcm;
              the CT and MR series under dicomdirtests/
    PyAV      "endoscopic" videos synthesised here (static tissue background, an instrument moving across it)

Tasks (answers are one word; every answer needs the pixels):
    caption     2D   stage 1 target: modality, plane and finding in a short sentence
    modality    2D   CT / MR / ultrasound          3D   CT / MR (DICOM series and NIfTI)
    plane       2D   axial / coronal / sagittal    3D   the same, for a volume sliced along that axis
    lesion      2D, 3D   yes / no: a bright lesion planted in the brain (MR) or a hyperdense one (head CT)
    side        2D, 3D   left / right, in PATIENT coordinates
    level       3D   upper / middle / lower third of the axial slices (superior = upper)
    direction   video    left / right / up / down: where the instrument moves

Left and right are the patient's. Volumes are RAS and slices are shown in the radiological convention
(`media_omnivmed`): axial and coronal slices have the patient's right on the image's LEFT, so a lesion in the
patient's left hemisphere appears on the image's right. The 2D slices written here are rendered with the same rule
(`display_slice`), the NIfTI files keep a correct affine (half of them are stored LAS, which loading undoes), and the
head CT lesions are placed using the DICOM ImageOrientationPatient (columns run toward the patient's left). Videos
have no patient: their left / right / up / down are the image's.

Held-out items are generated from a different random stream: unseen lesion positions and sizes, crops, intensity
changes, slice positions and videos, but the same few source images and patients (the wheels hold one MNI brain, a
handful of CT / MR / ultrasound slices and a few 16x16 DICOM series), so they measure reading the findings, not
generalisation to new anatomy.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from omnivmed.collator_omnivmed import OmniVMedCollator
from omnivmed.media_omnivmed import load_media
from omnivmed_tools import (
    ANSWERS,
    CAPTION_QUESTION,
    QUESTIONS,
    load_rows,
    normalize_answer,
    write_jsonl,
    write_mjpeg,
)


logger = logging.getLogger("data_omnivmed")

# The tiny model trains at a small pixel budget: 2D images at 56x56 (4x4 patches -> 2x2 visual tokens), slices and
# frames within 56x56 (<= 2x2 tokens each, fewer after pruning), 8 slices per volume, 8 frames per video. With 2x2
# tokens each token's own pixels show which side of the brain it holds (the brain's edge); with a 4x4 grid the inner
# columns look alike and the tiny model, whose positions are all relative (RoPE in the tower and in the LLM), could not
# tell left from right within the budget.
IMAGE_SIZE = 56  # 2D images: 56x56 = 4x4 patches of 14 = 2x2 visual tokens
DEFAULT_PROCESSOR = dict(max_pixels=56 * 56, video_max_pixels=56 * 56, max_slices=8, max_frames=8, fps=2.0)
DEFAULT_TRAINING = dict(
    tower_warmup_steps=1500,  # train_trl.warm_up_tower: the tiny tower's stand-in for SigLIP pretraining
    max_steps={1: 40, 2: 400, 3: 600},
    per_device_train_batch_size=8,
    cache_media=4096,
    warmup_ratio=0.05,
    logging_steps=20,
    lr_scheduler_type="cosine",
)
SIZES = {
    # items per source (train / held-out); each item gives one or more question rows
    "full": {
        "train": dict(mni2d=700, ct_head=240, other2d=36, us=30, vol=360, vol_extra=40, dicom=60, video=260),
        "eval": dict(mni2d=90, ct_head=40, other2d=8, us=8, vol=75, vol_extra=12, dicom=36, video=60),
        "replay2d": 400,
    },
    "small": {
        "train": dict(mni2d=24, ct_head=12, other2d=3, us=3, vol=12, vol_extra=4, dicom=6, video=8),
        "eval": dict(mni2d=9, ct_head=4, other2d=1, us=1, vol=6, vol_extra=2, dicom=6, video=4),
        "replay2d": 20,
    },
}

PLANE_SOURCES = ("MNI152 T1", "anatomical.nii", "example4d.nii.gz")
CT_HEADS = ("693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm")


# ---------------------------------------------------------------------------------------------------- orientation
def display_slice(volume_ras: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A slice of a RAS volume in the radiological display convention (the rule of `media_omnivmed`): axial and
    coronal with the patient's right on the image's left and anterior / superior at the top; sagittal with superior
    at the top and anterior on the image's left."""
    s = np.take(volume_ras, index, axis=axis)  # the two remaining axes, in RAS order
    return s.T[::-1, ::-1]


def _distance_mm(shape, center_vox, spacing_mm) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center_vox, spacing_mm)))


def plant_ring_lesion(image: np.ndarray, distance: np.ndarray, radius: float, rim_value: float, core_value,
                      edge: float, inner: float = 0.55) -> np.ndarray:
    """A ring-enhancing lesion (abscess / metastasis look): a bright rim from `inner * radius` to `radius` around a
    dark core, soft edges of width `edge` (same unit as `distance`). A uniform bright disc would be a poor test:
    a uniform patch differs from uniform white matter only in scale, which the tower's LayerNorms remove."""
    outer = np.clip((radius - distance) / edge + 0.5, 0.0, 1.0)
    core = np.clip((inner * radius - distance) / edge + 0.5, 0.0, 1.0)
    rim = outer - core
    return image * (1 - outer) + rim * rim_value + core * core_value


def _pool(volume: np.ndarray, f: int) -> np.ndarray:
    nx, ny, nz = (s // f * f for s in volume.shape)
    v = volume[:nx, :ny, :nz].astype(np.float32)
    return v.reshape(nx // f, f, ny // f, f, nz // f, f).mean(axis=(1, 3, 5))


def _wheel_file(package: str, *parts: str) -> Path:
    import importlib

    return Path(importlib.import_module(package).__file__).parent.joinpath(*parts)


# --------------------------------------------------------------------------------------------------------- the brain
class Brain:
    """The MNI152 T1 cropped to the brain, pooled to `factor` mm voxels, with a brain mask and a RAS affine."""

    def __init__(self, factor: int):
        import nibabel as nib

        folder = _wheel_file("nilearn", "datasets", "data")
        t1 = nib.load(folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
        if nib.aff2axcodes(t1.affine) != ("R", "A", "S"):
            raise RuntimeError("expected the MNI152 template in RAS")
        data = np.asarray(t1.dataobj, dtype=np.float32)
        gm = np.asarray(nib.load(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj, np.float32)
        wm = np.asarray(nib.load(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj, np.float32)
        mask = (gm + wm) > 128
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(0) - 3, 0)
        hi = np.minimum(idx.max(0) + 4, data.shape)
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        self.t1 = _pool(data[crop], factor)
        self.mask = _pool(mask[crop].astype(np.float32), factor) > 0.5
        # voxel (i, j, k) of the pooled crop is the centre of a factor^3 block starting at lo + factor * (i, j, k)
        shift = np.eye(4)
        shift[:3, 3] = lo + (factor - 1) / 2
        scale = np.diag([factor, factor, factor, 1.0])
        self.affine = t1.affine @ shift @ scale
        self.spacing = np.abs(np.diag(self.affine)[:3])
        self.shape = self.t1.shape

    def world(self, vox) -> np.ndarray:
        return (self.affine @ np.r_[np.asarray(vox, float), 1.0])[:3]

    def lesion_center(self, rng, side: str | None = None, level: str | None = None, margin_x_mm=16.0):
        """A voxel inside the brain (2 voxels deep) whose world x puts it in the patient's `side` (RAS: x < 0 is
        the patient's left) and whose axial index lies in the middle half of the `level` third of the slices."""
        if not hasattr(self, "_candidates"):
            candidates = np.argwhere(self.mask)
            self._candidates = candidates[self._inside(candidates, 2)]
            self._world = self._candidates @ self.affine[:3, :3].T + self.affine[:3, 3]
        candidates, world = self._candidates, self._world
        keep = np.ones(len(candidates), bool)
        if side == "left":
            keep &= world[:, 0] <= -margin_x_mm
        elif side == "right":
            keep &= world[:, 0] >= margin_x_mm
        if level is not None:
            third = self.shape[2] / 3
            lo = {"lower": 0, "middle": 1, "upper": 2}[level] * third
            k = candidates[:, 2] + 0.5
            keep &= (k >= lo + 0.25 * third) & (k <= lo + 0.75 * third)
        pool = candidates[keep]
        return pool[rng.integers(len(pool))]

    def _inside(self, vox, r):
        m = self.mask
        ok = np.ones(len(vox), bool)
        for axis in range(3):
            for d in (-r, r):
                v = vox.copy()
                v[:, axis] = np.clip(v[:, axis] + d, 0, m.shape[axis] - 1)
                ok &= m[v[:, 0], v[:, 1], v[:, 2]]
        return ok

    def sample(self, rng, lesion: bool, side=None, level=None, radius_mm=None, noise=True):
        """(RAS volume, info): intensity jitter, a smooth bias field, noise and optionally a bright ball; uint8, or
        float32 without noise (`noise=False`: the caller adds it to the slice it keeps)."""
        scale = rng.uniform(0.5, 0.62)
        zz = np.linspace(-1, 1, self.shape[2])[None, None, :]
        xx = np.linspace(-1, 1, self.shape[0])[:, None, None]
        bias = 1 + rng.uniform(-0.08, 0.08) * zz + rng.uniform(-0.08, 0.08) * xx
        vol = self.t1 * scale * bias
        if noise:
            vol = vol + rng.normal(0, 3.0, self.shape)
        info = {"lesion": "yes" if lesion else "no"}
        if lesion:
            radius = radius_mm if radius_mm is not None else rng.uniform(16.0, 22.0)
            # the whole ring in one hemisphere: its centre at least a radius from the midline
            center = self.lesion_center(rng, side, level, margin_x_mm=max(16.0, radius))
            distance = _distance_mm(self.shape, center, self.spacing)
            vol = plant_ring_lesion(vol, distance, radius, rng.uniform(235, 252), vol * rng.uniform(0.2, 0.35),
                                    edge=0.75 * float(self.spacing.min()))  # fmt: skip
            x_mm = self.world(center)[0]
            nz = self.shape[2]
            info.update(
                side="left" if x_mm < 0 else "right",
                level=("lower", "middle", "upper")[min(2, int((center[2] + 0.5) / (nz / 3)))],
                center_vox=[int(c) for c in center],
                center_mm=[round(float(c), 1) for c in self.world(center)],
                radius_mm=round(float(radius), 1),
            )
            if side is not None and info["side"] != side or level is not None and info["level"] != level:
                raise AssertionError(f"lesion placement disagrees with its label: {info}")
        if not noise:
            return vol.astype(np.float32), info
        return np.clip(vol, 0, 255).astype(np.uint8), info


def _save_nifti(path: Path, volume_ras: np.ndarray, affine: np.ndarray, las: bool):
    """Write a RAS volume, optionally stored LAS (x flipped, affine changed to match: same world, other array)."""
    import nibabel as nib

    data, aff = volume_ras, affine
    if las:
        flip = np.eye(4)
        flip[0, 0] = -1
        flip[0, 3] = volume_ras.shape[0] - 1
        data, aff = volume_ras[::-1], affine @ flip
    image = nib.Nifti1Image(np.ascontiguousarray(data), aff)
    image.set_qform(aff, code=1)
    image.set_sform(aff, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def _to_uint8(x: np.ndarray, lo=None, hi=None) -> np.ndarray:
    x = x.astype(np.float32)
    lo = np.percentile(x, 0.5) if lo is None else lo
    hi = np.percentile(x, 99.5) if hi is None else hi
    return (np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _save_png(path: Path, pixels: np.ndarray):
    """Pad to a square (black, centred: no shift of left / right) and resize to IMAGE_SIZE, so that every 2D image
    gives the same 4x4 grid of visual tokens (the tiny model reads positions from the token order)."""
    from PIL import Image

    h, w = pixels.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side) + pixels.shape[2:], pixels.dtype)
    y0, x0 = (side - h) // 2, (side - w) // 2
    square[y0 : y0 + h, x0 : x0 + w] = pixels
    image = Image.fromarray(np.ascontiguousarray(square)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _crop(rng, img: np.ndarray, min_frac=0.75) -> np.ndarray:
    h, w = img.shape[:2]
    f = rng.uniform(min_frac, 1.0)
    ch, cw = max(8, int(h * f)), max(8, int(w * f))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return img[y : y + ch, x : x + cw]


# --------------------------------------------------------------------------------------------------------------- 2D
def _dicom_array(name: str):
    import pydicom
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(name))
        arr = ds.pixel_array.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return ds, arr * slope + intercept


def _mni2d_items(rng, brain: Brain, n: int, root: Path, prefix: str) -> list[dict]:
    items = []
    planes = ["axial", "coronal", "sagittal"]
    for i in range(n):
        plane = planes[i % 3] if i % 5 else planes[rng.integers(2)]  # more axial/coronal: they carry lesion tasks
        axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
        lesion = plane != "sagittal" and bool(rng.integers(2))
        side = ("left", "right")[rng.integers(2)] if lesion else None
        vol, info = brain.sample(rng, lesion, side=side, radius_mm=rng.uniform(18.0, 26.0), noise=False)
        if lesion:
            index = info["center_vox"][axis]
        else:
            extent = np.argwhere(brain.mask.any(axis=tuple(a for a in range(3) if a != axis)))[:, 0]
            lo, hi = extent.min(), extent.max()
            index = int(rng.integers(lo + (hi - lo) // 5, hi - (hi - lo) // 5 + 1))
        pixels = display_slice(vol, axis, index)
        pixels = np.clip(pixels + rng.normal(0, 3.0, pixels.shape), 0, 255).astype(np.uint8)
        path = root / "images" / f"{prefix}mni_{i:04d}.png"
        _save_png(path, pixels)
        item = {"path": path, "modality": "MR", "plane": plane, "source": "MNI152 T1"}
        if plane != "sagittal":
            item["lesion"] = info["lesion"]
            if lesion:
                item["side"] = info["side"]
        items.append(item)
    return items


def _ct_head_items(rng, n: int, root: Path, prefix: str) -> list[dict]:
    """Head CT slices with a hyperdense lesion (or none), brain window, random crops. DICOM rows run toward the
    patient's left (ImageOrientationPatient row cosine +x in LPS), so image columns increase toward patient left."""
    items = []
    sources = []
    for name in CT_HEADS:
        ds, hu = _dicom_array(name)
        row_cos = [float(v) for v in ds.ImageOrientationPatient[:3]]
        if row_cos[0] < 0.9:
            raise RuntimeError(f"{name}: expected rows running toward the patient's left")
        brain = (hu > 15) & (hu < 50)
        cols = np.argwhere(brain)[:, 1]
        midline = 0.5 * (cols.min() + cols.max())
        sources.append((name, hu, brain, midline))
    for i in range(n):
        name, hu, brain, midline = sources[i % len(sources)]
        img = hu.copy()
        lesion = bool(rng.integers(2))
        item = {"modality": "CT", "plane": "axial", "source": name, "lesion": "yes" if lesion else "no"}
        if lesion:
            side = ("left", "right")[rng.integers(2)]
            radius = rng.uniform(40, 56)  # pixels (~0.45 mm each)
            ys, xs = np.nonzero(brain)
            # patient left = image right (larger column)
            ok = (xs > midline + radius + 10) if side == "left" else (xs < midline - radius - 10)
            ok &= (ys > ys.min() + 2 * radius) & (ys < ys.max() - 2 * radius)
            pick = rng.integers(ok.sum())
            cy, cx = ys[ok][pick], xs[ok][pick]
            yy, xx = np.ogrid[: img.shape[0], : img.shape[1]]
            distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            img = plant_ring_lesion(img, distance, radius, rng.uniform(85, 100), rng.uniform(5, 15), edge=3.0)
            item["side"] = side
        center, width = rng.uniform(30, 45), rng.uniform(80, 110)
        pixels = _to_uint8(img, center - width / 2, center + width / 2)
        # crop: random scale and vertical offset, centred on the head's midline (never flipped), so that the
        # midline stays between the left and right halves of the image
        h, wd = pixels.shape
        f = rng.uniform(0.8, 1.0)
        ch, cw = int(h * f), min(int(wd * f), 2 * int(min(midline, wd - midline)))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(round(midline - cw / 2))
        if lesion:  # keep the lesion inside the crop
            y0 = int(np.clip(y0, cy + radius - ch + 4, cy - radius - 4))
            y0 = max(0, min(y0, h - ch))
        path = root / "images" / f"{prefix}cthead_{i:04d}.png"
        _save_png(path, pixels[y0 : y0 + ch, x0 : x0 + cw])
        items.append({"path": path, **item})
    return items


def _other2d_items(rng, n: int, n_us: int, root: Path, prefix: str) -> list[dict]:
    """Modality / plane items from the other slices: neck CT, MR slices (knee/head, abdomen, low-res brains, EPI),
    ultrasound frames."""
    import nibabel as nib

    from pydicom.data import get_testdata_file

    items = []
    _, ct_small = _dicom_array("CT_small.dcm")
    _, mr_small = _dicom_array("MR_small.dcm")
    _, overlay = _dicom_array("examples_overlay.dcm")
    for i in range(n):
        window = (rng.uniform(20, 60), rng.uniform(300, 500))
        pixels = _to_uint8(_crop(rng, ct_small), window[0] - window[1] / 2, window[0] + window[1] / 2)
        path = root / "images" / f"{prefix}ctneck_{i:04d}.png"
        _save_png(path, pixels)
        items.append({"path": path, "modality": "CT", "plane": "axial", "source": "CT_small.dcm"})
        for name, arr in (("MR_small.dcm", mr_small), ("examples_overlay.dcm", overlay)):
            path = root / "images" / f"{prefix}{name.split('.')[0].lower()}_{i:04d}.png"
            _save_png(path, _to_uint8(_crop(rng, arr) * rng.uniform(0.9, 1.1)))
            items.append({"path": path, "modality": "MR", "plane": "axial", "source": name})
    volumes = [
        ("anatomical.nii", nib.as_closest_canonical(nib.load(_wheel_file("nibabel", "tests", "data", "anatomical.nii")))),
        ("example4d.nii.gz", nib.as_closest_canonical(nib.load(_wheel_file("nibabel", "tests", "data", "example4d.nii.gz")))),
    ]  # fmt: skip
    for i in range(n):
        for name, image in volumes:
            data = np.asarray(image.dataobj, dtype=np.float32)
            if data.ndim == 4:
                data = data[..., rng.integers(data.shape[3])]
            plane = ("axial", "coronal", "sagittal")[(i + len(name)) % 3]
            axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
            n_axis = data.shape[axis]
            index = int(rng.integers(n_axis // 4, n_axis - n_axis // 4))
            pixels = _to_uint8(display_slice(data, axis, index) * rng.uniform(0.9, 1.1))
            path = root / "images" / f"{prefix}{name.split('.')[0]}_{i:04d}.png"
            # upsample the tiny slices (33x41, 24-row EPI sections) so they survive the min_pixels floor
            _save_png(path, pixels)
            items.append({"path": path, "modality": "MR", "plane": plane, "source": name})
    us = []
    for name in ("examples_jpeg2k.dcm", "examples_rgb_color.dcm", "examples_palette.dcm", "ExplVR_BigEnd.dcm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = load_media(get_testdata_file(name)).frames
        us.append((name, (frames[0] * 255).astype(np.uint8)))
    for i in range(n_us):
        for name, rgb in us:
            path = root / "images" / f"{prefix}us_{name.split('.')[0]}_{i:04d}.png"
            _save_png(path, _crop(rng, rgb, 0.6))
            items.append({"path": path, "modality": "ultrasound", "source": name})
    return items


def _caption(item: dict) -> str:
    modality = {"CT": "CT", "MR": "MR", "ultrasound": "Ultrasound"}[item["modality"]]
    parts = [f"{modality} image"]
    if "plane" in item:
        parts.append(f"{item['plane']} plane")
    if item.get("lesion") == "yes":
        parts.append(f"lesion on the patient's {item['side']}")
    elif item.get("lesion") == "no":
        parts.append("no lesion")
    return ", ".join(parts) + "."


# --------------------------------------------------------------------------------------------------------------- 3D
def _volume_items(rng, brain: Brain, n: int, n_extra: int, root: Path, prefix: str) -> list[dict]:
    """MNI-derived volumes (lesion / side / level / plane) and NIfTI copies of the nibabel volumes (plane, MR)."""
    import nibabel as nib

    items = []
    combos = [(s, lv) for s in ("left", "right") for lv in ("lower", "middle", "upper")]
    for i in range(n):
        lesion = i % 3 != 2  # 2/3 with a lesion: side and level questions need one
        side, level = combos[(i // 3 * 2 + i % 3) % len(combos)] if lesion else (None, None)
        vol, info = brain.sample(rng, lesion, side=side, level=level)
        path = root / "volumes" / f"{prefix}mni_{i:04d}.nii.gz"
        las = bool(rng.integers(2))
        _save_nifti(path, vol, brain.affine, las=las)
        info.update(path=path, modality="MR", source="MNI152 T1", stored="LAS" if las else "RAS")
        if i % 3 == 0:  # a plane question on a third of them (learned fast)
            info["plane"] = ("axial", "coronal", "sagittal")[rng.integers(3)]
        items.append(info)
    for i in range(n_extra):
        name = ("anatomical.nii", "example4d.nii.gz")[i % 2]
        image = nib.load(_wheel_file("nibabel", "tests", "data", name))
        data = np.asarray(image.dataobj, dtype=np.float32)
        if data.ndim == 4:
            data = data[..., i // 2 % data.shape[3]]
        data = data * rng.uniform(0.85, 1.15) + rng.normal(0, 0.01 * float(data.max()), data.shape)
        path = root / "volumes" / f"{prefix}{name.split('.')[0]}_{i:04d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.clip(data, 0, None).astype(np.int16), image.affine), path)
        items.append({"path": path, "modality": "MR", "source": name,
                      "plane": ("axial", "coronal", "sagittal")[rng.integers(3)]})  # fmt: skip
    return items


DICOM_SERIES = {
    "CT": ["77654033/CT2", "98892001/CT5N"],
    "MR": ["98892003/MR700", "98892003/MR2"],
}


def _dicom_series_items(rng, n: int, root: Path, prefix: str) -> list[dict]:
    """Perturbed copies of the dicomdirtests CT and MR series (intensity and noise; new UIDs), one folder each."""
    import pydicom
    from pydicom.uid import generate_uid

    base = _wheel_file("pydicom", "data", "test_files", "dicomdirtests")
    series = []
    for modality, folders in DICOM_SERIES.items():
        for folder in folders:
            groups = defaultdict(list)
            for f in sorted((base / folder).iterdir()):
                ds = pydicom.dcmread(f)
                groups[ds.SeriesInstanceUID].append(ds)
            best = max(groups.values(), key=len)  # MR2 holds a 1-slice localizer and two 3-slice pilots
            series.append((modality, folder, best))
    items = []
    order = [0, 1, 0, 1, 2, 3]  # CT2, CT5N, CT2, CT5N, MR700, MR2: 2/3 CT (the MR side adds NIfTI volumes)
    for i in range(n):
        modality, folder, datasets = series[order[i % len(order)]]
        out = root / "dicom" / f"{prefix}{folder.replace('/', '_')}_{i:04d}"
        out.mkdir(parents=True, exist_ok=True)
        uid = generate_uid(entropy_srcs=[prefix, folder, str(i)])
        gain = rng.uniform(0.9, 1.1)
        for j, ds in enumerate(datasets):
            ds = ds.copy()
            arr = ds.pixel_array.astype(np.float32)
            info = np.iinfo(ds.pixel_array.dtype)
            noisy = arr * gain + rng.normal(0, 0.02 * max(1.0, float(arr.std())), arr.shape)
            ds.PixelData = np.clip(np.round(noisy), info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[prefix, folder, str(i), str(j)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(out / f"IM{j:04d}.dcm", enforce_file_format=True)
        items.append({"path": out, "modality": modality, "source": f"dicomdirtests/{folder}"})
    return items


# ------------------------------------------------------------------------------------------------------------ video
def _tissue_background(rng, size: int) -> np.ndarray:
    """A static "endoscopic" view: smooth pink-red tissue, a few specular highlights, a dark circular vignette."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    tone = np.zeros((size, size), np.float32)
    for _ in range(6):
        cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.35)
        tone += rng.uniform(-0.5, 0.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    tone = (tone - tone.min()) / (np.ptp(tone) + 1e-6)
    rgb = np.stack([0.55 + 0.35 * tone, 0.18 + 0.25 * tone, 0.2 + 0.2 * tone], -1)
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        rgb += 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.012**2))[..., None]
    r = np.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2)
    rgb *= np.clip((0.5 - r) / 0.06, 0, 1)[..., None]
    return np.clip(rgb, 0, 1)


def _draw_instrument(frame: np.ndarray, cy: float, cx: float, angle: float, length: float, width: float, shade):
    yy, xx = _grid(frame.shape[0])
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    body = np.clip(np.minimum(length / 2 - np.abs(u), width / 2 - np.abs(v)) + 0.5, 0, 1)
    metal = shade * (0.75 + 0.25 * np.cos(v / max(width, 1) * np.pi))[..., None]
    frame *= 1 - body[..., None]
    frame += body[..., None] * metal
    return frame


_GRIDS = {}


def _grid(size: int):
    if size not in _GRIDS:
        _GRIDS[size] = np.mgrid[0:size, 0:size].astype(np.float32)
    return _GRIDS[size]


def _video_items(rng, n: int, root: Path, prefix: str, size=112, fps=8, seconds=4.0) -> list[dict]:
    items = []
    directions = ANSWERS["direction"]
    steps = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    for i in range(n):
        direction = directions[i % 4]
        background = _tissue_background(rng, size)
        travel = rng.uniform(0.4, 0.55) * size
        dy, dx = steps[direction]
        # the instrument's centre stays inside the visible disc; its tip may reach past the rim, as a real one does
        start_along = rng.uniform(-0.05, 0.05) * size - travel / 2
        across = rng.uniform(-0.12, 0.12) * size
        # as big as a grasper's jaws near the scope: the model sees the video at 56 x 56 (4 x 4 patches), where the
        # earlier 18-28 x 7-11 px instrument covered a fifth of one patch and direction stayed at chance
        angle, length, width = rng.uniform(0, np.pi), rng.uniform(36, 56), rng.uniform(14, 22)
        shade = np.array([0.8, 0.82, 0.85]) * rng.uniform(0.85, 1.05)
        n_frames = int(seconds * fps)
        frames = np.empty((n_frames, size, size, 3), np.uint8)
        for t in range(n_frames):
            along = start_along + travel * t / (n_frames - 1)
            cy = size / 2 + dy * along + (across if dx else 0)
            cx = size / 2 + dx * along + (across if dy else 0)
            frame = _draw_instrument(background.copy(), cy, cx, angle, length, width, shade)
            frames[t] = (np.clip(frame, 0, 1) * 255).astype(np.uint8)
        path = root / "videos" / f"{prefix}endo_{i:04d}.avi"
        write_mjpeg(path, frames, fps, options={"q:v": "2"})
        items.append({"path": path, "direction": direction, "modality": "endoscopy", "source": "synthetic (PyAV)"})
    return items


# ------------------------------------------------------------------------------------------------------------- rows
def _rel(path: Path, root: Path) -> str:
    return str(Path(path).relative_to(root))


def _llava(kind: str, path: str, question: str, answer: str, task: str, **meta) -> dict:
    """A LLaVA / VideoLLaMA3-style row."""
    return {
        kind: path,
        "conversations": [{"from": "human", "value": f"<{kind}>\n{question}"}, {"from": "gpt", "value": answer}],
        "task": task,
        "kind": kind,
        "answer": answer,
        **meta,
    }


def _messages(kind: str, block: dict, question: str, answer: str, task: str, **meta) -> dict:
    """A TRL messages-style row (a media block may carry load options such as slice_axis)."""
    return {
        "messages": [
            {"role": "user", "content": [{"type": kind, **block}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "task": task,
        "kind": kind,
        "answer": answer,
        **meta,
    }


def _questions(rng, item: dict, tasks) -> list[tuple[str, str, str]]:
    return [(t, QUESTIONS[t][rng.integers(2)], item[t]) for t in tasks if t in item]


def _rows_2d(rng, items: list[dict], root: Path) -> list[dict]:
    """One row per question (single-turn, as evaluated)."""
    rows = []
    for item in items:
        path = _rel(item["path"], root)
        tasks = [t for t in ("modality", "plane", "lesion", "side") if t in item]
        if item["source"] not in PLANE_SOURCES:
            tasks = [t for t in tasks if t != "plane"]  # the other slices are all axial
        if item["source"] in ("MNI152 T1",) + CT_HEADS and rng.random() < 0.85:
            tasks = [t for t in tasks if t != "modality"]  # learned fast: spend the steps on the lesion questions
        rows += [_llava("image", path, q, a, t, source=item["source"]) for t, q, a in _questions(rng, item, tasks)]
    return rows


def _rows_3d(rng, items: list[dict], root: Path) -> list[dict]:
    rows = []
    for item in items:
        path = _rel(item["path"], root)
        meta = {"source": item["source"]}
        for task, q, a in _questions(rng, item, ("lesion", "side", "level")):  # on the default (axial) slicing
            rows.append(_messages("volume", {"path": path}, q, a, task, **meta))
        if "plane" in item:
            block = {"path": path, "slice_axis": item["plane"]}
            if item["source"] == "example4d.nii.gz":
                block["volume_index"] = 0
            rows.append(_messages("volume", block, QUESTIONS["plane"][rng.integers(2)], item["plane"], "plane", **meta))
    return rows


def _modality_3d_rows(rng, dicom_items, mr_items, root: Path) -> list[dict]:
    rows = []
    for item in dicom_items + mr_items:
        block = {"path": _rel(item["path"], root)}
        if item["source"] == "example4d.nii.gz":
            block["volume_index"] = 0
        rows.append(_messages("volume", block, QUESTIONS["modality"][rng.integers(2)], item["modality"], "modality",
                              source=item["source"]))  # fmt: skip
    return rows


def _video_rows(rng, items, root: Path) -> list[dict]:
    return [
        _llava("video", _rel(it["path"], root), QUESTIONS["direction"][rng.integers(2)], it["direction"], "direction",
               source=it["source"])  # fmt: skip
        for it in items
    ]


def _media_key(row: dict) -> str:
    if "messages" in row:
        return json.dumps(row["messages"][0]["content"][0], sort_keys=True)  # the media block, load options included
    return json.dumps({k: row[k] for k in ("image", "volume", "video") if k in row}, sort_keys=True)


def multi_turn(rng, rows: list[dict]) -> list[dict]:
    """Training rows: every question about one media item (same file, same load options) in one conversation, in a
    random order (the lesion question before those that presume a lesion), the media attached to the first turn. One encoding of the pixels then supervises several answers,
    which is what lets the tiny model learn the questions that need the pixels' details within the CPU budget.
    Held-out rows stay single-turn, as they are scored."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_media_key(row), []).append(row)
    merged = []
    for group in groups.values():
        group = [group[i] for i in rng.permutation(len(group))]
        tasks = [r["task"] for r in group]
        if "lesion" in tasks and {"side", "level"} & set(tasks):
            # "is there a lesion?" before the questions that presume one: asked after them, its answer would be
            # given away by the conversation instead of read from the pixels
            lesion = group.pop(tasks.index("lesion"))
            group.insert(min(i for i, r in enumerate(group) if r["task"] in ("side", "level")), lesion)
        first = group[0]
        if "messages" in first:
            messages = []
            for i, row in enumerate(group):
                user, assistant = row["messages"]
                content = user["content"] if i == 0 else [b for b in user["content"] if b["type"] == "text"]
                messages += [{"role": "user", "content": content}, assistant]
            out = {**first, "messages": messages}
        else:
            turns = []
            for i, row in enumerate(group):
                human, gpt = row["conversations"]
                value = human["value"] if i == 0 else human["value"].split("\n", 1)[1]  # the <image> tag once
                turns += [{"from": "human", "value": value}, gpt]
            out = {**first, "conversations": turns}
        out.update(task="+".join(r["task"] for r in group), answer=" / ".join(r["answer"] for r in group))
        merged.append(out)
    return merged


def default_paths(root: Path) -> dict:
    root = Path(root)
    return {name: root / f"{name}.jsonl" for name in ("stage1", "stage2", "stage3", "eval")}


def build_default_dataset(root: Path, seed: int = 0, size: str = "full") -> dict:
    """Write images, volumes, DICOM series, videos and the stage / eval JSONL files under `root` (reused when a
    previous build with the same seed and size is there). Returns `default_paths(root)`."""
    root = Path(root).resolve()
    manifest = root / "manifest.json"
    wanted = {"seed": seed, "size": size, "version": 5, "processor": DEFAULT_PROCESSOR}
    if manifest.exists() and json.loads(manifest.read_text()).get("build") == wanted:
        logger.info("embedded default dataset already built in %s", root)
        return default_paths(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    n = SIZES[size]
    from tqdm.auto import tqdm

    logger.info("building the embedded default dataset in %s (seed %d, %s)", root, seed, size)
    brain2d, brain3d = Brain(factor=2), Brain(factor=3)
    splits = {}
    progress = tqdm(total=12, desc="embedded dataset", unit="part")
    for split in ("train", "eval"):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        prefix = "" if split == "train" else "eval_"
        k = n[split]
        images = _mni2d_items(rng, brain2d, k["mni2d"], root, prefix)
        progress.update()
        images += _ct_head_items(rng, k["ct_head"], root, prefix)
        progress.update()
        images += _other2d_items(rng, k["other2d"], k["us"], root, prefix)
        progress.update()
        volumes = _volume_items(rng, brain3d, k["vol"], k["vol_extra"], root, prefix)
        progress.update()
        dicom = _dicom_series_items(rng, k["dicom"], root, prefix)
        progress.update()
        videos = _video_items(rng, k["video"], root, prefix)
        progress.update()
        # modality of volumes: CT = the CT DICOM copies; MR = the MR DICOM copies and as many MR NIfTI volumes
        n_ct = sum(d["modality"] == "CT" for d in dicom)
        n_mr = n_ct - sum(d["modality"] == "MR" for d in dicom)
        nifti = [v for v in volumes if v["source"] != "MNI152 T1"] + [v for v in volumes if v["source"] == "MNI152 T1"]
        mr_volumes = [nifti[i] for i in rng.permutation(len(nifti))[: max(0, n_mr)]]
        splits[split] = dict(
            captions=[_llava("image", _rel(it["path"], root), CAPTION_QUESTION, _caption(it), "caption",
                             source=it["source"]) for it in images],  # fmt: skip
            rows2d=_rows_2d(rng, images, root),
            rows3d=_rows_3d(rng, volumes, root) + _modality_3d_rows(rng, dicom, mr_volumes, root),
            video=_video_rows(rng, videos, root),
        )
    progress.close()

    train = splits["train"]
    rng = np.random.default_rng([seed, 2])
    rows2d = multi_turn(rng, train["rows2d"])
    replay = [rows2d[i] for i in rng.permutation(len(rows2d))[: n["replay2d"]]]
    stage3 = multi_turn(rng, train["rows3d"]) + train["video"] + replay
    for rows in (train["captions"], rows2d, stage3):
        rng.shuffle(rows)
    evaluation = splits["eval"]["rows2d"] + splits["eval"]["rows3d"] + splits["eval"]["video"]
    paths = default_paths(root)
    write_jsonl(paths["stage1"], train["captions"])
    write_jsonl(paths["stage2"], rows2d)
    write_jsonl(paths["stage3"], stage3)
    write_jsonl(paths["eval"], evaluation)
    counts = {name: sum(1 for _ in open(p)) for name, p in paths.items()}
    manifest.write_text(json.dumps({"build": wanted, "rows": counts}, indent=2))
    logger.info("embedded default dataset: %s", counts)
    return paths


# ------------------------------------------------------------------------------------------------------- evaluation
def first_line(text: str) -> str:
    """The reply's first line: the tiny model may go on past its one-word answer within max_new_tokens."""
    return text.strip().splitlines()[0] if text.strip() else ""


def score_rows(rows: list[dict], answers: list[str]) -> dict:
    """Exact match of the normalised answer (omnivmed_tools.normalize_answer of the reply's first line), per
    (task, kind); chance = 1 / number of answers of the task, majority = the share of the most frequent expected answer
    among these rows."""
    groups = defaultdict(list)
    for row, answer in zip(rows, answers):
        meta = json.loads(row["meta"])
        groups[(meta["task"], meta["kind"])].append(
            (normalize_answer(meta["answer"]), normalize_answer(first_line(answer)))
        )
    table = []
    for (task, kind), pairs in sorted(groups.items(), key=lambda kv: (["image", "volume", "video"].index(kv[0][1]), kv[0][0])):
        expected = [e for e, _ in pairs]
        options = ANSWERS[task] if not (task == "modality" and kind == "volume") else ("CT", "MR")
        majority = max(expected.count(e) for e in set(expected)) / len(expected)
        table.append(
            dict(task=task, kind=kind, n=len(pairs), accuracy=sum(e == a for e, a in pairs) / len(pairs),
                 chance=1 / len(options), majority=majority)  # fmt: skip
        )
    return {"table": table}


def format_table(table: list[dict]) -> str:
    lines = ["| task | input | n | accuracy | chance | majority answer |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['task']} | {r['kind']} | {r['n']} | {r['accuracy']:.0%} | {r['chance']:.0%} | "
                     f"{r['majority']:.0%} |")  # fmt: skip
    return "\n".join(lines)


def evaluate_default(model_dir: Path, eval_jsonl: Path, data_root: Path, batch_size: int = 16, examples: int = 8,
                     prune_stage: str | None = None) -> dict:  # fmt: skip
    """Load the saved model through the Auto classes, answer the held-out questions (greedy), score them;
    `prune_stage` in place of the checkpoint's."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor


    stage = {} if prune_stage is None else {"prune_stage": prune_stage}
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True, **stage).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    rows = load_rows([eval_jsonl], data_root)
    collator = OmniVMedCollator(processor)
    answers = []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(rows), batch_size), desc="held-out questions", unit="batch"):
        batch_rows = rows[start : start + batch_size]
        conversations = [collator.conversation(r, drop_last_assistant=True) for r in batch_rows]
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            padding=True, padding_side="left",
        )  # fmt: skip
        inputs.pop("media_metadata", None)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += processor.batch_decode(new, skip_special_tokens=True)
    report = score_rows(rows, answers)
    # a few held-out questions, one per task and input kind where possible
    shown, seen = [], set()
    for row, answer in zip(rows, answers):
        meta = json.loads(row["meta"])
        key = (meta["task"], meta["kind"])
        if key in seen:
            continue
        seen.add(key)
        question = next(b["text"] for b in json.loads(row["messages"])[0]["content"] if b["type"] == "text")
        media = next(b for b in json.loads(row["messages"])[0]["content"] if b["type"] != "text")
        shown.append(dict(media=media.get("path"), question=question, expected=meta["answer"], answer=answer.strip()))
        if len(shown) >= examples:
            break
    overall = sum(r["accuracy"] * r["n"] for r in report["table"]) / max(1, sum(r["n"] for r in report["table"]))
    text = ["", f"Held-out accuracy (exact match, greedy decoding, prune_stage {model.config.prune_stage}):",
            format_table(report["table"]),
            f"overall: {overall:.1%} on {len(rows)} questions", "", "Examples (question / expected / answer):"]  # fmt: skip
    for s in shown:
        text.append(f"  [{s['media']}] {s['question']} / {s['expected']} / {s['answer']!r}")
    report.update(text="\n".join(text), examples=shown, overall=overall, n=len(rows), prune_stage=model.config.prune_stage)
    return report


def append_results_to_card(model_dir: Path, report: dict):
    card = Path(model_dir) / "README.md"
    text = card.read_text()
    text += (
        "\n## Embedded default results\n\nTrained by `python train_trl.py` (no arguments) on the embedded default "
        "dataset (`data_omnivmed.py`: MNI152, nibabel and pydicom test data with planted lesions, synthetic "
        "endoscopy videos). Held-out questions, exact match. A task whose accuracy is not above both chance and "
        "the majority-answer rate has not been learned by this tiny model in the default budget.\n\n"
        + format_table(report["table"]) + "\n"
    )
    card.write_text(text)
