"""DP-SGD at every site of the in-process simulator (issue 3): per-round privacy facts, resume, budget stop and
checkpoints that load into the plain bundle network. Tiny bundle (2 sites x 6 cases of 32x32, batch 2 -> q = 1/3)."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
from monai_fedpriv.experiments import bundle_datalist, split_sites
from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.report.markdown import privacy_section
from tests.conftest import BUNDLE_DIR, assert_same_run, tiny_overrides

PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant", "budget")
SIGMA, CLIP, DELTA = 1.5, 1.0, 1e-5


def _dp_bundle(data_dir, budget=None, policy="stop_site"):
    overrides = {
        **tiny_overrides(data_dir),
        "batch_size": 2,
        "dp_example_input_shape": [2, 1, 32, 32],
        "dp_regime_def": {
            "_target_": "monai_fedpriv.privacy.regimes.get_regime",
            "name": "custom",
            "noise_multiplier": SIGMA,
            "max_grad_norm": CLIP,
            "delta": DELTA,
            "budget": budget,
        },
        "privacy_policy": policy,
    }
    return BundleSpec(BUNDLE_DIR, ("train.json", "budget.json", "dp.json"), overrides)


def _sim(bundle, out, rounds, work=None, **kw):
    split = split_sites(bundle_datalist(bundle), 2, "institution", seed=0)
    return FederatedSimulator(
        bundle, split.train, split.val, rounds, work or LocalWork(epochs=1), out, progress=False, **kw
    )


def _opacus_epsilon(q, sigma, steps, delta):
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


def test_every_round_reports_privacy_matching_an_independent_accountant(tiny_data, tmp_path):
    _sim(_dp_bundle(tiny_data), tmp_path, 2).run()
    m = json.loads((tmp_path / "metrics.json").read_text())
    previous = {}
    for r in m["rounds"]:
        for site, res in r["sites"].items():
            p = res["privacy"]
            for key in PRIVACY_KEYS:
                assert key in p, (r["round"], site, key)
            assert p["accountant"] == "rdp" and p["delta"] == DELTA and p["budget"] is None
            assert p["noise_multiplier"] == SIGMA and p["max_grad_norm"] == CLIP
            assert p["sample_rate"] == pytest.approx(2 / 6)
            # local_steps counts logical optimiser steps, noise-only steps on empty Poisson draws included: exactly
            # the DP-SGD steps the ledger recorded this round (the server weights at most the steps it asked for, and
            # records the claim beside them when it is more)
            claimed = res.get("local_steps_claimed", res["local_steps"])
            assert p["steps"] == claimed + previous.get(site, 0)
            previous[site] = p["steps"]
            assert p["epsilon"] == pytest.approx(_opacus_epsilon(p["sample_rate"], SIGMA, p["steps"], DELTA), rel=1e-9)
        eps = {s: res["privacy"]["epsilon"] for s, res in r["sites"].items()}
        assert r["global"]["privacy"]["epsilon"] == max(eps.values())
        assert r["global"]["privacy"]["per_site"] == eps
    assert previous["site-1"] >= 2 * 3


def test_resume_under_dp_gives_identical_weights_and_epsilon(tiny_data, tmp_path):
    bundle = _dp_bundle(tiny_data)
    full = _sim(bundle, tmp_path / "full", 2).run()
    _sim(bundle, tmp_path / "cut", 1).run()
    resumed = _sim(bundle, tmp_path / "cut", 2).run(resume=True)
    assert_same_run(full, resumed, tmp_path / "full", tmp_path / "cut")
    assert full["rounds"][-1]["global"]["privacy"]["epsilon"] == resumed["rounds"][-1]["global"]["privacy"]["epsilon"]


def _budget_between(steps):
    """An epsilon budget that allows exactly ``steps`` DP-SGD steps at q = 1/3."""
    lo, hi = PrivacyLedger(), PrivacyLedger()
    lo.record_sampled_gaussian(2 / 6, SIGMA, steps)
    hi.record_sampled_gaussian(2 / 6, SIGMA, steps + 1)
    return (lo.epsilon(DELTA) + hi.epsilon(DELTA)) / 2


def test_budget_stops_sites_before_epsilon_passes_it(tiny_data, tmp_path):
    budget = _budget_between(5)  # about 3 steps per round: the budget runs out in round 2
    m = _sim(_dp_bundle(tiny_data, budget=budget), tmp_path, 3).run()
    for r in m["rounds"]:
        for site, res in r["sites"].items():
            assert res["privacy"]["epsilon"] <= budget, (r["round"], site)
            assert res["privacy"]["budget"] == budget
        assert r["global"]["privacy"]["epsilon"] <= budget
    last = m["rounds"][-1]
    assert m["final"]["rounds_completed"] == 2  # every site stopped in round 2: the run ends
    for site, res in last["sites"].items():
        assert res["stopped"].startswith("privacy budget exhausted: the next DP-SGD step")
        assert res["privacy"]["exhausted"] is True and res["privacy"]["steps"] == 5
        # the steps taken before the stop are sent (post-processing); the refused step is not counted
        spent_in_round = res["privacy"]["steps"] - m["rounds"][0]["sites"][site]["privacy"]["steps"]
        assert 1 <= res["local_steps"] == spent_in_round
    assert m["rounds"][0]["sites"]["site-1"]["privacy"]["exhausted"] is False
    text = "\n".join(privacy_section(m))
    assert f"epsilon = {last['global']['privacy']['epsilon']:.2f}" in text
    assert "Sites stopped on their privacy budget: site-1 in round 2, site-2 in round 2." in text
    assert "stopped round 2 (privacy budget exhausted" in text
    # stop_site: when the last site stops, metrics.json says why the federation ended
    assert m["stopped"]["round"] == 2 and m["stopped"]["reason"].startswith("every site has stopped")


def test_stop_federation_ends_the_run_when_one_site_is_exhausted(tiny_data, tmp_path):
    budget = _budget_between(4)
    sim = _sim(_dp_bundle(tiny_data, budget=budget, policy="stop_federation"), tmp_path, 3)
    sim.setup()
    sim.sites["site-2"].stateful["privacy_budget"].budget.limit = None  # only site-1 runs out
    m = sim.run()
    assert m["final"]["rounds_completed"] == 2
    assert m["rounds"][-1]["sites"]["site-1"]["stopped"].startswith("privacy budget exhausted")
    assert "stopped" not in m["rounds"][-1]["sites"]["site-2"]
    assert m["stopped"]["reason"].startswith("privacy budget")
    again = _sim(_dp_bundle(tiny_data, budget=budget, policy="stop_federation"), tmp_path, 3)
    resumed = again.run(resume=True)  # the federation stays ended, and metrics.json keeps saying why
    assert resumed["final"]["rounds_completed"] == 2
    assert resumed["stopped"] == {"round": 2, "reason": m["stopped"]["reason"]}


def test_dp_checkpoint_loads_into_the_plain_bundle_network(tiny_data, tmp_path):
    _sim(_dp_bundle(tiny_data), tmp_path, 1).run()
    weights = torch.load(tmp_path / "models" / "model.pt")
    assert not [k for k in weights if "_module" in k]
    plain = load_bundle(BundleSpec(BUNDLE_DIR, ("train.json",), tiny_overrides(tiny_data)))
    net = plain.get_parsed_content("network_def")
    net.load_state_dict(weights, strict=True)
    out = net(torch.zeros(1, 1, 32, 32))
    assert out.shape == (1, 3, 32, 32)


def test_network_preparation_is_reported(tiny_data, tmp_path, capsys):
    """A BatchNorm network is converted under DP; the simulator says so, and metrics.json and the report keep it."""
    bundle = _dp_bundle(tiny_data)
    bundle = BundleSpec(bundle.root, bundle.config_files, {**bundle.overrides, "network_def#norm": "batch"})
    _sim(bundle, tmp_path, 1).run()
    m = json.loads((tmp_path / "metrics.json").read_text())
    for site in ("site-1", "site-2"):
        setup = m["setup"][site]
        assert setup["dp_grad_sample_mode"] == "hooks"
        assert any("BatchNorm2d -> InstanceNorm2d" in c for c in setup["dp_network_changes"])
    assert "BatchNorm2d -> InstanceNorm2d" in capsys.readouterr().out
    section = "\n".join(privacy_section(m))
    assert "Network preparation (site-1, site-2; per-sample gradients: `hooks`)" in section
    assert "BatchNorm2d -> InstanceNorm2d" in section
    # the server aggregates and evaluates the prepared network (no BatchNorm running statistics anywhere)
    weights = torch.load(tmp_path / "models" / "model.pt")
    assert not any("running_mean" in k for k in weights) and any(".N.weight" in k for k in weights)
    assert 0.0 < m["final"]["global_dice"] <= 1.0


def test_local_steps_count_logical_steps_with_physical_batches(tiny_data, tmp_path):
    """Physical sub-batches of one logical Poisson batch are one optimiser step (and one ledger event)."""
    bundle = _dp_bundle(tiny_data)
    bundle = BundleSpec(bundle.root, bundle.config_files, {**bundle.overrides, "batch_size": 4,
                                                           "dp_max_physical_batch_size": 1})  # fmt: skip
    sim = _sim(bundle, tmp_path, 2)
    m = sim.run()
    previous = {}
    for r in m["rounds"]:
        for site, res in r["sites"].items():
            assert res["local_steps"] == res["privacy"]["steps"] - previous.get(site, 0)
            previous[site] = res["privacy"]["steps"]
    iterations = sim.sites["site-1"].trainer.state.iteration
    assert iterations > previous["site-1"]  # more physical batches than logical steps
