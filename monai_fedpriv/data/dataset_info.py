"""What a data set folder holds: layout, modalities (one per input channel), classes, dimensionality, cases.

:func:`describe_dataset` reads a Medical Segmentation Decathlon task folder (``dataset.json`` + ``imagesTr`` /
``labelsTr``) or a BraTS release folder (one folder per case) into a :class:`DatasetInfo`, which is what
:mod:`monai_fedpriv.data.adapt` needs to adapt a bundle's pre-processing and network to the data. Only file headers
are read (the first case's), never whole volumes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_fedpriv.data.brats import BRATS_2023_NAMES, load_brats_datalist
from monai_fedpriv.data.msd import load_msd_datalist, read_msd_labels
from monai_fedpriv.errors import DataError

__all__ = [
    "DatasetInfo", "describe_and_list", "describe_dataset", "detect_layout", "modality_kind", "BRATS_CLASS_NAMES",
    "LAYOUTS",
]  # fmt: skip

LAYOUTS = ("msd", "brats")
#: BraTS classes by naming convention: 2017-2021 releases use 4 for enhancing tumour (3 unused); 2023 uses 3.
BRATS_CLASS_NAMES = {
    "2020": {0: "background", 1: "necrotic/non-enhancing tumour core", 2: "peritumoral oedema", 4: "enhancing tumour"},
    "2023": {0: "background", 1: "non-enhancing tumour core", 2: "peritumoral oedema", 3: "enhancing tumour"},
}
_BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
_BRATS_TOKENS = tuple(_BRATS_MODALITIES) + tuple(BRATS_2023_NAMES.values())
_NIFTI = (".nii.gz", ".nii")


def modality_kind(name: str) -> str:
    """``"ct"`` for a CT channel name (``"CT"``, ``"ct"``), else ``"mr"``.

    Every non-CT MSD modality (``MRI``, ``T2``, ``ADC``, ``FLAIR``, ``t1gd`` ...) has arbitrary intensity units, so it
    is treated like MR (per-image z-score) by :mod:`monai_fedpriv.data.adapt`.

    Example:
        >>> modality_kind("CT"), modality_kind("FLAIR")
        ('ct', 'mr')
    """
    return "ct" if name.strip().lower() == "ct" else "mr"


@dataclass(frozen=True)
class DatasetInfo:
    """Description of a segmentation data set folder.

    Attributes:
        name: data set name (``dataset.json`` ``name``, else the folder name).
        layout: ``"msd"`` or ``"brats"``.
        root: the folder (absolute).
        modalities: one name per input channel, in channel order (``("CT",)``, ``("t1", "t1ce", "t2", "flair")``).
        labels: ``{class value: class name}`` as stored in the label files (BraTS 2020: 0, 1, 2, 4).
        spatial_dims: spatial dimensions of the stored images (2 or 3).
        channel_layout: how channels are stored: ``"none"`` (one modality, no channel axis), ``"last"`` (one file per
            case, channels on the last axis: MSD 4D images) or ``"files"`` (one file per modality: BraTS).
        n_cases: number of training cases listed.
        has_validation: whether the folder declares its own validation cases (an MSD ``validation`` section or items
            with ``"split": "val"``); standard MSD and BraTS training releases do not.
        institutions: ``{institution: number of cases}`` as the data list loaders report them.
        naming: BraTS file naming (``"2020"`` for ``_t1ce``, ``"2023"`` for ``-t1c``), ``None`` for MSD.
    """

    name: str
    layout: str
    root: Path
    modalities: tuple[str, ...]
    labels: dict[int, str]
    spatial_dims: int
    channel_layout: str
    n_cases: int
    has_validation: bool = False
    institutions: dict[str, int] = field(default_factory=dict)
    naming: str | None = None

    @property
    def n_channels(self) -> int:
        """Number of input channels (one per modality)."""
        return len(self.modalities)

    @property
    def n_classes(self) -> int:
        """Number of declared classes, background included."""
        return len(self.labels)

    @property
    def modality_kinds(self) -> tuple[str, ...]:
        """``"ct"`` / ``"mr"`` per channel (see :func:`modality_kind`)."""
        return tuple(modality_kind(m) for m in self.modalities)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description for reports and ``metrics.json``."""
        return {
            "name": self.name,
            "layout": self.layout,
            "root": str(self.root),
            "modalities": list(self.modalities),
            "labels": {str(k): v for k, v in self.labels.items()},
            "n_channels": self.n_channels,
            "n_classes": self.n_classes,
            "spatial_dims": self.spatial_dims,
            "channel_layout": self.channel_layout,
            "n_cases": self.n_cases,
            "has_validation": self.has_validation,
            "institutions": dict(self.institutions),
            "naming": self.naming,
        }


def _looks_like_brats_case(folder: Path) -> bool:
    for f in folder.iterdir():
        name = f.name.lower()
        if f.is_file() and name.endswith(_NIFTI):
            stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
            if any(stem.endswith(f"{sep}{t}") for t in (*_BRATS_TOKENS, "seg") for sep in ("_", "-")):
                return True
    return False


def detect_layout(root: str | Path) -> str:
    """``"msd"`` if ``root`` holds ``dataset.json``; ``"brats"`` if it holds case folders (directly or in grade
    folders such as ``HGG``/``LGG``) with ``*_seg`` or modality files (``*_flair``, ``*-t2f`` ...).

    Raises:
        DataError: ``root`` is not a folder, or matches neither layout (the message names the folder).

    Example:
        >>> detect_layout("/data/Task09_Spleen")  # doctest: +SKIP
        'msd'
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    if (root / "dataset.json").is_file():
        return "msd"
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    for d in subdirs:
        inner = [s for s in sorted(d.iterdir()) if s.is_dir() and not s.name.startswith(".")]
        if _looks_like_brats_case(d) or any(_looks_like_brats_case(s) for s in inner[:3]):
            return "brats"
    raise DataError(
        f"{root} is neither an MSD task folder (no dataset.json) nor a BraTS folder (no case folder holding "
        f"*_seg.nii.gz or modality files such as *_flair.nii.gz / *-t2f.nii.gz); pass --layout msd|brats or fix "
        "the path"
    )


def _header_shape(path: str) -> tuple[int, ...]:
    """Shape from the header only (NIfTI), else from a full read (NRRD, DICOM ... through SimpleITK)."""
    if path.lower().endswith(_NIFTI):
        import nibabel as nib

        try:
            header: Any = nib.load(path)
            return tuple(int(s) for s in header.shape)
        except Exception as exc:  # nibabel raises many types on a bad header
            raise DataError(f"cannot read the header of {path}: {type(exc).__name__}: {exc}") from exc
    from monai_fedpriv.data.io import read_image

    return tuple(read_image(path)[0].shape)


def _msd_modalities(meta: dict, json_path: Path) -> tuple[str, ...]:
    raw = meta.get("modality", meta.get("channel_names"))
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{json_path} has no 'modality' (or nnU-Net 'channel_names') mapping (got {raw!r})")
    try:
        return tuple(str(v) for _, v in sorted(raw.items(), key=lambda kv: int(kv[0])))
    except ValueError as exc:
        raise DataError(f"{json_path}: 'modality' keys must be channel numbers, got {sorted(raw)}") from exc


def _describe_msd(root: Path, institutions_csv: str | Path | None) -> tuple[DatasetInfo, list[dict], list[dict]]:
    cases = load_msd_datalist(root, institutions_csv=institutions_csv)  # validates dataset.json and the files first
    json_path = root / "dataset.json"
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    modalities = _msd_modalities(meta, json_path)
    if not cases:
        raise DataError(f"{json_path} lists no training cases")
    first = cases[0]["image"]
    if isinstance(first, list):
        layout, shape = "files", _header_shape(first[0])
        if len(first) != len(modalities):
            raise DataError(f"{json_path} declares {len(modalities)} modalities but lists {len(first)} image files")
        spatial = len(shape)
    else:
        layout, shape = ("last" if len(modalities) > 1 else "none"), _header_shape(first)
        spatial = len(shape) - (1 if layout == "last" or (len(shape) == 4 and shape[-1] == 1) else 0)
        if layout == "last" and (len(shape) < 3 or shape[-1] != len(modalities)):
            raise DataError(
                f"{json_path} declares {len(modalities)} modalities {list(modalities)} but image {first} has shape "
                f"{shape}; expected the modalities on the last axis"
            )
    if spatial not in (2, 3):
        raise DataError(f"image {first} has {spatial} spatial dimensions (shape {shape}); expected 2 or 3")
    validation = meta.get("validation")
    declared = load_msd_datalist(root, "validation", institutions_csv=institutions_csv) if (
        isinstance(validation, list) and validation
    ) else []  # fmt: skip
    val_cases = [*declared, *(c for c in cases if c.get("split") == "val")]  # items marked as validation stay out
    train_cases = [c for c in cases if c.get("split") != "val"]
    info = DatasetInfo(
        name=str(meta.get("name") or root.name),
        layout="msd",
        root=root,
        modalities=modalities,
        labels=read_msd_labels(root),
        spatial_dims=spatial,
        channel_layout=layout,
        n_cases=len(cases),
        has_validation=bool(val_cases),
        institutions=dict(Counter(c["institution"] for c in cases)),
    )
    return info, train_cases, val_cases


def _describe_brats(root: Path, institutions_csv: str | Path | None) -> tuple[DatasetInfo, list[dict], list[dict]]:
    cases = load_brats_datalist(root, modalities=_BRATS_MODALITIES, institutions_csv=institutions_csv)
    first = cases[0]["image"]
    naming = "2023" if Path(first[1]).name.lower().split(".")[0].endswith(("-t1c", "_t1c")) else "2020"
    modalities = tuple(BRATS_2023_NAMES[m] for m in _BRATS_MODALITIES) if naming == "2023" else _BRATS_MODALITIES
    shape = _header_shape(first[0])
    if len(shape) != 3:
        raise DataError(f"BraTS image {first[0]} has shape {shape}; expected a 3D volume")
    info = DatasetInfo(
        name=root.name,
        layout="brats",
        root=root,
        modalities=modalities,
        labels=dict(BRATS_CLASS_NAMES[naming]),
        spatial_dims=3,
        channel_layout="files",
        n_cases=len(cases),
        has_validation=False,
        institutions=dict(Counter(c["institution"] for c in cases)),
        naming=naming,
    )
    return info, cases, []


def describe_dataset(root: str | Path, layout: str | None = None) -> DatasetInfo:
    """Describe an MSD task folder or a BraTS release folder.

    Args:
        root: the data set folder.
        layout: ``"msd"``, ``"brats"`` or ``None`` to detect it (:func:`detect_layout`).

    Raises:
        DataError: unknown layout, unreadable ``dataset.json``, missing files, or images whose shape contradicts the
            declared modalities (the message names the file).

    Example:
        >>> info = describe_dataset("/data/Task01_BrainTumour")  # doctest: +SKIP
        >>> info.modalities, info.n_classes, info.channel_layout  # doctest: +SKIP
        (('FLAIR', 'T1w', 't1gd', 'T2w'), 4, 'last')
    """
    return describe_and_list(root, layout)[0]


def describe_and_list(
    root: str | Path, layout: str | None = None, institutions_csv: str | Path | None = None
) -> tuple[DatasetInfo, list[dict], list[dict]]:
    """:func:`describe_dataset` with the case lists it read: ``(info, training cases, validation cases)``.

    Validation cases are those of an MSD ``validation`` section and training items marked ``"split": "val"``; the
    institutions of ``info`` and of every case follow ``institutions_csv`` when given (a ``case,institution`` CSV).
    """
    root = Path(root).expanduser().resolve()
    layout = detect_layout(root) if layout is None else layout
    if layout not in LAYOUTS:
        raise DataError(f"unknown data layout {layout!r} for {root}; expected one of {list(LAYOUTS)}")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    return _describe_msd(root, institutions_csv) if layout == "msd" else _describe_brats(root, institutions_csv)
