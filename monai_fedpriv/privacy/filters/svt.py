"""Sparse vector technique on the outgoing update (Li et al. 2019, Algorithm 2; Lyu, Su and Li 2017).

Which variant, and why its proof holds
--------------------------------------
Algorithm 2 of Li et al. draws coordinates "randomly" until ``c = Q * size`` have passed a noisy threshold, which
read literally allows drawing a rejected (or released) coordinate again. We implement instead the c-bounded SVT
with numeric answers that Lyu, Su and Li (2017) propose (their Algorithm 1, which they prove
``(eps_threshold + eps_query + eps_answer)``-DP; note that their ``eps1`` is the threshold budget and ``eps2`` the
query budget, the other way round from Li et al. and from this module), on a stream of queries fixed in advance:

1. ``dw <- delta / N_local`` and ``w_i <- clip(dw_i, gamma)`` (clipping *before* any query or answer, so that every
   query and every answer has bounded sensitivity; Li et al. add the answer noise to the unclipped value, whose
   sensitivity is unbounded).
2. The query stream is a uniformly random permutation of all ``size`` floating-point coordinates, drawn from the
   filter's generator independently of the data; each coordinate is queried **at most once**, with query
   ``|w_i|`` (sensitivity ``gamma <= s``).
3. Noisy threshold ``h_hat = h + Lap(s / eps2)``, drawn once per round. The threshold ``h`` is a fixed public
   number, never a percentile of the data.
4. Query ``i`` is accepted iff ``|w_i| + Lap(2 c s / eps1) >= h_hat`` (the factor 2 because queries need not be
   monotonic).
5. An accepted coordinate releases ``clip(w_i + Lap(c s / eps3), gamma)``: at most ``c`` answers of sensitivity
   ``s`` (``|w_i - w_i'| <= 2 gamma <= s``), so the Laplace answers cost ``eps3`` in total by basic composition;
   the outer clip is post-processing.
6. The filter halts after the ``c``-th acceptance. If the stream runs out first, fewer than ``c`` values are
   released (``meta["privacy"]["filters"][-1]["exhausted"] = True``); there are no free re-queries.

Per round the selection (steps 3-4, including every rejected query, which SVT gets for free) is ``eps1 + eps2``-DP
(Lyu et al., Algorithm 1 with ``c`` positive outcomes), and the answers are ``eps3``-DP, so a round is
``(eps1 + eps2 + eps3)``-DP by basic composition, whatever the order of queries, the number of rejections or whether
the stream is exhausted. Every bound above holds for an *arbitrary* change of the update (each clipped coordinate
stays in ``[-gamma, gamma]``), so the guarantee covers any change of the site's data in that round, one example or
all of them. Rounds compose: each round is one pure-DP release of ``eps1 + eps2 + eps3`` asked of the site's
:class:`~monai_fedpriv.privacy.budget.PrivacyBudget` *before* anything is released (reserved when the filter is
built, so DP-SGD leaves room for it); a release the budget refuses is not made and the site sends nothing.

The sensitivity ``s`` defaults to ``2 * gamma`` as in Li et al.'s experiments and may not be set smaller (that
would understate the noise). Lyu et al.'s recommended split of the selection budget,
``eps_threshold : eps_query = 1 : (2c)^(2/3)``, is available as :func:`lyu_budget_split`.

Laplace draws are the difference of two Exp(1) draws (``torch.Tensor.exponential_`` on the filter's generator),
in float64 for the threshold and the released answers and in the update's dtype for the query noise, which only
decides comparisons. Caveat: like every textbook floating-point Laplace sampler this is not hardened against the
least-significant-bit attacks of Mironov (2012) on released values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from monai_fedpriv.errors import PrivacyConfigError, UpdateError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.accounting import PureEvent
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters.base import copy_update, meta_with_privacy, privacy_meta
from monai_fedpriv.privacy.filters.budgeted import BudgetedRelease
from monai_fedpriv.privacy.filters.vectors import (
    check_fraction,
    check_positive,
    flatten,
    float_keys,
    laplace,
    shared_count,
    steps_divisor,
    unflatten,
)

__all__ = ["SparseVectorFilter", "lyu_budget_split"]


def lyu_budget_split(epsilon: float, count: int) -> tuple[float, float]:
    """Split a selection budget between queries and threshold as Lyu, Su and Li (2017) recommend.

    Args:
        epsilon: budget of the selection step (``eps1 + eps2``), > 0.
        count: ``c``, the number of positive outcomes allowed.

    Returns:
        ``(eps1, eps2)``: query budget and threshold budget, with ``eps2 : eps1 = 1 : (2c)^(2/3)``.

    Example:
        >>> eps1, eps2 = lyu_budget_split(1.0, 1)
        >>> round(eps1 / eps2, 4) == round(2 ** (2 / 3), 4)
        True
    """
    eps = check_positive("epsilon", epsilon)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PrivacyConfigError(f"count must be an int >= 1, got {count!r}.")
    ratio = (2.0 * count) ** (2.0 / 3.0)
    assert eps is not None
    eps2 = eps / (1.0 + ratio)
    return eps - eps2, eps2


class SparseVectorFilter(BudgetedRelease):
    """Release at most ``c = round(fraction * size)`` noisy, clipped coordinates chosen by the sparse vector technique.

    See the module docstring for the exact variant and its proof. Each call is one round and spends
    ``eps1 + eps2 + eps3`` from the site's budget.

    Args:
        fraction: ``Q``, fraction in (0, 1] of coordinates to release (``c = round(Q * size)``, size = number of
            floating-point coordinates of the update).
        epsilon1: budget of the noisy comparisons (query noise ``Lap(2 c s / eps1)``).
        epsilon2: budget of the noisy threshold (``Lap(s / eps2)``).
        epsilon3: budget of the released answers (``Lap(c s / eps3)`` each).
        epsilon_select: instead of ``epsilon1`` and ``epsilon2``: the selection budget ``eps1 + eps2``, split as Lyu,
            Su and Li (2017) recommend for each update's ``c`` (:func:`lyu_budget_split`). This is how ``svt.json``
            and ``--share svt`` configure it.
        clip: ``gamma`` > 0, bound on the normalised coordinates.
        threshold: ``h`` >= 0, compared with ``|clip(dw_i, gamma)|``; a public constant.
        budget: the site's :class:`~monai_fedpriv.privacy.budget.PrivacyBudget`, with a finite limit; each round's
            release is reserved at construction and asked for before it is made.
        sensitivity: ``s`` >= ``2 * gamma``; defaults to ``2 * gamma``.
        generator: a CPU ``torch.Generator``, an int seed, or ``None`` for a generator seeded from OS entropy.
        normalise_by_steps: divide by ``local_steps`` first and multiply the released values back (Alg. 2).

    Example::

        budget = PrivacyBudget(limit=10.0)
        svt = SparseVectorFilter(0.1, epsilon1=1.0, epsilon2=0.1, epsilon3=1.0, clip=1e-4, threshold=5e-5,
                                 budget=budget, generator=None)
        private_update = svt(update)
        private_update.meta["privacy"]["filter_epsilon"]   # 2.1
    """

    covers = frozenset({"delta"})
    reservation = "svt"
    budget_hint = "lower the SVT filter's epsilon (--svt-epsilon, --svt-epsilon3)"

    def __init__(
        self,
        fraction: float,
        epsilon1: float | None = None,
        epsilon2: float | None = None,
        epsilon3: float = 1.0,
        clip: float = 1e-3,
        threshold: float = 5e-4,
        budget: PrivacyBudget | None = None,
        sensitivity: float | None = None,
        generator: torch.Generator | int | None = None,
        normalise_by_steps: bool = True,
        epsilon_select: float | None = None,
    ) -> None:
        self.fraction = check_fraction(fraction)
        if epsilon_select is None:
            if epsilon1 is None or epsilon2 is None:
                raise PrivacyConfigError("give epsilon1 and epsilon2, or epsilon_select (split as Lyu et al. 2017).")
            e1 = float(check_positive("epsilon1", epsilon1))  # type: ignore[arg-type]
            e2 = float(check_positive("epsilon2", epsilon2))  # type: ignore[arg-type]
            self.epsilon1: float | None = e1
            self.epsilon2: float | None = e2
            self.epsilon_select = e1 + e2
            self.split = "fixed"
        else:
            if epsilon1 is not None or epsilon2 is not None:
                raise PrivacyConfigError("give either epsilon_select or epsilon1 and epsilon2, not both.")
            self.epsilon_select = float(check_positive("epsilon_select", epsilon_select))  # type: ignore[arg-type]
            self.epsilon1 = self.epsilon2 = None  # split per update's c: see budget_split
            self.split = "lyu"
        self.epsilon3 = float(check_positive("epsilon3", epsilon3))  # type: ignore[arg-type]
        self.clip = float(check_positive("clip", clip))  # type: ignore[arg-type]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise PrivacyConfigError(f"threshold must be a finite number >= 0, got {threshold!r}.")
        if threshold < 0:
            raise PrivacyConfigError(f"threshold must be >= 0 (it is compared with |w_i|), got {threshold!r}.")
        self.threshold = float(threshold)
        if sensitivity is None:
            sensitivity = 2.0 * self.clip
        self.sensitivity = float(check_positive("sensitivity", sensitivity))  # type: ignore[arg-type]
        if self.sensitivity < 2.0 * self.clip * (1 - 1e-12):
            raise PrivacyConfigError(
                f"sensitivity must be >= 2 * clip = {2.0 * self.clip!r} (released values span [-clip, clip]), "
                f"got {sensitivity!r}."
            )
        if not isinstance(normalise_by_steps, bool):
            raise PrivacyConfigError(f"normalise_by_steps must be a bool, got {normalise_by_steps!r}.")
        self.normalise_by_steps = normalise_by_steps
        self.epsilon_total = 0.0
        self._bind_budget(budget, generator)

    @property
    def epsilon_per_round(self) -> float:
        """``eps1 + eps2 + eps3``: what one call spends."""
        return self.epsilon_select + self.epsilon3

    @property
    def event(self) -> PureEvent:
        """The ledger event of one round's release."""
        return PureEvent(self.epsilon_per_round, "svt")

    def budget_split(self, count: int) -> tuple[float, float]:
        """``(epsilon1, epsilon2)`` of an update releasing ``c = count`` coordinates: the fixed pair, or Lyu et
        al.'s split of ``epsilon_select`` for that ``c``."""
        if self.split == "lyu":
            return lyu_budget_split(self.epsilon_select, count)
        assert self.epsilon1 is not None and self.epsilon2 is not None
        return self.epsilon1, self.epsilon2

    def noise_scales(self, count: int) -> dict[str, float]:
        """Laplace scales ``b`` for ``c = count``: threshold, query and answer noise."""
        s = self.sensitivity
        epsilon1, epsilon2 = self.budget_split(count)
        return {
            "threshold": s / epsilon2,
            "query": 2.0 * count * s / epsilon1,
            "answer": count * s / self.epsilon3,
        }

    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        who = type(self).__name__
        if update.masks is not None:
            raise UpdateError(
                f"{who} needs a dense update but {update.site!r} round {update.round} is already sparse: a "
                f"data-dependent mask chosen before SVT is not covered by its guarantee. Put SVT first."
            )
        keys = float_keys(update.delta)
        n_steps = steps_divisor(update, self.normalise_by_steps, who)
        w = (flatten(update.delta, keys) / n_steps).clamp(-self.clip, self.clip)
        size = w.numel()
        if size == 0:
            raise UpdateError(f"{who}: update of {update.site!r} has no floating-point coordinates.")
        spent = self.epsilon_per_round
        # asked before any noise is drawn or any value computed: a refused release sends nothing
        self.budget.release(self.event, f"{who} round {update.round}")
        c = shared_count(self.fraction, size)
        epsilon1, epsilon2 = self.budget_split(c)
        b = self.noise_scales(c)

        # All randomness of the round, drawn up front in a data-independent amount.
        order = torch.randperm(size, generator=self.generator)
        threshold_hat = self.threshold + float(laplace(1, b["threshold"], self.generator)[0])
        query_noise = laplace(size, b["query"], self.generator, dtype=w.dtype)  # comparisons only
        answer_noise = laplace(c, b["answer"], self.generator)

        accepted = (w[order].abs() + query_noise) >= threshold_hat
        running = torch.cumsum(accepted.to(torch.int64), 0)
        released_in_stream = accepted & (running <= c)
        n_accepted = int(running[-1])
        released = min(c, n_accepted)
        if n_accepted >= c:  # halt at the c-th acceptance
            queried = int(torch.searchsorted(running, torch.tensor([c]), right=False)[0]) + 1
        else:
            queried = size
        idx = order[released_in_stream]
        values = torch.zeros(size, dtype=torch.float64)
        values[idx] = (w[idx].to(torch.float64) + answer_noise[:released]).clamp(-self.clip, self.clip)
        mask = torch.zeros(size, dtype=torch.bool)
        mask[idx] = True
        delta, masks = unflatten(values * n_steps, mask, update, keys)

        self.rounds += 1
        self.epsilon_total += spent

        priv = privacy_meta(update)
        priv["dp"] = True
        priv["mask_dp"] = True
        priv["filter_epsilon"] = (priv.get("filter_epsilon") or 0.0) + spent
        priv["filter_epsilon_total"] = (priv.get("filter_epsilon_total") or 0.0) + self.epsilon_total
        priv["fraction_shared"] = released / size
        priv.update(self.ledger_facts())
        priv.setdefault("filters", []).append(
            {
                "filter": "svt",
                "dp": True,
                "epsilon": spent,
                "epsilon1": epsilon1,
                "epsilon2": epsilon2,
                "epsilon3": self.epsilon3,
                "sensitivity": self.sensitivity,
                "clip": self.clip,
                "threshold": self.threshold,
                "noise_scales": b,
                "target": c,
                "released": released,
                "queried": queried,
                "size": size,
                "exhausted": released < c,
            }
        )
        return copy_update(update, delta=delta, masks=masks, meta=meta_with_privacy(update, priv))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epsilon_total": self.epsilon_total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "epsilon_total" not in state:
            raise KeyError("SparseVectorFilter state lacks required key 'epsilon_total'.")
        super().load_state_dict(state)
        self.epsilon_total = float(state["epsilon_total"])
