"""``--override ID=VALUE``: parse the values, and refuse before any data is read an id that neither the bundle's
configs nor the package's shared override files define (a typo would otherwise be ignored silently) and a value of
another kind than the bundle holds at that id (``learning_rate=abc`` would otherwise end in a traceback deep in
PyTorch)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from monai_fedpriv.bundle.loader import SHARED_CONFIGS, SLOT_DEFAULTS, BundleSpec, load_bundle, parser_get

__all__ = ["check_overrides", "parse_overrides", "shared_override_ids"]

#: stands for an id that no config defines
_ABSENT = object()


class _RawText(str):
    """An override value that was not valid JSON and is taken as a string (remembered to explain a refusal)."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a#b=1", "c=\\"x\\""]`` -> ``{"a#b": 1, "c": "x"}``; a value that is not JSON is taken as a string."""
    from monai_fedpriv.cli.options import OptionError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise OptionError(f"--override expects ID=VALUE, got {item!r}.")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = _RawText(raw)
    return out


@lru_cache(maxsize=1)
def _shared_values() -> dict[str, Any]:
    """``{id: value}`` of every top-level id the package's shared override files define (last file wins)."""
    values: dict[str, Any] = {}
    for path in sorted(SHARED_CONFIGS.glob("*.json")):
        content = json.loads(path.read_text())
        values.update({k: v for k, v in content.items() if not k.startswith("_comment")})
    return values


def shared_override_ids() -> set[str]:
    """The ids the package's shared override files define or read (``@id`` the simulator supplies, e.g.
    ``privacy_noise_seed``), the extension slots every bundle gets and the optional ids ``--data`` reads from a
    bundle (``patch_size``...): always valid ``--override`` ids."""
    from monai_fedpriv.bundle.loader import _refs
    from monai_fedpriv.experiments.own_data import ADAPT_IDS

    ids = set(_shared_values()) | set(SLOT_DEFAULTS) | set(ADAPT_IDS)
    ids |= {ref.split("#")[0] for value in _shared_values().values() for ref in _refs(value)}
    return ids


def _is_expression(value: Any) -> bool:
    """A MONAI expression, reference or macro: its type is only known once evaluated."""
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


def _kind(value: Any) -> str | None:
    """The kind of a config value, or ``None`` when any value may replace it (``null``, an expression)."""
    if value is None or _is_expression(value):
        return None
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object (a component)"
    return "a string"


def _same_kind(expected: str, value: Any) -> bool:
    if value is None or _is_expression(value):
        return True
    if isinstance(value, (list, dict)) and expected == "a string":
        return True  # MONAI takes a (name, args) pair, or a component, where a bundle holds a name
    if expected == "a string":
        return isinstance(value, str)
    if expected == "an object (a component)" and isinstance(value, str):
        return False  # a plain string where the bundle builds a component
    return _kind(value) == expected


def check_overrides(bundle: BundleSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse an override id that is not defined, and a value of another kind than the bundle's.

    An id is defined when the run's config files (``bundle``, without overrides) hold it, when it is a new key of
    an object they hold (``network_def#dropout``: a new argument of a component), or when it is one of
    :func:`shared_override_ids`.

    Returns:
        the overrides, every value a plain JSON value.

    Raises:
        OptionError: naming the override, its value and what the bundle holds there.
    """
    from monai_fedpriv.cli.options import OptionError

    parser = load_bundle(BundleSpec(bundle.root, bundle.config_files, {}), required=())
    shared = _shared_values()
    known = shared_override_ids()
    for key, value in overrides.items():
        shown = f"--override {key}={value if isinstance(value, _RawText) else json.dumps(value)}"
        current = parser_get(parser, key, _ABSENT)
        if current is _ABSENT:
            current = shared.get(key, _ABSENT)
        if current is _ABSENT:
            parent_id = key.rpartition("#")[0]
            parent = parser_get(parser, parent_id) if parent_id else None
            if isinstance(parent, dict) and "_target_" in parent:
                continue  # a new argument of a component the bundle defines
            first = key.split("#")[0]
            if first in known and parser_get(parser, first, _ABSENT) is _ABSENT:
                continue  # inside an id only the package's shared overrides define
            ids = [k for k in parser.get().keys() if not k.startswith("_")] + sorted(known)
            close = difflib.get_close_matches(key, sorted(set(ids)), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise OptionError(
                f"{shown}: no config of the run ({', '.join(bundle.config_files)} in {bundle.root}) nor any shared "
                f"override of monai_fedpriv defines the id {key!r}, so it would change nothing.{hint}"
            )
        expected = _kind(current)
        if expected is not None and not _same_kind(expected, value):
            note = " (not valid JSON, so taken as a string)" if isinstance(value, _RawText) else ""
            example = json.dumps(current)
            example = f" (it holds {example})" if len(example) <= 60 else ""
            raise OptionError(
                f"{shown}: the bundle's {key!r} is {expected}{example} and the value is not{note}; give {expected} "
                f"in JSON."
            )
    return {k: str(v) if isinstance(v, _RawText) else v for k, v in overrides.items()}
