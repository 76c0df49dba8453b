"""Small SYNTHETIC data sets in the MSD and BraTS layouts, for tests and documentation.

Nothing here is medical data: each case is a phantom of nested ellipsoids (a "body", then one per foreground class)
with per-class contrast and Gaussian noise from ``numpy.random.default_rng``; labels are the ellipsoids, so images and
labels agree by construction. File names, ``dataset.json`` fields, ``name_mapping.csv`` columns, affines (incl. LPS)
and 4D multi-modal images follow the real layouts, to exercise loaders, checks and pre-processing; the data say
nothing about accuracy on real scans. :func:`corrupt_case` breaks a case the ways real folders break.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_fedpriv.data.brats import brats_institution_from_id

__all__ = ["write_msd_task", "write_brats_folder", "corrupt_case", "truncate_file", "BRATS_CONTRAST"]

#: Mean MR intensity per BraTS modality for (brain, oedema, enhancing rim, necrotic core); background stays 0.
BRATS_CONTRAST = {
    "t1": (100.0, 85.0, 90.0, 50.0),
    "t1ce": (100.0, 90.0, 220.0, 50.0),
    "t2": (100.0, 180.0, 150.0, 220.0),
    "flair": (100.0, 200.0, 160.0, 120.0),
}
_CT_AIR, _CT_BODY, _CT_STEP, _CT_NOISE = -1000.0, 20.0, 80.0, 15.0  # HU
_MR_BODY, _MR_NOISE = 100.0, 8.0


def _ellipsoid(shape: Sequence[int], spacing: Sequence[float], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii, strict=True)) <= 1.0


def _nested_levels(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], n_fg: int) -> np.ndarray:
    """Level map: 0 outside the body, 1 body, 2.. one level per foreground class, each inside the previous one."""
    extent = np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)
    center = extent / 2 + rng.uniform(-0.05, 0.05, size=len(shape)) * extent
    radii = extent * 0.42
    level = _ellipsoid(shape, spacing, center, radii).astype(np.uint8)
    for j in range(n_fg):
        # at least 1.5 voxels, so every class survives resampling in tiny volumes
        radii = np.maximum(radii * rng.uniform(0.45, 0.6, size=len(shape)), 1.5 * np.asarray(spacing, dtype=float))
        center = center + rng.uniform(-0.15, 0.15, size=len(shape)) * radii
        level[_ellipsoid(shape, spacing, center, radii) & (level == j + 1)] = j + 2
    return level


def _affine(shape: Sequence[int], spacing: Sequence[float], orientation: str) -> np.ndarray:
    d, aff, sp = len(shape), np.eye(4), np.asarray(spacing, dtype=float)
    aff[:d, :d] = np.diag(sp)
    aff[:d, 3] = -(np.asarray(shape) - 1) / 2 * sp
    if orientation == "LPS":  # same world content, array flipped along x and y
        for ax in range(min(2, d)):
            aff[ax, 3] += sp[ax] * (shape[ax] - 1)
            aff[ax, ax] = -sp[ax]
    return aff


def _save(arr: np.ndarray, affine: np.ndarray, path: Path, orientation: str = "RAS") -> None:
    """Write NIfTI; ``orientation="LPS"`` flips x and y of an array built in RAS order (see :func:`_affine`)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(arr[::-1, ::-1]) if orientation == "LPS" else arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _check_common(n_cases: int, shape: Sequence[int], spacing: Sequence[float], orientation: str) -> None:
    if not isinstance(n_cases, int) or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got {n_cases!r}")
    elif len(shape) not in (2, 3) or min(shape) < 4 or len(spacing) != len(shape) or min(spacing) <= 0:
        raise ValueError(f"need 2 or 3 axes of >= 4 voxels and a positive spacing each, got {shape}, {spacing}")
    elif orientation not in ("RAS", "LPS"):
        raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}")


def _mr_channel(level: np.ndarray, rng: np.random.Generator, means: Sequence[float]) -> np.ndarray:
    img, body = np.zeros(level.shape, np.float32), level > 0
    noisy = np.asarray(means, np.float32)[level[body] - 1] + rng.normal(0.0, _MR_NOISE, int(body.sum()))
    img[body] = np.maximum(noisy, 1.0)  # background exactly 0, tissue strictly positive
    return img


def _msd_channel(level: np.ndarray, rng: np.random.Generator, modality: str, c: int, n_fg: int) -> np.ndarray:
    if modality.strip().lower() == "ct":
        img = np.where(level > 0, _CT_BODY + _CT_STEP * np.maximum(level.astype(float) - 1, 0), _CT_AIR)
        return (img + rng.normal(0.0, _CT_NOISE, size=level.shape)).astype(np.float32)
    sign = 1.0 if c % 2 == 0 else -0.5  # contrast differs between MR channels
    return _mr_channel(level, rng, [_MR_BODY * (1.0 + sign * 0.6 * j) for j in range(n_fg + 1)])


def write_msd_task(
    root: str | Path,
    n_cases: int,
    shape: Sequence[int] = (24, 24, 12),
    modalities: Sequence[str] = ("MR",),
    labels: Mapping[int, str] | None = None,
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    seed: int = 0,
    institutions: Sequence[str] | None = None,
    orientation: str = "RAS",
    multimodal_4d: bool = False,
    institutions_csv: bool = False,
    name: str = "SyntheticTask",
) -> Path:
    """Write a synthetic MSD task folder: ``dataset.json`` (``training`` only), ``imagesTr/``, ``labelsTr/``.

    CT channels are in HU (air -1000, body 20, +80 per nesting level, noise 15 HU); other channels are MR-like
    (background exactly 0, body 100, contrast alternating in sign per channel, noise 8). With several modalities the
    images are one 4D file per case with channels last (``multimodal_4d=True``, like MSD Task01) or one file per
    modality (``case_0000.nii.gz`` ..., listed as an ``image`` list, as nnU-Net does; items then carry ``patient``).
    ``orientation="LPS"`` stores the same world content with the x and y axes flipped (negative affine diagonal).

    Args:
        root: output folder (created). n_cases: number of training cases. shape: spatial shape (2 or 3 axes).
        modalities: one name per channel, e.g. ``("CT",)`` or ``("FLAIR", "T1w", "t1gd", "T2w")``.
        labels: ``{value: name}``; default ``{0: "background", 1: "lesion"}``. Foreground values are nested
            ellipsoids in increasing value order.
        spacing: voxel size in mm per axis.
        seed: seed of every draw (case ``i`` uses ``default_rng([seed, i])``: the same cases for any orientation).
        institutions: if given, case ``i`` belongs to ``institutions[i % len]``.
        orientation: ``"RAS"`` or ``"LPS"``. multimodal_4d: several modalities in one 4D file (channels last).
        institutions_csv: record institutions in ``institutions.csv`` instead of an item key ``institution``.
        name: ``dataset.json`` ``name``.

    Example:
        >>> root = write_msd_task("/tmp/task", n_cases=4, modalities=("CT",))  # doctest: +SKIP
        >>> load_msd_datalist(root, check=True)  # doctest: +SKIP
    """
    labels = {0: "background", 1: "lesion"} if labels is None else {int(k): str(v) for k, v in labels.items()}
    _check_common(n_cases, shape, spacing, orientation)
    if 0 not in labels or len(labels) < 2:
        raise ValueError(f"labels must declare 0 and at least one foreground class, got {labels}")
    if not modalities or (multimodal_4d and len(shape) != 3):
        raise ValueError(f"need >= 1 modality (and a 3D shape for multimodal_4d), got {modalities}, {tuple(shape)}")
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    fg = sorted(v for v in labels if v != 0)
    lut = np.array([0, 0, *fg], dtype=np.uint8)  # level -> label value
    affine = _affine(shape, spacing, orientation)
    items, inst_rows = [], []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, i])
        level = _nested_levels(rng, shape, spacing, len(fg))
        channels = [_msd_channel(level, rng, m, c, len(fg)) for c, m in enumerate(modalities)]
        stem = f"synth_{i + 1:03d}"
        _save(lut[level], affine, root / "labelsTr" / f"{stem}.nii.gz", orientation)
        one_file = len(channels) == 1 or multimodal_4d
        arrays = [channels[0] if len(channels) == 1 else np.stack(channels, -1)] if one_file else channels
        names = [f"{stem}.nii.gz"] if one_file else [f"{stem}_{c:04d}.nii.gz" for c in range(len(channels))]
        files = [f"./imagesTr/{n}" for n in names]
        for arr, rel in zip(arrays, files, strict=True):
            _save(arr, affine, root / rel, orientation)
        item: dict = {"image": files[0] if one_file else files, "label": f"./labelsTr/{stem}.nii.gz"}
        item.update({} if one_file else {"patient": stem})
        inst = institutions[i % len(institutions)] if institutions else None
        if inst and institutions_csv:
            inst_rows.append((stem, inst))
        elif inst:
            item["institution"] = inst
        items.append(item)
    meta = {
        "name": name,
        "description": "SYNTHETIC phantoms (monai_fedpriv.data.synthetic.write_msd_task); not medical data",
        "reference": "none (generated)",
        "licence": "CC0",
        "release": "0.0",
        "tensorImageSize": "4D" if multimodal_4d and len(modalities) > 1 else f"{len(shape)}D",
        "modality": {str(c): m for c, m in enumerate(modalities)},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": n_cases,
        "numTest": 0,
        "training": items,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if inst_rows:
        with open(root / "institutions.csv", "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([("case", "institution"), *inst_rows])
    return root


def _legacy_id(institution: str, i: int) -> tuple[str, str]:
    """(BraTS 2017 subject id, TCGA id or "NA") whose institution token is ``institution``."""
    if institution.upper().startswith("TCGA-"):
        return "NA", f"{institution.upper()}-{i:04d}"
    if institution.upper() == "CBICA":
        code = "".join(chr(ord("A") + (i // 26**k) % 26) for k in (2, 1, 0))
        return f"Brats17_CBICA_{code}_1", "NA"
    return f"Brats17_{institution}_{100 + i}_1", "NA"


def write_brats_folder(
    root: str | Path,
    n_cases: int,
    shape: Sequence[int] = (24, 24, 16),
    seed: int = 0,
    institutions: Sequence[str] = ("CBICA", "TCIA_08", "2013"),
    naming: str = "2020",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """Write a synthetic BraTS release: one folder per case (4 MR modalities + segmentation) and ``name_mapping.csv``.

    ``naming="2020"``: ``BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz``, labels
    {0, 1, 2, 4}; ``naming="2023"``: ``BraTS-GLI-00001-000/BraTS-GLI-00001-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``, labels
    {0, 1, 2, 3}. The tumour is oedema (2) around an enhancing rim (4, or 3) around a necrotic core (1), inside a
    skull-stripped brain (background exactly 0) stored in LPS orientation as real BraTS volumes are.
    ``name_mapping.csv`` has the BraTS 2020 columns, with a 2017 id (``Brats17_CBICA_AAB_1``) or a TCGA id
    (``TCGA-02-0001``) from which :func:`~monai_fedpriv.data.brats.load_brats_datalist` reads the institution.

    Args:
        root: output folder (created). n_cases: number of cases. shape: spatial shape (3 axes).
        seed: seed of every draw (case ``i`` uses ``default_rng([seed, i])``).
        institutions: case ``i`` belongs to ``institutions[i % len]``; each must be a token the loader recognises
            (``CBICA``, ``TCIA_<nn>``, ``2013``, ``TCGA-<xx>``).
        naming: ``"2020"`` or ``"2023"``. spacing: voxel size in mm.

    Raises:
        ValueError: bad arguments, or an institution name the loader would not recover from the mapping file.
    """
    _check_common(n_cases, shape, spacing, "LPS")
    if len(shape) != 3 or naming not in ("2020", "2023") or not institutions:
        raise ValueError(
            f"need a 3D shape, naming '2020'|'2023', institutions; got {shape}, {naming!r}, {institutions}"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names, sep = (("t1", "t1ce", "t2", "flair"), "_") if naming == "2020" else (("t1n", "t1c", "t2w", "t2f"), "-")
    lut = np.array([0, 0, 2, 4 if naming == "2020" else 3, 1], np.uint8)  # level: outside, brain, oedema, rim, core
    affine = _affine(shape, spacing, "LPS")
    header = "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID".split(",")
    header.append(f"BraTS_{naming}_subject_ID")
    rows = []
    for i in range(n_cases):
        case = f"BraTS20_Training_{i + 1:03d}" if naming == "2020" else f"BraTS-GLI-{i + 1:05d}-000"
        inst = institutions[i % len(institutions)]
        legacy, tcga = _legacy_id(inst, i)
        subject = legacy if legacy != "NA" else tcga
        if brats_institution_from_id(subject) != (inst.upper() if tcga != "NA" else inst):
            raise ValueError(f"institution {inst!r} is not a token the BraTS loader reads back from id {subject!r}")
        rows.append(["HGG", legacy, "NA", tcga, "NA", case])
        rng = np.random.default_rng([seed, i])
        level = _nested_levels(rng, shape, spacing, 3)
        folder = root / case
        folder.mkdir(exist_ok=True)
        for m, fname in zip(("t1", "t1ce", "t2", "flair"), names, strict=True):
            img = _mr_channel(level, rng, BRATS_CONTRAST[m])
            _save(img, affine, folder / f"{case}{sep}{fname}.nii.gz", "LPS")
        _save(lut[level], affine, folder / f"{case}{sep}seg.nii.gz", "LPS")
    with open(root / "name_mapping.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return root


def truncate_file(path: str | Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes and return its path."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: max(1, int(len(data) * keep))])  # a download or copy that stopped early
    return Path(path)


def corrupt_case(case: Mapping, kind: str, value: int = 7) -> Path:
    """Break one case of a data list in place and return the file that was broken.

    Args:
        case: a data list item (``image`` path or list of paths, ``label`` path), e.g. from ``load_msd_datalist``.
        kind: ``"truncate_image"`` (first image file cut in half), ``"truncate_label"``, ``"label_shape"`` (label
            rewritten one voxel shorter on the first axis) or ``"label_value"`` (one label voxel set to ``value``).
        value: the undeclared label value written by ``"label_value"``.

    Raises:
        ValueError: unknown ``kind``.
    """
    import nibabel as nib

    if kind == "truncate_image":
        return truncate_file(case["image"][0] if isinstance(case["image"], list | tuple) else case["image"])
    label = Path(case["label"])
    if kind == "truncate_label":
        return truncate_file(label)
    if kind not in ("label_shape", "label_value"):
        raise ValueError(
            f"unknown corruption {kind!r}; expected truncate_image, truncate_label, label_shape, label_value"
        )
    img: Any = nib.load(str(label))
    arr = np.asarray(img.dataobj).copy()[: -1 if kind == "label_shape" else None]
    if kind == "label_value":
        arr.flat[arr.size // 2] = value
    _save(arr.astype(np.uint8), img.affine, label)
    return label
