"""Per-sample segmentation losses for DP-SGD, and the privacy unit they protect.

DP-SGD clips each sample's gradient, so the batch loss must be the mean of independent per-sample losses
``L = 1/B * sum_i l(x_i, y_i)``. Losses that couple samples (MONAI's ``DiceLoss(batch=True)`` pools the Dice
over the batch) make one sample's gradient depend on the others and void the clipping argument; they are refused.

The privacy unit is what one dataset item is: a ``"slice"``, a ``"volume"`` or a ``"patient"``. The guarantee is
record-level for that unit (seed 000, section 3.2, reports record-level guarantees). For ``"patient"``, each item
must be a distinct patient: :func:`check_privacy_unit` refuses a batch (or data list) holding two items of one
patient, read from a ``"patient"`` key.

Example:
    >>> loss = PerSampleLoss("dicece", privacy_unit="slice")
    >>> pred, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    >>> loss.per_sample(pred, label).shape
    torch.Size([2])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from monai_fedpriv.errors import DataError, PrivacyConfigError

__all__ = ["PRIVACY_UNITS", "PerSampleLoss", "check_privacy_unit"]

PRIVACY_UNITS = ("slice", "volume", "patient")
_NAMED = {"dice": DiceLoss, "dicece": DiceCELoss}


def _couples_samples(loss: nn.Module) -> str | None:
    """Name the setting that makes ``loss`` mix samples, or ``None``."""
    for name, module in loss.named_modules():
        if getattr(module, "batch", False) is True:
            return f"{type(module).__name__}{' (' + name + ')' if name else ''} has batch=True"
    return None


def check_privacy_unit(batch: Mapping[str, Any] | Sequence[Mapping[str, Any]], privacy_unit: str, key: str = "patient"):
    """Refuse a batch or data list that breaks the ``"patient"`` privacy unit (two items of one patient).

    Args:
        batch: a collated dict batch (``batch[key]`` is a list/tensor of ids) or a list of item dicts.
        privacy_unit: ``"slice"``, ``"volume"`` (nothing to check) or ``"patient"``.
        key: the item key holding the patient id.

    Raises:
        PrivacyConfigError: unknown unit. DataError: missing ``key`` or a repeated patient.
    """
    if privacy_unit not in PRIVACY_UNITS:
        raise PrivacyConfigError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {privacy_unit!r}.")
    if privacy_unit != "patient":
        return
    if isinstance(batch, Mapping):
        if key not in batch:
            raise DataError(f"privacy_unit='patient' needs a {key!r} entry in every batch; got keys {sorted(batch)}.")
        ids = batch[key]
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    else:
        missing = [i for i, item in enumerate(batch) if key not in item]
        if missing:
            raise DataError(f"privacy_unit='patient' needs a {key!r} key; items {missing[:5]} lack it.")
        ids = [item[key] for item in batch]
    counts = Counter(ids)
    repeated = sorted(str(i) for i, n in counts.items() if n > 1)
    if repeated:
        raise DataError(
            f"privacy_unit='patient' but patients {repeated[:5]} appear more than once; a patient-level guarantee "
            f"needs one item per patient (merge their slices/crops into one item)."
        )


class PerSampleLoss(nn.Module):
    """Mean of per-sample losses, computed sample by sample so that no sample's loss depends on another's.

    Args:
        loss: ``"dice"`` or ``"dicece"`` (MONAI losses with ``to_onehot_y=True, softmax=True`` unless overridden
            in ``loss_kwargs``) or a loss module that does not couple samples.
        privacy_unit: ``"slice"``, ``"volume"`` or ``"patient"``; stored for reports and batch checks.
        patient_key: batch key holding patient ids (for ``privacy_unit="patient"``).
        loss_kwargs: passed to the named MONAI loss.

    Raises:
        PrivacyConfigError: a loss that couples samples (``batch=True``), or an unknown unit.
    """

    def __init__(
        self, loss: str | nn.Module = "dicece", privacy_unit: str = "slice", patient_key: str = "patient", **loss_kwargs
    ) -> None:
        super().__init__()
        if privacy_unit not in PRIVACY_UNITS:
            raise PrivacyConfigError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {privacy_unit!r}.")
        if isinstance(loss, str):
            if loss not in _NAMED:
                raise PrivacyConfigError(f"loss must be one of {sorted(_NAMED)} or an nn.Module, got {loss!r}.")
            loss = _NAMED[loss](**{"to_onehot_y": True, "softmax": True, **loss_kwargs})
        elif loss_kwargs:
            raise PrivacyConfigError(f"loss_kwargs {sorted(loss_kwargs)} only apply to a named loss.")
        if not isinstance(loss, nn.Module):
            raise PrivacyConfigError(f"loss must be a string or nn.Module, got {type(loss).__name__}.")
        why = _couples_samples(loss)
        if why:
            raise PrivacyConfigError(f"{why}: it couples the samples of a batch, which DP-SGD cannot clip per sample.")
        self.loss = loss
        self.privacy_unit = privacy_unit
        self.patient_key = patient_key

    def per_sample(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Loss of each sample, shape ``(B,)``."""
        values = [self.loss(pred[i : i + 1], label[i : i + 1]).mean() for i in range(pred.shape[0])]
        return torch.stack(values) if values else pred.sum(dim=tuple(range(1, pred.ndim))) * 0.0

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if pred.shape[0] != label.shape[0]:
            raise DataError(f"pred has batch {pred.shape[0]} but label has {label.shape[0]}.")
        if pred.shape[0] == 0:  # empty Poisson batch: zero loss, keeps the graph (the optimizer still adds noise)
            return pred.sum() * 0.0
        return self.per_sample(pred, label).mean()

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Enforce the privacy unit on one collated batch (see :func:`check_privacy_unit`)."""
        check_privacy_unit(batch, self.privacy_unit, self.patient_key)

    def attach(self, engine: Any) -> None:
        """Check every batch of an Ignite engine before its iteration (a handler, for ``train#handlers``)."""
        from ignite.engine import Events

        if not engine.has_event_handler(self._on_iteration, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self._on_iteration)

    def _on_iteration(self, engine: Any) -> None:
        batch = engine.state.batch
        if isinstance(batch, Mapping):
            self.check_batch(batch)
        elif self.privacy_unit == "patient":
            raise DataError(f"privacy_unit='patient' needs dict batches with {self.patient_key!r}; got {type(batch)}.")
