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

__all__ = ["CHECKPOINT_VERSION", "fingerprint_changes", "load_round_checkpoint"]

CHECKPOINT_VERSION = 2


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


def fingerprint_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Every leaf setting that differs between two fingerprints, as ``"path: old -> new"`` lines."""
    old, new = _leaves(json_safe(dict(saved))), _leaves(json_safe(dict(current)))
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            lines.append(f"{key}: {_short(old.get(key, '<unset>'))} -> {_short(new.get(key, '<unset>'))}")
    return lines


def load_round_checkpoint(path: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """Load a round checkpoint and check that it belongs to this run.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ResumeError: another checkpoint version, an unreadable file, or a changed configuration (every change named).
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
    return state
