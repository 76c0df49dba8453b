"""Load a MONAI bundle's configs once per role (site or server), with overrides, and check the ids we need.

The simulator never edits a bundle: it reads ``configs/train.json`` (plus optional override files such as
``dp.json``), then sets per-site values (data lists, loader, seed) through ``ConfigParser`` overrides before any
component is instantiated, so the engine is built with the site's loader from the start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from monai_fedpriv.errors import BundleError

__all__ = ["REQUIRED_IDS", "BundleSpec", "load_bundle", "parser_get"]

#: config ids a bundle must define to be trained federatedly.
REQUIRED_IDS = (
    "network",
    "optimizer",
    "train#dataset",
    "train#dataloader",
    "train#trainer",
    "validate#preprocessing",
)


@dataclass
class BundleSpec:
    """Where a bundle lives and which config files make up its training config.

    Args:
        root: bundle directory (contains ``configs/``).
        config_files: files under ``configs/`` merged in order (later files override earlier ids).
        overrides: extra ``{id: value}`` applied after the files.
    """

    root: Path
    config_files: tuple[str, ...] = ("train.json",)
    overrides: dict[str, Any] = field(default_factory=dict)

    def config_paths(self) -> list[Path]:
        return [self.root / "configs" / f for f in self.config_files]


def _read_json_or_yaml(path: Path) -> dict[str, Any]:
    try:
        content = ConfigParser.load_config_file(str(path))
    except json.JSONDecodeError as exc:
        raise BundleError(f"bundle config {path} is not valid JSON: {exc}") from exc
    except Exception as exc:  # yaml errors and the like
        raise BundleError(f"bundle config {path} could not be read: {exc}") from exc
    if not isinstance(content, dict):
        raise BundleError(f"bundle config {path} should hold a mapping of ids, got {type(content).__name__}.")
    return content


def load_bundle(
    spec: BundleSpec, overrides: Mapping[str, Any] | None = None, required: Sequence[str] = REQUIRED_IDS
) -> ConfigParser:
    """Return a fresh ``ConfigParser`` for ``spec`` with ``spec.overrides`` and ``overrides`` applied.

    Raises:
        BundleError: naming the directory, file or id that is missing or malformed.
    """
    root = Path(spec.root)
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist.")
    if not (root / "configs").is_dir():
        raise BundleError(f"{root} is not a MONAI bundle: it has no configs/ directory.")
    parser = ConfigParser()
    for index, path in enumerate(spec.config_paths()):
        if not path.is_file():
            raise BundleError(f"bundle config {path} does not exist.")
        content = _read_json_or_yaml(path)
        if index == 0:
            parser.read_config(content)
        else:  # later files override ids, '#'-paths included, as `monai.bundle run` merges them
            for key, value in content.items():
                parser[key] = value
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(root.resolve())
    for key, value in {**spec.overrides, **(overrides or {})}.items():
        parser[key] = value
    for rid in required:
        if not _has_id(parser, rid):
            raise BundleError(f"bundle {root} (configs {list(spec.config_files)}) lacks required config id {rid!r}.")
    return parser


def _has_id(parser: ConfigParser, rid: str) -> bool:
    try:
        parser[rid]
    except (KeyError, IndexError, ValueError, TypeError):
        return False
    return True


def parser_get(parser: ConfigParser, rid: str, default: Any = None) -> Any:
    """Raw (unparsed) config value at ``rid``, or ``default`` when absent."""
    return parser[rid] if _has_id(parser, rid) else default
