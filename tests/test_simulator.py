"""End-to-end in-process simulation of the default bundle (shrunk) on a tiny copy of the default data."""

import json

import pytest
import torch

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
from monai_fedpriv.errors import BundleError, DataError
from monai_fedpriv.experiments import bundle_datalist, split_sites
from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
from tests.conftest import assert_same_run


def _split(bundle, scheme="institution"):
    return split_sites(bundle_datalist(bundle), 2, scheme, seed=0)


def _sim(bundle, split, out, rounds, work, **kw):
    return FederatedSimulator(bundle, split.train, split.val, rounds, work, out, progress=False, **kw)


@pytest.mark.parametrize("work", [LocalWork(epochs=1), LocalWork(epochs=None, steps=3)])
def test_resume_gives_identical_weights_and_metrics(tiny_bundle, tmp_path, work):
    split = _split(tiny_bundle)
    full = _sim(tiny_bundle, split, tmp_path / "full", 3, work).run()
    _sim(tiny_bundle, split, tmp_path / "cut", 2, work).run()
    resumed = _sim(tiny_bundle, split, tmp_path / "cut", 3, work).run(resume=True)
    assert_same_run(full, resumed, tmp_path / "full", tmp_path / "cut")
    steps = [r["sites"]["site-1"]["local_steps"] for r in full["rounds"]]
    assert steps == ([3, 3, 3] if work.steps else [2, 2, 2])  # 6 cases / batch 4 -> 2 steps per epoch


def test_metrics_json_contract(tiny_bundle, tmp_path):
    split = _split(tiny_bundle)
    _sim(tiny_bundle, split, tmp_path, 2, LocalWork(epochs=1)).run()
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in m["rounds"]] == [1, 2]
    site = m["rounds"][0]["sites"]["site-1"]
    for key in ("dice", "n_samples", "local_steps", "global_dice", "bytes_sent", "dense_bytes"):
        assert key in site, key
    assert site["n_samples"] == 6
    assert 0.0 <= m["rounds"][-1]["global"]["dice"] <= 1.0
    assert m["final"]["global_dice"] == m["rounds"][-1]["global"]["dice"]
    assert (tmp_path / "checkpoints" / "latest.pt").is_file()


def test_resume_refuses_a_different_configuration(tiny_bundle, tmp_path):
    split = _split(tiny_bundle)
    _sim(tiny_bundle, split, tmp_path, 1, LocalWork(epochs=1)).run()
    with pytest.raises(ValueError, match=r"other settings(.|\n)*seed: 0 -> 5"):
        _sim(tiny_bundle, split, tmp_path, 2, LocalWork(epochs=1), seed=5).run(resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _sim(tiny_bundle, split, tmp_path / "empty", 2, LocalWork(epochs=1)).run(resume=True)


def _crash_in_round(sim, site, rnd):
    calls = {"n": 0}
    original = sim.sites[site].trainer.run

    def crash():
        calls["n"] += 1
        if calls["n"] == rnd:
            raise RuntimeError(f"{site} lost power")
        return original()

    sim.sites[site].trainer.run = crash


def test_a_crashed_site_is_rejected_for_the_round_and_rejoins(tiny_bundle, tmp_path):
    split = _split(tiny_bundle)
    sim = _sim(tiny_bundle, split, tmp_path, 3, LocalWork(epochs=1))
    sim.setup()
    _crash_in_round(sim, "site-2", 2)
    m = sim.run()
    assert m["final"]["rounds_completed"] == 3
    second = m["rounds"][1]
    assert second["sites"]["site-2"]["rejected"] == "training raised RuntimeError: site-2 lost power"
    assert second["global"]["rejected"] == 1 and "local_steps" in second["sites"]["site-1"]
    third = m["rounds"][2]["sites"]["site-2"]
    assert "rejected" not in third and third["local_steps"] == m["rounds"][0]["sites"]["site-2"]["local_steps"]


def test_too_few_sites_stops_the_run_with_the_last_round_intact(tiny_bundle, tmp_path):
    from monai_fedpriv.errors import FederationError

    split = _split(tiny_bundle)
    sim = _sim(tiny_bundle, split, tmp_path, 3, LocalWork(epochs=1), min_sites=2)
    sim.setup()
    _crash_in_round(sim, "site-2", 2)
    with pytest.raises(FederationError, match="only 1 of 2 sites"):
        sim.run()
    saved = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    assert saved["round"] == 1
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["final"]["rounds_completed"] == 1 and m["stopped"]["round"] == 2
    assert "site-2: training raised RuntimeError" in m["stopped"]["reason"]
    resumed = _sim(tiny_bundle, split, tmp_path, 3, LocalWork(epochs=1), min_sites=2).run(resume=True)
    assert resumed["final"]["rounds_completed"] == 3 and "stopped" not in resumed


def test_bad_bundles_raise_naming_what_is_missing(tmp_path, tiny_data):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(BundleSpec(tmp_path / "nope"))
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="no configs"):
        load_bundle(BundleSpec(tmp_path / "b"))
    (tmp_path / "b" / "configs").mkdir()
    (tmp_path / "b" / "configs" / "train.json").write_text('{"network": 1}')
    with pytest.raises(BundleError, match="'optimizer'"):
        load_bundle(BundleSpec(tmp_path / "b"))
    (tmp_path / "b" / "configs" / "train.json").write_text("{not json")
    with pytest.raises(BundleError, match="train.json"):
        load_bundle(BundleSpec(tmp_path / "b"))
    (tmp_path / "b" / "configs" / "train.json").write_text("{}")
    with pytest.raises(BundleError, match="dp.json"):  # the shared override patches ids the bundle lacks
        load_bundle(BundleSpec(tmp_path / "b", ("train.json", "dp.json")))
    with pytest.raises(BundleError, match="nope.json"):
        load_bundle(BundleSpec(tmp_path / "b", ("train.json", "nope.json")))


def test_empty_site_raises(tiny_bundle, tmp_path):
    split = _split(tiny_bundle)
    with pytest.raises(DataError, match="site-2"):
        FederatedSimulator(
            tiny_bundle, {"site-1": split.train["site-1"], "site-2": []}, split.val, 1, LocalWork(epochs=1), tmp_path
        )
