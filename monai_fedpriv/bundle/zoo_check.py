"""Offline checks of a bundle against the MONAI model zoo's minimum (its CI's directory, metadata and version checks,
its pre-commit's JSON formatting, the bundle specification's required metadata keys), one line per problem, so a
team can check its own bundle before sharing it (``monai-fedpriv bundle check DIR``). The zoo's schema check needs
the schema from the network; what it checks offline is the keys the specification requires."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["LARGE_FILE_KEYS", "README_SECTIONS", "REQUIRED_FILES", "REQUIRED_METADATA", "bundle_problems"]

#: files every bundle holds (the zoo's CI and its README template)
REQUIRED_FILES = ("configs/metadata.json", "LICENSE", "docs/README.md", "docs/data_license.txt")
#: metadata keys the MONAI bundle specification requires (and the zoo's ``name``)
REQUIRED_METADATA = (
    "name", "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "task", "description",
    "authors", "copyright", "network_data_format",
)  # fmt: skip
#: the sections of the zoo's README template that are not optional
README_SECTIONS = ("Authors", "Tags", "Model Description", "Data", "Performance", "System Configuration")
#: what each entry of ``large_files.yml`` needs (the zoo's ``download_large_files``)
LARGE_FILE_KEYS = ("path", "url", "hash_val", "hash_type")
_IN_MODELS = re.compile(r"@bundle_root\s*\+\s*['\"]/models")
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


def _weights(root: Path, problems: list[str], require: bool) -> None:
    """Weights load from ``bundle_root/models`` (the zoo's convention); with ``require``, the files a config loads
    are in the bundle or listed in ``large_files.yml`` (the zoo's TorchScript step needs them)."""
    large = _large_files(root, problems)
    for path in sorted((root / "configs").glob("*.json")):
        config = _read(path, problems)
        if not isinstance(config, dict):
            continue
        for load in _load_paths(config):
            if not _IN_MODELS.search(_expand(load, config)):
                problems.append(f"{path}: loads weights from {load!r}, not from $@bundle_root + '/models/...' (the "
                                f"zoo's convention)")  # fmt: skip
        if not require:
            continue
        for found in sorted(set(m.group(0) for m in _WEIGHTS.finditer(json.dumps(_expanded_loads(config))))):
            if not (root / found).is_file() and found not in large:
                problems.append(f"{path}: loads {found}, which is neither in the bundle nor in a large_files.yml")


def _load_paths(config: Any) -> list[str]:
    """Every ``load_path`` of a ``CheckpointLoader`` in ``config``."""
    found: list[str] = []
    if isinstance(config, dict):
        if str(config.get("_target_", "")).endswith("CheckpointLoader") and isinstance(config.get("load_path"), str):
            found.append(config["load_path"])
        for value in config.values():
            found += _load_paths(value)
    elif isinstance(config, list):
        for value in config:
            found += _load_paths(value)
    return found


def _expand(text: str, config: dict[str, Any], depth: int = 4) -> str:
    """``text`` with the top-level ids it references (``@ckpt_dir``) replaced by their own text, a few levels deep."""
    for _ in range(depth):
        ids = [i for i in re.findall(r"@([A-Za-z_][A-Za-z0-9_]*)", text) if i != "bundle_root"]
        if not ids:
            break
        for ident in ids:
            text = text.replace(f"@{ident}", str(config.get(ident, f"<{ident}>")))
    return text


def _expanded_loads(config: dict[str, Any]) -> list[str]:
    return [_expand(p, config).replace("$", "").replace("@bundle_root + ", "").replace("'", "").replace(" + ", "")
            .lstrip("/") for p in _load_paths(config)]  # fmt: skip


def _large_files(root: Path, problems: list[str]) -> set[str]:
    """The paths ``large_files.yml`` lists, each entry checked for the keys the zoo's downloader reads."""
    import yaml

    names = [n for n in ("large_files.yml", "large_files.yaml", "large_files.json") if (root / n).is_file()]
    if not names:
        return set()
    path = root / names[0]
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        problems.append(f"{path}: not readable ({exc})")
        return set()
    entries = data.get("large_files") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        problems.append(f"{path}: needs a 'large_files' list")
        return set()
    listed = set()
    for i, entry in enumerate(entries):
        missing = [k for k in LARGE_FILE_KEYS if not isinstance(entry, dict) or not entry.get(k)]
        if missing:
            problems.append(f"{path}: entry {i} lacks {', '.join(missing)}")
        elif isinstance(entry, dict):
            listed.add(str(entry["path"]).lstrip("./"))
    return listed


def _readme(root: Path, problems: list[str]) -> None:
    path = root / "docs" / "README.md"
    if not path.is_file():
        return
    headings = {re.sub(r"[*#]", "", line).strip().lower() for line in path.read_text().splitlines()
                if line.startswith("#")}  # fmt: skip
    for section in README_SECTIONS:
        if section.lower() not in headings:
            problems.append(f"{path}: no '{section}' section (the zoo's README template)")


def _packages(root: Path, problems: list[str]) -> None:
    """``monai_fedpriv`` named with the version ``pip install`` gives; the deprecated key name refused."""
    from importlib.metadata import PackageNotFoundError, version

    path = root / "configs" / "metadata.json"
    meta = _read(path, []) if path.is_file() else None
    if not isinstance(meta, dict):
        return
    if "optional_packages_version" in meta:
        problems.append(f"{path}: optional_packages_version is MONAI's deprecated name of required_packages_version")
    listed = (meta.get("required_packages_version") or {}).get("monai_fedpriv")
    try:
        installed = version("monai-fedpriv")
    except PackageNotFoundError:
        return
    if listed is not None and listed != installed:
        problems.append(f"{path}: required_packages_version names monai_fedpriv {listed}, but pip installs {installed}")


def bundle_problems(root: str | Path, require_weights: bool = False) -> list[str]:
    """Every problem of the bundle in ``root`` against the zoo's minimum checks (empty: it passes); with
    ``require_weights`` also the weights its configs load (what the zoo's TorchScript step needs)."""
    root = Path(root)
    if not (root / "configs").is_dir():
        return [f"{root}: not a bundle (no configs/ folder)"]
    problems = [f"{root / name}: missing" for name in REQUIRED_FILES if not (root / name).is_file()]
    _metadata(root, problems)
    _packages(root, problems)
    _formatting(root, problems)
    _weights(root, problems, require_weights)
    _readme(root, problems)
    return problems
