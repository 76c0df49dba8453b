"""Robust aggregation for federations whose sites are not all trusted: coordinate-wise median and trimmed mean
(Yin, Chen, Ramchandran and Bartlett 2018, "Byzantine-robust distributed learning: towards optimal statistical
rates").

Every coordinate is aggregated on its own over the sites that shared it (sparse updates: a coordinate outside a
site's mask is not a zero, it is absent). The median keeps the middle value (the mean of the two middle values for
an even count); the ``beta``-trimmed mean drops the ``floor(beta * m)`` largest and smallest of the ``m`` values of
a coordinate (at most ``(m - 1) // 2`` on each side, so at least one value remains) and averages the rest. Neither
uses the sites' work weights: a weight is something a site reports, and a robust statistic must not trust it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from monai_fedpriv.fl.strategies.base import Strategy
from monai_fedpriv.fl.strategies.fedavg import optimizer_state_proxies
from monai_fedpriv.fl.update import ModelUpdate

__all__ = ["CoordinateMedian", "TrimmedMean", "trimmed_delta"]


def trimmed_delta(
    reference: Mapping[str, torch.Tensor],
    updates: Sequence[ModelUpdate],
    trim: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean of the updates' deltas over the sites that shared each coordinate.

    Args:
        reference: the global weights (keys, shapes, dtypes).
        updates: validated site updates.
        trim: ``counts -> k``: how many values to drop at each end of a coordinate holding ``counts`` values.

    Returns:
        the aggregated delta; a coordinate no site shared gets 0; integer buffers take the median site's value.
    """
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates.")
    n = len(updates)
    out: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        if not ref.is_floating_point():
            out[key] = updates[n // 2].delta[key].to(ref.dtype)
            continue
        values = torch.stack([u.delta[key].reshape(-1).to(torch.float64) for u in updates])
        if all(u.masks is None for u in updates):
            valid = torch.ones_like(values, dtype=torch.bool)
        else:
            valid = torch.stack(
                [
                    torch.ones(ref.numel(), dtype=torch.bool) if u.masks is None else u.masks[key].reshape(-1).bool()
                    for u in updates
                ]
            )
        ordered = torch.where(valid, values, torch.full_like(values, float("inf"))).sort(dim=0).values
        counts = valid.sum(0)
        k = torch.minimum(trim(counts), (counts - 1).clamp_min(0) // 2)
        rank = torch.arange(n).unsqueeze(1)
        keep = (rank >= k) & (rank < counts - k)
        total = torch.where(keep, ordered, torch.zeros_like(ordered)).sum(0)
        kept = keep.sum(0)
        mean = torch.where(kept > 0, total / kept.clamp_min(1), torch.zeros_like(total))
        out[key] = mean.reshape(ref.shape).to(ref.dtype)
    return out


class _Robust(Strategy):
    def __init__(self, server_lr: float = 1.0) -> None:
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not 0 < server_lr < float("inf"):
            raise ValueError(f"server_lr should be a finite number > 0, got {server_lr!r}.")
        self.server_lr = float(server_lr)

    def _trim(self, counts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[ModelUpdate]
    ) -> dict[str, torch.Tensor]:
        delta = trimmed_delta(global_weights, updates, self._trim)
        return {
            k: (w + (delta[k] * self.server_lr if w.is_floating_point() else delta[k])).to(w.dtype)
            for k, w in global_weights.items()
        }

    def aggregate_optimizer_state(self, updates: Sequence[ModelUpdate]) -> dict[str, torch.Tensor] | None:
        proxies = optimizer_state_proxies(updates)
        if proxies is None:
            return None
        return trimmed_delta(proxies[0].delta, proxies, self._trim)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "server_lr": self.server_lr}


class CoordinateMedian(_Robust):
    """Coordinate-wise median of the site updates (Yin et al. 2018).

    Example::

        new_global = CoordinateMedian()(global_weights, updates)
    """

    name = "median"

    def _trim(self, counts: torch.Tensor) -> torch.Tensor:
        return (counts - 1).clamp_min(0) // 2


class TrimmedMean(_Robust):
    """Coordinate-wise ``beta``-trimmed mean of the site updates (Yin et al. 2018).

    Args:
        trim_fraction: ``beta`` in [0, 0.5): fraction of the values dropped at *each* end of every coordinate
            (``floor(beta * m)``, capped so that one value remains). With 3 sites, ``beta >= 1/3`` is the median.
        server_lr: step size applied to the aggregated delta.
    """

    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = 0.2, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        if isinstance(trim_fraction, bool) or not isinstance(trim_fraction, (int, float)):
            raise ValueError(f"trim_fraction should be a number in [0, 0.5), got {trim_fraction!r}.")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction should be in [0, 0.5), got {trim_fraction!r}.")
        self.trim_fraction = float(trim_fraction)

    def _trim(self, counts: torch.Tensor) -> torch.Tensor:
        return torch.floor(counts.to(torch.float64) * self.trim_fraction).to(torch.int64)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "trim_fraction": self.trim_fraction}
