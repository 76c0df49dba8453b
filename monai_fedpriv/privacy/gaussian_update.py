"""Client-level Gaussian privacy of the whole update (McMahan, Ramage, Talwar and Zhang 2018, "Learning
differentially private recurrent language models", the per-client clip and Gaussian noise of DP-FedAvg).

The update's floating-point coordinates, taken together as one vector, are scaled down to L2 norm at most ``C``
(``clip_norm``), then ``N(0, (sigma C)^2)`` is added to every coordinate. One call is one release of the Gaussian
mechanism, recorded in the ledger with :meth:`PrivacyLedger.record_gaussian` and composed across rounds (and with
DP-SGD) by the ledger's RDP accountant.

Sensitivity, and what the ledger records
----------------------------------------
* ``neighbouring="replace"`` (default): any change of the site's data in the round, including adding, removing or
  replacing one training example, can move the clipped update anywhere in the ball of radius ``C``, so the L2
  sensitivity is ``2 C`` and the mechanism is a Gaussian mechanism with noise multiplier ``sigma / 2``; that is what
  is recorded. This is the relation DP-SGD's example-level epsilon uses, so the two compose in one ledger.
* ``neighbouring="add_remove_site"``: McMahan et al.'s client-level relation, the site's update against no update
  from the site at all: sensitivity ``C``, recorded noise multiplier ``sigma``. Only meaningful when the server
  aggregates over sites whose participation is itself secret, which is not the case in a cross-silo federation.

Sparse input (e.g. after :class:`~monai_fedpriv.privacy.selective.PercentileSharing`): the clip and the noise act
on the shared coordinates only and the mask is sent as is. The guarantee then covers the *values* given the mask,
not the mask: a data-dependent mask (a percentile of |dw|) leaks which coordinates moved most. For a guarantee on
everything sent, apply this filter to a dense update, or use a mask chosen privately (SVT) or independently of the
data.

Nothing data-dependent (norms, whether clipping happened) is written to ``meta``: meta crosses the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.filters import (
    UpdateFilter,
    check_positive,
    copy_update,
    flatten,
    float_keys,
    input_mask,
    make_generator,
    meta_with_privacy,
    privacy_meta,
    report_epsilon,
)

__all__ = ["GaussianUpdatePrivacy", "NEIGHBOURING"]

NEIGHBOURING = ("replace", "add_remove_site")


class GaussianUpdatePrivacy(UpdateFilter):
    """Clip the update to L2 norm ``clip_norm`` and add ``N(0, (noise_multiplier * clip_norm)^2)`` per coordinate.

    Args:
        clip_norm: ``C`` > 0, bound on the L2 norm of the (shared, floating-point part of the) update. It acts on
            the raw delta (not normalised by local steps).
        noise_multiplier: ``sigma`` > 0; the noise std is ``sigma * C``.
        ledger: a :class:`~monai_fedpriv.privacy.accounting.PrivacyLedger` (anything with ``record_gaussian``) that
            receives one Gaussian event per round, or ``None``.
        generator: a CPU ``torch.Generator``, an int seed, or ``None`` for a generator seeded from OS entropy.
        neighbouring: ``"replace"`` (sensitivity ``2 C``, default) or ``"add_remove_site"`` (sensitivity ``C``);
            see the module docstring.
        delta: delta in (0, 1) at which ``meta["privacy"]["epsilon"]`` reports the ledger's epsilon after this
            release, or ``None`` to use the upstream ``meta["privacy"]["delta"]`` (DP-SGD's) when there is one.

    Integer tensors (e.g. ``num_batches_tracked``) are not sent: their delta is zeroed.

    Example::

        gauss = GaussianUpdatePrivacy(clip_norm=0.5, noise_multiplier=1.0, ledger=ledger, generator=0)
        private_update = gauss(update)
        ledger.epsilon(delta=1e-5)
    """

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        ledger: Any | None = None,
        generator: torch.Generator | int | None = None,
        neighbouring: str = "replace",
        delta: float | None = None,
    ) -> None:
        self.clip_norm = float(check_positive("clip_norm", clip_norm))  # type: ignore[arg-type]
        self.noise_multiplier = float(check_positive("noise_multiplier", noise_multiplier))  # type: ignore[arg-type]
        if neighbouring not in NEIGHBOURING:
            raise PrivacyConfigError(f"neighbouring must be one of {NEIGHBOURING}, got {neighbouring!r}.")
        if ledger is not None and not callable(getattr(ledger, "record_gaussian", None)):
            raise PrivacyConfigError(f"ledger must have a record_gaussian method, got {type(ledger).__name__}.")
        if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1):
            raise PrivacyConfigError(f"delta must be in (0, 1) or None, got {delta!r}.")
        self.delta = None if delta is None else float(delta)
        self.neighbouring = neighbouring
        self.ledger = ledger
        self.generator = make_generator(generator)
        self.rounds = 0

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    @property
    def recorded_noise_multiplier(self) -> float:
        """Noise std divided by the L2 sensitivity: what the ledger receives."""
        return self.noise_multiplier / (2.0 if self.neighbouring == "replace" else 1.0)

    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        keys = float_keys(update.delta)
        values = flatten(update.delta, keys)
        shared = input_mask(update, keys)
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

        if self.ledger is not None:
            self.ledger.record_gaussian(self.recorded_noise_multiplier, count=1)
        self.rounds += 1

        priv = privacy_meta(update)
        priv["dp"] = True
        priv.setdefault("filter_epsilon", None)  # (eps, delta) comes from the ledger's RDP accountant
        priv.setdefault("filter_epsilon_total", None)
        report_epsilon(priv, self.ledger, self.delta)  # the site's epsilon after this release
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

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "generator_state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("rounds", "generator_state"):
            if key not in state:
                raise KeyError(f"GaussianUpdatePrivacy state lacks required key {key!r}.")
        self.rounds = int(state["rounds"])
        self.generator.set_state(state["generator_state"])
