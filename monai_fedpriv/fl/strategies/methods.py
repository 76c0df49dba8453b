"""The heterogeneity methods of seed 004 (Qu et al.) that fit a round of "sites train, server combines": each is
FedAvg's aggregation with its own round instructions or data.

* :class:`FedProx` (Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith 2020): every site adds ``mu (w - w_global)`` to
  each step's gradient (:class:`~monai_fedpriv.handlers.proximal.ProximalTerm`); the server averages as FedAvg.
* :class:`CyclicWeightTransfer` (Chang et al. 2018): one site per round in a fixed order trains ``floor(|D_k| / b)``
  iterations on the model the previous site passed on; the "aggregate" of one update is that site's model.
* :class:`SplitNN` (Vepakomma et al. 2018): cyclic like CWT, each site training across a cut with the server part;
* :class:`FedAvgShare` (Zhao et al. 2018): a public pool drawn from the sites' data before training is mixed into
  every site's batches (:mod:`monai_fedpriv.data.share_pool`); the server averages as FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai_fedpriv.fl.instruction import RoundInstruction
from monai_fedpriv.fl.strategies.fedavg import FedAvg

__all__ = ["CyclicWeightTransfer", "FedAvgShare", "FedProx", "SplitNN"]


class FedProx(FedAvg):
    """FedAvg whose sites train with the proximal term ``mu/2 ||w - w_global||^2`` (Li et al. 2020).

    Args:
        prox_mu: ``mu >= 0``; ``0`` trains and aggregates exactly as FedAvg.
        weighting, server_lr: as for :class:`FedAvg`.
    """

    name = "fedprox"

    def __init__(self, prox_mu: float = 0.01, weighting: str = "steps", server_lr: float = 1.0) -> None:
        super().__init__(weighting=weighting, server_lr=server_lr)
        self.prox_mu = float(RoundInstruction(prox_mu=prox_mu).prox_mu)  # validated as the sites will read it

    def configure_round(self, rnd: int, sites: Sequence[str]) -> dict[str, RoundInstruction]:
        return {site: RoundInstruction(prox_mu=self.prox_mu) for site in self.select_sites(rnd, sites)}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "prox_mu": self.prox_mu}


class CyclicWeightTransfer(FedAvg):
    """Cyclic weight transfer (Chang et al. 2018, seed 004's CWT): each round trains the next active site after the
    last one in the federation's fixed site order (so with every site active, round ``r`` trains site
    ``(r - 1) mod K``; a site that left is skipped and the others keep their turns), for ``floor(|D_k| / b)``
    iterations, and its model is passed on unchanged.

    Args:
        sites: the federation's site order (default: the order of the sites the run offers).
    """

    name = "cwt"
    sites_per_round = 1
    sets_local_work = True

    def __init__(self, sites: Sequence[str] | None = None) -> None:
        super().__init__(weighting="uniform", server_lr=1.0)
        self.order = list(sites) if sites is not None else None
        self.last: int | None = None  # the order position of the last site asked

    def start(self, sites: Sequence[str]) -> None:
        if self.order is None:
            self.order = list(sites)

    def select_sites(self, rnd: int, sites: Sequence[str]) -> list[str]:
        order = self.order or list(sites)
        start = 0 if self.last is None else self.last + 1
        for k in range(len(order)):
            site = order[(start + k) % len(order)]
            if site in set(sites):
                return [site]
        return []

    def configure_round(self, rnd: int, sites: Sequence[str]) -> dict[str, RoundInstruction]:
        chosen = self.select_sites(rnd, sites)
        if chosen:
            self.last = (self.order or list(sites)).index(chosen[0])
        return {site: RoundInstruction(whole_batches=True) for site in chosen}

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "last": self.last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.order = list(state["order"]) if state.get("order") is not None else self.order
        self.last = state.get("last")


class SplitNN(CyclicWeightTransfer):
    """SplitNN in the peer-to-peer mode seed 004 compares (Vepakomma et al. 2018): one site per round in the fixed
    order trains ``floor(|D_k| / b)`` iterations across the cut, batch by batch with the server part
    (:mod:`monai_fedpriv.fl.split`), and passes its own part (the first down block and the head of a U-Net) to the
    next site; the server part stays at the server."""

    name = "splitnn"
    splits_network = True
    exposes = "every batch's cut-layer features and gradients (the features give the images back)"

    def configure_round(self, rnd: int, sites: Sequence[str]) -> dict[str, RoundInstruction]:
        chosen = super().configure_round(rnd, sites)
        return {site: RoundInstruction(whole_batches=True, phase="split", cut_block=1) for site in chosen}


class FedAvgShare(FedAvg):
    """FedAvg with a globally shared public pool (Zhao et al. 2018, "Federated learning with non-IID data").

    Args:
        share_data_fraction: fraction of each site's training cases drawn into the pool before training.
        weighting, server_lr: as for :class:`FedAvg`.
    """

    name = "fedavg-share"

    def __init__(self, share_data_fraction: float = 0.05, weighting: str = "steps", server_lr: float = 1.0) -> None:
        super().__init__(weighting=weighting, server_lr=server_lr)
        if not 0 < share_data_fraction <= 0.5:
            raise ValueError(f"share_data_fraction should be in (0, 0.5], got {share_data_fraction!r}.")
        self.share_data_fraction = float(share_data_fraction)

    def site_data(
        self, train: Mapping[str, list[dict[str, Any]]], seed: int
    ) -> dict[str, list[dict[str, Any]]]:
        """Each site's training list: its private cases followed by the public pool drawn from every site."""
        from monai_fedpriv.data.share_pool import draw_share_pool, site_data_with_pool

        drawn = draw_share_pool(dict(train), self.share_data_fraction, seed)
        return {site: site_data_with_pool(cases, drawn.pool) for site, cases in drawn.private.items()}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "share_data_fraction": self.share_data_fraction}
