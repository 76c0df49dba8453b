"""Calibration: the noise multiplier that makes a planned number of DP-SGD steps spend a target epsilon."""

from __future__ import annotations

import warnings

import numpy as np
from opacus.accountants.utils import get_noise_multiplier

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.events import _check_accountant, _check_count, _check_delta, check_positive

__all__ = ["solve_noise_multiplier"]


def solve_noise_multiplier(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) such that ``steps`` DP-SGD steps spend at most the target.

    Args:
        target_epsilon: epsilon budget, > 0.
        sample_rate: Poisson sampling rate ``q`` in (0, 1].
        steps: number of DP-SGD steps, >= 1.
        delta: target delta in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.

    Example:
        >>> round(solve_noise_multiplier(3.58, sample_rate=0.01, steps=1000, delta=1e-5), 2)
        0.81
    """
    eps = check_positive("target_epsilon", target_epsilon)
    q = check_positive("sample_rate", sample_rate)
    if q > 1.0:
        raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")
    n = _check_count("steps", steps)
    delta = _check_delta(delta)
    _check_accountant(accountant)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=eps, target_delta=delta, sample_rate=q, steps=n, accountant=accountant
                )
            )
        except ValueError as err:
            raise PrivacyConfigError(
                f"no noise multiplier reaches epsilon={eps} at delta={delta} for q={q}, steps={n}: {err}"
            ) from err
