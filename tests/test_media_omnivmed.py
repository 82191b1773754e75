"""Tests for media_omnivmed.load_media on real files shipped in pip wheels (nilearn, nibabel, pydicom)
plus small files written here (PNG/JPEG with Pillow, MP4 with PyAV). Offline and fast."""

import importlib.util
import json
import os
import random
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnivmed.media_omnivmed import WINDOW_PRESETS, Media, MediaError, load_media  # noqa: E402

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
nilearn = pytest.importorskip("nilearn")
from PIL import Image  # noqa: E402
from pydicom.pixels import apply_rescale  # noqa: E402

MNI = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
NIB_DATA = Path(nib.__file__).parent / "tests/data"
ANATOMICAL = NIB_DATA / "anatomical.nii"  # LAS
EXAMPLE4D = NIB_DATA / "example4d.nii.gz"  # 4D, 2 volumes, oblique affine
DICOM_DATA = Path(pydicom.__file__).parent / "data/test_files"  # direct paths: get_testdata_file may download
CT_SMALL = DICOM_DATA / "CT_small.dcm"
MR_SMALL = DICOM_DATA / "MR_small.dcm"
CT5N = DICOM_DATA / "dicomdirtests/98892001/CT5N"  # 5 axial CT slices, 2.5 mm apart
CT_IRREGULAR = DICOM_DATA / "dicomdirtests/77654033/CT2"  # 4 slices, gaps 202.5, 1.25, 1.25 mm
TWO_SERIES = DICOM_DATA / "dicomdirtests/98892001"  # CT2N (2 files) + CT5N (5 files)


def check_media(m: Media, kind: str) -> Media:
    """Invariants every result must satisfy."""
    assert m.kind == kind
    assert m.frames.dtype == np.float32 and m.frames.ndim == 4 and m.frames.shape[-1] == 3
    assert np.isfinite(m.frames).all() and m.frames.min() >= 0.0 and m.frames.max() <= 1.0
    json.dumps(m.metadata)  # JSON-serialisable
    if kind == "image":
        assert m.frames.shape[0] == 1
    return m


def window01(x, center, width):
    return np.clip((x - (center - width / 2)) / width, 0.0, 1.0)


def display(slice_ras):
    """The documented radiological display of a RAS-ordered 2D slice."""
    return slice_ras.T[::-1, ::-1]


# ------------------------------------------------------------------------------------------------
# NIfTI
# ------------------------------------------------------------------------------------------------


def test_mni_axial_sampled_evenly_in_mm():
    m = check_media(load_media(MNI, max_slices=16), "volume")
    data = np.asarray(nib.load(MNI).dataobj)  # already RAS, uint8
    assert m.frames.shape == (16, 233, 197, 3)
    expected_idx = sorted({int(round(x)) for x in np.linspace(0, 188, 16)})
    assert m.slice_indices == expected_idx
    assert m.slice_positions_mm == pytest.approx([-72.0 + k for k in expected_idx])  # world z, affine offset -72
    assert np.all(np.diff(m.slice_positions_mm) > 0)  # inferior -> superior
    assert m.spacing_mm == pytest.approx((188 / 15, 1.0, 1.0), abs=0.05)
    assert m.metadata["orientation"] == "RAS" and m.metadata["reoriented_to"] == "RAS"
    assert m.metadata["intensity"] == {"method": "scale", "divisor": 255.0}  # uint8: no percentiles
    for t, k in enumerate(m.slice_indices):
        np.testing.assert_allclose(m.frames[t, ..., 0], display(data[:, :, k]) / 255.0, atol=1e-6)
    assert np.array_equal(m.frames[..., 0], m.frames[..., 2])  # grayscale replicated


def test_mni_min_slice_spacing_and_other_axes():
    m = check_media(load_media(MNI, max_slices=1000, min_slice_spacing_mm=5.0), "volume")
    assert len(m.slice_indices) == 188 // 5 + 1
    assert np.min(np.diff(m.slice_positions_mm)) >= 5.0 - 1e-6
    cor = check_media(load_media(MNI, slice_axis="coronal", max_slices=8), "volume")
    assert cor.frames.shape == (8, 189, 197, 3)  # rows: S..I, cols: R..L
    assert cor.slice_positions_mm[0] == pytest.approx(-134.0) and cor.slice_positions_mm[-1] == pytest.approx(98.0)
    sag = check_media(load_media(MNI, slice_axis="sagittal", max_slices=8), "volume")
    assert sag.frames.shape == (8, 189, 233, 3)  # rows: S..I, cols: A..P
    assert sag.slice_positions_mm[0] == pytest.approx(-98.0)


def test_las_file_matches_nibabel_canonical_and_known_voxel():
    img = nib.load(ANATOMICAL)
    assert "".join(nib.aff2axcodes(img.affine)) == "LAS"
    data = np.asarray(img.dataobj).astype(np.float64)
    lo, hi = data.min(), data.max()
    # A window spanning the whole range makes the intensity map exactly linear.
    m = check_media(load_media(ANATOMICAL, window=((lo + hi) / 2, hi - lo)), "volume")
    assert m.metadata["orientation"] == "LAS"
    canon = nib.as_closest_canonical(img).get_fdata()
    assert m.frames.shape == (25, 41, 33, 3)
    for k in range(25):
        np.testing.assert_allclose(m.frames[k, ..., 0], (display(canon[:, :, k]) - lo) / (hi - lo), atol=1e-5)
    # Independently of nibabel's reorientation: stored voxel (i, j, k) of an L->R flipped axis lands at
    # display column i (patient's left is on the image's right) and row ny-1-j (anterior at top).
    i, j, k = np.unravel_index(np.argmax(data), data.shape)
    assert m.frames[k, data.shape[1] - 1 - j, i, 0] == pytest.approx(1.0)
    assert m.slice_positions_mm[k] == pytest.approx((img.affine @ [i, j, k, 1])[2])


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_display_convention_on_a_scrambled_affine(tmp_path, axis):
    # Stored axes: i -> posterior, j -> superior, k -> left ("PSL"), 1 mm voxels.
    affine = np.array([[0, 0, -1, 10], [-1, 0, 0, 10], [0, 1, 0, -10], [0, 0, 0, 1]], dtype=float)
    data = np.zeros((20, 20, 20), np.float32)
    x, y, z = 5, 6, 7  # marker: patient right, anterior, superior (all different, so swaps show)
    ijk = np.linalg.solve(affine, [x, y, z, 1])[:3].round().astype(int)
    data[tuple(ijk)] = 100.0
    path = tmp_path / "psl.nii"
    nib.save(nib.Nifti1Image(data, affine), path)
    m = check_media(load_media(path, slice_axis=axis, window=(50, 100)), "volume")
    assert m.metadata["orientation"] == "PSL"
    t = int(np.argmax(m.frames[..., 0].reshape(len(m.frames), -1).max(axis=1)))
    assert m.slice_positions_mm[t] == pytest.approx({"axial": z, "coronal": y, "sagittal": x}[axis])
    corners = affine @ np.array([[a, b, c, 1] for a in (0, 19) for b in (0, 19) for c in (0, 19)]).T
    x_max, y_max, z_max = corners[:3].max(axis=1)  # most right, anterior, superior world coordinates
    # Radiological display: top row = most anterior (axial) / superior; left column = most right
    # (axial, coronal) / most anterior (sagittal).
    expected = {
        "axial": (y_max - y, x_max - x),
        "coronal": (z_max - z, x_max - x),
        "sagittal": (z_max - z, y_max - y),
    }[axis]
    assert np.unravel_index(np.argmax(m.frames[t, ..., 0]), m.frames.shape[1:3]) == expected


def test_4d_nifti_volume_index_and_oblique_affine():
    img = nib.load(EXAMPLE4D)
    m = check_media(load_media(EXAMPLE4D, volume_index=1), "volume")
    assert m.metadata["n_volumes"] == 2 and m.metadata["volume_index"] == 1
    canon = nib.as_closest_canonical(img).get_fdata()[..., 1]
    assert m.frames.shape == (canon.shape[2], canon.shape[1], canon.shape[0], 3)
    lo, hi = np.percentile(canon, [0.5, 99.5])
    expected = np.clip((display(canon[:, :, 5]) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(m.frames[5, ..., 0], expected, atol=1e-4)
    assert np.all(np.diff(m.slice_positions_mm) > 0)


def test_uncompressed_4d_reads_slices_lazily_with_the_same_result(tmp_path):
    img = nib.load(EXAMPLE4D)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), tmp_path / "4d.nii")
    for axis in ("axial", "sagittal"):
        a = load_media(tmp_path / "4d.nii", volume_index=1, slice_axis=axis, max_slices=7)
        b = load_media(EXAMPLE4D, volume_index=1, slice_axis=axis, max_slices=7)
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.slice_positions_mm == pytest.approx(b.slice_positions_mm)


def test_volume_percentiles_over_whole_volume_and_constant_volume(tmp_path):
    data = np.zeros((8, 8, 4), np.float32)
    data[..., 0], data[..., 3] = 1000.0, 10.0  # slice 0 much brighter: per-slice scaling would hide that
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii.gz")
    m = check_media(load_media(tmp_path / "v.nii.gz"), "volume")
    assert m.frames[0].max() == pytest.approx(1.0) and m.frames[3].max() < 0.05
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), 700, np.int16), np.eye(4)), tmp_path / "c.nii")  # not 8-bit
    c = check_media(load_media(tmp_path / "c.nii"), "volume")
    assert not c.frames.any() and any("constant" in w for w in c.metadata["warnings"])


def test_ct_nifti_windows_and_nan_policy(tmp_path):
    hu = np.linspace(-1000, 1000, 4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "ct.nii")
    m = check_media(load_media(tmp_path / "ct.nii", modality="CT"), "volume")  # default: abdomen
    np.testing.assert_allclose(m.frames[0, ..., 0], window01(display(hu[:, :, 0]), 40, 400), atol=1e-6)
    rgb = check_media(load_media(tmp_path / "ct.nii", modality="CT", window="rgb"), "volume")
    for c, name in enumerate(("abdomen", "lung", "bone")):
        expected = window01(display(hu[:, :, 1]), *WINDOW_PRESETS[name])
        np.testing.assert_allclose(rgb.frames[1, ..., c], expected, atol=1e-6)
    hu[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "nan.nii")
    z = check_media(load_media(tmp_path / "nan.nii", modality="CT", nan_policy="zero"), "volume")
    assert any("non-finite" in w for w in z.metadata["warnings"])


def test_nifti_without_geometry_is_reported(tmp_path):
    img = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6) * 10, None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    img.header["pixdim"][1:4] = 0
    nib.save(img, tmp_path / "nogeo.nii.gz")
    m = check_media(load_media(tmp_path / "nogeo.nii.gz"), "volume")
    warnings = m.metadata["warnings"]
    assert any("nogeo.nii.gz" in w and "no valid orientation" in w and "LAS" in w for w in warnings), warnings
    assert any("nogeo.nii.gz" in w and "pixdim" in w and "1 mm" in w for w in warnings), warnings
    # A proper header raises none of these.
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6), np.eye(4)), tmp_path / "ok.nii")
    assert load_media(tmp_path / "ok.nii").metadata["warnings"] == []


def test_nifti_sheared_and_inconsistent_geometry_is_reported(tmp_path):
    data = np.arange(120, dtype=np.int16).reshape(4, 5, 6) * 10
    sheared = np.array([[1.0, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, sheared), tmp_path / "shear.nii")
    m = check_media(load_media(tmp_path / "shear.nii"), "volume")
    assert any("shear.nii" in w and "sheared" in w and "26.57 degrees" in w for w in m.metadata["warnings"])
    img = nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1]))
    img.set_qform(np.diag([-1.0, 1, 1, 1]), code=1)  # a different orientation and voxel size
    nib.save(img, tmp_path / "disagree.nii")
    m = load_media(tmp_path / "disagree.nii")
    assert any("sform and qform disagree" in w for w in m.metadata["warnings"])
    assert m.metadata["orientation"] == "RAS"  # the sform, as nibabel uses it
    img = nib.Nifti1Image(data, np.diag([0.002, 0.002, 0.004, 1]))
    img.header.set_xyzt_units("meter")
    nib.save(img, tmp_path / "meters.nii")
    m = load_media(tmp_path / "meters.nii")
    assert m.spacing_mm == pytest.approx((4.0, 2.0, 2.0))
    assert any("meter" in w and "converted to mm" in w for w in m.metadata["warnings"])


def _patched_nifti(path: Path, *edits) -> Path:
    """A small int16 NIfTI-1 with raw header fields overwritten: (byte offset, struct format, value)."""
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6) * 10, np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    for offset, fmt, value in edits:
        raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw))
    return path


QFORM_ONLY = ((252, "<h", 1), (254, "<h", 0))  # qform_code 1, sform_code 0


def test_nifti_header_quirks_are_reported(tmp_path):
    def warnings_of(path):
        return load_media(path).metadata["warnings"]

    assert any("sform_code 9" in w for w in warnings_of(_patched_nifti(tmp_path / "code9.nii", (254, "<h", 9))))
    neg = _patched_nifti(tmp_path / "neg.nii", *QFORM_ONLY, (80, "<f", -2.0))  # pixdim[1]
    assert any("neg.nii" in w and "negative" in w and "flip" in w for w in warnings_of(neg))
    inf = _patched_nifti(tmp_path / "inf.nii", (112, "<f", np.inf))  # scl_slope: nibabel ignores it
    assert any("scl_slope is inf" in w for w in warnings_of(inf))
    np.testing.assert_array_equal(nib.load(inf).get_fdata(), np.arange(120).reshape(4, 5, 6) * 10)
    mask = np.zeros((4, 5, 6), np.float32)
    mask[1:3, 1:3, 1:3] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii")
    assert any("label map or mask" in w for w in warnings_of(tmp_path / "mask.nii"))


def test_dicom_unusable_geometry_falls_back_with_a_warning(tmp_path):
    for name, tags in {"nanpos": {"ImagePositionPatient": ["nan", 0, 0]},
                       "zeroiop": {"ImageOrientationPatient": [0, 0, 0, 0, 0, 0]}}.items():
        (tmp_path / name).mkdir()
        for n, f in enumerate(sorted(CT5N.iterdir())):
            ds = pydicom.dcmread(f)
            if n == 2:
                for tag, value in tags.items():
                    setattr(ds, tag, value)
            ds.save_as(tmp_path / name / f"s{n}.dcm")
        m = check_media(load_media(tmp_path / name), "volume")
        assert m.metadata["sorted_by"] == "InstanceNumber" and m.slice_positions_mm is None
        assert any(name in w and "unusable" in w for w in m.metadata["warnings"])
    (tmp_path / "spacing0").mkdir()
    for n, f in enumerate(sorted(CT5N.iterdir())):
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [0, 0]
        ds.save_as(tmp_path / "spacing0" / f"s{n}.dcm")
    m = check_media(load_media(tmp_path / "spacing0"), "volume")
    assert m.spacing_mm == pytest.approx((2.5, 1.0, 1.0))
    assert any("PixelSpacing" in w and "assumed 1 mm" in w for w in m.metadata["warnings"])


# ------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------


def test_ct_small_hounsfield_window():
    ds = pydicom.dcmread(CT_SMALL)
    hu = apply_rescale(ds.pixel_array, ds)
    m = check_media(load_media(CT_SMALL), "image")  # no window tags in the file: abdomen preset
    assert m.metadata["modality"] == "CT"
    np.testing.assert_allclose(m.frames[0, ..., 0], window01(hu, 40, 400), atol=1e-6)
    lung = load_media(CT_SMALL, window="lung")
    np.testing.assert_allclose(lung.frames[0, ..., 1], window01(hu, -600, 1500), atol=1e-6)
    custom = load_media(CT_SMALL, window=(0, 2000))
    np.testing.assert_allclose(custom.frames[0, ..., 2], window01(hu, 0, 2000), atol=1e-6)
    assert custom.metadata["intensity"]["windows"] == [{"name": "custom", "center": 0.0, "width": 2000.0}]


def test_mr_small_percentiles():
    ds = pydicom.dcmread(MR_SMALL)
    raw = ds.pixel_array.astype(np.float64)
    m = check_media(load_media(MR_SMALL), "image")
    assert m.metadata["intensity"]["method"] == "percentile"
    out = m.frames[0, ..., 0]
    assert np.percentile(out, 0.5) == pytest.approx(0.0, abs=0.01)
    assert np.percentile(out, 99.5) == pytest.approx(1.0, abs=0.01)
    lo, hi = np.percentile(raw, [0.5, 99.5])
    np.testing.assert_allclose(out, np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-5)


def _ct5n_sorted():
    """(z, hu) of the CT5N slices sorted inferior -> superior, straight from pydicom."""
    slices = []
    for f in CT5N.iterdir():
        ds = pydicom.dcmread(f)
        slices.append((float(ds.ImagePositionPatient[2]), apply_rescale(ds.pixel_array, ds), ds))
    return sorted(slices, key=lambda s: s[0])


def test_dicom_series_sorted_by_position_not_name(tmp_path):
    ref = _ct5n_sorted()
    folder = tmp_path / "series"
    (folder / "nested").mkdir(parents=True)
    # Names sort in an order unrelated to position; InstanceNumber runs opposite to z.
    names = ["c", "a", "e", "b", "nested/d"]
    for (z, _, ds), name in zip(reversed(ref), names):
        shutil.copy(ds.filename, folder / name)
    (folder / "README.txt").write_text("not DICOM")
    (folder / "DICOMDIR").write_bytes(b"\0" * 10)
    m = check_media(load_media(folder), "volume")
    assert m.frames.shape == (5, 16, 16, 3)
    assert m.slice_positions_mm == pytest.approx([z for z, _, _ in ref], abs=1e-4)
    assert m.slice_indices == [0, 1, 2, 3, 4]
    assert m.spacing_mm == pytest.approx((2.5, 0.488281, 0.488281), abs=1e-5)
    assert m.metadata["sorted_by"] == "ImagePositionPatient" and m.metadata["irregular_spacing"] is None
    assert m.metadata["series_uid"] == str(ref[0][2].SeriesInstanceUID)
    center, width = float(ref[0][2].WindowCenter), float(ref[0][2].WindowWidth)  # the file's own window
    for t, (_, hu, _) in enumerate(ref):
        # Identity-orientation axial DICOM: the radiological display is the stored image.
        np.testing.assert_allclose(m.frames[t, ..., 0], window01(hu, center, width), atol=1e-6)
    files = [folder / n for n in names]
    random.Random(0).shuffle(files)
    as_list = load_media(files)
    np.testing.assert_array_equal(as_list.frames, m.frames)


def test_dicom_series_irregular_spacing_and_sampling():
    m = check_media(load_media(CT_IRREGULAR), "volume")
    irr = m.metadata["irregular_spacing"]
    assert irr is not None and irr["gaps_mm"] == pytest.approx([202.5, 1.25, 1.25], abs=1e-3)
    # Sampling is even in mm: with 2 slices allowed, the two ends are kept.
    two = load_media(CT_IRREGULAR, max_slices=2)
    assert two.slice_indices == [0, 3] and two.spacing_mm[0] == pytest.approx(205.0, abs=1e-3)


def test_dicom_series_selection_and_missing_positions(tmp_path):
    uid = str(pydicom.dcmread(next(CT5N.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    m = check_media(load_media(TWO_SERIES, series_uid=uid), "volume")
    assert m.frames.shape[0] == 5
    for f in CT5N.iterdir():
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(tmp_path / f.name)
    nopos = check_media(load_media(tmp_path), "volume")
    assert nopos.metadata["sorted_by"] == "InstanceNumber" and nopos.slice_positions_mm is None
    assert any("InstanceNumber" in w for w in nopos.metadata["warnings"])
    # InstanceNumber order runs superior -> inferior here: the reverse of the geometric sort.
    np.testing.assert_allclose(nopos.frames[::-1], m.frames, atol=1e-6)


def test_dicom_series_with_inferior_pointing_normal(tmp_path):
    # Columns run anterior (LPS -y): the slice normal row x col points inferior, so the stack axis is
    # flipped during reorientation; slices must still come out inferior -> superior, anterior on top.
    ref = _ct5n_sorted()
    for n, (_, _, ds) in enumerate(ref):
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        ds.save_as(tmp_path / f"s{n}.dcm")
    m = check_media(load_media(tmp_path, window=(0, 4000)), "volume")
    assert m.slice_positions_mm == pytest.approx([z for z, _, _ in ref], abs=1e-4)
    for t, (_, hu, _) in enumerate(ref):
        np.testing.assert_allclose(m.frames[t, ..., 0], window01(hu[::-1, :], 0, 4000), atol=1e-6)


def test_dicom_orientation_not_perpendicular_is_reported(tmp_path):
    for n, f in enumerate(sorted(CT5N.iterdir())):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 0.2, 1, 0]
        ds.save_as(tmp_path / f"s{n}.dcm")
    m = check_media(load_media(tmp_path), "volume")
    assert any(str(tmp_path) in w and "perpendicular" in w for w in m.metadata["warnings"])
    assert not any("perpendicular" in w for w in load_media(CT5N).metadata["warnings"])


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(MR_SMALL)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    np.testing.assert_allclose(load_media(tmp_path / "mono1.dcm").frames, 1.0 - load_media(MR_SMALL).frames, atol=1e-6)


def test_sagittal_dicom_series_is_reoriented(tmp_path):
    # Rewrite CT5N as a sagittal stack: rows run posterior (LPS +y), columns run inferior (LPS -z),
    # slices step along LPS x (patient left). DICOM shows such an image anterior-left, superior-up,
    # which is also our sagittal convention, so the sagittal output must equal the stored images.
    stored = []
    for n, f in enumerate(sorted(CT5N.iterdir())):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [10.0 * n, -50.0, 40.0]
        ds.save_as(tmp_path / f"s{n}.dcm")
        stored.append((10.0 * n, apply_rescale(ds.pixel_array, ds)))
    m = check_media(load_media(tmp_path, slice_axis="sagittal", window=(0, 4000)), "volume")
    assert m.metadata["orientation"] == "RIP"  # (slice, row, column) axes before reorientation
    # Increasing RAS x = decreasing LPS x: from the patient's left-most slice (LPS x = 40) to the right.
    assert m.slice_positions_mm == pytest.approx([-40.0, -30.0, -20.0, -10.0, 0.0])
    for t, (_, hu) in enumerate(sorted(stored, key=lambda s: -s[0])):
        np.testing.assert_allclose(m.frames[t, ..., 0], window01(hu, 0, 4000), atol=1e-6)
    axial = check_media(load_media(tmp_path, slice_axis="axial", window=(0, 4000)), "volume")
    assert axial.frames.shape == (16, 16, 5, 3)  # 16 rows of the stack become axial slices (A-P x R-L)
    assert axial.spacing_mm == pytest.approx((0.488281, 0.488281, 10.0), abs=1e-5)
    # Axial slice of the superior-most row (stored row 0): anterior (stored column 0) on top, right on the left.
    top = np.stack([hu for _, hu in sorted(stored, key=lambda s: -s[0])])[:, 0, :]  # (x left->right, col)
    np.testing.assert_allclose(axial.frames[-1, ..., 0], window01(top.T[:, ::-1], 0, 4000), atol=1e-6)


def test_dicom_reorientation_rule_matches_nibabel():
    # DICOM volumes use the module's own closest-canonical rule; it must agree with nibabel's.
    from omnivmed.volume_omnivmed import closest_canonical_ornt as _closest_canonical_ornt

    rng = np.random.default_rng(0)
    for _ in range(200):
        perm = np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], 3)
        q, _ = np.linalg.qr(np.eye(3) + rng.normal(scale=0.25, size=(3, 3)))  # a rotation up to ~30 degrees
        affine = np.eye(4)
        affine[:3, :3] = q @ perm @ np.diag(rng.uniform(0.3, 5, 3))
        np.testing.assert_array_equal(_closest_canonical_ornt(affine), nib.io_orientation(affine))


def test_dicom_content_wins_over_wrong_extension(tmp_path):
    shutil.copy(CT_SMALL, tmp_path / "ct.png")
    np.testing.assert_array_equal(load_media(tmp_path / "ct.png").frames, load_media(CT_SMALL).frames)


# ------------------------------------------------------------------------------------------------
# 2D pictures
# ------------------------------------------------------------------------------------------------


def test_16bit_png_keeps_dynamic_range(tmp_path):
    ramp = np.linspace(0, 65535, 128 * 128).round().astype(np.uint16).reshape(128, 128)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    m = check_media(load_media(tmp_path / "ramp16.png"), "image")
    assert m.metadata["mode"].startswith("I;16")
    assert len(np.unique(m.frames[0, ..., 0])) > 256
    np.testing.assert_allclose(m.frames[0, ..., 0], ramp / 65535.0, atol=1e-6)


def test_8bit_grayscale_and_bilevel(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_allclose(load_media(tmp_path / "g.png").frames[0, ..., 1], gray / 255.0, atol=1e-7)
    Image.fromarray(gray > 127).convert("1").save(tmp_path / "b.bmp")
    np.testing.assert_array_equal(load_media(tmp_path / "b.bmp").frames[0, ..., 0], (gray > 127).astype(np.float32))


def test_rgba_composited_on_black(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[0, 128, 255], [255, 255, 0]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    m = check_media(load_media(tmp_path / "a.png"), "image")
    expected = rgba[..., :3] / 255.0 * (rgba[..., 3:] / 255.0)
    np.testing.assert_allclose(m.frames[0], expected, atol=1e-6)
    assert not m.frames[0, 0, 0].any()


def test_palette_image(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 90] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 1, 2, 2, 0, 1])
    im.save(tmp_path / "p.png")
    m = check_media(load_media(tmp_path / "p.png"), "image")
    np.testing.assert_allclose(m.frames[0, 0, 1], np.array([10, 200, 30]) / 255.0, atol=1e-6)
    np.testing.assert_allclose(m.frames[0, 1, 0], np.array([250, 5, 90]) / 255.0, atol=1e-6)


def test_exif_rotated_jpeg(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high; red block at the stored top-left
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    m = check_media(load_media(tmp_path / "rot.jpg"), "image")
    assert m.frames.shape == (1, 40, 20, 3) and m.metadata["exif_orientation"] == 6
    top_right, top_left = m.frames[0, 1:7, -7:-1], m.frames[0, 1:7, 1:7]
    assert top_right[..., 0].mean() > 0.8 and top_right[..., 1].mean() < 0.2
    assert top_left.mean() < 0.1


def test_picture_content_wins_over_unknown_extension(tmp_path):
    Image.fromarray(np.full((3, 3), 51, np.uint8)).save(tmp_path / "scan.dat", format="PNG")
    assert load_media(tmp_path / "scan.dat").frames[0, 0, 0, 0] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------
# Arrays and tensors
# ------------------------------------------------------------------------------------------------


def test_arrays():
    img = check_media(load_media(np.array([[0, 255], [51, 102]], np.uint8), "image"), "image")
    assert img.source == "<array>" and img.frames[0, 1, 0, 0] == pytest.approx(0.2)
    rgb = np.random.default_rng(0).random((5, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(load_media(rgb, "image").frames[0], rgb)
    vol = np.arange(100 * 4 * 4, dtype=np.int16).reshape(100, 4, 4)
    v = check_media(load_media(vol, "volume", max_slices=10), "volume")
    assert len(v.slice_indices) == 10 and v.slice_indices[0] == 0 and v.slice_indices[-1] == 99
    assert v.spacing_mm is None and v.slice_positions_mm is None
    vid = np.random.default_rng(1).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    mv = check_media(load_media(vid, "video", max_frames=6), "video")
    assert mv.metadata["frame_indices"] == [0, 5, 10, 15, 20, 25]
    np.testing.assert_allclose(mv.frames[1], vid[5] / 255.0, atol=1e-7)


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    t = torch.linspace(0, 1, 12).reshape(3, 4).to(torch.bfloat16)
    m = check_media(load_media(t, "image"), "image")
    np.testing.assert_allclose(m.frames[0, ..., 0], t.float().numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Video
# ------------------------------------------------------------------------------------------------


def write_counter_video(path: Path, n_frames=50, fps=5, size=64):
    """libx264/yuv420p video whose frame i has brightness 5 * i."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 5 * i, np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


@pytest.fixture(scope="module")
def counter_video(tmp_path_factory):
    return write_counter_video(tmp_path_factory.mktemp("video") / "counter.mp4")


BACKENDS = [
    pytest.param(backend, marks=pytest.mark.skipif(importlib.util.find_spec(mod) is None, reason=f"{mod} missing"))
    for backend, mod in (("decord", "decord"), ("pyav", "av"))
]


def frame_numbers(m: Media) -> np.ndarray:
    return m.frames.mean(axis=(1, 2, 3)) * 255.0 / 5.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_fps_sampling(counter_video, backend):
    m = check_media(load_media(counter_video, video_backend=backend), "video")
    assert m.metadata["video_backend"] == backend
    assert m.frames.shape == (10, 64, 64, 3)
    assert m.timestamps_s == pytest.approx(list(range(10)), abs=0.2)
    np.testing.assert_allclose(frame_numbers(m), np.array(m.timestamps_s) * 5, atol=0.5)  # the right frames
    assert len(load_media(counter_video, video_backend=backend, fps=2).frames) == 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_max_frames_spread_evenly(counter_video, backend):
    m = check_media(load_media(counter_video, video_backend=backend, max_frames=4), "video")
    assert len(m.frames) == 4 and m.metadata["sampling"] == "max_frames"
    assert m.timestamps_s == pytest.approx([0.0, 2.5, 5.0, 7.5], abs=0.2)
    np.testing.assert_allclose(frame_numbers(m), np.array(m.timestamps_s) * 5, atol=0.5)


def test_video_backends_agree(counter_video):
    pytest.importorskip("decord")
    pytest.importorskip("av")
    for kwargs in ({}, {"max_frames": 4}, {"fps": 0.3}):
        a = load_media(counter_video, video_backend="decord", **kwargs)
        b = load_media(counter_video, video_backend="pyav", **kwargs)
        assert a.timestamps_s == pytest.approx(b.timestamps_s, abs=1e-4)
        assert a.metadata["frame_indices"] == b.metadata["frame_indices"]
        np.testing.assert_allclose(a.frames, b.frames, atol=3 / 255)
    assert load_media(counter_video).metadata["video_backend"] == "decord"  # decord first when installed


def test_pyav_fallback_when_decord_is_missing(counter_video, monkeypatch):
    pytest.importorskip("av")
    monkeypatch.setitem(sys.modules, "decord", None)  # makes "import decord" raise ImportError
    m = load_media(counter_video)
    assert m.metadata["video_backend"] == "pyav" and len(m.frames) == 10
    with pytest.raises(ImportError, match="pip install decord"):
        load_media(counter_video, video_backend="decord")


# ------------------------------------------------------------------------------------------------
# Streamed video: load_video_chunks
# ------------------------------------------------------------------------------------------------


def pyav_reference(path: Path) -> list[np.ndarray]:
    """Every frame as PyAV itself decodes it (rgb24), in presentation order."""
    av = pytest.importorskip("av")
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_frames", [1, 3, 20, 64])
def test_video_chunks_equal_the_one_shot_read(counter_video, backend, chunk_frames):
    """Chunks of 1 frame, of a size that does not divide the 20 sampled frames, of exactly 20 and of more: together
    the one-shot read's frames, timestamps and metadata, the chunk bookkeeping consistent, no chunk over its size."""
    from omnivmed.media_omnivmed import load_video_chunks

    options = dict(video_backend=backend, fps=2, max_frames=100)
    whole = load_media(counter_video, **options)
    chunks = list(load_video_chunks(counter_video, chunk_frames, **options))
    assert len(whole.frames) == 20 and len(chunks) == -(-20 // chunk_frames)
    assert all(c.kind == "video" and c.source == whole.source and len(c.frames) <= chunk_frames for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)
    assert [t for c in chunks for t in c.timestamps_s] == whole.timestamps_s
    starts = [c.metadata["chunk"]["first_frame"] for c in chunks]
    assert starts == list(range(0, 20, chunk_frames))
    assert [c.metadata["chunk"]["last"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {c.metadata["chunk"]["frames_planned"] for c in chunks} == {20}
    last = {k: v for k, v in chunks[-1].metadata.items() if k != "chunk"}
    assert last == whole.metadata


def test_pyav_chunks_are_what_pyav_decodes(counter_video):
    """The streamed frames are PyAV's own decoding of the frames the sampling names (uint8 / 255, nothing else)."""
    from omnivmed.media_omnivmed import load_video_chunks

    reference = pyav_reference(counter_video)
    chunks = list(load_video_chunks(counter_video, 4, video_backend="pyav", fps=2, max_frames=100))
    indices = chunks[-1].metadata["frame_indices"]
    assert len(indices) == 20 and indices == sorted(set(indices))
    expected = np.stack([reference[i] for i in indices]).astype(np.float32) / np.float32(255)
    streamed = np.concatenate([c.frames for c in chunks])
    np.testing.assert_array_equal(streamed, expected)
    np.testing.assert_allclose(streamed.mean(axis=(1, 2, 3)) * 255 / 5, indices, atol=0.5)  # frame k is gray 5 k


def test_video_chunks_bound_the_held_frames_not_the_video(counter_video):
    """max_voxels limits what is held at once: the whole clip is refused in one piece, accepted 3 frames at a time,
    and a chunk over the limit is refused before decoding, naming the file."""
    from omnivmed.media_omnivmed import load_video_chunks

    limit = 3 * 64 * 64
    with pytest.raises(MediaError, match="max_voxels"):
        load_media(counter_video, video_backend="pyav", max_voxels=limit)
    chunks = list(load_video_chunks(counter_video, 3, video_backend="pyav", max_voxels=limit))
    assert sum(len(c.frames) for c in chunks) == 10
    with pytest.raises(MediaError, match=f"{counter_video}.*max_voxels"):
        next(load_video_chunks(counter_video, 4, video_backend="pyav", max_voxels=limit))


def test_video_chunks_of_an_array():
    from omnivmed.media_omnivmed import load_video_chunks

    frames = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    whole = load_media(frames, kind="video")
    chunks = list(load_video_chunks(frames, 3))
    assert [len(c.frames) for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)


@pytest.mark.parametrize("chunk_frames", [0, -2, 2.5, True, "8"])
def test_video_chunks_refuse_a_bad_chunk_size_naming_the_file(counter_video, chunk_frames):
    from omnivmed.media_omnivmed import load_video_chunks

    with pytest.raises(MediaError, match=f"{counter_video}: chunk_frames must be an integer >= 1"):
        load_video_chunks(counter_video, chunk_frames)  # refused at the call, before any chunk is asked for


def test_video_chunks_refuse_bad_files_naming_them(tmp_path, counter_video):
    from omnivmed.media_omnivmed import load_video_chunks

    with pytest.raises(MediaError, match="missing.mp4: file does not exist"):
        load_video_chunks(tmp_path / "missing.mp4")
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    with pytest.raises(MediaError, match="picture.png: streaming reads video files"):
        load_video_chunks(picture)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(counter_video.read_bytes()[:2000])
    for backend in ("pyav",) + (("decord",) if importlib.util.find_spec("decord") else ()):
        with pytest.raises(MediaError, match="damaged.mp4"):
            list(load_video_chunks(damaged, 4, video_backend=backend))
    with pytest.raises(MediaError, match="counter.mp4: .*unexpected keyword argument 'fsp'"):
        load_video_chunks(counter_video, 4, fsp=2)


# ------------------------------------------------------------------------------------------------
# Bad inputs: each must raise MediaError naming the file (or <array>)
# ------------------------------------------------------------------------------------------------


def _png_with_header(path: Path, width: int, height: int) -> Path:
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _nifti_claiming(path: Path, dims) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", len(dims), *dims, *([1] * (7 - len(dims))))  # dim[0..7]
    path.write_bytes(bytes(raw))
    return path


def _dicom_without_pixels(path: Path) -> Path:
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    ds.save_as(path)
    return path


def _dicom_mixed_shapes(folder: Path) -> Path:
    folder.mkdir()
    for i, f in enumerate(sorted(CT5N.iterdir())):
        ds = pydicom.dcmread(f)
        if i == 2:
            ds.PixelData = ds.pixel_array[:8, :8].copy().tobytes()
            ds.Rows = ds.Columns = 8
        ds.save_as(folder / f"slice{i}.dcm")
    return folder


def _nifti_with_nan_sform(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.int16), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[280:284] = struct.pack("<f", np.nan)  # srow_x[0]; sform_code stays 2, so nibabel uses it
    path.write_bytes(bytes(raw))
    return path


def _ct_small_with(path: Path, **tags) -> Path:
    ds = pydicom.dcmread(CT_SMALL)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.save_as(path)
    return path


def _bad_cases(tmp: Path, video: Path):
    """id -> (source, kind, kwargs, text that must appear in the message)."""
    rng = np.random.default_rng(0)
    (tmp / "empty_dicom").mkdir()
    (tmp / "empty_dicom" / "notes.txt").write_text("no dicom here")
    (tmp / "two_series").mkdir()
    for f in list(CT5N.iterdir())[:2] + list((TWO_SERIES / "CT2N").iterdir()):
        shutil.copy(f, tmp / "two_series" / f.name)
    (tmp / "zero.png").write_bytes(b"")
    (tmp / "zero.mp4").write_bytes(b"")
    (tmp / "random.png").write_bytes(rng.bytes(2048))
    (tmp / "random.xyz").write_bytes(rng.bytes(2048))
    (tmp / "garbage.mp4").write_bytes(rng.bytes(4096))
    raw = video.read_bytes()
    (tmp / "badcodec.mp4").write_bytes(raw.replace(b"avc1", b"zzz9"))  # no decoder for "zzz9"
    (tmp / "cut.mp4").write_bytes(raw[: len(raw) // 3])
    gz = MNI.read_bytes()
    (tmp / "cut.nii.gz").write_bytes(gz[: len(gz) // 2])
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 30), np.int16), np.eye(4)), tmp / "short.nii")
    (tmp / "short.nii").write_bytes((tmp / "short.nii").read_bytes()[:20000])
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp / "nan.nii.gz")
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp / "big.png")
    shutil.copy(MNI, tmp / "brain.png")
    (tmp / "root").mkdir()
    os.symlink(tmp / "big.png", tmp / "root" / "link.png")
    empty_mp4 = tmp / "novideo.mp4"
    av = pytest.importorskip("av")
    with av.open(str(empty_mp4), "w") as c:  # a video stream that never gets a frame
        s = c.add_stream("libx264", rate=5)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        c.start_encoding()
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 0), np.float32), np.eye(4)), tmp / "zero_volumes.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 6), np.float32), np.eye(4)), tmp / "zero_axis.nii")
    huge = np.ones((4, 5, 6))
    huge[1, 2, 3] = 1e300
    nib.save(nib.Nifti1Image(huge, np.eye(4)), tmp / "beyond_float32.nii.gz")
    nan_array = np.ones((4, 4), np.float32)
    nan_array[0, 0] = np.inf
    return {
        "missing": (tmp / "nope.png", None, {}, "nope.png"),
        "zero_bytes": (tmp / "zero.png", None, {}, "zero.png"),
        "truncated_nii_gz": (tmp / "cut.nii.gz", None, {}, "cut.nii.gz"),
        "truncated_nii": (tmp / "short.nii", None, {}, "short.nii"),
        "corrupt_png": (tmp / "random.png", None, {}, "random.png"),
        "unknown_format": (tmp / "random.xyz", None, {}, "random.xyz"),
        "nifti_named_png": (tmp / "brain.png", None, {}, "brain.png"),
        "empty_dicom_folder": (tmp / "empty_dicom", None, {}, "empty_dicom"),
        "mixed_series": (tmp / "two_series", None, {}, "two_series"),
        "unknown_series_uid": (tmp / "two_series", None, {"series_uid": "1.2.3"}, "two_series"),
        "dicom_without_pixels": (_dicom_without_pixels(tmp / "nopix.dcm"), None, {}, "nopix.dcm"),
        "dicom_truncated_pixels": (DICOM_DATA / "MR_truncated.dcm", None, {}, "MR_truncated.dcm"),
        "dicom_mixed_shapes": (_dicom_mixed_shapes(tmp / "mixed_shapes"), None, {}, "mixed_shapes"),
        "nan_volume": (tmp / "nan.nii.gz", None, {}, "nan.nii.gz"),
        "huge_nifti_header": (_nifti_claiming(tmp / "huge.nii", (2000, 2000, 2000)), None, {}, "huge.nii"),
        "4d_without_index": (EXAMPLE4D, None, {}, "example4d.nii.gz"),
        "volume_index_out_of_range": (EXAMPLE4D, None, {"volume_index": 2}, "example4d.nii.gz"),
        "zero_byte_mp4": (tmp / "zero.mp4", None, {}, "zero.mp4"),
        "mp4_without_frames_decord": (empty_mp4, None, {"video_backend": "decord"}, "novideo.mp4"),
        "mp4_without_frames_pyav": (empty_mp4, None, {"video_backend": "pyav"}, "novideo.mp4"),
        "garbage_mp4_decord": (tmp / "garbage.mp4", None, {"video_backend": "decord"}, "garbage.mp4"),
        "garbage_mp4_pyav": (tmp / "garbage.mp4", None, {"video_backend": "pyav"}, "garbage.mp4"),
        "truncated_mp4_decord": (tmp / "cut.mp4", None, {"video_backend": "decord"}, "cut.mp4"),
        "truncated_mp4_pyav": (tmp / "cut.mp4", None, {"video_backend": "pyav"}, "cut.mp4"),
        "unsupported_codec_decord": (tmp / "badcodec.mp4", None, {"video_backend": "decord"}, "badcodec.mp4"),
        "unsupported_codec_pyav": (tmp / "badcodec.mp4", None, {"video_backend": "pyav"}, "badcodec.mp4"),
        "image_too_large": (tmp / "big.png", None, {"max_image_pixels": 5000}, "big.png"),
        "png_header_huge": (_png_with_header(tmp / "bomb.png", 100_000, 100_000), None, {}, "bomb.png"),
        "kind_mismatch": (tmp / "big.png", "video", {}, "big.png"),
        "array_without_kind": (np.zeros((4, 4)), None, {}, "<array>"),
        "image_array_bad_ndim": (np.zeros((2, 4, 4, 3)), "image", {}, "<array>"),
        "image_array_channels_first": (np.zeros((3, 16, 16)), "image", {}, "<array>"),
        "volume_array_2d": (np.zeros((4, 4)), "volume", {}, "<array>"),
        "video_array_out_of_range": (np.full((2, 4, 4), 3.0), "video", {}, "<array>"),
        "array_with_nan": (nan_array, "image", {}, "<array>"),
        "empty_array": (np.zeros((0, 4, 4), np.int16), "volume", {}, "<array>"),
        "escapes_data_root": ("../big.png", None, {"data_root": tmp / "root"}, "big.png"),
        "symlink_escapes_data_root": ("link.png", None, {"data_root": tmp / "root"}, "link.png"),
        "unknown_kind": (tmp / "big.png", "picture", {}, "big.png"),
        "unknown_window_preset": (CT_SMALL, None, {"window": "lungs"}, "CT_small.dcm"),
        "bad_window_width": (CT_SMALL, None, {"window": (40, 0)}, "CT_small.dcm"),
        "bad_slice_axis": (MNI, None, {"slice_axis": "transverse"}, MNI.name),
        "window_on_rgb": (tmp / "rgb.png", None, {"window": "bone"}, "rgb.png"),
        "nifti_nan_affine": (_nifti_with_nan_sform(tmp / "nan_affine.nii"), None, {}, "nan_affine.nii"),
        "nifti_zero_volumes": (tmp / "zero_volumes.nii", None, {}, "zero_volumes.nii"),
        "nifti_zero_length_axis": (tmp / "zero_axis.nii", None, {}, "zero_axis.nii"),
        "nifti_beyond_float32": (tmp / "beyond_float32.nii.gz", None, {}, "beyond_float32.nii.gz"),
        "dicom_rescale_slope_nan": (_ct_small_with(tmp / "slope_nan.dcm", RescaleSlope=float("nan")), None, {},
                                    "slope_nan.dcm"),
        "dicom_own_window_width_0": (_ct_small_with(tmp / "ww0.dcm", WindowCenter=40, WindowWidth=0), None, {},
                                     "ww0.dcm"),
        "cifti_matrix": (NIB_DATA / "row_major.dconn.nii", None, {}, "row_major.dconn.nii"),
        "nifti_bad_quaternion": (_patched_nifti(tmp / "quat.nii", *QFORM_ONLY, (256, "<f", 5.0)), None, {},
                                 "quat.nii"),
    }


BAD_IDS = [
    "missing", "zero_bytes", "truncated_nii_gz", "truncated_nii", "corrupt_png", "unknown_format", "nifti_named_png",
    "empty_dicom_folder", "mixed_series", "unknown_series_uid", "dicom_without_pixels", "dicom_truncated_pixels",
    "dicom_mixed_shapes", "nan_volume", "huge_nifti_header", "4d_without_index", "volume_index_out_of_range",
    "zero_byte_mp4", "mp4_without_frames_decord", "mp4_without_frames_pyav", "garbage_mp4_decord",
    "garbage_mp4_pyav", "truncated_mp4_decord", "truncated_mp4_pyav", "unsupported_codec_decord",
    "unsupported_codec_pyav",
    "image_too_large", "png_header_huge", "kind_mismatch", "array_without_kind", "image_array_bad_ndim",
    "image_array_channels_first", "volume_array_2d", "video_array_out_of_range", "array_with_nan", "empty_array",
    "escapes_data_root", "symlink_escapes_data_root", "unknown_kind", "unknown_window_preset", "bad_window_width",
    "bad_slice_axis", "window_on_rgb", "nifti_nan_affine", "nifti_zero_volumes", "nifti_zero_length_axis",
    "nifti_beyond_float32", "dicom_rescale_slope_nan", "dicom_own_window_width_0", "cifti_matrix",
    "nifti_bad_quaternion",
]


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory, counter_video):
    tmp = tmp_path_factory.mktemp("bad")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp / "rgb.png")
    return _bad_cases(tmp, counter_video)


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_raises_media_error_naming_the_file(bad_cases, case):
    source, kind, kwargs, name = bad_cases[case]
    if "decord" in case:
        pytest.importorskip("decord")
    with pytest.raises(MediaError) as info:
        load_media(source, kind, **kwargs)
    assert name in str(info.value)


def test_bad_case_list_is_complete(bad_cases):
    assert sorted(BAD_IDS) == sorted(bad_cases)


def test_error_messages_say_what_is_wrong(bad_cases):
    def message(case):
        source, kind, kwargs, _ = bad_cases[case]
        with pytest.raises(MediaError) as info:
            load_media(source, kind, **kwargs)
        return str(info.value)

    assert "header claims 8000000000 voxels" in message("huge_nifti_header")
    assert "2 volumes" in message("4d_without_index")
    assert "escapes the data root" in message("escapes_data_root")
    assert "2 DICOM series" in message("mixed_series") and "(2 files" in message("mixed_series")
    assert "non-finite" in message("nan_volume")
    assert "no pixel data" in message("dicom_without_pixels")
    assert "NIfTI" in message("nifti_named_png")
    assert "lungs" in message("unknown_window_preset") and "lung" in message("unknown_window_preset")
    assert "sform" in message("nifti_nan_affine") and "NaN" in message("nifti_nan_affine")
    assert "0 volumes" in message("nifti_zero_volumes") and "volume_index" not in message("nifti_zero_volumes")
    assert "axis 1 has length 0" in message("nifti_zero_length_axis")
    assert "beyond float32" in message("nifti_beyond_float32") and "non-finite" not in message("nifti_beyond_float32")
    assert "RescaleSlope is nan" in message("dicom_rescale_slope_nan")
    assert "file's own CT window" in message("dicom_own_window_width_0")
    assert "quaternion" in message("nifti_bad_quaternion") and "w2" not in message("nifti_bad_quaternion")
    assert "not an image volume" in message("cifti_matrix")
    assert "window width must be" in message("bad_window_width")  # the caller's own bad window: said as such


def test_data_root_resolves_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "sub" / "ok.png")
    m = load_media("sub/../sub/ok.png", data_root=tmp_path)
    assert m.source == str(tmp_path.resolve() / "sub" / "ok.png")
