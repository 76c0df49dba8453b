"""A team's own data in one flag: an MSD task folder or a BraTS release, as distributed, into a bundle's federation.

:func:`load_own_data` reads and checks the data list once (every case opened; one ``DataError`` naming every bad
file); :func:`split_own_data` makes the sites (``--partition``) and, when the data set has no validation cases, a
seeded validation split by patient at each site (at least one training and one validation patient per site, or an
error that says why not); :func:`adapt_bundle` turns the data set's description into bundle overrides: input
channels (modalities) and output classes, the transform chains of :mod:`monai_fedpriv.data.adapt` (reorientation,
resampling to the bundle's spacing, per-modality intensity normalisation, foreground-weighted 2D slices for a 2D
network on 3D volumes) and the matching inferer (slice-wise or sliding-window validation over whole volumes).

Example::

    data = load_own_data("/data/Task04_Hippocampus")
    split = split_own_data(data, n_sites=3, scheme=None, val_fraction=0.2, seed=0)
    overrides, target = adapt_bundle(BundleSpec(Path("bundles/brain_tissue_2d")), data)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle, metadata_input, parser_get
from monai_fedpriv.data.adapt import AdaptTarget, adapted_transforms, contiguous_label_mapping, inferer_config
from monai_fedpriv.data.checks import check_datalist
from monai_fedpriv.data.dataset_info import DatasetInfo, _header_shape, describe_and_list
from monai_fedpriv.data.io import read_image
from monai_fedpriv.data.partition import SKEW_SORTED_FRACTION, partition_cases
from monai_fedpriv.data.splits import site_train_val_split
from monai_fedpriv.errors import BundleError, DataError
from monai_fedpriv.experiments.federated import SiteSplit, split_sites

__all__ = ["ADAPT_IDS", "CACHE_BYTES", "OwnData", "adapt_bundle", "load_own_data", "split_own_data"]

#: the pre-processed training volumes cached in memory at most (the rest is loaded per visit)
CACHE_BYTES = 2 * 1024**3

#: optional ids :func:`adapt_bundle` reads from a bundle that may not define them (valid ``--override`` ids)
ADAPT_IDS = ("patch_size", "data_spacing", "samples_per_volume", "ct_window")


@dataclass
class OwnData:
    """A checked data set: its description, training cases and its own validation cases (if it declares any)."""

    info: DatasetInfo
    cases: list[dict[str, Any]]
    val_cases: list[dict[str, Any]] = field(default_factory=list)
    split: dict[str, Any] = field(default_factory=dict)

    def summary(self, split: SiteSplit) -> dict[str, Any]:
        """What ``metrics.json`` and the report say about the data used."""
        return {
            **self.info.summary(),
            "cases_per_site": {
                site: {"train": len(split.train.get(site, [])), "val": len(split.val.get(site, []))}
                for site in split.train
            },
            "validation": self.split,
        }


def load_own_data(
    root: str | Path,
    layout: str | None = None,
    institutions_csv: str | Path | None = None,
    check: bool = True,
    log: Callable[[str], None] = print,
) -> OwnData:
    """Describe, list and check a data set folder before any training.

    Args:
        root: an MSD task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``) or a BraTS release folder.
        layout: ``"msd"``, ``"brats"`` or ``None`` to detect.
        institutions_csv: a ``case,institution`` CSV naming each case's institution (for ``--partition
            institution``); MSD items' ``institution`` keys, ``institutions.csv`` in the folder and BraTS'
            ``name_mapping.csv`` are used otherwise.
        check: open every case (image readable, image and label on one grid, label values declared).
        log: where progress lines go.

    Raises:
        DataError: one error listing every bad case and the file at fault.
    """
    info, cases, val_cases = describe_and_list(root, layout, institutions_csv)
    if check:
        log(f"checking {len(cases) + len(val_cases)} cases of {info.name} ({info.root}) ...")
        check_datalist([*cases, *val_cases], list(info.labels))
    return OwnData(info, cases, val_cases)


def foreground_fraction(case: Mapping[str, Any]) -> float:
    """The fraction of a case's label volume that is foreground (any label > 0): the per-case quantity the skew
    partitions sort patients by on a segmentation data set (Qu et al. skew the label distribution)."""
    if not case.get("label"):
        raise DataError(f"case {case.get('image')} has no label; a skew partition needs every case's label.")
    label, _ = read_image(Path(case["label"]))
    return float((label > 0).mean())


def split_own_data(
    data: OwnData, n_sites: int, scheme: str | None, val_fraction: float, seed: int, log: Callable[[str], None] = print
) -> SiteSplit:
    """Sites and validation cases of a user's data set.

    ``scheme=None`` partitions by institution when the data name at least ``n_sites`` institutions, else iid (said
    in a log line). Without validation cases in the data set, each site's patients are split into training and
    validation (``val_fraction``, seeded by ``seed`` and the site name), so every site is scored on its own
    held-out patients.
    """
    institutions = {str(c.get("institution", "unknown")) for c in data.cases} - {"unknown"}
    if scheme in SKEW_SORTED_FRACTION and not all("feature" in c for c in [*data.cases, *data.val_cases]):
        # label-distribution skew of a segmentation task: how much of each case its foreground labels cover
        log(f"--partition {scheme}: measuring each case's foreground fraction (labels > 0) for the skew ...")
        data.cases = [{**c, "feature": foreground_fraction(c)} for c in data.cases]
        data.val_cases = [{**c, "feature": foreground_fraction(c)} for c in data.val_cases]
    if scheme is None:
        scheme = "institution" if len(institutions) >= n_sites else "iid"
        log(f"partition: {scheme} ({len(institutions)} institutions named in the data for {n_sites} sites)")
    if scheme == "institution" and len(institutions) < n_sites:
        raise DataError(
            f"--partition institution needs {n_sites} institutions but {data.info.root} names "
            f"{len(institutions)} {sorted(institutions)[:5]}; pass --institutions CSV (columns case,institution), "
            f"use fewer --sites, or --partition iid"
        )
    if data.val_cases:
        cases = [{**c, "split": "train"} for c in data.cases] + [{**c, "split": "val"} for c in data.val_cases]
        data.split = {"made_by": "the data set's own validation section", "val_cases": len(data.val_cases)}
        return split_sites(cases, n_sites, scheme, seed)
    part = partition_cases(data.cases, n_sites, scheme, seed=seed)
    train, val = site_train_val_split(part.sites, val_fraction, seed)
    data.split = {"made_by": "seeded split by patient at each site", "val_fraction": val_fraction, "seed": seed}
    return SiteSplit(train, val, scheme, part.mean_ks, {k: len(v) for k, v in train.items()})


def _literal(value: Any) -> bool:
    return not (isinstance(value, str) and value.startswith(("@", "$", "%")))


def adapt_bundle(bundle: BundleSpec, data: OwnData, privacy: bool = False) -> tuple[dict[str, Any], AdaptTarget]:
    """Bundle overrides that make ``bundle`` train and validate on ``info``'s data.

    Read from the bundle: the network's spatial dimensions (``network_def#spatial_dims``, else the metadata's input
    shape), the patch size (``patch_size`` id, else the metadata's ``spatial_shape``), the target voxel spacing
    (``data_spacing`` id; absent: keep the data's), the CT window (``ct_window`` id) and samples per volume
    (``samples_per_volume`` id; under DP-SGD with the slice or volume unit each volume gives one sample per visit).

    Raises:
        BundleError: the bundle does not say what its network takes.
        DataError: the data cannot feed it (a 3D network on 2D images...).
    """
    info = data.info
    parser = load_bundle(bundle, required=())
    if parser_get(parser, "adapt_target") is not None:  # a task bundle builds its pipeline from dataset_dir itself
        return _adapt_task_bundle(bundle, data, privacy)
    net = parser_get(parser, "network_def")
    dims = None
    if isinstance(net, Mapping):
        dims = net.get("spatial_dims", net.get("dimensions"))
    shape = metadata_input(parser)[0]
    patch = parser_get(parser, "patch_size") or shape
    if dims is None and patch is not None:
        dims = len(patch)
    if dims is None or not _literal(dims):
        dims = len(patch) if patch else None
    if dims not in (2, 3) or not patch:
        raise BundleError(
            f"bundle {bundle.root} does not say what its network takes: give network_def#spatial_dims and a "
            f"'patch_size' id, or network_data_format.inputs.image.spatial_shape in metadata.json"
        )
    spacing = parser_get(parser, "data_spacing")
    samples = parser_get(parser, "samples_per_volume") or (1 if privacy else 4)
    target = AdaptTarget(
        spatial_dims=int(dims),
        patch_size=tuple(int(p) for p in patch),
        spacing=None if spacing is None else tuple(spacing),
        samples_per_volume=int(samples),
        ct_window=tuple(parser_get(parser, "ct_window") or (-175.0, 250.0)),  # type: ignore[arg-type]
        label_mapping=contiguous_label_mapping(info),
    )
    chains = adapted_transforms(info, target)
    overrides: dict[str, Any] = {
        "train#preprocessing": {
            "_target_": "Compose",
            "transforms": [*chains["deterministic"], *chains["random"], *chains["final"]],
        },
        "validate#preprocessing": {"_target_": "Compose", "transforms": chains["validate"]},
        "validate#inferer": inferer_config(info, target),
        "train#dataset#cache_rate": _cache_rate(info, data.cases[0]["image"]),
    }
    if info.spatial_dims == 3 and parser_get(parser, "validate#dataloader#batch_size") is not None:
        overrides["validate#dataloader#batch_size"] = 1  # whole volumes of different shapes
    n_classes = max(int((target.label_mapping or {}).get(v, v)) for v in info.labels) + 1
    if parser_get(parser, "num_classes") is not None:
        overrides["num_classes"] = n_classes
    if isinstance(net, Mapping):
        if "in_channels" in net:
            overrides["network_def#in_channels"] = info.n_channels
        for key in ("out_channels", "classes"):
            if key in net and _literal(net[key]):
                overrides[f"network_def#{key}"] = n_classes
    return overrides, target


def _adapt_task_bundle(bundle: BundleSpec, data: OwnData, privacy: bool) -> tuple[dict[str, Any], AdaptTarget]:
    """A task bundle (``data_info``/``adapt_target`` ids, :mod:`monai_fedpriv.data.task`) is pointed at the data;
    its own expressions then build transforms, inferer and channels. Under DP-SGD each volume gives one sample per
    visit (the privacy unit is then a volume or a patient, not a patch)."""
    overrides: dict[str, Any] = {
        "dataset_dir": str(data.info.root),
        "data_layout": data.info.layout,
        "train#dataset#cache_rate": _cache_rate(data.info, data.cases[0]["image"]),
    }
    if privacy:
        overrides["samples_per_volume"] = 1
    target = load_bundle(bundle, overrides, required=()).get_parsed_content("adapt_target")
    if not isinstance(target, AdaptTarget):
        kind = type(target).__name__
        raise BundleError(f"bundle {bundle.root}: 'adapt_target' should build an AdaptTarget, got {kind}.")
    return overrides, target


def _cache_rate(info: DatasetInfo, image: str | list[str]) -> float:
    """Cache the pre-processed training volumes only while they fit in :data:`CACHE_BYTES` (an estimate from the
    first case's header: a BraTS release cached whole would take tens of GB)."""
    files = image if isinstance(image, list) else [image]
    voxels = sum(math.prod(_header_shape(str(f))) for f in files)
    estimate = info.n_cases * voxels * 4
    return 1.0 if estimate <= CACHE_BYTES else round(CACHE_BYTES / estimate, 3)
