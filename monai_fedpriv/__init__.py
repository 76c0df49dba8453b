"""monai_fedpriv: federated, differentially private training and leakage audits for MONAI segmentation bundles.

Subpackages:
    data      site data: MSD/BraTS loaders, checks, partitions, the embedded default data set
    fl        federated core: updates, aggregation, transports, in-process simulator
    handlers  Ignite handlers added to a bundle's trainer (federated sync, privacy, attack evaluation)
    privacy   DP-SGD, accounting, update filters (selective sharing, sparse vector technique)
    attacks   gradient inversion and model inversion, scored against baselines
    bundle    reading MONAI bundles per site
"""

from monai_fedpriv.errors import (
    BundleError,
    DataError,
    MonaiFedPrivDeprecationWarning,
    PrivacyBudgetExceeded,
    PrivacyConfigError,
    UpdateError,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "DataError",
    "MonaiFedPrivDeprecationWarning",
    "PrivacyBudgetExceeded",
    "PrivacyConfigError",
    "UpdateError",
    "__version__",
]
