"""Data lists for the Medical Segmentation Decathlon (MSD) layout.

Layout (Simpson et al., "A large annotated medical image dataset for the development and evaluation of segmentation
algorithms", 2019)::

    <root>/dataset.json      {"labels": {"0": "background", ...}, "modality": {...},
                              "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...],
                              "test": ["./imagesTs/y.nii.gz", ...]}
    <root>/imagesTr/...  <root>/labelsTr/...  <root>/imagesTs/...
    <root>/institutions.csv  (optional: columns case,institution)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from monai_fedpriv.data.checks import case_errors, check_datalist
from monai_fedpriv.data.io import image_stem
from monai_fedpriv.errors import DataError

__all__ = ["load_msd_datalist", "read_msd_labels", "read_institutions_csv"]


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"MSD data set root {root} has no dataset.json (looked for {path})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def read_msd_labels(root: str | Path) -> dict[int, str]:
    """Declared classes of an MSD data set.

    Accepts the MSD form ``{"0": "background", "1": "spleen"}`` and the nnU-Net v2 form ``{"background": 0, ...}``.

    Args:
        root: data set folder holding ``dataset.json``.

    Returns:
        ``{class value: class name}`` sorted by value.

    Example:
        >>> read_msd_labels("/data/Task09_Spleen")  # doctest: +SKIP
        {0: 'background', 1: 'spleen'}
    """
    root = Path(root)
    meta = _read_dataset_json(root)
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{root / 'dataset.json'} has no 'labels' mapping (got {raw!r})")
    out: dict[int, str] = {}
    for key, value in raw.items():
        if str(key).lstrip("-").isdigit():
            out[int(key)] = str(value)
        elif isinstance(value, int):
            out[value] = str(key)
        else:
            raise DataError(f"{root / 'dataset.json'}: cannot interpret label entry {key!r}: {value!r}")
    return dict(sorted(out.items()))


def read_institutions_csv(path: str | Path) -> dict[str, str]:
    """Read a ``case,institution`` CSV (header required) into ``{case: institution}``.

    Example:
        >>> read_institutions_csv("/data/institutions.csv")  # doctest: +SKIP
        {'case_001': 'hospital-a'}
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"institutions CSV {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in reader.fieldnames or []]
        if "case" not in fields or "institution" not in fields:
            raise DataError(f"institutions CSV {path} needs columns 'case,institution', got {reader.fieldnames}")
        out = {}
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
            if row["case"]:
                out[row["case"]] = row["institution"]
    return out


def _resolve(root: Path, rel: str, where: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{where}: expected a file path, got {rel!r}")
    path = Path(rel)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.exists():
        raise DataError(f"{where}: listed file {path} does not exist")
    return str(path)


def load_msd_datalist(
    root: str | Path, section: str = "training", check: bool = False, institutions_csv: str | Path | None = None
) -> list[dict]:
    """Load one section of an MSD ``dataset.json`` as a list of case dicts with absolute paths.

    Every item gets ``image`` (absolute path, or list of paths), ``label`` (absolute path; not for plain-string
    items as in MSD's ``test`` section), ``patient`` (item ``"patient"`` else the image file stem) and
    ``institution`` (item ``"institution"`` or ``"site"``, else ``institutions.csv`` in ``root`` keyed by patient,
    else ``"unknown"``). Other item keys are kept.

    Args:
        root: data set folder holding ``dataset.json``.
        section: ``"training"``, ``"validation"``, ``"test"`` or any other list in ``dataset.json``.
        check: run :func:`check_datalist` against the declared labels (all cases, all errors reported together).
        institutions_csv: a ``case,institution`` CSV to use instead of ``root/institutions.csv``.

    Raises:
        DataError: missing ``dataset.json`` or section, an item without ``image`` (or without ``label`` in a section
            other than ``test``), or a listed file that does not exist.

    Example:
        >>> cases = load_msd_datalist("/data/Task09_Spleen", check=True)  # doctest: +SKIP
        >>> cases[0]["image"], cases[0]["institution"]  # doctest: +SKIP
    """
    root = Path(root).resolve()
    meta = _read_dataset_json(root)
    json_path = root / "dataset.json"
    if section not in meta:
        sections = [k for k, v in meta.items() if isinstance(v, list)]
        raise DataError(f"{json_path} has no section {section!r}; list sections found: {sections}")
    items = meta[section]
    if not isinstance(items, list):
        raise DataError(f"{json_path}: section {section!r} must be a list, got {type(items).__name__}")
    csv_path = Path(institutions_csv) if institutions_csv is not None else root / "institutions.csv"
    institutions = read_institutions_csv(csv_path) if institutions_csv is not None or csv_path.is_file() else {}
    cases = []
    missing: list[str] = []  # every listed file that does not exist, named together
    for i, item in enumerate(items):
        where = f"{json_path} {section}[{i}]"
        if isinstance(item, str):
            item = {"image": item}
        elif not isinstance(item, dict):
            raise DataError(f"{where}: expected an object or a path, got {type(item).__name__}")
        elif "image" not in item:
            raise DataError(f"{where}: item has no 'image' key (keys: {sorted(item)})")
        elif "label" not in item and section != "test":
            raise DataError(f"{where}: item has no 'label' key (keys: {sorted(item)})")
        case = dict(item)
        image = item["image"]
        absent: list[str] = []

        def resolve(rel: str, where: str = where, absent: list[str] = absent) -> str:
            try:
                return _resolve(root, rel, where)
            except DataError as exc:
                absent.append(str(exc).removeprefix(f"{where}: "))
                return ""

        if isinstance(image, list):
            case["image"] = [resolve(p) for p in image]
            first = image[0] if image else ""
        else:
            case["image"] = resolve(image)
            first = image
        if "label" in item:
            case["label"] = resolve(item["label"])
        if absent:
            missing.append(f"{where}: {'; '.join(absent)}")
            continue
        case["patient"] = str(item.get("patient") or image_stem(first))
        inst = item.get("institution") or item.get("site")
        case["institution"] = str(inst or institutions.get(case["patient"], "unknown"))
        cases.append(case)
    if missing:
        raise case_errors(missing, len(items))
    if check:
        check_datalist(cases, list(read_msd_labels(root)))
    return cases
