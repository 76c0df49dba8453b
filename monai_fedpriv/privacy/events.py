"""What a privacy ledger records: the release events (DP-SGD steps, Gaussian releases, pure epsilon-DP releases),
the accountants that can compose them, and the checks every recorded value passes. :mod:`.accounting` holds the
ledger that composes them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from monai_fedpriv.errors import PrivacyConfigError

__all__ = [
    "ACCOUNTANTS", "GaussianEvent", "PrivacyEvent", "PureEvent", "SampledGaussianEvent", "SkellamEvent",
    "check_accountant_supports", "check_positive",
]  # fmt: skip

ACCOUNTANTS = ("rdp", "prv")


def check_positive(name: str, value: float) -> float:
    """``value`` as a float; refused unless it is a finite number > 0 (the message names ``name``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PrivacyConfigError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrivacyConfigError(f"{name} must be an int >= 1, got {value!r}.")
    return value


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}.")
    return float(delta)


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    return accountant


@dataclass(frozen=True)
class SampledGaussianEvent:
    """``steps`` DP-SGD steps: Poisson sampling with rate ``sample_rate``, Gaussian noise ``noise_multiplier * C``."""

    sample_rate: float
    noise_multiplier: float
    steps: int = 1


@dataclass(frozen=True)
class GaussianEvent:
    """``count`` releases of the un-subsampled Gaussian mechanism (L2 sensitivity 1, std ``noise_multiplier``)."""

    noise_multiplier: float
    count: int = 1


@dataclass(frozen=True)
class PureEvent:
    """``count`` pure ``epsilon``-DP releases (Laplace mechanism, sparse vector technique)."""

    epsilon: float
    label: str = ""
    count: int = 1


@dataclass(frozen=True)
class SkellamEvent:
    """``count`` releases of the Skellam mechanism (:mod:`.skellam`): integer noise of per-coordinate ``variance``
    on an integer vector of L1 / L2 sensitivity ``l1`` / ``l2`` (distributed DP under secure aggregation)."""

    l1: float
    l2: float
    variance: float
    count: int = 1


PrivacyEvent = SampledGaussianEvent | GaussianEvent | PureEvent | SkellamEvent


def check_accountant_supports(accountant: str, events: list[PrivacyEvent] | tuple[PrivacyEvent, ...]) -> None:
    """Refuse, at construction, an accountant that cannot account for a mechanism a site will use.

    Raises:
        PrivacyConfigError: unknown accountant, or ``"prv"`` with a pure-DP mechanism (SVT, Laplace).
    """
    _check_accountant(accountant)
    if accountant == "prv" and any(isinstance(e, PureEvent | SkellamEvent) for e in events):
        raise PrivacyConfigError(
            "the PRV accountant cannot account for pure epsilon-DP releases (the sparse vector technique) or the "
            "Skellam mechanism (distributed DP); use accountant 'rdp' (--accountant rdp, id privacy_accountant) for "
            "this mix of mechanisms."
        )
