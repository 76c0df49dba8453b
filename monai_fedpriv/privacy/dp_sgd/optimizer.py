"""The DP-SGD optimizer: per-unit clipping (a sample, or every item of one patient together), Gaussian noise, and
a step that never fails open.

Clipping and noise are Opacus' (same clip factors ``min(1, C / (||g|| + 1e-6))``, same noise draws in the same
order), computed without Opacus' intermediate copies. With the patient privacy unit the per-item gradients of one
patient are averaged into one patient gradient before clipping, so one patient moves the clipped sum by at most the
clip norm however many of its slices or crops are in the step.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from monai_fedpriv.errors import PrivacyConfigError

__all__ = ["BudgetedDPOptimizer", "unit_clip_weights"]


def unit_clip_weights(
    samples: Sequence[torch.Tensor], max_grad_norm: float, groups: Sequence[Hashable] | None = None
) -> torch.Tensor:
    """Per-item weights ``w`` such that ``sum_i w_i g_i`` is the sum of the clipped per-unit gradients.

    Args:
        samples: per-item gradients, one ``(n, ...)`` tensor per parameter.
        max_grad_norm: clip norm ``C`` of one unit.
        groups: the unit of each item (patient ids), or ``None`` when every item is its own unit. A unit's gradient
            is the mean of its items' gradients, ``G_p = 1/m_p sum_{i in p} g_i``, clipped as a whole.

    Returns:
        ``(n,)`` weights ``min(1, C / (||G_p|| + 1e-6)) / m_p`` of each item ``i`` in unit ``p``.
    """
    n = samples[0].shape[0]
    device = samples[0].device
    flat = [g.reshape(n, -1) for g in samples]
    if groups is None:
        norms = torch.stack([torch.linalg.vector_norm(f, dim=1).to(device) for f in flat], dim=1)
        return (max_grad_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)
    if len(groups) != n:
        raise PrivacyConfigError(f"{len(groups)} patient ids for a batch of {n} items; cannot clip per patient.")
    ids: dict[Hashable, int] = {}
    index = torch.tensor([ids.setdefault(g, len(ids)) for g in groups], device=device)
    counts = torch.bincount(index, minlength=len(ids)).to(flat[0].dtype)
    averaging = torch.zeros(len(ids), n, dtype=flat[0].dtype, device=device)
    averaging[index, torch.arange(n, device=device)] = 1.0 / counts[index]
    sq = torch.zeros(len(ids), dtype=torch.float64, device=device)
    for f in flat:
        sq += (averaging.to(f.dtype) @ f).pow(2).sum(1).to(torch.float64)
    factor = (max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return (factor[index] / counts[index].to(torch.float64)).to(flat[0].dtype)


class BudgetedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` for one site: unit-level clipping, lean noise, and no plain step.

    Opacus performs a plain, noise-free step when no per-sample gradient exists (e.g. the forward pass was skipped
    for an empty Poisson batch). Here such a step is a batch of size zero: noise is added and the step is counted
    like any other. ``sample_rate`` is the Poisson rate each step is accounted with (of samples or of patients).

    With ``privacy_unit="patient"``, :attr:`groups` must hold the patient id of every item of the batch before the
    step (set by :class:`~monai_fedpriv.privacy.dp_sgd.DPSGD` from the batch); a step without them raises.
    """

    sample_rate: float = float("nan")
    privacy_unit: str = "slice"

    def __init__(self, *args: Any, privacy_unit: str = "slice", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.privacy_unit = privacy_unit
        self.groups: list[Hashable] | None = None

    def clip_and_accumulate(self) -> None:
        """Opacus' per-sample clipping, or per-patient clipping, with the clipped sum as one matrix-vector product
        per parameter."""
        params = self.params
        samples = [self._get_flat_grad_sample(p) for p in params]
        n = len(samples[0]) if samples else 0
        groups, self.groups = self.groups, None
        if n == 0:
            return super().clip_and_accumulate()
        if self.privacy_unit == "patient" and groups is None:
            raise PrivacyConfigError(
                "privacy_unit='patient' but no patient ids were given for this batch: refusing to clip per item."
            )
        weights = unit_clip_weights(samples, self.max_grad_norm, groups if self.privacy_unit == "patient" else None)
        for p, g in zip(params, samples, strict=True):
            _check_processed_flag(p.grad_sample)
            f = g.reshape(n, -1)
            grad = (weights.to(device=f.device, dtype=p.dtype) @ f.to(p.dtype)).view(p.shape)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """Opacus' Gaussian noise (same draws from ``generator``, in the same order) and ``loss_reduction="mean"``
        scaling, written into the fresh noise tensor."""
        if self.secure_mode:
            super().add_noise()
            super().scale_grad()
            return
        std = self.noise_multiplier * self.max_grad_norm
        denom = self.expected_batch_size * self.accumulated_iterations if self.loss_reduction == "mean" else 1
        for p in self.params:
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

    @property
    def mid_logical_batch(self) -> bool:
        """Whether the last physical batch was one of several of a logical batch that has not stepped yet (the
        federated round must not end between them)."""
        return bool(self._is_last_step_skipped)

    def scale_grad(self) -> None:
        """Done in :meth:`add_noise` (``pre_step`` always calls the two together)."""

    def pre_step(self, closure: Any = None) -> bool | None:
        if self.params and all(getattr(p, "grad_sample", None) is None for p in self.params):
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return super().pre_step(closure)
