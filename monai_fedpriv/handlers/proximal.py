"""FedProx's proximal term at a site (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith 2020, "Federated Optimization in
Heterogeneous Networks", MLSys): the local objective is ``F_k(w) + mu/2 ||w - w_global||^2``, so every logical step
adds ``mu * (w - w_global)`` to each parameter's gradient."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine

from monai_fedpriv.fl.weights import unwrap
from monai_fedpriv.handlers.fed_events import FedEvents, register_fed_events

__all__ = ["ProximalTerm"]


class ProximalTerm:
    """Add FedProx's ``mu * (w - w_global)`` to every trainable parameter's ``.grad`` right before the optimiser's
    update rule, on every logical step of the round.

    On :attr:`FedEvents.GLOBAL_MODEL_RECEIVED` the handler keeps a detached copy of the global value of every
    trainable parameter and ``mu = engine.state.fed_instruction.prox_mu``. The term is added by a step *pre*-hook of
    the innermost torch optimizer (``optimizer.original_optimizer`` under DP-SGD): Opacus' ``DPOptimizer.step``
    clips, noises and scales ``p.grad`` (and asks the privacy budget) in ``pre_step`` and only then calls
    ``original_optimizer.step()``, whose pre-hooks run first. So under DP the term is added after clipping and noise:
    it depends on no data, is never clipped and never overwritten, and is skipped with the physical sub-batches of a
    logical batch. ``mu == 0`` (or no instruction) leaves training bit-for-bit unchanged. Parameters without a
    gradient this step (the optimiser skips them) are left alone.

    Args:
        network: the trained network (wrapped or not); default ``engine.network``.
        optimizer: its optimiser (a torch or Opacus DP optimizer); default ``engine.optimizer``.
    """

    def __init__(self, network: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.network = network
        self.optimizer = optimizer
        self.mu = 0.0
        self._global: dict[int, torch.Tensor] = {}  # id(parameter) -> its global value
        self._hook: Any = None

    def attach(self, engine: Engine) -> None:
        register_fed_events(engine)
        if not engine.has_event_handler(self._on_global, FedEvents.GLOBAL_MODEL_RECEIVED):
            engine.add_event_handler(FedEvents.GLOBAL_MODEL_RECEIVED, self._on_global)

    def _on_global(self, engine: Engine) -> None:
        if self.network is None:
            self.network = getattr(engine, "network", None)
        if self.optimizer is None:
            self.optimizer = getattr(engine, "optimizer", None)
        state: Any = engine.state
        instruction = getattr(state, "fed_instruction", None)
        self.set_global(state.fed_global.weights, 0.0 if instruction is None else instruction.prox_mu)

    def set_global(self, weights: Mapping[str, torch.Tensor], mu: float) -> None:
        """Keep the global value of every trainable parameter (prefix-free ``weights``) and ``mu`` for the round.

        Raises:
            ValueError: ``mu`` is not a finite number ``>= 0``.
            KeyError: ``weights`` lacks a trainable parameter (named in the message).
        """
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise ValueError(f"FedProx's mu should be a finite number >= 0, got {mu!r}.")
        self.mu, self._global = 0.0, {}  # a failed call below leaves the handler off, never half set
        if mu == 0:
            return  # FedAvg: nothing stored, the hook does nothing
        if self.network is None or self.optimizer is None:
            raise AttributeError("ProximalTerm needs a network and an optimizer (pass them or bind a trainer).")
        stored: dict[int, torch.Tensor] = {}
        for name, p in unwrap(self.network).named_parameters():
            if not p.requires_grad:
                continue
            if name not in weights:
                raise KeyError(f"the global model lacks trainable parameter {name!r}; cannot add FedProx's term.")
            value = weights[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"global {name!r} has shape {tuple(value.shape)}, the network {tuple(p.shape)}.")
            stored[id(p)] = value.detach().to(device=p.device, dtype=p.dtype, copy=True)
        if self._hook is None:
            inner = getattr(self.optimizer, "original_optimizer", self.optimizer)
            self._hook = inner.register_step_pre_hook(self._add_term)
        self.mu, self._global = float(mu), stored

    @torch.no_grad()
    def _add_term(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self.mu == 0:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                w_global = self._global.get(id(p))
                if w_global is not None and p.grad is not None:
                    p.grad.add_(p.detach() - w_global, alpha=self.mu)
