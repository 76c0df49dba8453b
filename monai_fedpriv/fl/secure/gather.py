"""A round's updates as one secure sum, in-process: the sites keep their updates (:class:`HeldTransport`), then every
site that trained encodes its update (clip, rotate, round, and, under distributed DP, its share of the noise after
its budget accepted the release), and the four stages of :mod:`monai_fedpriv.secagg` give the server the sum of the
survivors' vectors, which it decodes and averages. The server never receives a site's update.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.fl.secure.settings import SecureAggregation
from monai_fedpriv.fl.transport.inprocess import InProcessTransport
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.secagg import SecAggError, secure_sum

__all__ = ["HeldTransport", "SecureGather", "SecureOutcome"]

logger = logging.getLogger("monai_fedpriv.secure")


class HeldTransport(InProcessTransport):
    """The in-process transport under secure aggregation: the global model goes out as usual, but a site's update
    stays with the site (:meth:`take_held`) until the secure sum; nothing reaches the server's inbox."""

    def __init__(self, tamper: Callable[[ModelUpdate], ModelUpdate] | None = None) -> None:
        super().__init__(tamper=tamper)
        self.held: dict[str, ModelUpdate] = {}

    def send(self, update: ModelUpdate) -> None:
        if update.site in self.held:
            raise RuntimeError(f"{update.site} sent two updates in round {update.round}.")
        self.held[update.site] = update if self.tamper is None else self.tamper(update)

    def has_update(self, site: str) -> bool:
        return site in self.held

    def take_held(self) -> dict[str, ModelUpdate]:
        held, self.held = self.held, {}
        return held


@dataclass
class SecureOutcome:
    """One round's secure sum: the mean update of the survivors (the sites whose masked input is in the sum;
    ``None`` when the sum failed, with ``failed``), the sites whose input is not (with why), and every stage's bytes
    and messages per site."""

    delta: dict[str, torch.Tensor] | None
    survivors: list[str]
    dropped: dict[str, str]
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    failed: str | None = None
    threshold: int = 2
    messages: dict[str, int] = field(default_factory=dict)
    left_after: list[str] = field(default_factory=list)
    near_edge: int = 0

    def screened(self, failures: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Each site's entry as the server judged it: in the sum, or not (with why), and every stage's bytes."""
        out: dict[str, dict[str, Any]] = {name: {"accepted": True} for name in self.survivors}
        for name, why in {**failures, **self.dropped}.items():
            out[name] = {"accepted": False, "rejected": why}
        for name, sent in self.bytes_sent.items():
            out.setdefault(name, {})["bytes_sent"] = sent
        return out

    def problem(self, rnd: int, min_sites: int | None) -> str | None:
        """Why the round cannot be aggregated (``None``: it can): the sum failed, too few survivors (never fewer
        than 3: two would learn each other's update), or a sum that is not finite."""
        need = max(3, self.threshold, min_sites or 0)
        if self.failed or self.delta is None:
            return self.failed or f"round {rnd}: the secure sum failed"
        if len(self.survivors) < need:
            return f"round {rnd}: {len(self.survivors)} site(s) in the secure sum, {need} needed"
        if not all(bool(torch.isfinite(v).all()) for v in self.delta.values()):
            return f"round {rnd}: the securely aggregated update is not finite"
        return None

    def mean_update(self, rnd: int) -> ModelUpdate:
        """The survivors' mean as one update for the strategy (its "site" is the sum, not a site)."""
        assert self.delta is not None
        return ModelUpdate("secure-sum", rnd, dict(self.delta), n_samples=len(self.survivors), local_steps=1)

    def record(self) -> dict[str, Any]:
        """The round's ``metrics.json`` entry ``secure_aggregation``."""
        out: dict[str, Any] = {"survivors": list(self.survivors), "dropped": sorted(self.dropped), "server_saw": "sum"}
        if self.left_after:  # their inputs are in the sum; they left before the unmasking stage
            out["left_after_sending"] = list(self.left_after)
        if self.near_edge:
            out["near_ring_edge"] = self.near_edge
        return out


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


class SecureGather:
    """Runs a round's secure sum over the sites' held updates.

    Args:
        settings: the run's :class:`SecureAggregation`.
        seed: the run seed (public rotation and graph seeds; simulation noise when ``noise_seed`` is set).
        budget_of: the site's :class:`~monai_fedpriv.privacy.budget.PrivacyBudget` (``None``: none; distributed DP
            then refuses the site, fail-closed).
        secure_noise: draw each site's rounding and noise from OS entropy (a deployment); else seeded per site and
            round (a reproducible simulation).
    """

    def __init__(self, settings: SecureAggregation, seed: int, budget_of: Callable[[str], Any],
                 secure_noise: bool = False, drops: Callable[[int], Mapping[str, str]] | None = None,
                 ) -> None:  # fmt: skip
        self.settings = settings
        self.seed = int(seed)
        self.budget_of = budget_of
        self.secure_noise = bool(secure_noise)
        self.drops = drops or (lambda _rnd: {})

    def _rng(self, site: str, rnd: int) -> np.random.Generator:
        if self.secure_noise:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng(_seed(self.seed, "secure-noise", site, rnd))

    def run(self, rnd: int, order: list[str], held: Mapping[str, ModelUpdate],
            global_weights: Mapping[str, Any]) -> SecureOutcome:  # fmt: skip
        """The sum of the round ``rnd`` updates in ``held`` (sites in federation ``order``), with the injected
        ``drop-before-send`` / ``drop-after-send`` faults of the round."""
        drops = self.drops(rnd)
        sites = [s for s in order if s in held]
        keys = [k for k, v in global_weights.items() if torch.is_tensor(v) and v.is_floating_point()]
        dropped: dict[str, str] = {}
        try:
            session = self.settings.session(rnd, tuple(sites), _seed(self.seed, "graph", rnd))
        except ValueError as exc:
            return SecureOutcome(None, [], {}, failed=f"round {rnd}: secure aggregation cannot run: {exc}")
        coding = self.settings.encoding(sum(int(global_weights[k].numel()) for k in keys), len(sites),
                                        session.threshold, _seed(self.seed, "rotation", rnd))  # fmt: skip
        inputs = {}
        for site in sites:
            if drops.get(site) == "drop-before-send":  # it shares its keys, then vanishes: it never encodes, nor
                inputs[site] = np.zeros(coding.padded, dtype=np.uint64)  # spends (this vector is never sent)
                continue
            try:
                vector = torch.cat([held[site].delta[k].detach().reshape(-1).double() for k in keys]).numpy()
                if self.settings.distributed_dp:
                    self._charge(site, coding.event())
                inputs[site] = coding.encode(vector, self._rng(site, rnd))
            except (KeyError, ValueError, RuntimeError, PrivacyBudgetExceeded) as exc:
                dropped[site] = f"sent no masked input: {type(exc).__name__}: {exc}"
        before = {s for s, kind in drops.items() if kind == "drop-before-send"} | set(dropped)
        after = {s for s, kind in drops.items() if kind == "drop-after-send"}
        for site in before - set(dropped):
            dropped[site] = "dropped before sending its masked input (injected fault)"
        try:
            out = secure_sum(session, inputs, drop_before_send=before & set(inputs), drop_after_send=after)
        except (SecAggError, ValueError) as exc:  # too few at a stage, or a message refused: the round fails cleanly
            return SecureOutcome(None, [], dropped, failed=f"round {rnd}: secure aggregation failed: {exc}",
                                 threshold=session.threshold)  # fmt: skip
        near_edge = coding.near_edge(out.total)
        if near_edge:
            logger.warning(f"round {rnd}: {near_edge} coordinate(s) of the secure sum lie near the edge of the ring "
                           f"(--secagg-bits {self.settings.bits}); the sum may have wrapped there.")  # fmt: skip
        mean = coding.decode(out.total) / len(out.survivors)
        delta, start = {}, 0
        for k, value in global_weights.items():
            if k not in keys:  # integer buffers (BatchNorm's step counts) travel unchanged
                delta[k] = torch.zeros_like(value)
                continue
            n = int(value.numel())
            delta[k] = torch.from_numpy(mean[start : start + n].copy()).reshape(value.shape).to(value.dtype)
            start += n
        left_after = sorted(after & set(out.survivors), key=session.index)
        # messages: the global model; keys and shares sent and received; the masked input sent and the unmask request
        # received unless the site dropped before; its unmask shares unless it dropped at all
        messages = {s: 1 + 4 + 2 * (s not in before) + (s not in before | after) for s in sites}
        return SecureOutcome(delta, list(out.survivors), dropped, dict(out.bytes_sent), dict(out.bytes_received),
                             threshold=session.threshold, messages=messages, left_after=left_after,
                             near_edge=near_edge)  # fmt: skip

    def reserve(self, sites: list[str], dim: int) -> None:
        """Reserve each site's per-round distributed-DP release in its budget (what DP-SGD must leave room for), so
        an accountant that cannot account for it or a budget one round exceeds is refused before training."""
        if not self.settings.distributed_dp:
            return
        event = self.settings.encoding(dim, len(sites), self.settings.threshold_for(len(sites)), 0).event()
        for site in sites:
            budget = self.budget_of(site)
            if budget is None:
                raise PrivacyConfigError(f"{site}: --distributed-dp needs the site's privacy budget (budget.json).")
            budget.reserve("distributed_dp", event)

    def _charge(self, site: str, event: Any) -> None:
        """The site's release of its noisy share, recorded in its one ledger before anything leaves (refused past
        the budget: the site sends nothing)."""
        budget = self.budget_of(site)
        if budget is None:
            raise PrivacyBudgetExceeded(f"{site} has no privacy budget to account for distributed DP (budget.json).")
        budget.release(event, "distributed_dp")
