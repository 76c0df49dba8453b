"""One name per network of the seeds, for bundles that let a team choose (``"network_name"`` id).

==================== ============================================================================================
name                 network
==================== ============================================================================================
``monet``            MoNet (Knolle et al. 2021), seed 000; 2D
``unet_mobilenet_v2`` segmentation-models-pytorch U-Net with a MobileNetV2 encoder, seed 000; 2D
``unet_resnet18``    ... with a ResNet-18 encoder, seed 000; 2D
``unet_vgg11_bn``    ... with a VGG11-BN encoder, seed 000; 2D
``segresnet``        MONAI ``SegResNet`` with seed 001's BraTS backbone settings (Myronenko 2018; about 1.2M
                     parameters at 4 inputs / 3 outputs); 2D or 3D
``unet``             MONAI ``UNet`` (16-32-64-128-256 channels, 2 residual units, instance norm); 2D or 3D
==================== ============================================================================================

All return logits; the loss or the bundle's post-processing applies sigmoid or softmax. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

__all__ = ["NETWORKS", "build_network"]

NETWORKS = ("monet", "unet_mobilenet_v2", "unet_resnet18", "unet_vgg11_bn", "segresnet", "unet")
_TWO_D_ONLY = ("monet", "unet_mobilenet_v2", "unet_resnet18", "unet_vgg11_bn")


def build_network(
    name: str,
    in_channels: int,
    out_channels: int,
    spatial_dims: int = 2,
    weights_path: str | Path | None = None,
) -> nn.Module:
    """The network ``name`` (see the module docstring) for ``in_channels`` inputs and ``out_channels`` outputs.

    Args:
        weights_path: a local ``torch.save``-d state dict for the smp U-Nets (whole network or encoder), e.g.
            ImageNet or in-house pre-training as in seed 000; other networks refuse it (load weights with the
            bundle's checkpoint loader instead).

    Raises:
        ValueError: an unknown name, a 2D-only network asked for 3D, or bad channel counts (names the value).
    """
    if name not in NETWORKS:
        raise ValueError(f"network_name must be one of {NETWORKS}, got {name!r}.")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if name in _TWO_D_ONLY and spatial_dims != 2:
        raise ValueError(f"{name} is a 2D network; spatial_dims={spatial_dims} is not supported.")
    for label, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}.")
    if weights_path is not None and not name.startswith("unet_"):
        raise ValueError(f"weights_path is for the smp U-Nets; load {name}'s weights through the bundle instead.")
    if name == "monet":
        from monai_fedpriv.networks.monet import MoNet

        return MoNet(in_channels=in_channels, out_channels=out_channels)
    if name.startswith("unet_"):
        from monai_fedpriv.networks.smp_unets import smp_unet

        return smp_unet(name[len("unet_") :], in_channels=in_channels, classes=out_channels, weights_path=weights_path)
    if name == "segresnet":
        from monai.networks.nets import SegResNet

        return SegResNet(spatial_dims=spatial_dims, init_filters=8, in_channels=in_channels,
                         out_channels=out_channels, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))  # fmt: skip
    from monai.networks.nets import UNet

    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="INSTANCE")  # fmt: skip
