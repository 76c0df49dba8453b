"""U-Nets with MobileNetV2, ResNet-18 and VGG11-BN encoders (seed 000, Ziller et al., Table 2), built by
segmentation-models-pytorch (Yakubovskiy 2020) without downloading anything.

segmentation-models-pytorch is optional: ``pip install monai-fedpriv[networks]`` (it needs torchvision and timm).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SMP_ENCODERS", "smp_unet", "load_unet_weights"]

SMP_ENCODERS = ("mobilenet_v2", "resnet18", "vgg11_bn")
_WRAPPER_KEYS = ("state_dict", "model", "network")
_NETWORK_PARTS = ("encoder.", "decoder.", "segmentation_head.")


def _import_smp() -> Any:
    try:
        import segmentation_models_pytorch as smp
    except ImportError as err:  # torchvision missing or broken is reported the same way
        raise ImportError(
            f"smp_unet needs segmentation-models-pytorch (and torchvision): pip install monai-fedpriv[networks] "
            f"({type(err).__name__}: {err})"
        ) from err
    return smp


def smp_unet(
    encoder: str = "mobilenet_v2",
    in_channels: int = 1,
    classes: int = 1,
    weights_path: str | Path | None = None,
) -> nn.Module:
    """U-Net of segmentation-models-pytorch with a classification encoder, randomly initialised or from a local file.

    Builds ``segmentation_models_pytorch.Unet(encoder_name=encoder, encoder_weights=None, in_channels=...,
    classes=...)``: nothing is downloaded (``encoder_weights="imagenet"`` would fetch from the Hugging Face hub).
    Pre-trained weights come from ``weights_path`` instead, see :func:`load_unet_weights`. The output is logits.

    Parameter counts at ``in_channels=1, classes=1`` (seed 000, Table 2): mobilenet_v2 6,628,369; resnet18
    14,321,937; vgg11_bn 18,258,385. The encoders use BatchNorm; for DP-SGD pass the network through
    :func:`monai_fedpriv.privacy.model_prep.prepare_for_dp`, which replaces it by InstanceNorm.

    Args:
        encoder: ``"mobilenet_v2"``, ``"resnet18"`` or ``"vgg11_bn"``.
        in_channels: image channels.
        classes: output channels.
        weights_path: optional ``torch.save``-d state dict of the whole network or of its encoder.

    Returns:
        The ``segmentation_models_pytorch.Unet``.

    Raises:
        ValueError: unknown encoder or bad channel counts; a weights file that does not fit (names the file).
        ImportError: segmentation-models-pytorch is not installed.

    Example:
        >>> net = smp_unet("resnet18", in_channels=1, classes=1)
        >>> sum(p.numel() for p in net.parameters())
        14321937
    """
    if encoder not in SMP_ENCODERS:
        raise ValueError(f"encoder must be one of {SMP_ENCODERS}, got {encoder!r}.")
    for name, value in (("in_channels", in_channels), ("classes", classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    smp = _import_smp()
    net = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes)
    if weights_path is not None:
        load_unet_weights(net, weights_path)
    return net


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"cannot read weights file {str(path)!r} as a torch state dict: {err}") from err
    while isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS:
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"weights file {str(path)!r} holds {type(obj).__name__}, not a state dict of tensors.")
    from monai_fedpriv.fl.weights import strip_prefixes

    try:
        return strip_prefixes(obj)
    except KeyError as err:
        raise ValueError(f"weights file {str(path)!r}: {err}") from err


def _adapt_first_conv(state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> list[str]:
    """Fit a 3-channel (RGB) first convolution to ``in_channels != 3`` as segmentation-models-pytorch does for its
    own downloads: one channel gets the sum over RGB, ``n`` channels repeat RGB cyclically, scaled by ``3 / n``."""
    changed = []
    for key, value in state.items():
        want = target.get(key)
        if want is None or value.ndim != 4 or want.ndim != 4 or value.shape[1] != 3 or want.shape[1] == 3:
            continue
        if value.shape[0] != want.shape[0] or value.shape[2:] != want.shape[2:]:
            continue
        n = want.shape[1]
        if n == 1:
            state[key] = value.sum(1, keepdim=True)
        else:
            state[key] = value[:, [i % 3 for i in range(n)]] * (3 / n)
        changed.append(key)
    return changed


def load_unet_weights(net: nn.Module, weights_path: str | Path) -> nn.Module:
    """Load a local state dict into an smp U-Net: the whole network, or only its encoder.

    The file is read with ``torch.load(weights_only=True)``; a single ``state_dict``/``model``/``network`` wrapper
    key and Opacus' ``_module.`` / DataParallel's ``module.`` prefixes are removed. Keys all under ``encoder.``,
    ``decoder.`` and ``segmentation_head.`` load into the whole network, anything else into ``net.encoder``
    (classifier heads of torchvision checkpoints are dropped by segmentation-models-pytorch). A first convolution
    saved for 3 input channels is fitted to the network's ``in_channels`` as segmentation-models-pytorch does.
    Loading is strict otherwise.

    Args:
        net: a ``segmentation_models_pytorch.Unet``.
        weights_path: the file.

    Returns:
        ``net``, holding the weights.

    Raises:
        ValueError: unreadable file, not a state dict, or keys/shapes that do not fit (names the file and keys).
    """
    path = Path(weights_path)
    state = _read_state_dict(path)
    whole = all(k.startswith(_NETWORK_PARTS) for k in state)
    target = net if whole else net.get_submodule("encoder")
    _adapt_first_conv(state, target.state_dict())
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        part = "network" if whole else "encoder"
        raise ValueError(f"weights file {str(path)!r} does not fit the U-Net's {part}: {err}") from err
    return net
