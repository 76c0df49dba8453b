"""The server side of one federated round, shared by the in-process simulator and the NVIDIA FLARE controller:
screen the updates (reject with a reason), aggregate the rest with the strategy, publish, record.

A round aggregates when at least ``min_sites`` of the sites expected in it sent an acceptable update (default: all
but one, at least one). Otherwise it fails: nothing is published, the last good global model stays current and the
caller stops the run with the last round's checkpoint intact.

Example::

    server = ServerRound(FedAvg(), ScreenSettings(norm_factor=100.0))
    outcome = server(3, global_weights, updates, expected=["site-1", "site-2", "site-3"],
                     failures={"site-2": "training raised RuntimeError: ..."}, publish=transport.publish,
                     work_bounds={"site-1": WorkBound(max_steps=12, n_samples=40)})
    outcome.failed, outcome.rejected
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.server.records import update_facts
from monai_fedpriv.fl.server.screening import ScreenSettings, screen_updates
from monai_fedpriv.fl.server.work import WorkBound
from monai_fedpriv.fl.strategies.base import Strategy
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate, check_fields

__all__ = ["RoundOutcome", "ServerRound", "default_min_sites"]

logger = logging.getLogger("monai_fedpriv.server")


def default_min_sites(n_expected: int) -> int:
    """All but one of the expected sites, at least one."""
    return max(1, n_expected - 1)


@dataclass
class RoundOutcome:
    """What one round produced.

    Attributes:
        round: the 1-based round.
        accepted: sites whose updates were aggregated.
        rejected: ``{site: reason}`` for sites that failed or whose update was refused.
        weights: the new global weights, or ``None`` when the round failed.
        optimizer_state: the aggregated optimiser moments (momentum aggregation), or ``None``.
        failed: why the round did not aggregate, or ``None``.
        sites: per-site ``metrics.json`` entries (update facts; ``rejected`` with the reason).
    """

    round: int
    accepted: list[str]
    rejected: dict[str, str]
    weights: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, torch.Tensor] | None = None
    failed: str | None = None
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)


class ServerRound:
    """Screen, aggregate, publish and record one round.

    Args:
        strategy: the :class:`~monai_fedpriv.fl.strategies.Strategy`.
        screen: the :class:`ScreenSettings` of the screening.
        min_sites: acceptable updates needed to aggregate (``None``: all but one of the expected sites, >= 1).
    """

    def __init__(self, strategy: Strategy, screen: ScreenSettings | None = None, min_sites: int | None = None) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy should be a monai_fedpriv Strategy, got {type(strategy).__name__}.")
        if min_sites is not None and (isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1):
            raise ValueError(f"min_sites should be an int >= 1 or None, got {min_sites!r}.")
        self.strategy = strategy
        self.screen = screen or ScreenSettings()
        self.min_sites = min_sites

    def required(self, n_expected: int) -> int:
        """How many acceptable updates a round of ``n_expected`` sites needs."""
        return self.min_sites if self.min_sites is not None else default_min_sites(n_expected)

    def __call__(
        self,
        rnd: int,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[ModelUpdate],
        expected: Sequence[str],
        failures: Mapping[str, str] | None = None,
        publish: Callable[[GlobalModel], None] | None = None,
        wire_bytes: Mapping[str, int] | None = None,
        work_bounds: Mapping[str, WorkBound] | None = None,
    ) -> RoundOutcome:
        """Run the server side of round ``rnd``.

        Args:
            rnd: 1-based round number (the published model carries it).
            global_weights: the weights the round's updates were computed against.
            updates: what arrived.
            expected: the sites that were asked to train this round (those that stopped for their privacy budget
                without sending are not expected).
            failures: ``{site: reason}`` for expected sites that failed before sending (training raised, timed out).
            publish: called with the new :class:`GlobalModel` when the round aggregates.
            wire_bytes: bytes each site's update took on the wire, for the record.
            work_bounds: ``{site: WorkBound}``: the local steps the server asked of each site and the samples it
                declared when it joined; an update claiming more is rejected before aggregation.

        Raises:
            ValueError: a caller's mistake (an update from a site that was not asked, two from one site, a ``site``
                that is not a string); nothing a site sent raises: a field of the wrong type, another round or an
                excessive claim is that site's rejection.
        """
        failures = dict(failures or {})
        if any(not isinstance(u.site, str) for u in updates):
            raise ValueError(f"round {rnd}: updates must name their site as a string (the transport decodes them).")
        unexpected = sorted({u.site for u in updates} - set(expected))
        if unexpected:
            raise ValueError(f"round {rnd}: updates from sites that were not asked to train: {unexpected}.")
        senders = [u.site for u in updates]
        if len(set(senders)) != len(senders):
            raise ValueError(f"round {rnd}: several updates from one site: {sorted(senders)}.")
        for u in updates:
            try:
                check_fields(u)  # typed first: a round "1" is not compared with 1
            except UpdateError as exc:
                failures[u.site] = str(exc)
                continue
            if u.round != rnd:  # computed against another round's model: never aggregated with this round's
                failures[u.site] = f"update is for round {u.round}, not round {rnd}"
        on_round = [u for u in updates if u.site not in failures]
        accepted, rejected = screen_updates(global_weights, on_round, self.screen, work_bounds)
        accepted, claimed = _weighted_as_asked(accepted, work_bounds or {})
        rejected = {**failures, **rejected}
        sites: dict[str, dict[str, Any]] = {}
        by_site = {u.site: u for u in updates}
        for site, reason in rejected.items():
            logger.warning(f"round {rnd}: {site} rejected: {reason}")
            entry: dict[str, Any] = {"rejected": reason}
            meta = by_site[site].meta if site in by_site else None
            if isinstance(meta, dict) and "privacy" in meta:  # a refused release still spent its epsilon
                entry["privacy"] = meta["privacy"]
            sites[site] = entry
        for u in accepted:
            sites[u.site] = update_facts(u, (wire_bytes or {}).get(u.site))
            if u.site in claimed:  # weighted as the steps asked for; what the site claimed, for the record
                sites[u.site]["local_steps_claimed"] = claimed[u.site]
        outcome = RoundOutcome(rnd, [u.site for u in accepted], rejected, None, sites=sites)
        if not expected and not rejected:  # every site of the round stopped (privacy budget): nothing to aggregate
            outcome.weights = dict(global_weights)
            return outcome
        need = self.required(len(expected))
        if len(accepted) < need:
            outcome.failed = (
                f"only {len(accepted)} of {len(expected)} sites sent an acceptable update in round {rnd} "
                f"(at least {need} needed, --min-sites)"
                + (": " + "; ".join(f"{s}: {r}" for s, r in sorted(rejected.items())) if rejected else "")
            )
            return outcome  # the caller reports it (the simulator raises, the NVFlare controller ends the job)
        try:
            outcome.weights = self.strategy.aggregate(global_weights, accepted)
            outcome.optimizer_state = self.strategy.aggregate_optimizer_state(accepted)
        except (ValueError, RuntimeError) as exc:
            outcome.weights, outcome.failed = None, f"aggregation failed in round {rnd}: {exc}"
            return outcome
        if publish is not None:
            publish(GlobalModel(rnd, outcome.weights, outcome.optimizer_state))
        return outcome


def _weighted_as_asked(
    updates: list[ModelUpdate], bounds: Mapping[str, WorkBound]
) -> tuple[list[ModelUpdate], dict[str, int]]:
    """Updates whose step claim passes the steps the server asked for, weighted as those steps (a plausible claim,
    e.g. DP-SGD's noise-only steps, never outweighs an honest site that did all the work asked); ``{site: claim}``
    of those it changed."""
    out, claimed = [], {}
    for u in updates:
        bound = bounds.get(u.site)
        if bound is not None and bound.weight_steps is not None and u.local_steps > bound.weight_steps:
            claimed[u.site] = u.local_steps
            u = dataclasses.replace(u, local_steps=bound.weight_steps)
        out.append(u)
    if bounds:  # a site with nothing declared yet weighs at most what the median other site weighs
        for k, u in enumerate(out):
            bound = bounds.get(u.site)
            others = [v for v in out if v.site != u.site]
            if not others or (bound is not None and bound.n_samples is not None):
                continue
            steps = min(u.local_steps, int(statistics.median(v.local_steps for v in others)))
            samples = min(u.n_samples, int(statistics.median(v.n_samples for v in others)))
            if (steps, samples) != (u.local_steps, u.n_samples):
                claimed.setdefault(u.site, u.local_steps)
                out[k] = dataclasses.replace(u, local_steps=steps, n_samples=samples)
    return out, claimed
