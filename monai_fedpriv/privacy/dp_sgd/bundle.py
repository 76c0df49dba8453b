"""DP-SGD as a bundle component: ``dp.json`` builds one :class:`DPSGD` per site from the bundle's own network,
optimizer and loader, and swaps the private ones into the trainer before the engine exists."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader

from monai_fedpriv.errors import DataError, PrivacyConfigError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.dp_sgd.private import DPSettings, PrivateParts, make_site_private
from monai_fedpriv.privacy.filters.base import UpdateFilter, copy_update, meta_with_privacy, privacy_meta
from monai_fedpriv.privacy.noise import noise_generator, noise_source

__all__ = ["DPSGD", "UNIT_NOTES"]

#: What one epsilon protects, per privacy unit (written into every report).
UNIT_NOTES = {
    "slice": "epsilon is per slice (one training item), not per patient: a patient with many slices has a weaker "
    "guarantee",
    "volume": "epsilon is per volume (one training item), not per patient when a patient has several volumes",
    "patient": "epsilon is per patient: every item of a patient is clipped together and patients are Poisson-sampled",
}


class DPSGD(UpdateFilter):
    """Bundle-facing DP-SGD of one site: private network, optimizer and loader, built lazily once from the bundle's.

    ``dp.json`` overrides ``train#trainer#network``/``optimizer``/``train_data_loader`` with this object's
    properties, so ``train.json`` stays unchanged. The network is prepared in place (:func:`prepare_for_dp`), so the
    bundle's evaluator, which holds the same module, validates the DP-trained weights.

    The object is also the update filter that vouches for DP-SGD: it covers the weight delta and the optimiser
    moments (both are post-processing of the noised gradients) and reports the mechanism's settings; and, for the
    patient unit, an Ignite handler that tells the optimizer which patient each item of the batch belongs to.

    Args:
        network: the bundle's ``network``.
        optimizer: the bundle's ``optimizer`` (rebuilt on the prepared network's parameters).
        data_loader: the bundle's ``train#dataloader``; its ``batch_size`` is the expected number of privacy units
            (items, or patients for the patient unit) per step.
        noise_multiplier, max_grad_norm: DP-SGD settings (see :mod:`monai_fedpriv.privacy.regimes`).
        budget: the site's :class:`PrivacyBudget` (shared with every other mechanism of the site).
        seed: the site's noise seed; ``None`` (default) seeds the Poisson sampler and the noise from OS entropy.
        poisson: must stay ``True`` (see :class:`DPSettings`).
        grad_sample_mode, max_physical_batch_size: see :class:`DPSettings`.
        example_input_shape: shape for the preparation dry run; by default the first item of the dataset.
        norm: BatchNorm replacement, ``"instance"`` or ``"group"``.
        image_key: key of the image in the loader's dict batches.
        privacy_unit: ``"slice"``, ``"volume"`` or ``"patient"``.
        patient_key: data-list key of the patient id (patient unit).
        items_per_patient: items an included patient contributes per step (patient unit; ``None`` = all).

    Example (``dp.json``)::

        "dp": {"_target_": "monai_fedpriv.privacy.DPSGD", "network": "@network", "optimizer": "@optimizer",
               "data_loader": "@train#dataloader", "noise_multiplier": 1.0, "max_grad_norm": 0.5,
               "budget": "@privacy_budget", "seed": "@privacy_noise_seed"},
        "train#trainer#network": "$@dp.network"
    """

    covers = frozenset({"delta", "optimizer_state"})

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        budget: PrivacyBudget,
        seed: int | None = None,
        poisson: bool = True,
        grad_sample_mode: str = "hooks",
        max_physical_batch_size: int | None = None,
        example_input_shape: tuple[int, ...] | list[int] | None = None,
        norm: str = "instance",
        image_key: str = "image",
        privacy_unit: str = "slice",
        patient_key: str = "patient",
        items_per_patient: int | None = 1,
    ) -> None:
        self.settings = DPSettings(
            noise_multiplier, max_grad_norm, poisson, grad_sample_mode, max_physical_batch_size, privacy_unit,
            items_per_patient,
        )  # fmt: skip
        if not isinstance(budget, PrivacyBudget):
            raise PrivacyConfigError(f"budget must be the site's PrivacyBudget, got {type(budget).__name__}.")
        self._inputs = (network, optimizer, data_loader)
        self.budget = budget
        self.seed = seed
        self.example_input_shape = tuple(example_input_shape) if example_input_shape is not None else None
        self.norm = norm
        self.image_key = image_key
        self.patient_key = patient_key
        self._sampler_generator = noise_generator(seed, "dp_sampler")
        # draws the FedAvg+Share pool items of each step (used only when the dataset holds "public": True items)
        self._public_generator = noise_generator(seed, "dp_public_sampler")
        self._pending_noise_state: torch.Tensor | None = None
        self.changes: list[str] = []
        self._parts: PrivateParts | None = None

    # ---------------------------------------------------------------- building
    def _first_item(self, loader: DataLoader) -> torch.Tensor:
        """The images one dataset item yields (several with a multi-sample crop), collated."""
        base: Any = loader.dataset
        while hasattr(base, "base"):  # a SeededDataset's base: its item counter must not move
            base = base.base
        batch = loader.collate_fn([base[0]]) if loader.collate_fn is not None else base[0]
        return torch.as_tensor(batch[self.image_key] if isinstance(batch, Mapping) else batch[0])

    def _example(self, network: nn.Module, loader: DataLoader) -> torch.Tensor:
        device = next(network.parameters()).device
        first = self._first_item(loader)
        if first.shape[0] > 1 and self.settings.privacy_unit != "patient":
            raise PrivacyConfigError(
                f"one training item yields {first.shape[0]} samples (a multi-sample crop such as "
                f"RandCropByPosNegLabeld num_samples={first.shape[0]}), so clipping each sample would not bound the "
                f"item's contribution under privacy unit {self.settings.privacy_unit!r}; use privacy unit 'patient' "
                f"(a patient's samples are clipped together) or one sample per item."
            )
        if self.example_input_shape is not None:
            return torch.zeros(self.example_input_shape, device=device)
        return first[:2].to(device)

    def _build(self) -> PrivateParts:
        if self._parts is None:
            from monai_fedpriv.privacy.model_prep import prepare_for_dp

            network, optimizer, loader = self._inputs
            network, self.changes = prepare_for_dp(
                network,
                self._example(network, loader),
                norm=self.norm,
                grad_sample_mode=self.settings.grad_sample_mode,
            )
            noise = noise_generator(self.seed, "dp_noise", next(network.parameters()).device)
            if self._pending_noise_state is not None:
                noise.set_state(self._pending_noise_state)
                self._pending_noise_state = None
            self._parts = make_site_private(
                network,
                optimizer,
                loader,
                settings=self.settings,
                budget=self.budget,
                sampler_generator=self._sampler_generator,
                noise_generator=noise,
                patient_key=self.patient_key,
                public_generator=self._public_generator,
            )
        return self._parts

    @property
    def network(self) -> nn.Module:
        return self._build().network

    @property
    def optimizer(self) -> Any:
        return self._build().optimizer

    @property
    def dataloader(self) -> DataLoader:
        return self._build().data_loader

    @property
    def sample_rate(self) -> float:
        return float(self._build().optimizer.sample_rate)  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- Ignite handler (patient unit)
    def attach(self, engine: Engine) -> None:
        """Give the optimizer the patient of every item before each iteration (patient unit only)."""
        if self.settings.privacy_unit != "patient":
            return
        if not engine.has_event_handler(self._set_groups, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self._set_groups)

    def _set_groups(self, engine: Engine) -> None:
        batch = engine.state.batch
        if not isinstance(batch, Mapping) or self.patient_key not in batch:
            raise DataError(
                f"privacy_unit='patient' needs the {self.patient_key!r} of every item in the batch; the batch has "
                f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}."
            )
        ids = batch[self.patient_key]
        self.optimizer.groups = [str(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]

    # ---------------------------------------------------------------- update filter
    def setup_facts(self) -> dict[str, Any]:
        """What DP-SGD did to the site's network before training (``metrics.json``'s ``setup``): the per-sample
        gradient mode, the privacy unit and every change of the preparation (BatchNorm replaced, in-place activations
        made out-of-place, unused parameters frozen)."""
        return {
            "dp_grad_sample_mode": self.settings.grad_sample_mode,
            "dp_privacy_unit": self.settings.privacy_unit,
            "dp_network_changes": list(self.changes),
        }

    def privacy_facts(self) -> dict[str, Any]:
        """The mechanism's settings, as reported with every update."""
        unit = self.settings.privacy_unit
        facts: dict[str, Any] = {
            "dp": True,
            "dp_sgd": True,
            "noise_multiplier": self.settings.noise_multiplier,
            "max_grad_norm": self.settings.max_grad_norm,
            "privacy_unit": unit,
            "unit_note": UNIT_NOTES[unit],
            "noise_source": noise_source(self.seed),
        }
        if self._parts is not None:
            facts["sample_rate"] = self.sample_rate
            public = getattr(self._parts.data_loader, "public_units", 0)
            if public:  # FedAvg+Share: the epsilon covers the private units only, not these
                facts["public_units"] = public
        if unit == "patient":
            facts["items_per_patient"] = self.settings.items_per_patient
        return facts

    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        priv = privacy_meta(update)
        priv.update(self.privacy_facts())
        return copy_update(update, meta=meta_with_privacy(update, priv))

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Random states of the Poisson sampler and of the noise (and the dataset's augmentation counter, when it
        has one), so a resumed run continues the same draws and never replays old noise.

        (Restarting both generators from the seed would add the *same* noise again after a resume, which an observer
        of successive updates could cancel.) The ledger is saved with the site's budget.
        """
        noise = self._parts.optimizer.generator.get_state() if self._parts is not None else self._pending_noise_state
        state = {
            "sampler_generator": self._sampler_generator.get_state(),
            "noise_generator": noise,
            "public_generator": self._public_generator.get_state(),
        }
        dataset: Any = getattr(self._inputs[2], "dataset", None)
        if hasattr(dataset, "state_dict"):  # e.g. SeededDataset: which augmentation the next sample gets
            state["dataset"] = dataset.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "sampler_generator" not in state or "noise_generator" not in state:
            raise PrivacyConfigError(
                f"DPSGD state needs 'sampler_generator' and 'noise_generator', got {sorted(state)}."
            )
        self._sampler_generator.set_state(state["sampler_generator"])
        if state.get("public_generator") is not None:  # absent from checkpoints written before FedAvg+Share
            self._public_generator.set_state(state["public_generator"])
        dataset: Any = getattr(self._inputs[2], "dataset", None)
        if state.get("dataset") is not None and hasattr(dataset, "load_state_dict"):
            dataset.load_state_dict(state["dataset"])
        if state["noise_generator"] is None:
            return
        if self._parts is not None:
            self._parts.optimizer.generator.set_state(state["noise_generator"])
        else:
            self._pending_noise_state = state["noise_generator"]
