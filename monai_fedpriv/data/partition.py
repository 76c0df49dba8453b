"""Split a data list into federated sites: IID, by institution, by quantity, or with feature (label) skew.

Skew is measured as in Qu et al. (seed paper 004, sec. 5 "Data Partitions"): the mean, over all pairs of sites, of
the two-sample Kolmogorov-Smirnov statistic of a per-case scalar (0 = identical distributions, 1 = disjoint).
All randomness comes from ``numpy.random.default_rng(seed)``. Items of one patient always go to the same site.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from monai_fedpriv.errors import DataError
from monai_fedpriv.utils.files import json_safe

__all__ = ["Partition", "partition_cases", "mean_pairwise_ks", "SCHEMES", "SKEW_SORTED_FRACTION", "QUANTITY_EXPONENT"]

#: Fraction of patients kept in feature order for each skew level; the rest are shuffled among their positions.
SKEW_SORTED_FRACTION = {"skew-low": 0.25, "skew-mid": 0.6, "skew-high": 1.0}
#: Site k (1-based) of the ``quantity`` scheme gets a share proportional to ``k ** -QUANTITY_EXPONENT``.
QUANTITY_EXPONENT = 1.0
SCHEMES = ("iid", "institution", "quantity", *SKEW_SORTED_FRACTION)


def mean_pairwise_ks(groups: Sequence[Sequence[float] | np.ndarray]) -> float:
    """Mean two-sample Kolmogorov-Smirnov statistic over all pairs of groups (Qu et al., seed 004).

    Args:
        groups: one sequence of scalar values per site (at least two non-empty groups).

    Example:
        >>> mean_pairwise_ks([[0.1, 0.2, 0.3], [0.7, 0.8, 0.9]])
        1.0
    """
    from scipy.stats import ks_2samp

    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if len(arrays) < 2:
        raise ValueError(f"mean_pairwise_ks needs at least two groups, got {len(arrays)}")
    for i, a in enumerate(arrays):
        if a.size == 0:
            raise ValueError(f"mean_pairwise_ks: group {i} is empty")
    stats = [ks_2samp(a, b).statistic for a, b in itertools.combinations(arrays, 2)]
    return float(np.mean(stats))


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass
class Partition:
    """Cases assigned to sites ``site-1`` .. ``site-N``.

    Attributes:
        sites: ``{site name: cases}``.
        scheme: the scheme that produced it.
        seed: the seed used.
        mean_ks: mean pairwise KS statistic of the case feature across sites, or ``None`` without features.
        site_institutions: for the ``institution`` scheme, the institutions grouped on each site.
    """

    sites: dict[str, list[dict]]
    scheme: str
    seed: int | None
    mean_ks: float | None = None
    site_institutions: dict[str, list[str]] | None = field(default=None)

    def sizes(self) -> dict[str, int]:
        """Number of cases per site."""
        return {name: len(cases) for name, cases in self.sites.items()}

    def to_json(self) -> str:
        """Serialise to a JSON string (paths as strings); inverse of :meth:`from_json`."""
        return json.dumps(
            {
                "scheme": self.scheme,
                "seed": self.seed,
                "mean_ks": self.mean_ks,
                "sizes": self.sizes(),
                "site_institutions": self.site_institutions,
                "sites": json_safe(self.sites),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Partition:
        """Rebuild a partition written by :meth:`to_json`."""
        d = json.loads(text)
        return cls(
            sites=d["sites"],
            scheme=d["scheme"],
            seed=d["seed"],
            mean_ks=d.get("mean_ks"),
            site_institutions=d.get("site_institutions"),
        )


def _feature_getter(feature: Callable[[dict], float] | str | None) -> Callable[[dict], float]:
    if callable(feature):
        return feature
    key = "feature" if feature is None else feature

    def get(case: dict) -> float:
        if key not in case:
            raise DataError(f"case {case.get('patient', '?')!r} has no feature key {key!r} (keys: {sorted(case)})")
        return case[key]

    return get


def _features(cases: Sequence[dict], getter: Callable[[dict], float]) -> np.ndarray:
    values = np.array([float(getter(c)) for c in cases], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise DataError(f"case {cases[bad[0]].get('patient', bad[0])!r} has a non-finite feature {values[bad[0]]}")
    return values


def _group_by(cases: Sequence[dict], key: str, default: str | None = None) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(str(case.get(key, f"__case{i}" if default is None else default)), []).append(i)
    return groups


def _split_counts(total: int, weights: np.ndarray, minimum: int) -> np.ndarray:
    """Largest-remainder split of ``total`` into ``len(weights)`` integers, each at least ``minimum``."""
    n = len(weights)
    base = np.full(n, minimum, dtype=int)
    rest = total - base.sum()
    if rest < 0:
        return np.floor(total * weights / weights.sum()).astype(int)  # caller reports the empty/small site
    share = rest * weights / weights.sum()
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: rest - counts.sum()]] += 1
    return base + counts


def partition_cases(
    cases: Sequence[dict],
    n_sites: int | None,
    scheme: str,
    seed: int = 0,
    feature: Callable[[dict], float] | str | None = None,
    min_per_site: int = 1,
) -> Partition:
    """Assign cases to ``n_sites`` sites.

    Schemes (patients, i.e. groups of cases sharing ``case["patient"]``, are the unit of assignment; a case without
    ``"patient"`` is its own patient):

    - ``iid``: shuffle patients, deal them round-robin to the sites.
    - ``institution``: one site per ``case["institution"]`` (``n_sites=None`` or equal to their number; sites in
      natural-sort order of institution names); with fewer sites, institutions are kept whole and packed greedily,
      largest first, onto the site with the fewest cases (ties: lowest site index).
    - ``quantity``: site k (1-based) gets a share of patients proportional to ``k ** -1`` (Zipf), computed by
      largest remainder after giving every site ``min_per_site`` patients; patients are shuffled and dealt in
      contiguous blocks. With 13 sites the largest site holds 13x the smallest, like the BraTS institutions of
      Li et al. (seed 001, Fig. 1).
    - ``skew-low`` / ``skew-mid`` / ``skew-high``: patients sorted by feature (mean over their cases); a random
      ``1 - f`` fraction of the sorted positions (``f`` = 0.25 / 0.6 / 1.0, :data:`SKEW_SORTED_FRACTION`) have
      their patients shuffled among themselves; the order is then cut into ``n_sites`` contiguous blocks of equal
      size (+-1). ``skew-high`` gives site-1 the lowest features and site-N the highest.

    Args:
        cases: data list (dicts; ``patient``, ``institution`` and the feature are read from them).
        n_sites: number of sites (``None`` only for ``institution``: one per institution).
        scheme: one of :data:`SCHEMES`.
        seed: seed of ``numpy.random.default_rng``.
        feature: callable ``case -> float`` or a key name; default key ``"feature"``. Required by skew schemes;
            for the others ``mean_ks`` is computed when every case has the feature, else left ``None``.
        min_per_site: every site must receive at least this many cases.

    Raises:
        ValueError: unknown scheme or bad ``n_sites``.
        DataError: a site ends up with fewer than ``min_per_site`` cases (the message names it), or a missing
            feature under a skew scheme.

    Example:
        >>> cases = [{"patient": f"p{i}", "feature": i / 10} for i in range(12)]
        >>> p = partition_cases(cases, 3, "skew-high", seed=0)
        >>> p.sizes(), p.mean_ks
        ({'site-1': 4, 'site-2': 4, 'site-3': 4}, 1.0)
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {list(SCHEMES)}")
    if n_sites is None and scheme != "institution":
        raise ValueError(f"n_sites=None is only allowed for scheme 'institution', got scheme {scheme!r}")
    if n_sites is not None and (not isinstance(n_sites, int | np.integer) or n_sites < 1):
        raise ValueError(f"n_sites must be a positive integer or None, got {n_sites!r}")
    if min_per_site < 0:
        raise ValueError(f"min_per_site must be >= 0, got {min_per_site}")
    cases = list(cases)
    if not cases:
        raise DataError("partition_cases received an empty data list")
    rng = np.random.default_rng(seed)
    getter = _feature_getter(feature)
    patients = _group_by(cases, "patient")
    names = list(patients)  # first-appearance order, so the result depends only on the data list and the seed
    if scheme == "institution":
        sites, site_institutions = _by_institution(cases, n_sites)
        return _finish(sites, scheme, seed, getter, feature, min_per_site, site_institutions)
    assert n_sites is not None
    n = int(n_sites)
    if scheme == "iid":
        order = rng.permutation(len(names))
        assignment = [order[k::n] for k in range(n)]
    else:
        if scheme == "quantity":
            order = rng.permutation(len(names))
            counts = _split_counts(
                len(names), np.arange(1, n + 1, dtype=np.float64) ** -QUANTITY_EXPONENT, min_per_site
            )
        else:  # skew-*
            values = _features(cases, getter)
            pf = np.array([values[patients[name]].mean() for name in names])
            # Ties broken by a random key so equal features do not follow list order.
            order = np.lexsort((rng.random(len(names)), pf))
            n_mix = int(round((1.0 - SKEW_SORTED_FRACTION[scheme]) * len(names)))
            pos = np.sort(rng.choice(len(names), size=n_mix, replace=False))
            order[pos] = order[rng.permutation(pos)]
            counts = _split_counts(len(names), np.ones(n), 0)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        assignment = [order[bounds[k] : bounds[k + 1]] for k in range(n)]
    sites = {
        f"site-{k + 1}": [cases[i] for i in sorted(i for j in members for i in patients[names[int(j)]])]
        for k, members in enumerate(assignment)
    }
    return _finish(sites, scheme, seed, getter, feature, min_per_site, None)


def _by_institution(cases: list[dict], n_sites: int | None) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    inst = _group_by(cases, "institution", default="unknown")
    inst_names = sorted(inst, key=_natural_key)
    seen: dict[str, set[str]] = {}
    for c in cases:
        if "patient" in c:
            seen.setdefault(str(c["patient"]), set()).add(str(c.get("institution", "unknown")))
    for p, where in seen.items():
        if len(where) > 1:
            raise DataError(f"patient {p!r} appears under several institutions {sorted(where)}")
    groups: list[list[str]]
    if n_sites is None or n_sites == len(inst_names):
        groups = [[name] for name in inst_names]
    elif n_sites > len(inst_names):
        raise DataError(
            f"site-{len(inst_names) + 1} would be empty: {n_sites} sites requested but only "
            f"{len(inst_names)} institutions {inst_names} (institutions are kept whole)"
        )
    else:
        groups = [[] for _ in range(n_sites)]
        load = np.zeros(n_sites, dtype=int)
        for name in sorted(inst_names, key=lambda x: (-len(inst[x]), _natural_key(x))):
            k = int(np.argmin(load))
            groups[k].append(name)
            load[k] += len(inst[name])
    site_institutions = {f"site-{k + 1}": g for k, g in enumerate(groups)}
    sites = {
        f"site-{k + 1}": [cases[i] for i in sorted(i for name in g for i in inst[name])] for k, g in enumerate(groups)
    }
    return sites, site_institutions


def _finish(sites, scheme, seed, getter, feature, min_per_site, site_institutions) -> Partition:
    for name, members in sites.items():
        if len(members) < max(min_per_site, 1):
            raise DataError(
                f"{name} received {len(members)} cases under scheme {scheme!r} (min_per_site={min_per_site}); "
                f"use fewer sites or more cases"
            )
    mean_ks = None
    all_cases = [c for members in sites.values() for c in members]
    has_feature = feature is not None or all("feature" in c for c in all_cases)
    if has_feature and len(sites) > 1:
        mean_ks = mean_pairwise_ks([_features(members, getter) for members in sites.values()])
    return Partition(sites=sites, scheme=scheme, seed=seed, mean_ks=mean_ks, site_institutions=site_institutions)
