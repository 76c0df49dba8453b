"""Cut a MONAI :class:`~monai.networks.nets.UNet` into parts that exchange tensors, exactly equal to the whole.

Seed 004 (Qu et al., "Handling data heterogeneity with generative replay in collaborative learning for medical
imaging") splits a U-Net after its first encoding blocks in two ways:

FedReplay   sites run blocks ``1..N`` (:class:`LatentEncoder`), the server the rest (:class:`PrimaryModel`). The
            decoder needs every skip level, so the one latent per image packs ``x_1..x_N``, each space-to-depth'd to
            ``x_N``'s size and concatenated along channels: lossless, ``primary(encoder(x)) == network(x)``.
SplitNN     U-shaped split learning (Vepakomma et al. 2018, "Split learning for health"): :class:`SiteHead` keeps the
            first down and last up block and reaches :func:`server_part` through a :class:`SplitLink`.

MONAI nests its UNet: ``model = Sequential(down_1, SkipConnection(Sequential(down_2, SkipConnection(...), up_2)),
up_1)``; the innermost ``SkipConnection`` wraps the bottom block. ``down_1`` already downsamples (``x_1`` is at
``H / strides[0]``) and the bottom block has stride 1. Parts hold references to the network's modules, never copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from monai.networks.layers.simplelayers import SkipConnection
from torch import nn

from monai_fedpriv.fl.weights import unwrap

__all__ = [
    "UNetLevels", "unet_levels", "space_to_depth", "depth_to_space", "LatentEncoder", "PrimaryModel",
    "encoder_and_primary", "SplitLink", "RemoteCall", "SiteHead", "LocalLink", "server_part", "part_keys",
    "site_keys", "server_keys",
]  # fmt: skip


@dataclass(frozen=True)
class UNetLevels:
    """A MONAI UNet's levels, outermost first: ``downs[k]``, ``skips[k]``, ``ups[k]``, then the ``bottom`` block."""

    downs: tuple[nn.Module, ...]
    skips: tuple[SkipConnection, ...]
    ups: tuple[nn.Module, ...]
    bottom: nn.Module


def unet_levels(network: nn.Module) -> UNetLevels:
    """Walk ``network.model`` (DP / DataParallel wrappers are unwrapped) into its levels.

    Raises
    ------
    ValueError
        When the network is not laid out as nested ``Sequential(down, SkipConnection, up)`` (names what it found).
    """
    node: Any = getattr(unwrap(network), "model", None)
    downs, skips, ups = [], [], []
    while isinstance(node, nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection):
        downs.append(node[0])
        skips.append(node[1])
        ups.append(node[2])
        node = node[1].submodule
    if not downs:
        found = type(unwrap(network)).__name__ + (f" with .model = {type(node).__name__}" if node is not None else "")
        raise ValueError(f"expected a MONAI UNet (.model = Sequential(down, SkipConnection, up)), got {found}.")
    return UNetLevels(tuple(downs), tuple(skips), tuple(ups), node)


def space_to_depth(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Fold ``factors[d]``-wide blocks of each spatial dim into channels (``F.pixel_unshuffle``'s order in 2D)."""
    n, c, *sizes = x.shape
    if len(factors) != len(sizes) or any(s % f for s, f in zip(sizes, factors, strict=True)):
        raise ValueError(f"spatial shape {tuple(sizes)} is not divisible by factors {tuple(factors)}.")
    d, small = len(sizes), [s // f for s, f in zip(sizes, factors, strict=True)]
    split = [v for s, f in zip(small, factors, strict=True) for v in (s, f)]
    perm = [0, 1, *(3 + 2 * i for i in range(d)), *(2 + 2 * i for i in range(d))]
    return x.reshape(n, c, *split).permute(perm).reshape(n, c * math.prod(factors), *small)


def depth_to_space(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Exact inverse of :func:`space_to_depth`; ``F.pixel_shuffle``'s order in 2D."""
    n, channels, *sizes = x.shape
    d, block = len(sizes), math.prod(factors)
    if len(factors) != d or channels % block:
        raise ValueError(f"{channels} channels of {d}-D features cannot unfold by factors {tuple(factors)}.")
    perm = [0, 1, *(v for i in range(d) for v in (2 + d + i, 2 + i))]
    out = x.reshape(n, channels // block, *factors, *sizes).permute(perm)
    return out.reshape(n, channels // block, *(s * f for s, f in zip(sizes, factors, strict=True)))


def _merge(skip: tuple[str, int], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What a ``SkipConnection`` of ``(mode, dim)`` returns for its input ``x`` and its submodule's output ``y``."""
    mode, dim = skip
    if mode == "cat":
        return torch.cat([x, y], dim=dim)
    return x + y if mode == "add" else x * y


def _probe(downs: Sequence[nn.Module]) -> list[tuple[int, ...]]:
    """``(channels, *spatial)`` of ``x_1..x_N`` for a zero input ``2 * prod(strides)`` wide (eval mode, no grad)."""
    convs = [[m for m in b.modules() if isinstance(m, nn.modules.conv._ConvNd)] for b in downs]
    if not convs[0]:
        raise ValueError("the first down block has no convolution: cannot infer the input of the shape probe.")
    first, dims = convs[0][0], len(convs[0][0].kernel_size)
    strides = [[max([1, *(m.stride[d] for m in cs)]) for d in range(dims)] for cs in convs]  # >= each block's stride
    x = torch.zeros(1, first.in_channels, *(2 * math.prod(s[d] for s in strides) for d in range(dims)),
                    dtype=first.weight.dtype, device=first.weight.device)  # fmt: skip
    flags, shapes = [(m, m.training) for b in downs for m in b.modules()], []
    try:  # eval: a probe must not update batch-norm statistics
        with torch.no_grad():
            for block in downs:
                x = block.eval()(x)
                shapes.append(tuple(x.shape[1:]))
    finally:
        for m, flag in flags:
            m.training = flag
    return shapes


def _cut(network: nn.Module, cut_block: int) -> tuple[UNetLevels, tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """The levels, the channels of ``x_1..x_N`` and each ``x_k``'s integer size ratio to ``x_N``."""
    levels = unet_levels(network)
    if isinstance(cut_block, bool) or not isinstance(cut_block, int) or not 1 <= cut_block <= len(levels.downs):
        raise ValueError(f"cut_block must be in [1, {len(levels.downs)}] for this UNet, got {cut_block!r}.")
    shapes = _probe(levels.downs[:cut_block])
    last = shapes[-1][1:]
    if any(s % t for shape in shapes for s, t in zip(shape[1:], last, strict=True)):
        raise ValueError(f"encoder sizes {[s[1:] for s in shapes]} are not integer multiples of {last}: cannot pack.")
    factors = tuple(tuple(a // b for a, b in zip(s[1:], last, strict=True)) for s in shapes)
    return levels, tuple(s[0] for s in shapes), factors


class LatentEncoder(nn.Module):
    """FedReplay's auxiliary encoder (seed 004): blocks ``1..cut_block`` of ``network``, one packed latent out.

    Parameters
    ----------
    network
        A MONAI UNet (or a DP / DataParallel wrapper of one); its modules are shared, not copied.
    cut_block
        Number of encoding blocks, ``1 <= cut_block <= len(strides)``.
    """

    def __init__(self, network: nn.Module, cut_block: int) -> None:
        super().__init__()
        levels, self.channels, self.factors = _cut(network, cut_block)
        self.downs = nn.ModuleList(levels.downs[:cut_block])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for block in self.downs:
            x = block(x)
            feats.append(x)
        last = tuple(feats[-1].shape[2:])
        for k, (f, r) in enumerate(zip(feats, self.factors, strict=True)):
            if tuple(f.shape[2:]) != tuple(s * q for s, q in zip(last, r, strict=True)):
                raise ValueError(f"block {k + 1}'s output {tuple(f.shape[2:])} is not {r} times {last}: "
                                 "the input size must be divisible by the product of the strides.")  # fmt: skip
        return torch.cat([space_to_depth(f, r) for f, r in zip(feats, self.factors, strict=True)], dim=1)


class PrimaryModel(nn.Module):
    """FedReplay's primary model (seed 004): unpacks a :class:`LatentEncoder` latent and runs the rest of the UNet.

    Parameters
    ----------
    network, cut_block
        As for :class:`LatentEncoder`; the modules are shared, not copied.
    """

    def __init__(self, network: nn.Module, cut_block: int) -> None:
        super().__init__()
        levels, self.channels, self.factors = _cut(network, cut_block)
        self.inner = levels.skips[cut_block - 1].submodule
        self.ups = nn.ModuleList(levels.ups[:cut_block])
        self.merges = [(s.mode, s.dim) for s in levels.skips[:cut_block]]
        self.split = [c * math.prod(r) for c, r in zip(self.channels, self.factors, strict=True)]

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """The features ``x_1..x_N`` in ``packed`` (exact inverse of the encoder's packing)."""
        if packed.shape[1] != sum(self.split):
            raise ValueError(f"a latent of this cut has {sum(self.split)} channels, got {packed.shape[1]}.")
        parts = torch.split(packed, self.split, dim=1)
        return [depth_to_space(p, r) for p, r in zip(parts, self.factors, strict=True)]

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        feats = self.unpack(packed)
        y = self.inner(feats[-1])
        for k in reversed(range(len(feats))):
            y = self.ups[k](_merge(self.merges[k], feats[k], y))
        return y


def encoder_and_primary(network: nn.Module, cut_block: int) -> tuple[LatentEncoder, PrimaryModel]:
    """Cut ``network`` after ``cut_block`` encoding blocks so that ``primary(encoder(x)) == network(x)``.

    Raises
    ------
    ValueError
        A non-UNet, or ``cut_block`` outside ``[1, len(strides)]`` (names the allowed range).
    """
    return LatentEncoder(network, cut_block), PrimaryModel(network, cut_block)


class SplitLink(Protocol):
    """The site's channel to the server of a U-shaped split: features forward, gradients backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def backward(self, grad: torch.Tensor) -> torch.Tensor: ...


class RemoteCall(torch.autograd.Function):
    """Autograd node that sends ``x_1`` through the link in forward and the output's gradient in backward."""

    @staticmethod
    def forward(ctx: Any, x1: torch.Tensor, link: SplitLink, grad_enabled: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.link = link
        with torch.set_grad_enabled(grad_enabled):  # autograd runs forward without grad; the server needs the caller's
            return link.forward(x1.detach())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.link.backward(grad_output), None, None


class SiteHead(nn.Module):
    """The site of a U-shaped split (Vepakomma et al. 2018): ``down_1``, the server through ``link``, ``up_1``."""

    def __init__(self, network: nn.Module, link: SplitLink) -> None:
        super().__init__()
        levels = unet_levels(network)
        self.down, self.up, self.link = levels.downs[0], levels.ups[0], link
        self.merge = (levels.skips[0].mode, levels.skips[0].dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.down(x)
        return self.up(_merge(self.merge, x1, RemoteCall.apply(x1, self.link, torch.is_grad_enabled())))


def server_part(network: nn.Module) -> nn.Module:
    """The module the server runs in a U-shaped split: the level-1 ``SkipConnection``'s submodule."""
    return unet_levels(network).skips[0].submodule


class LocalLink:
    """In-memory :class:`SplitLink` for tests and benchmarks; steps ``optimizer`` (if any) after each backward."""

    def __init__(self, server: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.server, self.optimizer = server, optimizer
        self._io: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x.clone().requires_grad_(self.server.training and torch.is_grad_enabled())
        self._io = (inp, self.server(inp))
        return self._io[1].detach()

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        if self._io is None or not self._io[0].requires_grad:
            raise RuntimeError("LocalLink.backward needs a forward in training mode with grad enabled before it.")
        (inp, out), self._io = self._io, None
        out.backward(grad)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad()
        if inp.grad is None:
            raise RuntimeError("the server's output does not depend on its input: no gradient to send back.")
        return inp.grad


def part_keys(network: nn.Module, part: nn.Module) -> dict[str, str]:
    """For each key of ``part.state_dict()``, the key of the same tensor (by identity) in ``network.state_dict()``.

    Pass the plain network for plain keys (what a site exchanges); a wrapper gives its prefixed keys.
    """
    full = {id(t): k for k, t in network.state_dict(keep_vars=True).items()}
    out = {}
    for key, tensor in part.state_dict(keep_vars=True).items():
        if id(tensor) not in full:
            raise ValueError(f"{key!r} of the part is not a tensor of the network.")
        out[key] = full[id(tensor)]
    return out


def site_keys(network: nn.Module) -> list[str]:
    """The keys of ``network.state_dict()`` the site owns in a U-shaped split (``down_1`` and ``up_1``)."""
    levels = unet_levels(network)
    return list(part_keys(network, nn.ModuleList([levels.downs[0], levels.ups[0]])).values())


def server_keys(network: nn.Module) -> list[str]:
    """The keys of ``network.state_dict()`` the server owns in a U-shaped split (all between ``down_1``/``up_1``)."""
    return list(part_keys(network, server_part(network)).values())
