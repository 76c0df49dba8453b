"""What crosses the wire between a site and the server.

A site sends a :class:`ModelUpdate` (the weight difference of one round plus how much local work produced it); the
server answers with a :class:`GlobalModel`. Both are plain containers of ``dict[str, Tensor]`` so that filters
(privatizers), aggregation strategies and transports stay independent of each other.

Sparse updates (selective parameter sharing) carry a boolean ``masks`` entry per tensor: ``True`` marks a
coordinate that was shared. Coordinates outside the mask must be ignored by the aggregator, never read as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from monai_fedpriv.errors import UpdateError

__all__ = ["ModelUpdate", "GlobalModel", "check_update", "tensor_bytes"]


@dataclass
class ModelUpdate:
    """One site's contribution to one federated round.

    Args:
        site: name of the sending site, e.g. ``"site-1"``.
        round: 1-based federated round the update belongs to.
        delta: ``local_weights - global_weights`` per parameter/buffer name, without any ``_module.`` prefix.
        n_samples: number of training samples the site holds (or used this round).
        local_steps: number of optimiser steps taken this round (``N^(local)`` of Li et al., Alg. 1 and 3).
        masks: optional boolean mask per key; ``True`` = coordinate shared. ``None`` means dense.
        optimizer_state: optional flat dict of optimiser moment tensors, sent only when momentum is aggregated.
        meta: free-form, JSON-serialisable facts about the update (privacy accounting, bytes sent, ...).
    """

    site: str
    round: int
    delta: dict[str, torch.Tensor]
    n_samples: int
    local_steps: int
    masks: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def dense_bytes(self) -> int:
        """Bytes the update would take on the wire if every coordinate were sent."""
        return sum(tensor_bytes(v) for v in self.delta.values())


@dataclass
class GlobalModel:
    """The server's answer: global weights after ``round`` aggregations (``round == 0`` is the initial model).

    Args:
        round: number of completed federated rounds these weights reflect.
        weights: full state dict of the global model (parameters and float buffers).
        optimizer_state: aggregated optimiser moments when client momentum is aggregated, else ``None``.
        stop: ``True`` when the federation has ended (budget exhausted, last round done) and the site should stop.
    """

    round: int
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor] | None = None
    stop: bool = False


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def check_update(update: ModelUpdate, reference: Mapping[str, torch.Tensor]) -> None:
    """Validate an update against the global weights it claims to modify.

    Optimiser moments, when sent, are checked the same way: each key ``"<parameter>/<state>"`` must name a
    floating-point parameter of the model, with its shape, and hold finite values.

    Raises:
        UpdateError: naming the site and key, on missing/unexpected keys, shape mismatch, non-finite values,
            bad masks or non-positive work counts.
    """
    who = f"update from {update.site!r} (round {update.round})"
    missing = sorted(set(reference) - set(update.delta))
    extra = sorted(set(update.delta) - set(reference))
    if missing:
        raise UpdateError(f"{who} lacks keys {missing[:5]}{'...' if len(missing) > 5 else ''}.")
    if extra:
        raise UpdateError(f"{who} has keys the global model does not: {extra[:5]}{'...' if len(extra) > 5 else ''}.")
    for key, ref in reference.items():
        value = update.delta[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise UpdateError(f"{who}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}.")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UpdateError(f"{who}: key {key!r} contains NaN or Inf values.")
        if update.masks is not None:
            if key not in update.masks:
                raise UpdateError(f"{who}: sparse update has no mask for key {key!r}.")
            mask = update.masks[key]
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(ref.shape):
                raise UpdateError(f"{who}: mask for {key!r} must be bool with shape {tuple(ref.shape)}.")
    for flat_key, value in (update.optimizer_state or {}).items():
        name, sep, _ = flat_key.rpartition("/")
        if not sep or name not in reference:
            raise UpdateError(f"{who}: optimiser state {flat_key!r} names no parameter of the global model.")
        if tuple(value.shape) != tuple(reference[name].shape):
            raise UpdateError(
                f"{who}: optimiser state {flat_key!r} has shape {tuple(value.shape)}, expected "
                f"{tuple(reference[name].shape)}."
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UpdateError(f"{who}: optimiser state {flat_key!r} contains NaN or Inf values.")
    if update.local_steps < 0 or update.n_samples < 0:
        raise UpdateError(
            f"{who}: n_samples and local_steps must be >= 0, got {update.n_samples}, {update.local_steps}."
        )
    for name in ("n_samples", "local_steps"):
        if isinstance(getattr(update, name), float) and not math.isfinite(getattr(update, name)):
            raise UpdateError(f"{who}: {name} is not finite.")
