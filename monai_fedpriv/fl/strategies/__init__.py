"""Server strategies: which sites train a round and what each is told, and how their updates become the next global
model (pure, transport-free), in one registry: ``name -> (strategy class, settings dataclass)``.

* :class:`FedAvg` (weighted by local steps, samples or uniform; Li et al. 2019, Alg. 3) and :class:`FedAvgM`
  (server momentum; Hsu et al. 2019);
* :class:`FedProx` (Li et al. 2020), :class:`CyclicWeightTransfer` (Chang et al. 2018), :class:`FedAvgShare`
  (Zhao et al. 2018): the heterogeneity methods of seed 004, and :class:`FedReplay` (seed 004), whose rounds
  include a one-time upload and training at the server;
* :class:`CoordinateMedian` and :class:`TrimmedMean` for untrusted federations (Yin et al. 2018).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from monai_fedpriv.fl.strategies.base import Strategy
from monai_fedpriv.fl.strategies.fedavg import FedAvg, FedAvgM, weighted_delta
from monai_fedpriv.fl.strategies.methods import CyclicWeightTransfer, FedAvgShare, FedProx, SplitNN
from monai_fedpriv.fl.strategies.replay import CWTReplay, FedReplay
from monai_fedpriv.fl.strategies.robust import CoordinateMedian, TrimmedMean, trimmed_delta
from monai_fedpriv.fl.strategies.settings import (
    WEIGHTINGS,
    CWTReplaySettings,
    CWTSettings,
    FedAvgMSettings,
    FedAvgSettings,
    FedAvgShareSettings,
    FedProxSettings,
    FedReplaySettings,
    MedianSettings,
    SplitNNSettings,
    TrimmedMeanSettings,
    check_settings,
)

__all__ = [
    "REGISTRY", "STRATEGIES", "WEIGHTINGS", "CWTReplay", "CoordinateMedian", "CyclicWeightTransfer", "FedAvg",
    "FedAvgM", "FedAvgShare", "FedProx", "FedReplay", "SplitNN", "Strategy", "TrimmedMean", "build_strategy",
    "strategy_settings", "trimmed_delta", "weighted_delta",
]  # fmt: skip

#: ``--strategy NAME -> (class, settings dataclass)``
REGISTRY: dict[str, tuple[type[Strategy], type]] = {
    "fedavg": (FedAvg, FedAvgSettings),
    "fedavgm": (FedAvgM, FedAvgMSettings),
    "fedprox": (FedProx, FedProxSettings),
    "cwt": (CyclicWeightTransfer, CWTSettings),
    "fedavg-share": (FedAvgShare, FedAvgShareSettings),
    "splitnn": (SplitNN, SplitNNSettings),
    "fedreplay": (FedReplay, FedReplaySettings),
    "cwt-replay": (CWTReplay, CWTReplaySettings),
    "median": (CoordinateMedian, MedianSettings),
    "trimmed-mean": (TrimmedMean, TrimmedMeanSettings),
}
STRATEGIES = tuple(REGISTRY)


def strategy_settings(name: str, **options: Any) -> Any:
    """The settings dataclass of strategy ``name`` from ``options`` (defaults for the rest), range-checked.

    Raises:
        ValueError: an unknown strategy, an option the strategy does not take, or a value out of range (naming its
            flag).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}.")
    settings_type = REGISTRY[name][1]
    known = {f.name: f for f in fields(settings_type)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        flags = [known[k].metadata["flag"] if k in known else k for k in unknown]
        raise ValueError(f"strategy {name!r} takes no setting {', '.join(flags)}.")
    settings = settings_type(**options)
    check_settings(settings)
    return settings


def build_strategy(name: str, **options: Any) -> Strategy:
    """The strategy ``--strategy NAME`` asks for, with its settings validated (``ValueError`` naming the value).

    Example:
        >>> build_strategy("trimmed-mean", trim_fraction=0.25).config()
        {'name': 'trimmed-mean', 'server_lr': 1.0, 'trim_fraction': 0.25}
    """
    settings = strategy_settings(name, **options)
    return REGISTRY[name][0](**asdict(settings))
