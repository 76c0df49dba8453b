"""The data side of FedAvg+Share (Zhao et al. 2018, "Federated learning with non-IID data"; a baseline of Qu et
al., seed paper 004): before training, a small pool of cases (5% in both papers) is drawn from the sites' training
data, declared public, removed from the sites' private sets and mixed into every site's training list.

Every site gives ``max(1, round(fraction * n_k))`` of its ``n_k`` units to the pool, so each site's distribution is
represented. A unit is a patient (all cases sharing ``case["patient"]``; a case without ``"patient"`` is its own
patient, as in :mod:`~monai_fedpriv.data.partition`), so a patient is never both public and private. Under DP-SGD the
pool items (``"public": True``) are left out of the private sampling rate (see
:mod:`monai_fedpriv.privacy.dp_sgd.loaders`): the epsilon covers the private remainder only, and the pool has no
protection at all (docs/fedavg_share.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monai_fedpriv.data.stream import derive_seed
from monai_fedpriv.errors import DataError

__all__ = ["PUBLIC_KEY", "SHARING_STRATEGY", "SharePool", "draw_share_pool", "is_public", "refuse_public",
           "site_data_with_pool"]  # fmt: skip

#: Data-list key that declares an item public (shared with every site, outside any privacy guarantee).
PUBLIC_KEY = "public"


def is_public(item: Any) -> bool:
    """Whether a data-list item is declared public (``item["public"] is True``).

    Raises:
        DataError: ``"public"`` is present but not a bool (e.g. the string ``"false"``): a private case must never
            be taken for a public one by accident.
    """
    if not isinstance(item, Mapping) or PUBLIC_KEY not in item:
        return False
    value = item[PUBLIC_KEY]
    if not isinstance(value, (bool, np.bool_)):
        raise DataError(f"item {PUBLIC_KEY!r} must be a bool, got {value!r} ({type(value).__name__}).")
    return bool(value)


#: the one strategy that declares data public (and draws the pool itself)
SHARING_STRATEGY = "fedavg-share"


def refuse_public(train: Mapping[str, Sequence[Mapping]]) -> None:
    """Refuse training lists that declare items public before a strategy drew its pool: only FedAvg+Share's own pool
    may be public, so a data list (a site's own, a team's file) never moves private cases out of a site's privacy
    accounting."""
    for site, cases in train.items():
        if any(PUBLIC_KEY in case for case in cases if isinstance(case, Mapping)):
            raise DataError(
                f"the training data of {site} declares items {PUBLIC_KEY!r}; only --strategy {SHARING_STRATEGY} marks "
                f"cases public (its pool, drawn from the sites' data): remove the {PUBLIC_KEY!r} key."
            )


@dataclass
class SharePool:
    """What :func:`draw_share_pool` returns.

    Attributes:
        private: each site's cases without the pool's, in their original order (the same dict objects).
        pool: copies of the drawn cases marked ``"public": True``, by site name then original position.
    """

    private: dict[str, list[dict]]
    pool: list[dict]


def _units(cases: Sequence[Mapping]) -> dict[str, list[int]]:
    units: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        units.setdefault(str(case["patient"]) if "patient" in case else f"__case{i}", []).append(i)
    return units


def draw_share_pool(train: dict[str, list[dict]], fraction: float, seed: int) -> SharePool:
    """Draw the FedAvg+Share pool: ``max(1, round(fraction * n_k))`` whole patients from every site ``k``.

    Args:
        train: each site's training cases (dicts), e.g. a partition's sites.
        fraction: share of every site's patients given to the pool, in (0, 0.5] (Zhao et al. and seed 004: 0.05).
        seed: the draw at site ``k`` uses ``numpy.random.default_rng(derive_seed(seed, "share-pool", k))``, so it
            depends only on the seed, the site's name and its data list.

    Raises:
        ValueError: ``fraction`` is outside (0, 0.5].
        DataError: a site would keep no private case, a case is not a dict or is already public, or a patient
            appears at two sites (it would be public at one and private at the other).

    Example:
        >>> out = draw_share_pool({"site-1": [{"image": f"a{i}"} for i in range(20)]}, 0.05, seed=0)
        >>> len(out.pool), len(out.private["site-1"]), out.pool[0]["public"]
        (1, 19, True)
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
        raise ValueError(f"share-pool fraction must be in (0, 0.5], got fraction={fraction!r}.")
    if not train:
        raise DataError("draw_share_pool needs at least one site.")
    owner: dict[str, str] = {}
    private: dict[str, list[dict]] = {}
    drawn: dict[str, list[dict]] = {}
    for site, cases in train.items():
        bad = [i for i, c in enumerate(cases) if not isinstance(c, Mapping) or is_public(c)]
        if bad:
            raise DataError(f"site {site!r}: cases {bad[:5]} are not dicts or are already public.")
        units = _units(cases)
        for name in units:
            if not name.startswith("__case") and owner.setdefault(name, site) != site:
                raise DataError(f"patient {name!r} is at sites {owner[name]!r} and {site!r}; it could end up both "
                                "public and private.")  # fmt: skip
        n_draw = max(1, round(fraction * len(units)))
        if n_draw >= len(units):
            raise DataError(
                f"site {site!r} has {len(units)} patient(s); giving {n_draw} to the share pool (fraction {fraction}) "
                "would leave it no private case."
            )
        rng = np.random.default_rng(derive_seed(seed, "share-pool", site))
        names = list(units)  # first-appearance order
        chosen = {names[int(j)] for j in rng.choice(len(names), size=n_draw, replace=False)}
        in_pool = {i for name in chosen for i in units[name]}
        private[site] = [c for i, c in enumerate(cases) if i not in in_pool]
        drawn[site] = [{**c, PUBLIC_KEY: True} for i, c in enumerate(cases) if i in in_pool]
    pool = [item for site in sorted(drawn) for item in drawn[site]]
    return SharePool(private=private, pool=pool)


def site_data_with_pool(private_list: Sequence[Mapping], pool: Sequence[Mapping]) -> list[dict]:
    """A site's training list under FedAvg+Share: its private cases, then the pool's.

    Every item is a copy: private cases get ``"public": False`` (so a batch mixing both collates with the same keys)
    and pool items keep ``"public": True``.

    Raises:
        DataError: a private case is marked public, or a pool item is not.
    """
    if any(is_public(c) for c in private_list):
        raise DataError("a private case is marked public; pass SharePool.private and SharePool.pool.")
    if not all(is_public(c) for c in pool):
        raise DataError(f"every share-pool item must be marked {PUBLIC_KEY!r}: True.")
    return [{**c, PUBLIC_KEY: False} for c in private_list] + [dict(c) for c in pool]
