"""Distributed DP under secure aggregation: the sum's noise has the stated variance (a test that fails at half or
double), the encoding decodes to the sum of the clipped updates, and the Skellam accounting matches an independent
computation (and its RDP bound holds against the exact Renyi divergence)."""

from __future__ import annotations

import math
import secrets

import numpy as np
import pytest
from scipy import stats

from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.events import SkellamEvent
from monai_fedpriv.secagg import Session, secure_sum
from monai_fedpriv.secagg.ddp import DistributedDP, hadamard


def _sites(n: int) -> tuple[str, ...]:
    return tuple(f"site-{i}" for i in range(1, n + 1))


def test_the_hadamard_rotation_is_orthonormal_and_its_own_inverse():
    x = np.random.default_rng(0).normal(size=64)
    assert np.allclose(hadamard(hadamard(x)), x)
    assert math.isclose(np.linalg.norm(hadamard(x)), np.linalg.norm(x))


@pytest.mark.parametrize("drop", [None, "site-4"])
def test_the_sums_noise_has_the_stated_variance_and_the_signal_survives(drop):
    n, n_min, d, z, clip = 5, 3, 1 << 15, 1.0, 1.0
    ddp = DistributedDP(d, clip, z, 16, n, n_min, rotation_seed=5)
    rng = np.random.default_rng(1)
    # site-2 sends a large update: it is clipped
    updates = {s: rng.normal(size=d) * (0.5 if s != "site-2" else 5.0) / math.sqrt(d) for s in _sites(n)}
    clipped = {s: u * min(1.0, clip / np.linalg.norm(u)) for s, u in updates.items()}
    encoded = {s: ddp.encode(u, np.random.default_rng(100 + i)) for i, (s, u) in enumerate(updates.items())}
    out = secure_sum(Session(secrets.token_hex(8), 1, _sites(n), n_min, 16), encoded,
                     drop_before_send={drop} if drop else set())  # fmt: skip
    survivors = [s for s in _sites(n) if s != drop]
    error = ddp.decode(out.total) - sum(clipped[s] for s in survivors)
    stated = (z * clip) ** 2 * len(survivors) / n_min  # each survivor adds variance / n_min
    ratio = float(error.var()) / stated
    assert abs(ratio - 1) < 0.05, ratio  # half (0.5) or double (2.0) the stated variance fails
    assert abs(float(error.mean())) < 4 * math.sqrt(stated / d)  # unbiased


def test_secure_aggregation_without_noise_decodes_to_the_sum_within_rounding():
    n, d = 4, 5000
    ddp = DistributedDP(d, 1.0, 0.0, 16, n, 3, rotation_seed=2)
    rng = np.random.default_rng(3)
    updates = {s: rng.normal(size=d) * 0.3 / math.sqrt(d) for s in _sites(n)}
    encoded = {s: ddp.encode(u, np.random.default_rng(i)) for i, (s, u) in enumerate(updates.items())}
    out = secure_sum(Session(secrets.token_hex(8), 1, _sites(n), 3, 16), encoded)
    error = ddp.decode(out.total) - sum(updates.values())
    assert float(np.abs(error).max()) < n / ddp.scale  # at most one integer unit per site per coordinate
    with pytest.raises(ValueError, match="nothing to account"):
        ddp.event()


def _independent_epsilon(l1: float, l2: float, mu: float, count: int, delta: float) -> float:
    """The paper's bound at integer orders, composed ``count`` times, converted as Balle et al. 2020 (Thm 21)."""
    best = math.inf
    for a in range(2, 257):
        rdp = count * (a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu)))
        best = min(best, rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return best


@pytest.mark.parametrize("z,rounds", [(0.7, 1), (1.0, 10), (2.0, 50)])
def test_skellam_epsilon_in_the_ledger_matches_an_independent_accountant(z, rounds):
    ddp = DistributedDP(100_000, 1.0, z, 16, 10, 6, rotation_seed=0)
    ledger = PrivacyLedger()
    for _ in range(rounds):
        ledger.record(ddp.event())
    event = ddp.event()
    expected = _independent_epsilon(event.l1, event.l2, event.variance, rounds, 1e-5)
    assert ledger.epsilon(1e-5) == pytest.approx(expected, rel=1e-6)
    restored = PrivacyLedger()
    restored.load_state_dict(ledger.state_dict())  # the event survives a checkpoint
    assert restored.epsilon(1e-5) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mu", [2.0, 8.0, 50.0])
def test_the_skellam_rdp_bound_holds_against_the_exact_renyi_divergence(mu):
    """Scalar Skellam of variance mu, neighbours shifted by 1 (l1 = l2 = 1): the exact divergence, summed over the
    support, never exceeds the bound the ledger uses."""
    from monai_fedpriv.privacy.skellam import skellam_rdp

    k = np.arange(-300, 301)
    log_p = stats.skellam.logpmf(k, mu / 2, mu / 2)
    log_q = stats.skellam.logpmf(k - 1, mu / 2, mu / 2)
    keep = np.isfinite(log_p) & np.isfinite(log_q) & (log_p > -600) & (log_q > -600)
    for a in (2, 3, 5, 10, 20):
        terms = a * log_p[keep] + (1 - a) * log_q[keep]
        exact = float(np.log(np.sum(np.exp(terms - terms.max()))) + terms.max()) / (a - 1)
        bound = skellam_rdp(a, 1.0, 1.0, mu)
        assert exact <= bound + 1e-12
        if mu >= 50:  # and tight where the noise is large (it tends to the Gaussian's alpha / (2 mu))
            assert bound <= exact * 1.2 + 1e-3


def test_the_prv_accountant_refuses_skellam_releases():
    from monai_fedpriv.errors import PrivacyConfigError
    from monai_fedpriv.privacy.events import check_accountant_supports

    ledger = PrivacyLedger()
    ledger.record(SkellamEvent(10.0, 10.0, 100.0))
    with pytest.raises(PrivacyConfigError, match="Skellam"):
        ledger.epsilon(1e-5, "prv")
    with pytest.raises(PrivacyConfigError, match="Skellam"):
        check_accountant_supports("prv", [SkellamEvent(1.0, 1.0, 1.0)])


def test_many_sites_over_a_small_threshold_do_not_wrap_the_ring():
    """Twenty shares each sized for 3 survivors: the sum's noise is sqrt(20 / 3) times the stated minimum; the scale
    keeps it inside 16 bits (a wrapped coordinate would fold the noise and shrink its variance)."""
    n, n_min, d = 20, 3, 1 << 13
    ddp = DistributedDP(d, 1.0, 1.0, 16, n, n_min, rotation_seed=9)
    rng = np.random.default_rng(4)
    updates = {s: rng.normal(size=d) / math.sqrt(d) for s in _sites(n)}
    encoded = {s: ddp.encode(u, np.random.default_rng(i)) for i, (s, u) in enumerate(updates.items())}
    out = secure_sum(Session(secrets.token_hex(8), 1, _sites(n), n_min, 16, neighbours=4), encoded)
    clipped = sum(u * min(1.0, 1.0 / np.linalg.norm(u)) for u in updates.values())
    ratio = float((ddp.decode(out.total) - clipped).var()) / (n / n_min)
    assert abs(ratio - 1) < 0.06, ratio
