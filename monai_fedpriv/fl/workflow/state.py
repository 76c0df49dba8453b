"""The run loop's state and its one checkpoint format: written atomically after every completed round, resumed
only under the same fingerprint (:func:`~monai_fedpriv.fl.server.checkpoint.load_round_checkpoint`; only the number
of rounds may grow), the same for the in-process simulator and NVIDIA FLARE."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_fedpriv.fl.server.checkpoint import CHECKPOINT_VERSION, load_round_checkpoint
from monai_fedpriv.fl.workflow.stop import Stop, StopKind
from monai_fedpriv.utils.files import atomic_torch_save

__all__ = ["CHECKPOINT_VERSION", "RunState"]


@dataclass
class RunState:
    """Everything the loop carries from round to round.

    Attributes:
        round: completed rounds.
        weights: the global model after them.
        optimizer_state: the aggregated client optimiser moments (``--momentum aggregate``), or ``None``.
        history: one ``metrics.json`` record per completed round.
        active: the sites still in the federation, in the federation's order.
        stopped: why the federation ended, once it has.
        strategy: the strategy's state (server momentum...).
        declared: ``{site: samples}`` declared with each site's first accepted update (work bounds).
        channel: the transport's own state (in-process sites; what remote sites reported once).
        uploads: ``{site: facts}`` of each site's accepted dataset upload (FedReplay), for ``metrics.json``.
        server: the state of training at the server (the uploaded pool, the server trainer's optimiser).
    """

    weights: dict[str, torch.Tensor]
    active: list[str]
    round: int = 0
    optimizer_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: Stop | None = None
    strategy: dict[str, Any] = field(default_factory=dict)
    declared: dict[str, int] = field(default_factory=dict)
    channel: dict[str, Any] = field(default_factory=dict)
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path, fingerprint: dict[str, Any]) -> None:
        state = {
            "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "round": self.round, "weights": self.weights,
            "optimizer_state": self.optimizer_state, "history": self.history, "active": self.active,
            "stopped": None if self.stopped is None else {**self.stopped.to_json(), "kind": self.stopped.kind.value},
            "strategy": self.strategy, "declared": self.declared, "channel": self.channel, "uploads": self.uploads,
            "server": self.server,
        }  # fmt: skip
        atomic_torch_save(state, path)

    @classmethod
    def load(cls, path: Path, fingerprint: dict[str, Any], rounds: int) -> RunState:
        raw = load_round_checkpoint(path, fingerprint, rounds)
        stopped = raw.get("stopped")
        return cls(
            weights=raw["weights"], active=list(raw["active"]), round=int(raw["round"]),
            optimizer_state=raw["optimizer_state"], history=list(raw["history"]),
            stopped=Stop.from_json(stopped, StopKind(stopped["kind"])) if stopped else None,
            strategy=dict(raw["strategy"]), declared=dict(raw["declared"]), channel=dict(raw["channel"]),
            uploads=dict(raw.get("uploads") or {}), server=dict(raw.get("server") or {}),
        )  # fmt: skip
