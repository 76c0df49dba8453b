"""Distributed DP on top of secure aggregation: each site clips, rotates, scales, rounds and noises its update so
that the sum of any ``n_min`` or more sites carries the noise of one central Skellam mechanism (Kairouz, Liu,
Steinke 2021 for the encoding; Agarwal, Kairouz, Liu 2021 for Skellam noise).

Per site: clip the flat update to L2 norm ``clip``; pad to a power of two and rotate with the randomized Hadamard
transform (random signs from the round's public seed, then the orthonormal Walsh-Hadamard transform), which spreads
the norm over all coordinates; multiply by ``scale``; round each coordinate up or down at random with the
probabilities that keep it unbiased, again until the rounded vector's norm is within ``l2`` (conditional rounding);
add Skellam noise of variance ``variance / n_min``; reduce mod ``2^bits``. The server decodes the unmasked sum:
signed residues, divide by ``scale``, rotate back, crop.

``scale`` is the largest that keeps, with probability ``1 - 1e-6`` for every coordinate at once, the sum of
``n_sites`` aligned updates plus the noise of all ``n_sites`` shares inside the ring (a wrapped coordinate would
corrupt the sum silently; :meth:`DistributedDP.near_edge` counts coordinates of a sum close to the edge);
``variance = (noise_multiplier * scale * clip)^2``, so the released sum's noise has standard deviation
``noise_multiplier * clip`` in the update's own units with ``n_min`` survivors. A site's release is accounted as a
Skellam event with sensitivities ``l2`` and ``l1 = min(l2^2, sqrt(d) l2)`` (one site's whole update: site-level DP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from monai_fedpriv.privacy.events import SkellamEvent
from monai_fedpriv.privacy.skellam import skellam_noise
from monai_fedpriv.secagg.messages import from_ring, to_ring

__all__ = ["DistributedDP", "hadamard"]

BETA = math.exp(-0.5)  # conditional rounding: a try is kept with probability >= 1 - BETA (Kairouz et al. 2021)
_MAX_TRIES = 1000


def hadamard(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of a vector whose length is a power of two (its own inverse)."""
    y = np.array(x, dtype=np.float64, copy=True)
    n, h = y.size, 1
    while h < n:
        y = y.reshape(-1, 2 * h)
        a, b = y[:, :h].copy(), y[:, h:].copy()
        y[:, :h], y[:, h:] = a + b, a - b
        y = y.reshape(-1)
        h *= 2
    return y / math.sqrt(n)


@dataclass(frozen=True)
class DistributedDP:
    """One round's encoding, shared by every site and the server (all public).

    Args:
        dim: the update's length.
        clip: L2 norm each site's update is clipped to.
        noise_multiplier: the sum's noise standard deviation over ``clip``, with ``n_min`` survivors.
        bits: the ring of secure aggregation.
        n_sites: sites asked (sizes the scale against overflow).
        n_min: fewest survivors the noise is sized for (the threshold).
        rotation_seed: public seed of the random signs.
    """

    dim: int
    clip: float
    noise_multiplier: float
    bits: int
    n_sites: int
    n_min: int
    rotation_seed: int

    @property
    def padded(self) -> int:
        return 1 << max(0, math.ceil(math.log2(max(self.dim, 1))))

    @property
    def scale(self) -> float:
        """Integer units per update unit (see the module docstring)."""
        spread = math.sqrt(2 * math.log(2 * self.padded / 1e-3) / self.padded)  # a rotated coordinate's bound / clip
        noise = self.noise_multiplier * math.sqrt(self.n_sites / self.n_min)  # all sites' shares, not n_min's
        tail = math.sqrt(2 * math.log(2 * self.padded / 1e-6))  # Gaussian tail over every coordinate at once
        return ((1 << (self.bits - 1)) - 1) / (self.clip * (self.n_sites * spread + tail * noise))

    @property
    def l2(self) -> float:
        """The rounded vector's norm bound (conditional rounding keeps every site within it)."""
        c, d = self.scale * self.clip, self.padded
        return math.sqrt(c**2 + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (c + math.sqrt(d) / 2))

    @property
    def variance(self) -> float:
        """The central Skellam variance per coordinate, in integer units."""
        return (self.noise_multiplier * self.scale * self.clip) ** 2

    def event(self) -> SkellamEvent:
        """What a site's ledger records for its part in one released sum (``noise_multiplier > 0``)."""
        if self.noise_multiplier <= 0:
            raise ValueError("secure aggregation without distributed DP adds no noise: nothing to account.")
        return SkellamEvent(l1=min(self.l2**2, math.sqrt(self.padded) * self.l2), l2=self.l2, variance=self.variance)

    def _signs(self) -> np.ndarray:
        return np.random.default_rng(self.rotation_seed).choice(np.array([-1.0, 1.0]), size=self.padded)

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A site's flat update as residues mod ``2^bits``, clipped, rotated, rounded and noised (``rng``: OS
        entropy in a deployment, seeded in a simulation)."""
        x = np.asarray(update, dtype=np.float64).reshape(-1)
        if x.size != self.dim or not np.all(np.isfinite(x)):
            raise ValueError(f"distributed DP encodes {self.dim} finite values, got {x.size} (or NaN/Inf).")
        norm = float(np.linalg.norm(x))
        x = x * min(1.0, self.clip / norm) if norm > 0 else x
        z = hadamard(np.pad(x, (0, self.padded - self.dim)) * self._signs()) * self.scale
        floor = np.floor(z)
        for _ in range(_MAX_TRIES):
            rounded = floor + (rng.random(z.size) < z - floor)
            if float(np.linalg.norm(rounded)) <= self.l2:
                break
        else:  # each try succeeds with probability >= 1 - BETA: not reached in practice
            raise RuntimeError("conditional rounding did not meet its norm bound; nothing was sent.")
        noisy = rounded.astype(np.int64)
        if self.noise_multiplier > 0:  # 0: secure aggregation alone, the encoding without noise
            noisy = noisy + skellam_noise(z.size, self.variance / self.n_min, rng)
        return to_ring(noisy, self.bits)

    def near_edge(self, total: np.ndarray) -> int:
        """Coordinates of an unmasked sum within 1/16 of the ring's edge (a sign that the sum may have wrapped)."""
        return int(np.sum(np.abs(from_ring(total, self.bits)) > (15 << (self.bits - 5))))

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The unmasked sum (residues) back to the sum of the clipped updates plus the noise, in update units."""
        z = from_ring(total, self.bits).astype(np.float64) / self.scale
        return (hadamard(z) * self._signs())[: self.dim]
