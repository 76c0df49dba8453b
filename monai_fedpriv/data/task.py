"""A seed task as a bundle: the task bundles (``bundles/liver_ct_2d``, ``brain_tumour_3d``, ``brain_tumour_2d_flair``)
describe the data set they are pointed at (``dataset_dir``), list its cases (with a validation split by patient
when the data set declares none) and build their transforms and inferer from one
:class:`~monai_fedpriv.data.adapt.AdaptTarget`, through the functions here:

.. code-block:: json

    "data_info": "$task.task_info(@dataset_dir, @data_layout)",
    "datalist": "$task.task_datalist(@data_info, @val_fraction, @seed)",
    "adapt_target": "$task.task_target(@data_info, spatial_dims=2, patch_size=@patch_size, regions=@label_regions)",
    "train#preprocessing": "$task.task_transforms(@data_info, @adapt_target, 'train')",
    "validate#inferer": "$task.task_inferer(@data_info, @adapt_target)"

So ``python -m monai.bundle run --dataset_dir /data/Task03_Liver ...`` and ``monai-fedpriv simulate BUNDLE --data
/data/Task03_Liver`` build the same pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_fedpriv.data.adapt import (
    BRATS_2023_REGIONS,
    BRATS_REGIONS,
    AdaptTarget,
    adapted_transforms,
    contiguous_label_mapping,
    inferer_config,
)
from monai_fedpriv.data.dataset_info import DatasetInfo, describe_dataset
from monai_fedpriv.errors import BundleError, DataError

__all__ = [
    "MSD_BRATS_REGIONS", "brats_regions", "case_name_formatter", "channel_indices", "inference_datalist",
    "inference_info", "instantiate",
    "task_datalist", "task_inference_transforms", "task_inferer", "task_info", "task_target", "task_transforms",
]  # fmt: skip

#: The BraTS regions on the Medical Segmentation Decathlon's Task01 labels (1 edema, 2 non-enhancing tumour,
#: 3 enhancing tumour), in the order tumour core, whole tumour, enhancing tumour.
MSD_BRATS_REGIONS = {"TC": (2, 3), "WT": (1, 2, 3), "ET": (3,)}


def task_info(dataset_dir: str | Path | None, layout: str | None = None) -> DatasetInfo:
    """The description of the data set a task bundle is pointed at.

    Raises:
        BundleError: ``dataset_dir`` is not set (says how to set it).
        DataError: the folder is not an MSD task or BraTS release (names what is missing).
    """
    if dataset_dir in (None, ""):
        raise BundleError(
            "this bundle trains on your data: set dataset_dir to an MSD task folder or a BraTS release "
            "(python -m monai.bundle run ... --dataset_dir DIR, or monai-fedpriv simulate BUNDLE --data DIR); to try "
            "it without real data, monai-fedpriv data --synthetic brats|msd --output DIR writes a synthetic one."
        )
    return describe_dataset(dataset_dir, layout)


def task_datalist(info: DatasetInfo, val_fraction: float = 0.2, seed: int = 0) -> list[dict[str, Any]]:
    """Every case of ``info``'s data set with ``split`` = ``"train"``/``"val"`` and ``institution``.

    The data set's own validation cases when it declares some, else a seeded split by patient over all cases
    (``val_fraction``, at least one patient each way); the training of one site, as ``python -m monai.bundle
    run`` does, uses the ``"train"`` cases.
    """
    from monai_fedpriv.data.splits import split_validation_by_patient
    from monai_fedpriv.experiments.own_data import load_own_data

    own = load_own_data(info.root, info.layout, check=False, log=lambda _: None)
    if own.val_cases:
        return [{**c, "split": "train"} for c in own.cases] + [{**c, "split": "val"} for c in own.val_cases]
    train, val = split_validation_by_patient(own.cases, val_fraction, seed, name=info.name)
    return [{**c, "split": "train"} for c in train] + [{**c, "split": "val"} for c in val]


def brats_regions(info: DatasetInfo) -> dict[str, tuple[int, ...]]:
    """Tumour core / whole tumour / enhancing tumour as label values of ``info``'s label convention: MSD Task01
    (1 edema, 2 non-enhancing, 3 enhancing), BraTS 2017-2021 (1 necrosis, 2 edema, 4 enhancing) or BraTS 2023
    (enhancing relabelled 3)."""
    if info.layout == "msd":
        return dict(MSD_BRATS_REGIONS)
    return dict(BRATS_REGIONS if 4 in info.labels else BRATS_2023_REGIONS)


def channel_indices(info: DatasetInfo, names: Sequence[str]) -> tuple[int, ...]:
    """Indices of the modalities ``names`` (case-insensitive; ``"flair"`` matches ``FLAIR`` and ``t2f``...).

    Raises:
        DataError: a modality the data set does not have (lists what it has).
    """
    aliases = {
        "flair": ("flair", "t2f"), "t1ce": ("t1ce", "t1gd", "t1c"), "t2": ("t2", "t2w"), "t1": ("t1", "t1w", "t1n"),
    }  # fmt: skip
    found = []
    for name in names:
        wanted = aliases.get(name.lower(), (name.lower(),))
        matches = [k for k, m in enumerate(info.modalities) if m.lower() in wanted]
        if not matches:
            raise DataError(f"{info.name} ({info.root}) has no {name} channel; its modalities are "
                            f"{list(info.modalities)}")  # fmt: skip
        found.append(matches[0])
    return tuple(found)


def task_target(
    info: DatasetInfo,
    regions: str | Mapping[str, Sequence[int]] | None = None,
    modalities: Sequence[str] | None = None,
    **kwargs: Any,
) -> AdaptTarget:
    """The :class:`AdaptTarget` of a task bundle on ``info``'s data.

    Args:
        regions: ``"brats"`` (tumour core, whole tumour, enhancing tumour in the data's label convention, see
            :func:`brats_regions`), ``"whole_tumour"``, ``{name: label values}``, or ``None`` for softmax classes
            (label values mapped onto ``0..n-1``).
        modalities: input modalities by name (``None``: all, in the data's order).
        kwargs: the other :class:`AdaptTarget` fields (``spatial_dims``, ``patch_size``, ``spacing``...).
    """
    spacing = kwargs.pop("spacing", None)
    for key in ("patch_size", "ct_window", "channels"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    if regions == "brats":
        resolved: dict[str, Any] | None = brats_regions(info)
    elif regions == "whole_tumour":
        resolved = {"WT": brats_regions(info)["WT"]}
    else:
        resolved = dict(regions) if isinstance(regions, Mapping) else None
    return AdaptTarget(
        spacing=None if spacing is None else tuple(spacing),
        regions=resolved,
        label_mapping=None if resolved else contiguous_label_mapping(info),
        channels=channel_indices(info, modalities) if modalities else None,
        **kwargs,
    )


def instantiate(config: Any) -> Any:
    """Build a MONAI bundle config fragment (``{"_target_": ...}`` or a list of them)."""
    from monai.bundle import ConfigParser

    return ConfigParser({"fragment": config}).get_parsed_content("fragment")


def task_transforms(info: DatasetInfo, target: AdaptTarget, part: str) -> Any:
    """``Compose`` of the ``"train"`` (deterministic + random + final) or ``"validate"`` chain."""
    from monai.transforms import Compose

    chains = adapted_transforms(info, target)
    if part == "train":
        return Compose(instantiate([*chains["deterministic"], *chains["random"], *chains["final"]]))
    if part == "validate":
        return Compose(instantiate(chains["validate"]))
    raise ValueError(f"part must be 'train' or 'validate', got {part!r}.")


def task_inferer(info: DatasetInfo, target: AdaptTarget) -> Any:
    """The inferer for whole validation volumes (:func:`~monai_fedpriv.data.adapt.inferer_config`)."""
    return instantiate(inferer_config(info, target))


def inference_info(modalities: Sequence[str], spatial_dims: int = 3, channel_layout: str | None = None) -> DatasetInfo:
    """A description of images to segment (no labels): their modalities in channel order, dimensions and how
    channels are stored (default: ``"none"`` for one modality, ``"last"`` for several, as MSD's 4D files)."""
    layout = channel_layout or ("none" if len(modalities) == 1 else "last")
    if layout not in ("none", "last", "files"):
        raise ValueError(f"channel_layout must be 'none', 'last' or 'files', got {layout!r}.")
    return DatasetInfo(
        name="inference inputs", layout="msd", root=Path("."), modalities=tuple(modalities), labels={0: "background"},
        spatial_dims=int(spatial_dims), channel_layout=layout, n_cases=0,
    )  # fmt: skip


def inference_datalist(input_dir: str | Path, datalist_json: str | Path | None = None) -> list[dict[str, Any]]:
    """The images to segment: items of ``datalist_json`` (a JSON list of ``{"image": path or [paths]}``) or every
    NIfTI file in ``input_dir``.

    Raises:
        DataError: no images found (names the folder).
    """
    import json

    if datalist_json:
        try:
            items = json.loads(Path(datalist_json).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"input_datalist {datalist_json}: cannot be read as JSON ({exc}).") from exc
        if not isinstance(items, list) or not all(isinstance(i, dict) and "image" in i for i in items):
            raise DataError(f"{datalist_json}: expected a JSON list of {{\"image\": ...}} items.")
        return items
    files = sorted(p for p in Path(input_dir).glob("*.nii*") if p.is_file())
    if not files:
        raise DataError(f"no NIfTI images to segment in {input_dir} (set input_dir or input_datalist).")
    return [{"image": str(f)} for f in files]


#: File-name endings that name one modality of a multi-file case: BraTS 2017-2021, BraTS 2023, nnU-Net channels.
_MODALITY_ENDING = re.compile(r"([_-](t1|t1ce|t2|flair|t1n|t1c|t2w|t2f)|_\d{4})$", re.IGNORECASE)


def case_name_formatter(metadict: Mapping[str, Any] | None, saver: Any) -> dict[str, Any]:
    """``SaveImaged``'s ``output_name_formatter`` for cases read from one file per modality (MONAI names the output
    after the first file): the name loses its modality ending (``BraTS20_Training_001_t1.nii.gz`` ->
    ``BraTS20_Training_001``, then the saver's postfix); names without one are kept."""
    from monai.data.folder_layout import default_name_formatter

    kwargs = default_name_formatter(dict(metadict) if metadict else {}, saver)
    subject = str(kwargs["subject"])
    name = Path(subject).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
    if _MODALITY_ENDING.search(stem):
        kwargs["subject"] = str(Path(subject).with_name(_MODALITY_ENDING.sub("", stem) + ".nii.gz"))
    return kwargs


def _image_only(transform: dict[str, Any]) -> dict[str, Any] | None:
    """A transform config restricted to the image (``None`` when it only concerns labels)."""
    keys = transform.get("keys")
    if keys is None:
        return transform
    keys = [keys] if isinstance(keys, str) else list(keys)
    kept = [k for k in keys if k != "label"]
    if not kept or any(str(k).startswith("label") for k in kept):
        return None
    out = {**transform, "keys": kept}
    if isinstance(out.get("mode"), list):  # per-key interpolation modes: the image's
        out["mode"] = out["mode"][keys.index(kept[0])]
    if out.get("_target_") == "EnsureTyped":
        out["track_meta"] = True  # the prediction is inverted to the input's grid and saved with its header
    return out


def task_inference_transforms(info: DatasetInfo, target: AdaptTarget) -> Any:
    """``Compose`` of the validation chain on the image alone (no label), keeping meta data so that
    ``Invertd`` can bring the prediction back to each input's grid."""
    from monai.transforms import Compose

    chain = [t for t in (_image_only(t) for t in adapted_transforms(info, target)["validate"]) if t is not None]
    return Compose(instantiate(chain))
