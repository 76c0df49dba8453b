"""A round's updates as one secure sum, in-process: the sites keep their updates (:class:`HeldTransport`), then every
site that trained encodes its update (clip, rotate, round, and, under distributed DP, its share of the noise after
its budget accepted the release), and the four stages of :mod:`monai_fedpriv.secagg` give the server the sum of the
survivors' vectors, which it decodes and averages. The server never receives a site's update.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monai_fedpriv.errors import PrivacyBudgetExceeded
from monai_fedpriv.fl.secure.settings import SecureAggregation, summed_size
from monai_fedpriv.fl.transport.inprocess import InProcessTransport
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.secagg import SecAggError, secure_sum

__all__ = ["HeldTransport", "SecureGather", "SecureOutcome", "SecureRound"]

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


class SecureRound:
    """One round's public setup, the same at the server and at every site: the session (who, threshold, graph), the
    encoding (scale, rotation) and which weights are summed; the site's half encodes its update, the server's half
    turns the unmasked sum into the round's outcome."""

    def __init__(self, settings: SecureAggregation, seed: int, rnd: int, sites: tuple[str, ...],
                 global_weights: Mapping[str, Any], session_id: str | None = None) -> None:  # fmt: skip
        self.settings, self.seed, self.round = settings, int(seed), int(rnd)
        self.keys = [k for k, v in global_weights.items() if torch.is_tensor(v) and v.is_floating_point()]
        self.shapes = {k: (tuple(v.shape), v.dtype) for k, v in global_weights.items() if torch.is_tensor(v)}
        self.session = settings.session(rnd, tuple(sites), _seed(seed, "graph", rnd))
        if session_id is not None:
            self.session = dataclasses.replace(self.session, session_id=str(session_id))
        self.coding = settings.encoding(summed_size(global_weights), len(sites), self.session.threshold,
                                        _seed(seed, "rotation", rnd))  # fmt: skip

    def public(self) -> dict[str, Any]:
        """What a site needs to join (sent with the round's task)."""
        return {"session_id": self.session.session_id, "sites": list(self.session.sites)}

    def rng(self, site: str, secure_noise: bool) -> np.random.Generator:
        """The site's rounding and noise: OS entropy in a deployment, else seeded per site and round."""
        if secure_noise:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng(_seed(self.seed, "secure-noise", site, self.round))

    def site_vector(self, update: ModelUpdate, rng: np.random.Generator,
                    charge: Callable[[Any], None]) -> np.ndarray:  # fmt: skip
        """A site's update as ring residues; under distributed DP ``charge`` (:meth:`SecureAggregation.charge`)
        records the release first."""
        vector = torch.cat([update.delta[k].detach().reshape(-1).double() for k in self.keys]).numpy()
        if self.settings.distributed_dp:
            charge(self.coding.event())
        return self.coding.encode(vector, rng)

    def mean_delta(self, total: np.ndarray, survivors: int) -> dict[str, torch.Tensor]:
        """The survivors' mean update from the unmasked sum (integer buffers unchanged: zero delta)."""
        near_edge = self.coding.near_edge(total)
        if near_edge:
            logger.warning(f"round {self.round}: {near_edge} coordinate(s) of the secure sum lie near the edge "
                           f"of the ring (--secagg-bits {self.settings.bits}); it may have wrapped there.")
        mean = self.coding.decode(total) / survivors
        delta, start = {}, 0
        for k, (shape, dtype) in self.shapes.items():
            if k not in self.keys:
                delta[k] = torch.zeros(shape, dtype=dtype)
                continue
            n = int(np.prod(shape)) if shape else 1
            delta[k] = torch.from_numpy(mean[start : start + n].copy()).reshape(shape).to(dtype)
            start += n
        return delta


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

    def run(self, rnd: int, targets: list[str], held: Mapping[str, ModelUpdate],
            global_weights: Mapping[str, Any]) -> SecureOutcome:  # fmt: skip
        """The sum of the round ``rnd`` updates in ``held``; the session is over the sites asked (``targets``, as
        under NVIDIA FLARE: a site that failed its training never joins), with the round's injected
        ``drop-before-send`` / ``drop-after-send`` faults."""
        drops = self.drops(rnd)
        try:
            plan = SecureRound(self.settings, self.seed, rnd, tuple(targets), global_weights)
        except ValueError as exc:
            return SecureOutcome(None, [], {}, failed=f"round {rnd}: secure aggregation cannot run: {exc}")
        sites = [s for s in targets if s in held]
        dropped: dict[str, str] = {}
        inputs = {}
        for site in sites:  # a site that drops before sending has encoded (and spent) already: it then vanishes
            try:
                inputs[site] = plan.site_vector(held[site], plan.rng(site, self.secure_noise),
                                                self.settings.charge(site, self.budget_of(site)))
            except (KeyError, ValueError, RuntimeError, PrivacyBudgetExceeded) as exc:
                dropped[site] = f"sent no masked input: {type(exc).__name__}: {exc}"
        before = {s for s, kind in drops.items() if kind == "drop-before-send"} | set(dropped)
        after = {s for s, kind in drops.items() if kind == "drop-after-send"}
        for site in before - set(dropped):
            dropped[site] = "dropped before sending its masked input (injected fault)"
        try:
            out = secure_sum(plan.session, inputs, drop_before_send=before & set(inputs), drop_after_send=after)
        except (SecAggError, ValueError) as exc:  # too few at a stage, or a message refused: the round fails cleanly
            return SecureOutcome(None, [], dropped, failed=f"round {rnd}: secure aggregation failed: {exc}",
                                 threshold=plan.session.threshold)  # fmt: skip
        left_after = sorted(after & set(out.survivors), key=plan.session.index)
        # messages: the global model; keys and shares sent and received; the masked input sent and the unmask request
        # received unless the site dropped before; its unmask shares unless it dropped at all
        messages = {s: 1 + 4 + 2 * (s not in before) + (s not in before | after) for s in sites}
        return SecureOutcome(plan.mean_delta(out.total, len(out.survivors)), list(out.survivors), dropped,
                             dict(out.bytes_sent), dict(out.bytes_received), threshold=plan.session.threshold,
                             messages=messages, left_after=left_after,
                             near_edge=plan.coding.near_edge(out.total))  # fmt: skip

    def reserve(self, sites: list[str], size: int) -> None:
        """Every site's per-round distributed-DP release reserved in its budget (:meth:`SecureAggregation.reserve`)."""
        for site in sites:
            self.settings.reserve(site, self.budget_of(site), len(sites), size)
