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
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
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
    PublicMixSampler,
    patients_of,
    public_flags,
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
    public_generator: torch.Generator | None = None,
) -> PrivateParts:
    """Turn a site's (network, optimizer, loader) into DP-SGD parts that ask ``budget`` before every step.

    Args:
        network: a network that passes Opacus' validator (run :func:`prepare_for_dp` first for BatchNorm etc.).
        optimizer: the plain optimizer; it is rebuilt over ``network``'s parameters with the same hyper-parameters.
        data_loader: the site's training loader. Its ``batch_size`` is the expected number of private units per
            step: items (``q = batch_size / items``) or, for the patient unit, patients (``q = batch_size /
            patients``). Items marked ``"public": True`` in the dataset's data list (the FedAvg+Share pool) are not
            counted: they join every step with probability ``q`` each (see :class:`PublicMixSampler`).
        settings: the checked :class:`DPSettings`.
        budget: the site's budget; every step is asked for (:meth:`PrivacyBudget.max_steps`) and then recorded, and
            a step that would pass it raises :class:`~monai_fedpriv.errors.PrivacyBudgetExceeded` before the
            weights change.
        sampler_generator: the Poisson sampler's generator.
        noise_generator: the Gaussian noise's generator (on the parameters' device).
        patient_key: data-list key of the patient id (patient unit).
        public_generator: draws the public items of each step (only used when some are public); by default one
            derived from ``sampler_generator``'s seed. Pass your own to save and restore its state.

    Returns:
        :class:`PrivateParts` ``(network, optimizer, data_loader)``; ``network`` wraps the given module, whose
        parameters it shares (``strip_module_prefix`` its ``state_dict``).
    """
    if not isinstance(budget, PrivacyBudget):
        raise PrivacyConfigError(f"budget must be a PrivacyBudget, got {type(budget).__name__}.")
    generators = {"sampler_generator": sampler_generator, "noise_generator": noise_generator}
    if public_generator is not None:
        generators["public_generator"] = public_generator
    for name, g in generators.items():
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
    public = public_flags(dataset)
    n_public_units = 0
    if any(public):
        private_loader, sample_rate, n_units, n_public_units = _mixed_loader(
            data_loader, public, collate, settings, sampler_generator, public_generator, patient_key
        )
    elif settings.privacy_unit == "patient":
        patients = patients_of(dataset, patient_key)
        n_units = len(set(patients))
        sample_rate = min(1.0, data_loader.batch_size / n_units)
        batches = PatientPoissonSampler(patients, sample_rate, sampler_generator, settings.items_per_patient)
        private_loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, **worker_settings(data_loader))
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
    # the mean is over every unit expected in a step, public ones included (only a constant scale: no privacy effect)
    expected_batch_size = max(1, int(round((n_units + n_public_units) * sample_rate)))

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
    loader = NoiseOnEmptyDataLoader(private_loader, dp_opt)
    loader.public_units = n_public_units
    return PrivateParts(private_net, dp_opt, loader)


def _mixed_loader(
    data_loader: DataLoader,
    public: list[bool],
    collate: EmptySafeCollate,
    settings: DPSettings,
    sampler_generator: torch.Generator,
    public_generator: torch.Generator | None,
    patient_key: str,
) -> tuple[DataLoader, float, int, int]:
    """The Poisson loader of a dataset holding public items: ``q = batch_size / private units`` (what the accountant
    gets), private units drawn from ``sampler_generator`` as without public items (but over the private ones only),
    public units at the same rate ``q`` from their own generator.

    Returns:
        ``(loader, q, private units, public units)``.
    """
    from monai_fedpriv.data.stream import derive_seed

    dataset = data_loader.dataset
    private_index = [i for i, p in enumerate(public) if not p]
    public_index = [i for i, p in enumerate(public) if p]
    if not private_index:
        raise PrivacyConfigError("every training item is marked public: there is no private data for DP-SGD.")
    if public_generator is None:
        public_generator = torch.Generator().manual_seed(derive_seed(sampler_generator.initial_seed(), "public"))
    batch_size = int(data_loader.batch_size)  # type: ignore[arg-type]
    private: Any
    shared: Any
    if settings.privacy_unit == "patient":
        patients = patients_of(dataset, patient_key)
        mine, theirs = [patients[i] for i in private_index], [patients[i] for i in public_index]
        both = set(mine) & set(theirs)
        if both:
            raise PrivacyConfigError(
                f"patients {sorted(map(str, both))[:5]} have both public and private items; a patient is either in "
                "the share pool or private, never both."
            )
        n_units, n_public = len(set(mine)), len(set(theirs))
        q = min(1.0, batch_size / n_units)
        private = PatientPoissonSampler(mine, q, sampler_generator, settings.items_per_patient)
        shared = PatientPoissonSampler(theirs, q, public_generator, settings.items_per_patient, steps=len(private))
    else:
        n_units, n_public = len(private_index), len(public_index)
        q = min(1.0, batch_size / n_units)
        private = UniformWithReplacementSampler(num_samples=n_units, sample_rate=q, generator=sampler_generator)
        shared = UniformWithReplacementSampler(
            num_samples=n_public, sample_rate=q, generator=public_generator, steps=len(private)
        )
    batches = PublicMixSampler(private, shared, private_index, public_index)
    loader = DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, generator=sampler_generator, **worker_settings(data_loader)
    )
    loader.sample_rate = q  # type: ignore[attr-defined]
    return loader, q, n_units, n_public
