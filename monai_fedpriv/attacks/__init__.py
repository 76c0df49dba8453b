"""Reconstruction attacks that measure what shared updates and latents leak about training images.

One interface, after breaching (Geiping et al., 2020): ``reconstruct(update, model, threat_model, loss, mask)``
returns ``(reconstruction, stats)``; the :class:`ThreatModel` holds what the attacker knows.
"""

from monai_fedpriv.attacks.figures import save_reconstruction_grid
from monai_fedpriv.attacks.gradient_inversion import cosine_matching_loss, reconstruct, replay_update, total_variation
from monai_fedpriv.attacks.model_inversion import invert_latents, unet_encoder
from monai_fedpriv.attacks.report import attack_table, latent_table, noise_break
from monai_fedpriv.attacks.scores import baseline_images, ncc, psnr, score_reconstruction, ssim, verdict
from monai_fedpriv.attacks.threat_model import PRIVACY_REGIMES, ThreatModel, soft_target_loss
from monai_fedpriv.attacks.victim import (
    build_victim_update,
    intensity_label,
    load_victim_image,
    load_victim_label,
    update_norm,
)

__all__ = [
    "PRIVACY_REGIMES",
    "ThreatModel",
    "attack_table",
    "baseline_images",
    "build_victim_update",
    "cosine_matching_loss",
    "intensity_label",
    "invert_latents",
    "latent_table",
    "load_victim_image",
    "load_victim_label",
    "ncc",
    "noise_break",
    "psnr",
    "reconstruct",
    "replay_update",
    "save_reconstruction_grid",
    "update_norm",
    "score_reconstruction",
    "soft_target_loss",
    "ssim",
    "total_variation",
    "unet_encoder",
    "verdict",
]
