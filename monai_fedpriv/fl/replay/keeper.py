"""What the server keeps of its sites' uploads, by the strategy's ``upload_kind``: FedReplay's pool and its training
at the server (:class:`~monai_fedpriv.fl.replay.server_phase.LatentTrainer`), or CWT+Replay's generator in transit
(:class:`~monai_fedpriv.generative.relay.GeneratorRelay`); the same for the simulator and an NVIDIA FLARE job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.fl.workflow.uploads import ServerTraining

__all__ = ["MAX_CODES", "MAX_ITEMS_PER_CASE", "server_keeper"]

#: the most items one case may give a site's generator visit (a bound on the codes a site may add)
MAX_ITEMS_PER_CASE = 64
#: the codes a site whose case count the server does not know (its own data list, in a deployment) may add
MAX_CODES = 1_000_000


def server_keeper(strategy: Any, bundle: BundleSpec, seed: int, device: str | torch.device,
                  overrides: Mapping[str, Any], cases: Mapping[str, int]) -> ServerTraining | None:  # fmt: skip
    """The server's keeper of ``strategy``'s uploads, or ``None`` (``cases``: training cases per site)."""
    if strategy.upload_kind == "generator":
        from monai_fedpriv.data.stream import derive_seed
        from monai_fedpriv.fl.simulator.server_model import initial_network
        from monai_fedpriv.generative.generator import build_generator
        from monai_fedpriv.generative.relay import GeneratorRelay

        _, network = initial_network(bundle.own_configs(), seed, "cpu", overrides)
        conv = next(m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
        reference = build_generator(len(conv.kernel_size), int(conv.in_channels),
                                    seed=derive_seed(seed, "generator-init"))  # what every visit must return
        bound = {site: (n * MAX_ITEMS_PER_CASE if n else MAX_CODES) for site, n in cases.items()}
        return GeneratorRelay(bound, seed, reference)
    if strategy.upload_kind == "latents":
        from monai_fedpriv.fl.replay.server_phase import LatentTrainer

        return LatentTrainer(bundle, seed, device, overrides, strategy.cut_block, strategy.server_epochs)
    return None
