"""Default data set: 2D brain-tissue segmentation (background / grey matter / white matter) on real anatomy.

Built offline from the MNI ICBM152 2009a nonlinear symmetric template and its grey/white-matter probability maps
(Fonov et al., NeuroImage 2011) shipped inside the nilearn wheel. Each "patient" is one axial slice through the
basal ganglia and lateral ventricles, resampled through a random affine and a smooth elastic deformation (applied
identically to the T1 image and the tissue maps). Each site has its own acquisition: gamma contrast, intensity scale,
a smooth multiplicative bias field, Rician noise and an effective resolution (down- then up-sampling). See
``docs/data.md`` for what this data can and cannot show.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from monai_fedpriv.errors import DataError

__all__ = [
    "build_brain_tissue_2d",
    "ensure_default_data",
    "site_acquisition",
    "BRAIN_TISSUE_LABELS",
    "DEFAULT_DATA_ENV",
    "ACQUISITION_RANGES",
]

BRAIN_TISSUE_LABELS = {0: "background", 1: "grey matter", 2: "white matter"}
DEFAULT_DATA_ENV = "MONAI_FEDPRIV_DATA"
FORMAT_VERSION = 2
FOV_MM = 224.0  # square field of view; one pixel = FOV_MM / image_size mm (template spacing 1 mm x resample factor)
CENTER_MM = (0.0, -18.0)  # MNI (x, y) at the image centre
Z_RANGE_MM = (-6.0, 26.0)  # axial levels from the basal ganglia to the top of the lateral ventricles
LABEL_THRESHOLD = 0.35  # background where both tissue probabilities are below this
#: Per-site acquisition ranges; with N sites each parameter takes N evenly spaced values, assigned to sites by an
#: independent seeded permutation per parameter.
ACQUISITION_RANGES = {
    "gamma": (0.5, 2.2),  # intensity ** gamma: grey/white contrast from flat to strong
    "scale": (0.7, 1.4),  # global intensity scale
    "bias": (0.15, 0.6),  # max |log| of the multiplicative bias field
    "noise": (0.01, 0.08),  # Rician noise sigma, relative to the unscaled white-matter intensity
    "resolution": (1.0, 2.2),  # effective pixel size / nominal pixel size
}
_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the default brain-tissue data set is built from templates shipped with nilearn: pip install nilearn"
        )
    return Path(spec.origin).parent / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray]:
    """(3, X, Y, Z) float32 stack of T1 / GM / WM in [0, 1], cropped to the slab used, and its world->voxel matrix."""
    import nibabel as nib

    data_dir = _nilearn_data_dir()
    vols = []
    affine = None
    for key in ("t1", "gm", "wm"):
        path = data_dir / _FILES[key]
        if not path.is_file():
            raise DataError(f"nilearn template file {path} is missing; reinstall nilearn (pip install nilearn)")
        img: Any = nib.load(str(path))
        affine = img.affine if affine is None else affine
        vols.append(np.asarray(img.dataobj))
    assert affine is not None
    inv = np.linalg.inv(affine)
    k_lo = int(np.floor((inv @ [0, 0, Z_RANGE_MM[0] - 30.0, 1])[2]))
    k_hi = int(np.ceil((inv @ [0, 0, Z_RANGE_MM[1] + 30.0, 1])[2]))
    stack = np.stack([v[:, :, k_lo : k_hi + 1] for v in vols]).astype(np.float32) / 255.0
    shift = np.eye(4)
    shift[2, 3] = -k_lo
    return stack, shift @ inv


def site_acquisition(n_sites: int, seed: int) -> dict[str, dict[str, float]]:
    """Acquisition parameters of each site (see :data:`ACQUISITION_RANGES`).

    Also holds four bias-field polynomial coefficients per site (``bias_coef``), fixed per site.

    Example:
        >>> sorted(site_acquisition(3, seed=0)["site-1"])
        ['bias', 'bias_coef', 'gamma', 'noise', 'resolution', 'scale']
    """
    rng = np.random.default_rng([seed, 1_000_003])
    out: dict[str, dict] = {f"site-{k + 1}": {} for k in range(n_sites)}
    for name, (lo, hi) in ACQUISITION_RANGES.items():
        grid = np.linspace(lo, hi, n_sites) if n_sites > 1 else np.array([(lo + hi) / 2])
        for k, v in enumerate(grid[rng.permutation(n_sites)]):
            out[f"site-{k + 1}"][name] = round(float(v), 6)
    for k in range(n_sites):
        coef = rng.normal(size=4)
        out[f"site-{k + 1}"]["bias_coef"] = [round(float(c), 6) for c in coef / np.abs(coef).sum()]
    return out


def _rotation(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _make_case(rng: np.random.Generator, acq: dict, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    from scipy import ndimage

    stack, world_to_vox = _templates()
    spacing = FOV_MM / n
    axis = (np.arange(n) - (n - 1) / 2.0) * spacing
    u, v = np.meshgrid(axis, axis, indexing="ij")  # u along x (right), v along y (anterior)
    # Smooth elastic displacement: 6x6 control grid, sigma 4 mm, cubic upsampling.
    coarse = rng.normal(0.0, 4.0, size=(2, 6, 6))
    disp = np.stack([ndimage.zoom(c, n / 6.0, order=3, grid_mode=True, mode="nearest") for c in coarse])
    theta = rng.uniform(-15.0, 15.0)
    scale = rng.uniform(0.9, 1.1) * (1.0 + rng.uniform(-0.05, 0.05, size=2))
    shift = rng.uniform(-8.0, 8.0, size=2)
    tilt = _rotation(0, rng.uniform(-6.0, 6.0)) @ _rotation(1, rng.uniform(-6.0, 6.0))
    z0 = rng.uniform(*Z_RANGE_MM)
    plane = np.stack([u + disp[0], v + disp[1]]).reshape(2, -1)
    plane = _rotation(2, theta)[:2, :2] @ (plane / scale[:, None]) + shift[:, None]
    world = tilt @ np.vstack([plane, np.zeros((1, plane.shape[1]))]) + np.array([[CENTER_MM[0]], [CENTER_MM[1]], [z0]])
    vox = world_to_vox[:3, :3] @ world + world_to_vox[:3, 3:]
    t1, gm, wm = (
        ndimage.map_coordinates(vol, vox, order=1, cval=0.0, output=np.float32).reshape(n, n) for vol in stack
    )
    label = np.where(np.maximum(gm, wm) < LABEL_THRESHOLD, 0, np.where(wm > gm, 2, 1)).astype(np.uint8)

    # Site acquisition: gamma contrast, bias field (site pattern + small per-case jitter), resolution, scale, noise.
    img = np.clip(t1, 0.0, None) ** acq["gamma"]
    x, y = u / (FOV_MM / 2), v / (FOV_MM / 2)
    coef = np.asarray(acq["bias_coef"]) + rng.normal(0.0, 0.1, size=4)
    poly = coef[0] * x + coef[1] * y + coef[2] * x * y + coef[3] * (x**2 + y**2 - 0.5)
    img = img * np.exp(acq["bias"] * poly / max(np.abs(coef).sum(), 1e-6))
    factor = acq["resolution"]
    if factor > 1.0 + 1e-6:
        m = max(8, int(round(n / factor)))
        low = ndimage.zoom(ndimage.gaussian_filter(img, 0.4 * factor), m / n, order=1, grid_mode=True, mode="nearest")
        img = ndimage.zoom(low, n / m, order=1, grid_mode=True, mode="nearest")[:n, :n]
    sigma = acq["noise"]
    img = np.sqrt((img + rng.normal(0.0, sigma, img.shape)) ** 2 + rng.normal(0.0, sigma, img.shape) ** 2)
    img = (img * acq["scale"]).astype(np.float32)
    brain = int((label > 0).sum())
    feature = float((label == 2).sum() / brain) if brain else 0.0
    return img, label, feature


def _affine(n: int) -> np.ndarray:
    sp = FOV_MM / n
    aff = np.diag([sp, sp, sp, 1.0])
    aff[:2, 3] = [CENTER_MM[0] - (n - 1) / 2 * sp, CENTER_MM[1] - (n - 1) / 2 * sp]
    return aff


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _params(n_sites, cases_per_site, val_per_site, image_size, seed) -> dict:
    for name, value, lo in (
        ("n_sites", n_sites, 1),
        ("cases_per_site", cases_per_site, 1),
        ("val_per_site", val_per_site, 0),
        ("image_size", image_size, 16),
    ):
        if not isinstance(value, int | np.integer) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return {
        "format_version": FORMAT_VERSION,
        "n_sites": int(n_sites),
        "cases_per_site": int(cases_per_site),
        "val_per_site": int(val_per_site),
        "image_size": int(image_size),
        "seed": int(seed),
        # Generator settings are part of the identity, so a build from other settings is never reused.
        "fov_mm": FOV_MM,
        "center_mm": list(CENTER_MM),
        "z_range_mm": list(Z_RANGE_MM),
        "label_threshold": LABEL_THRESHOLD,
        "acquisition_ranges": {k: list(v) for k, v in ACQUISITION_RANGES.items()},
    }


_OWN_ENTRIES = ("imagesTr", "labelsTr", "dataset.json", "build_info.json")


def _existing_params(out_dir: Path) -> dict | None:
    info = out_dir / "build_info.json"
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("params")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise DataError(f"cannot read {info}: {exc}; pass overwrite=True to rebuild") from exc


def _write_dataset(tmp: Path, params: dict) -> None:
    n, seed = params["image_size"], params["seed"]
    (tmp / "imagesTr").mkdir()
    (tmp / "labelsTr").mkdir()
    acquisition = site_acquisition(params["n_sites"], seed)
    affine = _affine(n)
    sections: dict[str, list] = {"training": [], "validation": []}
    for s in range(params["n_sites"]):
        site = f"site-{s + 1}"
        for j in range(params["cases_per_site"] + params["val_per_site"]):
            rng = np.random.default_rng([seed, s, j])
            img, label, feature = _make_case(rng, acquisition[site], n)
            stem = f"site{s + 1}_{j:03d}"
            _save(img, affine, tmp / "imagesTr" / f"{stem}.nii.gz")
            _save(label, affine, tmp / "labelsTr" / f"{stem}.nii.gz")
            split = "train" if j < params["cases_per_site"] else "val"
            sections["training" if split == "train" else "validation"].append(
                {
                    "image": f"./imagesTr/{stem}.nii.gz",
                    "label": f"./labelsTr/{stem}.nii.gz",
                    "patient": stem,
                    "institution": site,
                    "split": split,
                    "feature": round(feature, 6),
                }
            )
    meta = {
        "name": "BrainTissue2D",
        "description": "2D grey/white-matter segmentation from the MNI ICBM152 2009a template with synthetic "
        "per-site acquisition shifts (monai_fedpriv default data; see docs/data.md)",
        "reference": "Fonov et al., NeuroImage 54(1), 2011; template files shipped with nilearn",
        "tensorImageSize": "2D",
        "modality": {"0": "T1w"},
        "labels": {str(k): v for k, v in BRAIN_TISSUE_LABELS.items()},
        "numTraining": len(sections["training"]),
        "numValidation": len(sections["validation"]),
        "training": sections["training"],
        "validation": sections["validation"],
        "test": [],
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    info = {
        "generator": "monai_fedpriv.data.brain_tissue.build_brain_tissue_2d",
        "params": params,
        "spacing_mm": FOV_MM / n,
        "site_acquisition": acquisition,
    }
    (tmp / "build_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def build_brain_tissue_2d(
    out_dir: str | Path,
    n_sites: int = 3,
    cases_per_site: int = 40,
    val_per_site: int = 10,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build (or find) the 2D brain-tissue data set in MSD layout.

    ``dataset.json`` has a ``training`` section (``cases_per_site`` items per site) and a ``validation`` section
    (``val_per_site`` per site); every item has ``image``, ``label``, ``patient``, ``institution`` (``"site-k"``),
    ``split`` (``"train"``/``"val"``) and ``feature`` (white-matter fraction of the brain in the label). Images are
    float32 and labels uint8, 2D NIfTI of shape ``(image_size, image_size)`` with ``FOV_MM / image_size`` mm pixels.
    The output is deterministic (same bytes) for the same arguments.

    Args:
        out_dir: target folder. If it already holds a build with the same parameters (and generator settings) it is
            returned as is, unless ``overwrite``.
        n_sites: number of sites (acquisition protocols).
        cases_per_site: training cases per site.
        val_per_site: validation cases per site.
        image_size: image side in pixels.
        seed: seed of every random draw.
        overwrite: rebuild even if ``out_dir`` holds a data set (only the files this function writes are removed).

    Raises:
        DataError: ``out_dir`` holds a different or foreign data set and ``overwrite`` is False.
        ImportError: nilearn is not installed.

    Example:
        >>> root = build_brain_tissue_2d("/tmp/bt2d", n_sites=3, cases_per_site=8, val_per_site=2)  # doctest: +SKIP
        >>> cases = load_msd_datalist(root, check=True)  # doctest: +SKIP
    """
    params = _params(n_sites, cases_per_site, val_per_site, image_size, seed)
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError(f"{out_dir} exists and is not a directory")
        existing = _existing_params(out_dir)
        if existing == params and (out_dir / "dataset.json").is_file() and not overwrite:
            return out_dir
        if not overwrite:
            if existing is not None:
                raise DataError(f"{out_dir} holds a data set built with {existing}, not {params}; pass overwrite=True")
            if any(out_dir.iterdir()):
                raise DataError(
                    f"{out_dir} is not empty and holds no build_info.json; pass overwrite=True or pick another folder"
                )
    _nilearn_data_dir()  # fail early with the install hint
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        _write_dataset(tmp, params)
        if out_dir.exists():
            for name in _OWN_ENTRIES:
                target = out_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            if not any(out_dir.iterdir()):
                out_dir.rmdir()
        if not out_dir.exists():
            try:
                os.rename(tmp, out_dir)
            except OSError:
                # Another process finished the same build first: accept it if it matches.
                if _existing_params(out_dir) == params:
                    return out_dir
                raise
        else:
            for name in _OWN_ENTRIES:  # build_info.json last: a complete build is marked only once all is there
                os.rename(tmp / name, out_dir / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_default_data(root: str | Path | None = None) -> Path:
    """Find or build the default data set (3 sites, 40 train + 10 validation cases each, 64x64, seed 0).

    Args:
        root: target folder; default ``$MONAI_FEDPRIV_DATA`` or ``~/.cache/monai_fedpriv/brain_tissue_2d``.

    Raises:
        ImportError: nilearn is not installed (``pip install nilearn``).

    Example:
        >>> root = ensure_default_data()  # doctest: +SKIP
    """
    _nilearn_data_dir()  # raises ImportError("... pip install nilearn") without importing nilearn
    if root is None:
        root = os.environ.get(DEFAULT_DATA_ENV) or Path.home() / ".cache" / "monai_fedpriv" / "brain_tissue_2d"
    root = Path(root).expanduser().resolve()
    # a build of ours from an older generator version (or other parameters) is replaced, never anything else
    existing = _existing_params(root) if root.is_dir() else None
    stale = existing is not None and existing != _params(3, 40, 10, 64, 0)
    return build_brain_tissue_2d(root, overwrite=stale)
