"""Dice evaluation of a network on a data list, with MONAI's ``DiceMetric``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import Inferer, SimpleInferer
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

__all__ = ["DiceEvaluator"]


class DiceEvaluator:
    """Mean foreground Dice (argmax prediction vs. label) of a network on a fixed data list.

    The data list is loaded and pre-processed once (the bundle's ``validate#preprocessing``) and cached.

    Args:
        data: MONAI data list (dicts with ``image`` and ``label``).
        transform: deterministic pre-processing producing channel-first tensors.
        device: where inference runs.
        inferer: MONAI inferer (default ``SimpleInferer``).
        batch_size: inference batch size.
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Callable,
        device: torch.device | str = "cpu",
        inferer: Inferer | None = None,
        batch_size: int = 16,
    ) -> None:
        if not data:
            raise ValueError("DiceEvaluator needs a non-empty data list.")
        self.dataset = CacheDataset(list(data), transform=transform, cache_rate=1.0, num_workers=0, progress=False)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        self.device = torch.device(device)
        self.inferer = inferer or SimpleInferer()

    @torch.no_grad()
    def __call__(self, network: nn.Module) -> dict[str, Any]:
        """Return ``{"dice": mean over foreground classes and cases, "dice_per_class": [...], "n_cases": N}``."""
        was_training = network.training
        network.eval()
        metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
        try:
            for batch in self.loader:
                images = batch["image"].to(self.device)
                labels = batch["label"].to(self.device)
                logits = self.inferer(images, network)
                n_classes = logits.shape[1]
                pred = one_hot(logits.argmax(dim=1, keepdim=True), n_classes)
                metric(y_pred=pred, y=one_hot(labels.long(), n_classes))
            per_class = metric.aggregate()
        finally:
            network.train(was_training)
        per_class_list = [float(v) for v in torch.as_tensor(per_class).flatten()]
        finite = [v for v in per_class_list if v == v]
        return {
            "dice": float(sum(finite) / len(finite)) if finite else float("nan"),
            "dice_per_class": per_class_list,
            "n_cases": len(self.dataset),
        }
