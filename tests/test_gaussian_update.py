"""Client-level Gaussian privacy of the whole update (McMahan et al. 2018)."""

from __future__ import annotations

import math

import pytest
import torch

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError, UpdateError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters import GaussianUpdatePrivacy, PercentileSharing, SparseVectorFilter


def gaussian(*args, budget=None, **kw) -> GaussianUpdatePrivacy:
    return GaussianUpdatePrivacy(*args, budget=budget if budget is not None else PrivacyBudget(limit=1e300), **kw)


def update(scale: float = 1.0, n: int = 100_000, seed: int = 0) -> ModelUpdate:
    g = torch.Generator().manual_seed(seed)
    delta = {
        "w": torch.randn(n - 100, generator=g) * scale,
        "b": torch.randn(100, generator=g) * scale,
        "steps": torch.tensor(7),
    }
    return ModelUpdate("site-2", 2, delta, n_samples=8, local_steps=3)


def flat(d):
    return torch.cat([d["w"], d["b"]]).double()


def test_noise_std_is_sigma_times_clip():
    u = update(scale=0.0, n=200_000)
    out = gaussian(clip_norm=2.0, noise_multiplier=0.75, generator=0)(u)
    noise = flat(out.delta)
    assert float(noise.std()) == pytest.approx(1.5, rel=0.01)
    assert abs(float(noise.mean())) < 4 * 1.5 / math.sqrt(noise.numel())
    assert int(out.delta["steps"]) == 0  # integer buffers are not sent


def test_clips_large_updates_to_the_norm_and_keeps_small_ones():
    big = update(scale=1.0)
    out = gaussian(clip_norm=3.0, noise_multiplier=1e-12, generator=0)(big)
    assert float(torch.linalg.vector_norm(flat(out.delta))) == pytest.approx(3.0, rel=1e-5)
    direction = flat(big.delta) / torch.linalg.vector_norm(flat(big.delta))
    assert torch.allclose(flat(out.delta) / 3.0, direction, atol=1e-6)
    small = update(scale=1e-4)
    kept = gaussian(clip_norm=3.0, noise_multiplier=1e-12, generator=0)(small)
    assert torch.allclose(flat(kept.delta), flat(small.delta), atol=1e-8)


@pytest.mark.parametrize("neighbouring,recorded", [("replace", 0.4), ("add_remove_site", 0.8)])
def test_ledger_records_one_gaussian_event_per_round(neighbouring, recorded):
    budget = PrivacyBudget(limit=100.0)
    ledger = budget.ledger
    f = gaussian(1.0, 0.8, budget=budget, generator=1, neighbouring=neighbouring)
    for _ in range(3):
        out = f(update(n=1000))
    events = ledger.events
    assert all(e["kind"] == "gaussian" and e["noise_multiplier"] == pytest.approx(recorded) for e in events)
    assert sum(e["count"] for e in events) == 3
    reference = PrivacyLedger()
    reference.record_gaussian(recorded, count=3)
    assert ledger.epsilon(1e-5) == pytest.approx(reference.epsilon(1e-5))
    priv = out.meta["privacy"]
    assert priv["dp"] is True and priv["filter_epsilon"] is None
    rec = priv["filters"][-1]
    assert rec["noise_std"] == pytest.approx(0.8) and rec["recorded_noise_multiplier"] == pytest.approx(recorded)
    # nothing data-dependent goes into meta: the record is the same for any update
    other = gaussian(1.0, 0.8, generator=9, neighbouring=neighbouring)(update(scale=50.0, n=1000))
    assert other.meta["privacy"]["filters"][-1] == rec


def test_sparse_input_with_a_private_mask_noises_shared_coordinates_only():
    u = update(n=10_000)
    sparse = SparseVectorFilter(0.2, 1.0, 1.0, 1.0, clip=10.0, threshold=0.0, budget=PrivacyBudget(limit=10.0))(u)
    out = gaussian(clip_norm=1.0, noise_multiplier=2.0, generator=2)(sparse)
    for k in ("w", "b"):
        assert torch.equal(out.masks[k], sparse.masks[k])
        assert torch.all(out.delta[k][~out.masks[k]] == 0)
    shared = torch.cat([out.delta["w"][out.masks["w"]], out.delta["b"][out.masks["b"]]])
    assert float(shared.std()) == pytest.approx(2.0, rel=0.05)  # noise dominates the clipped signal
    assert out.meta["privacy"]["filters"][-1]["sparse_input"] is True
    assert [f["filter"] for f in out.meta["privacy"]["filters"]] == ["svt", "gaussian"]


def test_a_mask_chosen_without_privacy_is_refused():
    """Percentile sharing picks the mask from |dw|: noising the values would still leak it under a DP claim."""
    with pytest.raises(UpdateError, match="mask"):
        gaussian(clip_norm=1.0, noise_multiplier=2.0, generator=2)(PercentileSharing(0.2)(update(n=1000)))
    dp_sgd = PercentileSharing(0.2)(update(n=1000))
    dp_sgd.meta["privacy"]["dp_sgd"] = True  # after DP-SGD the mask is post-processing of a private update
    gaussian(clip_norm=1.0, noise_multiplier=2.0, generator=2)(dp_sgd)


def test_reproducible_and_resumable():
    u = update(n=1000)
    a, b = gaussian(1.0, 1.0, generator=3), gaussian(1.0, 1.0, generator=3)
    assert torch.equal(a(u).delta["w"], b(u).delta["w"])
    state = a.state_dict()
    nxt = a(u)
    c = gaussian(1.0, 1.0, generator=4)
    c.load_state_dict(state)
    assert torch.equal(c(u).delta["w"], nxt.delta["w"]) and c.rounds == 2
    assert torch.equal(u.delta["w"], update(n=1000).delta["w"])  # input untouched


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0, "noise_multiplier": 1.0},
        {"clip_norm": 1.0, "noise_multiplier": 0.0},
        {"clip_norm": float("nan"), "noise_multiplier": 1.0},
        {"clip_norm": 1.0, "noise_multiplier": -1.0},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "neighbouring": "example"},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "budget": object()},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "budget": PrivacyBudget(limit=None)},
        {"clip_norm": 1.0, "noise_multiplier": 0.01, "budget": PrivacyBudget(limit=5.0)},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "generator": 1.5},
    ],
)
def test_bad_parameters_raise(kwargs):
    kwargs = {"budget": PrivacyBudget(limit=100.0), **kwargs}
    with pytest.raises(PrivacyConfigError):
        GaussianUpdatePrivacy(**kwargs)


def test_reported_epsilon_comes_from_the_budget_after_the_release():
    budget = PrivacyBudget(limit=100.0, delta=1e-6)
    gauss = gaussian(1.0, 2.0, budget=budget, generator=0)
    for _ in range(2):
        priv = gauss(update(n=1000)).meta["privacy"]
        assert priv["epsilon"] == pytest.approx(budget.epsilon()) and priv["delta"] == 1e-6
    assert budget.ledger.events[0]["count"] == 2
    reference = PrivacyLedger()
    reference.record_gaussian(1.0, count=2)  # sensitivity 2C: recorded noise multiplier sigma / 2
    assert budget.epsilon() == pytest.approx(reference.epsilon(1e-6))


def test_release_past_the_budget_is_refused():
    one = PrivacyLedger()
    one.record_gaussian(1.0, count=2)
    budget = PrivacyBudget(limit=one.epsilon(1e-5) * 1.01)  # room for exactly two releases
    gauss = gaussian(1.0, 2.0, budget=budget, generator=0)
    gauss(update(n=1000))
    gauss(update(n=1000))
    with pytest.raises(PrivacyBudgetExceeded):
        gauss(update(n=1000))
    assert budget.epsilon() <= budget.limit and budget.exhausted
