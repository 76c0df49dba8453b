"""Example segmentations of the global model: image | ground truth | prediction, one row per site."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle, metadata_input, parser_get
from monai_fedpriv.fl.evaluation import evaluator_from_bundle
from monai_fedpriv.privacy.model_prep import load_trained_weights
from monai_fedpriv.report.plots import save_figure

__all__ = ["plot_example_segmentations"]


def _example_input(parser: Any) -> torch.Tensor | None:
    """A zero input of the shape the bundle's metadata declares (``network_data_format.inputs.image``)."""
    shape, channels = metadata_input(parser)
    return torch.zeros(1, channels, *shape) if shape is not None and channels is not None else None


def _to_map(mask: torch.Tensor, regions: bool) -> np.ndarray:
    """Binary channel masks (1, C, ...) -> one integer map: the class index (one-hot softmax classes) or the number
    of regions covering each voxel (sigmoid regions)."""
    m = mask[0].float()
    return np.asarray(m.sum(0) if regions else m.argmax(0))


def plot_example_segmentations(
    bundle: BundleSpec,
    weights: Mapping[str, torch.Tensor],
    val_sets: Mapping[str, Sequence[dict[str, Any]]],
    path: Path,
    title: str = "global model",
) -> Path:
    """Save a PNG grid with the first validation case of every site and the model's prediction (argmax classes, or
    thresholded sigmoid regions coloured by how many regions cover a voxel).

    A 3D validation volume is predicted whole with the bundle's ``validate#inferer`` (slice-wise or sliding window)
    and shown at the axial slice with the most foreground in its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = load_bundle(bundle, required=("network", "validate#preprocessing"))
    transform = parser.get_parsed_content("validate#preprocessing")
    rows = [(site, cases[0]) for site, cases in val_sets.items() if cases]
    if not rows:
        raise ValueError("no validation case to show: every site's validation set is empty.")
    example = _example_input(parser)  # the network's input (a 2D patch), not a validation volume
    if example is None:
        example = torch.as_tensor(transform(dict(rows[0][1]))["image"])[None].float()
    network = parser.get_parsed_content("network").to("cpu")
    # under DP the sites (and so the global model) train the prepared network, e.g. without BatchNorm statistics
    network = load_trained_weights(network, weights, example, norm=str(parser_get(parser, "dp#norm", "instance")))
    network.eval()
    inferer = parser.get_parsed_content("validate#inferer") if parser_get(parser, "validate#inferer") else None
    # the bundle's evaluator for its masks and Dice, scored on the cases read and predicted here (not read again)
    scorer = evaluator_from_bundle(parser, [rows[0][1]], "cpu")
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), dpi=100, squeeze=False)
    for i, (site, case) in enumerate(rows):
        item = transform(dict(case))
        image = torch.as_tensor(item["image"])[None].float()
        with torch.no_grad():
            logits = inferer(image, network) if inferer is not None else network(image)
        pred_mask, label_mask = scorer.predict_masks(logits, torch.as_tensor(item["label"])[None])
        # one map to colour: softmax -> the class index; sigmoid regions -> how many regions cover a voxel (nested
        # regions such as BraTS' WT > TC > ET become 1, 2, 3)
        regions = scorer.activation == "sigmoid"
        pred, label = _to_map(pred_mask, regions), _to_map(label_mask, regions)
        dice = scorer.score([(pred_mask, label_mask)])["dice"]
        img = np.asarray(image[0, 0])
        n_classes = int(logits.shape[1]) + (1 if regions else 0)
        if img.ndim == 3:  # a volume: the axial slice with the most foreground
            z = int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(0)))
            img, label, pred = img[..., z], label[..., z], pred[..., z]
        for j, (arr, name) in enumerate(
            ((img, "image"), (label, "ground truth"), (pred, f"prediction (Dice {dice:.2f})"))
        ):
            ax = axes[i, j]
            if j == 0:
                ax.imshow(np.rot90(arr), cmap="gray")
            else:
                ax.imshow(np.rot90(img), cmap="gray")
                ax.imshow(np.rot90(np.ma.masked_equal(arr, 0)), cmap="viridis", vmin=0, vmax=max(1, n_classes - 1),
                          alpha=0.6)  # fmt: skip
            ax.set_title(f"{site}: {name}" if j == 0 else name, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"Example segmentations, {title} (foreground classes coloured)", fontsize=9)
    return save_figure(fig, path)
