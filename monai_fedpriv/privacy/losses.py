"""Per-sample segmentation losses for DP-SGD.

DP-SGD clips each sample's gradient, so the batch loss must be the mean of independent per-sample losses
``L = 1/B * sum_i l(x_i, y_i)``. Losses that couple samples (MONAI's ``DiceLoss(batch=True)`` pools the Dice
over the batch) make one sample's gradient depend on the others and void the clipping argument; they are refused.

``dp.json`` wraps the bundle's own loss: ``"train#trainer#loss_function": {"_target_": "...PerSampleLoss",
"loss": "@loss"}``. The privacy unit (slice, volume or patient) is a setting of DP-SGD, not of the loss
(:class:`~monai_fedpriv.privacy.dp_sgd.DPSettings`).

Example:
    >>> loss = PerSampleLoss("dicece")
    >>> pred, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    >>> loss.per_sample(pred, label).shape
    torch.Size([2])
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from monai_fedpriv.errors import DataError, PrivacyConfigError

__all__ = ["PRIVACY_UNITS", "PerSampleLoss"]

#: What one dataset item (the unit DP-SGD clips and samples) stands for; "patient" groups a patient's items.
PRIVACY_UNITS = ("slice", "volume", "patient")
_NAMED = {"dice": DiceLoss, "dicece": DiceCELoss}


def _couples_samples(loss: nn.Module) -> str | None:
    """Name the setting that makes ``loss`` mix samples, or ``None``."""
    for name, module in loss.named_modules():
        if getattr(module, "batch", False) is True:
            return f"{type(module).__name__}{' (' + name + ')' if name else ''} has batch=True"
    return None


class PerSampleLoss(nn.Module):
    """Mean of per-sample losses, computed sample by sample so that no sample's loss depends on another's.

    Args:
        loss: ``"dice"`` or ``"dicece"`` (MONAI losses with ``to_onehot_y=True, softmax=True`` unless overridden
            in ``loss_kwargs``) or a loss module that does not couple samples.
        loss_kwargs: passed to the named MONAI loss.

    Raises:
        PrivacyConfigError: a loss that couples samples (``batch=True``), or an unknown named loss.
    """

    def __init__(self, loss: str | nn.Module = "dicece", **loss_kwargs) -> None:
        super().__init__()
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
