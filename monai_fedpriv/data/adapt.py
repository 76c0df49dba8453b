"""Adapt a data set (:class:`~monai_fedpriv.data.dataset_info.DatasetInfo`) to a network (:class:`AdaptTarget`).

Everything returned is a JSON-serialisable MONAI bundle config (``{"_target_": "LoadImaged", ...}``), so it can be set
as a ``ConfigParser`` override (e.g. ``train#deterministic_transforms``) and stored in ``metrics.json``. Instantiate a
list with ``ConfigParser({"t": chain}).get_parsed_content("t")`` and wrap it in ``monai.transforms.Compose``.

Example:
    >>> info = describe_dataset("/data/Task09_Spleen")  # doctest: +SKIP
    >>> target = AdaptTarget(spatial_dims=2, patch_size=(64, 64), spacing=(1.5, 1.5, None))
    >>> chains = adapted_transforms(info, target)  # doctest: +SKIP
    >>> overrides = {"train#deterministic_transforms": chains["deterministic"], "validate#inferer":
    ...              inferer_config(info, target), **network_channels(info, target)}  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from monai_fedpriv.data.chains import IMG_LAB, deterministic_chain, random_chain
from monai_fedpriv.data.dataset_info import DatasetInfo
from monai_fedpriv.errors import DataError

__all__ = [
    "AdaptTarget",
    "adapted_transforms",
    "inferer_config",
    "network_channels",
    "contiguous_label_mapping",
    "BRATS_REGIONS",
    "BRATS_2023_REGIONS",
]

#: Overlapping BraTS evaluation regions on 2017-2021 labels, in the channel order of MONAI's
#: ``ConvertToMultiChannelBasedOnBratsClassesd``: tumour core, whole tumour, enhancing tumour.
BRATS_REGIONS = {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}
#: The same regions on BraTS 2023 labels (or on 2020 labels after the mapping ``{4: 3}``).
BRATS_2023_REGIONS = {"TC": (1, 3), "WT": (1, 2, 3), "ET": (3,)}


@dataclass(frozen=True)
class AdaptTarget:
    """What the bundle's network expects.

    Attributes:
        spatial_dims: 2 or 3, the network's spatial dimensions.
        patch_size: training patch (and inference window) size, one entry per network dimension.
        spacing: target voxel size in mm per *data* axis; an entry ``None`` keeps that axis' spacing (e.g.
            ``(1.5, 1.5, None)`` for a 2D network on 3D data); ``spacing=None`` skips resampling. Shorter than the data
            dimensionality: the missing axes are kept.
        divisible_by: validation volumes are padded in-plane (and through-plane for a 3D network) to a multiple of
            this (the network's total down-sampling factor).
        samples_per_volume: patches drawn per volume per visit (``num_samples`` of ``RandCropByPosNegLabeld``).
        ct_window: HU range mapped to [0, 1] for CT channels (default: the soft-tissue window of MONAI's spleen bundle).
        label_mapping: ``{stored value: training value}`` applied first (e.g. ``{4: 3}`` for BraTS 2017-2021).
        regions: ``{name: label values}`` turning the label into one binary channel per (possibly overlapping)
            region (e.g. :data:`BRATS_REGIONS`), for sigmoid outputs; values are those after ``label_mapping``.
        pos: weight of foreground-centred patches. neg: weight of background-centred patches.
        sw_batch_size: windows per inference batch. overlap: sliding-window overlap.
        augment: add light random augmentation after cropping.
        channels: input channels kept, by index in the data's modality order (``None``: all), e.g. T2-FLAIR only.
        slice_context: for a 2D network on 3D data, consecutive axial slices given as channels (odd; the label is
            the central slice, inference by :class:`~monai_fedpriv.data.transforms.ContextSliceInferer`).
    """

    spatial_dims: int = 2
    patch_size: tuple[int, ...] = (64, 64)
    spacing: tuple[float | None, ...] | None = None
    divisible_by: int = 8
    samples_per_volume: int = 4
    ct_window: tuple[float, float] = (-175.0, 250.0)
    label_mapping: Mapping[int, int] | None = None
    regions: Mapping[str, Sequence[int]] | None = None
    pos: float = 1.0
    neg: float = 1.0
    sw_batch_size: int = 8
    overlap: float = 0.25
    augment: bool = field(default=True)
    channels: tuple[int, ...] | None = None
    slice_context: int = 1

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"AdaptTarget.spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if len(self.patch_size) != self.spatial_dims or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must hold {self.spatial_dims} positive sizes, got {self.patch_size!r}")
        if self.spacing is not None and any(s is not None and s <= 0 for s in self.spacing):
            raise ValueError(f"spacing entries must be positive or None, got {self.spacing!r}")
        for name in ("divisible_by", "samples_per_volume", "sw_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AdaptTarget.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window!r}")
        if self.slice_context < 1 or self.slice_context % 2 == 0:
            raise ValueError(f"slice_context must be a positive odd number, got {self.slice_context!r}")
        if self.slice_context > 1 and self.spatial_dims != 2:
            raise ValueError("slice_context is for a 2D network on 3D data (spatial_dims=2)")
        if self.channels is not None and (not self.channels or min(self.channels) < 0):
            raise ValueError(f"channels must be non-negative channel indices, got {self.channels!r}")
        if self.pos < 0 or self.neg < 0 or self.pos + self.neg == 0 or not 0 <= self.overlap < 1:
            raise ValueError(
                f"need pos, neg >= 0 (not both 0) and 0 <= overlap < 1, got pos={self.pos}, "
                f"neg={self.neg}, overlap={self.overlap}"
            )


def _check(info: DatasetInfo, target: AdaptTarget) -> None:
    if target.spatial_dims > info.spatial_dims:
        raise DataError(
            f"a {target.spatial_dims}D network cannot train on {info.name} at {info.root}: its images are "
            f"{info.spatial_dims}D"
        )
    if target.spacing is not None and len(target.spacing) > info.spatial_dims:
        raise DataError(f"spacing {target.spacing} has more entries than {info.name} has axes ({info.spatial_dims})")
    if target.channels is not None and max(target.channels) >= info.n_channels:
        raise DataError(
            f"the network takes channels {list(target.channels)} but {info.name} has {info.n_channels} "
            f"({list(info.modalities)})"
        )
    if target.slice_context > 1 and info.spatial_dims != 3:
        raise DataError(f"slice_context {target.slice_context} needs 3D volumes; {info.name} is {info.spatial_dims}D")
    mapped = {int((target.label_mapping or {}).get(v, v)) for v in info.labels}
    unknown = sorted({int(v) for r in (target.regions or {}).values() for v in r} - mapped)
    if unknown:
        raise DataError(
            f"regions {dict(target.regions or {})} use label values {unknown} that {info.name} does not "
            f"have after label_mapping (values: {sorted(mapped)})"
        )


def adapted_transforms(info: DatasetInfo, target: AdaptTarget) -> dict[str, list[dict]]:
    """MONAI transform chains adapting ``info``'s files to ``target``'s network.

    - ``"deterministic"`` (cacheable): load; channel first (single modality: a new axis; MSD 4D: last axis moved
      first; BraTS/file lists: one channel per file); ``label_mapping``; ``Orientationd`` to RAS so that axes mean the
      same on every scan (LPS BraTS volumes included) and axis -1 is the axial (slice) axis; ``Spacingd`` to
      ``target.spacing`` (bilinear image, nearest label); per-modality intensity normalisation (see :mod:`.chains`);
      ``regions``; label cast to uint8.
    - ``"random"`` (per visit): ``SpatialPadd`` to the patch so small volumes work; ``RandCropByPosNegLabeld`` with
      ``pos``/``neg`` weights (foreground is rare in 3D volumes). For a 2D network on 3D data the crop is
      ``[*patch, 1]`` (one axial slice region) and ``SqueezeDimd(dim=-1)`` drops the slice axis, so the network sees
      2D ``(C, H, W)`` samples. Then light augmentation (small affine, intensity scale/shift, noise; no flips, since
      much anatomy is lateralised). Each volume yields ``samples_per_volume`` samples: under DP-SGD the per-sample
      clipping unit is then a patch, not a patient; use 1 where the privacy unit must be the volume.
    - ``"final"``: ``EnsureTyped`` float32 tensors without meta data (as the bundle's ``final_transforms``).
    - ``"validate"``: deterministic + ``DivisiblePadd`` (in-plane only for slice-wise inference) + final: whole
      volumes for :func:`inferer_config`'s inferer (batch size 1 for volumes of different shapes).

    Raises:
        DataError: a 3D network on 2D data, a ``spacing`` with too many entries, or regions naming absent labels.
    """
    _check(info, target)
    final = [{"_target_": "EnsureTyped", "keys": IMG_LAB, "dtype": "float32", "track_meta": False}]
    det = deterministic_chain(info, target)
    d = int(target.divisible_by)
    k = [d, d, 1] if target.spatial_dims == 2 and info.spatial_dims == 3 else [d] * info.spatial_dims
    pad = {"_target_": "DivisiblePadd", "keys": IMG_LAB, "k": k}
    return {"deterministic": det, "random": random_chain(info, target), "final": final, "validate": [*det, pad, *final]}


def inferer_config(info: DatasetInfo, target: AdaptTarget) -> dict[str, Any]:
    """Inferer config: ``SliceInferer`` (2D network over every axial slice of a 3D volume, each slice in windows of
    ``patch_size``), ``SlidingWindowInferer`` (3D network, Gaussian-weighted windows) or ``SimpleInferer`` (2D data:
    the padded image is one input of a fully convolutional network)."""
    _check(info, target)
    window = {
        "roi_size": [int(p) for p in target.patch_size],
        "sw_batch_size": int(target.sw_batch_size),
        "overlap": float(target.overlap),
    }
    if info.spatial_dims == 2:
        return {"_target_": "SimpleInferer"}
    if target.spatial_dims == 2 and target.slice_context > 1:
        return {"_target_": "monai_fedpriv.data.transforms.ContextSliceInferer", "context": int(target.slice_context),
                "batch_size": int(target.sw_batch_size)}  # fmt: skip
    if target.spatial_dims == 2:
        return {"_target_": "SliceInferer", "spatial_dim": 2, **window}
    return {"_target_": "SlidingWindowInferer", "mode": "gaussian", **window}


def contiguous_label_mapping(info: DatasetInfo) -> dict[int, int] | None:
    """Mapping of the declared label values onto ``0..n_classes-1`` (``{4: 3}`` for BraTS 2020), or ``None``
    if they are already contiguous. A softmax network needs contiguous classes (one output per class)."""
    mapping = {v: i for i, v in enumerate(sorted(info.labels)) if v != i}
    return mapping or None


def network_channels(info: DatasetInfo, target: AdaptTarget) -> dict[str, int]:
    """``{"in_channels", "out_channels"}`` for the network: one input per modality; one output per region (sigmoid)
    or per class value ``0..max`` after ``label_mapping`` (softmax; a gap such as BraTS' unused 3 costs one output).
    """
    _check(info, target)
    n_in = (len(target.channels) if target.channels is not None else info.n_channels) * int(target.slice_context)
    if target.regions:
        return {"in_channels": n_in, "out_channels": len(target.regions)}
    mapped = {int((target.label_mapping or {}).get(v, v)) for v in info.labels}
    return {"in_channels": n_in, "out_channels": max(mapped) + 1}
