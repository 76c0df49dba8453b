"""The site's privacy budget as an Ignite handler (stop training before the budget would pass, log epsilon) and as
the update filter that reports the site's privacy with every update.

Seed 000 (Table 1) aborts training when the privacy loss reaches the regime's epsilon. Here the check runs *before*
every iteration, against the site's one :class:`~monai_fedpriv.privacy.budget.PrivacyBudget`: when the next DP-SGD
step would leave no room for the round's reserved releases (an SVT or Gaussian filter on the update), or, without
DP-SGD, when the round's releases themselves would not fit, the engine terminates before the step and the site is
exhausted. The DP optimizer's own step guard (:mod:`monai_fedpriv.privacy.dp_sgd`) is the second line of defence.

``policy`` tells the federation what to do with an exhausted site: ``"stop_site"`` (continue without it),
``"stop_federation"`` (end the run) or ``"raise"`` (raise ``PrivacyBudgetExceeded`` from the handler).

Example:
    >>> budget = PrivacyBudget(limit=7.08, delta=1e-5)
    >>> handler = PrivacyBudgetHandler(budget)
    >>> handler.attach(trainer)  # doctest: +SKIP
    >>> update = handler(update)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ignite.engine import Engine, Events

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters.base import meta_with_privacy, privacy_meta
from monai_fedpriv.privacy.noise import noise_source

__all__ = ["UPDATE_UNIT", "PrivacyBudgetHandler"]

logger = logging.getLogger("monai_fedpriv.privacy")

#: the unit of a release by an update filter alone (SVT, Gaussian): the site's whole update, so its whole data set
UPDATE_UNIT = {
    "privacy_unit": "update",
    "unit_note": "epsilon is per site update: each release protects the site's whole update, so its whole data set "
    "at once, every patient together, not one slice or patient within it",
}


def epoch_logger() -> logging.Logger:
    """The per-epoch epsilon log: stdout at INFO, set up as MONAI sets up its ``StatsHandler`` logger."""
    from monai.apps import get_logger

    return get_logger("monai_fedpriv.privacy.epochs")


class PrivacyBudgetHandler:
    """Budget stop and epsilon log (Ignite handler) and privacy reporter (update filter) of one site.

    Args:
        budget: the site's :class:`PrivacyBudget`, shared with DP-SGD and the update filters.
        noise_seed: the seed every noise generator of the site derives from, or ``None`` when they are seeded from
            OS entropy; only reported (``noise_source``).
        site: name used in log lines.
        log_epochs: print the site's epsilon at the end of every epoch (to stdout, like MONAI's ``StatsHandler``);
            the simulator turns it off and prints one line per round instead.
    """

    def __init__(
        self, budget: PrivacyBudget, noise_seed: int | None = None, site: str = "site", log_epochs: bool = True
    ) -> None:
        if not isinstance(budget, PrivacyBudget):
            raise PrivacyConfigError(f"budget must be a PrivacyBudget, got {type(budget).__name__}.")
        self.budget = budget
        self.noise_source = noise_source(noise_seed)
        self.site = str(site)
        self.log_epochs = bool(log_epochs)
        self.store: Any = None  # a LedgerBinding once the site's ledger store is bound (bind_store)

    def bind_store(
        self, store: Any, site: str, run_id: str, cases: list[dict[str, Any]], fresh: bool = False,
        resumed: bool = False,
    ) -> dict[str, Any]:
        """Carry what earlier runs spent on ``cases`` and record every release of this budget in ``store`` (a
        :class:`~monai_fedpriv.privacy.ledger_store.LedgerStore`), so the epsilon spent outlives the run; returns
        the store's facts for ``metrics.json``."""
        self.store = store.bind(self.budget, site, run_id, cases, fresh=fresh, resumed=resumed)
        return self.store.facts()

    def save_ledger(self) -> None:
        """Record the ledger in the bound store now (no-op without one)."""
        if self.store is not None:
            self.store.save()

    # ---------------------------------------------------------------- Ignite handler
    def attach(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            raise PrivacyConfigError(
                "DP-SGD cannot run with the trainer's amp=True: its GradScaler multiplies the loss, so per-sample "
                "gradients would be clipped at the scaled norm and the noised update never unscaled. Set amp=False."
            )
        if engine.has_event_handler(self._before_iteration, Events.ITERATION_STARTED):
            return
        engine.add_event_handler(Events.ITERATION_STARTED, self._before_iteration)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._publish_at_epoch_end)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)
        engine.add_event_handler(Events.TERMINATE, self._log_stop)

    def _dp_settings(self, engine: Engine) -> tuple[float, float] | None:
        opt = getattr(engine, "optimizer", None)
        q, sigma = getattr(opt, "sample_rate", None), getattr(opt, "noise_multiplier", None)
        if q is None or sigma is None:
            return None
        return float(q), float(sigma)

    def _before_iteration(self, engine: Engine) -> None:
        budget = self.budget
        if budget.limit is None and not budget.exhausted:
            return
        dp = self._dp_settings(engine)
        if not budget.exhausted:
            if dp is not None:
                budget.step_fits(*dp)
            elif not budget.allows([]):
                budget.exhaust(f"the round's update release would take epsilon past the budget {budget.limit:g}")
        if budget.exhausted:
            engine.terminate()
            if budget.policy == "raise":
                raise PrivacyBudgetExceeded(f"{self.site}: {budget.stop_reason}.")

    def _publish_at_epoch_end(self, engine: Engine) -> None:
        """After an epoch's last iteration (before any handler's ``EPOCH_COMPLETED``), the epsilon spent so far
        (and the budget) join ``engine.state.metrics`` as ``privacy_epsilon`` (``privacy_budget``): MONAI's own
        ``MLFlowHandler`` / ``TensorBoardStatsHandler`` / ``StatsHandler`` log the epoch's metrics from there, so a
        bundle run with ``--tracking mlflow`` records the site's epsilon in the same run."""
        length = engine.state.epoch_length
        if not length or engine.state.iteration % length:
            return
        engine.state.metrics["privacy_epsilon"] = self.budget.epsilon()
        if self.budget.limit is not None:
            engine.state.metrics["privacy_budget"] = float(self.budget.limit)

    def _log_epoch(self, engine: Engine) -> None:
        if not self.log_epochs:
            return
        budget = self.budget
        limit = "no limit" if budget.limit is None else f"budget {budget.limit:g}"
        message = (
            f"{self.site} epoch {engine.state.epoch}: epsilon {budget.epsilon():.4f} at delta {budget.delta:g} "
            f"({limit}, {budget.ledger.steps} DP-SGD steps, accountant {budget.accountant})"
        )
        epoch_logger().info(message)

    def _log_stop(self, engine: Engine) -> None:
        if self.budget.exhausted:
            logger.warning(
                f"{self.site}: training stopped at iteration {engine.state.iteration} because {self.budget.stop_reason}"
                f"; epsilon {self.budget.epsilon():.4f} at delta {self.budget.delta:g} (policy {self.budget.policy})."
            )

    # ---------------------------------------------------------------- update filter and reporting
    @property
    def exhausted(self) -> bool:
        return self.budget.exhausted

    @property
    def policy(self) -> str:
        return self.budget.policy

    def privacy_facts(self) -> dict[str, Any]:
        """The site's spend and settings, as reported with each update and in ``metrics.json``."""
        facts = self.budget.facts()
        facts["noise_source"] = self.noise_source
        if self.budget.stop_reason:
            facts["stop_reason"] = self.budget.stop_reason
        if self.store is not None:
            facts["carried_epsilon"] = self.store.carried_epsilon
        return facts

    def __call__(self, arg: Engine | ModelUpdate) -> Any:
        if isinstance(arg, ModelUpdate):
            return self.filter(arg)
        self._before_iteration(arg)
        return None

    def filter(self, update: ModelUpdate) -> ModelUpdate:
        """A new update whose ``meta["privacy"]`` holds the site's cumulative epsilon after every release so far."""
        privacy = {**privacy_meta(update), **self.privacy_facts()}
        if privacy.get("dp") and "privacy_unit" not in privacy:  # no DP-SGD unit: the update filter's release is it
            privacy.update(UPDATE_UNIT)
        if self.store is not None:  # the update is about to leave the site: its release outlives the run
            self.store.save()
        return dataclasses.replace(update, meta=meta_with_privacy(update, privacy))

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return self.budget.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget.load_state_dict(state)
