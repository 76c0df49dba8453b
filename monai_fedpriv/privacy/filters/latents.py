"""The Gaussian mechanism on a dataset upload (FedReplay's latents with their labels), released once.

Seed 004's FedReplay uploads, once, the latents ``E(x)`` of every training item with its label; its Table 2 argues
the latents are about as hard to invert as FedAvg's gradients. Measured here on a U-Net, one encoding block's
latents give the image back (``monai-fedpriv compare``'s leakage table), so the upload needs a mechanism of its own:

* each item's latent row is clipped to L2 norm ``C`` (``clip_norm``);
* its label (values in ``[0, 1]``, a mask) is scaled by the public constant ``C / sqrt(label size)``, so any label
  has norm at most ``C`` without clipping;
* ``N(0, (sigma C)^2)`` is added to every coordinate of both; the labels are scaled back (post-processing) and the
  server thresholds them.

Sensitivity: replacing one item moves its latent row by at most ``2 C`` and its scaled label by at most ``C``, so
``sqrt(5) C`` in L2; a privacy unit (a patient) that gave ``k`` items moves ``k`` disjoint rows, ``sqrt(5 k) C``.
The neighbouring relation is *replace one case* (its ``k`` items), with the number of items and ``k`` public (the
upload's shape says them): it is not add/remove, under which the rows would shift. A privacy unit of several cases
(a patient with several volumes) needs ``k`` counted per patient; the bundles here hold one case per patient.
One release is one Gaussian mechanism with noise multiplier ``sigma / sqrt(5 k)``, recorded in the site's one ledger
before anything is sent (:meth:`~monai_fedpriv.privacy.budget.PrivacyBudget.release` refuses a release that would
pass the budget; then nothing is sent). ``k`` is the upload's ``meta["items_per_unit"]``, which the site's upload
builder sets to the most items one case gave.

What the mask part costs in utility is large: per label pixel the noise std is ``sigma sqrt(label size)``, so labels
survive only a small ``sigma`` (a large epsilon). The report states the epsilon; it does not pretend otherwise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from monai_fedpriv.errors import PrivacyConfigError, UpdateError
from monai_fedpriv.fl.messages import LatentUpload
from monai_fedpriv.privacy.accounting import GaussianEvent, PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters.base import UpdateFilter
from monai_fedpriv.privacy.filters.vectors import check_positive
from monai_fedpriv.privacy.noise import make_generator

__all__ = ["LatentGaussianPrivacy", "latent_event"]


def latent_event(noise_multiplier: float, items_per_unit: int) -> GaussianEvent:
    """The ledger event of one upload released with noise ``sigma C`` when one privacy unit gave ``k`` items."""
    return GaussianEvent(noise_multiplier / math.sqrt(5.0 * items_per_unit))


class LatentGaussianPrivacy(UpdateFilter):
    """Clip each item's latent to ``clip_norm``, scale its label, add Gaussian noise: one private upload.

    Args:
        clip_norm: ``C`` > 0, bound on each item's latent L2 norm.
        noise_multiplier: ``sigma`` > 0; noise std ``sigma C`` per coordinate.
        budget: the site's :class:`~monai_fedpriv.privacy.budget.PrivacyBudget` (a finite limit); the upload is
            asked of it before it is made.
        generator: a CPU ``torch.Generator``, an int seed, or ``None`` (OS entropy).

    Raises:
        PrivacyConfigError: a bad setting, a budget without a limit, or a budget that one upload of one item per
            unit would already pass.
    """

    covers: ClassVar[frozenset[str]] = frozenset({"latents.latents", "latents.labels"})

    def __init__(self, clip_norm: float, noise_multiplier: float, budget: PrivacyBudget,
                 generator: torch.Generator | int | None = None) -> None:  # fmt: skip
        self.clip_norm = float(check_positive("clip_norm", clip_norm))  # type: ignore[arg-type]
        self.noise_multiplier = float(check_positive("noise_multiplier", noise_multiplier))  # type: ignore[arg-type]
        if not isinstance(budget, PrivacyBudget):
            raise PrivacyConfigError(f"budget must be the site's PrivacyBudget, got {type(budget).__name__}.")
        budget.require_limit(type(self).__name__)
        cost = PrivacyLedger().epsilon_with([latent_event(self.noise_multiplier, 1)], budget.delta, budget.accountant)
        if cost > budget.limit:  # type: ignore[operator]
            raise PrivacyConfigError(
                f"one latent upload at --latent-noise-multiplier {self.noise_multiplier:g} costs epsilon {cost:.4g} "
                f"at delta {budget.delta:g}, more than the budget {budget.limit:g}; raise the noise or the budget."
            )
        self.budget = budget
        self.generator = make_generator(generator)
        self.released = 0

    def __call__(self, upload: LatentUpload) -> LatentUpload:  # type: ignore[override]  # acts on uploads only
        if not isinstance(upload, LatentUpload):
            raise UpdateError(f"{type(self).__name__} protects a latent upload, got {type(upload).__name__}.")
        k = upload.meta.get("items_per_unit")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UpdateError(f"the upload of {upload.site!r} does not say how many items one case gave "
                              f"(meta['items_per_unit'] is {k!r}); nothing was sent.")  # fmt: skip
        n = upload.items
        latents = upload.latents.detach().to(torch.float64).reshape(n, -1)
        labels = upload.labels.detach().to(torch.float64).reshape(n, -1)
        if labels.numel() and (labels.min() < 0 or labels.max() > 1):
            raise UpdateError(f"the labels of {upload.site!r} are not in [0, 1]: the mechanism's bound needs masks.")
        event = latent_event(self.noise_multiplier, k)
        self.budget.release(event, f"{type(self).__name__} upload of {n} items")
        norms = torch.linalg.vector_norm(latents, dim=1, keepdim=True)
        latents = latents * torch.clamp(self.clip_norm / norms.clamp_min(1e-12), max=1.0)
        scale = self.clip_norm / math.sqrt(max(1, labels.shape[1]))
        std = self.noise_multiplier * self.clip_norm
        latents = latents + torch.randn(latents.shape, generator=self.generator, dtype=torch.float64) * std
        labels = labels * scale + torch.randn(labels.shape, generator=self.generator, dtype=torch.float64) * std
        labels = labels / scale
        self.released += 1
        meta = copy.deepcopy(upload.meta)
        meta["protected"] = True
        meta["privacy"] = {
            **{key: v for key, v in self.budget.facts().items() if key in ("epsilon", "delta", "accountant", "budget")},
            "mechanism": "latent_gaussian", "dp": True, "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier, "noise_std": std, "items_per_unit": k,
            "recorded_noise_multiplier": event.noise_multiplier, "label_scale": scale,
        }  # fmt: skip
        return LatentUpload(upload.site, upload.round,
                            latents.reshape(upload.latents.shape).to(upload.latents.dtype),
                            labels.reshape(upload.labels.shape).to(torch.float32), meta, upload.step)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"released": self.released, "generator_state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.released = int(state["released"])
        self.generator.set_state(state["generator_state"])
