"""Filters on what a site sends: the fail-closed chain and its coverage rule (:mod:`.base`), selective sharing by
percentile (:mod:`.selective`, no DP), the sparse vector technique (:mod:`.svt`) and Gaussian update privacy
(:mod:`.gaussian`) and the Gaussian mechanism on a one-time latent upload (:mod:`.latents`)."""

from monai_fedpriv.privacy.filters.base import (
    TENSOR_FIELDS,
    FilterChain,
    UpdateFilter,
    copy_update,
    covered_fields,
    meta_with_privacy,
    privacy_meta,
)
from monai_fedpriv.privacy.filters.gaussian import NEIGHBOURING, GaussianUpdatePrivacy
from monai_fedpriv.privacy.filters.latents import LatentGaussianPrivacy, latent_event
from monai_fedpriv.privacy.filters.selective import PercentileSharing
from monai_fedpriv.privacy.filters.svt import SparseVectorFilter, lyu_budget_split
from monai_fedpriv.privacy.filters.vectors import shared_count

__all__ = [
    "NEIGHBOURING",
    "TENSOR_FIELDS",
    "FilterChain",
    "GaussianUpdatePrivacy",
    "LatentGaussianPrivacy",
    "PercentileSharing",
    "SparseVectorFilter",
    "UpdateFilter",
    "copy_update",
    "covered_fields",
    "latent_event",
    "lyu_budget_split",
    "meta_with_privacy",
    "privacy_meta",
    "shared_count",
]
