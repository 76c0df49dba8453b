"""Image readers returning ``(array, affine)`` in nibabel's RAS+ world convention.

NIfTI files are read with nibabel. NRRD, MetaImage (``.mha``/``.mhd``), single DICOM files and DICOM series (a
directory) are read with SimpleITK, whose geometry is LPS+ with arrays in ``(z, y, x)`` order; the reader transposes
the array to ``(x, y, z)`` and builds the 4x4 RAS affine ``diag(-1, -1, 1, 1) @ [[D * spacing, origin], [0, 1]]``,
which is exactly the affine nibabel reports for the same data saved as NIfTI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from monai_fedpriv.errors import DataError

__all__ = ["read_image", "image_stem", "NIFTI_SUFFIXES", "SITK_SUFFIXES"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_stem(path: str | Path) -> str:
    """File name without its image suffix (``x.nii.gz`` -> ``x``, ``y.nrrd`` -> ``y``, a directory -> its name)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + SITK_SUFFIXES + (".gz",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an image file or DICOM series.

    Args:
        path: a ``.nii``/``.nii.gz`` file (nibabel), a ``.nrrd``/``.nhdr``/``.mha``/``.mhd``/``.dcm`` file or a
            directory holding one DICOM series (SimpleITK). Other suffixes are tried with SimpleITK.

    Returns:
        ``(array, affine)``: the voxel array with spatial axes in ``(x, y, z)`` order (components, if any, last) and
        the 4x4 float64 voxel-to-RAS affine.

    Raises:
        DataError: the path does not exist, or the reader failed (the message names the path and the reader's error).

    Example:
        >>> arr, affine = read_image("imagesTr/case_001.nii.gz")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"image file {path} does not exist")
    if path.is_dir():
        return _read_dicom_series(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    return _read_sitk_file(path)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))
        # Reading the data (not only the header) is what exposes truncated or corrupt gzip streams.
        arr = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError, ...)
        raise DataError(f"cannot read NIfTI file {path}: {type(exc).__name__}: {exc}") from exc
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"NIfTI file {path} has no valid 4x4 affine (got {affine.tolist()})")
    return np.asarray(arr), affine


def _sitk_to_numpy(image) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    dim = image.GetDimension()
    arr = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) for a 3D image
    spatial = tuple(range(dim))[::-1]
    extra = tuple(range(dim, arr.ndim))
    arr = np.transpose(arr, spatial + extra)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    n = min(dim, 3)
    lps[:n, :n] = direction[:n, :n] * spacing[:n][None, :]
    lps[:n, 3] = origin[:n]
    return arr, _LPS_TO_RAS @ lps


def _read_sitk_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
        return _sitk_to_numpy(image)
    except Exception as exc:  # SimpleITK raises RuntimeError with the ITK message
        msg = " ".join(str(exc).split())
        raise DataError(f"cannot read image file {path} with SimpleITK: {type(exc).__name__}: {msg}") from exc


def _read_dicom_series(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    except Exception as exc:
        raise DataError(f"cannot list DICOM series in directory {path}: {exc}") from exc
    if not series:
        raise DataError(f"directory {path} holds no DICOM series")
    if len(series) > 1:
        raise DataError(f"directory {path} holds {len(series)} DICOM series {list(series)}; expected exactly one")
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
        return _sitk_to_numpy(reader.Execute())
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise DataError(f"cannot read DICOM series in {path}: {type(exc).__name__}: {msg}") from exc
