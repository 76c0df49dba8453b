"""What crosses the wire between a site and the server.

A site sends a :class:`ModelUpdate` (the weight difference of one round plus how much local work produced it); the
server answers with a :class:`GlobalModel`. Both are plain containers of ``dict[str, Tensor]`` so that filters
(privatizers), aggregation strategies and transports stay independent of each other.

Sparse updates (selective parameter sharing) carry a boolean ``masks`` entry per tensor: ``True`` marks a
coordinate that was shared. Coordinates outside the mask must be ignored by the aggregator, never read as zeros.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from monai_fedpriv.errors import UpdateError

if TYPE_CHECKING:
    from monai_fedpriv.fl.instruction import RoundInstruction

__all__ = [
    "MAX_COUNT", "ModelUpdate", "GlobalModel", "check_fields", "check_update", "int_problem", "shown",
    "site_problem", "tensor_bytes",
]  # fmt: skip

MAX_COUNT = 2**53  # the largest integer a JSON header carries exactly
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


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

    #: the message kind on the wire (:mod:`monai_fedpriv.fl.codec`)
    kind: ClassVar[str] = "update"

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
        instructions: the strategy's :class:`~monai_fedpriv.fl.instruction.RoundInstruction` for each site asked to
            train the next round (a site without one trains as the run's settings say).
    """

    #: the message kind on the wire (:mod:`monai_fedpriv.fl.codec`)
    kind: ClassVar[str] = "global"

    round: int
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor] | None = None
    stop: bool = False
    instructions: dict[str, RoundInstruction] = field(default_factory=dict)

    def instruction_for(self, site: str) -> RoundInstruction:
        """What the strategy asks of ``site`` in the next round (the default instruction when it names none)."""
        from monai_fedpriv.fl.instruction import RoundInstruction

        return self.instructions.get(site) or RoundInstruction()


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def check_update(update: ModelUpdate, reference: Mapping[str, torch.Tensor]) -> None:
    """Validate an update against the global weights it claims to modify.

    Optimiser moments, when sent, are checked the same way: each key ``"<parameter>/<state>"`` must name a
    floating-point parameter of the model, with its shape, and hold finite values.

    Raises:
        UpdateError: naming the site and key, on missing/unexpected keys, shape mismatch, non-finite values,
            bad masks, or a field of the wrong type (:func:`check_fields`).
    """
    check_fields(update)
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


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile value can be arbitrarily long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def int_problem(name: str, value: Any, minimum: int = 0) -> str | None:
    """Why ``value`` is not an acceptable integer field ``name`` (an ``int``, not a ``bool``, in
    ``[minimum, 2**53]``), or ``None`` when it is."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} field is {shown(value)} (a {type(value).__name__}), expected an int"
    if not minimum <= value <= MAX_COUNT:
        return f"{name} field is {shown(value)}, expected an int from {minimum} to 2**53"
    return None


def site_problem(value: Any) -> str | None:
    """Why ``value`` is not an acceptable site name (1 to 64 letters, digits and ``_.@-``), or ``None``."""
    if isinstance(value, str) and SITE_NAME.fullmatch(value):
        return None
    return (
        f"site field is {shown(value)} (a {type(value).__name__}), expected a name of 1 to 64 letters, digits and "
        f"'_.@-'"
    )


def check_fields(update: ModelUpdate) -> None:
    """Check the typed fields of an update: ``site`` a safe name, ``round`` an int >= 1, ``n_samples`` and
    ``local_steps`` ints >= 0 (never ``bool``, ``float``, NaN or text), ``meta`` a dict.

    Raises:
        UpdateError: naming the site (when its name is valid) and the field, e.g.
            ``update from 'site-2': round field is '1' (a str), expected an int``.
    """
    problem = site_problem(update.site)
    who = "update" if problem else f"update from {update.site!r}"
    problem = (
        problem
        or int_problem("round", update.round, minimum=1)
        or int_problem("n_samples", update.n_samples)
        or int_problem("local_steps", update.local_steps)
    )
    if problem is None and not isinstance(update.meta, dict):
        problem = f"meta field is a {type(update.meta).__name__}, expected a dict"
    if problem is not None:
        raise UpdateError(f"{who}: {problem}.")
