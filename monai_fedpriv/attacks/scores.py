"""How much a reconstruction reveals: PSNR, SSIM, normalised cross-correlation, and two baselines.

A reconstruction only proves leakage if it beats what an attacker gets for free. Two baselines set that bar: a
constant image at the victim's mean intensity (what knowing the intensity statistics gives), and the victim's mask
rescaled to the pixel range (what knowing the label gives: with the mask known, the silhouette is no leak). PSNR and
SSIM come from MONAI (:class:`monai.metrics.PSNRMetric`, :class:`monai.metrics.SSIMMetric`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from monai.metrics import PSNRMetric, SSIMMetric

__all__ = ["psnr", "ssim", "ncc", "baseline_images", "score_reconstruction", "verdict", "label_map"]



def label_map(label: torch.Tensor) -> torch.Tensor:
    """One label map from a victim's label: itself (class indices, one channel), or for one binary channel per
    region (sigmoid bundles) the number of regions covering each voxel (nested BraTS regions give 0..3)."""
    return label.float().sum(0, keepdim=True) if label.ndim > 1 and label.shape[0] > 1 else label

def psnr(recon: torch.Tensor, original: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of one image ``(C, *spatial)`` against the original."""
    value = PSNRMetric(max_val=data_range)(recon.detach().float().cpu()[None], original.float().cpu()[None])
    return float(cast(torch.Tensor, value))


def ssim(recon: torch.Tensor, original: torch.Tensor, data_range: float = 1.0) -> float:
    """SSIM (MONAI; Gaussian window of 11, shrunk to fit tiny images) of one ``(C, *spatial)`` image."""
    win = min(11, *original.shape[1:])
    win = win if win % 2 == 1 else win - 1
    metric = SSIMMetric(spatial_dims=original.dim() - 1, data_range=data_range, win_size=win)
    return float(cast(torch.Tensor, metric(recon.detach().float().cpu()[None], original.float().cpu()[None])))


def ncc(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """Normalised cross-correlation (Pearson r) of two images, optionally over a boolean ``region`` only.

    Returns 0.0 when either image is constant on the region (no correlation can be measured).
    """
    a, b = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
    if region is not None:
        keep = region.detach().cpu().reshape(-1).bool()
        a, b = a[keep], b[keep]
    if a.numel() < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 1e-12 else 0.0


def baseline_images(
    original: torch.Tensor, mask: torch.Tensor | None, pixel_range: tuple[float, float] = (0.0, 1.0)
) -> dict[str, torch.Tensor]:
    """The free guesses: ``constant`` (mean intensity everywhere) and ``mask`` (labels rescaled to the range)."""
    lo, hi = pixel_range
    out = {"constant": torch.full_like(original.float(), float(original.float().mean()))}
    if mask is not None:
        m = mask.float().reshape(original.shape[1:])[None].expand_as(original)  # one label map for every channel
        top = float(m.max())
        out["mask"] = lo + (hi - lo) * (m / top if top > 0 else m)
    return out


def verdict(scores: dict[str, Any]) -> str:
    """One line comparing the attack to the baselines on both PSNR and SSIM."""
    base = scores["baselines"]
    beaten = [n for n, b in base.items() if scores["psnr"] > b["psnr"] and scores["ssim"] > b["ssim"]]
    if len(beaten) == len(base):
        return "leaks: beats both baselines" if len(base) == 2 else f"leaks: beats the {beaten[0]} baseline"
    if beaten:
        return f"partial leak: beats the {beaten[0]} baseline only"
    return "no better than baseline"


def score_reconstruction(
    recon: torch.Tensor,
    original: torch.Tensor,
    mask: torch.Tensor | None = None,
    pixel_range: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Any]:
    """All scores of one reconstruction, the baselines' scores and a verdict.

    Args:
        recon: reconstructed image ``(C, *spatial)``.
        original: the victim image, same shape.
        mask: the victim's label map (any shape with as many elements as one channel); foreground = label > 0.
        pixel_range: intensity range; its width is the data range of PSNR and SSIM.

    Returns:
        ``{"psnr", "ssim", "ncc", "ncc_inside_mask", "ncc_outside_mask", "baselines": {name: {"psnr", "ssim"}},
        "verdict"}`` (the two masked NCCs are ``None`` without a mask).

    Example:
        >>> s = score_reconstruction(torch.rand(1, 32, 32), torch.rand(1, 32, 32))
        >>> s["verdict"]
        'no better than baseline'
    """
    if recon.shape != original.shape:
        raise ValueError(f"recon has shape {tuple(recon.shape)} but original has {tuple(original.shape)}.")
    rng = pixel_range[1] - pixel_range[0]
    out: dict[str, Any] = {
        "psnr": psnr(recon, original, rng),
        "ssim": ssim(recon, original, rng),
        "ncc": ncc(recon, original),
        "ncc_inside_mask": None,
        "ncc_outside_mask": None,
    }
    if mask is not None:
        fg = mask.reshape(original.shape[1:]) > 0
        out["ncc_inside_mask"] = ncc(recon[0], original[0], fg)
        out["ncc_outside_mask"] = ncc(recon[0], original[0], ~fg)
    out["baselines"] = {
        name: {"psnr": psnr(img, original, rng), "ssim": ssim(img, original, rng)}
        for name, img in baseline_images(original, mask, pixel_range).items()
    }
    out["verdict"] = verdict(out)
    return out
