"""Victims taken from a team's own data set: the exact input a site's network sees for one case.

``monai-fedpriv attack BUNDLE --data DIR --case K`` reads case ``K`` of an MSD or BraTS folder through the same
transform chain the federation trains with (:func:`monai_fedpriv.experiments.own_data.adapt_bundle`: reorientation,
resampling, per-modality normalisation), takes the axial slice with the most foreground for a 2D network, and crops
a patch of the network's size around the foreground.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
from monai_fedpriv.data.checks import check_case
from monai_fedpriv.errors import DataError
from monai_fedpriv.experiments.own_data import adapt_bundle, load_own_data

__all__ = ["victim_from_dataset"]


def _window(length: int, centre: int, size: int) -> tuple[int, int]:
    start = min(max(0, centre - size // 2), max(0, length - size))
    return start, start + size


def victim_from_dataset(
    bundle_dir: str | Path, data_dir: str | Path, case: int = 0, layout: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, Any]]:
    """``(image (C, *patch), label (L, *patch), bundle overrides, description)`` of case ``case`` of a data set
    (``L`` = 1 label map, or one binary channel per region for a sigmoid bundle).

    Raises:
        DataError: no such case, or a case that fails its checks (the message names the file).
    """
    data = load_own_data(data_dir, layout, check=False, log=lambda _: None)
    if not 0 <= case < len(data.cases):
        raise DataError(
            f"--case {case}: {data.info.root} has {len(data.cases)} training cases (0 to {len(data.cases) - 1})."
        )
    item = data.cases[case]
    check_case(item, list(data.info.labels))
    overrides, target = adapt_bundle(BundleSpec(Path(bundle_dir)), data)
    transform = load_bundle(BundleSpec(Path(bundle_dir)), overrides, required=()).get_parsed_content(
        "validate#preprocessing"
    )  # the bundle's own validation chain on this data (a task bundle builds it from dataset_dir)
    sample = transform(dict(item))
    image, label = torch.as_tensor(sample["image"]).float(), torch.as_tensor(sample["label"]).long()
    slice_index = None
    if target.spatial_dims == 2 and image.ndim == 4:
        per_slice = (label.amax(0) > 0).reshape(-1, label.shape[-1]).sum(0)
        slice_index = int(per_slice.argmax())
        half = target.slice_context // 2  # the slice and its neighbours as channels, as the network trains
        around = [min(max(slice_index + k, 0), image.shape[-1] - 1) for k in range(-half, half + 1)]
        c, h, w = image.shape[:3]
        image = image[..., around].permute(0, 3, 1, 2).reshape(c * len(around), h, w)
        label = label[..., slice_index]
    fg = torch.nonzero(label.amax(0) > 0)
    centre = fg.float().mean(0).round().long().tolist() if len(fg) else [s // 2 for s in label.shape[1:]]
    pads: list[int] = []
    for dim, size in reversed(list(enumerate(target.patch_size))):
        missing = max(0, size - image.shape[1 + dim])
        pads += [missing // 2, missing - missing // 2]
    image, label = F.pad(image, pads), F.pad(label, pads)
    shift = [pads[2 * (len(target.patch_size) - 1 - d)] for d in range(len(target.patch_size))]
    index = [slice(None)]
    for dim, size in enumerate(target.patch_size):
        lo, hi = _window(image.shape[1 + dim], centre[dim] + shift[dim], size)
        index.append(slice(lo, hi))
    image, label = image[tuple(index)], label[tuple(index)]
    described = {"data": data.info.name, "case": case, "patient": item.get("patient"), "slice": slice_index,
                 "image": item["image"], "label": item["label"]}  # fmt: skip
    return image, label, overrides, described
