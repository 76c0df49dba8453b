"""What the attacker knows, written down as data.

Following the "case" objects of breaching (Geiping et al., 2020), the knowledge of an honest-but-curious server is a
plain dataclass, so one attack routine serves every setting: the mask known or not, one gradient or several local
SGD steps, with or without DP-SGD. Nothing in here is code; the attack reads these fields and nothing else.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.regimes import REGIMES

__all__ = ["ThreatModel", "PRIVACY_REGIMES", "soft_target_loss"]

#: DP-SGD settings the attack replays, by regime name: (noise multiplier, L2 clipping norm), read from the one regime
#: table (:mod:`monai_fedpriv.privacy.regimes`, Table 1 of seed 000), plus ``"none"`` (no DP-SGD).
PRIVACY_REGIMES: dict[str, tuple[float, float | None]] = {
    "none": (0.0, None),
    **{name: (r.noise_multiplier, r.max_grad_norm) for name, r in REGIMES["federated"].items()},
}


@dataclass
class ThreatModel:
    """Knowledge of an honest-but-curious server with white-box access to the model.

    Args:
        image_shape: spatial shape of one victim image, ``(H, W)`` or ``(D, H, W)``.
        num_classes: number of segmentation classes (output channels of the network).
        in_channels: image channels.
        batch_size: images behind the update (the attack reconstructs all of them).
        local_steps: local SGD steps the site took on that batch (``K``); 1 means the update is one gradient.
        lr: the site's local SGD learning rate (only matters when ``local_steps > 1``).
        mask_known: whether the attacker holds the victim's segmentation mask (seed 000, sec. 3.3) or must
            optimise it jointly with the image.
        pixel_range: ``(low, high)`` intensity range of the bundle's preprocessing; reconstructions are boxed in it.
        noise_multiplier: DP-SGD noise multiplier the site used (the attacker knows it but cannot undo the noise).
        max_grad_norm: DP-SGD clipping norm, or ``None`` without clipping; the attacker replays clipping in the
            unrolled steps.
        activation: the network's output convention: ``"softmax"`` (label maps of class indices) or ``"sigmoid"``
            (one binary channel per possibly overlapping region, e.g. BraTS' TC/WT/ET); an unknown mask is then
            optimised as sigmoid (not softmax) probabilities.

    Example:
        >>> tm = ThreatModel(image_shape=(64, 64), num_classes=3, mask_known=True)
        >>> tm.spatial_dims
        2
    """

    image_shape: tuple[int, ...]
    num_classes: int
    in_channels: int = 1
    batch_size: int = 1
    local_steps: int = 1
    lr: float = 0.01
    mask_known: bool = True
    pixel_range: tuple[float, float] = (0.0, 1.0)
    noise_multiplier: float = 0.0
    max_grad_norm: float | None = None
    activation: str = "softmax"

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)
        self.pixel_range = (float(self.pixel_range[0]), float(self.pixel_range[1]))
        if len(self.image_shape) not in (2, 3) or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be 2 or 3 positive sizes, got {self.image_shape}.")
        if self.num_classes < 1 or self.in_channels < 1 or self.batch_size < 1:
            raise ValueError(
                f"num_classes, in_channels and batch_size must be >= 1, got "
                f"{self.num_classes}, {self.in_channels}, {self.batch_size}."
            )
        if self.activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {self.activation!r}.")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if not self.pixel_range[0] < self.pixel_range[1]:
            raise ValueError(f"pixel_range must be (low, high) with low < high, got {self.pixel_range}.")
        if self.noise_multiplier < 0:
            raise PrivacyConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise PrivacyConfigError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}.")
        if self.noise_multiplier > 0 and self.max_grad_norm is None:
            raise PrivacyConfigError("noise_multiplier > 0 needs max_grad_norm: noise is scaled by the clipping norm.")

    @property
    def spatial_dims(self) -> int:
        return len(self.image_shape)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of the victim batch, ``(B, C, *image_shape)``."""
        return (self.batch_size, self.in_channels, *self.image_shape)

    @classmethod
    def for_regime(cls, regime: str, **kwargs: Any) -> ThreatModel:
        """Threat model whose noise/clip follow a named regime of :data:`PRIVACY_REGIMES`."""
        if regime not in PRIVACY_REGIMES:
            raise PrivacyConfigError(f"unknown privacy regime {regime!r}; choose one of {sorted(PRIVACY_REGIMES)}.")
        noise, clip = PRIVACY_REGIMES[regime]
        return cls(noise_multiplier=noise, max_grad_norm=clip, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["image_shape"] = list(self.image_shape)
        out["pixel_range"] = list(self.pixel_range)
        return out


def soft_target_loss(loss: torch.nn.Module) -> torch.nn.Module:
    """A copy of a segmentation loss that takes one-hot/probability targets instead of label maps.

    MONAI losses such as ``DiceCELoss(to_onehot_y=True)`` one-hot encode an integer label map. The attack needs a
    differentiable target (a softmax over mask logits), so every ``to_onehot_y`` flag of the copy is switched off;
    fed the one-hot encoding of a label map, the copy returns exactly what the original returns for the map.

    Args:
        loss: the bundle's loss module.
    """
    soft = copy.deepcopy(loss)
    for module in soft.modules():
        if getattr(module, "to_onehot_y", False):
            module.to_onehot_y = False  # type: ignore[assignment]
    return soft
