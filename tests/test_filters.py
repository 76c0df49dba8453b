"""UpdateFilter / FilterChain (fail closed) and PercentileSharing."""

from __future__ import annotations

import pytest
import torch

from monai_fedpriv.errors import PrivacyConfigError, UpdateError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.filters import FilterChain, PercentileSharing, UpdateFilter, copy_update
from monai_fedpriv.privacy.filters.vectors import top_k_mask
from monai_fedpriv.privacy.noise import make_generator


def make_update(seed: int = 0, steps: int = 4) -> ModelUpdate:
    g = torch.Generator().manual_seed(seed)
    delta = {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "norm.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }
    return ModelUpdate("site-1", 3, delta, n_samples=10, local_steps=steps, meta={"note": [1, 2]})


class Scale(UpdateFilter):
    def __init__(self, factor: float, log: list[str]) -> None:
        self.factor, self.log, self.calls = factor, log, 0

    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        self.log.append(f"x{self.factor}")
        self.calls += 1
        return copy_update(update, delta={k: v * self.factor for k, v in update.delta.items()})

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


class Boom(UpdateFilter):
    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        raise ValueError("noise source unavailable")


class Passthrough(UpdateFilter):
    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        return update  # a buggy filter: hands back its input


def test_update_filter_is_abstract():
    with pytest.raises(TypeError):
        UpdateFilter()  # type: ignore[abstract]


def test_chain_applies_in_order_and_keeps_input():
    log: list[str] = []
    u = make_update()
    before = {k: v.clone() for k, v in u.delta.items()}
    out = FilterChain([Scale(2.0, log), Scale(3.0, log)])(u)
    assert log == ["x2.0", "x3.0"]
    assert torch.allclose(out.delta["conv.weight"], before["conv.weight"] * 6.0)
    assert all(torch.equal(u.delta[k], before[k]) for k in before)
    assert out is not u


@pytest.mark.parametrize("bad", [Boom(), Passthrough(), lambda u: {"delta": u.delta}])
def test_chain_fails_closed(bad):
    """Whatever goes wrong in a filter, the caller gets an exception, never an update (raw or partly filtered)."""
    u = make_update()
    sent: list[ModelUpdate] = []
    chain = FilterChain([Scale(2.0, []), bad, Scale(3.0, [])])
    with pytest.raises(RuntimeError, match="filter #1") as info:
        sent.append(chain(u))
    assert sent == []
    if isinstance(bad, Boom):
        assert isinstance(info.value.__cause__, ValueError)


def test_empty_chain_returns_a_copy():
    u = make_update()
    out = FilterChain([])(u)
    assert out is not u and out.delta["conv.weight"] is not u.delta["conv.weight"]
    assert torch.equal(out.delta["conv.weight"], u.delta["conv.weight"])


def test_chain_rejects_non_callables_and_restores_state():
    with pytest.raises(PrivacyConfigError):
        FilterChain([Scale(1.0, []), 3])
    chain = FilterChain([Scale(1.0, []), Scale(1.0, [])])
    chain(make_update())
    state = chain.state_dict()
    fresh = FilterChain([Scale(1.0, []), Scale(1.0, [])])
    fresh.load_state_dict(state)
    assert [f.calls for f in fresh.filters] == [1, 1]
    with pytest.raises(KeyError):
        fresh.load_state_dict({"0": {"calls": 0}})


def test_make_generator():
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    c, d = make_generator(None), make_generator(None)
    assert not torch.equal(torch.rand(3, generator=c), torch.rand(3, generator=d))
    with pytest.raises(PrivacyConfigError):
        make_generator(True)  # type: ignore[arg-type]


def test_top_k_mask_breaks_ties_by_index():
    score = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    assert top_k_mask(score, 3).tolist() == [False, True, True, True, False, False]
    assert top_k_mask(score, 1).tolist() == [False, True, False, False, False, False]


def test_percentile_shares_largest_fraction():
    u = make_update()
    out = PercentileSharing(0.25, clip=None)(u)
    flat = torch.cat([u.delta["conv.weight"].reshape(-1), u.delta["conv.bias"].reshape(-1)])
    k = round(0.25 * flat.numel())
    mask = torch.cat([out.masks["conv.weight"].reshape(-1), out.masks["conv.bias"].reshape(-1)])
    assert int(mask.sum()) == k
    assert flat.abs()[mask].min() >= flat.abs()[~mask].max()
    shared = torch.cat([out.delta["conv.weight"].reshape(-1), out.delta["conv.bias"].reshape(-1)])
    assert torch.allclose(shared[mask], flat[mask])  # normalise then undo: identity without clipping
    assert torch.all(shared[~mask] == 0)
    assert not out.masks["norm.num_batches_tracked"].any() and int(out.delta["norm.num_batches_tracked"]) == 0
    priv = out.meta["privacy"]
    assert priv["dp"] is False and priv["filter_epsilon"] is None and priv["filters"][-1]["filter"] == "percentile"
    assert out.meta["note"] == [1, 2] and "privacy" not in u.meta and u.masks is None


def test_percentile_clip_acts_on_normalised_values():
    u = make_update(steps=4)
    gamma = 0.1
    out = PercentileSharing(0.5, clip=gamma)(u)
    w = out.delta["conv.weight"][out.masks["conv.weight"]]
    assert w.abs().max() <= gamma * 4 + 1e-6
    assert torch.isclose(w.abs().max(), torch.tensor(gamma * 4))  # the largest values really were clipped
    raw = PercentileSharing(0.5, clip=gamma, normalise_by_steps=False)(u)
    assert raw.delta["conv.weight"].abs().max() <= gamma + 1e-6


def test_percentile_ties_are_deterministic():
    delta = {"w": torch.ones(10)}
    u = ModelUpdate("s", 1, delta, 1, 1)
    out = PercentileSharing(0.3)(u)
    assert out.masks["w"].tolist() == [True] * 3 + [False] * 7


def test_percentile_on_sparse_input_and_upstream_dp():
    u = make_update()
    first = PercentileSharing(0.5)(u)
    first.meta["privacy"]["dp"] = True  # e.g. the update came from DP-SGD: percentile is post-processing
    second = PercentileSharing(0.5)(first)
    assert not (second.masks["conv.weight"] & ~first.masks["conv.weight"]).any()
    assert second.meta["privacy"]["dp"] is True
    assert [f["filter"] for f in second.meta["privacy"]["filters"]] == ["percentile", "percentile"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"fraction": True},
        {"fraction": 0.1, "clip": 0.0},
        {"fraction": 0.1, "clip": float("inf")},
    ],
)
def test_percentile_bad_parameters(kwargs):
    with pytest.raises(PrivacyConfigError):
        PercentileSharing(**kwargs)


def test_percentile_refuses_zero_steps():
    with pytest.raises(UpdateError, match="local_steps=0"):
        PercentileSharing(0.1)(make_update(steps=0))
