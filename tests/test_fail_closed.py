"""Issue 9: every privacy path fails closed, end to end on the tiny bundle.

What crosses the wire is checked with a spy on the transport; epsilon against the budget over DP-SGD + SVT rounds;
the noise source in metrics.json; a resumed run that changed a setting is refused with the changed settings named.
"""

from __future__ import annotations

import json

import pytest
import torch

from monai_fedpriv.cli import main
from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.fl.transport import InProcessTransport
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.handlers.federated_sync import FederatedSync
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters import FilterChain, PercentileSharing, SparseVectorFilter, UpdateFilter, copy_update
from monai_fedpriv.privacy.noise import NOISE_SECURE, NOISE_SEEDED
from tests.conftest import BUNDLE_DIR

TINY = {"network_def#channels": [4, 8], "network_def#strides": [2], "batch_size": 4, "dp_example_input_shape": None}


@pytest.fixture()
def bundle(tiny_data, tmp_path):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    for f in ("train.json", "metadata.json"):
        (root / "configs" / f).write_text((BUNDLE_DIR / "configs" / f).read_text())
    (root / "configs" / "tiny.json").write_text(json.dumps({**TINY, "dataset_dir": str(tiny_data)}))
    return root


def simulate(bundle, out, *extra, rounds=2, steps=2, sites=2):
    argv = ["simulate", str(bundle), "--sites", str(sites), "--rounds", str(rounds), "--local-steps", str(steps)]
    argv += ["--output", str(out), "--config-files", "train.json", "fed.json", "tiny.json", "--partition", "iid"]
    return main([*argv, "--no-report", *extra])


class SpyTransport(InProcessTransport):
    """Records exactly what each site hands to the transport (after its filters)."""

    sent: list[ModelUpdate] = []

    def send(self, update: ModelUpdate) -> None:
        SpyTransport.sent.append(update)
        super().send(update)


@pytest.fixture()
def spy(monkeypatch):
    SpyTransport.sent = []
    monkeypatch.setattr("monai_fedpriv.fl.simulator.simulator.InProcessTransport", SpyTransport)
    return SpyTransport.sent


# ---------------------------------------------------------------- item 1: what leaves a site is covered
def test_optimizer_moments_never_travel_beside_a_filter_that_does_not_cover_them(bundle, tmp_path, capsys, spy):
    for share in (["--share", "svt", "--epsilon-budget", "50"], ["--share", "percentile"], ["--share", "gaussian",
                  "--gaussian-clip", "1", "--gaussian-noise", "1", "--epsilon-budget", "50"]):  # fmt: skip
        assert simulate(bundle, tmp_path / "refused", *share, "--momentum", "aggregate") == 2
        err = capsys.readouterr().err
        assert "optimizer_state" in err and "--momentum aggregate" in err, err
    assert spy == [] and not (tmp_path / "refused").exists()  # refused before any work
    # under DP-SGD the moments are post-processing of noised gradients: they may travel, and DP-SGD vouches
    assert simulate(bundle, tmp_path / "dp", "--privacy", "low", "--share", "svt", "--momentum", "aggregate") == 0
    assert spy and all(u.optimizer_state is not None and u.meta["privacy"]["dp_sgd"] for u in spy)
    assert all(u.masks is not None for u in spy)  # the delta went through SVT


def test_a_filter_that_adds_an_uncovered_field_sends_nothing():
    class AddsMoments(UpdateFilter):
        def __call__(self, update):
            return copy_update(update, optimizer_state={"w/exp_avg": torch.ones(2)})

    budget = PrivacyBudget(limit=10.0)
    svt = SparseVectorFilter(0.5, 1.0, 1.0, 1.0, clip=1.0, threshold=0.0, budget=budget, generator=0)
    update = ModelUpdate("s", 1, {"w": torch.ones(2)}, 1, 1)
    with pytest.raises(RuntimeError, match="optimizer_state"):
        FilterChain([svt, AddsMoments()])(update)
    with pytest.raises(PrivacyConfigError, match="optimizer_state"):
        FederatedSync(InProcessTransport(), "s", momentum="aggregate", filters=[PercentileSharing(0.1)])
    FederatedSync(InProcessTransport(), "s", momentum="aggregate")  # no filter, no claim: moments may travel


def test_sparse_sharing_sends_only_the_shared_coordinates(bundle, tmp_path, spy):
    assert simulate(bundle, tmp_path / "pct", "--share", "percentile", "--share-fraction", "0.1") == 0
    m = json.loads((tmp_path / "pct" / "metrics.json").read_text())
    for u in spy:
        assert u.optimizer_state is None and u.masks is not None
    for r in m["rounds"]:
        for s in r["sites"].values():
            assert s["bytes_sent"] * 3 <= s["dense_bytes"]  # tiny network: the header weighs; 8x on the real one


# ---------------------------------------------------------------- item 2: one budget over every mechanism
def _all_privacy(out):
    m = json.loads((out / "metrics.json").read_text())
    return m, [s["privacy"] for r in m["rounds"] for s in r["sites"].values() if "privacy" in s]


def test_dp_sgd_and_svt_never_pass_the_one_budget(bundle, tmp_path):
    out = tmp_path / "high_svt"
    args = ["--privacy", "high", "--share", "svt", "--svt-epsilon", "0.5", "--svt-epsilon3", "0.5"]
    assert simulate(bundle, out, *args, rounds=6, steps=3) == 0
    m, privacy = _all_privacy(out)
    assert privacy and max(p["epsilon"] for p in privacy) <= 3.54  # Table 1 "high", federated column
    assert all(p["budget"] == 3.54 for p in privacy)
    assert m["stopped"]["reason"].startswith("every site has stopped")
    assert any(p["exhausted"] for p in privacy)
    assert max(r["global"]["privacy"]["epsilon"] for r in m["rounds"]) <= 3.54


def test_svt_alone_needs_a_budget_and_stops_on_it(bundle, tmp_path, capsys):
    assert simulate(bundle, tmp_path / "nobudget", "--share", "svt") == 2
    assert "--epsilon-budget" in capsys.readouterr().err
    out = tmp_path / "svt"
    assert simulate(bundle, out, "--share", "svt", "--epsilon-budget", "5", rounds=6) == 0  # 2.0 per round
    m, privacy = _all_privacy(out)
    assert max(p["epsilon"] for p in privacy) == pytest.approx(4.0)  # a third release would reach 6 > 5
    assert m["final"]["rounds_completed"] == 3 and m["stopped"]["reason"].startswith("every site has stopped")
    last = m["rounds"][-1]["sites"]
    assert all(s["stopped"].startswith("privacy budget exhausted") and "local_steps" not in s for s in last.values())


# ---------------------------------------------------------------- item 3: where the noise comes from
def test_simulation_says_its_noise_is_seeded_and_secure_noise_is_not_reproducible(bundle, tmp_path):
    assert simulate(bundle, tmp_path / "seeded", "--privacy", "low", rounds=1) == 0
    m, privacy = _all_privacy(tmp_path / "seeded")
    assert m["noise_source"] == NOISE_SEEDED and all(p["noise_source"] == NOISE_SEEDED for p in privacy)
    runs = []
    for name, flags in (("a", ["--noise", "secure"]), ("b", ["--secure-noise"])):  # the flag and its old spelling
        assert simulate(bundle, tmp_path / name, "--privacy", "low", *flags, rounds=1) == 0
        m, privacy = _all_privacy(tmp_path / name)
        assert m["noise_source"] == NOISE_SECURE and all(p["noise_source"] == NOISE_SECURE for p in privacy)
        runs.append(torch.load(tmp_path / name / "federated" / "models" / "model.pt"))
    key = next(k for k, v in runs[0].items() if v.is_floating_point())
    assert not torch.equal(runs[0][key], runs[1][key])  # same config, same seed: different noise


# ---------------------------------------------------------------- item 8: resume refuses a changed run
@pytest.mark.parametrize(
    "first,changed,named",
    [
        (["--share", "percentile", "--share-fraction", "0.1"], ["--share", "percentile", "--share-fraction", "0.5"],
         "percentile_fraction: 0.1 -> 0.5"),
        (["--privacy", "low"], ["--privacy", "high"], "dp_regime_def.name: 'low' -> 'high'"),
        (["--privacy", "low"], ["--privacy", "low", "--epsilon-budget", "100"], "privacy_epsilon_budget"),
        ([], ["--aggregator", "median"], "strategy.name: 'fedavg' -> 'median'"),
        ([], ["--weighting", "samples"], "strategy.weighting"),
        ([], ["--server-lr", "0.5"], "strategy.server_lr"),
    ],
)  # fmt: skip
def test_resume_with_a_changed_setting_is_refused_naming_it(bundle, tmp_path, capsys, first, changed, named):
    out = tmp_path / "run"
    assert simulate(bundle, out, *first, rounds=1) == 0
    capsys.readouterr()
    assert simulate(bundle, out, *changed, "--resume", rounds=2) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume") and named in err, err
    assert simulate(bundle, out, *first, "--resume", rounds=2) == 0  # more rounds, same settings: allowed
    assert json.loads((out / "metrics.json").read_text())["final"]["rounds_completed"] == 2
