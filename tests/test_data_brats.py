"""BraTS data lists: both namings, grade folders, institutions from name_mapping.csv or a CSV, errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_fedpriv.data import brats_institution_from_id, load_brats_datalist
from monai_fedpriv.errors import DataError

LEGACY = ("t1", "t1ce", "t2", "flair", "seg")


def _case(root: Path, case_id: str, names=LEGACY, sep="_", suffix=".nii.gz", label_value=1) -> Path:
    folder = root / case_id
    folder.mkdir(parents=True)
    for name in names:
        arr = np.zeros((4, 4, 3), np.uint8 if name == "seg" else np.float32)
        if name == "seg":
            arr[1, 1, 1] = label_value
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(folder / f"{case_id}{sep}{name}{suffix}"))
    return folder


def test_institution_tokens():
    assert brats_institution_from_id("TCGA-02-0006") == "TCGA-02"
    assert brats_institution_from_id("Brats17_CBICA_AAB_1") == "CBICA"
    assert brats_institution_from_id("Brats17_TCIA_08_242_1") == "TCIA_08"
    assert brats_institution_from_id("Brats18_2013_2_1") == "2013"
    assert brats_institution_from_id("BraTS20_Training_001") is None


def test_name_mapping(tmp_path):
    for i in (1, 2, 3, 4):
        _case(tmp_path, f"BraTS20_Training_00{i}", suffix=".nii" if i == 2 else ".nii.gz")
    (tmp_path / "name_mapping.csv").write_text(
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,"
        "BraTS_2020_subject_ID\n"
        "HGG,Brats17_TCIA_08_242_1,Brats18_TCIA08_242_1,TCGA-02-0006,BraTS19_TCIA08_242_1,BraTS20_Training_001\n"
        "HGG,Brats17_CBICA_AAB_1,Brats18_CBICA_AAB_1,NA,BraTS19_CBICA_AAB_1,BraTS20_Training_002\n"
        "LGG,Brats17_TCIA_08_167_1,Brats18_TCIA08_167_1,NA,BraTS19_TCIA08_167_1,BraTS20_Training_003\n"
    )
    cases = load_brats_datalist(tmp_path, check=True)
    assert [c["patient"] for c in cases] == [f"BraTS20_Training_00{i}" for i in (1, 2, 3, 4)]
    assert [c["institution"] for c in cases] == ["TCGA-02", "CBICA", "TCIA_08", "unknown"]
    first = cases[0]
    assert [Path(p).name for p in first["image"]] == [f"BraTS20_Training_001_{m}.nii.gz" for m in LEGACY[:4]]
    assert cases[1]["label"].endswith("_seg.nii")


def test_institutions_csv_takes_precedence(tmp_path):
    _case(tmp_path / "data", "c1")
    _case(tmp_path / "data", "c2")
    csv_path = tmp_path / "inst.csv"
    csv_path.write_text("case,institution\nc1,Hospital A\n")
    cases = load_brats_datalist(tmp_path / "data", institutions_csv=csv_path, modalities=("flair",))
    assert [c["institution"] for c in cases] == ["Hospital A", "unknown"]
    assert [len(c["image"]) for c in cases] == [1, 1]


def test_brats2023_naming_and_order(tmp_path):
    case_id = "BraTS-GLI-00000-000"
    _case(tmp_path, case_id, names=("t1n", "t1c", "t2w", "t2f", "seg"), sep="-")
    (case,) = load_brats_datalist(tmp_path, modalities=("flair", "t1"))
    assert [Path(p).name for p in case["image"]] == [f"{case_id}-t2f.nii.gz", f"{case_id}-t1n.nii.gz"]
    assert case["label"].endswith("-seg.nii.gz")


def test_grade_folders(tmp_path):
    _case(tmp_path / "HGG", "Brats18_CBICA_AAB_1")
    _case(tmp_path / "LGG", "Brats18_2013_0_1")
    cases = load_brats_datalist(tmp_path)
    assert [(c["grade"], c["institution"]) for c in cases] == [("HGG", "CBICA"), ("LGG", "2013")]


def test_missing_modality(tmp_path):
    _case(tmp_path, "ok")
    _case(tmp_path, "broken", names=("t1", "t2", "flair", "seg"))
    with pytest.raises(DataError, match=r"broken has no 't1ce' modality \(expected broken_t1ce.nii.gz"):
        load_brats_datalist(tmp_path)


def test_missing_segmentation(tmp_path):
    _case(tmp_path, "val1", names=LEGACY[:4])
    with pytest.raises(DataError, match="val1 has no segmentation"):
        load_brats_datalist(tmp_path)
    (case,) = load_brats_datalist(tmp_path, require_label=False)
    assert "label" not in case


def test_check_flags_bad_label(tmp_path):
    _case(tmp_path, "c1", label_value=7)
    load_brats_datalist(tmp_path)
    with pytest.raises(DataError, match=r"\{7\} of .*c1_seg.nii.gz"):
        load_brats_datalist(tmp_path, check=True)


def test_empty_root(tmp_path):
    with pytest.raises(DataError, match="no case folders"):
        load_brats_datalist(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_brats_datalist(tmp_path / "nowhere")
