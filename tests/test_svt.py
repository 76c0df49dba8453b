"""Sparse vector technique filter (Li et al. 2019, Alg. 2; Lyu, Su and Li 2017)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from scipy import stats

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError, UpdateError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters import FilterChain, PercentileSharing, SparseVectorFilter, lyu_budget_split

HUGE = 1e12


def SVT(*args, budget=None, **kw) -> SparseVectorFilter:  # noqa: N802 - the filter, on a budget that never binds
    return SparseVectorFilter(*args, budget=budget if budget is not None else PrivacyBudget(limit=1e300), **kw)


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).to(torch.float64) for v in d.values() if v.is_floating_point()])


def split_update(values: torch.Tensor, steps: int = 1) -> ModelUpdate:
    """Put a flat vector into a two-tensor update (plus an integer buffer) with ``steps`` local steps."""
    a, b = values[:2000].reshape(20, 100), values[2000:]
    delta = {"a": (a * steps).float(), "b": (b * steps).float(), "count": torch.tensor(3)}
    return ModelUpdate("site-1", 1, delta, n_samples=5, local_steps=steps)


def planted(n_above: int, size: int = 2500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(size, generator=g, dtype=torch.float64) * 0.3  # well below the threshold 0.5
    above = torch.randperm(size, generator=g)[:n_above]
    values[above] = 0.7 + 0.2 * torch.rand(n_above, generator=g, dtype=torch.float64)
    values *= torch.where(torch.rand(size, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    truth = torch.zeros(size, dtype=torch.bool)
    truth[above] = True
    return values, truth


def noiseless(**kw) -> SparseVectorFilter:
    return SVT(0.1, HUGE, HUGE, HUGE, clip=1.0, threshold=0.5, generator=0, **kw)


def test_large_epsilon_releases_exactly_the_thresholded_coordinates():
    values, truth = planted(n_above=250)  # c = round(0.1 * 2500) = 250
    out = noiseless()(split_update(values, steps=3))
    mask = torch.cat([out.masks["a"].reshape(-1), out.masks["b"]])
    assert torch.equal(mask, truth)
    assert torch.allclose(flat(out.delta)[mask] / 3, values[mask], atol=1e-6)
    rec = out.meta["privacy"]["filters"][-1]
    assert rec["released"] == rec["target"] == 250 and not rec["exhausted"]
    assert not out.masks["count"].any() and int(out.delta["count"]) == 0


def test_stream_exhausted_releases_fewer_and_says_so():
    values, truth = planted(n_above=100)
    out = noiseless()(split_update(values))
    mask = torch.cat([out.masks["a"].reshape(-1), out.masks["b"]])
    assert torch.equal(mask, truth)
    rec = out.meta["privacy"]["filters"][-1]
    assert rec["released"] == 100 and rec["target"] == 250 and rec["exhausted"] and rec["queried"] == 2500
    assert out.meta["privacy"]["fraction_shared"] == pytest.approx(100 / 2500)


def test_halts_after_c_acceptances_without_requeries():
    values, truth = planted(n_above=400)
    out = noiseless()(split_update(values))
    mask = torch.cat([out.masks["a"].reshape(-1), out.masks["b"]])
    assert int(mask.sum()) == 250 and not (mask & ~truth).any()
    rec = out.meta["privacy"]["filters"][-1]
    assert rec["released"] == 250 and rec["queried"] < 2500 and not rec["exhausted"]


@pytest.mark.parametrize("eps", [0.01, 1.0, 100.0])
def test_released_values_lie_in_clip_range(eps):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2500, generator=g, dtype=torch.float64)
    gamma, steps = 0.2, 5
    f = SVT(0.3, eps, eps, eps, clip=gamma, threshold=0.1, generator=2)
    out = f(split_update(values, steps=steps))
    released = flat(out.delta)[torch.cat([out.masks["a"].reshape(-1), out.masks["b"]])]
    assert released.numel() > 0
    assert released.abs().max() <= gamma * steps * (1 + 1e-6)


def test_answer_noise_is_laplace_with_stated_scale():
    n, gamma, b = 20000, 1.0, 0.01
    c = n  # fraction 1
    eps3 = c * 2 * gamma / b  # b = c s / eps3 with s = 2 gamma
    f = SVT(1.0, HUGE, HUGE, eps3, clip=gamma, threshold=0.0, generator=3)
    assert f.noise_scales(c)["answer"] == pytest.approx(b)
    u = ModelUpdate("s", 1, {"w": torch.full((n,), 0.5, dtype=torch.float64)}, 1, 1)
    out = f(u)
    assert bool(out.masks["w"].all())
    noise = out.delta["w"] - 0.5
    ks = stats.kstest(noise.numpy(), stats.laplace(scale=b).cdf)
    assert ks.pvalue > 1e-3, ks
    assert float(noise.var()) == pytest.approx(2 * b**2, rel=0.06)
    # a wrong scale is detected: the test can fail
    assert stats.kstest(noise.numpy(), stats.laplace(scale=1.2 * b).cdf).pvalue < 1e-6


def test_query_noise_scale_from_acceptance_rate():
    n, gamma, b1 = 20000, 1.0, 0.1
    eps1 = 2 * n * 2 * gamma / b1  # b = 2 c s / eps1
    f = SVT(1.0, eps1, HUGE, HUGE, clip=gamma, threshold=0.6, generator=4)
    assert f.noise_scales(n)["query"] == pytest.approx(b1)
    out = f(ModelUpdate("s", 1, {"w": torch.full((n,), 0.5)}, 1, 1))
    rate = float(out.masks["w"].double().mean())
    expected = 0.5 * math.exp(-0.1 / b1)  # P(Lap(b1) >= 0.1)
    assert rate == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / n))


def test_threshold_noise_scale_from_round_outcomes():
    gamma, b2 = 1.0, 0.1
    f = SVT(1.0, HUGE, 2 * gamma / b2, HUGE, clip=gamma, threshold=0.6, generator=5)
    u = ModelUpdate("s", 1, {"w": torch.full((10,), 0.5)}, 1, 1)
    outcomes = [int(f(u).masks["w"].sum()) for _ in range(2000)]
    assert set(outcomes) <= {0, 10}  # one threshold draw per round: all or nothing
    rate = sum(o == 10 for o in outcomes) / len(outcomes)
    expected = 0.5 * math.exp(-0.1 / b2)  # P(Lap(b2) <= -0.1)
    assert rate == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / 2000))


def test_epsilon_accounting_across_rounds():
    budget = PrivacyBudget(limit=100.0)
    e1, e2, e3 = 0.5, 0.1, 0.4
    f = SVT(0.1, e1, e2, e3, clip=1e-3, threshold=5e-4, budget=budget, generator=6)
    values, _ = planted(50)
    rounds = 4
    for r in range(1, rounds + 1):
        out = f(split_update(values * 1e-3))
        assert out.meta["privacy"]["filter_epsilon"] == pytest.approx(e1 + e2 + e3)
        assert out.meta["privacy"]["filter_epsilon_total"] == pytest.approx(r * (e1 + e2 + e3))
        assert out.meta["privacy"]["dp"] is True
    events = budget.ledger.events
    assert all(e["kind"] == "pure" and e["label"] == "svt" for e in events)
    assert sum(e["count"] for e in events) == rounds  # the ledger may merge identical consecutive events
    assert sum(e["epsilon"] * e["count"] for e in events) == pytest.approx(rounds * (e1 + e2 + e3))
    assert budget.epsilon() <= rounds * (e1 + e2 + e3) + 1e-9
    assert f.state_dict()["epsilon_total"] == pytest.approx(rounds * (e1 + e2 + e3))


def test_release_that_would_pass_the_budget_is_not_made():
    """Three rounds of 1.0 fit a budget of 3.5; the fourth is refused before any noise is drawn or value sent."""
    budget = PrivacyBudget(limit=3.5)
    f = SVT(0.1, 0.4, 0.1, 0.5, clip=1.0, threshold=0.5, budget=budget, generator=0)
    values, _ = planted(n_above=50)
    for _ in range(3):
        f(split_update(values))
    state = f.generator.get_state()
    with pytest.raises(PrivacyBudgetExceeded):
        f(split_update(values))
    assert torch.equal(state, f.generator.get_state())  # no noise drawn for the refused release
    assert budget.exhausted and budget.epsilon() == pytest.approx(3.0) and f.rounds == 3
    # inside a site's chain the refusal reaches the sender as a failure: nothing is sent
    with pytest.raises(RuntimeError, match="SparseVectorFilter"):
        FilterChain([f])(split_update(values))


def test_budget_rules_are_checked_when_the_filter_is_built():
    with pytest.raises(PrivacyConfigError, match="finite epsilon budget"):
        SparseVectorFilter(0.1, 0.4, 0.1, 0.5, budget=PrivacyBudget(limit=None))
    with pytest.raises(PrivacyConfigError, match="more than the whole budget"):
        SparseVectorFilter(0.1, 0.4, 0.1, 0.5, budget=PrivacyBudget(limit=0.9))  # one round costs 1.0
    with pytest.raises(PrivacyConfigError, match="PRV"):
        SparseVectorFilter(0.1, 0.4, 0.1, 0.5, budget=PrivacyBudget(limit=10.0, accountant="prv"))
    with pytest.raises(PrivacyConfigError):
        SparseVectorFilter(0.1, 0.4, 0.1, 0.5, budget=PrivacyLedger())


def test_epsilon_select_is_split_for_each_updates_count():
    budget = PrivacyBudget(limit=10.0)
    f = SparseVectorFilter(0.1, epsilon_select=1.0, epsilon3=0.5, clip=1.0, threshold=0.5, budget=budget, generator=0)
    assert f.epsilon_per_round == pytest.approx(1.5)
    values, _ = planted(n_above=50)
    rec = f(split_update(values)).meta["privacy"]["filters"][-1]
    c = rec["target"]
    assert (rec["epsilon1"], rec["epsilon2"]) == pytest.approx(lyu_budget_split(1.0, c))
    assert rec["epsilon"] == pytest.approx(1.5) and budget.epsilon() == pytest.approx(1.5)
    for count in (1, 7, c):  # the scales of any c follow that c's split, whatever the last update was
        e1, e2 = lyu_budget_split(1.0, count)
        assert f.noise_scales(count)["query"] == pytest.approx(2 * count * f.sensitivity / e1)
        assert f.noise_scales(count)["threshold"] == pytest.approx(f.sensitivity / e2)
    with pytest.raises(PrivacyConfigError):
        SparseVectorFilter(0.1, 0.5, 0.5, epsilon_select=1.0, budget=budget)


def test_same_seed_same_release_and_resume_from_state():
    values, _ = planted(300)
    u = split_update(values)
    a = SVT(0.1, 1.0, 1.0, 1.0, clip=1.0, threshold=0.5, generator=7)
    b = SVT(0.1, 1.0, 1.0, 1.0, clip=1.0, threshold=0.5, generator=7)
    assert torch.equal(a(u).delta["a"], b(u).delta["a"])
    state = a.state_dict()
    nxt = a(u)
    c = SVT(0.1, 1.0, 1.0, 1.0, clip=1.0, threshold=0.5, generator=99)
    c.load_state_dict(state)
    again = c(u)
    assert torch.equal(nxt.delta["a"], again.delta["a"]) and torch.equal(nxt.masks["b"], again.masks["b"])
    assert c.epsilon_total == a.epsilon_total and c.rounds == a.rounds == 2
    with pytest.raises(KeyError):
        c.load_state_dict({"rounds": 1})


def test_input_is_not_modified():
    values, _ = planted(300)
    u = split_update(values)
    before = {k: v.clone() for k, v in u.delta.items()}
    SVT(0.1, 1.0, 1.0, 1.0, clip=0.1, threshold=0.05, generator=0)(u)
    assert all(torch.equal(before[k], u.delta[k]) for k in before) and u.masks is None and u.meta == {}


def test_sparse_input_is_refused_and_chain_fails_closed():
    values, _ = planted(300)
    u = split_update(values)
    svt = SVT(0.1, 1.0, 1.0, 1.0, clip=1.0, threshold=0.5, generator=0)
    with pytest.raises(UpdateError, match="dense"):
        svt(PercentileSharing(0.5)(u))
    with pytest.raises(RuntimeError, match="SparseVectorFilter"):
        FilterChain([PercentileSharing(0.5), svt])(u)


@pytest.mark.parametrize(
    "change",
    [
        {"fraction": 0.0},
        {"fraction": 1.01},
        {"epsilon1": 0.0},
        {"epsilon2": -1.0},
        {"epsilon3": float("nan")},
        {"epsilon1": float("inf")},
        {"clip": 0.0},
        {"threshold": -0.1},
        {"threshold": float("nan")},
        {"sensitivity": 0.1},  # < 2 * clip = 2.0
        {"budget": object()},
        {"generator": "seed"},
        {"normalise_by_steps": "yes"},
    ],
)
def test_bad_parameters_raise(change):
    kwargs = dict(fraction=0.1, epsilon1=1.0, epsilon2=1.0, epsilon3=1.0, clip=1.0, threshold=0.5, generator=0)
    kwargs.update(change)
    kwargs.setdefault("budget", PrivacyBudget(limit=100.0))
    with pytest.raises(PrivacyConfigError):
        SparseVectorFilter(**kwargs)


def test_lyu_budget_split():
    e1, e2 = lyu_budget_split(2.0, 100)
    assert e1 + e2 == pytest.approx(2.0) and e1 / e2 == pytest.approx(200 ** (2 / 3))
    with pytest.raises(PrivacyConfigError):
        lyu_budget_split(1.0, 0)


def test_half_a_million_coordinates_is_fast():
    g = torch.Generator().manual_seed(0)
    shapes = [(256, 128, 3, 3), (128, 64, 3, 3), (64, 64, 3, 3), (64, 32, 3, 3), (80000,)]
    delta = {f"k{i}": torch.randn(s, generator=g) * 1e-3 for i, s in enumerate(shapes)}
    u = ModelUpdate("s", 1, delta, 1, 10)
    size = sum(v.numel() for v in delta.values())
    assert size > 500_000
    f = SVT(0.1, 10.0, 1.0, 10.0, clip=1e-4, threshold=5e-5, generator=0)
    f(u)  # warm-up
    start = time.perf_counter()
    out = f(u)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"SVT on {size} coordinates took {elapsed:.3f}s"
    assert out.meta["privacy"]["filters"][-1]["target"] == round(0.1 * size)


def test_reported_epsilon_is_the_sites_budget_after_the_release():
    """DP-SGD steps and SVT releases compose in the one ledger; the update reports the site's epsilon with them."""
    budget = PrivacyBudget(limit=50.0)
    budget.ledger.record_sampled_gaussian(0.1, 1.0, steps=20)
    svt = SVT(0.1, 0.4, 0.1, 0.5, clip=1.0, threshold=0.5, budget=budget, generator=0)
    values, _ = planted(n_above=50)
    for rnd in (1, 2):
        u = split_update(values)
        stale = budget.epsilon()
        priv = svt(u).meta["privacy"]
        assert priv["filter_epsilon"] == pytest.approx(1.0)
        assert priv["filter_epsilon_total"] == pytest.approx(float(rnd))
        assert priv["epsilon"] == pytest.approx(budget.epsilon()) and priv["epsilon"] > stale
        assert priv["delta"] == 1e-5
    only_svt = PrivacyBudget(limit=50.0)
    f = SVT(0.1, 0.4, 0.1, 0.5, clip=1.0, threshold=0.5, budget=only_svt, generator=0)
    for rnd in (1, 2, 3):
        assert f(split_update(values)).meta["privacy"]["epsilon"] == pytest.approx(float(rnd))  # basic composition
