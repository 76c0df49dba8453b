"""Generative replay for cyclic collaborative segmentation (CWT+Replay, Qu et al., seed paper 004).

:mod:`~monai_fedpriv.generative.generator` holds the auxiliary (image, mask) VQ-VAE;
:mod:`~monai_fedpriv.generative.cyclic` trains it one site at a time and decodes replayed pairs for the
segmentation model.
"""

from __future__ import annotations

from monai_fedpriv.generative.cyclic import VisitResult, replay_pairs, train_generator_at_site
from monai_fedpriv.generative.generator import ReplayGenerator, build_generator

__all__ = ["ReplayGenerator", "VisitResult", "build_generator", "replay_pairs", "train_generator_at_site"]
