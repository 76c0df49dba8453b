"""The versioned, fingerprinted round checkpoint.

A checkpoint is written after every completed round. ``--resume`` reloads it only when the run's fingerprint is the
same as the one it was written with: the bundle and the content of its config files, every override (privacy regime,
noise, clip, budget, accountant, sharing settings, filter epsilon, ``--override`` values), the sites and their data,
local work, momentum policy, strategy and its settings, screening, ``--min-sites`` and the seed. Only the number of
rounds may grow. A change is refused with one message listing every changed setting, old and new value, so accepted
work is never mixed with another configuration's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from monai_fedpriv.errors import ResumeError
from monai_fedpriv.utils.files import json_safe

__all__ = ["ADDED_SETTINGS", "CHECKPOINT_VERSION", "fingerprint_changes", "load_round_checkpoint"]

CHECKPOINT_VERSION = 3


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        if not obj and prefix:
            out[prefix] = {}
        return out
    return {prefix: obj}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


#: settings that checkpoints of earlier versions did not record: compared only when both fingerprints hold them
ADDED_SETTINGS = ("partition",)


def _site_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The change of the sites' data lists (``{site: [image, ...]}``) in the flags' terms: ``--sites`` when the
    sites differ, ``--partition`` when the scheme does, else how many cases each site gained and lost."""
    old, new = dict(saved.get("sites") or {}), dict(current.get("sites") or {})
    if list(old) != list(new):
        if len(old) != len(new):
            return [f"--sites: {len(old)} -> {len(new)}"]
        return [f"sites: {', '.join(old)} -> {', '.join(new)}"]
    if old == new:
        return []
    scheme_old, scheme_new = saved.get("partition"), current.get("partition")
    if scheme_old is not None and scheme_new is not None and scheme_old != scheme_new:
        return []  # said by the --partition line
    cells = []
    for site in old:
        added = len(set(map(str, new[site])) - set(map(str, old[site])))
        removed = len(set(map(str, old[site])) - set(map(str, new[site])))
        if added or removed or old[site] != new[site]:
            cells.append(f"{site}: {added} added, {removed} removed" if added or removed else f"{site}: reordered")
    return [f"the sites' data lists changed (data, --data, --partition or --seed): {'; '.join(cells)}"]


def fingerprint_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Every leaf setting that differs between two fingerprints, as ``"path: old -> new"`` lines; the sites' data
    lists as one line in the flags' terms (``--sites: 3 -> 4``, ``--partition: iid -> skew-high``)."""
    saved, current = dict(json_safe(dict(saved))), dict(json_safe(dict(current)))
    for key in ADDED_SETTINGS:
        if key not in saved or key not in current:
            saved.pop(key, None)
            current.pop(key, None)
    lines = _site_changes(saved, current)
    old = _leaves({k: v for k, v in saved.items() if k != "sites"})
    new = _leaves({k: v for k, v in current.items() if k != "sites"})
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            if key == "partition":  # a flag's values, as the flag takes them
                lines.append(f"--partition: {old[key]} -> {new[key]}")
            else:
                lines.append(f"{key}: {_short(old.get(key, '<unset>'))} -> {_short(new.get(key, '<unset>'))}")
    return lines


def load_round_checkpoint(path: Path, fingerprint: Mapping[str, Any], rounds: int | None = None) -> dict[str, Any]:
    """Load a round checkpoint and check that it belongs to this run.

    Args:
        path: the checkpoint.
        fingerprint: the run's settings (:func:`~monai_fedpriv.fl.simulator.run_config.run_fingerprint`).
        rounds: the run's ``--rounds``, refused when below the rounds the checkpoint has completed.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ResumeError: another checkpoint version, an unreadable file, a changed configuration (every change named),
            or fewer ``rounds`` than were completed.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: refuse to resume from it
        raise ResumeError(f"--resume: cannot read the checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ResumeError(
            f"--resume: {path} has checkpoint version {version}; this version of monai_fedpriv writes and resumes "
            f"version {CHECKPOINT_VERSION}. Start a new run in another --output."
        )
    changes = fingerprint_changes(state["fingerprint"], fingerprint)
    if changes:
        lines = "\n".join(f"  - {c}" for c in changes)
        raise ResumeError(
            f"--resume: the run in {path.parent.parent} was started with other settings; only --rounds may grow. "
            f"Changed:\n{lines}\nRestore these settings, or start a new run in another --output."
        )
    done = int(state.get("round", 0))
    if rounds is not None and rounds < done:
        raise ResumeError(
            f"--resume: the run in {path.parent.parent} already has {done} rounds; --rounds must be >= {done} "
            f"(got {rounds})."
        )
    return state
