"""Files the package writes: atomic saves (a crash never leaves a half-written checkpoint, ``metrics.json`` or
``attack.json``) and strict JSON that stays valid with NaN/Inf metrics.

This is the one JSON writer of the package: reports, attack records, checkpoints' side files and experiment results
all go through :func:`write_json`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_torch_save", "atomic_write_text", "json_safe", "write_json"]


def json_safe(obj: Any) -> Any:
    """``obj`` as strict-JSON data: non-finite floats become ``None``, tensors and numpy values plain lists/numbers,
    paths strings, tuples lists and keys strings.

    Example:
        >>> json_safe({1: float("nan"), "x": (1.0, torch.tensor([2.0]))})
        {'1': None, 'x': [1.0, [2.0]]}
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if torch.is_tensor(obj):
        return json_safe(obj.tolist())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _replace_atomically(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename over it."""
    _replace_atomically(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename over it."""
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(obj: Any, path: str | Path, indent: int = 2, ascii_only: bool = True) -> None:
    """Atomically write ``obj`` as indented strict JSON (see :func:`json_safe`); bundle configs take ``indent=4,
    ascii_only=False`` (the model zoo's formatting)."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False, ensure_ascii=ascii_only)
    atomic_write_text(text + "\n", path)
