"""Training FedReplay's primary model at the server (seed 004, Algorithm 2, lines 8-10) with the bundle's own
trainer: the bundle's ``train#trainer`` (its loss, optimiser, inferer and post-processing) built from its config with
the network replaced by the primary model (the layers after the cut, :mod:`monai_fedpriv.networks.unet_cut`) and the
loader replaced by one over the pooled latents. The pool, the optimiser's state and the shuffling are part of the run's
checkpoint, so a resumed run trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from torch.utils.data import DataLoader, Dataset

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
from monai_fedpriv.data.stream import derive_seed
from monai_fedpriv.fl.messages import LatentUpload
from monai_fedpriv.fl.weights import exchangeable_state, load_exchangeable_state
from monai_fedpriv.fl.workflow.uploads import ServerTraining
from monai_fedpriv.networks.unet_cut import encoder_and_primary

__all__ = ["LatentPool", "LatentTrainer"]


class LatentPool(Dataset):
    """The union of the sites' uploads (``{"image": latent, "label": label}`` items, in site order). Labels come
    back as the bundle trains on them: masks thresholded at 0.5, one-hot class maps (``meta["labels"] == "onehot"``)
    as their argmax; both are post-processing of a mechanism's noisy labels and exact for clean ones."""

    def __init__(self) -> None:
        self.latents: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.sites: list[str] = []

    def add(self, upload: LatentUpload) -> None:
        self.latents.append(upload.latents.detach().to(torch.float32).cpu())
        labels = upload.labels.detach().to(torch.float32).cpu()
        if upload.meta.get("labels") == "onehot":
            labels = labels.argmax(dim=1, keepdim=True).to(torch.float32)
        else:
            labels = (labels > 0.5).to(torch.float32)
        self.labels.append(labels)
        self.sites.append(upload.site)
        self._index = [(k, i) for k, t in enumerate(self.latents) for i in range(t.shape[0])]

    def __len__(self) -> int:
        return sum(int(t.shape[0]) for t in self.latents)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k, i = self._index[index]
        return {"image": self.latents[k][i], "label": self.labels[k][i]}

    def state_dict(self) -> dict[str, Any]:
        return {"latents": self.latents, "labels": self.labels, "sites": self.sites}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.latents, self.labels, self.sites = [], [], []
        saved = (state.get("latents", []), state.get("labels", []), state.get("sites", []))
        for lat, lab, site in zip(*saved, strict=True):
            self.latents.append(lat)
            self.labels.append(lab)
            self.sites.append(site)
        self._index = [(k, i) for k, t in enumerate(self.latents) for i in range(t.shape[0])]


class LatentTrainer(ServerTraining):
    """FedReplay's server phase.

    Args:
        bundle: the run's bundle (its ``train.json``: trainer, loss, optimiser, batch size).
        seed: run seed (the shuffling of every server round derives from it).
        device: training device.
        overrides: the run's bundle overrides (data set, ...).
        cut_block: where the encoder ends.
        epochs: passes over the pool per server round.
    """

    def __init__(self, bundle: BundleSpec, seed: int, device: str | torch.device, overrides: Mapping[str, Any],
                 cut_block: int, epochs: int = 1) -> None:  # fmt: skip
        self.bundle = bundle.own_configs()  # the sites' privacy and federation overrides are theirs
        self.seed = int(seed)
        self.device = torch.device(device)
        self.overrides = dict(overrides)
        self.cut_block = int(cut_block)
        self.epochs = int(epochs)
        self.pool = LatentPool()
        self.optimizer_state: dict[str, Any] | None = None

    def screen(self, uploads: Sequence[Any], asked: Sequence[str], rnd: int) -> tuple[list[Any], dict[str, str]]:
        """The shared screening, then what this server's primary model can take: each accepted upload's first item
        goes through the primary model (the cut's channels and resolution), its labels match the model's outputs in
        shape, encoding (``meta["labels"]``) and range."""
        from monai_fedpriv.fl.workflow.uploads import screen_uploads

        fit, unfit = [], {}
        for upload in uploads:  # first: no site's upload becomes the others' reference unless the model takes it
            problem = self._problem(upload) if isinstance(upload, LatentUpload) else "it is not a latent upload"
            if problem is None:
                fit.append(upload)
            else:
                unfit[upload.site] = f"upload from {upload.site!r} (round {rnd}) rejected: {problem}"
        accepted, rejected = screen_uploads(fit, asked, rnd)
        return accepted, {**unfit, **rejected}

    def _problem(self, upload: LatentUpload) -> str | None:
        encoding, labels = upload.meta.get("labels"), upload.labels
        if encoding not in ("mask", "onehot"):
            return f"its labels are encoded as {encoding!r}, not 'mask' or 'onehot'"
        if not labels.is_floating_point() or labels.dim() != upload.latents.dim() or \
                not bool((labels.abs() <= 1e6).all()):  # fmt: skip
            return f"its labels {list(labels.shape)} {labels.dtype} are not float maps beside the latents"
        try:
            with torch.no_grad():
                out = self._reference()(upload.latents[:1].to(torch.float32))
        except Exception as exc:  # noqa: BLE001 - latents the primary model cannot take
            return f"the primary model cannot take its latents {list(upload.latents.shape[1:])}: {exc}"[:300]
        if tuple(out.shape[1:]) != tuple(labels.shape[1:]):
            return f"its labels are {list(labels.shape[1:])}, the model outputs {list(out.shape[1:])}"
        return None

    def _reference(self) -> torch.nn.Module:
        """The primary model of round 0 (its structure is all the screening needs)."""
        if getattr(self, "_primary", None) is None:
            from monai_fedpriv.fl.simulator.server_model import initial_network

            _, network = initial_network(self.bundle, self.seed, "cpu", self.overrides)
            self._primary = encoder_and_primary(network, self.cut_block)[1].eval()
        return self._primary

    def receive(self, uploads: Sequence[LatentUpload]) -> None:
        for upload in uploads:
            self.pool.add(upload)

    def _trainer(self, network: torch.nn.Module, loader: DataLoader) -> Any:
        common = {"device": f"$torch.device('{self.device}')", "seed": self.seed, **self.overrides}
        parser = load_bundle(self.bundle, {
            **common, "network": network, "train#dataloader": loader, "train#trainer#max_epochs": self.epochs,
            "train#trainer#train_handlers": [],
        })  # fmt: skip
        trainer = parser.get_parsed_content("train#trainer")
        trainer.logger.setLevel(logging.CRITICAL)
        return trainer

    def train(self, rnd: int, weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from monai_fedpriv.fl.simulator.server_model import initial_network

        if len(self.pool) == 0:
            raise RuntimeError("FedReplay's server phase has no uploaded latents to train on.")
        _, network = initial_network(self.bundle, self.seed, self.device, self.overrides)
        load_exchangeable_state(network, weights)
        _, primary = encoder_and_primary(network, self.cut_block)
        primary.train()
        batch_size = int(load_bundle(self.bundle, dict(self.overrides), required=()).get_parsed_content(
            "train#dataloader#batch_size"))  # fmt: skip
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, "server-training", rnd))
        loader = DataLoader(self.pool, batch_size=batch_size, shuffle=True, generator=shuffle)
        trainer = self._trainer(primary, loader)
        if self.optimizer_state is not None:
            trainer.optimizer.load_state_dict(self.optimizer_state)
        losses: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(_loss(e.state.output))))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "server-training-rng", rnd))
            trainer.run()
        self.optimizer_state = trainer.optimizer.state_dict()
        facts = {"phase": "server", "items": len(self.pool), "epochs": self.epochs, "steps": len(losses),
                 "loss": sum(losses) / len(losses) if losses else None}  # fmt: skip
        return exchangeable_state(network), facts

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict(), "optimizer": self.optimizer_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pool.load_state_dict(state.get("pool") or {})
        self.optimizer_state = state.get("optimizer")


def _loss(output: Any) -> float:
    out = output[0] if isinstance(output, list) else output
    return float(out["loss"]) if isinstance(out, dict) and "loss" in out else float("nan")
