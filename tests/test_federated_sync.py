"""FederatedSync driving real MONAI trainers through the in-process transport."""

import copy

import pytest
import torch
from monai.engines import SupervisedTrainer

from monai_fedpriv.fl.strategies import FedAvg
from monai_fedpriv.fl.transport import InProcessTransport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate
from monai_fedpriv.fl.weights import exchangeable_state
from monai_fedpriv.handlers import FederatedSync


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randn(n, 2, 6, 6, generator=g)
    return x, y


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 3, padding=1)
    )


def _trainer(net, x, y, lr, max_epochs):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loader = [{"image": x, "label": y}]  # one full batch per epoch
    return SupervisedTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        loss_function=torch.nn.MSELoss(),
    )


def test_fedavg_one_full_batch_sgd_step_equals_centralised_gradient_descent():
    """With one full-batch SGD step per round and weights by samples, FedAvg == GD on the union."""
    sizes, rounds, lr = [3, 5, 8], 4, 0.05
    datasets = [_data(n, seed=i) for i, n in enumerate(sizes)]
    transport = InProcessTransport()
    glob = exchangeable_state(_net())
    transport.publish(GlobalModel(0, glob))
    trainers = []
    for i, (x, y) in enumerate(datasets):
        tr = _trainer(_net(), x, y, lr, rounds)
        FederatedSync(transport, f"site-{i}", every=1, unit="epochs", n_samples=len(x)).attach(tr)
        trainers.append(tr)
    agg = FedAvg("samples")
    for r in range(1, rounds + 1):
        for tr in trainers:
            tr.run()
        updates = transport.collect()
        assert [u.local_steps for u in updates] == [1, 1, 1]
        glob = agg(glob, updates)
        transport.publish(GlobalModel(r, glob))

    xs = torch.cat([d[0] for d in datasets])
    ys = torch.cat([d[1] for d in datasets])
    central = _net()
    _trainer(central, xs, ys, lr, rounds).run()
    ref = exchangeable_state(central)
    for k in ref:
        assert torch.allclose(glob[k], ref[k], atol=1e-6), k


class _Raise:
    def __call__(self, update):
        raise ValueError("boom")


def test_failing_filter_sends_nothing():
    transport = InProcessTransport()
    net = _net()
    transport.publish(GlobalModel(0, exchangeable_state(net)))
    x, y = _data(4, 0)
    tr = _trainer(net, x, y, 0.1, 2)
    FederatedSync(transport, "site-1", filters=[_Raise()]).attach(tr)
    with pytest.raises(RuntimeError, match=r"filter #0 \(_Raise\) failed.*nothing was sent"):
        tr.run()
    assert transport.inbox == {}


def test_filter_sees_update_and_its_output_is_what_is_sent():
    transport = InProcessTransport()
    net = _net()
    transport.publish(GlobalModel(0, exchangeable_state(net)))
    x, y = _data(4, 0)
    tr = _trainer(net, x, y, 0.1, 2)

    def halve(u: ModelUpdate) -> ModelUpdate:
        out = copy.copy(u)
        out.delta = {k: v / 2 if v.is_floating_point() else v for k, v in u.delta.items()}
        out.meta = {**u.meta, "privacy": {"note": "halved"}}
        return out

    sync = FederatedSync(transport, "site-1", filters=[halve])
    sync.attach(tr)
    sync.attach(tr)  # double attach is a no-op
    tr.run()
    sent = transport.collect()[0]
    local = exchangeable_state(net)
    assert torch.allclose(sent.delta["0.weight"] * 2, local["0.weight"] - transport.current.weights["0.weight"])
    assert sent.meta["privacy"] == {"note": "halved"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"unit": "rounds"}, "unit"),
        ({"every": 0}, "every"),
        ({"momentum": "keep"}, "momentum"),
        ({"filters": [3]}, "callable"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FederatedSync(InProcessTransport(), "s", **kwargs)


def test_transport_type_is_checked():
    with pytest.raises(TypeError, match="Transport"):
        FederatedSync(object(), "s")


@pytest.mark.parametrize("policy", ["restart", "local", "aggregate"])
def test_momentum_policies(policy):
    transport = InProcessTransport()
    torch.manual_seed(1)
    net = _net()
    transport.publish(GlobalModel(0, exchangeable_state(net)))
    x, y = _data(4, 0)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    tr = SupervisedTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=[{"image": x, "label": y}] * 2,
        network=net,
        optimizer=opt,
        loss_function=torch.nn.MSELoss(),
    )
    sync = FederatedSync(transport, "site-1", momentum=policy)
    sync.attach(tr)
    tr.run()
    u = transport.collect()[0]
    assert (u.optimizer_state is not None) == (policy == "aggregate")
    if policy == "aggregate":
        assert set(u.optimizer_state) == {
            f"{n}/{k}" for n, _ in net.named_parameters() for k in ("exp_avg", "exp_avg_sq")
        }
    steps_before = {id(p): float(s["step"]) for p, s in opt.state.items()}
    transport.publish(
        GlobalModel(1, transport.current.weights, optimizer_state=FedAvg().aggregate_optimizer_state([u]))
    )
    tr.run()
    steps_after = [float(s["step"]) for s in opt.state.values()]
    if policy == "restart":  # state re-initialised at the round start: only this round's 2 steps
        assert steps_after == [2.0] * len(steps_after)
    else:  # state carried over (local) or re-loaded (aggregated) keeps counting
        assert all(a > 2.0 for a in steps_after), (steps_before, steps_after)


def test_the_in_process_transport_hands_each_site_its_own_copy_of_the_global_model():
    from monai_fedpriv.fl.transport.inprocess import InProcessTransport
    from monai_fedpriv.fl.update import GlobalModel

    transport = InProcessTransport()
    transport.publish(GlobalModel(0, {"w": torch.zeros(3)}, {"m": torch.zeros(3)}))
    first, second = transport.receive("a"), transport.receive("b")
    first.weights["w"] += 1.0  # a site may keep (FederatedSync does) or change what it received
    first.optimizer_state["m"] += 1.0
    assert float(second.weights["w"].sum()) == 0.0 and float(transport.current.weights["w"].sum()) == 0.0
    assert float(transport.receive("c").optimizer_state["m"].sum()) == 0.0
