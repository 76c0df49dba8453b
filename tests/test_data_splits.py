"""Train/validation splits by patient and per site: patients never straddle, seeds, minimums and plain errors."""

from __future__ import annotations

import pytest

from monai_fedpriv.data.splits import site_train_val_split, split_validation_by_patient
from monai_fedpriv.errors import DataError


def _cases(n_patients: int, per_patient: int = 2, prefix: str = "p") -> list[dict]:
    return [
        {"patient": f"{prefix}{p}", "image": f"{prefix}{p}_{k}.nii.gz"}
        for p in range(n_patients)
        for k in range(per_patient)
    ]


def _patients(cases: list[dict]) -> set[str]:
    return {c["patient"] for c in cases}


def test_patients_are_the_unit():
    cases = _cases(10, per_patient=3)
    train, val = split_validation_by_patient(cases, 0.3, seed=1)
    assert len(_patients(val)) == 3 and len(_patients(train)) == 7
    assert not _patients(train) & _patients(val)
    assert len(train) + len(val) == len(cases) == 30  # every case of a held-out patient is held out
    assert {c["split"] for c in train} == {"train"} and {c["split"] for c in val} == {"val"}
    order = [c["image"] for c in cases]
    assert [c["image"] for c in train] == [x for x in order if x in {c["image"] for c in train}]  # input order kept
    assert "split" not in cases[0]  # inputs are not modified


def test_seeded_and_reproducible():
    cases = _cases(12)
    first = split_validation_by_patient(cases, 0.25, seed=5)
    assert split_validation_by_patient(cases, 0.25, seed=5) == first
    draws = {frozenset(_patients(split_validation_by_patient(cases, 0.25, seed=s)[1])) for s in range(8)}
    assert len(draws) > 1  # the seed matters


def test_cases_without_patient_are_their_own_patient():
    cases = [{"image": f"{i}.nii.gz"} for i in range(4)]
    train, val = split_validation_by_patient(cases, 0.5, seed=0)
    assert (len(train), len(val)) == (2, 2)


def test_zero_fraction_means_no_validation():
    cases = _cases(1)
    train, val = split_validation_by_patient(cases, 0.0, seed=0)
    assert val == [] and len(train) == 2


def test_minimums():
    _, val = split_validation_by_patient(_cases(10), 0.01, seed=0)  # rounds to 0, raised to min_val
    assert len(_patients(val)) == 1
    train, val = split_validation_by_patient(_cases(3), 0.9, seed=0)  # rounds to 3, capped by min_train
    assert (len(_patients(train)), len(_patients(val))) == (1, 2)
    _, val = split_validation_by_patient(_cases(10), 0.1, seed=0, min_val=3)
    assert len(_patients(val)) == 3


def test_too_few_patients_says_why():
    with pytest.raises(DataError) as err:
        split_validation_by_patient(_cases(1), 0.2, seed=0, name="site-2")
    assert str(err.value) == (
        "site-2 has 1 patient: cannot keep 1 for training and 1 for validation; use fewer sites or --val-fraction 0"
    )


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation_by_patient(_cases(4), fraction, seed=0)


def test_sites_split_independently_and_stably():
    sites = {"site-1": _cases(6, prefix="a"), "site-2": _cases(6, prefix="a")}  # same patient names on purpose
    train, val = site_train_val_split(sites, 1 / 3, seed=0)
    assert set(train) == set(val) == {"site-1", "site-2"}
    for name in sites:
        assert len(_patients(val[name])) == 2 and not _patients(train[name]) & _patients(val[name])
    # the site name is mixed into the seed: identical sites do not get identical splits for every run seed
    assert any(
        _patients(site_train_val_split(sites, 1 / 3, seed=s)[1]["site-1"])
        != _patients(site_train_val_split(sites, 1 / 3, seed=s)[1]["site-2"])
        for s in range(6)
    )
    # adding a site does not change the others' splits
    _, val3 = site_train_val_split({**sites, "site-3": _cases(5, prefix="c")}, 1 / 3, seed=0)
    assert val3["site-1"] == val["site-1"] and val3["site-2"] == val["site-2"]


def test_site_errors_name_every_small_site():
    sites = {"site-1": _cases(5), "site-2": _cases(1), "site-3": _cases(1, per_patient=4)}
    with pytest.raises(DataError) as err:
        site_train_val_split(sites, 0.2, seed=0)
    msg = str(err.value)
    assert "2 of 3 sites" in msg and "site-2 has 1 patient" in msg and "site-3 has 1 patient" in msg
    assert "site-1" not in msg
    train, val = site_train_val_split(sites, 0.0, seed=0)  # no validation: every site keeps all its cases
    assert all(v == [] for v in val.values()) and [len(t) for t in train.values()] == [10, 2, 4]
