"""The contract between the run loop and a transport's server side: broadcast a round's global model with each
site's instruction, gather what comes back (updates, failures, timeouts), and whatever the transport itself must
keep across a restart."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from monai_fedpriv.fl.instruction import RoundInstruction
from monai_fedpriv.fl.server.work import WorkBound
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate

__all__ = ["Gathered", "RoundRequest", "ServerChannel"]


@dataclass
class RoundRequest:
    """One round as the loop asks for it: ``model`` is the global model of round ``round - 1`` carrying the
    strategy's instruction for every site in ``targets``; ``last_trained`` is the last round each site was asked to
    train (a resumed remote site checks its saved state against it)."""

    round: int
    model: GlobalModel
    targets: list[str]
    last_trained: dict[str, int] = field(default_factory=dict)


@dataclass
class Gathered:
    """What a channel brought back from one round.

    Attributes:
        updates: the decoded updates (nothing else a site sent is trusted beyond its own entry).
        expected: the sites expected to answer (a site that left for its budget without sending is not).
        failures: ``{site: reason}`` of expected sites that failed (training raised, timed out, undecodable bytes).
        sites: each answering site's own report for ``metrics.json`` (loss, local Dice, ``stopped``, privacy).
        wire_bytes: bytes of each site's update as it crossed the wire.
        received_bytes: bytes each site received (the global model with its instructions).
        scored: sites' scores of the previous round's global model on their own validation cases (NVIDIA FLARE).
        left: sites that left the federation this round (their budget ran out, or they sent nothing).
        uploads: the decoded dataset uploads of an upload round (FedReplay).
        server_weights: weights the server side trained during the round (SplitNN's server part), merged into the
            aggregate.
        secure: under secure aggregation, the round's secure sum (:class:`~monai_fedpriv.fl.secure.SecureOutcome`):
            then ``updates`` is empty, the server saw only the sum.
    """

    updates: list[ModelUpdate] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    wire_bytes: dict[str, int] = field(default_factory=dict)
    received_bytes: dict[str, int] = field(default_factory=dict)
    scored: dict[str, dict[str, Any]] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)
    uploads: list[Any] = field(default_factory=list)
    server_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    secure: Any = None


class ServerChannel(ABC):
    """A transport's server side, as the run loop drives it.

    Attributes:
        sites: the federation's sites in their fixed order.
    """

    sites: list[str]

    @abstractmethod
    def gather(self, request: RoundRequest) -> Gathered:
        """Broadcast ``request.model`` to ``request.targets``, let them train, and gather their answers."""

    @abstractmethod
    def work_bounds(
        self, instructions: Mapping[str, RoundInstruction], declared: Mapping[str, int]
    ) -> dict[str, WorkBound]:
        """The most each instructed site may claim this round (``declared``: samples sites declared earlier)."""

    def score(self, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The global model's Dice (``dice``, ``per_site``, ``dice_per_class``) where the server can score it;
        ``{}`` where only the sites can (they report it with their next answer)."""
        return {}

    def aborted(self) -> bool:
        """Whether the run was asked to end now (NVIDIA FLARE's abort signal)."""
        return False

    def publish(self, model: GlobalModel) -> None:  # noqa: B027 - remote channels publish with the next broadcast
        """The loop's current global model after a round (or a resume), for channels whose sites read it later."""

    def finish(self, model: GlobalModel, last_trained: Mapping[str, int]) -> dict[str, dict[str, Any]]:
        """The end of a run that completed: a final validation where the sites score ``model`` (returns their scores;
        ``last_trained`` as in :class:`RoundRequest`)."""
        return {}

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release what the channel holds (always called, also after a failure: it must not raise or broadcast)."""

    def describe(self) -> dict[str, Any]:
        """Top-level ``metrics.json`` entries the transport adds (data, setup, noise source, ledger store...)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the transport keeps in the round checkpoint (in-process sites' state)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore :meth:`state_dict` from a checkpoint."""
