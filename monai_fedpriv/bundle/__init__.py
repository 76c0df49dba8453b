"""Reading MONAI bundles and building per-site components from them."""

from monai_fedpriv.bundle import paths
from monai_fedpriv.bundle.loader import REQUIRED_IDS, BundleSpec, load_bundle

__all__ = ["BundleSpec", "REQUIRED_IDS", "load_bundle", "paths"]
