"""Model inversion of shared latents (Eq. 2 of seed 004, after He et al., 2019).

A method that shares encoder features instead of weights (FedReplay's auxiliary encoder) leaks through the features:
with white-box access to the encoder ``E``, the attacker solves

    argmin_x~  ||E(x~) - E(x)||^2  +  alpha * TV(x~)                                  (Eq. 2)

:func:`unet_encoder` cuts the first 1, 2, 3... encoding blocks out of a MONAI :class:`~monai.networks.nets.UNet`, the
encoders of increasing depth that seed 004 compares (its Table 2: deeper encoders leak less).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from monai.networks.layers.simplelayers import SkipConnection

from monai_fedpriv.attacks.gradient_inversion import cpu_threads, total_variation
from monai_fedpriv.privacy.grad_sample import plain_copy

__all__ = ["unet_encoder", "invert_latents"]


def unet_encoder(unet: torch.nn.Module, depth: int) -> torch.nn.Sequential:
    """The first ``depth`` encoding blocks of a MONAI UNet, as one ``Sequential`` (a copy, in eval mode).

    MONAI nests its UNet: ``model[0]`` is the first down block, ``model[1]`` a ``SkipConnection`` whose
    ``submodule`` is the next level ``Sequential(down, SkipConnection(...), up)``; the innermost ``SkipConnection``
    wraps the bottom block. ``depth`` may go up to ``len(channels)`` (the last one being the bottom block).

    Args:
        unet: a ``monai.networks.nets.UNet`` (or anything with its ``.model`` layout).
        depth: number of encoding blocks to keep (>= 1).

    Example:
        >>> enc = unet_encoder(UNet(2, 1, 3, (16, 32, 64, 128), (2, 2, 2)), depth=2)  # doctest: +SKIP
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}.")
    node: Any = getattr(unet, "model", None)
    if not isinstance(node, torch.nn.Sequential):
        raise ValueError(f"expected a MONAI UNet with a Sequential `.model`, got {type(unet).__name__}.")
    blocks: list[torch.nn.Module] = []
    while len(blocks) < depth:
        if isinstance(node, torch.nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection):
            blocks.append(node[0])
            node = node[1].submodule
        elif not isinstance(node, torch.nn.Sequential) or len(node) != 3:  # the bottom block
            blocks.append(node)
            node = None
        if node is None and len(blocks) < depth:
            raise ValueError(f"the UNet has only {len(blocks)} encoding blocks, cannot cut depth {depth}.")
    return plain_copy(torch.nn.Sequential(*blocks)).eval()  # a DP wrapper's per-sample hooks stay behind


def invert_latents(
    encoder: torch.nn.Module,
    latents: torch.Tensor,
    image_shape: tuple[int, ...],
    *,
    in_channels: int = 1,
    pixel_range: tuple[float, float] = (0.0, 1.0),
    iterations: int = 1000,
    restarts: int = 4,
    step_size: float = 0.05,
    tv_weight: float = 1e-3,
    generator: torch.Generator | None = None,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Reconstruct the image behind shared encoder features by solving Eq. 2.

    Restarts are batched directly (an encoder acts on each sample alone), optimised with AdamW as in seed 004,
    sec. 4.4, with the step-decay schedule of the gradient attack and a box constraint; the winner is the restart
    with the lowest feature distance.

    Args:
        encoder: the shared encoder ``E`` (white box).
        latents: the shared features ``E(x)`` of one image, shape ``(1, ...)``.
        image_shape: spatial shape of the image.
        in_channels: image channels.
        pixel_range: box constraint.
        iterations: optimiser steps.
        restarts: random initialisations optimised together.
        step_size: AdamW learning rate.
        tv_weight: ``alpha`` of Eq. 2.
        generator: random source of the initialisations.
        num_threads: CPU threads during the attack (restored afterwards); ``None`` leaves torch's setting.

    Returns:
        ``(reconstruction (C, *spatial), stats)`` with ``matching_loss``, ``restart_losses``, ``seconds``,
        ``iterations_per_second``.

    Example:
        >>> enc = unet_encoder(net, 1)  # doctest: +SKIP
        >>> x, stats = invert_latents(enc, enc(img[None]), (64, 64), iterations=500)  # doctest: +SKIP
    """
    if iterations < 1 or restarts < 1:
        raise ValueError(f"iterations and restarts must be >= 1, got {iterations}, {restarts}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    encoder = encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    device = latents.device
    target = latents.detach()
    lo, hi = pixel_range
    x = lo + (hi - lo) * torch.rand((restarts, in_channels, *image_shape), generator=generator)
    x = x.to(device).requires_grad_(True)
    optimizer = torch.optim.AdamW([x], lr=step_size, weight_decay=0.0)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def losses(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = encoder(batch)
        match = ((feats - target) ** 2).flatten(1).sum(1) / target.pow(2).sum().clamp_min(1e-12)
        tv = torch.stack([total_variation(batch[r : r + 1]) for r in range(batch.shape[0])])
        return match + tv_weight * tv, match

    with cpu_threads(num_threads):
        start = time.perf_counter()
        for _ in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            total, _ = losses(x)
            total.sum().backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            _, match = losses(x)
    best = int(torch.argmin(match))
    return x[best].detach().cpu(), {
        "matching_loss": float(match[best]),
        "restart_losses": [float(m) for m in match],
        "iterations": iterations,
        "seconds": seconds,
        "iterations_per_second": iterations / seconds if seconds > 0 else float("inf"),
    }
