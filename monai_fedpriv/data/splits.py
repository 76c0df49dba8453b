"""Train/validation splits by patient, per federated site.

Standard MSD and BraTS training releases have no validation section, so each site holds out some of its own patients.
Patients (``case["patient"]``; a case without one is its own patient) are the unit: all cases of one patient land on
the same side, so no patient is trained on and validated on. All randomness comes from
``numpy.random.default_rng``; a site's draw depends only on the seed, the site name and its data list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from monai_fedpriv.data.stream import derive_seed
from monai_fedpriv.errors import DataError, PrivacyConfigError

__all__ = ["check_patients_at_one_site", "split_validation_by_patient", "site_train_val_split"]


def _patients(cases: Sequence[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(str(case.get("patient", f"__case{i}")), []).append(i)
    return groups  # first-appearance order


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def split_validation_by_patient(
    cases: Sequence[dict],
    val_fraction: float,
    seed: int,
    min_val: int = 1,
    min_train: int = 1,
    name: str = "the data list",
) -> tuple[list[dict], list[dict]]:
    """Hold out ``round(val_fraction * n_patients)`` patients for validation (at least ``min_val``, leaving at least
    ``min_train`` for training).

    Returned cases are shallow copies with ``"split"`` set to ``"train"`` or ``"val"`` (the key bundles filter on),
    in their input order. ``val_fraction=0`` means no validation split: every case is returned as training.

    Args:
        cases: data list items (``patient`` key read when present).
        val_fraction: fraction of patients held out, in ``[0, 1)``.
        seed: seed of ``numpy.random.default_rng``.
        min_val: fewest validation patients when ``val_fraction > 0``.
        min_train: fewest training patients.
        name: what the data list is (e.g. ``"site-2"``), for error messages.

    Returns:
        ``(train, val)``.

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)`` or negative minimums.
        DataError: too few patients to keep ``min_train`` for training and ``min_val`` for validation.

    Example:
        >>> cases = [{"patient": f"p{i // 2}", "image": f"{i}.nii.gz"} for i in range(8)]
        >>> train, val = split_validation_by_patient(cases, 0.25, seed=0)
        >>> len({c["patient"] for c in val}), {c["patient"] for c in train} & {c["patient"] for c in val}
        (1, set())
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if min_val < 0 or min_train < 0:
        raise ValueError(f"min_val and min_train must be >= 0, got min_val={min_val}, min_train={min_train}")
    patients = _patients(cases)
    n = len(patients)
    if val_fraction == 0:
        if n < min_train:
            raise DataError(f"{name} has {_plural(n, 'patient')}: cannot keep {min_train} for training")
        return [{**c, "split": "train"} for c in cases], []
    if n < min_val + min_train:
        raise DataError(
            f"{name} has {_plural(n, 'patient')}: cannot keep {min_train} for training and {min_val} for "
            f"validation; use fewer sites or --val-fraction 0"
        )
    n_val = min(max(int(round(val_fraction * n)), min_val), n - min_train)
    names = list(patients)
    rng = np.random.default_rng(seed)
    held_out = {names[int(j)] for j in rng.permutation(n)[:n_val]}
    val_idx = {i for p in held_out for i in patients[p]}
    train = [{**c, "split": "train"} for i, c in enumerate(cases) if i not in val_idx]
    val = [{**c, "split": "val"} for i, c in enumerate(cases) if i in val_idx]
    return train, val


def site_train_val_split(
    sites: Mapping[str, Sequence[dict]],
    val_fraction: float,
    seed: int,
    min_val: int = 1,
    min_train: int = 1,
) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Split every site's cases by patient (:func:`split_validation_by_patient`), with seed
    ``derive_seed(seed, "val-split", site)`` so that a site's split does not change when other sites are added.

    Args:
        sites: ``{site name: cases}``, e.g. ``Partition.sites``.
        val_fraction: fraction of each site's patients held out, in ``[0, 1)``; 0 = no validation split.
        seed: run seed.
        min_val: fewest validation patients per site (when ``val_fraction > 0``).
        min_train: fewest training patients per site.

    Returns:
        ``(train_sites, val_sites)``, both keyed like ``sites``.

    Raises:
        DataError: one error listing every site that is too small, with its number of patients.

    Example:
        >>> sites = {"site-1": [{"patient": f"a{i}"} for i in range(4)], "site-2": [{"patient": "b0"}]}
        >>> site_train_val_split(sites, 0.25, seed=0)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        DataError: site-2 has 1 patient: cannot keep 1 for training and 1 for validation; ...
    """
    train: dict[str, list[dict]] = {}
    val: dict[str, list[dict]] = {}
    errors = []
    for site, cases in sites.items():
        try:
            train[site], val[site] = split_validation_by_patient(
                cases, val_fraction, derive_seed(seed, "val-split", site), min_val, min_train, name=site
            )
        except DataError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise DataError(errors[0])
    if errors:
        raise DataError(
            f"{len(errors)} of {len(sites)} sites are too small to split:\n" + "\n".join(f"  - {e}" for e in errors)
        )
    return train, val


def check_patients_at_one_site(train_sites: Mapping[str, Sequence[Mapping]]) -> None:
    """Refuse patient-level DP over a split that puts one patient's cases at several sites: each site's epsilon
    would then cover only part of that patient.

    Raises:
        PrivacyConfigError: a training case without ``patient``, or patients split across sites (up to 3 named).
    """
    where: dict[str, set[str]] = {}
    for name, cases in train_sites.items():
        for case in cases:
            if "patient" not in case:
                raise PrivacyConfigError(f"privacy unit 'patient': a training case of {name} has no 'patient'.")
            where.setdefault(str(case["patient"]), set()).add(name)
    split = {p: sorted(s) for p, s in where.items() if len(s) > 1}
    if split:
        example = ", ".join(f"{p} at {s}" for p, s in list(split.items())[:3])
        raise PrivacyConfigError(
            f"privacy unit 'patient' but {len(split)} patients are split across sites ({example}): each site's "
            f"epsilon would cover only part of a patient. Keep each patient at one site."
        )
