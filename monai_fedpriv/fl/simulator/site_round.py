"""One site's federated round, the same for every transport's site loop (the in-process simulator's and the NVIDIA
FLARE client's): resume the site's engine until its sync handler has sent the update, roll back a site whose
training raised, and let a site out of privacy budget send the steps it took and stop.

A round timeout (``simulate --round-timeout``) works as NVIDIA FLARE's server does: a site that has not sent its
update within the timeout is rejected for the round with the reason, and the round aggregates the others. The
in-process sites train one after another, so each gets the timeout as wall time of its own, measured from the start
of its round: its engine is stopped at the first iteration boundary past it, or, when the round ended before the
next boundary, its update (sent late) is refused after the fact. Either way the site returns to its state at the
start of the round with its privacy ledger kept as spent, as a site whose training raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ignite.engine import Events

from monai_fedpriv.fl.server.records import mean

if TYPE_CHECKING:
    from monai_fedpriv.fl.simulator.site import SiteRuntime

__all__ = ["RoundTimeout", "timeout_reason", "train_round"]

logger = logging.getLogger("monai_fedpriv.simulator")


class RoundTimeout(RuntimeError):
    """A site's round ran past the round's timeout (raised at an iteration boundary to stop its engine)."""


def timeout_reason(seconds: float) -> str:
    """Why a site that did not answer in time is rejected (the words of the NVIDIA FLARE controller)."""
    return f"no answer within the round's timeout ({seconds:g} s)"


@contextmanager
def _deadline(engine: Any, seconds: float | None) -> Iterator[Any]:
    """Stop ``engine`` (raise :class:`RoundTimeout`) at the first iteration boundary ``seconds`` after entering;
    yields the ``time.monotonic()`` start."""
    start = time.monotonic()
    if not seconds:
        yield start
        return

    def check(_: Any) -> None:
        if time.monotonic() - start > seconds:
            raise RoundTimeout(timeout_reason(seconds))

    engine.add_event_handler(Events.ITERATION_COMPLETED, check)
    try:
        yield start
    finally:
        engine.remove_event_handler(check, Events.ITERATION_COMPLETED)


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
    timeout: float | None = None,
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
        timeout: seconds of wall time the site has to send its update (``None`` or 0: no limit; see the module
            docstring). A site past it is rolled back and reported as failed with :func:`timeout_reason`; an update
            it sent stays in the transport for the server to record (never aggregated: the site failed).

    Returns:
        ``(result entry, whether the site is expected to answer, failure reason or None)``.
    """
    name = site.name
    try:
        with _deadline(site.trainer, timeout) as start:
            site.run_round()
        if timeout and time.monotonic() - start > timeout:
            raise RoundTimeout(timeout_reason(timeout))
    except RoundTimeout as exc:
        logger.warning(f"{name}: round {rnd} stopped: {exc}")
        site.rollback(snapshot, max_epochs)
        return {"privacy": site.privacy_facts()} if site.budgets else {}, True, str(exc)
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
