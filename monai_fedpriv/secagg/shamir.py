"""Shamir's t-of-n secret sharing over the prime field of the Mersenne prime 2^521 - 1 (Shamir 1979).

A secret is an integer below 2^512 (a 32-byte key, or a 32-byte seed, fits with room); a share is ``(x, y)`` with
``x`` the holder's public index (>= 1). Any ``t`` shares give the secret back (Lagrange interpolation at 0); fewer
say nothing about it. Coefficients are drawn from OS entropy (:mod:`secrets`): keys are never simulated.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence

__all__ = ["PRIME", "combine", "split"]

PRIME = 2**521 - 1


def split(secret: int, holders: Sequence[int], threshold: int) -> dict[int, int]:
    """``{x: y}`` shares of ``secret`` for the holders' indices ``x``, any ``threshold`` of which recover it.

    Raises:
        ValueError: a secret out of range, a threshold outside ``[1, len(holders)]``, or an index < 1 or repeated.
    """
    if not 0 <= secret < 2**512:
        raise ValueError("a Shamir secret must be an integer in [0, 2^512).")
    xs = list(holders)
    if len(set(xs)) != len(xs) or any(not isinstance(x, int) or x < 1 for x in xs):
        raise ValueError(f"share holders need distinct indices >= 1, got {xs}.")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}] (the number of holders).")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine(shares: Iterable[tuple[int, int]]) -> int:
    """The secret from at least ``threshold`` shares ``(x, y)`` (with fewer the result is unrelated to it).

    Raises:
        ValueError: no shares, or two shares for one index.
    """
    points = list(shares)
    xs = [x for x, _ in points]
    if not points or len(set(xs)) != len(xs):
        raise ValueError("combining needs shares of distinct holders.")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret
