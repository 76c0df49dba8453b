"""Offline checks of a bundle against the MONAI model zoo's minimum (its CI's directory, metadata and version checks,
its pre-commit's JSON formatting, the bundle specification's required metadata keys), one line per problem, so a
team can check its own bundle before sharing it (``monai-fedpriv bundle check DIR``). The zoo's schema check needs
the schema from the network; what it checks offline is the keys the specification requires."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["REQUIRED_FILES", "REQUIRED_METADATA", "bundle_problems"]

#: files every bundle holds (the zoo's CI and its README template)
REQUIRED_FILES = ("configs/metadata.json", "LICENSE", "docs/README.md", "docs/data_license.txt")
#: metadata keys the MONAI bundle specification requires (and the zoo's ``name``)
REQUIRED_METADATA = (
    "name", "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "task", "description",
    "authors", "copyright", "network_data_format",
)  # fmt: skip
_VERSION = re.compile(r"\d+\.\d+\.\d+")
_WEIGHTS = re.compile(r"models/[A-Za-z0-9_.-]+\.(pt|ts|pth)")


def _read(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: not readable JSON ({exc})")
        return None


def _metadata(root: Path, problems: list[str]) -> None:
    path = root / "configs" / "metadata.json"
    meta = _read(path, problems) if path.is_file() else None
    if not isinstance(meta, dict):
        return
    for key in REQUIRED_METADATA:
        if key not in meta:
            problems.append(f"{path}: metadata key {key!r} is missing")
    version = meta.get("version")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        problems.append(f"{path}: version {version!r} is not MAJOR.MINOR.PATCH")
    elif not isinstance(meta.get("changelog"), dict) or version not in meta["changelog"]:
        problems.append(f"{path}: version {version} is not in the changelog")
    copyright_line = str(meta.get("copyright", ""))
    if copyright_line and not copyright_line.lower().startswith("copyright"):
        problems.append(f"{path}: copyright {copyright_line!r} should be a copyright line (a licence goes in LICENSE)")
    fmt = meta.get("network_data_format")
    if isinstance(fmt, dict) and not (fmt.get("inputs") and fmt.get("outputs")):
        problems.append(f"{path}: network_data_format needs 'inputs' and 'outputs'")


def _formatting(root: Path, problems: list[str]) -> None:
    for path in sorted((root / "configs").glob("*.json")):
        text = path.read_text()
        data = _read(path, problems)
        if data is not None and text.rstrip("\n") != json.dumps(data, indent=4, ensure_ascii=False):
            problems.append(f"{path}: not formatted as the zoo formats JSON (indent 4)")


def _weights(root: Path, problems: list[str]) -> None:
    """A config that loads weights from the bundle's ``models/`` needs them there or in ``large_files.yml``."""
    large = any((root / name).is_file() for name in ("large_files.yml", "large_files.yaml", "large_files.json"))
    for path in sorted((root / "configs").glob("*.json")):
        for found in sorted(set(m.group(0) for m in _WEIGHTS.finditer(path.read_text()))):
            if not (root / found).is_file() and not large:
                problems.append(f"{path}: loads {found}, which is neither in the bundle nor in a large_files.yml")


def bundle_problems(root: str | Path) -> list[str]:
    """Every problem of the bundle in ``root`` against the zoo's minimum checks (empty: it passes)."""
    root = Path(root)
    if not (root / "configs").is_dir():
        return [f"{root}: not a bundle (no configs/ folder)"]
    problems = [f"{root / name}: missing" for name in REQUIRED_FILES if not (root / name).is_file()]
    _metadata(root, problems)
    _formatting(root, problems)
    _weights(root, problems)
    return problems
