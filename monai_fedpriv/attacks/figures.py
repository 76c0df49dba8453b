"""PNG grids of reconstructions: original | reconstruction | |difference|, one row per case."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["save_reconstruction_grid"]


def _plane(x: torch.Tensor) -> torch.Tensor:
    """First channel of a ``(C, *spatial)`` image; the middle slice (last axis) of a volume."""
    x = x.detach().float().cpu()[0]
    return x[..., x.shape[-1] // 2] if x.dim() == 3 else x


def save_reconstruction_grid(
    rows: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    path: str | Path,
    pixel_range: tuple[float, float] = (0.0, 1.0),
) -> Path:
    """Write one PNG with a row ``original | reconstruction | |difference|`` per case.

    Args:
        rows: ``(title, original, reconstruction)`` per row; images are ``(C, *spatial)``.
        path: output PNG file (parent folders are created).
        pixel_range: display range of the images (the difference uses ``[0, high - low]``).

    Example:
        >>> save_reconstruction_grid([("no DP", img, rec)], "out/attack.png")  # doctest: +SKIP
    """
    if not rows:
        raise ValueError("save_reconstruction_grid needs at least one row.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = pixel_range
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for i, (title, original, recon) in enumerate(rows):
        a, b = _plane(original), _plane(recon)
        panels = [(a, "original", (lo, hi)), (b, title, (lo, hi)), ((a - b).abs(), "|difference|", (0, hi - lo))]
        for ax, (img, label, (vmin, vmax)) in zip(axes[i], panels, strict=True):
            ax.imshow(img.numpy(), cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
