"""The Gaussian mechanism on FedReplay's one-time latent upload (:mod:`monai_fedpriv.privacy.filters.latents`): the
noise has the scale its docstring derives (latents ``sigma C``, labels ``sigma sqrt(label size)`` in label units),
each item's latent is clipped to ``C``, one upload charges one Gaussian release of noise multiplier
``sigma / sqrt(5 k)`` (checked against closed forms and a second accountant), a release past the budget records
nothing, bad settings and inputs are refused, and the filter chain judges coverage per message kind."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError, UpdateError
from monai_fedpriv.fl.messages import LatentUpload
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.accounting import RDP_ORDERS, GaussianEvent, PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters import FilterChain, LatentGaussianPrivacy, copy_update, latent_event

DELTA = 1e-5
FLAG = "--latents-unprotected"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_upload(n=64, channels=4, side=8, label_side=16, k=1, latent_norm=None, seed=0, dtype=torch.float32):
    """``n`` items: latents ``[n, channels, side, side]`` (each row of norm ``latent_norm`` when given), binary
    labels ``[n, 1, label_side, label_side]``."""
    g = _gen(seed)
    latents = torch.randn(n, channels, side, side, generator=g, dtype=torch.float64)
    if latent_norm is not None:
        flat = latents.reshape(n, -1)
        latents = (flat / flat.norm(dim=1, keepdim=True) * torch.as_tensor(latent_norm, dtype=torch.float64).reshape(
            -1, 1)).reshape(latents.shape)  # fmt: skip
    labels = (torch.rand(n, 1, label_side, label_side, generator=g) < 0.3).float()
    return LatentUpload("site-1", 2, latents.to(dtype), labels, {"items_per_unit": k, "protected": False})


def budget(limit=100.0, accountant="rdp") -> PrivacyBudget:
    return PrivacyBudget(limit=limit, delta=DELTA, accountant=accountant)


def mechanism(clip=1.0, sigma=1.0, limit=100.0, seed=0, **kw) -> LatentGaussianPrivacy:
    return LatentGaussianPrivacy(clip, sigma, budget(limit, **kw), seed)


# ---------------------------------------------------------------------------------------------------- noise scale
def test_the_noise_has_the_derived_scale_on_latents_and_labels():
    """With ``C`` far above every latent's norm nothing is clipped, so ``out - in`` is the noise: std ``sigma C`` per
    latent coordinate; labels are scaled by ``C / sqrt(D)`` before the same noise and back after, so their noise is
    ``sigma C / (C / sqrt(D)) = sigma sqrt(D)`` in label units (D = 256 label pixels per item)."""
    sigma, clip = 0.5, 10.0
    up = make_upload(n=64, latent_norm=1.0, dtype=torch.float64)
    out = mechanism(clip, sigma, seed=11)(up)
    noise = (out.latents - up.latents).reshape(-1).double()
    assert noise.numel() == 64 * 256
    std_err = 1 / math.sqrt(2 * noise.numel())  # relative standard error of a std estimate
    assert noise.std().item() == pytest.approx(sigma * clip, rel=max(0.03, 5 * std_err))
    assert abs(noise.mean().item()) < 5 * sigma * clip / math.sqrt(noise.numel())
    assert (noise.abs() < sigma * clip).double().mean().item() == pytest.approx(0.6827, abs=0.02)  # Gaussian
    label_noise = (out.labels.double() - up.labels.double()).reshape(-1)
    d = up.labels[0].numel()
    assert d == 256
    assert label_noise.std().item() == pytest.approx(sigma * math.sqrt(d), rel=0.03)
    assert abs(label_noise.mean().item()) < 5 * sigma * math.sqrt(d) / math.sqrt(label_noise.numel())
    privacy = out.meta["privacy"]
    assert privacy["noise_std"] == pytest.approx(sigma * clip)
    assert privacy["label_scale"] == pytest.approx(clip / math.sqrt(d))
    # the noise is drawn fresh for each coordinate: latent and label noise are uncorrelated
    m = min(noise.numel(), label_noise.numel())
    assert abs(np.corrcoef(noise[:m].numpy(), label_noise[:m].numpy())[0, 1]) < 0.05


def test_the_output_keeps_shapes_and_dtypes_and_leaves_the_input_alone():
    up = make_upload(n=5)
    before = (up.latents.clone(), up.labels.clone(), dict(up.meta))
    out = mechanism(seed=3)(up)
    assert out is not up and isinstance(out, LatentUpload)
    assert out.latents.shape == up.latents.shape and out.latents.dtype == up.latents.dtype
    assert out.labels.shape == up.labels.shape
    assert (out.site, out.round, out.step) == (up.site, up.round, up.step)
    assert torch.equal(up.latents, before[0]) and torch.equal(up.labels, before[1]) and up.meta == before[2]
    assert out.meta["protected"] is True and up.meta["protected"] is False
    assert not torch.equal(out.latents, up.latents)


# ---------------------------------------------------------------------------------------------------- clipping
def test_clipping_bounds_each_items_latent_norm_and_keeps_its_direction():
    """Noise ``1e-6 C`` (on a budget that allows it) so that what is left is the clipping: items above ``C`` come
    back at norm ``C`` in their own direction, items below are unchanged."""
    clip = 2.0
    norms = torch.tensor([0.01, 0.5, 1.99, 2.0, 2.01, 5.0, 100.0, 1e6], dtype=torch.float64)
    up = make_upload(n=len(norms), latent_norm=norms, dtype=torch.float64)
    out = LatentGaussianPrivacy(clip, 1e-6, budget(limit=1e15), 0)(up)
    tol = 1e-6 * clip * 16 * 8  # a few noise stds times sqrt(256 coordinates), generously
    flat_in, flat_out = up.latents.reshape(len(norms), -1), out.latents.reshape(len(norms), -1)
    out_norms = flat_out.norm(dim=1)
    assert torch.all(out_norms <= clip + tol), out_norms
    for i, n in enumerate(norms.tolist()):
        if n <= clip:
            assert torch.allclose(flat_out[i], flat_in[i], atol=tol), i
        else:
            assert out_norms[i].item() == pytest.approx(clip, abs=tol)
            cosine = torch.nn.functional.cosine_similarity(flat_out[i], flat_in[i], dim=0).item()
            assert cosine == pytest.approx(1.0, abs=1e-6), i


# ---------------------------------------------------------------------------------------------------- accounting
def _rdp_gaussian_epsilon(z: float, delta: float, orders) -> float:
    """Closed form: the Gaussian mechanism's RDP ``alpha / (2 z^2)`` converted with Balle et al. 2020, Thm 21."""
    a = np.asarray(orders, dtype=np.float64)
    return float(np.min(a / (2 * z * z) + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1)))


def _exact_gaussian_epsilon(z: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism of noise multiplier ``z`` at ``delta`` (analytic Gaussian
    mechanism, Balle & Wang 2018): the root of ``Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z) = delta``."""
    return brentq(lambda e: norm.cdf(1 / (2 * z) - e * z) - math.exp(e) * norm.cdf(-1 / (2 * z) - e * z) - delta,
                  0.0, 200.0)  # fmt: skip


@pytest.mark.parametrize("sigma,k", [(1.0, 1), (2.0, 3), (4.0, 1), (1.0, 4)])
def test_one_upload_charges_one_gaussian_release_of_sigma_over_sqrt_5k(sigma, k):
    b = budget(limit=200.0)
    f = LatentGaussianPrivacy(1.0, sigma, b, 5)
    out = f(make_upload(n=3 * k, k=k))
    z = sigma / math.sqrt(5 * k)
    assert latent_event(sigma, k) == GaussianEvent(z)
    assert b.ledger.events == [{"kind": "gaussian", "noise_multiplier": pytest.approx(z), "count": 1}]
    eps = b.epsilon()
    assert eps == pytest.approx(PrivacyLedger().epsilon_with([GaussianEvent(z)], DELTA), rel=1e-12)
    # independent computations: the closed-form RDP bound at the ledger's orders is the same number; over a fine
    # grid of orders it is at most a little lower; the exact epsilon (and the PRV accountant's) is below it
    assert eps == pytest.approx(_rdp_gaussian_epsilon(z, DELTA, RDP_ORDERS), rel=1e-9)
    fine = _rdp_gaussian_epsilon(z, DELTA, np.linspace(1.001, 4000.0, 400_000))
    assert fine <= eps * (1 + 1e-9) and eps <= fine * 1.01
    exact = _exact_gaussian_epsilon(z, DELTA)
    assert exact <= eps <= 1.15 * exact
    assert PrivacyLedger().epsilon_with([GaussianEvent(z)], DELTA, "prv") == pytest.approx(exact, rel=0.02)
    privacy = out.meta["privacy"]
    assert privacy["epsilon"] == pytest.approx(eps)
    assert privacy["recorded_noise_multiplier"] == pytest.approx(z)
    assert privacy["items_per_unit"] == k and privacy["noise_multiplier"] == sigma and privacy["dp"] is True
    assert privacy["budget"] == 200.0 and privacy["delta"] == DELTA and privacy["accountant"] == "rdp"
    assert f.released == 1


def test_a_second_upload_composes_with_the_first_and_the_prv_accountant_is_used_when_asked():
    b = budget(limit=200.0)
    f = LatentGaussianPrivacy(1.0, 2.0, b, 0)
    f(make_upload(n=4))
    f(make_upload(n=4, seed=1))
    z = 2.0 / math.sqrt(5)
    assert b.ledger.events == [{"kind": "gaussian", "noise_multiplier": pytest.approx(z), "count": 2}]
    assert b.epsilon() == pytest.approx(PrivacyLedger().epsilon_with([GaussianEvent(z, 2)], DELTA))
    p = budget(limit=200.0, accountant="prv")
    out = LatentGaussianPrivacy(1.0, 2.0, p, 0)(make_upload(n=4))
    assert out.meta["privacy"]["accountant"] == "prv"
    assert p.epsilon() == pytest.approx(_exact_gaussian_epsilon(z, DELTA), rel=0.02)


def test_a_release_past_the_budget_is_refused_and_records_nothing():
    """The construction check costs one item per unit (k = 1, epsilon 12.30 at sigma 1); an upload of k = 4 items
    per unit costs 30.13: with budget 20 the filter is built and the release is refused."""
    cost1 = PrivacyLedger().epsilon_with([latent_event(1.0, 1)], DELTA)
    cost4 = PrivacyLedger().epsilon_with([latent_event(1.0, 4)], DELTA)
    assert cost1 < 20.0 < cost4
    b = budget(limit=20.0)
    f = LatentGaussianPrivacy(1.0, 1.0, b, 0)
    state = f.generator.get_state()
    up = make_upload(n=8, k=4)
    with pytest.raises(PrivacyBudgetExceeded, match=r"release refused, epsilon would reach 30\.1266 > 20"):
        f(up)
    assert b.epsilon() == 0.0 and b.ledger.events == [] and f.released == 0
    assert b.exhausted  # the site is out of budget for this mechanism's release
    assert torch.equal(f.generator.get_state(), state)  # no noise was drawn either
    # through the site's chain: the chain fails closed (nothing comes back), the cause is the refusal
    with pytest.raises(RuntimeError, match="LatentGaussianPrivacy") as info:
        FilterChain([f])(up)
    assert isinstance(info.value.__cause__, PrivacyBudgetExceeded)
    assert b.epsilon() == 0.0 and b.ledger.events == []


def test_earlier_spending_counts_against_the_upload():
    b = budget(limit=20.0)
    f = LatentGaussianPrivacy(1.0, 1.0, b, 0)  # one upload of k = 1: 12.30
    b.record(GaussianEvent(0.4))  # something else the site released before (epsilon 14.13)
    before = b.ledger.events
    spent = b.epsilon()
    assert PrivacyLedger().epsilon_with([GaussianEvent(0.4), latent_event(1.0, 1)], DELTA) > 20.0 > spent
    with pytest.raises(PrivacyBudgetExceeded):
        f(make_upload(n=4, k=1))
    assert b.ledger.events == before and b.epsilon() == spent <= 20.0


# ---------------------------------------------------------------------------------------------------- refusals
def test_construction_refuses_a_budget_without_a_limit_or_noise_one_upload_would_pass():
    with pytest.raises(PrivacyConfigError, match="finite epsilon budget"):
        LatentGaussianPrivacy(1.0, 1.0, PrivacyBudget(limit=None, delta=DELTA), 0)
    cost = PrivacyLedger().epsilon_with([latent_event(0.5, 1)], DELTA)
    with pytest.raises(PrivacyConfigError, match=r"--latent-noise-multiplier 0.5 costs epsilon 30.13 .* more than "
                                                 r"the budget 10"):  # fmt: skip
        LatentGaussianPrivacy(1.0, 0.5, budget(limit=10.0), 0)
    LatentGaussianPrivacy(1.0, 0.5, budget(limit=cost * 1.001), 0)  # just enough room for one upload
    for name, args in (("clip_norm", (0.0, 1.0)), ("clip_norm", (-1.0, 1.0)), ("noise_multiplier", (1.0, 0.0)),
                       ("noise_multiplier", (1.0, float("nan"))), ("clip_norm", (float("inf"), 1.0))):  # fmt: skip
        with pytest.raises(PrivacyConfigError, match=name):
            LatentGaussianPrivacy(*args, budget(), 0)
    with pytest.raises(PrivacyConfigError, match="PrivacyBudget"):
        LatentGaussianPrivacy(1.0, 1.0, PrivacyLedger(), 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [None, 0, -1, True, "2", 1.5])
def test_an_upload_that_does_not_say_its_items_per_unit_is_refused(k):
    b = budget()
    f = LatentGaussianPrivacy(1.0, 1.0, b, 0)
    up = make_upload(n=4)
    if k is None:
        del up.meta["items_per_unit"]
    else:
        up.meta["items_per_unit"] = k
    with pytest.raises(UpdateError, match=r"items_per_unit.*nothing was sent"):
        f(up)
    assert b.ledger.events == [] and f.released == 0


@pytest.mark.parametrize("bad", [2.0, -0.1, 1.0001])
def test_labels_outside_zero_one_are_refused_before_anything_is_charged(bad):
    b = budget()
    f = LatentGaussianPrivacy(1.0, 1.0, b, 0)
    up = make_upload(n=4)
    up.labels[1, 0, 3, 3] = bad
    with pytest.raises(UpdateError, match=r"labels of 'site-1' are not in \[0, 1\]"):
        f(up)
    assert b.ledger.events == [] and f.released == 0
    up.labels.clamp_(0, 1)
    f(up)  # soft labels inside [0, 1] are fine
    assert f.released == 1


def test_the_filter_protects_only_uploads():
    f = LatentGaussianPrivacy(1.0, 1.0, budget(), 0)
    with pytest.raises(UpdateError, match="protects a latent upload, got ModelUpdate"):
        f(ModelUpdate("site-1", 1, {"w": torch.ones(2)}, 1, 1))


# ---------------------------------------------------------------------------------------------------- coverage
def test_an_upload_no_filter_covers_is_refused_unless_opted_out():
    with pytest.raises(PrivacyConfigError, match=FLAG) as info:
        FilterChain([]).require_covered("latents", False, FLAG)
    assert "latents.labels" in str(info.value) and "latents.latents" in str(info.value)
    FilterChain([]).require_covered("latents", True, FLAG)
    FilterChain([LatentGaussianPrivacy(1.0, 1.0, budget(), 0)]).require_covered("latents", False, FLAG)

    class LatentsOnly:  # covers the latents but not the labels: still not covered
        covers = frozenset({"latents.latents"})

        def __call__(self, upload):
            return LatentUpload(upload.site, upload.round, upload.latents.clone(), upload.labels.clone(),
                                dict(upload.meta), upload.step)  # fmt: skip

    with pytest.raises(PrivacyConfigError, match=r"\['latents.labels'\].*--latents-unprotected"):
        FilterChain([LatentsOnly()]).require_covered("latents", False, FLAG)
    with pytest.raises(RuntimeError, match=r"carries \['latents.labels'\], which no filter covers"):
        FilterChain([LatentsOnly()])(make_upload(n=2))  # and the chain would not send such an upload either


def test_a_chain_with_only_the_latent_filter_passes_updates_unchanged_and_protects_uploads():
    b = budget()
    latent = LatentGaussianPrivacy(1.0, 1.0, b, 0)
    calls: list[str] = []

    class UpdateSpy:  # protects an update's delta; must never see an upload
        covers = frozenset({"update.delta"})

        def __call__(self, update):
            calls.append(update.kind)
            return copy_update(update)

    only_latent = FilterChain([latent])
    only_latent.check_coverage({"update.delta", "update.optimizer_state"})  # per kind: the update claims nothing
    assert only_latent.protects_kind("latents") and not only_latent.protects_kind("update")
    update = ModelUpdate("site-1", 1, {"w": torch.arange(4.0)}, 3, 2, meta={"privacy": {"x": 1}})
    sent = only_latent(update)
    assert sent is not update and sent.delta is not update.delta
    assert torch.equal(sent.delta["w"], update.delta["w"]) and sent.meta == update.meta
    assert (sent.site, sent.round, sent.n_samples, sent.local_steps) == ("site-1", 1, 3, 2)
    assert b.ledger.events == [] and latent.released == 0  # the latent filter never ran on the update

    both = FilterChain([UpdateSpy(), latent])
    out = both(make_upload(n=3))
    assert calls == [] and latent.released == 1 and out.meta["protected"] is True
    assert len(b.ledger.events) == 1
    both(update)
    assert calls == ["update"] and latent.released == 1 and len(b.ledger.events) == 1


def test_the_noise_stream_is_restored_from_its_state():
    f = mechanism(seed=9)
    f(make_upload(n=2))
    state = f.state_dict()
    first = f(make_upload(n=3, seed=4))
    g = mechanism(seed=123, limit=200.0)
    g.load_state_dict(state)
    again = g(make_upload(n=3, seed=4))
    assert g.released == 2
    assert torch.equal(first.latents, again.latents) and torch.equal(first.labels, again.labels)
