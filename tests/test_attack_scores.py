"""Scores of a reconstruction on images whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from monai_fedpriv.attacks import baseline_images, ncc, psnr, score_reconstruction, ssim, verdict


def _image(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (xx**2 + yy**2).sqrt()
    img = (0.5 * (r < 0.8).float() + 0.4 * (r < 0.4).float() + 0.1 * torch.cos(5 * yy))[None].clamp(0, 1)
    label = (r < 0.8).long() + (r < 0.4).long()
    return img, label[None]


def test_psnr_of_known_error():
    a = torch.zeros(1, 16, 16)
    assert psnr(a + 0.1, a) == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 over a unit range
    assert psnr(a + 0.2, a, data_range=2.0) == pytest.approx(20.0, abs=1e-3)
    assert math.isinf(psnr(a, a))


def test_ssim_identity_and_noise():
    img, _ = _image()
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(img.shape, generator=torch.Generator().manual_seed(0))
    assert ssim(noise, img) < 0.3
    vol = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    assert ssim(vol, vol) == pytest.approx(1.0, abs=1e-5)  # window shrunk to fit a tiny volume


def test_ncc_values():
    a = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ncc(2 * a + 1, a) == pytest.approx(1.0, abs=1e-6)
    assert ncc(-a, a) == pytest.approx(-1.0, abs=1e-6)
    assert ncc(torch.full_like(a, 0.3), a) == 0.0
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[:8] = True
    half = a.clone()
    half[0, 8:] = torch.rand(8, 16, generator=torch.Generator().manual_seed(5))
    assert ncc(half, a, region) == pytest.approx(1.0, abs=1e-6)
    assert abs(ncc(half, a, ~region)) < 0.3


def test_baselines():
    img, label = _image()
    base = baseline_images(img, label, (0.0, 1.0))
    assert torch.allclose(base["constant"], torch.full_like(img, float(img.mean())))
    assert set(base["mask"].unique().tolist()) == {0.0, 0.5, 1.0}
    assert set(baseline_images(img, None)) == {"constant"}
    assert baseline_images(img, label, (-1.0, 1.0))["mask"].min() == -1.0


def test_verdicts():
    img, label = _image()
    near = (img + 0.02 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    good = score_reconstruction(near, img, label)
    assert good["verdict"] == "leaks: beats both baselines"
    assert good["ncc"] > 0.95 and good["ncc_inside_mask"] > 0.9
    noise = torch.rand(img.shape, generator=torch.Generator().manual_seed(1))
    bad = score_reconstruction(noise, img, label)
    assert bad["verdict"] == "no better than baseline"
    assert set(bad["baselines"]) == {"constant", "mask"} and set(bad["baselines"]["mask"]) == {"psnr", "ssim"}
    partial = {
        "psnr": 12.0,
        "ssim": 0.5,
        "baselines": {"constant": {"psnr": 10, "ssim": 0.1}, "mask": {"psnr": 15, "ssim": 0.8}},
    }
    assert verdict(partial) == "partial leak: beats the constant baseline only"
    unmasked = score_reconstruction(near, img)
    assert unmasked["ncc_inside_mask"] is None and unmasked["verdict"] == "leaks: beats the constant baseline"
    with pytest.raises(ValueError, match="shape"):
        score_reconstruction(near[:, :8], img)
