"""Ignite handler that turns a site's MONAI trainer into a federated client."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_fedpriv.fl.momentum import (
    MOMENTUM_POLICIES,
    export_optimizer_state,
    import_optimizer_state,
    restart_optimizer_state,
)
from monai_fedpriv.fl.transport import Transport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate
from monai_fedpriv.fl.weights import exchangeable_state, load_exchangeable_state, subtract

__all__ = ["FederatedSync"]

UpdateFilterFn = Callable[[ModelUpdate], ModelUpdate]


class FederatedSync:
    """Synchronise a site's trainer with the federation every ``every`` local epochs or iterations.

    At the start of the run and after every sync the handler receives the global model from ``transport`` and
    loads it; at every round boundary it sends ``local - global`` with the number of local samples and optimiser
    steps (Li et al. 2019, Algorithm 1, lines 13-15), after passing it through ``filters`` in order (privatizers,
    sparsifiers, audits). A filter that raises stops the run: nothing unfiltered is ever sent.

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
        self.filters = list(filters)
        self.n_samples = n_samples
        self.network = network
        self.optimizer = optimizer
        self.logger = logging.getLogger(f"monai_fedpriv.FederatedSync.{site}")
        self.round = 0  # completed rounds as seen by this site
        self.last_update: ModelUpdate | None = None
        self._global: dict[str, torch.Tensor] | None = None
        self._round_start_iteration = 0
        self._awaiting_global = False

    # -- attachment ---------------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self._on_started, Events.STARTED):
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._on_iteration_started)
        boundary = (
            Events.EPOCH_COMPLETED(every=self.every)
            if self.unit == "epochs"
            else Events.ITERATION_COMPLETED(every=self.every)
        )
        engine.add_event_handler(boundary, self._on_round_end)

    def _bind(self, engine: Engine) -> None:
        if self.network is None:
            self.network = getattr(engine, "network", None)
        if self.optimizer is None:
            self.optimizer = getattr(engine, "optimizer", None)
        if self.network is None or self.optimizer is None:
            raise AttributeError(
                "FederatedSync needs a network and an optimizer (pass them or use a SupervisedTrainer)."
            )
        if self.n_samples is None:
            loader = getattr(engine, "data_loader", None)
            self.n_samples = len(loader.dataset) if loader is not None and hasattr(loader, "dataset") else 0

    # -- events -------------------------------------------------------------------------------------------------
    def _on_started(self, engine: Engine) -> None:
        self._bind(engine)
        if self._global is None:
            self._round_start_iteration = engine.state.iteration
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
        self._global = {k: v.detach().clone() for k, v in glob.weights.items()}
        self.round = glob.round
        if self.momentum == "restart":
            restart_optimizer_state(self.optimizer)
        elif self.momentum == "aggregate" and glob.optimizer_state is not None:
            import_optimizer_state(self.optimizer, self.network, glob.optimizer_state)
        self._awaiting_global = False

    def _on_round_end(self, engine: Engine) -> None:
        if self._global is None:
            raise RuntimeError(f"{self.site}: round ended before any global model was received.")
        assert self.network is not None and self.optimizer is not None
        local = exchangeable_state(self.network)
        update = ModelUpdate(
            site=self.site,
            round=self.round + 1,
            delta=subtract(local, self._global),
            n_samples=int(self.n_samples or 0),
            local_steps=int(engine.state.iteration - self._round_start_iteration),
            optimizer_state=(
                export_optimizer_state(self.optimizer, self.network) if self.momentum == "aggregate" else None
            ),
        )
        for f in self.filters:
            name = getattr(f, "__class__", type(f)).__name__
            try:
                update = f(update)
            except Exception as exc:  # fail closed: never fall back to sending the raw update
                raise RuntimeError(f"{self.site}: update filter {name} failed; nothing was sent.") from exc
            if not isinstance(update, ModelUpdate):
                raise TypeError(f"{self.site}: update filter {name} returned {type(update).__name__}, not ModelUpdate.")
        self.last_update = update
        self.transport.send(update)
        self._round_start_iteration = engine.state.iteration
        self._awaiting_global = True
        if self.transport.yields_control and not _run_finished(engine):
            engine.interrupt()

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "round_start_iteration": self._round_start_iteration,
            "awaiting_global": self._awaiting_global,
            "global": copy.deepcopy(self._global),
            "filters": [f.state_dict() if hasattr(f, "state_dict") else None for f in self.filters],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("round", "round_start_iteration", "awaiting_global", "global", "filters"):
            if key not in state:
                raise KeyError(f"FederatedSync state lacks required key {key!r}.")
        self.round = int(state["round"])
        self._round_start_iteration = int(state["round_start_iteration"])
        self._awaiting_global = bool(state["awaiting_global"])
        self._global = copy.deepcopy(state["global"])
        if len(state["filters"]) != len(self.filters):
            raise ValueError(f"saved state has {len(state['filters'])} filters, this handler has {len(self.filters)}.")
        for f, s in zip(self.filters, state["filters"], strict=True):
            if s is not None and hasattr(f, "load_state_dict"):
                f.load_state_dict(s)


def _run_finished(engine: Engine) -> bool:
    st = engine.state
    if st.max_epochs is None or st.epoch_length is None:
        return False
    return st.iteration >= st.max_epochs * st.epoch_length
