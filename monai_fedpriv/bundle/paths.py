"""Where a bundle run on its own writes (``models/``, ``eval/``, ``predictions/``).

MONAI bundles resolve their outputs against ``bundle_root``, which defaults to ``"."``: run from a repository root
without ``--bundle_root``, a bundle would write into the repository. :func:`output_root` keeps ``--bundle_root``
when it is given, and the current directory when it *is* the bundle (it holds ``configs/train.json``); otherwise the
outputs go to ``runs/<bundle name>`` under the current directory. Inference and evaluation read the weights from
``bundle_root/models`` (the model zoo's convention), which is where training writes them whenever ``--bundle_root``
is given.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["output_root"]

logger = logging.getLogger("monai_fedpriv.bundle")


def output_root(bundle_root: str, name: str) -> str:
    """The folder a bundle's outputs go under (see the module docstring).

    Example:
        >>> output_root("bundles/brain_tissue_2d", "brain_tissue_2d")
        'bundles/brain_tissue_2d'
    """
    root = Path(bundle_root)
    if str(bundle_root) not in ("", ".") or (root / "configs" / "train.json").is_file():
        return str(bundle_root)
    out = Path("runs") / name
    logger.warning(f"no --bundle_root given and {Path.cwd()} is not the bundle: outputs go to {out}/ (inference and "
                   f"evaluation read the weights from bundle_root/models: give --bundle_root to train them there)")
    return str(out)
