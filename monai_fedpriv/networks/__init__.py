"""Segmentation networks of seed 000 (Ziller et al., Table 2) and their size and cost.

    MoNet       Knolle et al. 2021, written from the paper (2D, BatchNorm, dilated residual dense blocks)
    smp_unet    U-Nets with MobileNetV2 / ResNet-18 / VGG11-BN encoders through segmentation-models-pytorch
                (optional dependency: ``pip install monai-fedpriv[networks]``; never downloads weights)
    complexity  ``count_parameters`` and exact ``count_macs``
    factory     ``build_network(name, ...)``: one name per network, for bundles that let a team choose

In a bundle: ``"network_def": {"_target_": "monai_fedpriv.networks.MoNet", "in_channels": 1, "out_channels": 3}``.
"""

from monai_fedpriv.networks.complexity import count_macs, count_parameters
from monai_fedpriv.networks.factory import NETWORKS, build_network
from monai_fedpriv.networks.monet import MoNet
from monai_fedpriv.networks.smp_unets import SMP_ENCODERS, load_unet_weights, smp_unet

__all__ = [
    "MoNet", "NETWORKS", "SMP_ENCODERS", "build_network", "count_macs", "count_parameters", "load_unet_weights",
    "smp_unet",
]  # fmt: skip
