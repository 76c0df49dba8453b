"""Client-level Gaussian privacy of the whole update (McMahan, Ramage, Talwar and Zhang 2018, "Learning
differentially private recurrent language models", the per-client clip and Gaussian noise of DP-FedAvg).

The update's floating-point coordinates, taken together as one vector, are scaled down to L2 norm at most ``C``
(``clip_norm``), then ``N(0, (sigma C)^2)`` is added to every coordinate. One call is one release of the Gaussian
mechanism, asked of the site's :class:`~monai_fedpriv.privacy.budget.PrivacyBudget` before it is made (reserved when
the filter is built) and composed across rounds, and with DP-SGD, in the site's one ledger.

Sensitivity, and what the ledger records
----------------------------------------
* ``neighbouring="replace"`` (default): any change of the site's data in the round, including adding, removing or
  replacing one training example, can move the clipped update anywhere in the ball of radius ``C``, so the L2
  sensitivity is ``2 C`` and the mechanism is a Gaussian mechanism with noise multiplier ``sigma / 2``; that is what
  is recorded. This is the relation DP-SGD's example-level epsilon uses, so the two compose in one ledger.
* ``neighbouring="add_remove_site"``: McMahan et al.'s client-level relation, the site's update against no update
  from the site at all: sensitivity ``C``, recorded noise multiplier ``sigma``. Only meaningful when the server
  aggregates over sites whose participation is itself secret, which is not the case in a cross-silo federation.

Sparse input: the clip and the noise act on the shared coordinates only and the mask is sent as is, so the guarantee
covers the *values* given the mask, not the mask. A mask that is itself private (SVT's) or post-processing of
DP-SGD is fine; a data-dependent mask chosen without privacy (a percentile of |dw|) would leak which coordinates
moved most while the update claims DP, so such an input is refused (fail closed).

Nothing data-dependent (norms, whether clipping happened) is written to ``meta``: meta crosses the wire.
"""

from __future__ import annotations

import torch

from monai_fedpriv.errors import PrivacyConfigError, UpdateError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.accounting import GaussianEvent
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters.base import copy_update, meta_with_privacy, privacy_meta
from monai_fedpriv.privacy.filters.budgeted import BudgetedRelease
from monai_fedpriv.privacy.filters.vectors import check_positive, flatten, float_keys, input_mask

__all__ = ["GaussianUpdatePrivacy", "NEIGHBOURING"]

NEIGHBOURING = ("replace", "add_remove_site")


class GaussianUpdatePrivacy(BudgetedRelease):
    """Clip the update to L2 norm ``clip_norm`` and add ``N(0, (noise_multiplier * clip_norm)^2)`` per coordinate.

    Args:
        clip_norm: ``C`` > 0, bound on the L2 norm of the (shared, floating-point part of the) update. It acts on
            the raw delta (not normalised by local steps).
        noise_multiplier: ``sigma`` > 0; the noise std is ``sigma * C``.
        budget: the site's :class:`~monai_fedpriv.privacy.budget.PrivacyBudget` (finite limit); each round's release
            is reserved at construction and asked for before it is made.
        generator: a CPU ``torch.Generator``, an int seed, or ``None`` for a generator seeded from OS entropy.
        neighbouring: ``"replace"`` (sensitivity ``2 C``, default) or ``"add_remove_site"`` (sensitivity ``C``);
            see the module docstring.

    Integer tensors (e.g. ``num_batches_tracked``) are not sent: their delta is zeroed.

    Example::

        gauss = GaussianUpdatePrivacy(clip_norm=0.5, noise_multiplier=1.0, budget=PrivacyBudget(limit=10.0))
        private_update = gauss(update)
    """

    covers = frozenset({"delta"})
    reservation = "gaussian"
    budget_hint = "raise the Gaussian filter's noise multiplier (--gaussian-noise, id gaussian_noise_multiplier)"

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        budget: PrivacyBudget,
        generator: torch.Generator | int | None = None,
        neighbouring: str = "replace",
    ) -> None:
        self.clip_norm = float(check_positive("clip_norm", clip_norm))  # type: ignore[arg-type]
        self.noise_multiplier = float(check_positive("noise_multiplier", noise_multiplier))  # type: ignore[arg-type]
        if neighbouring not in NEIGHBOURING:
            raise PrivacyConfigError(f"neighbouring must be one of {NEIGHBOURING}, got {neighbouring!r}.")
        self.neighbouring = neighbouring
        self._bind_budget(budget, generator)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    @property
    def recorded_noise_multiplier(self) -> float:
        """Noise std divided by the L2 sensitivity: what the ledger receives."""
        return self.noise_multiplier / (2.0 if self.neighbouring == "replace" else 1.0)

    @property
    def event(self) -> GaussianEvent:
        """The ledger event of one round's release."""
        return GaussianEvent(self.recorded_noise_multiplier)

    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        upstream = privacy_meta(update)
        if update.masks is not None and not (upstream.get("mask_dp") or upstream.get("dp_sgd")):
            raise UpdateError(
                f"{type(self).__name__}: the update of {update.site!r} round {update.round} is sparse with a mask "
                f"chosen without privacy; its mask would leak while the update claims DP. Use a dense update, SVT, "
                f"or DP-SGD upstream."
            )
        keys = float_keys(update.delta)
        values = flatten(update.delta, keys)
        shared = input_mask(update, keys)
        self.budget.release(self.event, f"{type(self).__name__} round {update.round}")
        if shared is not None:
            values = torch.where(shared, values, torch.zeros_like(values))
        norm = float(torch.linalg.vector_norm(values))
        if norm > self.clip_norm:
            values = values * (self.clip_norm / norm)
        noise = torch.randn(values.numel(), generator=self.generator, dtype=torch.float64) * self.noise_std
        values = values + (noise if shared is None else torch.where(shared, noise, torch.zeros_like(noise)))

        delta: dict[str, torch.Tensor] = {}
        offset = 0
        key_set = set(keys)
        for k, v in update.delta.items():
            if k not in key_set:
                delta[k] = torch.zeros_like(v)
                continue
            n = v.numel()
            delta[k] = values[offset : offset + n].reshape(v.shape).to(device=v.device, dtype=v.dtype)
            offset += n
        masks = None
        if update.masks is not None:
            masks = {k: m.clone() for k, m in update.masks.items()}
            for k, v in update.delta.items():
                if k not in key_set:
                    masks[k] = torch.zeros(v.shape, dtype=torch.bool, device=v.device)

        self.rounds += 1

        priv = upstream
        priv["dp"] = True
        priv.setdefault("filter_epsilon", None)  # (eps, delta) comes from the ledger's accountant
        priv.setdefault("filter_epsilon_total", None)
        priv.update(self.ledger_facts())
        priv.setdefault("filters", []).append(
            {
                "filter": "gaussian",
                "dp": True,
                "clip_norm": self.clip_norm,
                "noise_multiplier": self.noise_multiplier,
                "noise_std": self.noise_std,
                "neighbouring": self.neighbouring,
                "recorded_noise_multiplier": self.recorded_noise_multiplier,
                "sparse_input": shared is not None,
            }
        )
        return copy_update(update, delta=delta, masks=masks, meta=meta_with_privacy(update, priv))
