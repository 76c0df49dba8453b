"""Readers (NIfTI, NRRD, MHA, DICOM series) and case checks."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from monai_fedpriv.data import check_case, check_datalist, image_stem, read_image
from monai_fedpriv.errors import DataError


def _oblique_affine() -> np.ndarray:
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.2, 2.5])
    aff[:3, 3] = [-40.5, 12.25, -7.0]
    return aff


def _save(arr, path, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def test_nifti_roundtrip(tmp_path):
    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    path = _save(arr, tmp_path / "x.nii.gz", _oblique_affine())
    out, aff = read_image(path)
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_allclose(aff, _oblique_affine(), atol=1e-5)
    assert image_stem(path) == "x"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_formats_match_nifti(tmp_path, suffix):
    arr = np.random.default_rng(1).integers(0, 100, size=(5, 6, 7)).astype(np.int16)
    nii = _save(arr, tmp_path / "x.nii.gz", _oblique_affine())
    other = tmp_path / f"x{suffix}"
    sitk.WriteImage(sitk.ReadImage(nii), str(other))  # SimpleITK converts RAS -> LPS on the way
    ref_arr, ref_aff = read_image(nii)
    out, aff = read_image(other)
    np.testing.assert_array_equal(out, ref_arr)
    np.testing.assert_allclose(aff, ref_aff, atol=1e-4)


def test_dicom_series(tmp_path):
    arr = np.arange(3 * 5 * 4, dtype=np.int16).reshape(3, 5, 4)  # (z, y, x) as SimpleITK stores it
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.9, 2.0))
    img.SetOrigin((10.0, -20.0, 5.0))
    uid = "1.2.826.0.1.3680043.2.1125.77"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        sl = img[:, :, k]
        pos = "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {"0008|0060": "MR", "0020|000e": uid + ".2", "0020|000d": uid + ".3", "0020|0037": "1\\0\\0\\0\\1\\0"}
        tags.update({"0020|0032": pos, "0020|0013": str(k), "0018|0050": "2.0", "0008|0018": f"{uid}.4.{k}"})
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"{k}.dcm"))
        writer.Execute(sl)
    out, aff = read_image(tmp_path)
    np.testing.assert_array_equal(out, arr.transpose(2, 1, 0))
    expected = np.array([[-0.8, 0, 0, -10.0], [0, -0.9, 0, 20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(aff, expected, atol=1e-5)


def test_empty_directory_is_not_a_dicom_series(tmp_path):
    with pytest.raises(DataError, match="no DICOM series"):
        read_image(tmp_path)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(DataError, match="nope.nii.gz"):
        read_image(path)


def test_random_bytes_nifti(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match="junk.nii.gz") as err:
        read_image(path)
    assert "cannot read NIfTI" in str(err.value)


def test_truncated_gzip_nifti(tmp_path):
    arr = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    good = _save(arr, tmp_path / "good.nii.gz")
    data = open(good, "rb").read()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.nii.gz"):
        read_image(bad)


def test_random_bytes_nrrd(tmp_path):
    path = tmp_path / "junk.nrrd"
    path.write_bytes(gzip.compress(b"not an image"))
    with pytest.raises(DataError, match="junk.nrrd"):
        read_image(path)


@pytest.fixture
def pair(tmp_path):
    img = np.random.default_rng(0).normal(size=(6, 6, 4)).astype(np.float32)
    lab = np.zeros((6, 6, 4), dtype=np.uint8)
    lab[2:4, 2:4, :] = 1
    lab[0, 0, 0] = 2
    return {"image": _save(img, tmp_path / "img.nii.gz"), "label": _save(lab, tmp_path / "lab.nii.gz")}


def test_check_case_passes(pair):
    check_case(pair, labels=[0, 1, 2])
    check_case(pair, labels=None)
    check_case({"image": [pair["image"], pair["image"]], "label": pair["label"]}, labels=[0, 1, 2])


def test_check_case_shape_mismatch(tmp_path, pair):
    other = _save(np.zeros((6, 5, 4), np.float32), tmp_path / "small.nii.gz")
    with pytest.raises(DataError, match="small.nii.gz.*lab.nii.gz"):
        check_case({"image": other, "label": pair["label"]}, labels=[0, 1, 2])
    with pytest.raises(DataError, match="small.nii.gz"):  # one bad modality in a list
        check_case({"image": [pair["image"], other], "label": pair["label"]}, labels=[0, 1, 2])


def test_check_case_channel_last_image(tmp_path, pair):
    four_d = _save(np.zeros((6, 6, 4, 2), np.float32), tmp_path / "multi.nii.gz")
    check_case({"image": four_d, "label": pair["label"]}, labels=[0, 1, 2])


def test_check_case_affine_mismatch(tmp_path, pair):
    aff = np.eye(4)
    aff[0, 3] = 0.5
    moved = _save(np.zeros((6, 6, 4), np.float32), tmp_path / "moved.nii.gz", aff)
    with pytest.raises(DataError, match="affine of image .*moved.nii.gz"):
        check_case({"image": moved, "label": pair["label"]}, labels=[0, 1, 2])
    check_case({"image": moved, "label": pair["label"]}, labels=[0, 1, 2], atol=1.0)


def test_check_case_undeclared_label(pair):
    with pytest.raises(DataError) as err:
        check_case(pair, labels=[0, 1])
    msg = str(err.value)
    assert "{2}" in msg and "lab.nii.gz" in msg and "[0, 1]" in msg


def test_check_case_non_integer_label(tmp_path, pair):
    lab = _save(np.full((6, 6, 4), 0.5, np.float32), tmp_path / "soft.nii.gz")
    with pytest.raises(DataError, match="soft.nii.gz.*non-integer"):
        check_case({"image": pair["image"], "label": lab}, labels=[0, 1])


def test_check_case_missing_key(pair):
    with pytest.raises(DataError, match="'image'"):
        check_case({"label": pair["label"]}, labels=[0, 1, 2])


def test_check_datalist_collects_all_errors(tmp_path, pair):
    bad1 = {"image": str(tmp_path / "gone.nii.gz"), "label": pair["label"]}
    lab5 = np.zeros((6, 6, 4), np.uint8)
    lab5[1, 1, 1] = 5
    bad2 = {"image": pair["image"], "label": _save(lab5, tmp_path / "lab5.nii.gz")}
    with pytest.raises(DataError) as err:
        check_datalist([pair, bad1, bad2], labels=[0, 1, 2])
    msg = str(err.value)
    assert msg.startswith("2 of 3 cases failed")
    assert "gone.nii.gz" in msg and "{5} of" in msg and "lab5.nii.gz" in msg
    check_datalist([pair], labels=[0, 1, 2])
