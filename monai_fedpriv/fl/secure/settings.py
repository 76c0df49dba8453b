"""``--secure-aggregation`` and ``--distributed-dp`` as one settings object, with every refusal in one place.

Under secure aggregation the server sees only the sum of the updates (:mod:`monai_fedpriv.secagg`), so nothing that
needs one site's update at the server can run: per-site screening and the robust strategies, sparse updates (their
masks differ per site), aggregated optimiser moments (not in the sum), cyclic or split methods (one site, or no
update at all). Each site clips its update to ``clip`` (``--max-update-norm``) instead of the server screening it;
the sum is averaged uniformly over the sites that survived (their work counts are not known to the server).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.secagg.ddp import DistributedDP
from monai_fedpriv.secagg.session import Session, default_threshold

__all__ = ["RELEASE", "SECURE_STRATEGIES", "SecureAggregation", "summed_size"]

#: the name of the distributed-DP release in a site's budget
RELEASE = "distributed_dp"


def summed_size(weights: Mapping[str, Any]) -> int:
    """How many numbers of a model the secure sum carries: its floating-point tensors (integer buffers stay)."""
    return sum(int(v.numel()) for v in weights.values() if hasattr(v, "is_floating_point") and v.is_floating_point())

#: strategies whose aggregate is a function of the sum of the sites' updates
SECURE_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedavg-share")


@dataclass(frozen=True)
class SecureAggregation:
    """How a run aggregates securely.

    Args:
        clip: L2 norm every site clips its update to (``--max-update-norm``): the bound the server cannot check.
        threshold: shares needed to unmask, and the fewest survivors (``None``: a majority, at least 2).
        bits: the ring ``Z_{2^bits}`` (``--secagg-bits``).
        neighbours: SecAgg+'s ``k`` (``None``: every pair of sites).
        distributed_dp: each site adds its share of Skellam noise, sized for ``threshold`` survivors.
        noise_multiplier: the summed noise's standard deviation over ``clip`` (distributed DP).
    """

    clip: float
    threshold: int | None = None
    bits: int = 16
    neighbours: int | None = None
    distributed_dp: bool = False
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise ValueError("--secure-aggregation needs --max-update-norm C > 0: every site clips its update to C "
                             "(the server sees only the sum and cannot screen one site's update).")  # fmt: skip
        if not 8 <= self.bits <= 32:
            raise ValueError(f"--secagg-bits {self.bits}: choose 8 to 32 (16 matches central DP accuracy).")
        if self.distributed_dp and not (isinstance(self.noise_multiplier, (int, float)) and self.noise_multiplier > 0):
            raise ValueError("--distributed-dp needs --noise-multiplier S > 0 (the sum's noise over the clip norm).")
        if not self.distributed_dp and self.noise_multiplier:
            raise ValueError("--noise-multiplier with --secure-aggregation is distributed DP's: add --distributed-dp.")

    def check_run(self, n_sites: int, strategy: str, min_sites: int | None, sparse: bool, moments: bool) -> None:
        """Refuse, before anything trains, what cannot run when the server sees only the sum.

        Raises:
            ValueError: naming the flag and why.
        """
        if n_sites < 3:
            raise ValueError(f"--secure-aggregation with {n_sites} sites: with two, each site learns the other's "
                             f"update from the sum and its own; use at least 3 sites.")  # fmt: skip
        if strategy not in SECURE_STRATEGIES:
            raise ValueError(f"--strategy {strategy} cannot run under --secure-aggregation: it needs each site's "
                             f"update (or trains one site a round); use one of {', '.join(SECURE_STRATEGIES)}.")
        if sparse:
            raise ValueError("--share svt/percentile cannot run under --secure-aggregation: each site shares other "
                             "coordinates and the masks are not aggregated; use --share none or gaussian.")
        if moments:
            raise ValueError("--momentum aggregate cannot run under --secure-aggregation: the sites' optimiser "
                             "moments are not part of the secure sum; use restart or local.")
        threshold = self.threshold_for(n_sites)
        Session("check", 1, tuple(f"s{i}" for i in range(n_sites)), threshold, self.bits, self.neighbours)
        if min_sites is not None and min_sites < threshold:
            raise ValueError(f"--min-sites {min_sites} is below the secure-aggregation threshold {threshold}: fewer "
                             f"survivors than that cannot be unmasked.")  # fmt: skip

    def threshold_for(self, n_sites: int) -> int:
        return self.threshold if self.threshold is not None else default_threshold(n_sites, self.neighbours)

    def session(self, rnd: int, sites: tuple[str, ...], graph_seed: int) -> Session:
        """A new key exchange for round ``rnd`` (fresh session id: nothing carries over, a resumed run included)."""
        if self.threshold is not None and self.threshold > len(sites):
            raise ValueError(f"{len(sites)} site(s) trained in round {rnd}, fewer than --secagg-threshold "
                             f"{self.threshold}.")  # fmt: skip
        return Session(secrets.token_hex(8), rnd, sites, self.threshold_for(len(sites)), self.bits, self.neighbours,
                       graph_seed)  # fmt: skip

    def encoding(self, dim: int, n_sites: int, n_min: int, rotation_seed: int) -> DistributedDP:
        return DistributedDP(dim, float(self.clip), float(self.noise_multiplier), self.bits, n_sites, n_min,
                             rotation_seed)  # fmt: skip

    def reserve(self, site: str, budget: Any, n_sites: int, dim: int) -> None:
        """Reserve ``site``'s per-round distributed-DP release in its budget (what DP-SGD must leave room for), so an
        accountant that cannot account for it, a budget one round exceeds, or no budget at all is refused before
        training (``PrivacyConfigError``). Nothing to do without distributed DP."""
        if not self.distributed_dp:
            return
        if budget is None:
            raise PrivacyConfigError(f"{site}: --distributed-dp needs the site's privacy budget (budget.json).")
        budget.reserve(RELEASE, self.encoding(dim, n_sites, self.threshold_for(n_sites), 0).event())

    def charge(self, site: str, budget: Any) -> Callable[[Any], None]:
        """How ``site`` records its noisy share in its one ledger before anything leaves (refused past the budget, or
        without a budget: the site sends nothing)."""

        def release(event: Any) -> None:
            if budget is None:
                raise PrivacyBudgetExceeded(f"{site} has no privacy budget to account for distributed DP.")
            budget.release(event, RELEASE)

        return release

    def describe(self) -> dict[str, Any]:
        """``metrics.json``'s ``secure_aggregation`` block."""
        out = asdict(self)
        return {k: out[k] for k in ("threshold", "bits", "neighbours", "distributed_dp", "noise_multiplier", "clip")}
