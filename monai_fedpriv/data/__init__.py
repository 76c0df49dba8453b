"""Site data: image readers, consistency checks, MSD/BraTS data lists, federated site partitions, default data set."""

import importlib
from typing import Any

from monai_fedpriv.data.brain_tissue import (
    BRAIN_TISSUE_LABELS,
    build_brain_tissue_2d,
    ensure_default_data,
    site_acquisition,
)
from monai_fedpriv.data.brats import BRATS_LABELS, brats_institution_from_id, load_brats_datalist
from monai_fedpriv.data.checks import check_case, check_datalist
from monai_fedpriv.data.io import image_stem, read_image
from monai_fedpriv.data.msd import load_msd_datalist, read_institutions_csv, read_msd_labels
from monai_fedpriv.data.partition import SCHEMES, Partition, mean_pairwise_ks, partition_cases

__all__ = [
    "BRAIN_TISSUE_LABELS",
    "BRATS_LABELS",
    "SCHEMES",
    "Partition",
    "brats_institution_from_id",
    "build_brain_tissue_2d",
    "check_case",
    "check_datalist",
    "ensure_default_data",
    "image_stem",
    "load_brats_datalist",
    "load_msd_datalist",
    "mean_pairwise_ks",
    "partition_cases",
    "read_image",
    "read_institutions_csv",
    "read_msd_labels",
    "site_acquisition",
    "task",
    "transforms",
]


def __getattr__(name: str) -> Any:
    """``task`` and ``transforms`` (what the task bundles import by name, ``$from monai_fedpriv.data import task``)
    load on first use: they pull in MONAI's transforms, which every other data import can do without."""
    if name in ("task", "transforms"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
