"""The server strategy interface: which sites take part in a round and what each is told (``configure_round``), and
how their updates become the next global model (``aggregate``). Strategies are pure (no transport, no files); the
run loop (:mod:`monai_fedpriv.fl.workflow`) calls them the same way in the in-process simulator and under NVIDIA
FLARE.

A strategy selects the round's sites as well as aggregating, so methods that do not train every site every round
(cyclic weight transfer visits one site after another) fit the same round; a round's instructions
(:class:`~monai_fedpriv.fl.instruction.RoundInstruction`) travel to each site with the global model; state that must
survive a restart (server momentum) is in ``state_dict``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monai_fedpriv.fl.instruction import RoundInstruction
from monai_fedpriv.fl.update import ModelUpdate, check_update

__all__ = ["Strategy"]


class Strategy(ABC):
    """Base class of server strategies.

    Subclasses implement :meth:`aggregate`; they may override :meth:`select_sites` (default: every available site),
    :meth:`aggregate_optimizer_state` and keep server state in ``state_dict``. :meth:`config` names the settings that
    define the strategy (written to ``metrics.json`` and compared on ``--resume``).
    """

    #: short name used on the command line and in reports
    name: str = "strategy"
    #: how many sites a round asks at most (``None``: every active site)
    sites_per_round: int | None = None
    #: whether the strategy sets each round's local work itself (then ``--local-steps`` would cut it short)
    sets_local_work: bool = False
    #: what the sites upload in the strategy's upload rounds, kept by the server's ``ServerTraining``: ``"latents"``
    #: (FedReplay: pooled and trained on at the server), ``"generator"`` (CWT+Replay: handed on), or ``None``
    upload_kind: str | None = None
    #: whether some rounds train across a cut, batch by batch (SplitNN)
    splits_network: bool = False
    #: what the sites send that no mechanism covers (then a run needs ``--latents-unprotected``), or ``None``
    exposes: str | None = None

    @property
    def min_rounds(self) -> int:
        """The fewest rounds a run of this strategy needs (FedReplay: encoder, upload and one server round)."""
        return 1

    def round_kind(self, rnd: int) -> str:
        """What round ``rnd`` is: ``"train"`` (asked sites train and send updates, or train across the cut),
        ``"upload"`` (asked sites send a dataset once) or ``"server"`` (the server trains; no site is asked)."""
        return "train"

    def work_problem(self, local_steps: int | None, min_sites: int | None) -> str | None:
        """Why a run's local work or ``--min-sites`` cannot be honoured by this strategy's rounds, or ``None``:
        ``--local-steps`` where the strategy sets each round's work (a site's engine is sized by the run's local
        work), ``--min-sites`` above the sites it asks a round."""
        if self.sets_local_work and local_steps is not None:
            return (f"--local-steps: --strategy {self.name} sets each round's local work itself (floor(|D_k| / b) "
                    f"steps); drop --local-steps.")  # fmt: skip
        if self.sites_per_round is not None and min_sites is not None and min_sites > self.sites_per_round:
            return f"--min-sites {min_sites}: --strategy {self.name} asks {self.sites_per_round} site(s) a round."
        return None

    def exposure_problem(self, unprotected: bool, mechanism: bool, private: bool) -> str | None:
        """Why the run's privacy flags do not fit what this strategy's sites send beyond updates, or ``None``:
        ``unprotected`` (``--latents-unprotected``), ``mechanism`` (``--latent-noise-multiplier``), ``private``
        (DP-SGD or an update filter). A strategy that :attr:`exposes` something no mechanism covers needs the opt-in
        and refuses every privacy claim; one that sends updates only takes none of the latent flags."""
        if self.exposes is not None:
            if private or mechanism:
                return (f"--strategy {self.name} sends {self.exposes}, which no mechanism here covers: drop --privacy "
                        f"/ --share / --latent-noise-multiplier (a claim on the weights would be false).")
            if not unprotected:
                return (f"--strategy {self.name} sends {self.exposes}: pass --latents-unprotected to run it "
                        f"(metrics.json and the report say so).")  # fmt: skip
            return None
        if unprotected or mechanism:
            return (f"--latents-unprotected / --latent-noise-multiplier: --strategy {self.name} sends no latents "
                    f"(--strategy splitnn, fedreplay and cwt-replay do).")  # fmt: skip
        return None

    def start(self, sites: Sequence[str]) -> None:  # noqa: B027 - most strategies need no site order
        """Called once by the run loop with the federation's sites in their fixed order."""

    def select_sites(self, rnd: int, sites: Sequence[str]) -> list[str]:
        """The sites that train in round ``rnd`` (1-based), chosen among ``sites`` (those still active)."""
        return list(sites)

    def configure_round(self, rnd: int, sites: Sequence[str]) -> dict[str, RoundInstruction]:
        """The sites that train in round ``rnd`` and what each is told (default: :meth:`select_sites`, each with the
        default instruction: train as the run's settings say)."""
        return {site: RoundInstruction() for site in self.select_sites(rnd, sites)}

    def site_data(self, train: Mapping[str, list[dict[str, Any]]], seed: int) -> dict[str, list[dict[str, Any]]]:
        """Each site's training list as this strategy trains it (default: as given; FedAvg+Share adds its pool)."""
        return {site: list(cases) for site, cases in train.items()}

    @abstractmethod
    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[ModelUpdate]
    ) -> dict[str, torch.Tensor]:
        """Return the new global weights. Must not modify its inputs."""

    def __call__(
        self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[ModelUpdate]
    ) -> dict[str, torch.Tensor]:
        for u in updates:
            check_update(u, global_weights)
        return self.aggregate(global_weights, updates)

    def aggregate_optimizer_state(self, updates: Sequence[ModelUpdate]) -> dict[str, torch.Tensor] | None:
        """The sites' optimiser moments combined ("m. aggregation" of Li et al.), or ``None`` when none were sent."""
        return None

    def config(self) -> dict[str, Any]:
        """The settings that define this strategy (JSON-serialisable)."""
        return {"name": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless default
        pass
