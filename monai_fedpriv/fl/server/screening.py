"""Screen the updates of a round before they reach the strategy: malformed or suspicious updates are rejected with a
reason instead of stopping the federation.

An update is rejected when :func:`~monai_fedpriv.fl.update.check_update` fails (a field of the wrong type, missing or
extra keys, wrong shapes, NaN/Inf in the delta or the optimiser moments, bad masks), when it claims more work than the
server asked of its site (:mod:`monai_fedpriv.fl.server.work`), when its L2 norm passes an absolute bound
(``max_update_norm``), or when its norm is ``norm_factor`` times the median norm of the *other* non-empty updates of
the round (leave-one-out, so two sites are enough to tell which one is off). Norms are taken over the shared
floating-point coordinates.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.server.work import WorkBound, claim_problem
from monai_fedpriv.fl.update import ModelUpdate, check_update

__all__ = ["ScreenSettings", "screen_updates", "update_l2_norm"]


@dataclass(frozen=True)
class ScreenSettings:
    """How the server screens updates.

    Args:
        max_update_norm: reject an update whose L2 norm exceeds this (``None``: no absolute bound).
        norm_factor: reject an update whose norm exceeds this many times the median norm of the other non-empty
            updates of the round (``None``: off). The default 100 lets sites with very different amounts of local
            work through and catches scaled or exploding updates.
    """

    max_update_norm: float | None = None
    norm_factor: float | None = 100.0

    def __post_init__(self) -> None:
        for name in ("max_update_norm", "norm_factor"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} should be a finite number > 0 or None, got {value!r}.")
        if self.norm_factor is not None and self.norm_factor <= 1:
            raise ValueError(f"norm_factor should be > 1, got {self.norm_factor!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def update_l2_norm(update: ModelUpdate) -> float:
    """L2 norm of the shared floating-point coordinates of an update's delta (float64)."""
    total = 0.0
    for key, value in update.delta.items():
        if not value.is_floating_point():
            continue
        v = value.detach()
        if update.masks is not None and key in update.masks:
            v = v * update.masks[key].to(v.dtype)
        total += float(torch.linalg.vector_norm(v, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def screen_updates(
    reference: Mapping[str, torch.Tensor],
    updates: Sequence[ModelUpdate],
    settings: ScreenSettings = ScreenSettings(),
    work_bounds: Mapping[str, WorkBound] | None = None,
) -> tuple[list[ModelUpdate], dict[str, str]]:
    """Split a round's updates into accepted ones and ``{site: reason}`` rejections; never raises for what a site
    sent (a field of the wrong type is that site's rejection).

    Args:
        reference: the global weights the updates were computed against.
        updates: what arrived this round.
        settings: the norm bounds.
        work_bounds: ``{site: WorkBound}``, the most each site may claim (sites without one are not bounded).

    Returns:
        ``(accepted, rejected)``; accepted updates keep their arrival order.
    """
    valid: list[ModelUpdate] = []
    rejected: dict[str, str] = {}
    for update in updates:
        try:
            check_update(update, reference)
        except UpdateError as exc:
            rejected[update.site] = str(exc)
            continue
        problem = claim_problem(update, (work_bounds or {}).get(update.site))
        if problem is not None:
            rejected[update.site] = f"update from {update.site!r} (round {update.round}) {problem}"
            continue
        valid.append(update)
    norms = {u.site: update_l2_norm(u) for u in valid}
    accepted: list[ModelUpdate] = []
    for update in valid:
        norm = norms[update.site]
        if settings.max_update_norm is not None and norm > settings.max_update_norm:
            rejected[update.site] = f"update norm {norm:.4g} exceeds the bound {settings.max_update_norm:g}"
            continue
        others = [v for site, v in norms.items() if site != update.site and v > 0]
        if settings.norm_factor is not None and others:
            typical = statistics.median(others)
            if norm > settings.norm_factor * typical:
                rejected[update.site] = (
                    f"update norm {norm:.4g} is {norm / typical:.3g}x the median of the other sites ({typical:.4g}), "
                    f"beyond the factor {settings.norm_factor:g}"
                )
                continue
        accepted.append(update)
    return accepted, rejected
