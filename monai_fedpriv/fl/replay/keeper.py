"""What the server keeps of its sites' uploads, by the strategy's ``upload_kind``: FedReplay's pool and its training
at the server (:class:`~monai_fedpriv.fl.replay.server_phase.LatentTrainer`), or CWT+Replay's generator in transit
(:class:`~monai_fedpriv.generative.relay.GeneratorRelay`); the same for the simulator and an NVIDIA FLARE job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.fl.workflow.uploads import ServerTraining

__all__ = ["MAX_ITEMS_PER_CASE", "server_keeper"]

#: the most items one case may give a site's generator visit (a bound on the codes a site may add)
MAX_ITEMS_PER_CASE = 64


def server_keeper(strategy: Any, bundle: BundleSpec, seed: int, device: str | torch.device,
                  overrides: Mapping[str, Any], cases: Mapping[str, int]) -> ServerTraining | None:  # fmt: skip
    """The server's keeper of ``strategy``'s uploads, or ``None`` (``cases``: training cases per site)."""
    if strategy.upload_kind == "generator":
        from monai_fedpriv.generative.relay import GeneratorRelay

        return GeneratorRelay({site: n * MAX_ITEMS_PER_CASE for site, n in cases.items()}, seed)
    if strategy.upload_kind == "latents":
        from monai_fedpriv.fl.replay.server_phase import LatentTrainer

        return LatentTrainer(bundle, seed, device, overrides, strategy.cut_block, strategy.server_epochs)
    return None
