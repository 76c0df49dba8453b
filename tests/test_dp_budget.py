import json

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.handlers.dp_budget import PrivacyBudgetHandler
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.dp_sgd import DPSGD, make_site_private
from monai_fedpriv.privacy.losses import PerSampleLoss

SIGMA, Q = 0.8, 0.25  # 4 batches per epoch


def _ledger_eps(steps, delta=1e-5):
    led = PrivacyLedger()
    led.record_sampled_gaussian(Q, SIGMA, steps=steps)
    return led.epsilon(delta)


def _dict_loader(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    items = [
        {"image": torch.rand(1, size, size, generator=g), "label": torch.randint(0, 3, (1, size, size), generator=g)}
        for _ in range(n)
    ]
    return DataLoader(items, batch_size=2)


def test_supervised_trainer_stops_before_budget_and_reports():
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (4, 8), (2,), num_res_units=0, norm="batch")  # BatchNorm: converted by DPSGD
    dp = DPSGD(net, torch.optim.Adam(net.parameters(), 1e-3), _dict_loader(), noise_multiplier=SIGMA, max_grad_norm=1.0)
    budget = (_ledger_eps(6) + _ledger_eps(7)) / 2  # allows exactly 6 steps
    handler = PrivacyBudgetHandler(dp.ledger, budget=budget, delta=1e-5)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=5,
        train_data_loader=dp.dataloader,
        network=dp.network,
        optimizer=dp.optimizer,
        loss_function=PerSampleLoss("dicece"),
        train_handlers=[handler],
    )
    eps_seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: eps_seen.append(handler.epsilon()))
    handler.attach(trainer)  # second attach is a no-op
    assert len(trainer._event_handlers[Events.ITERATION_STARTED]) == 1 + sum(
        1 for h, _, _ in trainer._event_handlers[Events.ITERATION_STARTED] if h is not handler
    )
    trainer.run()
    assert dp.sample_rate == Q
    assert any("BatchNorm2d" in c for c in dp.changes)
    assert handler.exhausted
    # every iteration stepped, and so did every empty Poisson draw (noise only, taken by the loader)
    assert dp.ledger.steps == 6 == len(eps_seen) + dp.dataloader.empty_steps
    assert max(eps_seen) <= budget
    assert handler.epsilon() == pytest.approx(_ledger_eps(6))
    trainer.run()  # a later round: the exhausted site does not step again
    assert dp.ledger.steps == 6

    update = ModelUpdate(site="site-1", round=1, delta={"w": torch.zeros(1)}, n_samples=8, local_steps=6, meta={"a": 1})
    out = handler(update)
    assert "privacy" not in update.meta and out is not update
    facts = out.meta["privacy"]
    assert set(facts) >= {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps"}
    assert facts["steps"] == 6 and facts["exhausted"] and facts["noise_multiplier"] == SIGMA
    assert facts["max_grad_norm"] == 1.0 and facts["sample_rate"] == Q and facts["budget"] == budget
    assert out.meta["a"] == 1
    json.dumps(out.meta)


def test_state_dict_restores_epsilon_into_the_same_ledger():
    ledger = PrivacyLedger()
    ledger.record_sampled_gaussian(Q, SIGMA, steps=5)
    handler = PrivacyBudgetHandler(ledger, budget=10.0, delta=1e-5, sample_rate=Q, noise_multiplier=SIGMA)
    state = json.loads(json.dumps(handler.state_dict()))
    fresh_ledger = PrivacyLedger()
    resumed = PrivacyBudgetHandler(fresh_ledger, budget=10.0, delta=1e-5)
    resumed.load_state_dict(state)
    assert resumed.ledger is fresh_ledger
    assert resumed.epsilon() == handler.epsilon() == _ledger_eps(5)
    with pytest.raises(PrivacyConfigError):
        resumed.load_state_dict({"exhausted": False})


def test_direct_optimizer_step_past_budget_raises_and_changes_nothing():
    model = nn.Linear(3, 1)
    ledger = PrivacyLedger()
    parts = make_site_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(TensorDataset(torch.rand(8, 3)), batch_size=2),
        noise_multiplier=SIGMA,
        max_grad_norm=1.0,
        ledger=ledger,
        generator=torch.Generator().manual_seed(0),
    )
    handler = PrivacyBudgetHandler(ledger, budget=(_ledger_eps(2) + _ledger_eps(3)) / 2, delta=1e-5)
    handler.set_optimizer(parts.optimizer)
    handler.set_optimizer(parts.optimizer)  # not wrapped twice
    for _ in range(2):
        parts.optimizer.zero_grad()
        parts.network(torch.rand(2, 3)).sum().backward()
        parts.optimizer.step()
    before = model.weight.detach().clone()
    parts.optimizer.zero_grad()
    parts.network(torch.rand(2, 3)).sum().backward()
    with pytest.raises(PrivacyBudgetExceeded):
        parts.optimizer.step()
    assert torch.equal(before, model.weight) and ledger.steps == 2 and handler.exhausted


def test_policy_raise_and_bad_arguments():
    ledger = PrivacyLedger()
    ledger.record_sampled_gaussian(Q, SIGMA, steps=100)
    handler = PrivacyBudgetHandler(ledger, budget=1.0, delta=1e-5, policy="raise")

    class _Engine:
        terminated = False

        def terminate(self):
            self.terminated = True

    engine = _Engine()
    with pytest.raises(PrivacyBudgetExceeded):
        handler(engine)
    assert engine.terminated
    for kwargs in (
        {"budget": 0.0, "delta": 1e-5},
        {"budget": 1.0, "delta": 0.0},
        {"budget": 1.0, "delta": 1e-5, "accountant": "gdp"},
        {"budget": 1.0, "delta": 1e-5, "policy": "ignore"},
    ):
        with pytest.raises(PrivacyConfigError):
            PrivacyBudgetHandler(ledger, **kwargs)
    with pytest.raises(PrivacyConfigError):
        PrivacyBudgetHandler(None, budget=1.0, delta=1e-5)
    unbound = PrivacyBudgetHandler(PrivacyLedger(), budget=1.0, delta=1e-5)
    with pytest.raises(PrivacyConfigError, match="sample_rate"):
        unbound(engine)


def test_bundle_dp_override_makes_train_json_private():
    from pathlib import Path

    from monai.bundle import ConfigParser
    from opacus.optimizers import DPOptimizer

    from monai_fedpriv.privacy.dp_sgd import strip_module_prefix

    configs = Path(__file__).resolve().parents[1] / "bundles" / "brain_tissue_2d" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "dp.json")])
    data = "$[{'image': torch.rand(1, 64, 64), 'label': torch.randint(0, 3, (1, 64, 64)).float()} for _ in range(4)]"
    parser.update(
        {
            "dataset_dir": "/nonexistent",
            "datalist": [],
            "max_epochs": 1,
            "batch_size": 2,
            "device": "$torch.device('cpu')",
            "train#dataset": {"_target_": "Dataset", "data": data},
            "validate#dataset": {"_target_": "Dataset", "data": data},
            "dp_regime": "low",
        }
    )
    trainer = parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.optimizer, DPOptimizer)
    assert isinstance(trainer.loss_function, PerSampleLoss)
    assert trainer.network._module is parser.get_parsed_content("network")  # evaluator sees the DP weights
    for handler in parser.get_parsed_content("fed_handlers"):
        handler.attach(trainer)
    trainer.run()
    ledger = parser.get_parsed_content("privacy_ledger")
    budget = parser.get_parsed_content("dp_budget_handler")
    assert ledger.steps >= 1 and budget.budget == 11.5 and budget.epsilon() <= 11.5
    facts = budget.privacy_facts()
    assert (facts["noise_multiplier"], facts["max_grad_norm"], facts["sample_rate"]) == (0.8, 1.0, 0.5)
    plain = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
    plain.load_state_dict(strip_module_prefix(trainer.network.state_dict()))


def test_dpsgd_resume_continues_random_streams_instead_of_replaying_them():
    def build():
        net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
        return DPSGD(net, torch.optim.SGD(net.parameters(), lr=0.1), _dict_loader(n=8, size=8), 1.0, 1.0, seed=3)

    first = build()
    first.optimizer.zero_grad()
    first.optimizer.step()  # a noise-only step consumes noise
    _ = [b for b in first.dataloader]  # one pass of Poisson draws
    state = first.state_dict()
    next_noise = torch.randn(5, generator=first.optimizer.generator)
    next_draw = [b["image"].shape[0] for b in first.dataloader]
    resumed = build()
    resumed.load_state_dict(state)
    assert torch.equal(torch.randn(5, generator=resumed.optimizer.generator), next_noise)
    assert [b["image"].shape[0] for b in resumed.dataloader] == next_draw
    fresh = build()
    assert not torch.equal(torch.randn(5, generator=fresh.optimizer.generator), next_noise)
    with pytest.raises(PrivacyConfigError):
        fresh.load_state_dict({"sampler_generator": None})


def test_amp_loss_scaling_is_refused_at_attach():
    class _Scaler:
        def __init__(self, enabled):
            self.enabled = enabled

        def is_enabled(self):
            return self.enabled

    class _Engine:
        def __init__(self, enabled):
            self.scaler = _Scaler(enabled)
            self.optimizer = None

        def has_event_handler(self, *_):
            return False

        def add_event_handler(self, *_):
            pass

    handler = PrivacyBudgetHandler(PrivacyLedger(), budget=1.0, delta=1e-5, sample_rate=0.1, noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError, match="amp=False"):
        handler.attach(_Engine(enabled=True))
    handler.attach(_Engine(enabled=False))  # a disabled scaler (amp requested without CUDA) changes nothing
