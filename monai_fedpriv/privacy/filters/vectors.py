"""Helpers shared by the update filters: a flat view of an update's floating-point coordinates and back, top-k
selection, Laplace draws from an explicit generator, and setting checks that raise ``PrivacyConfigError``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from monai_fedpriv.errors import PrivacyConfigError, UpdateError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy import events

__all__ = [
    "check_fraction",
    "check_positive",
    "flatten",
    "float_keys",
    "input_mask",
    "laplace",
    "shared_count",
    "steps_divisor",
    "top_k_mask",
    "unflatten",
]


def laplace(n: int, scale: float, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` draws of Lap(``scale``) from ``generator``, as ``scale * (E1 - E2)`` with E1, E2 ~ Exp(1) i.i.d."""
    e = torch.empty(2, n, dtype=dtype).exponential_(generator=generator)
    return (e[0] - e[1]).mul_(scale)


def shared_count(fraction: float, size: int) -> int:
    """Number of coordinates a fraction ``q`` of ``size`` means: ``round(q * size)``, at least 1 (0 if size is 0)."""
    if size <= 0:
        return 0
    return min(size, max(1, int(math.floor(fraction * size + 0.5))))


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
        raise PrivacyConfigError(f"fraction must be a number in (0, 1], got {fraction!r}.")
    return float(fraction)


def check_positive(name: str, value: Any, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    return events.check_positive(name, value)


def float_keys(delta: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors (the coordinates filters act on), in the dict's order."""
    return [k for k, v in delta.items() if v.is_floating_point()]


def flatten(delta: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """The tensors of ``keys`` concatenated into one CPU vector (float64 if any of them is, else float32)."""
    if not keys:
        return torch.zeros(0, dtype=torch.float64)
    dtype = torch.float64 if any(delta[k].dtype == torch.float64 for k in keys) else torch.float32
    return torch.cat([delta[k].detach().reshape(-1).to("cpu", dtype) for k in keys])


def unflatten(
    values: torch.Tensor, mask: torch.Tensor, update: ModelUpdate, keys: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a flat value vector and boolean mask back into per-key tensors shaped like ``update.delta``.

    Unshared coordinates are set to zero. Non-floating tensors (integer buffers) are never shared: zero delta and an
    all-False mask.
    """
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype))
    sizes = [update.delta[k].numel() for k in keys]
    value_parts = dict(zip(keys, values.split(sizes), strict=True))
    mask_parts = dict(zip(keys, mask.split(sizes), strict=True))
    delta: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for k, v in update.delta.items():
        if k not in value_parts:
            delta[k] = torch.zeros_like(v)
            masks[k] = torch.zeros(v.shape, dtype=torch.bool, device=v.device)
            continue
        delta[k] = value_parts[k].reshape(v.shape).to(device=v.device, dtype=v.dtype)
        masks[k] = mask_parts[k].reshape(v.shape).to(v.device)
    return delta, masks


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``score``; ties at the cut go to the lowest indices."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if k <= 0:
        return mask
    cut = torch.topk(score, k, sorted=False).values.min()
    mask |= score > cut
    need = k - int(mask.sum())
    tied = torch.nonzero(score == cut).reshape(-1)  # ascending indices
    mask[tied[:need]] = True
    return mask


def input_mask(update: ModelUpdate, keys: list[str]) -> torch.Tensor | None:
    """The update's masks over ``keys`` flattened like :func:`flatten`, or ``None`` for a dense update."""
    if update.masks is None:
        return None
    missing = [k for k in keys if k not in update.masks]
    if missing:
        raise UpdateError(f"sparse update of {update.site!r} has no mask for keys {missing[:5]}.")
    if not keys:
        return torch.zeros(0, dtype=torch.bool)
    return torch.cat([update.masks[k].detach().reshape(-1).to("cpu", torch.bool) for k in keys])


def steps_divisor(update: ModelUpdate, normalise: bool, who: str) -> float:
    """``N^(local)`` of Li et al. Alg. 2 line 2 (1.0 when normalisation is off); a site with no steps is an error."""
    if not normalise:
        return 1.0
    if update.local_steps <= 0:
        raise UpdateError(
            f"{who}: update of {update.site!r} round {update.round} has local_steps={update.local_steps}; "
            f"cannot normalise by the number of local iterations."
        )
    return float(update.local_steps)
