"""A site of this package behind MONAI's federated-learning client interface (``monai.fl.client.ClientAlgo``), for
platforms that drive MONAI clients through it: the site is built from a bundle exactly as the simulator builds one
(:func:`~monai_fedpriv.fl.simulator.site.build_site`: the bundle's trainer, the sync handler, DP-SGD and the privacy
filters of the override files), each ``train`` runs one round of it (:func:`~monai_fedpriv.fl.simulator.site_round.
train_round`), and ``get_weights`` hands over only what the site's filter chain let out, as it crossed the codec.

An ``ExchangeObject`` carries dense tensors and no masks, so a platform's FedAvg would read the unshared
coordinates of a sparse update (selective sharing, SVT) as zeros: such filters are refused when the client is built.
Dense privacy (DP-SGD, the Gaussian update filter) works; what a platform gives up against ``run-nvflare`` is the
server side of this package (screening, work bounds, budget stop policies, the one checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.fl.client import ClientAlgo
from monai.fl.utils.constants import FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.fl.transport.inprocess import InProcessTransport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate

__all__ = ["FedPrivClientAlgo", "SPARSE_FILTERS"]

#: filters whose updates are sparse (an ExchangeObject cannot carry their masks)
SPARSE_FILTERS = ("PercentileSharing", "SparseVectorFilter")


class FedPrivClientAlgo(ClientAlgo):
    """One site of a bundle as a MONAI ``ClientAlgo``.

    Args:
        bundle: the bundle (its config files, the privacy overrides among them, and overrides).
        site: the site's name. train: its training data list. val: its validation list (for ``evaluate``).
        rounds: the rounds the platform will run. local_epochs / local_steps: the local work of a round.
        seed: the run seed (the same as the simulator's gives the same site). momentum: client optimiser policy.
        secure_noise: privacy noise from OS entropy (a deployment) instead of the seed.
        output_dir: where the site writes (checkpoints, ledger).
    """

    def __init__(self, bundle: BundleSpec, site: str, train: Sequence[dict[str, Any]],
                 val: Sequence[dict[str, Any]] = (), rounds: int = 1, local_epochs: int | None = 1,
                 local_steps: int | None = None, seed: int = 0, momentum: str = "restart",
                 secure_noise: bool = True, output_dir: str | Path = "runs/monai_fl") -> None:  # fmt: skip
        self.bundle, self.name, self.train_data, self.val = bundle, site, list(train), list(val)
        self.rounds, self.epochs, self.steps = int(rounds), local_epochs, local_steps
        self.seed, self.momentum, self.secure_noise = int(seed), momentum, bool(secure_noise)
        self.output_dir = Path(output_dir)
        self.site: Any = None
        self.update: ModelUpdate | None = None
        self.round = 0

    def initialize(self, extra: dict | None = None) -> None:
        from monai_fedpriv.fl.simulator.site import SiteSpec, build_site

        self.transport = InProcessTransport()
        epochs = None if self.steps is not None else self.epochs
        spec = SiteSpec(rounds=self.rounds, epochs=epochs, steps=self.steps,
                        seed=self.seed, device="cpu", momentum=self.momentum, output_dir=self.output_dir,
                        secure_noise=self.secure_noise)  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            self.site = build_site(self.bundle, self.name, self.train_data, spec, self.transport)
        sparse = [type(f).__name__ for f in self.site.sync.filters if type(f).__name__ in SPARSE_FILTERS]
        if sparse:
            raise PrivacyConfigError(
                f"{sparse[0]} sends sparse updates, and an ExchangeObject has no masks: a platform's FedAvg would "
                f"average the unshared coordinates as zeros. Use run-nvflare, or a dense privacy setting (DP-SGD, "
                f"--share gaussian)."
            )
        self.max_epochs = self.rounds * (self.epochs or 1) if self.steps is None else self.rounds
        self.snapshot = self.site.snapshot()

    def train(self, data: ExchangeObject, extra: dict | None = None) -> None:
        """One round from the global weights in ``data`` (full weights)."""
        from monai_fedpriv.fl.simulator.site_round import train_round

        if data.weight_type not in (None, WeightType.WEIGHTS) or not isinstance(data.weights, Mapping):
            raise ValueError("train needs an ExchangeObject of full global weights.")
        self.transport.publish(GlobalModel(self.round, {k: torch.as_tensor(v) for k, v in data.weights.items()}))
        _, sent, failure = train_round(self.site, self.round + 1, self.transport, self.snapshot, self.max_epochs)
        if failure or not sent:
            raise RuntimeError(f"{self.name}: round {self.round + 1} sent nothing: {failure or 'the site stopped'}.")
        (self.update,) = self.transport.collect()  # as it crossed the codec, after the site's filters
        self.round += 1
        self.snapshot = self.site.snapshot()

    def get_weights(self, extra: dict | None = None) -> ExchangeObject:
        """The last round's filtered weight difference and its optimiser steps (nothing before a round)."""
        if self.update is None:
            raise RuntimeError(f"{self.name}: no round has been trained: nothing has passed the site's filters yet.")
        return ExchangeObject(weights={k: v.clone() for k, v in self.update.delta.items()},
                              weight_type=WeightType.WEIGHT_DIFF,
                              statistics={FlStatistics.NUM_EXECUTED_ITERATIONS: int(self.update.local_steps)})

    def evaluate(self, data: ExchangeObject, extra: dict | None = None) -> ExchangeObject:
        """Dice of the weights in ``data`` on the site's validation cases."""
        from monai_fedpriv.fl.evaluation import evaluator_from_bundle
        from monai_fedpriv.fl.weights import load_exchangeable_state
        from monai_fedpriv.privacy.grad_sample import plain_copy

        if not self.val:
            return ExchangeObject(metrics={})
        parser = load_bundle(self.bundle, {"device": "$torch.device('cpu')"})
        evaluator = evaluator_from_bundle(parser, self.val, "cpu")
        network = plain_copy(self.site.network)
        load_exchangeable_state(network, {k: torch.as_tensor(v) for k, v in (data.weights or {}).items()})
        scores = evaluator(network)
        return ExchangeObject(metrics={"dice": scores["dice"], "dice_per_class": scores["dice_per_class"]})

    def finalize(self, extra: dict | None = None) -> None:
        if self.site is not None:
            self.site.release_engine()
            self.site.save_ledgers()
