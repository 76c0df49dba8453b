"""Site partitions: patients and institutions kept whole, imbalance, skew strength measured by mean pairwise KS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monai_fedpriv.data import Partition, mean_pairwise_ks, partition_cases
from monai_fedpriv.errors import DataError


def _cases(n_patients=60, per_patient=2, seed=0, n_inst=5):
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        base = rng.beta(2, 5)  # skewed, continuous: a realistic "fraction" feature
        for k in range(per_patient):
            out.append(
                {
                    "patient": f"p{p:03d}",
                    "institution": f"inst-{p % n_inst + 1}" if p % 7 else "inst-1",
                    "feature": float(base + 0.01 * k),
                    "id": f"p{p:03d}-{k}",
                }
            )
    return out


def _ids(partition):
    return sorted(c["id"] for cases in partition.sites.values() for c in cases)


def _patient_sites(partition):
    where = {}
    for site, cases in partition.sites.items():
        for c in cases:
            where.setdefault(c["patient"], set()).add(site)
    return where


def test_mean_pairwise_ks_values():
    assert mean_pairwise_ks([[1, 2, 3], [1, 2, 3]]) == 0.0
    assert mean_pairwise_ks([[0, 1], [5, 6], [10, 11]]) == 1.0
    assert mean_pairwise_ks([[0, 1, 2, 3], [2, 3, 4, 5]]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_pairwise_ks([[1.0]])


def test_unknown_scheme_lists_valid():
    with pytest.raises(ValueError, match="skew-high"):
        partition_cases(_cases(), 3, "dirichlet", seed=0)


def test_iid_keeps_patients_whole_and_covers_all():
    cases = _cases()
    p = partition_cases(cases, 4, "iid", seed=3)
    assert _ids(p) == sorted(c["id"] for c in cases)
    assert all(len(s) == 1 for s in _patient_sites(p).values())
    assert set(p.sizes().values()) == {30}
    assert p.mean_ks is not None and p.mean_ks < 0.5


def test_deterministic_and_seed_dependent():
    a = partition_cases(_cases(), 3, "iid", seed=1)
    b = partition_cases(_cases(), 3, "iid", seed=1)
    c = partition_cases(_cases(), 3, "iid", seed=2)
    assert a.to_json() == b.to_json() and a.to_json() != c.to_json()


def test_quantity_is_imbalanced():
    cases = _cases(n_patients=242, per_patient=1)
    p = partition_cases(cases, 13, "quantity", seed=0)
    sizes = list(p.sizes().values())
    assert sum(sizes) == 242 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] >= 8 * sizes[-1]
    assert all(len(s) == 1 for s in _patient_sites(partition_cases(_cases(), 5, "quantity", seed=0)).values())


def test_institution_one_site_each_and_grouped():
    cases = _cases()
    p = partition_cases(cases, None, "institution", seed=0)
    assert p.site_institutions == {f"site-{k}": [f"inst-{k}"] for k in range(1, 6)}
    assert all({c["institution"] for c in p.sites[s]} == {f"inst-{s[5:]}"} for s in p.sites)
    g = partition_cases(cases, 2, "institution", seed=0)
    assert _ids(g) == _ids(p)
    grouped = [set(v) for v in g.site_institutions.values()]
    assert set().union(*grouped) == {f"inst-{k}" for k in range(1, 6)} and not grouped[0] & grouped[1]
    for site, cases_ in g.sites.items():
        assert {c["institution"] for c in cases_} == set(g.site_institutions[site])


def test_institution_more_sites_than_institutions():
    with pytest.raises(DataError, match="site-6"):
        partition_cases(_cases(), 6, "institution", seed=0)


def test_empty_site_raises_naming_site():
    with pytest.raises(DataError, match="site-5 received 0 cases"):
        partition_cases(_cases(n_patients=4), 5, "iid", seed=0)
    with pytest.raises(DataError, match="site-"):
        partition_cases(_cases(n_patients=12), 3, "iid", seed=0, min_per_site=10)


def test_skew_needs_feature():
    cases = [{"patient": f"p{i}"} for i in range(9)]
    with pytest.raises(DataError, match="'feature'"):
        partition_cases(cases, 3, "skew-mid", seed=0)
    p = partition_cases(cases, 3, "iid", seed=0)
    assert p.mean_ks is None
    q = partition_cases(cases, 3, "skew-high", seed=0, feature=lambda c: int(c["patient"][1:]))
    assert q.mean_ks == 1.0


@pytest.mark.parametrize("n_sites", [3, 4])
def test_skew_strength_orders_ks(n_sites):
    ks = {s: [] for s in ("iid", "skew-low", "skew-mid", "skew-high")}
    for seed in range(8):
        cases = _cases(n_patients=120, per_patient=1, seed=seed)
        for scheme in ks:
            p = partition_cases(cases, n_sites, scheme, seed=seed)
            assert all(len(s) == 1 for s in _patient_sites(p).values())
            ks[scheme].append(p.mean_ks)
    means = {s: float(np.mean(v)) for s, v in ks.items()}
    assert means["iid"] < means["skew-low"] < means["skew-mid"] < means["skew-high"]
    assert means["skew-mid"] - means["skew-low"] > 0.15 and means["skew-high"] - means["skew-mid"] > 0.15
    # per seed too, not only on average
    assert all(lo < mid < hi for lo, mid, hi in zip(ks["skew-low"], ks["skew-mid"], ks["skew-high"], strict=True))


def test_feature_key_name_and_json_roundtrip():
    cases = [{"patient": f"p{i}", "wm": i / 10} for i in range(12)]
    p = partition_cases(cases, 3, "skew-high", seed=0, feature="wm")
    assert p.mean_ks == 1.0
    assert [c["wm"] for c in p.sites["site-1"]] == [0.0, 0.1, 0.2, 0.3]
    q = Partition.from_json(p.to_json())
    assert q.sites == p.sites and q.scheme == "skew-high" and q.mean_ks == 1.0
    assert json.loads(p.to_json())["sizes"] == {"site-1": 4, "site-2": 4, "site-3": 4}


def test_bad_n_sites():
    with pytest.raises(ValueError, match="n_sites"):
        partition_cases(_cases(), 0, "iid", seed=0)
    with pytest.raises(ValueError, match="n_sites=None"):
        partition_cases(_cases(), None, "iid", seed=0)
