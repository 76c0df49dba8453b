"""One epsilon budget per site, over every mechanism the site uses, composed in the site's one ledger.

A site may release privately in three ways: DP-SGD steps (Poisson-subsampled Gaussian), Gaussian noise on the whole
update, and the sparse vector technique (pure epsilon-DP). Each of them asks the site's :class:`PrivacyBudget` before
it releases anything, and the budget answers with the ledger's composition of *everything* recorded so far plus what
is asked for. Nothing is released that would take epsilon past the budget, whichever mechanism asks and whatever
fails.

Releases made once per round (an SVT or Gaussian filter on the outgoing update) are **reserved** when the filter is
built: DP-SGD then never takes a step that would leave no room for the end-of-round release, so a round cut short by
the budget can still send what it trained, through the same filters. A configuration whose reserved releases alone
exceed the budget is refused at construction.

Example:
    >>> budget = PrivacyBudget(limit=7.08, delta=1e-5)
    >>> budget.reserve("svt", PureEvent(1.0, "svt"))
    >>> budget.max_steps(sample_rate=0.04, noise_multiplier=1.0) > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyEvent,
    PrivacyLedger,
    SampledGaussianEvent,
    check_accountant_supports,
)

__all__ = ["BUDGET_POLICIES", "PrivacyBudget", "StopPolicy"]


class StopPolicy(str, Enum):
    """What happens when a site's privacy budget runs out (``--budget-policy``)."""

    STOP_SITE = "stop_site"  #: the site leaves, the others go on
    STOP_FEDERATION = "stop_federation"  #: the federation ends after that round
    RAISE = "raise"  #: the budget handler raises (a bundle run on its own)

    @classmethod
    def of(cls, value: object) -> StopPolicy | None:
        """The policy named by ``value`` (as a site reports it), or ``None`` for anything else."""
        try:
            return cls(value)
        except ValueError:
            return None


BUDGET_POLICIES = tuple(p.value for p in StopPolicy)
_MAX_STEPS = 10**9


class PrivacyBudget:
    """A site's epsilon budget over DP-SGD steps, Gaussian update releases and SVT releases.

    Args:
        ledger: the site's ledger for the whole run (a new one when ``None``); every mechanism records into it.
        limit: the epsilon budget, a finite number > 0, or ``None`` to account without a limit (DP-SGD only; the
            update filters refuse a budget without a limit).
        delta: target delta in (0, 1) of every reported epsilon.
        accountant: ``"rdp"`` (valid for every mix) or ``"prv"`` (Gaussian mechanisms only; refused as soon as a
            pure-DP mechanism is reserved).
        policy: what the federation does once the site is exhausted: ``"stop_site"``, ``"stop_federation"`` or
            ``"raise"``.
    """

    def __init__(
        self,
        ledger: PrivacyLedger | None = None,
        limit: float | None = None,
        delta: float = 1e-5,
        accountant: str = "rdp",
        policy: str = "stop_site",
    ) -> None:
        if ledger is not None and not isinstance(ledger, PrivacyLedger):
            raise PrivacyConfigError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}.")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < math.inf
        ):
            raise PrivacyConfigError(f"epsilon budget must be a finite number > 0 or None, got {limit!r}.")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}.")
        if accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
        if policy not in BUDGET_POLICIES:
            raise PrivacyConfigError(f"budget policy must be one of {BUDGET_POLICIES}, got {policy!r}.")
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        self.limit = None if limit is None else float(limit)
        self.delta = float(delta)
        self.accountant = accountant
        self.policy = policy
        self.reserved: dict[str, PrivacyEvent] = {}
        self.exhausted = False
        self.stop_reason: str | None = None
        self._steps_cache: tuple[Any, int] | None = None
        self._epsilon_memo: tuple[int, dict[tuple[PrivacyEvent, ...], float]] = (-1, {})

    # ---------------------------------------------------------------- configuration
    def reserve(self, name: str, event: PrivacyEvent, hint: str | None = None) -> None:
        """Reserve room for a release made once at the end of every round (an update filter's); ``hint`` says how
        the filter's own settings lower its cost (in a refusal).

        Raises:
            PrivacyConfigError: the accountant cannot account for the event, or one round of the reserved releases
                alone would exceed the budget.
        """
        check_accountant_supports(self.accountant, [*self.reserved.values(), event])
        reserved = {**self.reserved, name: event}
        if self.limit is not None:
            cost = PrivacyLedger().epsilon_with(list(reserved.values()), self.delta, self.accountant)
            if cost > self.limit:
                how = hint or "lower the filters' epsilon"
                raise PrivacyConfigError(
                    f"one round of the update releases {sorted(reserved)} costs epsilon {cost:.4g} at delta "
                    f"{self.delta:g}, more than the whole budget {self.limit:g}; raise the budget (--epsilon-budget, "
                    f"id privacy_epsilon_budget) or {how}."
                )
        self.reserved = reserved
        self._steps_cache = None

    def require_limit(self, who: str) -> None:
        """Refuse to build ``who`` on a budget without a limit (a release that no budget can stop fails open)."""
        if self.limit is None:
            raise PrivacyConfigError(
                f"{who} needs a finite epsilon budget (--epsilon-budget, or the bundle id 'privacy_epsilon_budget'): "
                f"without one its releases compose without bound."
            )

    # ---------------------------------------------------------------- queries
    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta`, over every recorded release."""
        return self.epsilon_with(())

    def epsilon_with(self, events: Sequence[PrivacyEvent]) -> float:
        """Epsilon after also releasing ``events`` (nothing is recorded).

        Remembered until the ledger changes: the per-iteration budget check of a site without DP-SGD, and the
        reports of every filter in a round, ask the same question of the same ledger.
        """
        if self._epsilon_memo[0] != self.ledger.revision:
            self._epsilon_memo = (self.ledger.revision, {})
        key = tuple(events)
        memo = self._epsilon_memo[1]
        if key not in memo:
            memo[key] = self.ledger.epsilon_with(list(events), self.delta, self.accountant)
        return memo[key]

    def allows(self, events: Sequence[PrivacyEvent], reserve: bool = True) -> bool:
        """Whether releasing ``events`` (and, with ``reserve``, one more round of the reserved releases) stays within
        the budget."""
        if self.limit is None:
            return True
        extra = [*events, *(self.reserved.values() if reserve else ())]
        return self.epsilon_with(extra) <= self.limit

    def max_steps(self, sample_rate: float, noise_multiplier: float) -> int:
        """How many more DP-SGD steps fit in the budget while leaving room for the reserved end-of-round releases.

        Cached: recomputed only when the ledger gains something other than these steps, so a check per iteration
        costs a comparison.
        """
        if self.limit is None:
            return _MAX_STEPS
        history, taken = self.ledger.without_trailing_steps(sample_rate, noise_multiplier)
        key = (sample_rate, noise_multiplier, tuple(self.reserved.items()), history)
        if self._steps_cache is not None and self._steps_cache[0] == key:
            return max(0, self._steps_cache[1] - taken)
        step = SampledGaussianEvent(sample_rate, noise_multiplier)

        def fits(n: int) -> bool:
            if n == 0:
                return self.allows([])
            return self.allows([SampledGaussianEvent(step.sample_rate, step.noise_multiplier, n)])

        if not fits(0):
            best = 0
        else:
            lo, hi = 0, 1
            while hi < _MAX_STEPS and fits(hi):
                lo, hi = hi, hi * 2
            hi = min(hi, _MAX_STEPS)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
            best = lo
        self._steps_cache = (key, best + taken)
        return best

    def step_fits(self, sample_rate: float, noise_multiplier: float) -> bool:
        """Whether one more DP-SGD step fits (see :meth:`max_steps`); if not, the site is exhausted with the reason.
        Asked before every iteration (to stop the engine) and again inside every step (to refuse it)."""
        if self.max_steps(sample_rate, noise_multiplier) >= 1:
            return True
        self.exhaust(
            f"the next DP-SGD step would take epsilon past the budget {self.limit:g}"
            + (" (room kept for the round's update release)" if self.reserved else "")
        )
        return False

    # ---------------------------------------------------------------- spending
    def record(self, event: PrivacyEvent) -> None:
        """Record a release already checked by the caller (DP-SGD's step guard checks with :meth:`max_steps`)."""
        self.ledger.record(event)

    def release(self, event: PrivacyEvent, who: str) -> None:
        """Check and record one release; refuse it (and exhaust the site) if it would pass the budget.

        Raises:
            PrivacyBudgetExceeded: the release is not made; the caller must not send what it protects.
        """
        if not self.allows([event], reserve=False):
            after = self.epsilon_with([event])
            self.exhaust(f"{who} would take epsilon to {after:.4f} > budget {self.limit:g}")
            raise PrivacyBudgetExceeded(f"{who}: release refused, epsilon would reach {after:.4f} > {self.limit:g}.")
        self.ledger.record(event)

    def exhaust(self, reason: str) -> None:
        """Mark the site as out of budget (its training and releases stop under :attr:`policy`)."""
        if not self.exhausted:
            self.exhausted = True
            self.stop_reason = reason

    # ---------------------------------------------------------------- reporting and checkpointing
    def facts(self) -> dict[str, Any]:
        """What the site reports with every update and in ``metrics.json``."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "accountant": self.accountant,
            "budget": self.limit,
            "exhausted": self.exhausted,
            "policy": self.policy,
            "steps": self.ledger.steps,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.state_dict(),
            "exhausted": self.exhausted,
            "stop_reason": self.stop_reason,
            "limit": self.limit,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the ledger *in place* (every mechanism keeps recording into the same object)."""
        missing = {"ledger", "exhausted"} - set(state)
        if missing:
            raise PrivacyConfigError(f"privacy budget state lacks {sorted(missing)}.")
        self.ledger.load_state_dict(state["ledger"])
        self.exhausted = bool(state["exhausted"])
        self.stop_reason = state.get("stop_reason")
        self._steps_cache = None

    def __repr__(self) -> str:
        return f"PrivacyBudget(limit={self.limit}, epsilon={self.epsilon():.4g}, exhausted={self.exhausted})"

