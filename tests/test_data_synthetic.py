"""Synthetic MSD / BraTS writers: the real loaders and checks accept them, and name every file corrupt_case breaks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_fedpriv.data import load_brats_datalist, load_msd_datalist
from monai_fedpriv.data.synthetic import corrupt_case, write_brats_folder, write_msd_task
from monai_fedpriv.errors import DataError

CT_LABELS = {0: "background", 1: "organ", 2: "tumour"}


def _arr(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_msd_task_is_read_and_checked(tmp_path):
    root = write_msd_task(tmp_path, 4, modalities=("CT",), labels=CT_LABELS, seed=1, institutions=("H1", "H2"))
    cases = load_msd_datalist(root, check=True)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "CT"}
    assert "validation" not in meta and meta["labels"] == {str(k): v for k, v in CT_LABELS.items()}
    assert "SYNTHETIC" in meta["description"]
    assert [c["institution"] for c in cases] == ["H1", "H2", "H1", "H2"]
    img, lab = _arr(cases[0]["image"]), _arr(cases[0]["label"])
    assert img.shape == lab.shape == (24, 24, 12) and img.dtype == np.float32 and lab.dtype == np.uint8
    assert np.allclose(nib.load(cases[0]["image"]).header.get_zooms(), (1.5, 1.5, 3.0))
    assert set(np.unique(lab)) == {0, 1, 2}  # every class present, nested ellipsoids
    # labels are consistent with the image: HU rise by ~80 per class, air outside the body
    means = [img[lab == k].mean() for k in (1, 2)]
    assert 60 < means[0] < 140 and 140 < means[1] < 220
    assert np.median(img[lab == 0]) < -500


def test_msd_seed_and_orientation(tmp_path):
    a = load_msd_datalist(write_msd_task(tmp_path / "a", 2, seed=3))
    b = load_msd_datalist(write_msd_task(tmp_path / "b", 2, seed=3))
    c = load_msd_datalist(write_msd_task(tmp_path / "c", 2, seed=4))
    lps = load_msd_datalist(write_msd_task(tmp_path / "lps", 2, seed=3, orientation="LPS"))
    assert np.array_equal(_arr(a[1]["image"]), _arr(b[1]["image"]))
    assert not np.array_equal(_arr(a[1]["label"]), _arr(c[1]["label"]))
    # LPS: same world content, x and y axes flipped, negative affine diagonal
    ras_aff, lps_aff = nib.load(a[0]["image"]).affine, nib.load(lps[0]["image"]).affine
    assert np.all(np.diag(lps_aff)[:3] == [-1.5, -1.5, 3.0])
    assert np.array_equal(_arr(lps[0]["label"])[::-1, ::-1], _arr(a[0]["label"]))
    ijk = np.array([2, 5, 7, 1.0])
    flipped = np.array([24 - 1 - 2, 24 - 1 - 5, 7, 1.0])
    assert np.allclose(ras_aff @ ijk, lps_aff @ flipped)
    mr = _arr(a[0]["image"])
    assert mr[_arr(a[0]["label"]) == 0].min() == 0.0 and (mr > 0).any()  # MR background exactly 0


def test_msd_multimodal_layouts(tmp_path):
    mods = ("FLAIR", "T1w", "t1gd", "T2w")
    root = write_msd_task(tmp_path / "4d", 2, modalities=mods, multimodal_4d=True)
    cases = load_msd_datalist(root, check=True)  # the check allows one trailing channel axis
    assert _arr(cases[0]["image"]).shape == (24, 24, 12, 4)
    assert json.loads((root / "dataset.json").read_text())["tensorImageSize"] == "4D"
    root = write_msd_task(tmp_path / "files", 2, modalities=("CT", "MR"), institutions=("X",), institutions_csv=True)
    cases = load_msd_datalist(root, check=True)
    assert [Path(p).name for p in cases[0]["image"]] == ["synth_001_0000.nii.gz", "synth_001_0001.nii.gz"]
    assert cases[0]["patient"] == "synth_001" and cases[0]["institution"] == "X"  # from institutions.csv
    assert (root / "institutions.csv").read_text().splitlines()[0] == "case,institution"


def test_brats_2020_folder(tmp_path):
    root = write_brats_folder(tmp_path, 4, institutions=("CBICA", "TCIA_08", "2013", "TCGA-02"), seed=2)
    cases = load_brats_datalist(root, check=True)
    assert [c["patient"] for c in cases] == [f"BraTS20_Training_00{i}" for i in (1, 2, 3, 4)]
    assert [c["institution"] for c in cases] == ["CBICA", "TCIA_08", "2013", "TCGA-02"]
    assert [Path(p).name.split("_")[-1] for p in cases[0]["image"]] == [
        "t1.nii.gz",
        "t1ce.nii.gz",
        "t2.nii.gz",
        "flair.nii.gz",
    ]
    lab = _arr(cases[0]["label"])
    assert set(np.unique(lab)) == {0, 1, 2, 4}
    t1ce, flair = _arr(cases[0]["image"][1]), _arr(cases[0]["image"][3])
    assert t1ce[lab == 4].mean() > 1.5 * t1ce[lab == 2].mean()  # enhancing rim bright on t1ce
    assert flair[lab == 2].mean() > 1.5 * flair[(lab == 0) & (flair > 0)].mean()  # oedema bright on FLAIR
    assert nib.aff2axcodes(nib.load(cases[0]["label"]).affine) == ("L", "P", "S")


def test_brats_2023_naming(tmp_path):
    root = write_brats_folder(tmp_path, 2, naming="2023")
    cases = load_brats_datalist(root, check=True)
    assert cases[0]["patient"] == "BraTS-GLI-00001-000"
    assert [Path(p).name for p in cases[0]["image"]] == [
        f"BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f")
    ]
    assert set(np.unique(_arr(cases[0]["label"]))) == {0, 1, 2, 3}


def test_brats_rejects_institution_the_loader_cannot_recover(tmp_path):
    with pytest.raises(ValueError, match="Hospital A"):
        write_brats_folder(tmp_path, 2, institutions=("Hospital A",))


def test_every_broken_msd_file_is_named(tmp_path):
    root = write_msd_task(tmp_path, 5, labels={0: "background", 1: "lesion"})
    cases = load_msd_datalist(root)
    broken = [
        corrupt_case(cases[0], "truncate_image"),
        corrupt_case(cases[2], "label_shape"),
        corrupt_case(cases[3], "label_value", value=7),
    ]
    with pytest.raises(DataError) as err:
        load_msd_datalist(root, check=True)
    msg = str(err.value)
    assert msg.startswith("3 of 5 cases failed the checks")
    for path in broken:
        assert str(path) in msg
    assert "{7}" in msg and "(23, 24, 12)" in msg
    assert cases[1]["image"] not in msg and cases[4]["label"] not in msg


def test_every_broken_brats_file_is_named(tmp_path):
    root = write_brats_folder(tmp_path, 3)
    cases = load_brats_datalist(root)
    broken = [corrupt_case(cases[0], "truncate_label"), corrupt_case(cases[2], "label_value", value=9)]
    with pytest.raises(DataError) as err:
        load_brats_datalist(root, check=True)
    assert str(err.value).startswith("2 of 3 cases") and all(str(p) in str(err.value) for p in broken)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_case(cases[1], "flip")
