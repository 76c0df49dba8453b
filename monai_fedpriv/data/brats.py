"""Data lists for the BraTS layout (one folder per case), with institutions for by-site federated splits.

Accepted layouts::

    <root>/<CaseID>/<CaseID>_t1.nii.gz, _t1ce, _t2, _flair, _seg      (BraTS 2017-2021; .nii accepted)
    <root>/<CaseID>/<CaseID>-t1n.nii.gz, -t1c, -t2w, -t2f, -seg        (BraTS 2023 naming)
    <root>/HGG/<CaseID>/..., <root>/LGG/<CaseID>/...                   (BraTS 2017/2018 grade folders)

Institutions (Li et al. 2019 split BraTS 2018 training data into 13 sites by originating institution) come from, in
order: an explicit ``case,institution`` CSV; ``name_mapping.csv`` in the root (TCGA subject id ``TCGA-02-0006`` ->
``TCGA-02``; else a BraTS 2017/2018 id ``Brats17_CBICA_AAB_1`` -> ``CBICA``, ``Brats17_TCIA_08_242_1`` ->
``TCIA_08``, ``Brats18_2013_2_1`` -> ``2013``); a BraTS 2017/2018 id used as the folder name itself; else
``"unknown"``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

from monai_fedpriv.data.checks import case_errors, check_datalist
from monai_fedpriv.data.msd import read_institutions_csv
from monai_fedpriv.errors import DataError

__all__ = ["load_brats_datalist", "brats_institution_from_id", "BRATS_LABELS", "BRATS_2023_NAMES"]

#: Classes of the BraTS 2017-2021 ground truth (4 = enhancing tumour; 3 is unused before 2023).
BRATS_LABELS = (0, 1, 2, 3, 4)
#: Legacy modality name -> BraTS 2023 file suffix.
BRATS_2023_NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
_SUFFIXES = (".nii.gz", ".nii")
_TCGA = re.compile(r"^(TCGA-[A-Z0-9]{2})-", re.IGNORECASE)
_BRATS_ID = re.compile(r"^Brats\d{2}_(CBICA|2013|TCIA_?\d+)_", re.IGNORECASE)


def brats_institution_from_id(subject_id: str) -> str | None:
    """Institution token of a TCGA or BraTS 2017/2018 subject id, or ``None`` if the id has none.

    Example:
        >>> brats_institution_from_id("TCGA-02-0006"), brats_institution_from_id("Brats17_TCIA_08_242_1")
        ('TCGA-02', 'TCIA_08')
    """
    subject_id = subject_id.strip()
    m = _TCGA.match(subject_id)
    if m:
        return m.group(1).upper()
    m = _BRATS_ID.match(subject_id)
    if m:
        token = m.group(1)
        return token.upper() if not token[0].isdigit() else token
    return None


def _read_name_mapping(path: Path) -> dict[str, str]:
    """Map every id in a row of ``name_mapping.csv`` to that row's institution token."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            ids = [v.strip() for v in row.values() if isinstance(v, str) and v.strip()]
            tokens = [t for t in (brats_institution_from_id(v) for v in ids) if t]
            # TCGA ids take precedence: they name the tissue source site.
            tcga = [t for t in tokens if t.startswith("TCGA")]
            if tokens:
                inst = (tcga or tokens)[0]
                for v in ids:
                    out.setdefault(v, inst)
    return out


def _find(folder: Path, case_id: str, names: Sequence[str]) -> Path | None:
    for name in names:
        for sep in ("_", "-"):
            for suffix in _SUFFIXES:
                candidate = folder / f"{case_id}{sep}{name}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def _case_folders(root: Path) -> list[tuple[Path, str | None]]:
    """Case folders under root, descending one level into grade folders (HGG/LGG) that hold no images."""
    out: list[tuple[Path, str | None]] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        has_images = any(f.name.lower().endswith(_SUFFIXES) for f in d.iterdir() if f.is_file())
        sub = [s for s in d.iterdir() if s.is_dir() and not s.name.startswith(".")]
        if not has_images and sub:
            out.extend((s, d.name) for s in sorted(sub))
        else:
            out.append((d, None))
    return out


def load_brats_datalist(
    root: str | Path,
    modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
    institutions_csv: str | Path | None = None,
    check: bool = False,
    require_label: bool = True,
) -> list[dict]:
    """List BraTS cases with modality paths in the requested order, the segmentation and the institution.

    Each modality is looked up as ``<CaseID>_<m>`` or ``<CaseID>-<m>``; if absent, the BraTS 2023 name
    (:data:`BRATS_2023_NAMES`, e.g. ``t1ce`` -> ``t1c``) is tried, so the default modalities work on both namings.

    Args:
        root: folder of case folders (or of ``HGG``/``LGG`` grade folders).
        modalities: modality names in the order wanted in ``image``.
        institutions_csv: optional ``case,institution`` CSV; takes precedence over ``name_mapping.csv``.
        check: run :func:`check_datalist` (grids match, labels among :data:`BRATS_LABELS`).
        require_label: if False, cases without a segmentation (validation/test releases) are listed without
            ``label``.

    Returns:
        Items ``{"image": [paths], "label": path, "patient": CaseID, "institution": str}`` (plus ``"grade"`` when
        read from a grade folder), sorted by folder name.

    Raises:
        DataError: root missing or holding no case folders, or a case folder missing a modality or segmentation.

    Example:
        >>> cases = load_brats_datalist("/data/MICCAI_BraTS2020_TrainingData")  # doctest: +SKIP
        >>> sorted({c["institution"] for c in cases})[:2]  # doctest: +SKIP
        ['2013', 'CBICA']
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"BraTS root {root} is not a directory")
    if not modalities:
        raise DataError(f"modalities must name at least one modality, got {modalities!r}")
    explicit = read_institutions_csv(institutions_csv) if institutions_csv is not None else {}
    mapping_path = root / "name_mapping.csv"
    mapping = _read_name_mapping(mapping_path) if mapping_path.is_file() else {}
    cases = []
    folders = _case_folders(root)
    missing: list[str] = []  # every case folder lacking a file, named together
    for folder, grade in folders:
        case_id = folder.name
        paths, absent = [], []
        for m in modalities:
            names = [m] + ([BRATS_2023_NAMES[m]] if m in BRATS_2023_NAMES and BRATS_2023_NAMES[m] != m else [])
            found = _find(folder, case_id, names)
            if found is None:
                absent.append(
                    f"no {m!r} modality (expected {case_id}_{m}.nii.gz"
                    + (f" or {case_id}-{names[1]}.nii.gz" if len(names) > 1 else "")
                    + ")"
                )
            else:
                paths.append(str(found))
        case: dict = {"image": paths, "patient": case_id}
        seg = _find(folder, case_id, ["seg"])
        if seg is not None:
            case["label"] = str(seg)
        elif require_label:
            absent.append(f"no segmentation (expected {case_id}_seg.nii.gz)")
        if absent:
            missing.append(f"BraTS case folder {folder} has {'; '.join(absent)}")
            continue
        case["institution"] = (
            explicit.get(case_id) or mapping.get(case_id) or brats_institution_from_id(case_id) or "unknown"
        )
        if grade is not None:
            case["grade"] = grade
        cases.append(case)
    if missing:
        raise case_errors(missing, len(folders))
    if not cases:
        raise DataError(f"BraTS root {root} holds no case folders")
    if check:
        check_datalist(cases, list(BRATS_LABELS))
    return cases
