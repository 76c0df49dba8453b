"""Federated averaging strategies: pure functions of (global weights, updates) -> new global weights.

* :class:`FedAvg`: federated averaging (McMahan et al., 2017) with the update of each site weighted by its local
  work, i.e. Li et al., "Privacy-preserving Federated Brain Tumour Segmentation", Algorithm 3, line 8:
  ``W <- W + sum_k N_k dW_k / sum_k N_k``; ``weighting`` selects ``N_k`` = local steps, samples, or 1 (plain mean).
* :class:`FedAvgM`: FedAvg with server momentum (Hsu et al., 2019), as a baseline of Qu et al.

Partial (sparse) updates are handled per coordinate: a coordinate is averaged over the sites that shared it, with
the same weights restricted to those sites; a coordinate no site shared keeps its global value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monai_fedpriv.fl.strategies.base import Strategy
from monai_fedpriv.fl.update import ModelUpdate

__all__ = ["FedAvg", "FedAvgM", "WEIGHTINGS", "optimizer_state_proxies", "weighted_delta"]

WEIGHTINGS = ("steps", "samples", "uniform")


def _site_weight(update: ModelUpdate, weighting: str) -> float:
    if weighting == "steps":
        return float(update.local_steps)
    if weighting == "samples":
        return float(update.n_samples)
    return 1.0


def weighted_delta(
    reference: Mapping[str, torch.Tensor], updates: Sequence[ModelUpdate], weighting: str = "steps"
) -> dict[str, torch.Tensor]:
    """Weighted mean of the updates' deltas, coordinate-wise over the sites that shared each coordinate.

    Args:
        reference: the global weights the updates were computed against (defines keys, shapes and dtypes).
        updates: validated site updates.
        weighting: ``"steps"`` (Li et al., Alg. 3), ``"samples"`` or ``"uniform"``.

    Returns:
        the aggregated delta, float32 for floating keys; integer buffers (e.g. ``num_batches_tracked``) take the
        delta of the update with the largest weight, rounded.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting should be one of {WEIGHTINGS}, got {weighting!r}.")
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates.")
    weights = [_site_weight(u, weighting) for u in updates]
    if sum(weights) <= 0:
        raise ValueError(f"aggregation weights ({weighting}) sum to zero: every site reported no local work.")
    out: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        if not ref.is_floating_point():
            best = max(range(len(updates)), key=lambda i: weights[i])
            out[key] = updates[best].delta[key].to(ref.dtype)
            continue
        if all(u.masks is None for u in updates):  # dense updates: one weighted sum, a scalar denominator
            num = torch.zeros_like(ref, dtype=torch.float64)
            for u, w in zip(updates, weights, strict=True):
                num.add_(u.delta[key], alpha=w)  # accumulated in float64 without a float64 copy of the delta
            out[key] = (num / sum(weights)).to(ref.dtype)
            continue
        num = torch.zeros_like(ref, dtype=torch.float64)
        den = torch.zeros_like(ref, dtype=torch.float64)
        for u, w in zip(updates, weights, strict=True):
            d = u.delta[key].to(torch.float64)
            if u.masks is None:
                num += w * d
                den += w
            else:
                m = u.masks[key].to(torch.float64)
                num += w * d * m
                den += w * m
        out[key] = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).to(ref.dtype)
    return out


def optimizer_state_proxies(updates: Sequence[ModelUpdate]) -> list[ModelUpdate] | None:
    """The sites' optimiser moments as updates (so every strategy combines them like weights), or ``None``."""
    states = [u for u in updates if u.optimizer_state is not None]
    if not states:
        return None
    if len(states) != len(updates):
        raise ValueError("some sites sent optimiser state and others did not; momentum policy must match.")
    return [ModelUpdate(u.site, u.round, dict(u.optimizer_state or {}), u.n_samples, u.local_steps) for u in states]


class FedAvg(Strategy):
    """Federated averaging weighted by local work (Li et al. 2019, Algorithm 3).

    Args:
        weighting: ``"steps"`` (default; ``N^(local)`` as in Algorithm 3), ``"samples"``, or ``"uniform"``
            (the unweighted mean ``sum_k W_k / K`` the paper compares against).
        server_lr: step size applied to the averaged delta (1.0 is plain FedAvg).

    Example::

        agg = FedAvg(weighting="steps")
        new_global = agg(global_weights, [update_site1, update_site2])
    """

    name = "fedavg"

    def __init__(self, weighting: str = "steps", server_lr: float = 1.0) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting should be one of {WEIGHTINGS}, got {weighting!r}.")
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not 0 < server_lr < float("inf"):
            raise ValueError(f"server_lr should be a finite number > 0, got {server_lr!r}.")
        self.weighting = weighting
        self.server_lr = float(server_lr)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "weighting": self.weighting, "server_lr": self.server_lr}

    def aggregate_optimizer_state(self, updates: Sequence[ModelUpdate]) -> dict[str, torch.Tensor] | None:
        proxies = optimizer_state_proxies(updates)
        if proxies is None:
            return None
        return weighted_delta(proxies[0].delta, proxies, self.weighting)

    def server_step(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v * self.server_lr if v.is_floating_point() else v for k, v in delta.items()}

    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[ModelUpdate]
    ) -> dict[str, torch.Tensor]:
        step = self.server_step(weighted_delta(global_weights, updates, self.weighting))
        return {k: (w + step[k]).to(w.dtype) for k, w in global_weights.items()}


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu, Qi and Brown 2019, "Measuring the effects of non-identical data
    distribution"): ``v <- beta v + mean_delta``; ``W <- W + server_lr * v``.

    Args:
        momentum: server momentum ``beta`` in [0, 1).
        weighting: as for :class:`FedAvg`.
        server_lr: server step size.
    """

    name = "fedavgm"

    def __init__(self, momentum: float = 0.9, weighting: str = "steps", server_lr: float = 1.0) -> None:
        super().__init__(weighting=weighting, server_lr=server_lr)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum should be in [0, 1), got {momentum!r}.")
        self.momentum = float(momentum)
        self.velocity: dict[str, torch.Tensor] = {}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "momentum": self.momentum}

    def server_step(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, d in delta.items():
            if not d.is_floating_point():
                out[k] = d
                continue
            v = self.velocity.get(k)
            v = d.clone() if v is None else self.momentum * v + d
            self.velocity[k] = v
            out[k] = self.server_lr * v
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": {k: v.clone() for k, v in self.velocity.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "velocity" not in state:
            raise KeyError("FedAvgM state lacks required key 'velocity'.")
        self.velocity = {k: v.clone() for k, v in state["velocity"].items()}
