"""The generative-replay methods of seed 004: FedReplay and CWT+Replay.

FedReplay (seed 004, Qu et al., "Handling data heterogeneity with generative replay in collaborative learning for
medical imaging", section 3.2 and Algorithm 2) as phases of the one run loop:

1. ``encoder_rounds`` rounds in which only the encoder site (by default the one with the most training cases, as the
   seed's BraTS experiment chose "the institution that contains the largest number of subjects") trains the whole
   network, one epoch of its full batches a round; the global model is that site's model;
2. one upload round: every active site encodes its training items with the first ``cut_block`` blocks of that model
   and sends the latents with their labels once (:mod:`monai_fedpriv.fl.replay.upload`);
3. the remaining rounds train the primary model (the layers after the cut) at the server on the pooled latents,
   ``server_epochs`` epochs a round, with the bundle's own trainer (:mod:`monai_fedpriv.fl.replay.server_phase`).

Departure from the seed, stated: the primary model starts from the encoder site's trained layers after the cut,
not from a fresh initialisation (Algorithm 2, line 8), which shortens the server phase on a CPU budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai_fedpriv.fl.instruction import RoundInstruction
from monai_fedpriv.fl.strategies.fedavg import FedAvg
from monai_fedpriv.fl.strategies.methods import CyclicWeightTransfer

__all__ = ["CWTReplay", "FedReplay"]


class FedReplay(FedAvg):
    """FedReplay: encoder at one site, one latent upload, primary model trained at the server.

    Args:
        cut_block: encoding blocks in the auxiliary encoder (1: the seed's cut after the first block).
        encoder_site: the site that trains the encoder (default: the one with the most training cases).
        encoder_rounds: rounds (one epoch each) of encoder training at that site.
        server_epochs: passes over the pooled latents per server round.
    """

    name = "fedreplay"
    sets_local_work = True
    upload_kind = "latents"

    def __init__(self, cut_block: int = 1, encoder_site: str | None = None, encoder_rounds: int = 1,
                 server_epochs: int = 1) -> None:  # fmt: skip
        super().__init__(weighting="uniform", server_lr=1.0)
        self.cut_block = int(cut_block)
        self.encoder_site = encoder_site or None
        self.encoder_rounds = int(encoder_rounds)
        self.server_epochs = int(server_epochs)
        self.sizes: dict[str, int] = {}

    @property
    def min_rounds(self) -> int:
        return self.encoder_rounds + 2

    def exposure_problem(self, unprotected: bool, mechanism: bool, private: bool) -> str | None:
        if not (unprotected or mechanism):
            return ("--strategy fedreplay uploads every site's latents with their labels (['latents.latents', "
                    "'latents.labels']): protect them with --latent-noise-multiplier S (and --epsilon-budget), or "
                    "pass --latents-unprotected.")
        return None

    def work_problem(self, local_steps: int | None, min_sites: int | None) -> str | None:
        return super().work_problem(local_steps, None)

    def site_data(self, train: Mapping[str, list[dict[str, Any]]], seed: int) -> dict[str, list[dict[str, Any]]]:
        self.sizes = {site: len(cases) for site, cases in train.items()}
        return super().site_data(train, seed)

    def start(self, sites: Sequence[str]) -> None:
        if self.encoder_site is None:
            self.encoder_site = max(sites, key=lambda s: (self.sizes.get(s, 0), -list(sites).index(s)))
        elif self.encoder_site not in sites:
            raise ValueError(f"--encoder-site {self.encoder_site!r} is not one of the sites {list(sites)}.")

    def round_kind(self, rnd: int) -> str:
        if rnd <= self.encoder_rounds:
            return "train"
        return "upload" if rnd == self.encoder_rounds + 1 else "server"

    def configure_round(self, rnd: int, sites: Sequence[str]) -> dict[str, RoundInstruction]:
        kind = self.round_kind(rnd)
        if kind == "train":
            site = self.encoder_site
            return {site: RoundInstruction(whole_batches=True)} if site is not None and site in sites else {}
        if kind == "upload":
            return {site: RoundInstruction(phase="upload", cut_block=self.cut_block) for site in sites}
        return {}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "cut_block": self.cut_block, "encoder_site": self.encoder_site,
                "encoder_rounds": self.encoder_rounds, "server_epochs": self.server_epochs}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"encoder_site": self.encoder_site}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.encoder_site = state.get("encoder_site") or self.encoder_site


class CWTReplay(CyclicWeightTransfer):
    """CWT+Replay (seed 004, Algorithm 1): a generator visits every site once in site order (one round each; the site
    trains it ``generator_epochs`` epochs on its own image and mask pairs plus pairs replayed by the generator as it
    received it, and returns it with the codes of its items appended); then cyclic weight transfer of the
    segmentation model, each site training on its own items and as many replayed pairs decoded from the codes of
    every site (:mod:`monai_fedpriv.generative`).

    What leaves a site: the generator and the codes of its items, which decode to images and masks (no mechanism
    covers them: a run needs ``--latents-unprotected``), and in the transfer rounds its model, as in CWT.

    Args:
        generator_epochs: local generator epochs ``M`` per visit.
    """

    name = "cwt-replay"
    upload_kind = "generator"
    exposes = ("its generator and the codes of every item (they decode to images and masks, and replayed pairs "
               "would escape DP-SGD's accounting)")
    def __init__(self, generator_epochs: int = 1, sites: Sequence[str] | None = None) -> None:
        super().__init__(sites)
        self.generator_epochs = int(generator_epochs)
        self.n_sites: int | None = None

    @property
    def min_rounds(self) -> int:
        return (self.n_sites or 1) + 1

    def site_data(self, train: Mapping[str, list[dict[str, Any]]], seed: int) -> dict[str, list[dict[str, Any]]]:
        self.n_sites = len(train)
        return super().site_data(train, seed)


    def start(self, sites: Sequence[str]) -> None:
        super().start(sites)
        self.n_sites = len(sites)

    def round_kind(self, rnd: int) -> str:
        return "upload" if rnd <= len(self.order or ()) else "train"

    def configure_round(self, rnd: int, sites: Sequence[str]) -> dict[str, RoundInstruction]:
        if self.round_kind(rnd) == "upload":
            site = (self.order or list(sites))[rnd - 1]
            return {site: RoundInstruction(phase="generator", epochs=self.generator_epochs)} if site in sites else {}
        return super().configure_round(rnd, sites)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "generator_epochs": self.generator_epochs}
