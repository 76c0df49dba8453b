"""MSD data lists: path resolution, patients, institutions, and every bad-input error."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_fedpriv.data import load_msd_datalist, read_msd_labels
from monai_fedpriv.errors import DataError


def _write(root: Path, meta: dict, files: dict[str, np.ndarray]) -> Path:
    for rel, arr in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(root / rel))
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def msd(tmp_path):
    img = np.zeros((4, 4, 3), np.float32)
    lab = np.zeros((4, 4, 3), np.uint8)
    lab[1, 1, 1] = 1
    files = {}
    for name in ("a", "b", "c"):
        files[f"imagesTr/{name}.nii.gz"] = img
        files[f"labelsTr/{name}.nii.gz"] = lab
    files["imagesTs/t.nii.gz"] = img
    meta = {
        "labels": {"0": "background", "1": "organ"},
        "modality": {"0": "CT"},
        "training": [
            {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz", "institution": "H1", "extra": 5},
            {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz", "patient": "P-b", "site": "H2"},
            {"image": "./imagesTr/c.nii.gz", "label": "./labelsTr/c.nii.gz"},
        ],
        "test": ["./imagesTs/t.nii.gz"],
    }
    return _write(tmp_path, meta, files)


def test_load_training(msd):
    cases = load_msd_datalist(msd, check=True)
    assert [c["patient"] for c in cases] == ["a", "P-b", "c"]
    assert [c["institution"] for c in cases] == ["H1", "H2", "unknown"]
    assert all(Path(c["image"]).is_absolute() and Path(c["label"]).is_file() for c in cases)
    assert cases[0]["extra"] == 5
    assert read_msd_labels(msd) == {0: "background", 1: "organ"}


def test_institutions_csv(msd):
    (msd / "institutions.csv").write_text("case,institution\nc,H3\na,IGNORED\n")
    cases = load_msd_datalist(msd)
    assert [c["institution"] for c in cases] == ["H1", "H2", "H3"]  # item field wins over the CSV


def test_test_section_of_plain_paths(msd):
    cases = load_msd_datalist(msd, section="test")
    assert len(cases) == 1 and "label" not in cases[0] and cases[0]["patient"] == "t"


def test_nnunet_label_format(msd):
    meta = json.loads((msd / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "organ": 1}
    (msd / "dataset.json").write_text(json.dumps(meta))
    assert read_msd_labels(msd) == {0: "background", 1: "organ"}


def test_missing_dataset_json(tmp_path):
    with pytest.raises(DataError, match="dataset.json"):
        load_msd_datalist(tmp_path)


def test_missing_section(msd):
    with pytest.raises(DataError, match="'validation'"):
        load_msd_datalist(msd, section="validation")


@pytest.mark.parametrize("key", ["image", "label"])
def test_missing_key(msd, key):
    meta = json.loads((msd / "dataset.json").read_text())
    del meta["training"][1][key]
    (msd / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"training\[1\].*no '{key}' key"):
        load_msd_datalist(msd)


def test_listed_file_missing(msd):
    (msd / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DataError, match="labelsTr/b.nii.gz does not exist"):
        load_msd_datalist(msd)


def test_check_reports_bad_label(msd):
    lab = np.zeros((4, 4, 3), np.uint8)
    lab[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(msd / "labelsTr" / "c.nii.gz"))
    load_msd_datalist(msd)  # no check: loads
    with pytest.raises(
        DataError, match=r"label values \{3\} of .*c.nii.gz are not among the declared classes \[0, 1\]"
    ):
        load_msd_datalist(msd, check=True)


def test_missing_labels_mapping(msd):
    meta = json.loads((msd / "dataset.json").read_text())
    del meta["labels"]
    (msd / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="'labels'"):
        read_msd_labels(msd)
