"""One site's federated round, the same for every transport's site loop (the in-process simulator's and the NVIDIA
FLARE client's): resume the site's engine until its sync handler has sent the update, roll back a site whose
training raised, and let a site out of privacy budget send the steps it took and stop."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from monai_fedpriv.fl.server.records import mean

if TYPE_CHECKING:
    from monai_fedpriv.fl.simulator.site import SiteRuntime

__all__ = ["train_round"]

logger = logging.getLogger("monai_fedpriv.simulator")


def _stop_text(site: SiteRuntime) -> str:
    facts = site.privacy_facts() or {}
    reason = facts.get("stop_reason")
    return "privacy budget exhausted" + (f": {reason}" if reason else "")


def train_round(
    site: SiteRuntime,
    rnd: int,
    transport: Any,
    snapshot: Mapping[str, Any],
    max_epochs: int,
    evaluator: Any = None,
) -> tuple[dict[str, Any], bool, str | None]:
    """Train one site for one round, as every transport's site loop does (the simulator's, the NVFlare client's).

    The site's engine is resumed until its sync handler has sent the round's update. A site whose training raises is
    rolled back to ``snapshot`` (its ledger kept as spent) and reported as failed; a site that ran out of privacy
    budget sends the steps it took (post-processing) and stops.

    Args:
        site: the site.
        rnd: the 1-based round (for messages).
        transport: anything with ``has_update(site name)``.
        snapshot: the site's state at the start of the round.
        max_epochs: the engine's epoch limit (to restore it on rollback).
        evaluator: scores the site's local model on its own validation cases (``DiceEvaluator``), or ``None``.

    Returns:
        ``(result entry, whether the site is expected to answer, failure reason or None)``.
    """
    name = site.name
    try:
        site.run_round()
    except Exception as exc:  # noqa: BLE001 - any failure of a site's training is that site's, not the run's
        if site.exhausted_budgets():  # a release refused by the budget: the site stops, nothing was sent
            site.release_engine()
            site.active = False
            return {"stopped": _stop_text(site), "privacy": site.privacy_facts()}, False, None
        logger.warning(f"{name}: training raised in round {rnd}: {type(exc).__name__}: {exc}")
        site.rollback(snapshot, max_epochs)
        return {}, True, f"training raised {type(exc).__name__}: {exc}"
    sent = transport.has_update(name)
    result: dict[str, Any] = {}
    if not sent and site.exhausted_budgets():
        result["stopped"] = _stop_text(site)
        logger.warning(f"{name}: {result['stopped']} in round {rnd}; it leaves the federation.")
        try:
            sent = site.sync.send_partial_round(site.trainer)  # steps taken before the stop: send their result
        except Exception as exc:  # noqa: BLE001 - a filter refused: nothing was sent
            logger.warning(f"{name}: the partial round could not be sent: {exc}")
    elif not sent:
        site.active = False
        return {"stopped": "sent no update"}, True, "the site's trainer ended without sending an update"
    if sent:
        result["loss"] = mean(site.losses)
        if evaluator is not None:
            result["dice"] = evaluator(site.trainer.network)["dice"]
    else:
        result["privacy"] = site.privacy_facts()  # a stopped site still reports what it has spent
    if "stopped" in result:
        site.active = False
    return result, sent, None
