"""Server strategies: select a round's sites and aggregate their updates (pure, transport-free).

* :class:`FedAvg` (weighted by local steps, samples or uniform; Li et al. 2019, Alg. 3) and :class:`FedAvgM`
  (server momentum; Hsu et al. 2019);
* :class:`CoordinateMedian` and :class:`TrimmedMean` for untrusted federations (Yin et al. 2018).
"""

from __future__ import annotations

from monai_fedpriv.fl.strategies.base import Strategy
from monai_fedpriv.fl.strategies.fedavg import WEIGHTINGS, FedAvg, FedAvgM, weighted_delta
from monai_fedpriv.fl.strategies.robust import CoordinateMedian, TrimmedMean, trimmed_delta

__all__ = [
    "STRATEGIES",
    "WEIGHTINGS",
    "CoordinateMedian",
    "FedAvg",
    "FedAvgM",
    "Strategy",
    "TrimmedMean",
    "build_strategy",
    "trimmed_delta",
    "weighted_delta",
]

#: names accepted by ``--aggregator``
STRATEGIES = ("fedavg", "fedavgm", "median", "trimmed-mean")


def build_strategy(
    name: str,
    *,
    weighting: str = "steps",
    server_lr: float = 1.0,
    server_momentum: float = 0.9,
    trim_fraction: float = 0.2,
) -> Strategy:
    """The strategy ``--aggregator NAME`` asks for, with its settings validated (``ValueError`` naming the value).

    Example:
        >>> build_strategy("trimmed-mean", trim_fraction=0.25).config()
        {'name': 'trimmed-mean', 'server_lr': 1.0, 'trim_fraction': 0.25}
    """
    if name == "fedavg":
        return FedAvg(weighting=weighting, server_lr=server_lr)
    if name == "fedavgm":
        return FedAvgM(momentum=server_momentum, weighting=weighting, server_lr=server_lr)
    if name == "median":
        return CoordinateMedian(server_lr=server_lr)
    if name == "trimmed-mean":
        return TrimmedMean(trim_fraction=trim_fraction, server_lr=server_lr)
    raise ValueError(f"unknown aggregator {name!r}; choose one of {STRATEGIES}.")
