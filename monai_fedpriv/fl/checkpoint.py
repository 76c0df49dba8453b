"""Files a federated run writes: atomic saves (a crash never leaves a half-written checkpoint or ``metrics.json``),
JSON that stays valid with NaN/Inf metrics, and the versioned, fingerprinted round checkpoint.

A checkpoint is written after every completed round; ``--resume`` reloads it only when the run's fingerprint
(bundle, config files, sites, local work, momentum, aggregator, seed) is the same, so accepted work is never mixed
with another configuration's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_VERSION", "atomic_torch_save", "atomic_write_text", "json_safe", "load_round_checkpoint",
           "write_json"]  # fmt: skip

CHECKPOINT_VERSION = 1


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None``, tensors as lists and keys as strings (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if torch.is_tensor(obj):
        return json_safe(obj.tolist())
    return obj


def _replace_atomically(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename over ``path``."""
    _replace_atomically(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to a temporary file, then rename over ``path``."""
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(text))


def write_json(obj: Any, path: Path) -> None:
    """Atomically write ``obj`` as indented strict JSON (see :func:`json_safe`)."""
    atomic_write_text(json.dumps(json_safe(obj), indent=2), path)


def load_round_checkpoint(path: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """Load a round checkpoint written by the simulator and check that it belongs to this run.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: another checkpoint version, or a run configuration that differs (the differing keys are named).
    """
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} has checkpoint version {version}, expected {CHECKPOINT_VERSION}.")
    if state["fingerprint"] != dict(fingerprint):
        diff = [k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k]]
        raise ValueError(f"{path} belongs to a different run configuration (differs in {diff}).")
    return state
