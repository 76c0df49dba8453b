"""Differential privacy for federated MONAI training.

DP-SGD at every site (:mod:`.dp_sgd`, :mod:`.model_prep`, :mod:`.losses`), one privacy ledger per site
(:mod:`.accounting`), the privacy regimes of Table 1 of seed 000 (:mod:`.regimes`) and update filters (selective
sharing, sparse vector technique, Gaussian update noise).
"""

from monai_fedpriv.privacy.accounting import ACCOUNTANTS, PrivacyLedger, solve_noise_multiplier
from monai_fedpriv.privacy.dp_sgd import (
    DPSGD,
    GRAD_SAMPLE_MODES,
    DPSettings,
    MicroBatchGradSampleModule,
    NoiseOnEmptyDataLoader,
    PrivateParts,
    TensorHookGradSampleModule,
    make_site_private,
    rebuild_optimizer,
    strip_module_prefix,
)
from monai_fedpriv.privacy.losses import PRIVACY_UNITS, PerSampleLoss, check_privacy_unit
from monai_fedpriv.privacy.model_prep import convert_batchnorm, find_dp_problems, prepare_for_dp
from monai_fedpriv.privacy.regimes import REGIMES, PrivacyRegime, get_regime

__all__ = [
    "ACCOUNTANTS",
    "DPSGD",
    "DPSettings",
    "GRAD_SAMPLE_MODES",
    "MicroBatchGradSampleModule",
    "NoiseOnEmptyDataLoader",
    "PRIVACY_UNITS",
    "PerSampleLoss",
    "PrivacyLedger",
    "PrivacyRegime",
    "PrivateParts",
    "REGIMES",
    "TensorHookGradSampleModule",
    "check_privacy_unit",
    "convert_batchnorm",
    "find_dp_problems",
    "get_regime",
    "make_site_private",
    "prepare_for_dp",
    "rebuild_optimizer",
    "solve_noise_multiplier",
    "strip_module_prefix",
]

# Update filters live in modules written alongside; a missing one must not break importing the package.
try:
    from monai_fedpriv.privacy.filters import FilterChain, UpdateFilter  # noqa: F401

    __all__ += ["FilterChain", "UpdateFilter"]
except ImportError:  # pragma: no cover
    pass
try:
    from monai_fedpriv.privacy.svt import SparseVectorFilter, lyu_budget_split  # noqa: F401

    __all__ += ["SparseVectorFilter", "lyu_budget_split"]
except ImportError:  # pragma: no cover
    pass
try:
    from monai_fedpriv.privacy.gaussian_update import GaussianUpdatePrivacy  # noqa: F401

    __all__ += ["GaussianUpdatePrivacy"]
except ImportError:  # pragma: no cover
    pass
try:
    from monai_fedpriv.privacy.selective import PercentileSharing  # noqa: F401

    __all__ += ["PercentileSharing"]
except ImportError:  # pragma: no cover
    pass
