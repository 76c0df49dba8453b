"""Consistency checks for segmentation cases: readable files, matching grids, declared label values."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_fedpriv.data.io import read_image
from monai_fedpriv.errors import DataError

__all__ = ["case_errors", "check_case", "check_datalist", "inference_inputs"]


def case_errors(errors: Sequence[str], total: int) -> DataError:
    """The one error that names every failed case: ``"N of M cases failed the checks:"`` and a line per failure."""
    lines = "\n".join(f"  - {e}" for e in errors)
    return DataError(f"{len(errors)} of {total} cases failed the checks:\n{lines}")


def _image_paths(case: dict, image_key: str) -> list[Path]:
    if image_key not in case:
        raise DataError(f"case {case.get('patient', case)!r} has no {image_key!r} key")
    value = case[image_key]
    paths = list(value) if isinstance(value, list | tuple) else [value]
    if not paths:
        raise DataError(f"case {case.get('patient', case)!r} has an empty {image_key!r} list")
    return [Path(p) for p in paths]


def check_case(
    case: dict,
    labels: Sequence[int] | None,
    image_key: str = "image",
    label_key: str = "label",
    atol: float = 1e-3,
) -> None:
    """Check one case: every file readable, image and label on the same grid, label values declared.

    The image may be one path or a list of paths (one per modality); each modality is checked against the label. An
    image may carry one trailing channel axis more than the label (MSD 4D multi-modal images). A case without
    ``label_key`` is checked for readability only.

    Args:
        case: mapping with ``image_key`` (path or list of paths) and optionally ``label_key``.
        labels: declared class values (e.g. ``[0, 1, 2]``); ``None`` skips the label-value check.
        image_key: key of the image path(s).
        label_key: key of the label path.
        atol: absolute tolerance on affine entries (mm).

    Raises:
        DataError: naming the file(s) and the problem.

    Example:
        >>> check_case({"image": "/d/img.nii.gz", "label": "/d/lab.nii.gz"}, labels=[0, 1, 2])  # doctest: +SKIP
    """
    images = [(p, *read_image(p)) for p in _image_paths(case, image_key)]
    if label_key not in case or case[label_key] is None:
        return
    label_path = Path(case[label_key])
    label, label_affine = read_image(label_path)
    for path, arr, affine in images:
        spatial = arr.shape[: label.ndim] if arr.ndim == label.ndim + 1 and label.ndim >= 3 else arr.shape
        if spatial != label.shape:
            raise DataError(
                f"image {path} has spatial shape {tuple(arr.shape)} but label {label_path} has shape "
                f"{tuple(label.shape)}"
            )
        if not np.allclose(affine, label_affine, atol=atol, rtol=0.0):
            diff = float(np.max(np.abs(affine - label_affine)))
            raise DataError(
                f"affine of image {path} differs from affine of label {label_path} by up to {diff:.4g} (atol={atol})"
            )
    values = np.unique(label)
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        bad = values[~np.isfinite(values) | (values != np.round(values))][:5]
        raise DataError(f"label {label_path} holds non-integer values, e.g. {bad.tolist()}")
    if labels is not None:
        declared = sorted(int(v) for v in labels)
        extra = sorted(set(int(v) for v in values) - set(declared))
        if extra:
            raise DataError(f"label values {set(extra)} of {label_path} are not among the declared classes {declared}")


def check_datalist(
    cases: Sequence[dict],
    labels: Sequence[int] | None,
    image_key: str = "image",
    label_key: str = "label",
    atol: float = 1e-3,
) -> None:
    """Run :func:`check_case` on every case and report all failures at once.

    Every case is checked, even after a failure, so one run lists every broken file.

    Args:
        cases: the data list.
        labels: declared class values, or ``None`` to skip that check.
        image_key: key of the image path(s).
        label_key: key of the label path.
        atol: affine tolerance passed to :func:`check_case`.

    Raises:
        DataError: one error whose message has a line per failed case (``"N of M cases failed the checks:"``).

    Example:
        >>> check_datalist(load_msd_datalist("/data/Task09_Spleen"), labels=[0, 1])  # doctest: +SKIP
    """
    errors = []
    for case in cases:
        try:
            check_case(case, labels, image_key=image_key, label_key=label_key, atol=atol)
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        raise case_errors(errors, len(cases))


def inference_inputs(
    input_dir: str | Path, spatial_dims: int, bundle: str, exit_on_error: bool = False
) -> list[dict[str, str]]:
    """The NIfTI images in ``input_dir`` to segment, each checked (from its header) to have the ``spatial_dims``
    dimensions the bundle's network takes, so that a 3D volume given to a 2D bundle is refused naming the file and
    its shape instead of failing inside a convolution.

    Args:
        input_dir: the folder of images (every ``*.nii*`` file, sorted).
        spatial_dims: the dimensions of one input image (one channel, no channel axis), e.g. 2 for H x W slices.
        bundle: the bundle's name, for the message.
        exit_on_error: when this process is MONAI's own runner (``python -m monai.bundle run``, which would bury the
            message under its tracebacks), print the error as one ``error:`` line and exit with code 2; a config
            parsed inside any other program (a notebook, a workflow, the tests) still gets the ``DataError``.

    Raises:
        DataError: naming every image of another dimension, with its shape.
    """
    from monai_fedpriv.data.dataset_info import _header_shape

    files = sorted(p for p in Path(input_dir).glob("*.nii*") if p.is_file())
    bad = []
    for path in files:
        shape = _header_shape(str(path))
        if len(shape) != spatial_dims:
            bad.append(f"image {path} has shape {shape} ({len(shape)}D)")
    if not bad:
        return [{"image": str(p)} for p in files]
    error = DataError(
        f"{'; '.join(bad)}, but bundle {bundle} segments {spatial_dims}D images of one channel (shape "
        f"{' x '.join('HWD'[:spatial_dims])}); give it {spatial_dims}D images, or segment volumes with a bundle that "
        f"predicts them slice by slice (bundles/liver_ct_2d, bundles/brain_tumour_2d_flair)."
    )
    if exit_on_error and _run_by_monai_bundle():
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    raise error


def _run_by_monai_bundle() -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (its ``__main__`` is MONAI's bundle runner)."""
    main = sys.modules.get("__main__")
    return getattr(main, "__spec__", None) is not None and main.__spec__.name == "monai.bundle.__main__"  # type: ignore[union-attr]
