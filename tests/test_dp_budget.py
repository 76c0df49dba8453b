"""The site's one privacy budget: DP-SGD stops before it, reservations for the round's releases, reporting, saving."""

import json
import logging

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import DataLoader

from monai_fedpriv.bundle.loader import shared_config
from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.handlers.privacy_budget import PrivacyBudgetHandler
from monai_fedpriv.handlers.private_model import PrivateModelSaver
from monai_fedpriv.privacy.accounting import PrivacyLedger, PureEvent, SampledGaussianEvent
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.dp_sgd import DPSGD
from monai_fedpriv.privacy.losses import PerSampleLoss
from monai_fedpriv.privacy.noise import NOISE_SECURE, NOISE_SEEDED

SIGMA, Q = 0.8, 0.25  # 4 batches per epoch


def _ledger_eps(steps, delta=1e-5, pure=0.0):
    led = PrivacyLedger()
    led.record_sampled_gaussian(Q, SIGMA, steps=steps)
    if pure:
        led.record_pure(pure)
    return led.epsilon(delta)


def _dict_loader(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    items = [
        {"image": torch.rand(1, size, size, generator=g), "label": torch.randint(0, 3, (1, size, size), generator=g)}
        for _ in range(n)
    ]
    return DataLoader(items, batch_size=2)


def _trainer(dp, handler, max_epochs=5):
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=dp.dataloader,
        network=dp.network,
        optimizer=dp.optimizer,
        loss_function=PerSampleLoss("dicece"),
        train_handlers=[handler],
    )


def test_supervised_trainer_stops_before_budget_logs_and_reports(caplog, capsys):
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (4, 8), (2,), num_res_units=0, norm="batch")  # BatchNorm: converted by DPSGD
    budget = PrivacyBudget(limit=(_ledger_eps(6) + _ledger_eps(7)) / 2)  # allows exactly 6 steps
    dp = DPSGD(net, torch.optim.Adam(net.parameters(), 1e-3), _dict_loader(), SIGMA, 1.0, budget=budget, seed=0)
    handler = PrivacyBudgetHandler(budget, noise_seed=0, site="site-7")
    trainer = _trainer(dp, handler)
    eps_seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: eps_seen.append(budget.epsilon()))
    handler.attach(trainer)  # second attach is a no-op
    with caplog.at_level(logging.INFO, logger="monai_fedpriv.privacy"):
        trainer.run()
    assert dp.sample_rate == Q
    assert any("BatchNorm2d" in c for c in dp.changes)
    assert budget.exhausted and "DP-SGD step" in budget.stop_reason
    # every iteration stepped, and so did every empty Poisson draw (noise only, taken by the loader)
    assert budget.ledger.steps == 6 == len(eps_seen) + dp.dataloader.empty_steps
    assert max(eps_seen) <= budget.limit and budget.epsilon() == pytest.approx(_ledger_eps(6))
    assert "site-7 epoch 1: epsilon" in capsys.readouterr().out  # printed like MONAI's StatsHandler lines
    assert "training stopped" in caplog.text and "DP-SGD step" in caplog.text
    trainer.run()  # a later round: the exhausted site does not step again
    assert budget.ledger.steps == 6

    update = ModelUpdate(site="site-7", round=1, delta={"w": torch.zeros(1)}, n_samples=8, local_steps=6, meta={"a": 1})
    out = dp(handler(update))
    assert "privacy" not in update.meta and out is not update
    facts = out.meta["privacy"]
    assert facts["steps"] == 6 and facts["exhausted"] and facts["noise_multiplier"] == SIGMA
    assert facts["max_grad_norm"] == 1.0 and facts["sample_rate"] == Q and facts["budget"] == budget.limit
    assert facts["noise_source"] == NOISE_SEEDED and facts["privacy_unit"] == "slice"
    assert "per slice" in facts["unit_note"] and out.meta["a"] == 1
    json.dumps(out.meta)


def test_dp_sgd_leaves_room_for_the_rounds_reserved_release():
    """With an SVT filter reserved, DP-SGD stops early enough that the round's release still fits."""
    svt_eps = 1.0
    budget = PrivacyBudget(limit=(_ledger_eps(6, pure=svt_eps) + _ledger_eps(7, pure=svt_eps)) / 2)
    budget.reserve("svt", PureEvent(svt_eps, "svt"))
    assert budget.max_steps(Q, SIGMA) == 6
    for _ in range(6):
        budget.record(SampledGaussianEvent(Q, SIGMA))
    assert budget.max_steps(Q, SIGMA) == 0
    budget.release(PureEvent(svt_eps, "svt"), "svt")  # the reserved release is still affordable
    assert budget.epsilon() <= budget.limit
    with pytest.raises(PrivacyBudgetExceeded):
        budget.release(PureEvent(svt_eps, "svt"), "svt")
    assert budget.epsilon() <= budget.limit and budget.exhausted


def test_max_steps_cache_matches_the_ledger_step_by_step():
    budget = PrivacyBudget(limit=8.0)
    n = budget.max_steps(Q, SIGMA)
    assert n > 3 and _ledger_eps(n) <= 8.0 < _ledger_eps(n + 1)
    for taken in range(1, n + 1):
        budget.record(SampledGaussianEvent(Q, SIGMA))
        assert budget.max_steps(Q, SIGMA) == n - taken  # cached, and exact
    budget.ledger.record_pure(0.5)  # something else spends: the cache is recomputed
    assert budget.max_steps(Q, SIGMA) == 0 and budget.epsilon() > 8.0 - 0.5


def test_max_steps_cache_sees_steps_recorded_at_other_settings():
    budget = PrivacyBudget(limit=3.0)
    budget.record(SampledGaussianEvent(0.02, 1.0, 100))
    assert budget.max_steps(0.05, 1.0) > 0
    budget.record(SampledGaussianEvent(0.02, 1.0, 2000))  # the trailing event grows, at other settings
    assert budget.epsilon() > 3.0
    assert budget.max_steps(0.05, 1.0) == 0 and not budget.step_fits(0.05, 1.0) and budget.exhausted


def test_epsilon_is_remembered_only_until_the_ledger_changes():
    budget = PrivacyBudget(limit=50.0)
    budget.record(SampledGaussianEvent(Q, SIGMA, 10))
    first = budget.epsilon()
    assert budget.epsilon() == first == PrivacyLedger().epsilon_with([SampledGaussianEvent(Q, SIGMA, 10)], 1e-5)
    budget.record(PureEvent(1.0, "svt"))
    assert budget.epsilon() > first + 0.99  # recomputed after the new release
    budget.load_state_dict({"ledger": PrivacyLedger().state_dict(), "exhausted": False})
    assert budget.epsilon() == 0.0  # and after a restore


def test_state_dict_restores_epsilon_into_the_same_ledger():
    budget = PrivacyBudget(limit=10.0)
    budget.ledger.record_sampled_gaussian(Q, SIGMA, steps=5)
    handler = PrivacyBudgetHandler(budget)
    state = json.loads(json.dumps(handler.state_dict()))
    fresh_ledger = PrivacyLedger()
    resumed = PrivacyBudgetHandler(PrivacyBudget(fresh_ledger, limit=10.0))
    resumed.load_state_dict(state)
    assert resumed.budget.ledger is fresh_ledger
    assert resumed.budget.epsilon() == budget.epsilon() == _ledger_eps(5)
    with pytest.raises(PrivacyConfigError):
        resumed.load_state_dict({"exhausted": False})


def test_policy_raise_and_bad_arguments():
    budget = PrivacyBudget(limit=1.0, policy="raise")
    budget.ledger.record_sampled_gaussian(Q, SIGMA, steps=100)
    handler = PrivacyBudgetHandler(budget)

    class _Opt:
        sample_rate, noise_multiplier = Q, SIGMA

    class _Engine:
        terminated = False
        optimizer = _Opt()

        def terminate(self):
            self.terminated = True

    engine = _Engine()
    with pytest.raises(PrivacyBudgetExceeded):
        handler(engine)
    assert engine.terminated
    for kwargs in (
        {"limit": 0.0},
        {"limit": float("inf")},
        {"limit": 1.0, "delta": 0.0},
        {"limit": 1.0, "delta": 2.0},
        {"limit": 1.0, "accountant": "gdp"},
        {"limit": 1.0, "policy": "ignore"},
        {"ledger": object()},
    ):
        with pytest.raises(PrivacyConfigError):
            PrivacyBudget(**kwargs)
    with pytest.raises(PrivacyConfigError):
        PrivacyBudgetHandler(PrivacyLedger())


def test_share_only_site_stops_before_training_when_the_release_does_not_fit():
    budget = PrivacyBudget(limit=2.5)
    budget.reserve("svt", PureEvent(1.0, "svt"))
    handler = PrivacyBudgetHandler(budget)

    class _Engine:
        terminated = False
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # no DP-SGD

        def terminate(self):
            self.terminated = True

    for _ in range(2):
        engine = _Engine()
        handler(engine)
        assert not engine.terminated
        budget.release(PureEvent(1.0, "svt"), "svt")
    engine = _Engine()
    handler(engine)  # a third release would reach 3.0 > 2.5: the site does not even train
    assert engine.terminated and budget.exhausted and "release" in budget.stop_reason


def test_bundle_run_on_its_own_is_private_logs_and_saves_the_private_model(tmp_path, caplog):
    """``python -m monai.bundle run`` with train.json + budget.json + dp.json: the budget stops training, and
    the last private model replaces an older one, with a privacy record beside it."""
    from monai.bundle import ConfigParser
    from opacus.optimizers import DPOptimizer

    from monai_fedpriv.privacy.dp_sgd import strip_module_prefix
    from tests.conftest import BUNDLE_DIR

    ckpt = tmp_path / "models"
    ckpt.mkdir()
    torch.save({"stale": torch.zeros(1)}, ckpt / "model.pt")  # an earlier, non-private result
    parser = ConfigParser()
    parser.read_config(
        [str(BUNDLE_DIR / "configs" / "train.json"), str(shared_config("budget.json")), str(shared_config("dp.json"))]
    )
    data = "$[{'image': torch.rand(1, 32, 32), 'label': torch.randint(0, 3, (1, 32, 32)).float()} for _ in range(4)]"
    parser.update(
        {
            "dataset_dir": "/nonexistent",
            "datalist": [],
            "max_epochs": 100,
            "batch_size": 2,
            "bundle_root": str(tmp_path),
            "device": "$torch.device('cpu')",
            "network_def#channels": [4, 8],
            "network_def#strides": [2],
            "train#dataset": {"_target_": "Dataset", "data": data},
            "validate#dataset": {"_target_": "Dataset", "data": data},
            "dp_regime": "high",
        }
    )
    trainer = parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.optimizer, DPOptimizer)
    assert isinstance(trainer.loss_function, PerSampleLoss)
    assert trainer.network._module is parser.get_parsed_content("network")  # evaluator sees the DP weights
    with caplog.at_level(logging.INFO, logger="monai_fedpriv.privacy"):
        trainer.run()
    budget = parser.get_parsed_content("privacy_budget")
    assert budget.exhausted and budget.limit == 3.54 and budget.epsilon() <= 3.54  # Table 1, federated column
    assert trainer.state.epoch < 100  # stopped by the budget, not by max_epochs
    assert "training stopped" in caplog.text and "earlier run" in caplog.text
    saved = torch.load(ckpt / "model.pt")
    assert "stale" not in saved and any(ckpt.glob("model.previous-*.pt"))
    record = json.loads((ckpt / "privacy.json").read_text())
    assert record["privacy"]["exhausted"] and record["privacy"]["epsilon"] <= 3.54
    assert record["privacy"]["noise_source"] == NOISE_SECURE  # a bundle run on its own: OS entropy
    plain = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
    plain.load_state_dict(strip_module_prefix(trainer.network.state_dict()))
    plain.load_state_dict(saved)


def test_private_model_saver_keeps_a_model_written_during_the_run(tmp_path):
    from ignite.engine import Engine

    net = nn.Linear(2, 2)

    def step(engine, _):
        if engine.state.iteration == 2:  # the bundle's own key-metric checkpoint writes during the run
            torch.save({"best": torch.ones(1)}, tmp_path / "model.pt")

    engine = Engine(step)
    PrivateModelSaver(tmp_path, net, reporters=[]).attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    assert "best" in torch.load(tmp_path / "model.pt")
    assert set(torch.load(tmp_path / "model_last.pt")) == {"weight", "bias"}
    assert json.loads((tmp_path / "privacy.json").read_text())["model_is"].startswith("the bundle's best")


def test_dpsgd_resume_continues_random_streams_instead_of_replaying_them():
    def build(seed=3):
        net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        return DPSGD(net, opt, _dict_loader(n=8, size=8), 1.0, 1.0, budget=PrivacyBudget(), seed=seed)

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
    # deployment default: OS entropy, so two sites built from one config draw different noise
    a, b = build(seed=None), build(seed=None)
    noise_a, noise_b = (torch.randn(5, generator=x.optimizer.generator) for x in (a, b))
    assert not torch.equal(noise_a, noise_b)


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

    handler = PrivacyBudgetHandler(PrivacyBudget(limit=1.0))
    with pytest.raises(PrivacyConfigError, match="amp=False"):
        handler.attach(_Engine(enabled=True))
    handler.attach(_Engine(enabled=False))  # a disabled scaler (amp requested without CUDA) changes nothing
