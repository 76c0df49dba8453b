"""FedProx's proximal term (handlers/proximal.py): FedAvg unchanged at mu = 0, the exact term otherwise, and under
DP-SGD the term added after clipping and noise."""

from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from monai_fedpriv.fl.instruction import RoundInstruction
from monai_fedpriv.fl.update import GlobalModel
from monai_fedpriv.fl.weights import exchangeable_state, unwrap
from monai_fedpriv.handlers.fed_events import FedEvents
from monai_fedpriv.handlers.proximal import ProximalTerm
from monai_fedpriv.privacy.accounting import PrivacyLedger
from tests.test_dp_sgd import private


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(n)]


def _shifted(net, by=0.3, seed=2):
    """Global weights: the network's, each moved by a random offset (so ``w - w_global`` is not zero)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + by * torch.randn(v.shape, generator=g) for k, v in exchangeable_state(net).items()}


def _engine(net, opt, grads=None):
    """A plain Ignite trainer; ``grads`` collects each step's loss gradient (before the optimiser is called)."""

    def step(engine, batch):
        x, y = batch
        opt.zero_grad()
        nn.functional.mse_loss(engine.network(x), y).backward()
        if grads is not None:
            grads.append([p.grad.clone() for p in net.parameters()])
        opt.step()

    engine = Engine(step)
    engine.network, engine.optimizer = net, opt
    return engine


def _fire(engine, weights, mu):
    engine.state.fed_global = GlobalModel(round=0, weights=weights)
    engine.state.fed_instruction = mu if isinstance(mu, SimpleNamespace) else RoundInstruction(prox_mu=mu)
    engine.fire_event(FedEvents.GLOBAL_MODEL_RECEIVED)


def _grad_spy(opt):
    """A step pre-hook registered after the proximal one: the gradient the update rule applies."""
    seen = []
    opt.register_step_pre_hook(lambda o, *_: seen.append([p.grad.clone() for p in o.param_groups[0]["params"]]))
    return seen


def test_mu_zero_trains_bit_for_bit_as_without_the_handler():
    plain, proxed = _net(), _net()
    runs = []
    for net, attach in ((plain, False), (proxed, True)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        engine = _engine(net, opt)
        if attach:
            ProximalTerm().attach(engine)  # late-bound network and optimizer
            _fire(engine, _shifted(net), 0.5)  # a mu > 0 round first: the hook exists ...
            _fire(engine, _shifted(net), 0.0)  # ... and does nothing at mu = 0
        engine.run(_batches(4), max_epochs=2)
        runs.append([p.detach() for p in net.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    # no instruction at all is mu = 0 too
    handler, net = ProximalTerm(), _net()
    engine = _engine(net, torch.optim.SGD(net.parameters(), lr=0.1))
    handler.attach(engine)
    engine.state.fed_global = GlobalModel(round=0, weights=_shifted(net))
    engine.fire_event(FedEvents.GLOBAL_MODEL_RECEIVED)
    assert handler.mu == 0.0


def test_applied_gradient_is_loss_gradient_plus_mu_times_distance_to_global():
    net, mu, lr = _net(), 0.7, 0.05
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_grads: list = []
    engine = _engine(net, opt, loss_grads)
    handler = ProximalTerm(network=net, optimizer=opt)
    handler.attach(engine)
    handler.attach(engine)  # idempotent
    assert len(engine._event_handlers[FedEvents.GLOBAL_MODEL_RECEIVED]) == 1
    global_w = _shifted(net)
    _fire(engine, global_w, mu)
    applied = _grad_spy(opt)
    before: list = []

    @engine.on(Events.ITERATION_STARTED)
    def keep_weights():
        before.append([p.detach().clone() for p in net.parameters()])

    engine.run(_batches(3), max_epochs=1)
    names = [n for n, _ in net.named_parameters()]
    assert len(applied) == len(loss_grads) == 3
    for step in range(3):
        for j, name in enumerate(names):
            expected = loss_grads[step][j] + mu * (before[step][j] - global_w[name])
            torch.testing.assert_close(applied[step][j], expected, rtol=1e-6, atol=1e-7)
            after = before[step + 1][j] if step < 2 else net.get_parameter(name).detach()
            torch.testing.assert_close(after, before[step][j] - lr * expected, rtol=1e-6, atol=1e-7)


def test_dp_sgd_term_is_added_after_clipping_and_noise_and_not_clipped():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    clip, lr, mu = 0.1, 0.5, 10.0
    g = torch.Generator().manual_seed(5)
    ledger = PrivacyLedger()
    parts = private(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        DataLoader(TensorDataset(torch.rand(8, 6, generator=g)), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=clip,
        ledger=ledger,
        seed=3,
    )
    assert unwrap(parts.network) is model
    global_w = {k: v - 2.0 for k, v in exchangeable_state(model).items()}  # mu * (w - w_g) = 20 per coordinate
    handler = ProximalTerm(network=parts.network, optimizer=parts.optimizer)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    _fire(engine, global_w, mu)
    # the gradient DP-SGD wrote (clipped, noised, scaled, budget asked), seen through Opacus' own post-noise hook
    noisy: list = []
    budget_hook = parts.optimizer.step_hook
    parts.optimizer.step_hook = lambda o: (budget_hook(o), noisy.append([p.grad.clone() for p in o.params]))
    applied = _grad_spy(parts.optimizer.original_optimizer)
    x = torch.randn(4, 6, generator=g)
    before = [p.detach().clone() for p in model.parameters()]
    parts.optimizer.zero_grad()
    parts.network(x).pow(2).mean().backward()
    parts.optimizer.step()
    assert ledger.steps == 1 and len(noisy) == len(applied) == 1
    # what passed clipping and noise: (a clipped sum of 4 + noise of 6 sigma) / expected batch size
    bound = (4 * clip + 6 * clip * (model.weight.numel() + model.bias.numel()) ** 0.5) / 4
    assert parts.optimizer.expected_batch_size == 4
    assert torch.cat([t.flatten() for t in noisy[0]]).norm() < bound
    for j, (name, p) in enumerate(model.named_parameters()):
        term = mu * (before[j] - global_w[name])
        torch.testing.assert_close(applied[0][j], noisy[0][j] + term, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p.detach(), before[j] - lr * (noisy[0][j] + term), rtol=1e-6, atol=1e-6)
    applied_norm = torch.cat([t.flatten() for t in applied[0]]).norm()
    assert applied_norm > 50 * bound  # the term was not clipped (nor noised or scaled)
    # a physical sub-batch of a logical batch takes no step: no term, no change
    before = [p.detach().clone() for p in model.parameters()]
    parts.optimizer.zero_grad()
    parts.optimizer.signal_skip_step(True)
    parts.network(x).pow(2).mean().backward()
    parts.optimizer.step()
    assert len(applied) == 1 and all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), True, "1"])
def test_bad_mu_raises(mu):
    net = _net()
    engine = _engine(net, torch.optim.SGD(net.parameters(), lr=0.1))
    ProximalTerm().attach(engine)
    with pytest.raises(ValueError, match="mu"):
        _fire(engine, _shifted(net), SimpleNamespace(prox_mu=mu))


def test_global_model_without_a_trainable_parameter_raises_naming_it():
    net = _net()
    net[0].bias.requires_grad_(False)  # a frozen parameter need not be there
    weights = _shifted(net)
    del weights["0.bias"]
    handler = ProximalTerm(net, torch.optim.SGD(net.parameters(), lr=0.1))
    handler.set_global(weights, 0.5)
    del weights["2.weight"]
    with pytest.raises(KeyError, match="2.weight"):
        handler.set_global(weights, 0.5)
    assert handler.mu == 0.0  # the failed round left the term off, not half set
