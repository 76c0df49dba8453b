"""Stop a site's DP-SGD training before its epsilon would pass the budget, and report the spend with each update.

Seed 000 (Table 1) aborts training when the privacy loss reaches the regime's epsilon. Here the check runs *before*
every iteration: if one more sampled-Gaussian step would take epsilon past the budget, the engine terminates
before the step and :attr:`PrivacyBudgetHandler.exhausted` is set, so the budget is never exceeded. As a second
line of defence, the DP optimizer's step hook is wrapped so that a step that would pass the budget raises
:class:`~monai_fedpriv.errors.PrivacyBudgetExceeded` before the weights change, whoever calls ``step()``.

The same object is an update filter (``update -> update`` with ``meta["privacy"]``) for ``FederatedSync``.
``policy`` tells the federation what to do once a site is exhausted: ``"stop_site"`` (continue without it),
``"stop_federation"`` (end the run) or ``"raise"`` (raise ``PrivacyBudgetExceeded`` from the handler).

Example:
    >>> ledger = PrivacyLedger()
    >>> budget = PrivacyBudgetHandler(ledger, budget=7.08, delta=1e-5)
    >>> budget.attach(trainer)  # doctest: +SKIP
    >>> update = budget(update)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from ignite.engine import Engine, Events

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.accounting import ACCOUNTANTS, PrivacyLedger

__all__ = ["PrivacyBudgetHandler", "BUDGET_POLICIES"]

BUDGET_POLICIES = ("stop_site", "stop_federation", "raise")


class PrivacyBudgetHandler:
    """Budget stop (Ignite handler) and privacy reporter (update filter) for one site.

    Args:
        ledger: the site's ledger, shared with the DP optimizer (``make_site_private(..., ledger=ledger)``).
        budget: epsilon budget, > 0, or ``None`` to only report.
        delta: target delta in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.
        policy: one of :data:`BUDGET_POLICIES`.
        sample_rate, noise_multiplier, max_grad_norm: the DP-SGD settings used to predict the next step. When
            ``None`` they are read from the attached engine's optimizer (``make_site_private`` sets them).
    """

    def __init__(
        self,
        ledger: PrivacyLedger,
        budget: float | None,
        delta: float,
        accountant: str = "rdp",
        policy: str = "stop_site",
        sample_rate: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(ledger, PrivacyLedger):
            raise PrivacyConfigError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}.")
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf
        ):
            raise PrivacyConfigError(f"budget must be a finite number > 0 or None, got {budget!r}.")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}.")
        if accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
        if policy not in BUDGET_POLICIES:
            raise PrivacyConfigError(f"policy must be one of {BUDGET_POLICIES}, got {policy!r}.")
        self.ledger = ledger
        self.budget = None if budget is None else float(budget)
        self.delta = float(delta)
        self.accountant = accountant
        self.policy = policy
        self.sample_rate = sample_rate
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.exhausted = False
        self._optimizer: Any = None

    # ---------------------------------------------------------------- late binding
    def set_optimizer(self, optimizer: Any) -> None:
        """Bind the DP optimizer (done by :meth:`attach` from ``engine.optimizer``) and guard its step hook."""
        self._optimizer = optimizer
        hook = getattr(optimizer, "step_hook", None)
        if hook is None or getattr(hook, "_budget_guard", None) is self:
            return

        def guarded(opt: Any) -> None:
            if self.budget is not None and self._epsilon_after_step() > self.budget:
                self._exhaust()
                raise PrivacyBudgetExceeded(
                    f"one more step would take epsilon to {self._epsilon_after_step():.4f} > budget {self.budget}."
                )
            hook(opt)

        guarded._budget_guard = self  # type: ignore[attr-defined]
        optimizer.attach_step_hook(guarded)

    def _settings(self) -> tuple[float | None, float | None, float | None]:
        opt = self._optimizer
        q = self.sample_rate if self.sample_rate is not None else getattr(opt, "sample_rate", None)
        sigma = self.noise_multiplier if self.noise_multiplier is not None else getattr(opt, "noise_multiplier", None)
        clip = self.max_grad_norm if self.max_grad_norm is not None else getattr(opt, "max_grad_norm", None)
        if q is None or sigma is None:  # fall back on the last recorded DP-SGD step
            last = [e for e in self.ledger.events if e["kind"] == "sampled_gaussian"]
            if last:
                q = last[-1]["sample_rate"] if q is None else q
                sigma = last[-1]["noise_multiplier"] if sigma is None else sigma
        return q, sigma, clip

    # ---------------------------------------------------------------- Ignite handler
    def attach(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            raise PrivacyConfigError(
                "DP-SGD cannot run with the trainer's amp=True: its GradScaler multiplies the loss, so per-sample "
                "gradients would be clipped at the scaled norm and the noised update never unscaled. Set amp=False."
            )
        optimizer = getattr(engine, "optimizer", None)
        if self._optimizer is None and optimizer is not None:
            self.set_optimizer(optimizer)
        if not engine.has_event_handler(self, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.delta, self.accountant)

    def _epsilon_after_step(self) -> float:
        q, sigma, _ = self._settings()
        if q is None or sigma is None:
            raise PrivacyConfigError(
                "cannot predict the next step's epsilon: pass sample_rate and noise_multiplier, or attach to an "
                "engine whose optimizer comes from make_site_private."
            )
        trial = copy.deepcopy(self.ledger)
        trial.record_sampled_gaussian(q, sigma)
        return trial.epsilon(self.delta, self.accountant)

    def _exhaust(self) -> None:
        self.exhausted = True

    def __call__(self, arg: Engine | ModelUpdate) -> Any:
        if isinstance(arg, ModelUpdate):
            return self.filter(arg)
        engine = arg
        if self.budget is None:
            return None
        if self.exhausted or self._epsilon_after_step() > self.budget:
            self._exhaust()
            engine.terminate()
            if self.policy == "raise":
                raise PrivacyBudgetExceeded(
                    f"site budget epsilon={self.budget} reached at {self.ledger.steps} DP steps "
                    f"(epsilon now {self.epsilon():.4f})."
                )
        return None

    # ---------------------------------------------------------------- update filter
    def privacy_facts(self) -> dict[str, Any]:
        q, sigma, clip = self._settings()
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": sigma,
            "max_grad_norm": clip,
            "sample_rate": q,
            "steps": self.ledger.steps,
            "accountant": self.accountant,
            "budget": self.budget,
            "exhausted": self.exhausted,
            "policy": self.policy,
        }

    def filter(self, update: ModelUpdate) -> ModelUpdate:
        """A copy of ``update`` with ``meta["privacy"]`` filled in (the input is not modified)."""
        meta = copy.deepcopy(update.meta)
        meta["privacy"] = {**meta.get("privacy", {}), **self.privacy_facts()}
        return dataclasses.replace(update, meta=meta)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "exhausted": self.exhausted, "budget": self.budget}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the ledger *in place* (the DP optimizer keeps recording into the same object)."""
        missing = {"ledger", "exhausted"} - set(state_dict)
        if missing:
            raise PrivacyConfigError(f"budget state_dict lacks {sorted(missing)}.")
        self.ledger.load_state_dict(state_dict["ledger"])
        self.exhausted = bool(state_dict["exhausted"])
