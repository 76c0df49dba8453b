"""Ignite handler that turns a site's MONAI trainer into a federated client."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_fedpriv.fl.instruction import RoundInstruction
from monai_fedpriv.fl.momentum import (
    MOMENTUM_POLICIES,
    export_optimizer_state,
    import_optimizer_state,
    restart_optimizer_state,
    sent_fields,
)
from monai_fedpriv.fl.transport import Transport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate
from monai_fedpriv.fl.weights import exchangeable_state, load_exchangeable_state, subtract
from monai_fedpriv.handlers.fed_events import FedEvents, register_fed_events
from monai_fedpriv.privacy.filters.base import FilterChain

__all__ = ["FederatedSync"]

UpdateFilterFn = Callable[[ModelUpdate], ModelUpdate]


class FederatedSync:
    """Synchronise a site's trainer with the federation every ``every`` local epochs or iterations.

    At the start of the run and after every sync the handler receives the global model from ``transport`` and
    loads it; at every round boundary it sends ``local - global`` with the number of local samples and optimiser
    steps (Li et al. 2019, Algorithm 1, lines 13-15), after passing it through ``filters`` in order (privatizers,
    sparsifiers, reporters, audits) as one :class:`~monai_fedpriv.privacy.filters.FilterChain`. A filter that raises
    stops the run: nothing unfiltered is ever sent. When any filter protects part of the update, every field the
    site sends (the weight delta, and the optimiser moments under ``momentum="aggregate"``) must be covered by a
    filter, or the handler refuses to be built (``PrivacyConfigError``).

    ``local_steps`` counts logical optimiser steps (a step hook on the optimiser): noise-only DP-SGD steps on empty
    Poisson draws count, physical sub-batches of one logical batch do not.

    Every global model carries the strategy's :class:`~monai_fedpriv.fl.instruction.RoundInstruction` for this site:
    when it asks for a number of steps (``local_steps``, or ``whole_batches``: ``floor(n_samples / batch_size)``),
    the round ends after that many logical steps instead of at the ``every``/``unit`` boundary. The handler fires
    :class:`~monai_fedpriv.handlers.fed_events.FedEvents` (``GLOBAL_MODEL_RECEIVED``, ``UPDATE_BUILT``) so that method
    handlers (FedProx's :class:`~monai_fedpriv.handlers.proximal.ProximalTerm`) attach without its internals.

    Args:
        transport: channel to the server (:class:`~monai_fedpriv.fl.transport.Transport`).
        site: this site's name, e.g. ``"site-1"``.
        every: local work per round, in ``unit``.
        unit: ``"epochs"`` or ``"iterations"``.
        momentum: ``"restart"``, ``"local"`` or ``"aggregate"`` (see :mod:`monai_fedpriv.fl.momentum`).
        filters: callables ``ModelUpdate -> ModelUpdate`` applied to the outgoing update.
        n_samples: local training set size; default ``len(engine.data_loader.dataset)``.
        network: the trained network; default ``engine.network`` (late binding, as MONAI handlers do).
        optimizer: its optimiser; default ``engine.optimizer``.
        batch_size: the training batch size (for ``whole_batches`` instructions); default the loader's.

    Example (bundle override ``configs/fed.json``)::

        "fed#sync": {"_target_": "monai_fedpriv.handlers.FederatedSync", "transport": "@fed#transport",
                     "site": "site-1", "every": 1, "unit": "epochs", "momentum": "restart"}
    """

    def __init__(
        self,
        transport: Transport,
        site: str,
        every: int = 1,
        unit: str = "epochs",
        momentum: str = "restart",
        filters: Sequence[UpdateFilterFn] = (),
        n_samples: int | None = None,
        network: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        batch_size: int | None = None,
    ) -> None:
        if not isinstance(transport, Transport):
            raise TypeError(
                f"transport should be a monai_fedpriv Transport, got {type(transport).__name__}: a bundle's fed.json "
                "gets its 'fed_transport' from `monai-fedpriv simulate` (in-process) or from the NVFlare job."
            )
        if unit not in ("epochs", "iterations"):
            raise ValueError(f"unit should be 'epochs' or 'iterations', got {unit!r}.")
        if int(every) < 1:
            raise ValueError(f"every should be a positive number of {unit}, got {every}.")
        if momentum not in MOMENTUM_POLICIES:
            raise ValueError(f"momentum should be one of {MOMENTUM_POLICIES}, got {momentum!r}.")
        for f in filters:
            if not callable(f):
                raise TypeError(f"every filter must be callable on a ModelUpdate, got {type(f).__name__}.")
        self.transport = transport
        self.site = site
        self.every = int(every)
        self.unit = unit
        self.momentum = momentum
        self.chain = FilterChain()
        self.add_filters(filters)
        self.n_samples = n_samples
        self.network = network
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.instruction = RoundInstruction()
        self.shared_keys: set[str] | None = None  # SplitNN: only the site's own part is sent (a public mask)
        self.logger = logging.getLogger(f"monai_fedpriv.FederatedSync.{site}")
        self.round = 0  # completed rounds as seen by this site
        self.last_update: ModelUpdate | None = None
        self._global: dict[str, torch.Tensor] | None = None
        self._steps = 0  # logical optimiser steps taken so far
        self._round_start_steps = 0
        self._awaiting_global = False
        self._round_end_pending = False
        self._round_steps: int | None = None  # steps the instruction asks for this round (None: the boundary)
        self._step_hook: Any = None

    @property
    def global_weights(self) -> dict[str, torch.Tensor] | None:
        """The global model this site's round started from (``None`` before the first)."""
        return self._global

    @property
    def filters(self) -> list[UpdateFilterFn]:
        """The filters of the outgoing update, in order."""
        return self.chain.filters

    def sent_fields(self) -> set[str]:
        """Tensor fields of the messages this site sends (``"kind.field"``): its update's delta, and the optimiser
        moments when momentum is aggregated."""
        return sent_fields(self.momentum)

    def add_filters(self, filters: Sequence[UpdateFilterFn]) -> None:
        """Append filters and check that, if any of them protects something, everything sent is covered."""
        self.chain.extend(filters)
        self.chain.check_coverage(self.sent_fields())

    # -- attachment ---------------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self._on_started, Events.STARTED):
            return
        register_fed_events(engine)
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._on_iteration_started)
        boundary = (
            Events.EPOCH_COMPLETED(every=self.every)
            if self.unit == "epochs"
            else Events.ITERATION_COMPLETED(every=self.every)
        )
        engine.add_event_handler(boundary, self._on_boundary)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._after_iteration)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _bind(self, engine: Engine) -> None:
        if self.network is None:
            self.network = getattr(engine, "network", None)
        if self.optimizer is None:
            self.optimizer = getattr(engine, "optimizer", None)
        if self.network is None or self.optimizer is None:
            raise AttributeError(
                "FederatedSync needs a network and an optimizer (pass them or use a SupervisedTrainer)."
            )
        loader = getattr(engine, "data_loader", None)
        if self.n_samples is None:
            self.n_samples = len(loader.dataset) if loader is not None and hasattr(loader, "dataset") else 0
        if self.batch_size is None:
            self.batch_size = int(getattr(loader, "batch_size", None) or 1)
        if self._step_hook is None:
            # the innermost torch optimizer steps once per logical step (a DP optimizer skips physical sub-batches
            # and steps on empty Poisson draws)
            inner = getattr(self.optimizer, "original_optimizer", self.optimizer)
            self._step_hook = inner.register_step_post_hook(self._count_step)

    def _count_step(self, *_: Any) -> None:
        self._steps += 1

    # -- events -------------------------------------------------------------------------------------------------
    def _on_started(self, engine: Engine) -> None:
        self._bind(engine)
        if self._global is None or self._awaiting_global:
            self._receive(engine)

    def _on_iteration_started(self, engine: Engine) -> None:
        if self._awaiting_global:
            self._receive(engine)

    def _receive(self, engine: Engine) -> None:
        glob: GlobalModel = self.transport.receive(self.site)
        if glob.stop:
            self.logger.info(f"{self.site}: federation stopped at round {glob.round}.")
            self._awaiting_global = False
            engine.terminate()
            return
        assert self.network is not None and self.optimizer is not None
        load_exchangeable_state(self.network, glob.weights)
        self._global = {k: v.detach() for k, v in glob.weights.items()}  # the transport hands over its own copy
        self._round_start_steps = self._steps
        self.round = glob.round
        self.instruction = glob.instruction_for(self.site)
        self._round_steps = self.instruction.steps_for(int(self.n_samples or 0), int(self.batch_size or 1))
        if self.momentum == "restart":
            restart_optimizer_state(self.optimizer)
        elif self.momentum == "aggregate" and glob.optimizer_state is not None:
            import_optimizer_state(self.optimizer, self.network, glob.optimizer_state)
        self._awaiting_global = False
        engine.state.__dict__.update(fed_global=GlobalModel(glob.round, self._global, glob.optimizer_state),
                                     fed_instruction=self.instruction)  # fmt: skip
        engine.fire_event(FedEvents.GLOBAL_MODEL_RECEIVED)

    def _mid_logical_batch(self) -> bool:
        """A DP optimizer that split a logical batch into physical ones and has not stepped on it yet."""
        return bool(getattr(self.optimizer, "mid_logical_batch", False))

    def _on_boundary(self, engine: Engine) -> None:
        if self._round_steps is not None or self._awaiting_global:  # the instruction's step count ends this round
            return
        if self._mid_logical_batch():  # end the round on the logical step, never between its physical batches
            self._round_end_pending = True
            return
        self._on_round_end(engine)

    def _after_iteration(self, engine: Engine) -> None:
        if self._round_steps is not None and not self._awaiting_global and not self._round_end_pending:
            if self._steps - self._round_start_steps >= self._round_steps:
                self._round_end_pending = True
        if self._round_end_pending and not self._mid_logical_batch():
            self._round_end_pending = False
            self._on_round_end(engine)

    def _on_completed(self, engine: Engine) -> None:
        # the run ended inside a logical batch: its physical batches never stepped (nothing of them is sent)
        if self._round_end_pending:
            self._round_end_pending = False
            self._on_round_end(engine)

    def _on_round_end(self, engine: Engine) -> None:
        if self._global is None:
            raise RuntimeError(f"{self.site}: round ended before any global model was received.")
        assert self.network is not None and self.optimizer is not None
        local = exchangeable_state(self.network)
        delta = subtract(local, self._global)
        update = ModelUpdate(
            site=self.site,
            round=self.round + 1,
            delta=delta,
            masks=None if self.shared_keys is None else {
                k: torch.full_like(v, k in self.shared_keys, dtype=torch.bool) for k, v in delta.items()},
            n_samples=int(self.n_samples or 0),
            local_steps=int(self._steps - self._round_start_steps),
            optimizer_state=(
                export_optimizer_state(self.optimizer, self.network) if self.momentum == "aggregate" else None
            ),
        )
        try:
            update = self.chain(update)  # fail closed: never fall back to sending the raw update
        except RuntimeError as exc:
            raise RuntimeError(f"{self.site}: {exc}; nothing was sent.") from exc
        self.last_update = update
        engine.state.__dict__.update(fed_update=update)
        engine.fire_event(FedEvents.UPDATE_BUILT)
        self.transport.send(update)
        self._round_start_steps = self._steps
        self._awaiting_global = True
        if self.transport.yields_control and not _run_finished(engine):
            engine.interrupt()

    def send_partial_round(self, engine: Engine) -> bool:
        """Send the update of a round cut short (e.g. by a budget stop) if the site took any step in it.

        The steps already taken are accounted in the site's budget; their result passes through the same filters as
        any update (post-processing of a DP output costs no privacy). Returns whether an update was sent.
        """
        if self._global is None or self._awaiting_global or self._steps <= self._round_start_steps:
            return False
        self._on_round_end(engine)
        return True

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "steps": self._steps,
            "round_start_steps": self._round_start_steps,
            "awaiting_global": self._awaiting_global,
            "round_end_pending": self._round_end_pending,
            "round_steps": self._round_steps,
            "instruction": self.instruction.to_json(),
            "global": copy.deepcopy(self._global),
            "filters": self.chain.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("round", "steps", "round_start_steps", "awaiting_global", "global", "filters"):
            if key not in state:
                raise KeyError(f"FederatedSync state lacks required key {key!r}.")
        self.round = int(state["round"])
        self._steps = int(state["steps"])
        self._round_start_steps = int(state["round_start_steps"])
        self._awaiting_global = bool(state["awaiting_global"])
        self._round_end_pending = bool(state.get("round_end_pending", False))
        self._round_steps = state.get("round_steps")
        self.instruction = RoundInstruction.from_json(state.get("instruction"))
        self._global = copy.deepcopy(state["global"])
        if len(state["filters"]) != len(self.filters):
            raise ValueError(f"saved state has {len(state['filters'])} filters, this handler has {len(self.filters)}.")
        self.chain.load_state_dict(state["filters"])


def _run_finished(engine: Engine) -> bool:
    st = engine.state
    if st.max_epochs is None or st.epoch_length is None:
        return False
    return st.iteration >= st.max_epochs * st.epoch_length
