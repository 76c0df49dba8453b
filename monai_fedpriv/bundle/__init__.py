"""Reading MONAI bundles and building per-site components from them."""

from monai_fedpriv.bundle.loader import REQUIRED_IDS, BundleSpec, load_bundle

__all__ = ["BundleSpec", "load_bundle", "REQUIRED_IDS"]
