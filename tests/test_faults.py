"""Issue 9, items 9-11: the server screens updates, robust strategies, injected faults, and draws from the global
random state (dropout) that survive resume."""

from __future__ import annotations

import json

import pytest
import torch

from monai_fedpriv.fl.server import ScreenSettings, ServerRound, screen_updates
from monai_fedpriv.fl.simulator import Fault, FaultInjector, parse_fault
from monai_fedpriv.fl.strategies import CoordinateMedian, FedAvg, TrimmedMean, build_strategy
from monai_fedpriv.fl.update import ModelUpdate
from tests.test_fail_closed import bundle, simulate  # noqa: F401 - fixture and helper

REF = {"w": torch.zeros(6), "n": torch.tensor(0)}


def upd(site, values, steps=1, masks=None, opt=None, rnd=1):
    delta = {"w": torch.tensor(values, dtype=torch.float32), "n": torch.tensor(1)}
    return ModelUpdate(site, rnd, delta, n_samples=4, local_steps=steps, masks=masks, optimizer_state=opt)


# ---------------------------------------------------------------- screening
def test_screening_rejects_malformed_and_outlying_updates_with_a_reason():
    good = [upd(f"s{i}", [1.0 + i, 0, 0, 0, 0, 1]) for i in range(3)]
    nan = upd("nan", [float("nan")] * 6)
    keys = ModelUpdate("keys", 1, {"x": torch.zeros(6), "n": torch.tensor(1)}, 4, 1)
    shape = ModelUpdate("shape", 1, {"w": torch.zeros(5), "n": torch.tensor(1)}, 4, 1)
    scaled = upd("scaled", [1e6] * 6)
    moments = upd("moments", [1.0] * 6, opt={"w/exp_avg": torch.tensor([float("inf")] * 6)})
    stray = upd("stray", [1.0] * 6, opt={"nope/exp_avg": torch.zeros(6)})
    accepted, rejected = screen_updates(REF, [*good, nan, keys, shape, scaled, moments, stray])
    assert [u.site for u in accepted] == ["s0", "s1", "s2"]
    assert "NaN" in rejected["nan"] and "lacks keys" in rejected["keys"] and "shape" in rejected["shape"]
    assert "median of the other sites" in rejected["scaled"]
    assert "optimiser state" in rejected["moments"] and "NaN or Inf" in rejected["moments"]
    assert "names no parameter" in rejected["stray"]
    _, bounded = screen_updates(REF, good, ScreenSettings(max_update_norm=2.0))
    assert set(bounded) == {"s1", "s2"} and "exceeds the bound 2" in bounded["s2"]
    # two sites are enough to tell which one is off (leave-one-out median)
    ok, out = screen_updates(REF, [good[0], scaled])
    assert [u.site for u in ok] == ["s0"] and set(out) == {"scaled"}
    with pytest.raises(ValueError):
        ScreenSettings(norm_factor=0.5)


def test_server_round_aggregates_the_rest_or_fails_with_the_last_model_kept():
    published = []
    server = ServerRound(FedAvg(weighting="uniform"))
    good = [upd("a", [1.0] * 6), upd("b", [3.0] * 6)]
    out = server(1, REF, [*good, upd("c", [float("nan")] * 6)], ["a", "b", "c"], publish=published.append)
    assert out.failed is None and torch.allclose(out.weights["w"], torch.full((6,), 2.0))
    assert out.sites["c"]["rejected"].startswith("update from 'c'") and out.sites["a"]["local_steps"] == 1
    assert len(published) == 1 and published[0].round == 1
    strict = ServerRound(FedAvg(), min_sites=3)
    good2 = [upd("a", [1.0] * 6, rnd=2), upd("b", [3.0] * 6, rnd=2)]
    out = strict(2, REF, good2, ["a", "b", "c"], failures={"c": "training raised RuntimeError: x"},
                 publish=published.append)  # fmt: skip
    assert out.weights is None and "only 2 of 3 sites" in out.failed and "c: training raised" in out.failed
    assert len(published) == 1  # nothing published: the last good global model stays current
    with pytest.raises(ValueError, match="not asked"):
        server(3, REF, good, ["a"])


def test_server_round_rejects_an_update_of_another_round_and_refuses_two_from_one_site():
    server = ServerRound(FedAvg(weighting="uniform"), min_sites=1)
    out = server(2, REF, [upd("a", [1.0] * 6, rnd=2), upd("b", [9.0] * 6, rnd=1)], ["a", "b"])
    assert out.accepted == ["a"] and out.sites["b"]["rejected"] == "update is for round 1, not round 2"
    assert torch.allclose(out.weights["w"], torch.full((6,), 1.0))  # the stale update is not in the aggregate
    with pytest.raises(ValueError, match="several updates from one site"):
        server(3, REF, [upd("a", [1.0] * 6, rnd=3), upd("a", [2.0] * 6, rnd=3)], ["a"])


# ---------------------------------------------------------------- robust strategies
def test_median_and_trimmed_mean_ignore_an_outlier_and_respect_masks():
    ups = [upd("a", [1.0] * 6), upd("b", [2.0] * 6), upd("c", [3.0] * 6), upd("d", [1e6] * 6)]
    assert torch.allclose(CoordinateMedian()(REF, ups)["w"], torch.full((6,), 2.5))  # mean of the middle two
    assert torch.allclose(CoordinateMedian()(REF, ups[:3])["w"], torch.full((6,), 2.0))
    assert torch.allclose(TrimmedMean(0.25)(REF, ups)["w"], torch.full((6,), 2.5))
    assert torch.allclose(TrimmedMean(0.0)(REF, ups[:3])["w"], torch.full((6,), 2.0))  # no trim: the mean
    assert float(FedAvg()(REF, ups)["w"][0]) > 1e5  # FedAvg is moved by the outlier
    mask = torch.tensor([True, True, False, False, False, False])
    sparse = [upd("a", [1.0] * 6), upd("b", [5.0] * 6, masks={"w": mask, "n": torch.zeros((), dtype=torch.bool)})]
    w = CoordinateMedian()(REF, sparse)["w"]
    assert w[:2].tolist() == [3.0, 3.0] and w[2:].tolist() == [1.0] * 4  # unshared coordinates are absent
    ts = TrimmedMean(0.3, server_lr=0.5)
    assert ts.config() == {"name": "trimmed-mean", "server_lr": 0.5, "trim_fraction": 0.3}
    with pytest.raises(ValueError):
        TrimmedMean(0.5)
    with pytest.raises(ValueError):
        build_strategy("krum")
    m = CoordinateMedian().aggregate_optimizer_state(
        [upd(s, [1.0] * 6, opt={"w/exp_avg": torch.full((6,), v)}) for s, v in (("a", 1.0), ("b", 9.0), ("c", 2.0))]
    )
    assert torch.allclose(m["w/exp_avg"], torch.full((6,), 2.0))


# ---------------------------------------------------------------- fault injection
def test_fault_flags_are_parsed_and_checked():
    assert parse_fault("site-2:nan:3") == Fault("site-2", "nan", 3)
    for bad in ("site-2:nan", "site-2:boom:1", "site-2:nan:zero", "site-2:nan:0"):
        with pytest.raises(ValueError, match="--inject-fault"):
            parse_fault(bad)
    with pytest.raises(ValueError, match="site-9"):
        FaultInjector([Fault("site-9", "nan", 1)]).check_sites(["site-1", "site-2"])
    injector = FaultInjector([Fault("s", "keys", 1), Fault("s", "scale", 2)])
    tampered = injector.tamper(upd("s", [1.0] * 6))
    assert "w" not in tampered.delta and "w.injected" in tampered.delta
    assert injector.tamper(upd("t", [1.0] * 6)).delta.keys() == {"w", "n"}


def test_injected_faults_are_rejected_and_the_federation_goes_on(bundle, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "faults"
    faults = ["site-2:nan:1", "site-3:scale:2", "site-1:keys:3", "site-2:crash:4"]
    argv = [x for f in faults for x in ("--inject-fault", f)]
    assert simulate(bundle, out, *argv, rounds=4, sites=3) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["final"]["rounds_completed"] == 4
    expected = {1: ("site-2", "NaN"), 2: ("site-3", "median of the other sites"), 3: ("site-1", "lacks keys"),
                4: ("site-2", "injected crash")}  # fmt: skip
    for r in m["rounds"]:
        site, text = expected[r["round"]]
        assert text in r["sites"][site]["rejected"] and r["global"]["rejected"] == 1
        assert all("rejected" not in s for n, s in r["sites"].items() if n != site)
    # the same faults with every site required: round 1 fails, nothing is lost, the error is one line
    capsys.readouterr()
    assert simulate(bundle, tmp_path / "strict", *argv, "--min-sites", "3", rounds=4, sites=3) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: only 2 of 3 sites") and "--resume" in err[0]
    stopped = json.loads((tmp_path / "strict" / "metrics.json").read_text())
    assert stopped["final"]["rounds_completed"] == 0 and stopped["stopped"]["round"] == 1
    assert simulate(bundle, tmp_path / "bad", "--inject-fault", "site-7:nan:1", sites=3) == 2


def test_median_aggregator_through_the_cli_with_a_scaled_site(bundle, tmp_path):  # noqa: F811
    out = tmp_path / "median"
    args = ["--aggregator", "median", "--norm-factor", "1e9", "--inject-fault", "site-1:scale:1"]
    assert simulate(bundle, out, *args, rounds=1, sites=3) == 0  # the screen lets it through; the median holds
    m = json.loads((out / "metrics.json").read_text())
    assert m["rounds"][0]["global"]["rejected"] == 0 and 0.0 <= m["final"]["global_dice"] <= 1.0
    weights = torch.load(out / "federated" / "models" / "model.pt")
    assert all(float(v.abs().max()) < 100 for v in weights.values() if v.is_floating_point())


# ---------------------------------------------------------------- global random state
def test_resume_is_exact_with_dropout(tiny_bundle, tmp_path):
    from monai_fedpriv.bundle.loader import BundleSpec as Spec
    from monai_fedpriv.experiments import bundle_datalist, split_sites
    from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
    from tests.conftest import assert_same_run

    dropout = Spec(tiny_bundle.root, tiny_bundle.config_files, {**tiny_bundle.overrides, "network_def#dropout": 0.3})
    split = split_sites(bundle_datalist(dropout), 2, "institution", seed=0)

    def sim(out, rounds):
        return FederatedSimulator(dropout, split.train, split.val, rounds, LocalWork(epochs=1), out, progress=False)

    full = sim(tmp_path / "full", 3).run()
    sim(tmp_path / "cut", 2).run()
    torch.manual_seed(12345)  # whatever the process did meanwhile to the global generator
    torch.rand(100)
    resumed = sim(tmp_path / "cut", 3).run(resume=True)
    assert_same_run(full, resumed, tmp_path / "full", tmp_path / "cut")
