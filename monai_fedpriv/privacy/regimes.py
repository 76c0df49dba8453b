"""Named DP-SGD settings ("privacy regimes") from Table 1 of Ziller et al. (seed 000).

=========  ================  ===============  ======  ===========  ===============
regime     noise multiplier  L2 clip norm     delta   eps local    eps federated
=========  ================  ===============  ======  ===========  ===============
low        0.8               1.0              1e-5    5.98         11.5
medium     1.0               0.5              1e-5    3.58         7.08
high       1.5               0.1              1e-5    1.82         3.54
=========  ================  ===============  ======  ===========  ===============

The epsilon columns are the budgets at which training was aborted in the paper (record-level for the local model,
per-site record-level for the federated one). ``custom`` takes every value from the caller.

Example:
    >>> regime = get_regime("medium", setting="federated")
    >>> regime.noise_multiplier, regime.max_grad_norm, regime.budget
    (1.0, 0.5, 7.08)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from monai_fedpriv.errors import PrivacyConfigError

__all__ = ["PrivacyRegime", "REGIMES", "SETTINGS", "get_regime"]

SETTINGS = ("local", "federated")

# name -> (noise multiplier, clip norm, delta, budget local, budget federated), Table 1 of seed 000.
_TABLE_1: dict[str, tuple[float, float, float, float, float]] = {
    "low": (0.8, 1.0, 1e-5, 5.98, 11.5),
    "medium": (1.0, 0.5, 1e-5, 3.58, 7.08),
    "high": (1.5, 0.1, 1e-5, 1.82, 3.54),
}


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PrivacyConfigError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class PrivacyRegime:
    """One DP-SGD setting, validated at construction (privacy fails closed).

    Args:
        name: label of the regime (``"low"``, ``"medium"``, ``"high"``, ``"custom"``...).
        noise_multiplier: Gaussian noise std over the clipping norm, > 0.
        max_grad_norm: per-sample L2 clipping norm ``C``, > 0.
        delta: target delta in (0, 1).
        budget: epsilon at which a site stops training, > 0, or ``None`` for no budget stop.

    Example:
        >>> PrivacyRegime("custom", noise_multiplier=1.2, max_grad_norm=0.7, delta=1e-6, budget=4.0).budget
        4.0
    """

    name: str
    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    budget: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PrivacyConfigError(f"regime name must be a non-empty string, got {self.name!r}.")
        if _number("noise_multiplier", self.noise_multiplier) <= 0:
            raise PrivacyConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}.")
        if _number("max_grad_norm", self.max_grad_norm) <= 0:
            raise PrivacyConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}.")
        if not 0.0 < _number("delta", self.delta) < 1.0:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {self.delta!r}.")
        if self.budget is not None and _number("budget", self.budget) <= 0:
            raise PrivacyConfigError(f"budget must be > 0 or None, got {self.budget!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. for ``metrics.json``."""
        return asdict(self)


REGIMES: dict[str, dict[str, PrivacyRegime]] = {
    setting: {
        name: PrivacyRegime(name, sigma, clip, delta, budget=(eps_l if setting == "local" else eps_f))
        for name, (sigma, clip, delta, eps_l, eps_f) in _TABLE_1.items()
    }
    for setting in SETTINGS
}


def get_regime(name: str, setting: str = "federated", **custom: Any) -> PrivacyRegime:
    """Return a named regime of Table 1, or build a ``custom`` one.

    Args:
        name: ``"low"``, ``"medium"``, ``"high"`` or ``"custom"``.
        setting: ``"federated"`` or ``"local"``: which epsilon budget column of Table 1 to use.
        custom: for ``name="custom"``, the :class:`PrivacyRegime` fields ``noise_multiplier``, ``max_grad_norm``,
            ``delta`` and ``budget``; for a named regime, fields to override (e.g. ``budget=None``).

    Raises:
        PrivacyConfigError: unknown name or setting, missing custom fields, or out-of-range values.
    """
    if setting not in SETTINGS:
        raise PrivacyConfigError(f"setting must be one of {SETTINGS}, got {setting!r}.")
    allowed = {"noise_multiplier", "max_grad_norm", "delta", "budget"}
    unknown = sorted(set(custom) - allowed)
    if unknown:
        raise PrivacyConfigError(f"unknown regime fields {unknown}; allowed: {sorted(allowed)}.")
    if name == "custom":
        missing = sorted({"noise_multiplier", "max_grad_norm"} - set(custom))
        if missing:
            raise PrivacyConfigError(f"custom regime needs {missing}, got {sorted(custom)}.")
        return PrivacyRegime("custom", **custom)
    if name not in REGIMES[setting]:
        raise PrivacyConfigError(f"unknown privacy regime {name!r}; choose from {sorted(_TABLE_1) + ['custom']}.")
    base = REGIMES[setting][name].to_dict()
    base.update(custom)
    return PrivacyRegime(**base)
