"""Load a MONAI bundle's configs once per role (site or server), with overrides, and check the ids we need.

The simulator never edits a bundle: it reads ``configs/train.json`` (plus override files such as ``dp.json``), then
sets per-site values (data lists, loader, seed) through ``ConfigParser`` overrides before any component is
instantiated, so the engine is built with the site's loader from the start.

Override files are found in the bundle's ``configs/`` first, then among the package's shared overrides
(``monai_fedpriv/configs``: ``fed.json``, ``budget.json``, ``dp.json``, ``svt.json``, ``gaussian.json``,
``percentile.json``, ``attack.json``), so one override serves every bundle. The extension slots those files fill
(``fed_*``) get empty defaults when a bundle does not declare them, so a plain MONAI bundle can be simulated as is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from monai_fedpriv.errors import BundleError

__all__ = ["REQUIRED_IDS", "SHARED_CONFIGS", "SLOT_DEFAULTS", "BundleSpec", "load_bundle", "parser_get",
           "metadata_input", "shared_config", "shared_config_names"]  # fmt: skip

#: the package's shared override files
SHARED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: extension slots filled by the override files, with the value a bundle that does not declare them gets
SLOT_DEFAULTS: dict[str, Any] = {
    "site": "site-1",
    "fed_sync_handlers": [],
    "fed_budget_handlers": [],
    "fed_privacy_handlers": [],
    "fed_audit_handlers": [],
    "fed_handlers": "$@fed_sync_handlers + @fed_budget_handlers + @fed_privacy_handlers + @fed_audit_handlers",
    "fed_privacy_filters": [],
    "fed_share_filters": [],
    "fed_budget_filters": [],
    "fed_latent_filters": [],
    "fed_audit_filters": [],
    "fed_filters": "$@fed_privacy_filters + @fed_share_filters + @fed_latent_filters + @fed_budget_filters + "
    "@fed_audit_filters",
    "fed_budget_stateful": {},
    "fed_privacy_stateful": {},
    "fed_share_stateful": {},
    "fed_stateful": "$dict(**@fed_budget_stateful, **@fed_privacy_stateful, **@fed_share_stateful)",
    "eval_activation": "softmax",  # output convention: softmax classes or sigmoid regions (fl.evaluation)
    "attack_pixel_range": [0.0, 1.0],  # intensity range of the preprocessed images (attack.json)
}


def shared_config(name: str) -> Path:
    """Path of one of the package's shared override files (``"dp.json"``...), for ``python -m monai.bundle run``.

    Example:
        >>> shared_config("dp.json").name
        'dp.json'
    """
    path = SHARED_CONFIGS / name
    if not path.is_file():
        raise BundleError(f"no shared override {name!r}; the package provides {shared_config_names()}.")
    return path


def shared_config_names() -> list[str]:
    """The names of the package's shared override files, sorted."""
    return sorted(p.name for p in SHARED_CONFIGS.glob("*.json"))


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

    def own_configs(self) -> BundleSpec:
        """The bundle with its own config files only: the package's shared overrides (privacy, sharing,
        federation: ``dp.json``, ``budget.json``, ``fed.json``...) left out, for a trainer the server runs itself."""
        own = tuple(n for n in self.config_files if (Path(self.root) / "configs" / n).is_file()
                    or not (SHARED_CONFIGS / n).is_file())  # fmt: skip
        return BundleSpec(self.root, own, dict(self.overrides))

    def config_paths(self) -> list[Path]:
        """Each config file: under the bundle's ``configs/``, else the package's shared override of that name."""
        out = []
        for name in self.config_files:
            own = Path(self.root) / "configs" / name
            shared = SHARED_CONFIGS / name
            out.append(own if own.is_file() or not shared.is_file() else shared)
        return out


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
            raise BundleError(
                f"bundle config {path} does not exist (nor a shared override of that name in {SHARED_CONFIGS})."
            )
        content = _read_json_or_yaml(path)
        if index == 0:
            parser.read_config(content)
        else:  # later files override ids, '#'-paths included, as `monai.bundle run` merges them
            for key, value in content.items():
                try:
                    parser[key] = value
                except (KeyError, ValueError, TypeError, IndexError) as exc:
                    parent = key.rpartition("#")[0]
                    raise BundleError(
                        f"{path} overrides id {key!r}, but the bundle's earlier configs have no {parent!r} to hold "
                        f"it ({type(exc).__name__}: {exc}); this override file needs a bundle that defines it."
                    ) from exc
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(root.resolve())
    for key, value in SLOT_DEFAULTS.items():
        if not _has_id(parser, key):
            parser[key] = value
    for key, value in {**spec.overrides, **(overrides or {})}.items():
        parser[key] = value
    for rid in required:
        if not _has_id(parser, rid):
            raise BundleError(f"bundle {root} (configs {list(spec.config_files)}) lacks required config id {rid!r}.")
        dangling = _dangling_refs(parser, rid)
        if dangling:
            via, missing = dangling
            needed = "" if via == rid else f" (needed by {rid!r})"
            raise BundleError(
                f"bundle {root} (configs {list(spec.config_files)}): id {via!r}{needed} refers to '@{missing}', "
                f"which no config defines."
            )
    return parser


_REF = re.compile(r"@([A-Za-z_][\w#]*)")


def _dangling_refs(parser: ConfigParser, rid: str) -> tuple[str, str] | None:
    """The first ``@id`` reachable from ``rid`` that no config defines, as ``(referring id, missing id)``."""
    seen: set[str] = set()
    stack = [rid]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for ref in _refs(parser_get(parser, current)):
            if not _has_id(parser, ref):
                return current, ref
            stack.append(ref)
    return None


def _refs(value: Any) -> list[str]:
    if isinstance(value, str):
        return _REF.findall(value) if ("@" in value) else []
    if isinstance(value, Mapping):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _refs(v)]
    return []


def _has_id(parser: ConfigParser, rid: str) -> bool:
    try:
        parser[rid]
    except (KeyError, IndexError, ValueError, TypeError):
        return False
    return True


def parser_get(parser: ConfigParser, rid: str, default: Any = None) -> Any:
    """Raw (unparsed) config value at ``rid``, or ``default`` when absent."""
    return parser[rid] if _has_id(parser, rid) else default


def metadata_input(parser: Any) -> tuple[list[int] | None, int | None]:
    """``(spatial_shape, num_channels)`` of the network input declared in the bundle's metadata
    (``network_data_format.inputs.image``); ``None`` for what it does not declare as integers."""
    meta: Any = parser.get("_meta_") if hasattr(parser, "get") else None
    try:
        image = meta["network_data_format"]["inputs"]["image"]
    except (KeyError, TypeError):
        return None, None
    shape, channels = image.get("spatial_shape"), image.get("num_channels")
    valid = isinstance(shape, list) and bool(shape) and all(isinstance(v, int) for v in shape)
    return ([int(v) for v in shape] if valid else None), (channels if isinstance(channels, int) else None)
