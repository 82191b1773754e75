"""Differential tests: load_media against the reference libraries' own reading of the same files.

NIfTI variants (stored dtype, scl_slope / scl_inter, orientation incl. oblique, anisotropic voxels, .nii / .nii.gz,
3D / 4D) are compared with nibabel: ``get_fdata`` of ``nib.as_closest_canonical`` sliced along each RAS axis, shown
in the documented radiological display (``s.T[::-1, ::-1]``) and normalised by the documented rule, written out
again here. DICOM series variants (rescale slope / intercept, shuffled files, spacing, MONOCHROME1, multi-frame,
compressed transfer syntaxes) are compared with pydicom: ``pixel_array`` + ``apply_modality_lut`` per file, files
sorted by ImagePositionPatient along the slice normal. pydicom's lossless twins of MR_small must give exactly the
uncompressed file's frames. Everything is small: the whole file runs in seconds.
"""

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnivmed.media_omnivmed import WINDOW_PRESETS, MediaError, load_media  # noqa: E402

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    MPEG2MPML,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

DICOM_DATA = Path(pydicom.__file__).parent / "data/test_files"  # direct paths: get_testdata_file may download
MR_SMALL = DICOM_DATA / "MR_small.dcm"
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


# ------------------------------------------------------------------------------------------------
# The documented rules, written from the module docstring (not imported from the module)
# ------------------------------------------------------------------------------------------------


def documented_normalisation(raw, *, window=None, eight_bit_by_value=False, eight_bit=False, percentiles=(0.5, 99.5)):
    """(T, H, W) physical values -> (T, H, W) in [0, 1]: window, else display-ready 8 bits / 255, else percentiles
    over all output slices (min/max when they coincide, zeros when constant)."""
    raw = np.asarray(raw, dtype=np.float64)
    if window is not None:
        center, width = window
        return np.clip((raw - (center - width / 2)) / width, 0, 1)
    if eight_bit or (eight_bit_by_value and raw.min() >= 0 and raw.max() <= 255 and np.all(raw == np.round(raw))):
        return np.clip(raw / 255.0, 0, 1)
    lo, hi = np.percentile(raw, percentiles)
    if hi <= lo:
        lo, hi = raw.min(), raw.max()
        if hi <= lo:
            return np.zeros_like(raw)
    return np.clip((raw - lo) / (hi - lo), 0, 1)


def nibabel_reference(path, axis="axial", volume_index=None, window=None):
    """(frames (T, H, W), slice positions (T,), spacing) as nibabel reads the file."""
    canon = nib.as_closest_canonical(nib.load(path))
    data = canon.get_fdata()
    if data.ndim == 4:
        data = data[..., volume_index]
    ax = AXES[axis]
    planes = np.stack([np.take(data, k, axis=ax).T[::-1, ::-1] for k in range(data.shape[ax])])
    frames = documented_normalisation(planes, window=window, eight_bit_by_value=True)
    centre = np.array([(n - 1) / 2 for n in data.shape[:3]] + [1.0])
    positions = []
    for k in range(data.shape[ax]):
        centre[ax] = k
        positions.append((canon.affine @ centre)[ax])
    zooms = np.linalg.norm(canon.affine[:3, :3], axis=0)
    others = [a for a in range(3) if a != ax]
    return frames, np.array(positions), (zooms[ax], zooms[others[1]], zooms[others[0]])


def assert_matches_nibabel(path, *, volume_index=None, window=None, modality=None):
    for axis in AXES:
        m = load_media(path, slice_axis=axis, volume_index=volume_index, window=window, modality=modality)
        ref, positions, spacing = nibabel_reference(path, axis, volume_index,
                                                    window if window else (40, 400) if modality == "CT" else None)
        assert m.frames.shape == (*ref.shape, 3), axis
        np.testing.assert_allclose(m.frames[..., 0], ref, atol=2e-5, err_msg=f"{path.name} {axis}")
        assert np.array_equal(m.frames[..., 0], m.frames[..., 2])
        np.testing.assert_allclose(m.slice_positions_mm, positions, atol=1e-4)
        np.testing.assert_allclose(m.spacing_mm, spacing, rtol=1e-5)
        assert m.slice_indices == list(range(ref.shape[0]))


# ------------------------------------------------------------------------------------------------
# NIfTI
# ------------------------------------------------------------------------------------------------


def _rotation(deg_x, deg_z):
    ax, az = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


ORIENTATIONS = {
    "RAS": np.eye(3),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
    "PSL": np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float),  # i -> P, j -> S, k -> L
    "oblique": _rotation(25, -15) @ np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=float),
}
ZOOMS = np.array([0.6, 1.1, 2.5])  # anisotropic everywhere


def _affine(orientation: str) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = ORIENTATIONS[orientation] @ np.diag(ZOOMS)
    affine[:3, 3] = [-7.0, 12.5, -3.0]
    return affine


def _stored(dtype: str, scaled: bool, rng, shape):
    """(array to store, (slope, inter) or None): physical values with structure in every direction."""
    if dtype == "uint8":
        q = rng.integers(0, 256, shape)
    elif dtype == "int16":
        q = rng.integers(-300, 1200, shape)
    else:
        q = rng.normal(50.0, 30.0, shape)
    scaling = (0.37, -12.5) if scaled else None
    return q.astype(dtype), scaling


NIFTI_VARIANTS = [
    (dtype, scaled, orientation, ext, dims)
    for n, (dtype, scaled) in enumerate(
        (d, s) for d in ("int16", "uint8", "float32", "float64") for s in (False, True)
    )
    for m, orientation in enumerate(ORIENTATIONS)
    for ext, dims in [((".nii", ".nii.gz")[(n + m) % 2], (3, 4)[(n // 2 + m) % 2])]
]


@pytest.mark.parametrize("dtype,scaled,orientation,ext,dims", NIFTI_VARIANTS,
                         ids=["-".join(map(str, v)) for v in NIFTI_VARIANTS])
def test_nifti_variant_matches_nibabel(tmp_path, dtype, scaled, orientation, ext, dims):
    rng = np.random.default_rng(zlib.crc32(f"{dtype}{scaled}{orientation}".encode()))
    shape = (9, 7, 6) + ((3,) if dims == 4 else ())
    data, scaling = _stored(dtype, scaled, rng, shape)
    img = nib.Nifti1Image(data, _affine(orientation), dtype=np.dtype(dtype))
    if scaling:
        img.header.set_slope_inter(*scaling)
    path = tmp_path / f"v{ext}"
    nib.save(img, path)
    stored = nib.load(path)
    assert stored.get_data_dtype() == np.dtype(dtype)
    if scaling:  # the file really carries the scaling, and nibabel applies it
        assert (float(stored.dataobj.slope), float(stored.dataobj.inter)) == pytest.approx(scaling)
    assert_matches_nibabel(path, volume_index=1 if dims == 4 else None)
    if orientation == "oblique":
        m = load_media(path, volume_index=1 if dims == 4 else None)
        assert m.metadata["orientation"] == "".join(nib.aff2axcodes(_affine(orientation)))
        assert not any("sheared" in w for w in m.metadata["warnings"])  # rotated, not sheared


def test_nifti_ct_window_on_scaled_storage_matches_nibabel(tmp_path):
    rng = np.random.default_rng(3)
    hu = rng.integers(-1024, 2000, (8, 6, 5))
    img = nib.Nifti1Image((hu + 1024).astype(np.uint16), _affine("LAS"), dtype=np.uint16)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "ct.nii.gz")
    assert_matches_nibabel(tmp_path / "ct.nii.gz", modality="CT")
    assert_matches_nibabel(tmp_path / "ct.nii.gz", window=WINDOW_PRESETS["lung"])


def _save_variants(tmp_path, variants):
    paths = []
    for name, data, scaling in variants:
        img = nib.Nifti1Image(data, _affine("oblique"), dtype=data.dtype)
        if scaling:
            img.header.set_slope_inter(*scaling)
        path = tmp_path / name
        nib.save(img, path)
        paths.append(path)
    return paths


def test_equal_physical_values_give_equal_frames_whatever_the_dtype(tmp_path):
    q = np.random.default_rng(1).integers(0, 200, (9, 8, 7))
    physical = q * 0.5 - 20.0  # exact in every dtype below
    paths = _save_variants(tmp_path, [
        ("u8_scaled.nii", q.astype(np.uint8), (0.5, -20.0)),
        ("i16_scaled.nii.gz", (2 * q).astype(np.int16), (0.25, -20.0)),
        ("f32.nii", physical.astype(np.float32), None),
        ("f64.nii.gz", physical.astype(np.float64), None),
    ])
    for p in paths:
        np.testing.assert_array_equal(nib.load(p).get_fdata(), physical)
    frames = [load_media(p).frames for p in paths]
    for p, f in zip(paths[1:], frames[1:]):
        np.testing.assert_array_equal(f, frames[0], err_msg=p.name)
    assert_matches_nibabel(paths[0])


def test_equal_8bit_values_give_equal_frames_whatever_the_dtype(tmp_path):
    # Integer values in 0..255 read as display-ready 8 bits (/ 255) whether stored as uint8 or not.
    q = np.random.default_rng(2).integers(0, 256, (9, 8, 7))
    paths = _save_variants(tmp_path, [
        ("u8.nii", q.astype(np.uint8), None),
        ("i16.nii", q.astype(np.int16), None),
        ("i16_scaled.nii.gz", (2 * q).astype(np.int16), (0.5, 0.0)),
        ("u16_inter.nii.gz", (q + 100).astype(np.uint16), (1.0, -100.0)),
        ("f32.nii", q.astype(np.float32), None),
    ])
    frames = [load_media(p) for p in paths]
    for p, m in zip(paths, frames):
        assert m.metadata["intensity"] == {"method": "scale", "divisor": 255.0}, p.name
        np.testing.assert_array_equal(m.frames, frames[0].frames, err_msg=p.name)
    assert_matches_nibabel(paths[1])


def test_mni_template_saved_as_nilearn_does_is_not_black(tmp_path):
    # nilearn's load_mni152_template() holds the MNI T1 as floats in [0, 1] under a uint8 header dtype, so
    # nib.save stores uint8 with scl_slope ~ 1/255. Same mechanism on a block of the real template (fast).
    nilearn = pytest.importorskip("nilearn")
    mni = nib.load(Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    block = np.asarray(mni.dataobj)[70:130, 90:150, 60:100].astype(np.float32) / 255.0
    template = nib.Nifti1Image(block, mni.affine, mni.header)
    assert template.get_data_dtype() == np.uint8
    nib.save(template, tmp_path / "mni.nii.gz")
    stored = nib.load(tmp_path / "mni.nii.gz")
    assert stored.get_data_dtype() == np.uint8 and stored.dataobj.slope != 1.0
    m = load_media(tmp_path / "mni.nii.gz", max_slices=1000)
    ref, _, _ = nibabel_reference(tmp_path / "mni.nii.gz")
    np.testing.assert_allclose(m.frames[..., 0], ref, atol=2e-5)
    assert m.frames.max() == pytest.approx(1.0) and m.frames.mean() > 0.2
    nib.save(nib.Nifti1Image(stored.get_fdata().astype(np.float32), stored.affine), tmp_path / "f32.nii.gz")
    np.testing.assert_array_equal(load_media(tmp_path / "f32.nii.gz", max_slices=1000).frames, m.frames)


# ------------------------------------------------------------------------------------------------
# DICOM series, built here from arrays
# ------------------------------------------------------------------------------------------------


def _dicom(path, pixels, *, ipp=(0.0, 0.0, 0.0), iop=(1, 0, 0, 0, 1, 0), spacing=(0.7, 1.3), modality="CT",
           rescale=None, photometric="MONOCHROME2", instance=1, series_uid="1.2.3.4", window=None, bits_stored=None,
           syntax=ExplicitVRLittleEndian):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, "1.2.3"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = list(spacing)
    bits = bits_stored or pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if syntax != ExplicitVRLittleEndian:
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def pydicom_series_reference(files):
    """(T, H, W) physical values sorted by ImagePositionPatient along the slice normal, straight from pydicom."""
    datasets = [pydicom.dcmread(f) for f in files]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, dtype=float), normal)))
    return np.stack([apply_modality_lut(d.pixel_array, d) for d in datasets]), datasets


def _series(tmp_path, n=5, shape=(6, 8), step=2.5, **kw):
    """n slices with slice-specific values, written in shuffled names and scrambled InstanceNumbers."""
    rng = np.random.default_rng(n)
    folder = tmp_path / "series"
    folder.mkdir()
    rescales = kw.pop("rescales", [None] * n)
    dtype = kw.pop("dtype", np.int16)
    lo, hi = kw.pop("value_range", (-1000, 1500))
    order = rng.permutation(n)
    files = []
    for k in range(n):
        pixels = rng.integers(lo, hi, shape).astype(dtype)
        name = f"{order[k]:03d}_{rng.integers(1e6)}.dcm"
        files.append(_dicom(folder / name, pixels, ipp=(-20.0, 31.0, 100.0 - step * order[k]), instance=int(k),
                            rescale=rescales[k], **kw))
    return folder, files


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_dicom_series_with_per_slice_rescale_shuffled(tmp_path, modality):
    rescales = [(1.0, -1024.0), (0.5, 10.0), (2.0, -3.0), (1.0, 0.0), (0.25, 7.5)]
    folder, files = _series(tmp_path, rescales=rescales, modality=modality, dtype=np.uint16, value_range=(0, 3000))
    physical, datasets = pydicom_series_reference(files)
    m = load_media(folder)
    expected = documented_normalisation(physical, window=(40, 400) if modality == "CT" else None)
    np.testing.assert_allclose(m.frames[..., 0], expected, atol=2e-5)
    centres_z = [float(d.ImagePositionPatient[2]) for d in datasets]
    np.testing.assert_allclose(m.slice_positions_mm, centres_z, atol=1e-4)
    assert m.spacing_mm == pytest.approx((2.5, 0.7, 1.3))
    np.testing.assert_array_equal(load_media(list(reversed(files))).frames, m.frames)


def test_dicom_equal_physical_values_whatever_the_storage(tmp_path):
    hu = np.random.default_rng(4).integers(-1024, 2000, (6, 8))
    a = _dicom(tmp_path / "a.dcm", hu.astype(np.int16))
    b = _dicom(tmp_path / "b.dcm", (hu + 1024).astype(np.uint16), rescale=(1.0, -1024.0))
    c = _dicom(tmp_path / "c.dcm", (2 * (hu + 1024)).astype(np.uint16), rescale=(0.5, -1024.0))
    for modality in ("CT", "MR"):
        frames = [load_media(p, modality=modality).frames for p in (a, b, c)]
        np.testing.assert_array_equal(frames[1], frames[0])
        np.testing.assert_array_equal(frames[2], frames[0])
        ref = documented_normalisation(hu[None], window=(40, 400) if modality == "CT" else None)
        np.testing.assert_allclose(frames[0][..., 0], ref, atol=2e-5)


def test_dicom_8bit_series_one_rescaled_slice_means_percentiles(tmp_path):
    # Only the third file carries a rescale: 8-bit display scaling would clip its values at 1.
    rescales = [None, None, (2.0, 0.0), None]
    folder, files = _series(tmp_path, n=4, rescales=rescales, modality="MR", dtype=np.uint8, value_range=(0, 256))
    physical, _ = pydicom_series_reference(files)
    m = load_media(folder)
    assert m.metadata["intensity"]["method"] == "percentile"
    np.testing.assert_allclose(m.frames[..., 0], documented_normalisation(physical), atol=2e-5)
    (tmp_path / "plain").mkdir()
    plain, plain_files = _series(tmp_path / "plain", n=4, modality="MR", dtype=np.uint8, value_range=(0, 256))
    p = load_media(plain)
    ref, _ = pydicom_series_reference(plain_files)
    np.testing.assert_allclose(p.frames[..., 0], documented_normalisation(ref, eight_bit=True), atol=2e-6)


def test_dicom_series_spacing_and_file_window(tmp_path):
    folder, files = _series(tmp_path, n=4, step=3.3, spacing=(0.45, 0.9), window=(300, 1500))
    physical, _ = pydicom_series_reference(files)
    m = load_media(folder)
    assert m.spacing_mm == pytest.approx((3.3, 0.45, 0.9))
    np.testing.assert_allclose(m.frames[..., 0], documented_normalisation(physical, window=(300, 1500)), atol=2e-5)


def test_dicom_gantry_tilt_sorted_along_normal_and_reported(tmp_path):
    # Gantry tilt: the image plane is tilted 15 degrees about x, table positions advance along z.
    t = np.radians(15)
    iop = (1, 0, 0, 0, np.cos(t), np.sin(t))
    folder, files = _series(tmp_path, n=5, iop=iop, modality="MR")
    physical, datasets = pydicom_series_reference(files)
    m = load_media(folder)
    np.testing.assert_allclose(m.frames[..., 0], documented_normalisation(physical), atol=2e-5)
    rows, cols = physical.shape[1:]
    col_dir = np.array(iop[3:])
    centres_z = [float(d.ImagePositionPatient[2]) + col_dir[2] * 0.7 * (rows - 1) / 2 for d in datasets]
    np.testing.assert_allclose(m.slice_positions_mm, centres_z, atol=1e-4)
    assert any("gantry tilt" in w and "series" in w for w in m.metadata["warnings"])


def test_dicom_monochrome1_series(tmp_path):
    folder, files = _series(tmp_path, n=3, photometric="MONOCHROME1", modality="MR")
    physical, _ = pydicom_series_reference(files)
    m = load_media(folder)
    np.testing.assert_allclose(m.frames[..., 0], 1.0 - documented_normalisation(physical), atol=2e-5)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_dicom_multiframe_matches_pydicom(tmp_path, modality):
    stack = np.random.default_rng(5).integers(0, 4000, (4, 6, 8)).astype(np.uint16)
    path = _dicom(tmp_path / "mf.dcm", stack, modality=modality, rescale=(0.5, -1024.0))
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 4
    physical = apply_modality_lut(ds.pixel_array, ds)
    m = load_media(path)
    assert m.frames.shape == (4, 6, 8, 3)
    expected = documented_normalisation(physical, window=(40, 400) if modality == "CT" else None)
    np.testing.assert_allclose(m.frames[..., 0], expected, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# Compressed transfer syntaxes: lossless twins must give exactly the uncompressed frames
# ------------------------------------------------------------------------------------------------


def _jpeg_lossless(image: np.ndarray, precision: int, predictor: int) -> bytes:
    """A lossless JPEG (ITU T.81 process 14) bitstream of a 2D unsigned image: one Huffman table, 5-bit codes."""
    x = image.astype(np.int64)
    a, b, c = x[1:, :-1], x[:-1, 1:], x[:-1, :-1]
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:], pred[1:, 0] = x[0, :-1], x[:-1, 0]
    pred[1:, 1:] = {1: a, 2: b, 3: c, 4: a + b - c, 7: (a + b) >> 1}[predictor]
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)
    bits = []
    for d in diff.ravel().tolist():
        s = 16 if d == 32768 else abs(d).bit_length()
        bits.append(format(s, "05b"))
        if 0 < s < 16:
            bits.append(format(d if d > 0 else d + (1 << s) - 1, f"0{s}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")
    h, w = image.shape
    sof = b"\xff\xc3" + struct.pack(">HBHHB", 11, precision, h, w, 1) + bytes([1, 0x11, 0])
    dht = b"\xff\xc4" + struct.pack(">HB", 2 + 1 + 16 + 17, 0) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0, predictor, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + data + b"\xff\xd9"


def _mr_small_as(path, syntax, predictor):
    ds = pydicom.dcmread(MR_SMALL)
    ds.PixelData = encapsulate([_jpeg_lossless(ds.pixel_array, 16, predictor)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def mr_small_reference():
    """MR_small uncompressed: pydicom's values and our frames of it (checked against pydicom first)."""
    raw = pydicom.dcmread(MR_SMALL).pixel_array
    m = load_media(MR_SMALL)
    np.testing.assert_allclose(m.frames[0, ..., 0], documented_normalisation(raw[None])[0], atol=2e-5)
    return raw, m.frames


TWINS = ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm",
         "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"]


@pytest.mark.parametrize("name", TWINS)
def test_pydicom_lossless_twins_of_mr_small(mr_small_reference, name):
    raw, frames = mr_small_reference
    ds = pydicom.dcmread(DICOM_DATA / name)
    np.testing.assert_array_equal(ds.pixel_array, raw)  # the twin really is lossless (pydicom's own reading)
    np.testing.assert_array_equal(load_media(DICOM_DATA / name).frames, frames)


@pytest.mark.parametrize("syntax,predictor", [(JPEGLosslessSV1, 1), (JPEGLossless, 7), (JPEGLossless, 4)])
def test_jpeg_lossless_twin_of_mr_small(tmp_path, mr_small_reference, syntax, predictor):
    raw, frames = mr_small_reference
    path = _mr_small_as(tmp_path / "jpll.dcm", syntax, predictor)
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, raw)
    np.testing.assert_array_equal(load_media(path).frames, frames)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian])
def test_compressed_series_equals_uncompressed(tmp_path, syntax):
    kw = dict(n=3, shape=(32, 40), modality="MR", dtype=np.uint16, value_range=(0, 4000))  # J2K needs >= 32 px
    plain, _ = _series(tmp_path, **kw)
    (tmp_path / "packed").mkdir()
    packed, files = _series(tmp_path / "packed", syntax=syntax, **kw)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_media(packed).frames, load_media(plain).frames)


def test_jpeg_extended_12bit_matches_pydicom():
    path = DICOM_DATA / "JPGExtended.dcm"
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51" and int(ds.BitsStored) == 12
    m = load_media(path, window=(2048, 4096))
    physical = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(m.frames[0, ..., 0], documented_normalisation(physical[None], window=(2048, 4096))[0],
                               atol=2e-5)


def test_undecodable_transfer_syntax_is_a_clear_error(tmp_path):
    ds = pydicom.dcmread(MR_SMALL)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(tmp_path / "mpeg2.dcm")
    with pytest.raises(MediaError, match=r"mpeg2\.dcm: cannot decode DICOM pixel data in transfer syntax MPEG2"):
        load_media(tmp_path / "mpeg2.dcm")
