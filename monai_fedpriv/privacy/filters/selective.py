"""Selective parameter sharing by percentile (Li et al. 2019, section 2.2; Shokri and Shmatikov 2015).

Only the fraction ``q`` of the update's coordinates with the largest magnitude is sent, each clipped to
``[-gamma, gamma]`` after normalising by the number of local iterations (the framing of Algorithm 2, lines 2 and 13).

This limits how much a site shares; it is **not** differential privacy. The threshold is a percentile of the data
itself, so which coordinates are sent, and their values, depend deterministically on the training data. Use
:class:`~monai_fedpriv.privacy.filters.svt.SparseVectorFilter` or
:class:`~monai_fedpriv.privacy.filters.gaussian.GaussianUpdatePrivacy` for a guarantee.
"""

from __future__ import annotations

import torch

from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.filters.base import UpdateFilter, copy_update, meta_with_privacy, privacy_meta
from monai_fedpriv.privacy.filters.vectors import (
    check_fraction,
    check_positive,
    flatten,
    float_keys,
    input_mask,
    shared_count,
    steps_divisor,
    top_k_mask,
    unflatten,
)

__all__ = ["PercentileSharing"]


class PercentileSharing(UpdateFilter):
    """Share the fraction ``q`` of coordinates with the largest ``|dw|``, clipped to ``[-gamma, gamma]``.

    Steps: ``dw <- delta / N_local`` (if ``normalise_by_steps``); keep the ``round(q * size)`` coordinates of largest
    ``|dw|`` over the whole model (floating-point tensors only; ties go to the coordinate that comes first in the
    state-dict order, so the selection is deterministic); clip kept values to ``[-gamma, gamma]``; multiply back by
    ``N_local``. The output carries ``masks`` (``True`` = sent) and zeros elsewhere. Integer buffers are not sent.

    If the input is already sparse, the selection is made among its shared coordinates only.

    No differential-privacy claim: ``meta["privacy"]["filter_epsilon"]`` is left ``None`` and ``"dp"`` is ``False``
    unless an upstream mechanism (e.g. DP-SGD) already made the update DP, in which case this filter is
    post-processing and keeps that guarantee (it never sets ``"dp"`` to ``True`` itself).

    Args:
        fraction: fraction ``q`` in (0, 1] of coordinates to share.
        clip: ``gamma`` > 0 applied to the normalised values, or ``None`` for no clipping.
        normalise_by_steps: divide by ``local_steps`` before clipping and multiply after (Alg. 2, lines 2 and 13).

    Example::

        share = PercentileSharing(fraction=0.1, clip=1e-4)
        sparse_update = share(update)   # sparse_update.masks[k] marks the 10% largest coordinates
    """

    covers = frozenset({"delta"})  # limits what is shared of the delta (no DP claim)

    def __init__(self, fraction: float, clip: float | None = None, normalise_by_steps: bool = True) -> None:
        self.fraction = check_fraction(fraction)
        self.clip = check_positive("clip", clip, allow_none=True)
        if not isinstance(normalise_by_steps, bool):
            raise TypeError(f"normalise_by_steps must be a bool, got {normalise_by_steps!r}.")
        self.normalise_by_steps = normalise_by_steps

    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        keys = float_keys(update.delta)
        n_steps = steps_divisor(update, self.normalise_by_steps, type(self).__name__)
        values = flatten(update.delta, keys) / n_steps
        size = values.numel()
        prior = input_mask(update, keys)
        candidates = size if prior is None else int(prior.sum())
        k = min(shared_count(self.fraction, size), candidates)
        score = values.abs()
        if prior is not None:
            score = torch.where(prior, score, torch.full_like(score, -1.0))  # never pick an unshared coordinate
        mask = top_k_mask(score, k)  # ties at the cut: lowest flat index (state-dict order) first
        if self.clip is not None:
            values = values.clamp(-self.clip, self.clip)
        delta, masks = unflatten(values * n_steps, mask, update, keys)

        priv = privacy_meta(update)
        priv.setdefault("dp", False)
        priv.setdefault("filter_epsilon", None)
        priv.setdefault("filter_epsilon_total", None)
        priv.setdefault("filters", []).append(
            {
                "filter": "percentile",
                "dp": False,
                "fraction": self.fraction,
                "clip": self.clip,
                "shared": k,
                "size": size,
            }
        )
        priv["fraction_shared"] = k / size if size else 0.0
        priv["mask_dp"] = False  # the mask is a percentile of the data itself
        return copy_update(update, delta=delta, masks=masks, meta=meta_with_privacy(update, priv))
