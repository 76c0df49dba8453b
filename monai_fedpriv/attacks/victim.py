"""The victim side of an attack: load a real image and compute the update a site would send for it.

:func:`build_victim_update` replays a site's local round on one batch: ``K`` SGD steps, each with DP-SGD's clipping
and Gaussian noise when asked (Abadi et al., 2016). With batch size 1 per-sample clipping is clipping the whole
gradient, and Opacus' ``noise / expected_batch_size`` is the noise itself, so the result is what Opacus would send.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from monai_fedpriv.errors import DataError, PrivacyConfigError
from monai_fedpriv.privacy.dp_sgd.optimizer import BudgetedDPOptimizer
from monai_fedpriv.privacy.grad_sample import plain_copy, wrap_for_grad_sample

__all__ = [
    "build_victim_update", "intensity_label", "load_victim", "load_victim_image", "load_victim_label", "update_norm",
]  # fmt: skip


def _read_volume(path: Path) -> np.ndarray:
    """The file's array (NIfTI, MGH, PNG/JPEG as grey, DICOM or anything SimpleITK reads), singleton axes dropped."""
    name = path.name.lower()
    if not path.exists():
        raise DataError(f"victim image {str(path)!r} does not exist.")
    try:
        if name.endswith((".nii", ".nii.gz", ".mgz", ".img", ".hdr")):
            import nibabel as nib

            nii: Any = nib.load(str(path))
            arr = np.asarray(nii.get_fdata(), dtype=np.float32)
        elif name.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
            from PIL import Image

            arr = np.array(Image.open(path).convert("F"), dtype=np.float32)
        else:  # DICOM file or series folder, or anything else SimpleITK reads
            import SimpleITK as sitk

            if path.is_dir():
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
                img = reader.Execute()
            else:
                img = sitk.ReadImage(str(path))
            arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (z, y, x)
            arr = np.transpose(arr, tuple(range(arr.ndim))[::-1])  # to (x, y, z) like nibabel
    except Exception as err:  # noqa: BLE001 - any reader failure is a data error naming the file
        raise DataError(f"cannot read victim image {str(path)!r}: {err}") from err
    return np.squeeze(arr)


def _slice(arr: np.ndarray, slice_index: int | None, path: Path) -> np.ndarray:
    """The 2D image, or one slice along the last axis of a volume (the middle one when ``slice_index`` is None)."""
    if arr.ndim == 3:
        index = arr.shape[2] // 2 if slice_index is None else slice_index
        if not 0 <= index < arr.shape[2]:
            raise DataError(f"slice_index {index} is outside the {arr.shape[2]} slices of {str(path)!r}.")
        arr = arr[:, :, index]
    if arr.ndim != 2:
        raise DataError(f"victim image {str(path)!r} has shape {arr.shape}; expected a 2D image or a 3D volume.")
    return arr


def load_victim_image(
    path: str | Path, slice_index: int | None = None, size: tuple[int, int] | int = (64, 64)
) -> torch.Tensor:
    """Read a 2D image (NIfTI, DICOM, PNG...) or one axial slice of a volume, resize it and scale it to [0, 1].

    Args:
        path: image file (``.nii``/``.nii.gz``, DICOM file or series folder, ``.png``/``.jpg``).
        slice_index: slice along the last axis of a volume; the middle slice when ``None``.
        size: output ``(H, W)``.

    Returns:
        float tensor of shape ``(1, H, W)`` with values in [0, 1].

    Example:
        >>> img = load_victim_image("brain.nii.gz", size=64)  # doctest: +SKIP
    """
    return _image_tensor(_slice(_read_volume(Path(path)), slice_index, Path(path)), size, path)


def _image_tensor(arr: np.ndarray, size: tuple[int, int] | int, path: str | Path) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0]
    lo, hi = float(t.min()), float(t.max())
    if not hi > lo:
        raise DataError(f"victim image {str(path)!r} is constant ({lo}); nothing to reconstruct.")
    return ((t - lo) / (hi - lo)).clamp(0, 1)


def load_victim_label(
    path: str | Path, slice_index: int | None = None, size: tuple[int, int] | int = (64, 64)
) -> torch.Tensor:
    """Read a label map the same way as :func:`load_victim_image`, resized with nearest neighbours.

    Returns:
        integer tensor of shape ``(1, H, W)``.
    """
    return _label_tensor(_slice(_read_volume(Path(path)), slice_index, Path(path)), size)


def _label_tensor(arr: np.ndarray, size: tuple[int, int] | int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(np.rint(arr)))[None, None]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(t, size=hw, mode="nearest")[0].long()


def intensity_label(image: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A stand-in label map when no victim mask is given: intensity quantiles of the foreground.

    Voxels below 10% of the range are background (0); the foreground is split into ``num_classes - 1`` classes at
    its intensity quantiles (on T1 brain images: darker grey matter, brighter white matter).

    Args:
        image: ``(C, *spatial)`` image in [0, 1].
        num_classes: number of labels to produce.
    """
    gray = image[0]
    label = torch.zeros_like(gray, dtype=torch.long)
    fg = gray > 0.1
    if num_classes > 1 and bool(fg.any()):
        qs = torch.quantile(gray[fg], torch.linspace(0, 1, num_classes)[1:-1])
        label[fg] = 1 + torch.bucketize(gray[fg], qs)
    return label[None]


def update_norm(tensors: Iterable[torch.Tensor] | Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of a collection of tensors (a gradient or an update), computed in float64."""
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    return float(torch.sqrt(torch.stack([(v.detach().double() ** 2).sum() for v in values]).sum()))


def build_victim_update(
    model: torch.nn.Module,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    mask: torch.Tensor,
    local_steps: int = 1,
    lr: float = 0.01,
    noise_multiplier: float = 0.0,
    max_grad_norm: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The weight difference a site sends after ``local_steps`` (DP-)SGD steps on one batch.

    Each step clips every per-sample gradient to ``max_grad_norm`` (for one sample, the whole gradient), sums them,
    adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` noise per coordinate, divides by the batch size and takes an
    SGD step: the site's DP-SGD step on a full batch (no Poisson sampling: the attacker audits a known batch). The
    loss must be a mean of per-sample losses (MONAI's Dice/DiceCE with ``batch=False``). ``model`` is untouched.

    Args:
        model: the global model the round starts from.
        loss: the bundle's loss, called as ``loss(logits, mask)``.
        image: victim batch ``(B, C, *spatial)``.
        mask: label maps ``(B, 1, *spatial)`` (whatever ``loss`` expects as target).
        local_steps: number of local steps ``K``.
        lr: local SGD learning rate.
        noise_multiplier: DP-SGD noise multiplier (0 = no noise).
        max_grad_norm: per-sample clipping norm, ``None`` = no clipping.
        generator: random source of the noise (required when ``noise_multiplier > 0``).

    Returns:
        ``{name: local - global}`` for every trainable parameter.

    Example:
        >>> delta = build_victim_update(net, loss, img[None], lbl[None], noise_multiplier=1.0, max_grad_norm=0.5,
        ...                             generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    """
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}.")
    if noise_multiplier < 0:
        raise PrivacyConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    if noise_multiplier > 0 and (max_grad_norm is None or generator is None):
        raise PrivacyConfigError("noise_multiplier > 0 needs both max_grad_norm and an explicit torch.Generator.")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise PrivacyConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}.")
    site = plain_copy(model).train()  # without a DP wrapper's per-sample hooks
    params = {n: p for n, p in site.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    sgd = torch.optim.SGD(list(params.values()), lr=lr)
    if max_grad_norm is None:  # no DP-SGD: plain SGD steps on the batch gradient
        for _ in range(local_steps):
            sgd.zero_grad()
            loss(site(image), mask).backward()
            sgd.step()
    else:
        private = wrap_for_grad_sample(site, "hooks")
        optimizer = BudgetedDPOptimizer(
            sgd,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=int(image.shape[0]),
            loss_reduction="mean",
            generator=generator if generator is not None else torch.Generator(device=image.device),
        )
        for _ in range(local_steps):
            optimizer.zero_grad()
            loss(private(image), mask).backward()
            optimizer.step()
    return {n: (p.detach() - start[n]) for n, p in params.items()}


def load_victim(
    image_path: str | Path,
    label_path: str | Path | None,
    num_classes: int,
    pixel_range: tuple[float, float] = (0.0, 1.0),
    slice_index: int | None = None,
    size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Victim image in the pixel range, its label map and where the label came from (``"label"``/``"intensity"``).

    Raises:
        DataError: the label's grid differs from the image's (they would be resized apart silently), or its values
            fall outside the network's classes.
    """
    volume = _read_volume(Path(image_path))  # each file read once
    labels = _read_volume(Path(label_path)) if label_path else None
    if labels is not None and labels.shape != volume.shape:
        raise DataError(
            f"victim image {str(image_path)!r} has shape {volume.shape} but its label {str(label_path)!r} has shape "
            f"{labels.shape}; they must be on one grid."
        )
    lo, hi = pixel_range
    image = lo + (hi - lo) * _image_tensor(_slice(volume, slice_index, Path(image_path)), size, image_path)
    if labels is not None:
        label = _label_tensor(_slice(labels, slice_index, Path(str(label_path))), size)
        if int(label.max()) >= num_classes or int(label.min()) < 0:
            raise DataError(f"victim label {str(label_path)!r} has values outside [0, {num_classes - 1}].")
        return image, label, "label"
    return image, intensity_label((image - lo) / (hi - lo), num_classes), "intensity"
