"""One privacy ledger per site: record what was released, let an accountant turn it into (epsilon, delta).

Every privacy mechanism of the package records into a :class:`PrivacyLedger`: DP-SGD steps (Poisson-subsampled
Gaussian mechanism, Abadi et al. 2016), un-subsampled Gaussian releases (e.g. a noised model update) and pure
epsilon-DP releases (Laplace, sparse vector technique). The ledger stores events, never epsilon, so the same history
can be re-accounted with another accountant and is restored exactly from a checkpoint.

Accountants (both from Opacus):

* ``"rdp"``: Renyi DP composition (Mironov 2017; subsampled Gaussian of Mironov, Talwar & Zhang 2019), converted
  to (epsilon, delta) with Theorem 21 of Balle et al. 2020. Pure epsilon-DP events enter at every order ``alpha``
  as ``min(eps, alpha * eps**2 / 2)``: eps-DP implies (eps**2/2)-zCDP (Bun & Steinke 2016, Prop. 1.4), i.e. RDP
  ``alpha * eps**2 / 2``, and trivially RDP ``eps`` at every order. In addition the reported epsilon never exceeds
  the basic-composition bound ``eps_gaussian(delta) + sum(pure eps)`` (Dwork et al. 2006): the Gaussian events'
  RDP epsilon plus the plain sum of the pure ones, which is smaller when there are only a few pure releases.
* ``"prv"``: numerical composition of privacy loss random variables (Gopi et al. 2021). It only knows Gaussian
  mechanisms, so it refuses ledgers with pure events instead of guessing.

Example:
    >>> ledger = PrivacyLedger()
    >>> ledger.record_sampled_gaussian(sample_rate=0.01, noise_multiplier=1.0, steps=1000)
    >>> round(ledger.epsilon(delta=1e-5), 1)
    2.1
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.events import (
    ACCOUNTANTS,
    GaussianEvent,
    PrivacyEvent,
    PureEvent,
    SampledGaussianEvent,
    SkellamEvent,
    _check_accountant,
    _check_count,
    _check_delta,
    check_accountant_supports,
    check_positive,
)
from monai_fedpriv.privacy.skellam import skellam_rdp

__all__ = [
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "GaussianEvent",
    "PrivacyEvent",
    "PrivacyLedger",
    "PureEvent",
    "SampledGaussianEvent",
    "SkellamEvent",
    "check_accountant_supports",
]

# Opacus' default orders, extended upwards so that pure-DP-heavy ledgers do not stop at the largest order.
RDP_ORDERS: list[float] = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS] + [80.0, 96.0, 128.0, 256.0, 512.0]

_KINDS = {"sampled_gaussian": "steps", "gaussian": "count", "pure": "count", "skellam": "count"}


class PrivacyLedger:
    """Append-only record of the private releases of one site over the whole run (never reset per round).

    Consecutive identical events are merged (as Opacus' accountants do), so a ledger of 10,000 DP-SGD steps with a
    fixed sample rate and noise multiplier holds a single event.

    Example:
        >>> ledger = PrivacyLedger()
        >>> ledger.record_sampled_gaussian(0.02, 1.0, steps=50)
        >>> ledger.record_pure(0.1, label="svt")
        >>> ledger.steps, len(ledger.events)
        (50, 2)
    """

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._carried: list[dict[str, Any]] = []  # spent on the same data by earlier runs (a ledger store's)
        self.revision = 0  # bumped on every change: lets callers cache what they computed from the events

    # ---------------------------------------------------------------- recording
    def _append(self, event: dict[str, Any]) -> None:
        self.revision += 1
        counter = _KINDS[event["kind"]]
        if self._events:
            last = self._events[-1]
            if {k: v for k, v in last.items() if k != counter} == {k: v for k, v in event.items() if k != counter}:
                last[counter] += event[counter]
                return
        self._events.append(event)

    def record_sampled_gaussian(self, sample_rate: float, noise_multiplier: float, steps: int = 1) -> None:
        """Record ``steps`` DP-SGD steps: Poisson sampling with rate ``q`` then Gaussian noise ``sigma * C``.

        Args:
            sample_rate: Poisson sampling probability ``q`` in (0, 1].
            noise_multiplier: noise std divided by the clipping norm (``sigma``), > 0.
            steps: number of optimizer steps (empty batches count: they still release noise).
        """
        q = check_positive("sample_rate", sample_rate)
        if q > 1.0:
            raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")
        sigma = check_positive("noise_multiplier", noise_multiplier)
        n = _check_count("steps", steps)
        self._append({"kind": "sampled_gaussian", "sample_rate": q, "noise_multiplier": sigma, "steps": n})

    def record_gaussian(self, noise_multiplier: float, count: int = 1) -> None:
        """Record ``count`` releases of the (un-subsampled) Gaussian mechanism with L2 sensitivity 1 and std sigma."""
        sigma = check_positive("noise_multiplier", noise_multiplier)
        n = _check_count("count", count)
        self._append({"kind": "gaussian", "noise_multiplier": sigma, "count": n})

    def record_pure(self, epsilon: float, label: str = "", count: int = 1) -> None:
        """Record ``count`` pure ``epsilon``-DP releases (Laplace mechanism, sparse vector technique, ...)."""
        eps = check_positive("epsilon", epsilon)
        n = _check_count("count", count)
        self._append({"kind": "pure", "epsilon": eps, "label": str(label), "count": n})

    def record_skellam(self, l1: float, l2: float, variance: float, count: int = 1) -> None:
        """Record ``count`` Skellam releases (sensitivities ``l1``, ``l2``; per-coordinate noise ``variance``)."""
        self._append({"kind": "skellam", "l1": check_positive("l1", l1), "l2": check_positive("l2", l2),
                      "variance": check_positive("variance", variance), "count": _check_count("count", count)})

    def record(self, event: PrivacyEvent) -> None:
        """Record one event object (:class:`SampledGaussianEvent`, :class:`GaussianEvent` or :class:`PureEvent`)."""
        if isinstance(event, SampledGaussianEvent):
            self.record_sampled_gaussian(event.sample_rate, event.noise_multiplier, event.steps)
        elif isinstance(event, GaussianEvent):
            self.record_gaussian(event.noise_multiplier, event.count)
        elif isinstance(event, PureEvent):
            self.record_pure(event.epsilon, event.label, event.count)
        elif isinstance(event, SkellamEvent):
            self.record_skellam(event.l1, event.l2, event.variance, event.count)
        else:
            raise PrivacyConfigError(f"unknown privacy event {event!r}; the ledger refuses what it cannot account.")

    def copy(self) -> PrivacyLedger:
        """An independent ledger with the same events (for trial accounting)."""
        out = PrivacyLedger()
        out._events = copy.deepcopy(self._events)
        out._carried = copy.deepcopy(self._carried)
        return out

    def carry(self, events: list[dict[str, Any]]) -> None:
        """Compose every epsilon with ``events`` released on the same data by earlier runs (validated like a
        checkpoint's events). They are kept apart from this run's events: :attr:`events` and :attr:`steps` stay
        the run's own, :meth:`epsilon` covers both."""
        self._carried = _validated(events)
        self.revision += 1

    @property
    def carried(self) -> list[dict[str, Any]]:
        """A copy of the events carried from earlier runs on the same data."""
        return copy.deepcopy(self._carried)

    def epsilon_with(
        self, events: list[PrivacyEvent] | tuple[PrivacyEvent, ...], delta: float, accountant: str = "rdp"
    ) -> float:
        """Epsilon the ledger would report after also recording ``events`` (the ledger itself is not changed)."""
        if not events:
            return self.epsilon(delta, accountant)
        trial = self.copy()
        for event in events:
            trial.record(event)
        return trial.epsilon(delta, accountant)

    # ---------------------------------------------------------------- queries
    @property
    def events(self) -> list[dict[str, Any]]:
        """A copy of the recorded events, oldest first."""
        return copy.deepcopy(self._events)

    def without_trailing_steps(self, sample_rate: float, noise_multiplier: float) -> tuple[tuple, int]:
        """``(key, steps)``: a hashable summary of every event except a trailing run of DP-SGD steps at exactly
        ``(sample_rate, noise_multiplier)``, and the length of that run (0 when the last event is anything else).

        While only such steps are recorded, the key stays the same and ``steps`` grows; any other change (another
        event, steps at other settings) changes the key.
        """
        events = self._events
        last = events[-1] if events else None
        if (
            last is not None
            and last["kind"] == "sampled_gaussian"
            and last["sample_rate"] == sample_rate
            and last["noise_multiplier"] == noise_multiplier
        ):
            head, steps = [*self._carried, *events[:-1]], int(last["steps"])
        else:
            head, steps = [*self._carried, *events], 0
        return tuple(tuple(sorted(e.items())) for e in head), steps

    @property
    def steps(self) -> int:
        """Cumulative number of sampled-Gaussian (DP-SGD) steps."""
        return sum(e["steps"] for e in self._events if e["kind"] == "sampled_gaussian")

    def _gaussian_history(self) -> list[tuple[float, float, int]]:
        """Gaussian events as Opacus' ``(noise_multiplier, sample_rate, steps)`` history (q = 1 if not sampled)."""
        out = []
        for e in [*self._carried, *self._events]:
            if e["kind"] == "sampled_gaussian":
                out.append((e["noise_multiplier"], e["sample_rate"], e["steps"]))
            elif e["kind"] == "gaussian":
                out.append((e["noise_multiplier"], 1.0, e["count"]))
        return out

    def _gaussian_rdp(self, orders: list[float]) -> np.ndarray:
        rdp = np.zeros(len(orders))
        for sigma, q, n in self._gaussian_history():
            rdp = rdp + n * _unit_rdp(q, sigma, tuple(orders))
        return rdp

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent so far at ``delta`` (0.0 for an empty ledger).

        Args:
            delta: target delta in (0, 1).
            accountant: ``"rdp"`` or ``"prv"``.

        Raises:
            PrivacyConfigError: bad ``delta``/``accountant``, or ``"prv"`` asked for a ledger with pure events.
        """
        delta = _check_delta(delta)
        _check_accountant(accountant)
        if not self._events and not self._carried:
            return 0.0
        pure = [(e["epsilon"], e["count"]) for e in [*self._carried, *self._events] if e["kind"] == "pure"]
        history = self._gaussian_history()
        skellam = [e for e in [*self._carried, *self._events] if e["kind"] == "skellam"]
        if accountant == "prv":
            if pure or skellam:
                raise PrivacyConfigError(
                    f"the PRV accountant cannot account for pure epsilon-DP events ({len(pure)} recorded, e.g. "
                    f"SVT/Laplace releases) or Skellam releases ({len(skellam)}, distributed DP); use accountant='rdp'."
                )
            prv = PRVAccountant()
            prv.history = list(history)
            with np.errstate(divide="ignore", invalid="ignore"):
                return float(prv.get_epsilon(delta=delta))
        orders = RDP_ORDERS
        alphas = np.asarray(orders)
        gauss_rdp = self._gaussian_rdp(orders) + np.asarray(
            [sum(e["count"] * skellam_rdp(a, e["l1"], e["l2"], e["variance"]) for e in skellam) for a in orders]
        )  # the RDP mechanisms: DP-SGD, Gaussian releases, Skellam
        pure_rdp = np.zeros(len(orders))
        for eps, n in pure:
            pure_rdp = pure_rdp + n * np.minimum(eps, alphas * eps**2 / 2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps_all, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=gauss_rdp + pure_rdp, delta=delta)
            if not pure:
                return float(eps_all)
            eps_gauss = 0.0
            if history or skellam:
                eps_gauss, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=gauss_rdp, delta=delta)
        basic = float(eps_gauss) + sum(eps * n for eps, n in pure)
        return float(min(float(eps_all), basic))

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Events as plain JSON-serialisable data."""
        return {"version": 1, "events": self.events, "carried": self.carried}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace the ledger's events (and carried events) by those of ``state_dict`` (validated: a corrupt ledger
        fails closed)."""
        if not isinstance(state_dict, dict) or "events" not in state_dict:
            raise PrivacyConfigError(f"ledger state_dict must be a dict with key 'events', got {state_dict!r:.200}.")
        self._events = _validated(state_dict["events"])
        self._carried = _validated(state_dict.get("carried", []))
        self.revision += 1

    def __repr__(self) -> str:
        return f"PrivacyLedger(events={len(self._events)}, steps={self.steps})"


@functools.lru_cache(maxsize=256)
def _unit_rdp(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one sampled-Gaussian step at each order (``compute_rdp`` is linear in the number of steps, so a ledger
    of ``n`` steps costs ``n`` times this; cached because the series for fractional orders is slow)."""
    rdp = np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))
    rdp.setflags(write=False)
    return rdp


def _validated(events: Any) -> list[dict[str, Any]]:
    """``events`` (plain dicts from a checkpoint or a ledger store) re-recorded into a fresh ledger, so every value
    passes the same checks as a live release; anything else is refused."""
    if not isinstance(events, list):
        raise PrivacyConfigError(f"ledger events must be a list, got {type(events).__name__}.")
    fresh = PrivacyLedger()
    for e in events:
        kind = e.get("kind") if isinstance(e, dict) else None
        try:
            if kind == "sampled_gaussian":
                fresh.record_sampled_gaussian(e["sample_rate"], e["noise_multiplier"], e["steps"])
            elif kind == "gaussian":
                fresh.record_gaussian(e["noise_multiplier"], e["count"])
            elif kind == "pure":
                fresh.record_pure(e["epsilon"], e.get("label", ""), e["count"])
            elif kind == "skellam":
                fresh.record_skellam(e["l1"], e["l2"], e["variance"], e["count"])
            else:
                raise PrivacyConfigError(f"unknown ledger event {e!r:.200}.")
        except KeyError as exc:
            raise PrivacyConfigError(f"ledger event {e!r:.200} lacks {exc}.") from None
    return fresh._events
