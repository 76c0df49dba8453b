"""Seed 004's Table 2 on a segmentation U-Net: FedReplay's latent upload against FedAvg's update, same victims.

Qu et al. (seed 004, sec. 3.3, Table 2) invert FedAvg's shared gradients (Eq. 1, after Zhu et al., 2019 and Geiping
et al., 2020) and FedReplay's shared latents ``E(x)`` (Eq. 2, white-box model inversion after He et al., 2019), and
find them about as hard to invert (PSNR 11.82 vs 11.64 dB), deeper encoders leaking less. :func:`leakage_rows` runs
both attacks on the same victims and scores both with :func:`score_reconstruction` at the bundle's pixel range;
:func:`leakage_markdown` prints the table and a reading made from its numbers.

Latent rows invert the output of the U-Net's first ``cut`` encoding blocks (:func:`unet_encoder`), clean or sent
through :class:`LatentGaussianPrivacy` (per-item clip ``C``, noise ``sigma C``). ``C`` is public, so the attacker
matches the *clipped* features of its guess, as the gradient attack replays a site's clipping. Each victim is one
item of one privacy unit (``items_per_unit`` 1) uploaded by a site of its own, on a budget of exactly that release.
Update rows invert the weight difference of one local SGD step on the victim alone (batch 1, no DP-SGD), made by
:func:`build_victim_update` and inverted by :func:`reconstruct`, the steps of ``audit.attack_image`` (whose record
drops the reconstructed mask that the ``dice`` column scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from monai_fedpriv.attacks.audit import DELTA
from monai_fedpriv.attacks.gradient_inversion import cpu_threads, reconstruct
from monai_fedpriv.attacks.model_inversion import invert_latents, unet_encoder
from monai_fedpriv.attacks.report import mean
from monai_fedpriv.attacks.scores import label_map, score_reconstruction
from monai_fedpriv.attacks.threat_model import ThreatModel
from monai_fedpriv.attacks.victim import build_victim_update
from monai_fedpriv.fl.messages import LatentUpload
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters.latents import LatentGaussianPrivacy, latent_event

__all__ = ["ROW_KEYS", "latent_release", "leakage_markdown", "leakage_rows", "mask_dice"]

#: the keys of every row, in this order (a contract: reports read them)
ROW_KEYS = ("method", "what", "cut_block", "ssim", "psnr", "latent_mechanism", "epsilon", "victim", "dice")


class _ClippedEncoder(torch.nn.Module):
    """``E(x)`` with each item clipped to L2 norm ``C``: what the mechanism noises, replayed by the attacker."""

    def __init__(self, encoder: torch.nn.Module, clip_norm: float) -> None:
        super().__init__()
        self.encoder, self.clip_norm = encoder, float(clip_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        scale = torch.clamp(self.clip_norm / z.flatten(1).norm(dim=1).clamp_min(1e-12), max=1.0)
        return z * scale.reshape(-1, *([1] * (z.dim() - 1)))


def latent_release(latents: torch.Tensor, labels: torch.Tensor, *, clip_norm: float, noise_multiplier: float,
                   generator: torch.Generator, site: str = "victim") -> tuple[torch.Tensor, float]:  # fmt: skip
    """One site's upload of one item through :class:`LatentGaussianPrivacy`, on a budget of exactly that release.

    Args:
        latents: ``(1, ...)`` features. labels: ``(1, ...)`` mask in ``[0, 1]``. clip_norm: ``C``.
        noise_multiplier: ``sigma``. generator: the mechanism's random source. site: the uploading site.

    Returns:
        ``(latents as sent, the upload's meta["privacy"]["epsilon"])`` at delta 1e-5.
    """
    limit = PrivacyLedger().epsilon_with([latent_event(noise_multiplier, 1)], DELTA) * (1 + 1e-9)
    mechanism = LatentGaussianPrivacy(clip_norm, noise_multiplier, PrivacyBudget(limit=limit, delta=DELTA), generator)
    sent = mechanism(LatentUpload(site, 1, latents.detach().cpu(), labels.float().cpu(), {"items_per_unit": 1}))
    return sent.latents.to(latents.device), float(sent.meta["privacy"]["epsilon"])


def mask_dice(pred: torch.Tensor, true: torch.Tensor, num_classes: int, activation: str) -> float:
    """Mean Dice over the foreground channels of a reconstructed mask (``reconstruct``'s ``stats["mask"]``: binary
    channels for sigmoid, class indices for softmax) against the victim's label ``(L, *spatial)``; channels empty in
    both are skipped, 1.0 when all are."""
    pred, true = pred.cpu().reshape(-1, *true.shape[1:]), true.cpu()
    if activation == "sigmoid":
        p, t = pred > 0.5, true > 0
    else:
        p, t = (F.one_hot(m[0].long(), num_classes).movedim(-1, 0)[1:].bool() for m in (pred, true))
    sums = [(int((pc & tc).sum()), int(pc.sum() + tc.sum())) for pc, tc in zip(p, t, strict=True)]
    scores = [2.0 * both / total for both, total in sums if total]
    return sum(scores) / len(scores) if scores else 1.0


def _upload_labels(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The label FedReplay uploads, in ``[0, 1]``: a binary mask as it is, class indices one-hot."""
    if float(label.min()) >= 0 and float(label.max()) <= 1:
        return label.float()[None]
    return F.one_hot(label[0].long(), num_classes).movedim(-1, 0).float()[None]


def _scorer(rows: list[dict[str, Any]], victim: int, image: torch.Tensor, label: torch.Tensor,
            pixel_range: tuple[float, float]) -> Any:  # fmt: skip
    """A function adding the row of one reconstruction of ``image`` to ``rows``, scored with its label's baselines."""

    def add(method: str, cut: int | None, recon: torch.Tensor, eps: float | None, dice: float | None) -> None:
        s = score_reconstruction(recon.cpu(), image.cpu(), label_map(label.cpu()), pixel_range)
        what, mech = ("latents", eps is not None) if method == "fedreplay" else ("update", False)
        values = (method, what, cut, float(s["ssim"]), float(s["psnr"]), mech, eps, victim, dice)
        rows.append(dict(zip(ROW_KEYS, values, strict=True)))

    return add


def _update_attack(network: torch.nn.Module, loss: torch.nn.Module, tm: ThreatModel, image: torch.Tensor,
                   label: torch.Tensor, **attack: Any) -> tuple[torch.Tensor, float | None]:  # fmt: skip
    """Eq. 1 on one local SGD step of the victim alone: ``(reconstruction, Dice of the mask or None)``."""
    device = next(network.parameters()).device
    x, y = image[None].to(device), label[None].to(device)
    delta = build_victim_update(network, loss, x, y, 1, tm.lr)
    recon, stats = reconstruct(delta, network, tm, loss, mask=y if tm.mask_known else None, **attack)
    return recon[0], None if tm.mask_known else mask_dice(stats["mask"], label, tm.num_classes, tm.activation)


def _latent_attack(encoder: torch.nn.Module, image: torch.Tensor, labels: torch.Tensor, sigma: float | None,
                   clip: float, noise: torch.Generator, site: str, **attack: Any) -> tuple[Any, Any]:  # fmt: skip
    """Eq. 2 on the victim's latents, clean or as the mechanism sends them: ``(reconstruction, epsilon or None)``."""
    with torch.no_grad():
        latents = encoder(image[None].to(next(encoder.parameters()).device))
    epsilon, attacked = None, encoder
    if sigma is not None:
        latents, epsilon = latent_release(latents, labels, clip_norm=clip, noise_multiplier=sigma, generator=noise,
                                          site=site)  # fmt: skip
        attacked = _ClippedEncoder(encoder, clip)
    recon, _ = invert_latents(attacked, latents, tuple(image.shape[1:]), in_channels=image.shape[0], **attack)
    return recon, epsilon


def leakage_rows(
    network: torch.nn.Module,
    victims: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss: torch.nn.Module | None = None,
    pixel_range: tuple[float, float] = (0.0, 1.0),
    activation: str = "softmax",
    cut_blocks: Sequence[int] = (1, 2),
    latent_noise: Sequence[float | None] = (None, 1.0),
    latent_clip: float = 1.0,
    include_update: bool = True,
    update_lr: float = 0.01,
    mask_known: bool = False,
    iterations: int = 1000,
    update_iterations: int | None = None,
    restarts: int = 2,
    latent_step_size: float | None = None,
    update_step_size: float | None = None,
    seed: int = 0,
    num_threads: int | None = 1,
) -> list[dict[str, Any]]:
    """Invert FedAvg's update (Eq. 1) and FedReplay's latents (Eq. 2) of each victim; one row per attack.

    ``dice`` is ``None`` on latent rows: FedReplay uploads the labels themselves, so there is no mask to
    reconstruct. ``cut_block`` 2 inverts the second block's output alone, as the seed's Layer2 encoder; a U-Net's
    primary model needs every skip level, so a U-Net upload at cut 2 also carries block 1's features (which leak as
    the cut-1 row): the cut-2 row is what the seed's deeper encoder leaks, not what a U-Net upload at cut 2 leaks.

    Args:
        network: the global MONAI UNet (not modified). victims: ``(image (C, *spatial), label (L, *spatial))`` pairs.
        loss: the site's loss (default: DiceCE for ``activation``, ``"softmax"`` or ``"sigmoid"``).
        pixel_range: the bundle's intensity range: box constraint and data range of SSIM/PSNR.
        cut_blocks: encoder depths whose output is uploaded. latent_noise: one latent row per entry, ``None`` for
            the clean upload or the mechanism's ``sigma``. latent_clip: the mechanism's ``C``.
        include_update: add the FedAvg rows. update_lr: the site's SGD step. mask_known: give the gradient attack
            the victim's mask (its ``dice`` is then ``None``).
        iterations: of the latent attacks, and of the update attack unless ``update_iterations``.
        restarts: of every attack. latent_step_size, update_step_size: the attacks' learning rates (``None``:
            their modules' defaults, set for ``[0, 1]`` images; a wider box may need a larger latent step to be
            crossed within the run). Each attack keeps its module's TV weight.
        seed: every random draw derives from it. num_threads: CPU threads (``None``: torch's setting).

    Returns:
        rows with exactly the keys of :data:`ROW_KEYS`, victim by victim: the update, then the latents.

    Raises:
        ValueError: no victims, a victim that is not ``(C, *spatial)`` with a label on its grid, a bad cut or sigma.

    Example:
        >>> print(leakage_markdown(leakage_rows(net, [(img, lbl)], iterations=300)))  # doctest: +SKIP
    """
    if not victims:
        raise ValueError("leakage_rows needs at least one (image, label) victim.")
    for v, (image, label) in enumerate(victims):
        if image.dim() not in (3, 4) or tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(f"victim {v}: image {tuple(image.shape)} and label {tuple(label.shape)} must be "
                             "(C, *spatial) and (L, *spatial) on one grid.")  # fmt: skip
    if any(s is not None and not s > 0 for s in latent_noise):
        raise ValueError(f"latent_noise must hold None or sigmas > 0, got {list(latent_noise)}.")
    device = next(network.parameters()).device
    encoders = {cut: unet_encoder(network, cut).to(device) for cut in cut_blocks}  # a bad cut fails before attacks
    if loss is None:
        loss = DiceCELoss(sigmoid=True) if activation == "sigmoid" else DiceCELoss(to_onehot_y=True, softmax=True)
    num_classes = int(getattr(network, "out_channels", 0))
    update_box: dict[str, Any] = {"iterations": update_iterations or iterations, "restarts": restarts}
    latent_box: dict[str, Any] = {"pixel_range": pixel_range, "iterations": iterations, "restarts": restarts}
    update_box |= {"step_size": update_step_size} if update_step_size is not None else {}
    latent_box |= {"step_size": latent_step_size} if latent_step_size is not None else {}
    rows: list[dict[str, Any]] = []
    with cpu_threads(num_threads):
        if num_classes < 1:
            with torch.no_grad():
                num_classes = int(network(victims[0][0][None].to(device)).shape[1])
        for v, (image, label) in enumerate(victims):
            init = seed + 1 + 1000 * v  # the same initial guesses for every attack on this victim
            add = _scorer(rows, v, image, label, pixel_range)
            if include_update:
                tm = ThreatModel(tuple(image.shape[1:]), num_classes, image.shape[0], lr=update_lr,
                                 mask_known=mask_known, pixel_range=pixel_range, activation=activation)  # fmt: skip
                generator = torch.Generator().manual_seed(init)
                recon, dice = _update_attack(network, loss, tm, image, label, generator=generator, **update_box)
                add("fedavg", None, recon, None, dice)
            for cut, encoder in encoders.items():
                for k, sigma in enumerate(latent_noise):
                    recon, eps = _latent_attack(
                        encoder, image, _upload_labels(label, num_classes), sigma, latent_clip,
                        torch.Generator().manual_seed(init + 500 + 10 * cut + k), f"victim-{v}",
                        generator=torch.Generator().manual_seed(init), **latent_box,
                    )  # fmt: skip
                    add("fedreplay", cut, recon, eps, None)
    return rows


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Mean SSIM/PSNR/Dice by (method, cut, epsilon): the update first, then latents by cut, clean then noised."""
    sel: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        eps = None if not r["latent_mechanism"] else round(float(r["epsilon"]), 6)
        sel.setdefault((r["method"], r["cut_block"], eps), []).append(r)
    order = sorted(sel, key=lambda k: (k[0] != "fedavg", k[1] or 0, k[2] is not None, -(k[2] or 0.0)))
    return {k: {name: mean([r[name] for r in sel[k]]) for name in ("ssim", "psnr", "dice")}
            | {"n": len({r["victim"] for r in sel[k]})} for k in order}  # fmt: skip


def _label(key: tuple[Any, ...]) -> str:
    method, cut, eps = key
    if method == "fedavg":
        return "FedAvg update (1 local step, Eq. 1)"
    what = "cut 1" if cut == 1 else f"block {cut}'s output alone"
    return f"FedReplay latents, {what} (Eq. 2), " + ("clean" if eps is None else f"mechanism eps {eps:.3g} (k = 1)")


def _reading(stats: dict[tuple[Any, ...], dict[str, Any]], floor: float) -> str:
    """One paragraph comparing the rows by mean SSIM: under 0.05 apart reads 'about as much as', both under
    ``floor`` 'about as little as' (neither is a recognisable image)."""

    def versus(a: tuple[Any, ...], b: tuple[Any, ...]) -> str:
        sa, sb = stats[a]["ssim"], stats[b]["ssim"]
        if max(sa, sb) < floor:
            return "about as little as"
        return "about as much as" if abs(sa - sb) < 0.05 else ("more than" if sa > sb else "less than")

    def said(key: tuple[Any, ...]) -> str:
        s = stats[key]
        tail = f" (under {floor:.3g}: no recognisable image)" if s["ssim"] < floor else ""
        return f"{_label(key)}: SSIM {s['ssim']:.3f}{tail}, PSNR {s['psnr']:.2f} dB"

    update = next((k for k in stats if k[0] == "fedavg"), None)
    clean = {k[1]: k for k in stats if k[0] == "fedreplay" and k[2] is None}
    parts = [f"Means over {max(s['n'] for s in stats.values())} victim(s), every reconstruction scored alike."]
    if update is not None:
        dice = stats[update]["dice"]
        parts.append(said(update) + (f"; its mask comes back at Dice {dice:.3f} (FedReplay uploads the mask)."
                                     if dice is not None else "."))  # fmt: skip
    for key in stats:
        if key[0] != "fedreplay":
            continue
        against = [f"{versus(key, clean[key[1]])} the clean upload"] if key[2] is not None and key[1] in clean else []
        against += [f"{versus(key, update)} FedAvg's update"] if update is not None else []
        parts.append(said(key) + (f"; it leaks {' and '.join(against)}." if against else "."))
    if len(clean) > 1:
        deep, shallow = clean[max(clean)], clean[min(clean)]
        parts.append(f"The deeper block's output alone leaks {versus(deep, shallow)} the first block's (seed 004: "
                     f"deeper leaks less); a U-Net's FedReplay upload at a deeper cut also carries the first block's "
                     f"features, so it leaks as the cut-1 row.")  # fmt: skip
    parts.append("Seed 004 found FedAvg and FedReplay alike on 224x224 retina images (PSNR 11.82 vs 11.64 dB).")
    return " ".join(parts)


def leakage_markdown(rows: Sequence[dict[str, Any]], floor: float = 0.1) -> str:
    """Seed 004's Table 2 from :func:`leakage_rows` (means over victims; epsilon 'inf' = no guarantee), then a
    paragraph reading its numbers; ``floor`` is the SSIM under which a reconstruction is read as unrecognisable
    (a constant or uniform-noise image scores about 0.04 on a brain phantom)."""
    if not rows:
        raise ValueError("leakage_markdown needs at least one row.")
    stats = _groups(rows)
    lines = ["| shared | mean SSIM | mean PSNR (dB) | mean Dice | epsilon | victims |", "|---|---|---|---|---|---|"]
    for key, s in stats.items():
        dice = "-" if s["dice"] is None else f"{s['dice']:.3f}"
        eps = "inf" if key[2] is None else f"{key[2]:.3g}"
        lines.append(f"| {_label(key)} | {s['ssim']:.3f} | {s['psnr']:.2f} | {dice} | {eps} | {s['n']} |")
    return "\n".join(lines) + "\n\n" + _reading(stats, floor) + "\n"
