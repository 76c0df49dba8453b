"""Model size and exact multiply-accumulate counts (the "Parameters" and "MACs" rows of seed 000's Table 2).

Example:
    >>> from monai_fedpriv.networks import MoNet
    >>> count_parameters(MoNet()), count_macs(MoNet(), (1, 256, 256), include_norm=False)
    (399009, 4741660672)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["count_parameters", "count_macs", "layer_macs"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # BatchNorm*, InstanceNorm*, SyncBatchNorm


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter values (each shared parameter once); buffers such as running statistics excluded.

    Args:
        model: the network.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor, *, include_norm: bool = True) -> int:
    """Exact multiply-accumulates of one call of ``module`` (0 for layers that are not counted).

    * Convolution: every output value is a dot product over ``in_channels / groups * prod(kernel_size)`` inputs,
      so ``MACs = out.numel() * in_channels / groups * prod(kernel_size)``. Taps that fall on zero padding are
      counted (the dense formula every counter and backend uses).
    * Transposed convolution: the adjoint of a convolution; every *input* value is multiplied by one kernel slice
      of ``out_channels / groups * prod(kernel_size)`` weights and scattered into the output, so
      ``MACs = inp.numel() * out_channels / groups * prod(kernel_size)``, which equals
      ``in_channels / groups * out_channels * prod(kernel_size) * prod(input spatial)`` per sample. Counting it at
      output positions like a convolution (thop, ptflops) adds the products with the zeros inserted between input
      values and over-counts by ``prod(stride)`` (4x for a 2D stride-2 layer).
    * Linear: ``in_features`` MACs per output value, ``out.numel() * in_features``.
    * Norm layers (``include_norm``): one MAC per output value, the scale-and-shift ``y = a * x + b`` the layer
      reduces to once its statistics are known (BatchNorm at inference folds into exactly that); the statistics
      of instance/group/layer norms are not counted. Biases, activations and additions are not counted.
    """
    if isinstance(module, _CONV):
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, _CONV_T):
        return inp.numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    if include_norm and isinstance(module, _NORM):
        return out.numel()
    return 0


def count_macs(model: nn.Module, input_shape: Sequence[int], *, include_norm: bool = True, batch_size: int = 1) -> int:
    """Exact multiply-accumulates of one forward pass, per sample, counted by forward hooks.

    Convolutions (transposed ones at input positions, see :func:`layer_macs`), linear layers and, unless
    ``include_norm=False``, norm layers are counted; a module called several times is counted at every call.
    The forward runs in eval mode under ``torch.no_grad`` on zeros of the model's device and dtype; the model's
    training flag is restored.

    Args:
        model: the network.
        input_shape: one sample's shape without the batch axis, e.g. ``(1, 256, 256)``.
        include_norm: count the norm layers' scale-and-shift (one MAC per output value).
        batch_size: samples in the forward pass (the count is divided by it).

    Returns:
        MACs for one sample.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be one sample's (channels, *spatial) shape, got {input_shape!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal total
        if inputs and torch.is_tensor(inputs[0]) and torch.is_tensor(output):
            total += layer_macs(module, inputs[0], output, include_norm=include_norm)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    ref = next(iter(model.parameters()), None)
    x = torch.zeros(
        (int(batch_size), *shape),
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None and ref.is_floating_point() else None,
    )
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // int(batch_size)
