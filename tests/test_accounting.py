import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.calibration import solve_noise_multiplier

HISTORY = [(0.01, 1.0, 300), (0.02, 1.5, 120), (0.01, 1.0, 80)]  # (q, sigma, steps)


def _ledger(history=HISTORY, step_by_step=False):
    ledger = PrivacyLedger()
    for q, sigma, steps in history:
        if step_by_step:
            for _ in range(steps):
                ledger.record_sampled_gaussian(q, sigma)
        else:
            ledger.record_sampled_gaussian(q, sigma, steps=steps)
    return ledger


@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_rdp_matches_independent_opacus_accountant(delta):
    ledger = _ledger(step_by_step=True)
    ref = RDPAccountant()
    for q, sigma, steps in HISTORY:
        for _ in range(steps):
            ref.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.steps == 500
    assert ledger.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


def test_prv_matches_independent_opacus_accountant():
    ledger = _ledger()
    ref = PRVAccountant()
    ref.history = [(sigma, q, steps) for q, sigma, steps in HISTORY]
    assert ledger.epsilon(1e-5, accountant="prv") == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    # PRV is tighter than RDP for the same history.
    assert ledger.epsilon(1e-5, "prv") < ledger.epsilon(1e-5, "rdp")


def test_unsampled_gaussian_is_q_equal_one():
    ledger = PrivacyLedger()
    ledger.record_gaussian(2.0, count=5)
    ref = RDPAccountant()
    ref.history = [(2.0, 1.0, 5)]
    assert ledger.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert ledger.steps == 0


def test_events_merge_and_epsilon_is_monotone():
    ledger = _ledger(step_by_step=True)
    assert len(ledger.events) == 3
    before = ledger.epsilon(1e-5)
    ledger.record_sampled_gaussian(0.01, 1.0)
    assert ledger.epsilon(1e-5) > before
    assert PrivacyLedger().epsilon(1e-5) == 0.0


def test_state_dict_round_trip_restores_epsilon_exactly():
    ledger = _ledger()
    ledger.record_pure(0.05, label="svt", count=3)
    state = json.loads(json.dumps(ledger.state_dict()))  # survives JSON checkpointing
    restored = PrivacyLedger()
    restored.load_state_dict(state)
    assert restored.events == ledger.events
    assert restored.steps == ledger.steps
    assert restored.epsilon(1e-5) == ledger.epsilon(1e-5)
    with pytest.raises(PrivacyConfigError):
        restored.load_state_dict({"events": [{"kind": "laplace?", "epsilon": 1.0}]})
    with pytest.raises(PrivacyConfigError):
        restored.load_state_dict({"nothing": []})


def test_pure_events_compose():
    one = PrivacyLedger()
    one.record_pure(0.5)
    many = PrivacyLedger()
    many.record_pure(0.5, count=4)
    # A few pure releases: basic composition (sum) is the bound, and it is never exceeded.
    assert one.epsilon(1e-5) == pytest.approx(0.5)
    assert many.epsilon(1e-5) == pytest.approx(2.0)
    # Many small releases: the zCDP route (Bun & Steinke) beats the linear sum.
    lots = PrivacyLedger()
    lots.record_pure(0.01, count=2000)
    eps = lots.epsilon(1e-5)
    assert eps < 0.5 * 20.0
    assert eps > 0.01 * math.sqrt(2000)  # cannot beat the sqrt(k) advanced-composition scale
    # Mixed ledger: never more than Gaussian epsilon + sum of pure epsilons, and more than the Gaussian alone.
    mixed = _ledger()
    gauss = mixed.epsilon(1e-5)
    mixed.record_pure(0.2, count=2)
    assert gauss < mixed.epsilon(1e-5) <= gauss + 0.4 + 1e-12


def test_prv_refuses_pure_events():
    ledger = _ledger()
    ledger.record_pure(0.1)
    with pytest.raises(PrivacyConfigError, match="pure"):
        ledger.epsilon(1e-5, accountant="prv")


@pytest.mark.parametrize(
    "call",
    [
        lambda led: led.record_sampled_gaussian(0.0, 1.0),
        lambda led: led.record_sampled_gaussian(1.5, 1.0),
        lambda led: led.record_sampled_gaussian(0.1, -1.0),
        lambda led: led.record_sampled_gaussian(0.1, float("nan")),
        lambda led: led.record_sampled_gaussian(0.1, 1.0, steps=0),
        lambda led: led.record_gaussian(1.0, count=1.5),
        lambda led: led.record_pure(0.0),
        lambda led: led.epsilon(0.0),
        lambda led: led.epsilon(1.0),
        lambda led: led.epsilon(1e-5, accountant="gdp"),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(PrivacyConfigError):
        call(PrivacyLedger())


def test_solve_noise_multiplier_reaches_target():
    sigma = solve_noise_multiplier(3.0, sample_rate=0.02, steps=500, delta=1e-5)
    ledger = PrivacyLedger()
    ledger.record_sampled_gaussian(0.02, sigma, steps=500)
    assert 2.95 <= ledger.epsilon(1e-5) <= 3.0
    with pytest.raises(PrivacyConfigError):
        solve_noise_multiplier(-1.0, 0.02, 500, 1e-5)
    with pytest.raises(PrivacyConfigError):
        solve_noise_multiplier(3.0, 0.02, 500, 1e-5, accountant="moments")


# ---------------------------------------------------------------- regimes (Table 1 of seed 000)
from monai_fedpriv.privacy.regimes import PrivacyRegime, get_regime  # noqa: E402


def test_regimes_follow_table_1():
    table = {"low": (0.8, 1.0, 5.98, 11.5), "medium": (1.0, 0.5, 3.58, 7.08), "high": (1.5, 0.1, 1.82, 3.54)}
    for name, (sigma, clip, eps_local, eps_fed) in table.items():
        fed, local = get_regime(name), get_regime(name, setting="local")
        assert (fed.noise_multiplier, fed.max_grad_norm, fed.delta, fed.budget) == (sigma, clip, 1e-5, eps_fed)
        assert local.budget == eps_local
    assert get_regime("high", budget=None).budget is None
    custom = get_regime("custom", noise_multiplier=2.0, max_grad_norm=0.3, budget=None)
    assert custom.delta == 1e-5 and custom.budget is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0, "max_grad_norm": 1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": -1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "budget": 0.0},
        {"noise_multiplier": float("inf"), "max_grad_norm": 1.0},
        {"noise_multiplier": "1", "max_grad_norm": 1.0},
    ],
)
def test_bad_regime_raises(kwargs):
    with pytest.raises(PrivacyConfigError):
        PrivacyRegime("custom", **kwargs)


def test_get_regime_rejects_unknown():
    with pytest.raises(PrivacyConfigError):
        get_regime("extreme")
    with pytest.raises(PrivacyConfigError):
        get_regime("low", setting="central")
    with pytest.raises(PrivacyConfigError):
        get_regime("custom", noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError):
        get_regime("low", clip=2.0)
