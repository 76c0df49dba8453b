"""The MONAI transform chains that :func:`~monai_fedpriv.data.adapt.adapted_transforms` assembles: intensity
normalisation per modality, BraTS-style regions, the cacheable deterministic part and the per-visit random part,
each a JSON-serialisable bundle config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from monai_fedpriv.data.dataset_info import DatasetInfo

if TYPE_CHECKING:
    from monai_fedpriv.data.adapt import AdaptTarget

__all__ = ["IMG_LAB", "deterministic_chain", "random_chain"]

#: the keys every chain transforms together
IMG_LAB = ["image", "label"]


def _intensity(info: DatasetInfo, target: AdaptTarget) -> list[dict]:
    """CT: fixed HU window to [0, 1] (HU are absolute units, so one window fits every scanner); MR and other
    modalities: z-score per image and channel over non-zero voxels (arbitrary units differ per scan; background
    stays 0). Mixed channels are split, normalised one by one and concatenated back in order."""
    lo, hi = (float(v) for v in target.ct_window)

    def one(key: str, kind: str) -> dict:
        if kind == "ct":
            return {
                "_target_": "ScaleIntensityRanged",
                "keys": key,
                "a_min": lo,
                "a_max": hi,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        return {"_target_": "NormalizeIntensityd", "keys": key, "nonzero": True, "channel_wise": True}

    kinds = info.modality_kinds
    if target.channels is not None:  # the kept channels only (SelectChannelsd ran before)
        kinds = tuple(kinds[c] for c in target.channels)
    if len(set(kinds)) == 1:
        return [one("image", kinds[0])]
    names = [f"image_{c}" for c in range(len(kinds))]
    return [
        {"_target_": "SplitDimd", "keys": "image", "dim": 0, "keepdim": True},
        *[one(name, kind) for name, kind in zip(names, kinds, strict=True)],
        {"_target_": "ConcatItemsd", "keys": names, "name": "image", "dim": 0},
        {"_target_": "DeleteItemsd", "keys": names},
    ]


def _regions(regions: Mapping[str, Sequence[int]]) -> list[dict]:
    names = [f"label_{r}" for r in regions]
    return [
        {"_target_": "CopyItemsd", "keys": "label", "times": len(names), "names": names},
        *[
            {"_target_": "LabelToMaskd", "keys": n, "select_labels": [int(v) for v in vals]}
            for n, vals in zip(names, regions.values(), strict=True)
        ],
        {"_target_": "ConcatItemsd", "keys": names, "name": "label", "dim": 0},
        {"_target_": "DeleteItemsd", "keys": names},
    ]


def deterministic_chain(info: DatasetInfo, target: AdaptTarget) -> list[dict]:
    channel_dim = {"none": "no_channel", "last": -1, "files": 0}[info.channel_layout]
    chain: list[dict] = [
        {"_target_": "LoadImaged", "keys": IMG_LAB, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": channel_dim},
        {"_target_": "EnsureChannelFirstd", "keys": "label", "channel_dim": "no_channel"},
    ]
    if target.channels is not None:
        chain.append({"_target_": "monai_fedpriv.data.transforms.SelectChannelsd", "keys": "image",
                      "channels": [int(c) for c in target.channels]})  # fmt: skip
    if target.label_mapping:
        pairs = sorted((int(k), int(v)) for k, v in target.label_mapping.items())
        chain.append(
            {
                "_target_": "MapLabelValued",
                "keys": "label",
                "orig_labels": [k for k, _ in pairs],
                "target_labels": [v for _, v in pairs],
            }
        )
    # labels given explicitly: the NIfTI convention (affines in RAS world), which MONAI's default will stop assuming
    chain.append(
        {
            "_target_": "Orientationd",
            "keys": IMG_LAB,
            "axcodes": "RAS"[: info.spatial_dims],
            "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
        }
    )
    if target.spacing is not None:
        pixdim = [-1.0 if s is None else float(s) for s in target.spacing]
        pixdim += [-1.0] * (info.spatial_dims - len(pixdim))  # non-positive: MONAI keeps the stored spacing
        chain.append({"_target_": "Spacingd", "keys": IMG_LAB, "pixdim": pixdim, "mode": ["bilinear", "nearest"]})
    chain += _intensity(info, target)
    if target.regions:
        chain += _regions(target.regions)
    chain.append({"_target_": "CastToTyped", "keys": "label", "dtype": "uint8"})  # 4x smaller in CacheDataset
    return chain


def random_chain(info: DatasetInfo, target: AdaptTarget) -> list[dict]:
    slices = target.spatial_dims == 2 and info.spatial_dims == 3
    patch = [int(p) for p in target.patch_size]
    depth = int(target.slice_context)
    crop: dict[str, Any] = {
        "_target_": "RandCropByPosNegLabeld",
        "keys": IMG_LAB,
        "label_key": "label",
        "spatial_size": [*patch, depth] if slices else patch,
        "pos": float(target.pos),
        "neg": float(target.neg),
        "num_samples": int(target.samples_per_volume),
    }
    if set(info.modality_kinds) == {"ct"}:  # background patches from the body (> window floor), not from the air
        crop.update(image_key="image", image_threshold=0.0)
    chain = [{"_target_": "SpatialPadd", "keys": IMG_LAB, "spatial_size": [*patch, -1] if slices else patch}, crop]
    if slices and depth > 1:  # the slices around the crop's centre become channels, the label its central slice
        chain.append({"_target_": "monai_fedpriv.data.transforms.SlicesToChannelsd"})
    elif slices:
        chain.append({"_target_": "SqueezeDimd", "keys": IMG_LAB, "dim": -1})
    if target.augment:
        n = target.spatial_dims
        chain += [
            {
                "_target_": "RandAffined",
                "keys": IMG_LAB,
                "prob": 0.3,
                "rotate_range": [0.15] * (1 if n == 2 else 3),
                "scale_range": [0.1] * n,
                "mode": ["bilinear", "nearest"],
                "padding_mode": "zeros",
            },
            {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.5},
            {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5},
            {"_target_": "RandGaussianNoised", "keys": "image", "std": 0.02, "prob": 0.3},
        ]
    return chain
