"""Model inversion of shared latents (Eq. 2) through U-Net encoders of increasing depth."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from monai_fedpriv.attacks import invert_latents, score_reconstruction, unet_encoder


def _phantom(size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (xx**2 + (1.2 * yy) ** 2).sqrt()
    return (0.45 * (r < 0.85).float() + 0.45 * (r < 0.5).float() + 0.1 * torch.sin(7 * xx) * (r < 0.85))[None]


def test_unet_encoder_depths_of_default_network():
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (16, 32, 64, 128), (2, 2, 2), norm="INSTANCE", num_res_units=1)
    x = torch.rand(1, 1, 64, 64)
    shapes = [tuple(unet_encoder(net, d)(x).shape) for d in (1, 2, 3, 4)]
    assert shapes == [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 8, 8)]
    enc = unet_encoder(net, 1)
    assert enc[0] is not net.model[0] and not enc.training  # a copy, in eval mode
    assert torch.equal(enc[0].conv.unit0.conv.weight, net.model[0].conv.unit0.conv.weight)
    with pytest.raises(ValueError, match="only 4"):
        unet_encoder(net, 5)
    with pytest.raises(ValueError):
        unet_encoder(torch.nn.Linear(2, 2), 1)


def test_shallow_encoder_leaks_more_than_deep():
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (4, 8, 16), (2, 2), norm="INSTANCE", num_res_units=1)
    img = _phantom()
    scores = {}
    for depth in (1, 3):
        enc = unet_encoder(net, depth)
        with torch.no_grad():
            latent = enc(img[None])
        recon, stats = invert_latents(enc, latent, (32, 32), iterations=500, restarts=2, num_threads=1,
                                      generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert recon.shape == img.shape and stats["matching_loss"] == min(stats["restart_losses"])
        scores[depth] = score_reconstruction(recon, img)
    assert scores[1]["ssim"] > 0.6 and scores[1]["verdict"].startswith("leaks")
    assert scores[1]["ssim"] > scores[3]["ssim"] + 0.2
    assert scores[1]["psnr"] > scores[3]["psnr"] + 3.0
