"""One leakage audit of one image: build the bundle's network, replay a site's round on the victim (DP-SGD and an
update filter as a site applies them), invert the update (Eq. 1 of seed 004) and score the reconstruction against
baselines. :mod:`monai_fedpriv.attacks.cli` is the command line around it."""

from __future__ import annotations

from typing import Any

import torch

from monai_fedpriv.attacks.bundle_model import bundle_activation, load_bundle_model, load_checkpoint
from monai_fedpriv.attacks.gradient_inversion import reconstruct
from monai_fedpriv.attacks.scores import label_map, score_reconstruction
from monai_fedpriv.attacks.threat_model import ThreatModel
from monai_fedpriv.attacks.victim import build_victim_update, load_victim, update_norm
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.accounting import GaussianEvent, PrivacyEvent, PrivacyLedger, PureEvent
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters import PercentileSharing, SparseVectorFilter
from monai_fedpriv.privacy.filters.base import privacy_meta

__all__ = [
    "DELTA",
    "attack_image",
    "build_share_filter",
    "bundle_activation",
    "load_bundle_model",
    "load_checkpoint",
    "load_victim",
    "release_epsilon",
]

DELTA = 1e-5


def release_epsilon(
    noise_multiplier: float, steps: int, delta: float = DELTA, pure_epsilon: float | None = None
) -> float | None:
    """Epsilon of one released update made of ``steps`` full-batch Gaussian steps (and, optionally, one pure-DP
    release such as an SVT round), composed in a :class:`~monai_fedpriv.privacy.PrivacyLedger` like a site's;
    ``None`` means no guarantee (no noise and no pure-DP filter)."""
    events: list[PrivacyEvent] = []
    if noise_multiplier > 0:
        events.append(GaussianEvent(noise_multiplier, steps))
    if pure_epsilon is not None:
        events.append(PureEvent(pure_epsilon, "svt"))
    if not events:
        return None
    return PrivacyLedger().epsilon_with(events, delta)


def build_share_filter(
    share: str,
    *,
    fraction: float = 0.1,
    clip: float | None = None,
    threshold: float = 5e-4,
    epsilon_select: float = 1.0,
    epsilon3: float = 1.0,
    seed: int = 0,
) -> Any | None:
    """The update filter a site applies after DP-SGD: ``none``, ``percentile`` or ``svt`` (Li et al. 2019).

    ``svt`` takes the defaults of the shared ``svt.json`` (``clip`` 1e-3, threshold 5e-4, selection budget 1 split
    as Lyu et al. recommend, answers 1) and is built the way a site builds it, on a budget that allows exactly the
    one audited release; ``percentile`` shares the top ``fraction`` coordinates, clipped to ``clip`` if given.
    """
    if share == "none":
        return None
    if share == "percentile":
        return PercentileSharing(fraction=fraction, clip=clip)
    if share == "svt":
        total = float(epsilon_select) + float(epsilon3)
        budget = PrivacyBudget(limit=total if total > 0 else 1.0)  # a bad epsilon is refused by the filter, by name
        return SparseVectorFilter(
            fraction, epsilon_select=epsilon_select, epsilon3=epsilon3, clip=clip if clip is not None else 1e-3,
            threshold=threshold, budget=budget, generator=seed,
        )  # fmt: skip
    raise ValueError(f"share must be 'none', 'percentile' or 'svt', got {share!r}.")


def attack_image(
    network: torch.nn.Module,
    loss: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    pixel_range: tuple[float, float] = (0.0, 1.0),
    *,
    privacy: str = "none",
    noise_multiplier: float | None = None,
    max_grad_norm: float | None = None,
    share_filter: Any | None = None,
    share: str = "none",
    local_steps: int = 1,
    lr: float = 0.01,
    mask_known: bool = True,
    iterations: int = 1000,
    restarts: int = 4,
    tv_weight: float = 5e-2,
    seed: int = 0,
    num_threads: int | None = None,
    activation: str = "softmax",
) -> tuple[dict[str, Any], torch.Tensor]:
    """Build the update a site would send for ``(image, label)`` and attack it; returns ``(record, reconstruction)``.

    ``activation`` is the bundle's output convention (``eval_activation``): ``"sigmoid"`` bundles label each region
    in its own binary channel (``label`` is then ``(regions, *spatial)``).

    The DP-SGD setting is a named regime, or ``noise_multiplier``/``max_grad_norm`` when given (``"custom"``); a
    ``share_filter`` (e.g. from :func:`build_share_filter`) is applied to the update after DP-SGD, and the attack
    then matches the shared coordinates only.
    """
    device = next(network.parameters()).device
    with torch.no_grad():
        num_classes = int(network(image[None].to(device)).shape[1])
    custom = noise_multiplier is not None or max_grad_norm is not None
    common = dict(
        image_shape=tuple(image.shape[1:]), num_classes=num_classes, in_channels=image.shape[0],
        local_steps=local_steps, lr=lr, mask_known=mask_known, pixel_range=pixel_range, activation=activation,
    )  # fmt: skip
    if custom:
        tm = ThreatModel(noise_multiplier=noise_multiplier or 0.0, max_grad_norm=max_grad_norm, **common)  # type: ignore[arg-type]
        privacy = "custom"
    else:
        tm = ThreatModel.for_regime(privacy, **common)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    delta = build_victim_update(
        network, loss, image[None].to(device), label[None].to(device), tm.local_steps, tm.lr,
        tm.noise_multiplier, tm.max_grad_norm, gen,
    )  # fmt: skip
    sent: ModelUpdate | dict[str, torch.Tensor] = delta
    share_meta: dict[str, Any] = {}
    if share_filter is not None:
        update = ModelUpdate("victim", 1, {n: v.cpu() for n, v in delta.items()}, n_samples=1,
                             local_steps=tm.local_steps)  # fmt: skip
        filtered: ModelUpdate = share_filter(update)
        share_meta = privacy_meta(filtered)
        sent = filtered
    recon, stats = reconstruct(
        sent, network, tm, loss, mask=label[None].to(device) if tm.mask_known else None,
        iterations=iterations, restarts=restarts, tv_weight=tv_weight,
        generator=torch.Generator().manual_seed(seed + 1), num_threads=num_threads,
    )  # fmt: skip
    recon = recon[0]
    scores = score_reconstruction(recon, image.cpu(), label_map(label.cpu()), pixel_range)
    eps_sgd = release_epsilon(tm.noise_multiplier, tm.local_steps)
    eps_share = share_meta.get("filter_epsilon")
    epsilon = release_epsilon(tm.noise_multiplier, tm.local_steps, pure_epsilon=eps_share)
    record = {
        "psnr": scores["psnr"],
        "ssim": scores["ssim"],
        "ncc": scores["ncc"],
        "baselines": scores["baselines"],
        "verdict": scores["verdict"],
        "epsilon": epsilon,
        "iterations": stats["iterations"],
        "seconds": stats["seconds"],
        "ncc_inside_mask": scores["ncc_inside_mask"],
        "ncc_outside_mask": scores["ncc_outside_mask"],
        "update_norm": update_norm(delta),
        "max_grad_norm": tm.max_grad_norm,
        "noise_multiplier": tm.noise_multiplier,
        "epsilon_dp_sgd": eps_sgd,
        "iterations_per_second": stats["iterations_per_second"],
        "mask_known": tm.mask_known,
        "privacy": privacy,
        "share": share,
        "fraction_shared": share_meta.get("fraction_shared", 1.0),
        "epsilon_share": eps_share,
        "local_steps": tm.local_steps,
        "restarts": stats["restarts"],
        "matching_loss": stats["matching_loss"],
        "delta": DELTA,
    }
    return record, recon
