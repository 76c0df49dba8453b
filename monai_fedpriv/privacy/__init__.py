"""Differential privacy for federated MONAI training.

DP-SGD at every site (:mod:`.dp_sgd`, :mod:`.model_prep`, :mod:`.losses`), one privacy ledger (:mod:`.accounting`)
and one budget (:mod:`.budget`) per site over every mechanism, where noise comes from (:mod:`.noise`), the privacy
regimes of Table 1 of seed 000 (:mod:`.regimes`) and the filters on what a site sends (:mod:`.filters`: selective
sharing, sparse vector technique, Gaussian update noise).
"""

from monai_fedpriv.privacy.accounting import (
    ACCOUNTANTS,
    GaussianEvent,
    PrivacyLedger,
    PureEvent,
    SampledGaussianEvent,
)
from monai_fedpriv.privacy.budget import BUDGET_POLICIES, PrivacyBudget
from monai_fedpriv.privacy.calibration import solve_noise_multiplier
from monai_fedpriv.privacy.dp_sgd import (
    DPSGD,
    GRAD_SAMPLE_MODES,
    DPSettings,
    MicroBatchGradSampleModule,
    NoiseOnEmptyDataLoader,
    PatientPoissonSampler,
    PrivateParts,
    TensorHookGradSampleModule,
    make_site_private,
    rebuild_optimizer,
    strip_module_prefix,
)
from monai_fedpriv.privacy.filters import (
    FilterChain,
    GaussianUpdatePrivacy,
    PercentileSharing,
    SparseVectorFilter,
    UpdateFilter,
    lyu_budget_split,
)
from monai_fedpriv.privacy.losses import PRIVACY_UNITS, PerSampleLoss
from monai_fedpriv.privacy.model_prep import convert_batchnorm, find_dp_problems, prepare_for_dp
from monai_fedpriv.privacy.noise import NOISE_SECURE, NOISE_SEEDED, noise_generator
from monai_fedpriv.privacy.regimes import REGIMES, PrivacyRegime, get_regime

__all__ = [
    "ACCOUNTANTS",
    "BUDGET_POLICIES",
    "DPSGD",
    "DPSettings",
    "FilterChain",
    "GRAD_SAMPLE_MODES",
    "GaussianEvent",
    "GaussianUpdatePrivacy",
    "MicroBatchGradSampleModule",
    "NOISE_SECURE",
    "NOISE_SEEDED",
    "NoiseOnEmptyDataLoader",
    "PRIVACY_UNITS",
    "PatientPoissonSampler",
    "PercentileSharing",
    "PerSampleLoss",
    "PrivacyBudget",
    "PrivacyLedger",
    "PrivacyRegime",
    "PrivateParts",
    "PureEvent",
    "REGIMES",
    "SampledGaussianEvent",
    "SparseVectorFilter",
    "TensorHookGradSampleModule",
    "UpdateFilter",
    "convert_batchnorm",
    "find_dp_problems",
    "get_regime",
    "lyu_budget_split",
    "make_site_private",
    "noise_generator",
    "prepare_for_dp",
    "rebuild_optimizer",
    "solve_noise_multiplier",
    "strip_module_prefix",
]
