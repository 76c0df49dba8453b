"""The Skellam mechanism (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning"): integer noise ``Poisson(mu/2) - Poisson(mu/2)`` of variance ``mu`` per coordinate. A sum of independent
Skellam variables is Skellam, so sites that each add variance ``mu / n_min`` give the sum of any ``n_min`` of them
the variance ``mu``: distributed DP under secure aggregation.

RDP (their Theorem 3.5 / Corollary 3.6), for integer orders ``alpha > 1``, L1 and L2 sensitivities ``d1``, ``d2``:

    eps(alpha) <= alpha d2^2 / (2 mu) + min(((2 alpha - 1) d2^2 + 6 d1) / (4 mu^2), 3 d1 / (2 mu))

RDP grows with the order, so a fractional order takes the bound of the next integer.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["skellam_noise", "skellam_rdp"]


def skellam_rdp(alpha: float, l1: float, l2: float, variance: float) -> float:
    """The RDP bound of one release at order ``alpha`` (> 1)."""
    if alpha <= 1 or variance <= 0 or l1 < 0 or l2 < 0:
        raise ValueError(f"skellam_rdp needs alpha > 1, variance > 0, sensitivities >= 0 (got {alpha}, {variance}).")
    a = math.ceil(alpha)
    return a * l2**2 / (2 * variance) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))


def skellam_noise(shape: int | tuple[int, ...], variance: float, rng: np.random.Generator) -> np.ndarray:
    """Integer noise of the given per-coordinate ``variance`` (``int64``), from ``rng``."""
    if variance <= 0:
        raise ValueError(f"Skellam noise needs a variance > 0, got {variance}.")
    return rng.poisson(variance / 2, size=shape).astype(np.int64) - rng.poisson(variance / 2, size=shape).astype(
        np.int64
    )
