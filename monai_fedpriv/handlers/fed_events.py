"""The Ignite events a federated site fires, so that method handlers (FedProx's proximal term, audits, trackers)
attach to a trainer without reaching into :class:`~monai_fedpriv.handlers.FederatedSync`.

* ``GLOBAL_MODEL_RECEIVED``: the site has loaded a global model; ``engine.state.fed_global`` is the
  :class:`~monai_fedpriv.fl.update.GlobalModel` (its ``weights`` detached, the site's own copy) and
  ``engine.state.fed_instruction`` the :class:`~monai_fedpriv.fl.messages.RoundInstruction` the strategy gave this
  site for the round.
* ``UPDATE_BUILT``: the round's update has passed the site's filter chain and is about to be sent;
  ``engine.state.fed_update`` is the :class:`~monai_fedpriv.fl.update.ModelUpdate` as it leaves.

Example::

    @trainer.on(FedEvents.GLOBAL_MODEL_RECEIVED)
    def note(engine):
        print(engine.state.fed_global.round, engine.state.fed_instruction.prox_mu)
"""

from __future__ import annotations

from ignite.engine import Engine, EventEnum

__all__ = ["FedEvents", "register_fed_events"]


class FedEvents(EventEnum):
    """Events of a federated site (registered on the trainer by ``FederatedSync.attach``)."""

    GLOBAL_MODEL_RECEIVED = "fed_global_model_received"
    UPDATE_BUILT = "fed_update_built"


def register_fed_events(engine: Engine) -> None:
    """Make ``engine`` know :class:`FedEvents` (every handler that fires or listens calls it; once is enough)."""
    missing = [e for e in FedEvents if not engine.has_registered_events(e)]
    if missing:
        engine.register_events(*missing)
