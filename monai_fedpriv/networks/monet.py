"""MoNet: a small, shallow U-Net-like 2D segmentation network built on dilated convolutions.

Written from the description in Knolle et al. 2021, "Efficient, high-performance semantic segmentation using
multi-scale feature extraction", PLOS ONE 16(8): e0255397 (the network of seed 000, Ziller et al., Table 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MoNet", "ConvNormELU", "DilatedBlock"]

NORMS = ("batch", "instance", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ConvNormELU(nn.Sequential):
    """Convolution (no bias: the norm's shift replaces it), normalisation, ELU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        stride: stride.
        dilation: dilation; 3x3 kernels are padded by ``dilation`` so the size is kept.
        norm: ``"batch"``, ``"instance"`` or ``"group"``.
        transposed: a transposed convolution (4x4, stride 2, padding 1 doubles the size).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        norm: str = "batch",
        transposed: bool = False,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2 if stride == 1 else (kernel_size - stride) // 2
        conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        conv = conv_cls(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False
        )
        super().__init__(conv, _norm(norm, out_channels), nn.ELU())


class DilatedBlock(nn.Module):
    """Residual dense block of 3x3 dilated convolutions with decreasing dilation rates (Knolle et al., the RDDC block).

    Each convolution sees the sum of the block input and of every earlier convolution's output (dense connections
    by summation, so every convolution stays ``C -> C``), and the block returns that running sum (the residual
    connection): ``s_0 = x``, ``s_k = s_{k-1} + f_k(s_{k-1})``, output ``s_K``. The first convolution has the
    largest dilation (the widest context), the last a dilation of 1.

    Args:
        channels: channels in and out.
        dilations: dilation rate of each convolution, in order (default ``(4, 3, 2, 1)``).
        norm: normalisation of every convolution.
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (4, 3, 2, 1), norm: str = "batch") -> None:
        super().__init__()
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty sequence of positive integers, got {dilations!r}.")
        self.convs = nn.ModuleList(ConvNormELU(channels, channels, 3, dilation=int(d), norm=norm) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x
        for conv in self.convs:
            total = total + conv(total)  # out of place: per-sample gradient hooks keep their tensors
        return total


class MoNet(nn.Module):
    """MoNet (Knolle et al. 2021), a shallow U-Net-like 2D segmentation network with multi-scale dilated blocks.

    Knolle, Kaissis, Jungmann, Ziegelmayer, Sasse, Makowski, Rueckert, Braren: "Efficient, high-performance
    semantic segmentation using multi-scale feature extraction", PLOS ONE 16(8): e0255397, 2021. It is one of the
    four networks of seed 000 (Ziller et al., Table 2).

    Layout, with ``C_l = base_filters * 2**l`` channels at level ``l`` (resolution ``/ 2**l``):

    * stem: 3x3 convolution ``in_channels -> C_0``; every convolution is followed by the norm and ELU;
    * encoder level ``l < depth``: :class:`DilatedBlock` at ``C_l``, then a 4x4 stride-2 convolution
      ``C_l -> C_{l+1}``;
    * bottleneck: :class:`DilatedBlock` at ``C_depth``;
    * decoder level ``l`` (from ``depth - 1`` down to 0): 4x4 stride-2 transposed convolution
      ``C_{l+1} -> C_{l+1}``, concatenation with the encoder's level-``l`` features (the skip), 3x3 convolution
      ``C_{l+1} + C_l -> C_l``, :class:`DilatedBlock` at ``C_l``;
    * head: 1x1 convolution ``C_0 -> out_channels`` returning logits (apply sigmoid/softmax in the loss, as
      MONAI's losses do; the paper's network ends with a sigmoid).

    With the paper's settings (``MoNet()``: 1x256x256 input, depth 2, 16 base filters, BatchNorm) it has 399,009
    trainable parameters (401,697 values with BatchNorm's running statistics) and 4.742 G multiply-accumulates in
    its convolutions (4.759 G with the norm layers' scale-and-shift), see
    :func:`monai_fedpriv.networks.complexity.count_macs`. Seed 000 reports 390k / 6.11G: ``concat_skips=False``
    (no skip concatenation, 387,489 parameters) counted with transposed convolutions at output resolution (4x)
    gives its numbers; the skips are the paper's.

    BatchNorm is the paper's choice; :func:`monai_fedpriv.privacy.model_prep.prepare_for_dp` replaces it by
    InstanceNorm (or GroupNorm) for DP-SGD, or build with ``norm="instance"`` directly.

    Args:
        in_channels: image channels.
        out_channels: output channels (classes).
        base_filters: channels at full resolution; doubled at every level.
        depth: number of stride-2 down-samplings (input sides must be divisible by ``2**depth``).
        norm: ``"batch"`` (the paper), ``"instance"`` (affine) or ``"group"`` (``gcd(32, C)`` groups).
        dilations: dilation rates of every dilated block.
        concat_skips: concatenate the encoder features in the decoder (the paper); ``False`` only reproduces the
            skip-less variant behind seed 000's Table 2.

    Example:
        >>> net = MoNet(in_channels=1, out_channels=1)
        >>> net(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
        >>> sum(p.numel() for p in net.parameters())
        399009
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_filters: int = 16,
        depth: int = 2,
        norm: str = "batch",
        dilations: Sequence[int] = (4, 3, 2, 1),
        concat_skips: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if int(base_filters) < 1:
            raise ValueError(f"base_filters must be a positive integer, got {base_filters!r}.")
        if int(depth) < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        self.depth = int(depth)
        self.concat_skips = bool(concat_skips)
        ch = [int(base_filters) * 2**level for level in range(self.depth + 1)]
        self.stem = ConvNormELU(in_channels, ch[0], 3, norm=norm)
        self.encoder = nn.ModuleList(DilatedBlock(ch[lvl], dilations, norm) for lvl in range(self.depth))
        self.down = nn.ModuleList(
            ConvNormELU(ch[lvl], ch[lvl + 1], 4, stride=2, norm=norm) for lvl in range(self.depth)
        )
        self.bottleneck = DilatedBlock(ch[-1], dilations, norm)
        self.up = nn.ModuleList(
            ConvNormELU(ch[lvl + 1], ch[lvl + 1], 4, stride=2, norm=norm, transposed=True) for lvl in range(self.depth)
        )
        skip = ch if self.concat_skips else [0] * len(ch)
        self.fuse = nn.ModuleList(
            ConvNormELU(ch[lvl + 1] + skip[lvl], ch[lvl], 3, norm=norm) for lvl in range(self.depth)
        )
        self.decoder = nn.ModuleList(DilatedBlock(ch[lvl], dilations, norm) for lvl in range(self.depth))
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"MoNet is 2D: expected a (batch, channels, H, W) tensor, got shape {tuple(x.shape)}.")
        factor = 2**self.depth
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"MoNet(depth={self.depth}) needs H and W divisible by {factor}, got {tuple(x.shape)}.")
        x = self.stem(x)
        skips = []
        for block, down in zip(self.encoder, self.down, strict=True):
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for lvl in reversed(range(self.depth)):
            x = self.up[lvl](x)
            if self.concat_skips:
                x = torch.cat([x, skips[lvl]], dim=1)
            x = self.decoder[lvl](self.fuse[lvl](x))
        return self.head(x)
