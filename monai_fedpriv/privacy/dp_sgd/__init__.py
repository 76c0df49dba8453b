"""DP-SGD at a site (Abadi et al. 2016): Poisson-sampled loader, per-unit clipping and Gaussian noise, each step
asked of the site's privacy budget before it is taken.

Built from Opacus pieces (``DPOptimizer``, ``DPDataLoader``, ``BatchMemoryManager``) and wired *before* the engine
runs, so a MONAI ``SupervisedTrainer`` and its handlers train privately without a change to their loop:

* :mod:`.optimizer`: :class:`BudgetedDPOptimizer` (per-sample or per-patient clipping, noise, no plain step);
* :mod:`.loaders`: Poisson sampling of items or of patients, empty draws turned into noise-only steps;
* :mod:`.private`: :class:`DPSettings` and :func:`make_site_private`;
* :mod:`.bundle`: :class:`DPSGD`, the component ``dp.json`` builds from a bundle.

Per-sample gradient modes live in :mod:`monai_fedpriv.privacy.grad_sample`.
"""

from monai_fedpriv.privacy.dp_sgd.bundle import DPSGD, UNIT_NOTES
from monai_fedpriv.privacy.dp_sgd.loaders import (
    EmptySafeCollate,
    NoiseOnEmptyDataLoader,
    PatientPoissonSampler,
    patients_of,
)
from monai_fedpriv.privacy.dp_sgd.optimizer import BudgetedDPOptimizer, unit_clip_weights
from monai_fedpriv.privacy.dp_sgd.private import (
    DPSettings,
    PrivateParts,
    make_site_private,
    rebuild_optimizer,
    strip_module_prefix,
)
from monai_fedpriv.privacy.grad_sample import GRAD_SAMPLE_MODES, MicroBatchGradSampleModule, TensorHookGradSampleModule

__all__ = [
    "DPSGD",
    "GRAD_SAMPLE_MODES",
    "UNIT_NOTES",
    "BudgetedDPOptimizer",
    "DPSettings",
    "EmptySafeCollate",
    "MicroBatchGradSampleModule",
    "NoiseOnEmptyDataLoader",
    "PatientPoissonSampler",
    "PrivateParts",
    "TensorHookGradSampleModule",
    "make_site_private",
    "patients_of",
    "rebuild_optimizer",
    "strip_module_prefix",
    "unit_clip_weights",
]
