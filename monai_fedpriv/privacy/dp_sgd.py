"""DP-SGD at a site (Abadi et al. 2016): Poisson-sampled loader, per-sample clipping and Gaussian noise, accounting.

Built from Opacus pieces (``GradSampleModule``, ``DPOptimizer``, ``DPDataLoader``, ``BatchMemoryManager``) and
wired *before* the engine runs, so a MONAI ``SupervisedTrainer`` and its handlers train privately without a change
to their loop. Every real optimizer step (empty Poisson batches included: they still release noise) records one
sampled-Gaussian step in the site's :class:`~monai_fedpriv.privacy.accounting.PrivacyLedger`. Empty draws are
stepped (noise only) by the loader itself and never reach the engine (:class:`NoiseOnEmptyDataLoader`).

Per-sample gradient modes (``grad_sample_mode``, :mod:`monai_fedpriv.privacy.grad_sample`): ``"hooks"`` (default:
frozen-weight forward, tensor hooks, per-shape convolution samplers; works with MONAI's in-place residual adds and
DynUNet's shared ``skip_layers``, on which stock Opacus crashes or double-counts), ``"microbatch"`` (exact for any
network, slow), ``"opacus_hooks"``, ``"functorch"``. The clipping and noise are Opacus' (same clip factors,
same noise draws in the same order), computed without Opacus' intermediate copies (:class:`_LedgerDPOptimizer`).

Example:
    >>> ledger = PrivacyLedger()
    >>> parts = make_site_private(net, opt, loader, noise_multiplier=1.0, max_grad_norm=0.5, ledger=ledger,
    ...                           generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    >>> trainer = SupervisedTrainer(..., network=parts.network, optimizer=parts.optimizer,
    ...                             train_data_loader=parts.data_loader)  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.fl.weights import strip_prefixes
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.grad_sample import (
    GRAD_SAMPLE_MODES,
    MicroBatchGradSampleModule,
    TensorHookGradSampleModule,
    empty_like_batch,
    wrap_for_grad_sample,
)

__all__ = [
    "GRAD_SAMPLE_MODES",
    "DPSGD",
    "DPSettings",
    "MicroBatchGradSampleModule",
    "PrivateParts",
    "NoiseOnEmptyDataLoader",
    "TensorHookGradSampleModule",
    "make_site_private",
    "rebuild_optimizer",
    "strip_module_prefix",
]


class _LedgerDPOptimizer(DPOptimizer):
    """``DPOptimizer`` whose step never fails open: a step without any per-sample gradient is an empty batch.

    Opacus performs a plain, noise-free step when no per-sample gradient exists (e.g. the forward pass was skipped
    for an empty Poisson batch). Here such a step is treated as a batch of size zero: noise is added and the step
    is counted like any other. ``sample_rate`` is the Poisson rate each step is accounted with.
    """

    sample_rate: float = float("nan")

    def clip_and_accumulate(self) -> None:
        """Opacus' per-sample clipping (same factors ``min(1, C / (||g_i|| + 1e-6))``), with the clipped sum taken as
        one matrix-vector product per parameter instead of an ``einsum`` over a broadcast copy."""
        params = self.params
        samples = [self._get_flat_grad_sample(p) for p in params]
        n = len(samples[0]) if samples else 0
        if n == 0:
            return super().clip_and_accumulate()
        flat = [g.reshape(n, -1) for g in samples]
        device = flat[0].device
        norms = torch.stack([torch.linalg.vector_norm(f, dim=1).to(device) for f in flat], dim=1)
        factor = (self.max_grad_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)
        for p, f in zip(params, flat, strict=True):
            _check_processed_flag(p.grad_sample)
            grad = (factor.to(device=f.device, dtype=p.dtype) @ f.to(p.dtype)).view(p.shape)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """Opacus' Gaussian noise (same draws from ``generator``, in the same order) and ``loss_reduction="mean"``
        scaling, written into the fresh noise tensor (Opacus allocates a zero buffer per parameter and, in
        :meth:`scale_grad`, recounts the accumulated iterations once per parameter)."""
        if self.secure_mode:
            super().add_noise()
            super().scale_grad()
            return
        params = self.params
        std = self.noise_multiplier * self.max_grad_norm
        denom = self.expected_batch_size * self.accumulated_iterations if self.loss_reduction == "mean" else 1
        for p in params:
            _check_processed_flag(p.summed_grad)
            ref = p.summed_grad
            if std > 0:
                grad = torch.normal(
                    mean=0, std=std, size=ref.shape, device=ref.device, generator=self.generator, dtype=ref.dtype
                )
                grad.add_(ref)
            else:
                grad = ref.clone()
            if denom != 1:
                grad.div_(denom)
            p.grad = grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Done in :meth:`add_noise` (``pre_step`` always calls the two together)."""

    def pre_step(self, closure: Any = None) -> bool | None:
        if self.params and all(getattr(p, "grad_sample", None) is None for p in self.params):
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return super().pre_step(closure)


class _EmptySafeCollate:
    """Collate for Poisson batches: an empty batch becomes tensors with a zero batch dimension, same structure.

    Opacus' wrapper learns the structure from the first non-empty batch and fails on dict samples when the very
    first batch is empty; this one collates ``dataset[0]`` to learn it instead (only shapes/dtypes are kept).
    """

    def __init__(self, collate_fn: Any, dataset: Any) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset
        self.template: Any = None

    def __call__(self, items: list[Any]) -> Any:
        if items:
            out = self.collate_fn(items)
            if self.template is None:
                self.template = empty_like_batch(out)
            return out
        if self.template is None:
            # read through a SeededDataset's base: only shapes are kept, and its item counter must not move
            base = getattr(self.dataset, "base", self.dataset)
            self.template = empty_like_batch(self.collate_fn([base[0]]))
        return self.template


def _batch_len(batch: Any) -> int | None:
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else None
    values = list(batch.values()) if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    if isinstance(batch, (list, tuple)) and len(batch) == 0:
        return 0
    for v in values:
        n = _batch_len(v)
        if n is not None:
            return n
    return None


class NoiseOnEmptyDataLoader(DataLoader):
    """Poisson loader that never hands an empty batch to the training loop.

    An empty draw still has to release noise (the accounting assumes one noised step per draw), but MONAI's
    ``SupervisedTrainer`` cannot process a zero-sized batch (``decollate_batch`` fails, InstanceNorm rejects it). So
    the loader itself takes the noise-only step (``optimizer.zero_grad(); optimizer.step()``, counted in the ledger)
    and moves on to the next draw. If that step would pass a privacy budget (``PrivacyBudgetExceeded`` from a
    budget guard), iteration ends.
    """

    def __init__(self, loader: DataLoader, optimizer: DPOptimizer) -> None:
        super().__init__(
            loader.dataset,
            batch_sampler=loader.batch_sampler,
            collate_fn=loader.collate_fn,
            # Not the sampler's generator: every new iterator draws a worker base seed from this one, which would
            # shift the Poisson draws by how often the iterator was restarted (a resumed run restarts it once more).
            generator=_derived_generator(loader.generator),
            **_worker_settings(loader),
        )
        self.optimizer = optimizer
        self.sample_rate = getattr(loader, "sample_rate", None)
        self.empty_steps = 0

    def __iter__(self):  # type: ignore[override]
        from monai_fedpriv.errors import PrivacyBudgetExceeded

        for batch in super().__iter__():
            if _batch_len(batch) == 0:
                self.optimizer.zero_grad()
                try:
                    self.optimizer.step()
                except PrivacyBudgetExceeded:
                    return
                self.empty_steps += 1
                continue
            yield batch


def _worker_settings(loader: DataLoader) -> dict[str, Any]:
    """How ``loader`` runs its workers, to carry over to the loader that replaces it."""
    names = ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context", "prefetch_factor",
             "persistent_workers")  # fmt: skip
    return {name: getattr(loader, name) for name in names}


def _derived_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None:
        return None
    return torch.Generator().manual_seed((generator.initial_seed() * 2862933555777941757 + 3037000493) % 2**63)


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

    See :func:`make_site_private` for the meaning of each field.
    """

    noise_multiplier: float
    max_grad_norm: float
    poisson: bool = True
    grad_sample_mode: str = "hooks"
    max_physical_batch_size: int | None = None

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
        if not isinstance(self.poisson, bool):
            raise PrivacyConfigError(f"poisson must be True or False, got {self.poisson!r}.")


def make_site_private(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    ledger: PrivacyLedger,
    poisson: bool = True,
    generator: torch.Generator,
    grad_sample_mode: str = "hooks",
    max_physical_batch_size: int | None = None,
) -> PrivateParts:
    """Turn a site's (network, optimizer, loader) into DP-SGD parts that record into ``ledger``.

    Args:
        network: a network that passes Opacus' validator (run :func:`prepare_for_dp` first for BatchNorm etc.).
        optimizer: the plain optimizer; it is rebuilt over ``network``'s parameters with the same hyper-parameters.
        data_loader: the site's training loader; Poisson rate ``q = batch_size / len(dataset)``, so its
            ``batch_size`` is the expected (logical) batch size.
        noise_multiplier: sigma, noise std over the clip norm, > 0.
        max_grad_norm: per-sample L2 clip norm ``C``, > 0.
        ledger: the site's ledger for the whole run; one sampled-Gaussian step is recorded per optimizer step.
        poisson: Poisson sampling (required by the accounting); ``False`` keeps the loader's batches and warns.
        generator: seeds both the Poisson sampler and the noise (a noise generator is derived from it).
        grad_sample_mode: one of :data:`GRAD_SAMPLE_MODES`.
        max_physical_batch_size: split logical batches into physical ones of at most this size
            (``BatchMemoryManager``); the optimizer steps once per logical batch.

    Returns:
        :class:`PrivateParts` ``(network, optimizer, data_loader)``; ``network`` wraps the given module, whose
        parameters it shares (``strip_module_prefix`` its ``state_dict``).
    """
    if not isinstance(ledger, PrivacyLedger):
        raise PrivacyConfigError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}.")
    if not isinstance(generator, torch.Generator):
        raise PrivacyConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
    DPSettings(noise_multiplier, max_grad_norm, poisson, grad_sample_mode, max_physical_batch_size)
    if isinstance(network, (GradSampleModule, MicroBatchGradSampleModule)) or isinstance(optimizer, DPOptimizer):
        raise PrivacyConfigError("network/optimizer are already private; pass the plain objects.")
    if not isinstance(data_loader, DataLoader) or data_loader.batch_size is None:
        raise PrivacyConfigError(f"data_loader must be a DataLoader with a batch_size, got {data_loader!r}.")
    errors = ModuleValidator.validate(network.train())
    if errors:
        raise PrivacyConfigError(
            f"{type(network).__name__} is not DP-compatible ({errors[0]}); call prepare_for_dp(network, x) first."
        )
    n_data = len(data_loader.dataset)  # type: ignore[arg-type]
    if n_data < 1:
        raise PrivacyConfigError("data_loader.dataset is empty.")
    if poisson:
        # q = batch_size / N (not Opacus' 1 / len(loader)): the loader may be a stream whose length is a chosen
        # epoch length rather than N / batch_size.
        private_loader: DataLoader = DPDataLoader(
            dataset=data_loader.dataset,
            sample_rate=min(1.0, data_loader.batch_size / n_data),
            collate_fn=data_loader.collate_fn,
            generator=generator,
            **_worker_settings(data_loader),
        )
        private_loader.collate_fn = _EmptySafeCollate(data_loader.collate_fn, data_loader.dataset)
        sample_rate = private_loader.sample_rate  # type: ignore[attr-defined]
    else:
        warnings.warn(
            "poisson=False: epsilon is computed as if batches were Poisson-sampled (as Opacus does); "
            "the guarantee is only heuristic for shuffled fixed-size batches.",
            stacklevel=2,
        )
        private_loader = data_loader
        sample_rate = min(1.0, data_loader.batch_size / n_data)
    expected_batch_size = max(1, int(round(n_data * sample_rate)))

    private_net = wrap_for_grad_sample(network, grad_sample_mode)
    params_device = next(network.parameters()).device
    noise_gen = torch.Generator(device=params_device)
    # derived from the sampler's seed without consuming its stream (an LCG step keeps the two streams apart)
    noise_gen.manual_seed((generator.initial_seed() * 6364136223846793005 + 1442695040888963407) % 2**63)
    dp_opt = _LedgerDPOptimizer(
        rebuild_optimizer(optimizer, network),
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_gen,
    )

    def record(opt: DPOptimizer) -> None:
        ledger.record_sampled_gaussian(sample_rate=sample_rate, noise_multiplier=opt.noise_multiplier)

    dp_opt.sample_rate = sample_rate
    dp_opt.attach_step_hook(record)
    if max_physical_batch_size is not None:
        private_loader = BatchMemoryManager(
            data_loader=private_loader, max_physical_batch_size=max_physical_batch_size, optimizer=dp_opt
        ).__enter__()
    if poisson:
        private_loader = NoiseOnEmptyDataLoader(private_loader, dp_opt)
    return PrivateParts(private_net, dp_opt, private_loader)


class DPSGD:
    """Bundle-facing wrapper: builds the private network, optimizer and loader lazily, once, from bundle objects.

    ``configs/dp.json`` overrides ``train#trainer#network``/``optimizer``/``train_data_loader`` with this object's
    properties, so ``train.json`` stays unchanged. The network is prepared in place (:func:`prepare_for_dp`),
    so the bundle's evaluator, which holds the same module, validates the DP-trained weights.

    Args:
        network: the bundle's ``network``.
        optimizer: the bundle's ``optimizer`` (rebuilt on the prepared network's parameters).
        data_loader: the bundle's ``train#dataloader``.
        noise_multiplier, max_grad_norm: DP-SGD settings (see :mod:`monai_fedpriv.privacy.regimes`).
        seed: seeds the Poisson sampler and the noise.
        ledger: the site's ledger; a new one when ``None``.
        example_input_shape: shape for the preparation dry run; by default the first batch's ``image_key`` item.
        norm: BatchNorm replacement, ``"instance"`` or ``"group"``.
        image_key: key of the image in the loader's dict batches.
        budget_handler: a :class:`~monai_fedpriv.handlers.dp_budget.PrivacyBudgetHandler` whose step guard is
            bound to the DP optimizer as soon as it is built (so the budget holds even before the handler is
            attached to an engine).

    Example (``configs/dp.json``)::

        "dp": {"_target_": "monai_fedpriv.privacy.DPSGD", "network": "@network", "optimizer": "@optimizer",
               "data_loader": "@train#dataloader", "noise_multiplier": 1.0, "max_grad_norm": 0.5},
        "train#trainer#network": "$@dp.network"
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        seed: int = 0,
        ledger: PrivacyLedger | None = None,
        poisson: bool = True,
        grad_sample_mode: str = "hooks",
        max_physical_batch_size: int | None = None,
        example_input_shape: tuple[int, ...] | list[int] | None = None,
        norm: str = "instance",
        image_key: str = "image",
        budget_handler: Any = None,
    ) -> None:
        self.settings = DPSettings(noise_multiplier, max_grad_norm, poisson, grad_sample_mode, max_physical_batch_size)
        self._inputs = (network, optimizer, data_loader)
        self.seed = int(seed)
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        self.example_input_shape = tuple(example_input_shape) if example_input_shape is not None else None
        self.norm = norm
        self.image_key = image_key
        self.budget_handler = budget_handler
        self._sampler_generator = torch.Generator().manual_seed(self.seed)
        self._pending_state: dict[str, Any] | None = None
        self.changes: list[str] = []
        self._parts: PrivateParts | None = None

    def _example(self, network: nn.Module, loader: DataLoader) -> torch.Tensor:
        device = next(network.parameters()).device
        if self.example_input_shape is not None:
            return torch.zeros(self.example_input_shape, device=device)
        batch = next(iter(loader))
        image = batch[self.image_key] if isinstance(batch, Mapping) else batch[0]
        return torch.as_tensor(image)[:2].to(device)

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
            self._parts = make_site_private(
                network,
                optimizer,
                loader,
                ledger=self.ledger,
                generator=self._sampler_generator,
                **asdict(self.settings),
            )
            if self.budget_handler is not None:
                self.budget_handler.set_optimizer(self._parts.optimizer)
            if self._pending_state is not None:
                self._parts.optimizer.generator.set_state(self._pending_state["noise_generator"])
                self._pending_state = None
        return self._parts

    def state_dict(self) -> dict[str, Any]:
        """Random states of the Poisson sampler and of the noise (and the dataset's augmentation counter, when it
        has one), so a resumed run continues the same draws and never replays old noise.

        (Restarting both generators from the seed would add the *same* noise again after a resume, which an observer
        of successive updates could cancel.) The ledger is saved by the budget handler.
        """
        noise = self._parts.optimizer.generator.get_state() if self._parts is not None else None
        if noise is None and self._pending_state is not None:
            noise = self._pending_state["noise_generator"]
        state = {"sampler_generator": self._sampler_generator.get_state(), "noise_generator": noise}
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
        dataset: Any = getattr(self._inputs[2], "dataset", None)
        if state.get("dataset") is not None and hasattr(dataset, "load_state_dict"):
            dataset.load_state_dict(state["dataset"])
        if state["noise_generator"] is None:
            return
        if self._parts is not None:
            self._parts.optimizer.generator.set_state(state["noise_generator"])
        else:
            self._pending_state = {"noise_generator": state["noise_generator"]}

    @property
    def network(self) -> nn.Module:
        return self._build().network

    @property
    def optimizer(self) -> DPOptimizer:
        return self._build().optimizer

    @property
    def dataloader(self) -> DataLoader:
        return self._build().data_loader

    @property
    def sample_rate(self) -> float:
        return float(self._build().optimizer.sample_rate)  # type: ignore[attr-defined]
