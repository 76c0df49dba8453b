"""A site behind MONAI's ClientAlgo: two sites driven with ExchangeObjects and a plain FedAvg train what the
in-process simulator trains; get_weights hands over only what the filters let out; sparse filters are refused."""

from __future__ import annotations

import pytest
import torch
from monai.fl.utils.constants import FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.fl.monai_fl import FedPrivClientAlgo
from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
from monai_fedpriv.fl.simulator.server_model import initial_network
from monai_fedpriv.fl.strategies import FedAvg
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.fl.weights import exchangeable_state
from tests.conftest import BUNDLE_DIR, tiny_overrides
from tests.test_workflow import _split


def test_two_client_algos_and_fedavg_train_what_the_simulator_trains(tiny_bundle, tmp_path):
    split = _split(tiny_bundle, 2)
    rounds = 2
    sim = FederatedSimulator(tiny_bundle, split.train, split.val, rounds, LocalWork(epochs=None, steps=2),
                             tmp_path / "sim", progress=False, secure_noise=False)  # fmt: skip
    sim.run()
    clients = {site: FedPrivClientAlgo(tiny_bundle, site, data, split.val.get(site, []), rounds=rounds,
                                       local_epochs=None, local_steps=2, secure_noise=False,
                                       output_dir=tmp_path / "fl") for site, data in split.train.items()}  # fmt: skip
    for client in clients.values():
        client.initialize()
    weights = exchangeable_state(initial_network(tiny_bundle, 0)[1])
    strategy = FedAvg()
    for rnd in range(1, rounds + 1):
        updates = []
        for site, client in clients.items():
            client.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
            out = client.get_weights()
            assert out.weight_type == WeightType.WEIGHT_DIFF
            steps = out.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS]
            updates.append(ModelUpdate(site, rnd, out.weights, len(split.train[site]), steps))
        weights = strategy(weights, updates)
    assert weights.keys() == sim.global_weights.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], sim.global_weights[k], rtol=0, atol=0, msg=k)
    scored = clients["site-1"].evaluate(ExchangeObject(weights=weights))
    assert 0 <= scored.metrics["dice"] <= 1
    for client in clients.values():
        client.finalize()


def test_get_weights_hands_over_only_what_the_filters_let_out(tiny_data, tmp_path):
    from tests.test_dp_simulation import _dp_bundle

    bundle = _dp_bundle(tiny_data)
    split = _split(bundle, 2)
    client = FedPrivClientAlgo(bundle, "site-1", split.train["site-1"], rounds=1, local_epochs=None, local_steps=1,
                               secure_noise=False, output_dir=tmp_path)  # fmt: skip
    with pytest.raises(RuntimeError, match="no round"):
        client.get_weights()
    client.initialize()
    sent = []
    original = client.transport.send

    def spy(update):  # what the site's sync handler sends: the chain's output
        sent.append(update)
        original(update)

    client.transport.send = spy  # type: ignore[method-assign]
    weights = exchangeable_state(initial_network(bundle, 0)[1])
    client.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
    out = client.get_weights()
    (filtered,) = sent
    assert filtered.meta["privacy"]["epsilon"] > 0  # DP-SGD's chain vouched for it
    for k, v in out.weights.items():
        assert torch.equal(v, filtered.delta[k].to(v.dtype)), k


def test_a_sparse_filter_is_refused_in_one_line(tiny_data, tmp_path):
    bundle = BundleSpec(BUNDLE_DIR, ("train.json", "percentile.json"), tiny_overrides(tiny_data))
    split = _split(bundle, 2)
    client = FedPrivClientAlgo(bundle, "site-1", split.train["site-1"], output_dir=tmp_path)
    with pytest.raises(PrivacyConfigError, match="no masks"):
        client.initialize()
