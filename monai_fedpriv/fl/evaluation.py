"""Dice evaluation of a network on a data list with MONAI's ``DiceMetric``, following the bundle's own output
convention: softmax classes (argmax, background excluded) or sigmoid regions (one thresholded channel per region,
possibly overlapping, e.g. BraTS' tumour core / whole tumour / enhancing tumour).

A bundle says which with the id ``eval_activation`` (``"softmax"``, the default, or ``"sigmoid"``) and names its
classes in ``metadata.json`` (``network_data_format.outputs.pred.channel_def``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import Inferer, SimpleInferer
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

__all__ = ["ACTIVATIONS", "DiceEvaluator", "bundle_classes", "combine_scores", "evaluator_from_bundle"]

ACTIVATIONS = ("softmax", "sigmoid")


class DiceEvaluator:
    """Mean foreground Dice of a network on a fixed data list.

    The data list is loaded and pre-processed once (the bundle's ``validate#preprocessing``) and cached.

    Args:
        data: MONAI data list (dicts with ``image`` and ``label``).
        transform: deterministic pre-processing producing channel-first tensors.
        device: where inference runs.
        inferer: MONAI inferer (default ``SimpleInferer``).
        batch_size: inference batch size.
        activation: ``"softmax"``: the prediction is the argmax class, the label holds class indices, background
            (class 0) is not scored; ``"sigmoid"``: every output channel is a region, thresholded at
            ``threshold``, scored against the label's channel of the same index (the label has one binary channel
            per region, or one channel for a single region).
        threshold: sigmoid probability above which a voxel belongs to a region.
        class_names: names of the scored classes (foreground classes for softmax, regions for sigmoid).
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Callable,
        device: torch.device | str = "cpu",
        inferer: Inferer | None = None,
        batch_size: int = 16,
        activation: str = "softmax",
        threshold: float = 0.5,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if not data:
            raise ValueError("DiceEvaluator needs a non-empty data list.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"eval_activation must be one of {ACTIVATIONS}, got {activation!r}.")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"the sigmoid threshold must be in (0, 1), got {threshold!r}.")
        self.dataset = CacheDataset(list(data), transform=transform, cache_rate=1.0, num_workers=0, progress=False)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        self.device = torch.device(device)
        self.inferer = inferer or SimpleInferer()
        self.activation = activation
        self.threshold = float(threshold)
        self.class_names = list(class_names) if class_names else None

    def describe(self) -> str:
        """The metric in words, for reports."""
        if self.activation == "sigmoid":
            return f"Dice per region (sigmoid > {self.threshold:g}, overlapping regions scored separately)"
        return "Dice per foreground class (softmax argmax, background excluded)"

    def predict_masks(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, label)`` as binary channel masks of the same shape, as scored."""
        n = logits.shape[1]
        if self.activation == "sigmoid":
            pred = (torch.sigmoid(logits) > self.threshold).float()
            if labels.shape[1] != n:
                raise ValueError(
                    f"sigmoid evaluation: the network has {n} output channels but the label has {labels.shape[1]}; "
                    f"the bundle's validate#preprocessing must give one label channel per region."
                )
            return pred, (labels > 0).float()
        return one_hot(logits.argmax(dim=1, keepdim=True), n), one_hot(labels.long(), n)

    @torch.no_grad()
    def __call__(self, network: nn.Module) -> dict[str, Any]:
        """``{"dice": mean over classes and cases, "dice_per_class": [...], "classes": [...], "n_cases": N}``."""
        was_training = network.training
        network.eval()

        def masks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for batch in self.loader:
                logits = self.inferer(batch["image"].to(self.device), network)
                yield self.predict_masks(logits, batch["label"].to(self.device))

        try:
            return self.score(masks(), n_cases=len(self.dataset))
        finally:
            network.train(was_training)

    def score(self, masks: Iterable[tuple[torch.Tensor, torch.Tensor]], n_cases: int | None = None) -> dict[str, Any]:
        """The same result as calling the evaluator, from ``(prediction, label)`` masks already computed with
        :meth:`predict_masks` (``n_cases`` defaults to the number of mask batches' cases)."""
        sigmoid = self.activation == "sigmoid"
        metric = DiceMetric(include_background=sigmoid, reduction="mean_batch", ignore_empty=True, get_not_nans=True)
        counted_cases = 0
        for pred, label in masks:
            metric(y_pred=pred, y=label)
            counted_cases += int(pred.shape[0])
        per_class, counted = metric.aggregate()
        # a class absent from every case (empty label) is not scored: NaN, not MONAI's 0 for "nothing counted"
        per_class = torch.where(torch.as_tensor(counted) > 0, torch.as_tensor(per_class), torch.nan)
        per_class_list = [float(v) for v in per_class.flatten()]
        finite = [v for v in per_class_list if v == v]
        names = self.class_names if self.class_names and len(self.class_names) == len(per_class_list) else None
        return {
            "dice": float(sum(finite) / len(finite)) if finite else float("nan"),
            "dice_per_class": per_class_list,
            "classes": names or [str(k + (0 if sigmoid else 1)) for k in range(len(per_class_list))],
            "n_cases": counted_cases if n_cases is None else n_cases,
        }


def bundle_classes(parser: Any, activation: str) -> list[str] | None:
    """The scored class names from the bundle's metadata (``outputs.pred.channel_def``; background dropped for
    softmax), or ``None``."""
    meta: Any = parser.get("_meta_") if hasattr(parser, "get") else None
    try:
        channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    except (KeyError, TypeError):
        return None
    if not isinstance(channels, Mapping) or not channels:
        return None
    names = [str(channels[k]) for k in sorted(channels, key=lambda c: int(c))]
    return names if activation == "sigmoid" else names[1:]


def evaluator_from_bundle(parser: Any, data: Sequence[dict[str, Any]], device: torch.device | str) -> DiceEvaluator:
    """A :class:`DiceEvaluator` with the bundle's ``validate#preprocessing``, ``validate#inferer``, validation
    batch size, ``eval_activation`` (+ ``eval_threshold``) and class names."""
    from monai_fedpriv.bundle.loader import parser_get

    transform = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer") if parser_get(parser, "validate#inferer") else None
    batch = parser_get(parser, "validate#dataloader#batch_size")
    batch = int(batch) if isinstance(batch, int) and not isinstance(batch, bool) else 16
    activation = parser.get_parsed_content("eval_activation") if parser_get(parser, "eval_activation") else "softmax"
    threshold = parser.get_parsed_content("eval_threshold") if parser_get(parser, "eval_threshold") else 0.5
    return DiceEvaluator(data, transform, device, inferer, batch_size=batch, activation=activation,
                         threshold=threshold, class_names=bundle_classes(parser, activation))  # fmt: skip


def combine_scores(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Case-weighted mean Dice and per-class Dice over several sites' scores (``DiceEvaluator`` results)."""
    total = sum(int(s["n_cases"]) for s in scores.values())
    dice = sum(float(s["dice"]) * int(s["n_cases"]) for s in scores.values()) / total if total else float("nan")
    per_class: dict[str, float] = {}
    first = next(iter(scores.values()), None)
    if first is not None and first.get("classes"):
        for k, name in enumerate(first["classes"]):
            values = []
            for s in scores.values():
                value = s.get("dice_per_class", [])[k] if len(s.get("dice_per_class", [])) > k else float("nan")
                if value == value:  # a class absent from a site's cases (NaN) does not count there
                    values.append((float(value), int(s["n_cases"])))
            weight = sum(w for _, w in values)
            per_class[str(name)] = sum(v * w for v, w in values) / weight if weight else float("nan")
    return {"dice": dice, "dice_per_class": per_class}
