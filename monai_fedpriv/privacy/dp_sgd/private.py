"""Turn a site's (network, optimizer, loader) into DP-SGD parts that ask the site's budget before every step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.fl.weights import strip_prefixes
from monai_fedpriv.privacy.accounting import SampledGaussianEvent
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.dp_sgd.loaders import (
    EmptySafeCollate,
    NoiseOnEmptyDataLoader,
    PatientPoissonSampler,
    patients_of,
    worker_settings,
)
from monai_fedpriv.privacy.dp_sgd.optimizer import BudgetedDPOptimizer
from monai_fedpriv.privacy.grad_sample import GRAD_SAMPLE_MODES, MicroBatchGradSampleModule, wrap_for_grad_sample
from monai_fedpriv.privacy.losses import PRIVACY_UNITS

__all__ = ["DPSettings", "PrivateParts", "make_site_private", "rebuild_optimizer", "strip_module_prefix"]


class PrivateParts(NamedTuple):
    """What :func:`make_site_private` returns: use all three in the trainer."""

    network: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Opacus' ``_module.`` key prefix removed (at any depth) so DP-trained weights load into the plain network;
    :func:`monai_fedpriv.fl.weights.strip_prefixes` under the name Opacus users look for.

    Example:
        >>> strip_module_prefix({"_module.conv.weight": 1})
        {'conv.weight': 1}
    """
    return strip_prefixes(state_dict)


def rebuild_optimizer(optimizer: torch.optim.Optimizer, network: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of the same class and hyper-parameters over ``network``'s trainable parameters.

    Parameters still present keep their param group; parameters that are new (e.g. from a converted norm layer)
    join the first group. Frozen parameters are left out.
    """
    if isinstance(optimizer, DPOptimizer):
        raise PrivacyConfigError("optimizer is already a DPOptimizer; pass the plain torch optimizer.")
    trainable = [p for p in network.parameters() if p.requires_grad]
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    groups: list[dict[str, Any]] = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in optimizer.param_groups
    ]
    for p in trainable:
        groups[group_of.get(id(p), 0)]["params"].append(p)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise PrivacyConfigError(f"{type(network).__name__} has no trainable parameters.")
    return type(optimizer)(groups, **optimizer.defaults)


@dataclass(frozen=True)
class DPSettings:
    """How a site runs DP-SGD, checked at construction (privacy fails closed: a bad value never reaches training).

    Args:
        noise_multiplier: sigma, noise std over the clip norm, finite and > 0.
        max_grad_norm: clip norm ``C`` of one privacy unit, finite and > 0.
        poisson: must be ``True``: the accounting is that of Poisson sampling, and shuffled fixed-size batches
            would be accounted for a guarantee they do not have.
        grad_sample_mode: one of :data:`~monai_fedpriv.privacy.grad_sample.GRAD_SAMPLE_MODES`.
        max_physical_batch_size: split logical batches into physical ones of at most this size, or ``None``.
        privacy_unit: ``"slice"``, ``"volume"`` (one dataset item is the unit) or ``"patient"``.
        items_per_patient: for the patient unit, items an included patient contributes to a step (``None``: all).
    """

    noise_multiplier: float
    max_grad_norm: float
    poisson: bool = True
    grad_sample_mode: str = "hooks"
    max_physical_batch_size: int | None = None
    privacy_unit: str = "slice"
    items_per_patient: int | None = 1

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise PrivacyConfigError(f"{name} must be a finite number > 0, got {value!r}.")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyConfigError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}."
            )
        size = self.max_physical_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise PrivacyConfigError(f"max_physical_batch_size must be an int >= 1 or None, got {size!r}.")
        if self.poisson is not True:
            raise PrivacyConfigError(
                f"poisson={self.poisson!r}: DP-SGD here is accounted as Poisson sampling, so batches must be "
                "Poisson-sampled; fixed-size shuffled batches would carry an epsilon they do not have."
            )
        if self.privacy_unit not in PRIVACY_UNITS:
            raise PrivacyConfigError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {self.privacy_unit!r}.")
        k = self.items_per_patient
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise PrivacyConfigError(f"items_per_patient must be an int >= 1 or None (all items), got {k!r}.")
        if self.privacy_unit == "patient" and size is not None:
            raise PrivacyConfigError(
                "privacy_unit='patient' cannot split batches into physical batches (max_physical_batch_size): a "
                "patient's items could land in different physical batches and be clipped separately."
            )


def make_site_private(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    settings: DPSettings,
    budget: PrivacyBudget,
    sampler_generator: torch.Generator,
    noise_generator: torch.Generator,
    patient_key: str = "patient",
) -> PrivateParts:
    """Turn a site's (network, optimizer, loader) into DP-SGD parts that ask ``budget`` before every step.

    Args:
        network: a network that passes Opacus' validator (run :func:`prepare_for_dp` first for BatchNorm etc.).
        optimizer: the plain optimizer; it is rebuilt over ``network``'s parameters with the same hyper-parameters.
        data_loader: the site's training loader. Its ``batch_size`` is the expected number of units per step:
            items (``q = batch_size / items``) or, for the patient unit, patients (``q = batch_size / patients``).
        settings: the checked :class:`DPSettings`.
        budget: the site's budget; every step is asked for (:meth:`PrivacyBudget.max_steps`) and then recorded, and
            a step that would pass it raises :class:`~monai_fedpriv.errors.PrivacyBudgetExceeded` before the
            weights change.
        sampler_generator: the Poisson sampler's generator.
        noise_generator: the Gaussian noise's generator (on the parameters' device).
        patient_key: data-list key of the patient id (patient unit).

    Returns:
        :class:`PrivateParts` ``(network, optimizer, data_loader)``; ``network`` wraps the given module, whose
        parameters it shares (``strip_module_prefix`` its ``state_dict``).
    """
    if not isinstance(budget, PrivacyBudget):
        raise PrivacyConfigError(f"budget must be a PrivacyBudget, got {type(budget).__name__}.")
    for name, g in (("sampler_generator", sampler_generator), ("noise_generator", noise_generator)):
        if not isinstance(g, torch.Generator):
            raise PrivacyConfigError(f"{name} must be a torch.Generator, got {type(g).__name__}.")
    if isinstance(network, (GradSampleModule, MicroBatchGradSampleModule)) or isinstance(optimizer, DPOptimizer):
        raise PrivacyConfigError("network/optimizer are already private; pass the plain objects.")
    if not isinstance(data_loader, DataLoader) or data_loader.batch_size is None:
        raise PrivacyConfigError(f"data_loader must be a DataLoader with a batch_size, got {data_loader!r}.")
    errors = ModuleValidator.validate(network.train())
    if errors:
        raise PrivacyConfigError(
            f"{type(network).__name__} is not DP-compatible ({errors[0]}); call prepare_for_dp(network, x) first."
        )
    dataset = data_loader.dataset
    n_data = len(dataset)  # type: ignore[arg-type]
    if n_data < 1:
        raise PrivacyConfigError("data_loader.dataset is empty.")
    collate = EmptySafeCollate(data_loader.collate_fn, dataset)
    if settings.privacy_unit == "patient":
        patients = patients_of(dataset, patient_key)
        n_units = len(set(patients))
        sample_rate = min(1.0, data_loader.batch_size / n_units)
        batches = PatientPoissonSampler(patients, sample_rate, sampler_generator, settings.items_per_patient)
        private_loader: DataLoader = DataLoader(
            dataset, batch_sampler=batches, collate_fn=collate, **worker_settings(data_loader)
        )
        private_loader.sample_rate = sample_rate  # type: ignore[attr-defined]
    else:
        n_units = n_data
        # q = batch_size / N (not Opacus' 1 / len(loader)): the loader may be a stream whose length is a chosen
        # epoch length rather than N / batch_size.
        sample_rate = min(1.0, data_loader.batch_size / n_data)
        private_loader = DPDataLoader(
            dataset=dataset,
            sample_rate=sample_rate,
            collate_fn=data_loader.collate_fn,
            generator=sampler_generator,
            **worker_settings(data_loader),
        )
        private_loader.collate_fn = collate
    expected_batch_size = max(1, int(round(n_units * sample_rate)))

    private_net = wrap_for_grad_sample(network, settings.grad_sample_mode)
    dp_opt = BudgetedDPOptimizer(
        rebuild_optimizer(optimizer, network),
        noise_multiplier=float(settings.noise_multiplier),
        max_grad_norm=float(settings.max_grad_norm),
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
        privacy_unit=settings.privacy_unit,
    )
    dp_opt.sample_rate = sample_rate
    event = SampledGaussianEvent(sample_rate, float(settings.noise_multiplier))

    def ask_then_record(opt: DPOptimizer) -> None:
        # runs after clipping and noise, before the weights change: a refused step never updates the model
        if not budget.step_fits(event.sample_rate, event.noise_multiplier):
            raise PrivacyBudgetExceeded(f"DP-SGD step refused: {budget.stop_reason}.")
        budget.record(event)

    dp_opt.attach_step_hook(ask_then_record)
    if settings.max_physical_batch_size is not None:
        private_loader = BatchMemoryManager(
            data_loader=private_loader, max_physical_batch_size=settings.max_physical_batch_size, optimizer=dp_opt
        ).__enter__()
    private_loader = NoiseOnEmptyDataLoader(private_loader, dp_opt)
    return PrivateParts(private_net, dp_opt, private_loader)
