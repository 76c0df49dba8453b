import pytest
import torch
from monai.networks.nets import DynUNet, SegResNet, UNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.dp_sgd import (
    DPSettings,
    MicroBatchGradSampleModule,
    TensorHookGradSampleModule,
    make_site_private,
    rebuild_optimizer,
    strip_module_prefix,
)


def private(model, opt, loader, *, noise_multiplier, max_grad_norm, ledger=None, seed=0, budget=None, **settings):
    """make_site_private with a budget around ``ledger`` and generators seeded from ``seed``."""
    budget = budget if budget is not None else PrivacyBudget(ledger if ledger is not None else PrivacyLedger())
    return make_site_private(
        model,
        opt,
        loader,
        settings=DPSettings(noise_multiplier, max_grad_norm, **settings),
        budget=budget,
        sampler_generator=torch.Generator().manual_seed(seed),
        noise_generator=torch.Generator().manual_seed(seed + 1),
    )


def _loader(n=8, size=16, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.rand(n, 1, size, size, generator=g), torch.randint(0, 3, (n, 1, size, size), generator=g))
    return DataLoader(ds, batch_size=batch)


def _per_sample_loop(model, x, loss_fn):
    grads = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1])).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad()
    return grads


NETS = {
    "unet": lambda: UNet(2, 1, 3, (4, 8, 16), (2, 2), num_res_units=1, norm="instance"),
    # in-place residual adds (x += identity): stock Opacus hooks crash here
    "segresnet": lambda: SegResNet(
        2, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 1), blocks_up=(1,)
    ),
    # submodules reachable twice (skip_layers) + in-place add on an InstanceNorm view
    "dynunet": lambda: DynUNet(
        2,
        1,
        3,
        [3, 3, 3],
        [1, 2, 2],
        [2, 2],
        filters=(4, 8, 16),
        norm_name=("instance", {"affine": True}),
        res_block=True,
    ),
}


NETS["prelu_convtranspose_3d"] = lambda: nn.Sequential(
    nn.Conv3d(1, 4, 3, padding=1),
    nn.PReLU(),
    nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1),
    nn.PReLU(3),
    nn.Conv3d(3, 2, 1),
)


@pytest.mark.parametrize("mode", ["hooks", "microbatch"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_grad_samples_match_per_sample_loop(name, mode):
    torch.manual_seed(0)
    model = NETS[name]()
    x = torch.rand(3, 1, 8, 8, 8) if name.endswith("3d") else torch.rand(3, 1, 16, 16)
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    model.train()
    ref = _per_sample_loop(model, x, lambda out: out.pow(2).mean())
    cls = TensorHookGradSampleModule if mode == "hooks" else MicroBatchGradSampleModule
    gsm = cls(model, loss_reduction="mean")
    gsm(x).pow(2).mean().backward()
    for j, p in enumerate(model.parameters()):
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], ref[i][j], rtol=1e-4, atol=1e-6)


def test_clipped_update_equals_plain_per_sample_loop_without_noise():
    torch.manual_seed(0)
    model = UNet(2, 1, 3, (4, 8), (2,), num_res_units=0, norm="instance")
    clip, lr = 0.05, 1.0
    ledger = PrivacyLedger()
    parts = private(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        _loader(n=16, batch=4),
        noise_multiplier=1.0,
        max_grad_norm=clip,
        ledger=ledger,
        seed=1,
    )
    parts.optimizer.noise_multiplier = 0.0  # noise off, for the comparison only ...
    parts.optimizer.step_hook = None  # ... and not accounted (a noise-free step is not a private release)
    x, _ = next(iter(parts.data_loader))
    assert x.shape[0] > 0
    loss_fn = lambda out: out.pow(2).mean()  # noqa: E731
    ref = _per_sample_loop(model, x, loss_fn)
    norms = [torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in ref]
    assert max(norms) > clip  # clipping is active
    clipped_sum = [
        sum(gs[j] * min(1.0, clip / (n.item() + 1e-6)) for gs, n in zip(ref, norms, strict=True))
        for j in range(len(ref[0]))
    ]
    for cs in [
        [gs[j] * min(1.0, clip / (n.item() + 1e-6)) for j in range(len(gs))] for gs, n in zip(ref, norms, strict=True)
    ]:
        assert torch.sqrt(sum(c.pow(2).sum() for c in cs)) <= clip * (1 + 1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    parts.optimizer.zero_grad()
    loss_fn(parts.network(x)).backward()
    parts.optimizer.step()
    expected_batch = parts.optimizer.expected_batch_size
    for b, p, cs in zip(before, model.parameters(), clipped_sum, strict=True):
        torch.testing.assert_close(b - p.detach(), lr * cs / expected_batch, rtol=1e-4, atol=1e-7)
    assert ledger.steps == 0  # the hook (budget ask + record) was off for the comparison


def test_noise_std_matches_sigma_clip_over_batch():
    model = nn.Linear(100, 100)
    sigma, clip, lr, batch = 1.3, 0.7, 1.0, 5
    ds = TensorDataset(torch.rand(50, 100))
    ledger = PrivacyLedger()
    parts = private(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        DataLoader(ds, batch_size=batch),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        ledger=ledger,
        seed=3,
    )
    (x,) = next(iter(parts.data_loader))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    parts.optimizer.zero_grad()
    (0.0 * parts.network(x).sum()).backward()  # zero gradient: the update is pure noise
    parts.optimizer.step()
    update = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    expected_std = sigma * clip * lr / parts.optimizer.expected_batch_size
    assert parts.optimizer.expected_batch_size == batch
    assert update.numel() == 10100
    assert update.std().item() == pytest.approx(expected_std, rel=0.03)
    assert update.mean().abs().item() < 4 * expected_std / update.numel() ** 0.5


def test_empty_batches_step_add_noise_and_count():
    model = nn.Linear(4, 2)
    ledger = PrivacyLedger()
    parts = private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        DataLoader(TensorDataset(torch.rand(10, 4)), batch_size=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        ledger=ledger,
    )
    # empty batch that went through the network (as Opacus' loader produces it)
    before = model.weight.detach().clone()
    parts.optimizer.zero_grad()
    parts.network(torch.zeros(0, 4)).sum().backward()
    parts.optimizer.step()
    assert ledger.steps == 1
    assert not torch.equal(before, model.weight)  # noise was added
    # a step with no forward pass at all is still noised and counted (never a silent non-private step)
    before = model.weight.detach().clone()
    parts.optimizer.zero_grad()
    parts.optimizer.step()
    assert ledger.steps == 2
    assert not torch.equal(before, model.weight)
    assert ledger.events[0]["sample_rate"] == pytest.approx(1 / 5)


def test_loader_steps_empty_draws_itself_and_counts_them():
    model = nn.Linear(4, 2)
    ledger = PrivacyLedger()
    items = [{"image": torch.rand(4), "name": f"item{i}"} for i in range(4)]
    parts = private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        DataLoader(items, batch_size=1),  # q = 1/4: about a third of the draws are empty
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        ledger=ledger,
    )
    seen = 0
    for _ in range(5):
        for batch in parts.data_loader:
            assert batch["image"].shape[0] > 0 and len(batch["name"]) == batch["image"].shape[0]
            parts.optimizer.zero_grad()
            parts.network(batch["image"]).sum().backward()
            parts.optimizer.step()
            seen += 1
    assert parts.data_loader.empty_steps > 0
    assert ledger.steps == seen + parts.data_loader.empty_steps == 20


def test_epoch_counts_steps_and_epsilon_matches_history():
    model = UNet(2, 1, 3, (4, 8), (2,), num_res_units=0, norm="instance")
    ledger = PrivacyLedger()
    parts = private(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        _loader(n=12, batch=3),
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        ledger=ledger,
        max_physical_batch_size=2,
    )
    logical = 0
    for x, _ in parts.data_loader:
        parts.optimizer.zero_grad()
        parts.network(x).pow(2).mean().backward()
        parts.optimizer.step()
        logical += 0 if parts.optimizer._is_last_step_skipped else 1
        assert x.shape[0] <= 2
    assert ledger.steps == logical == 4  # one step per logical batch; physical splits are not counted
    ref = PrivacyLedger()
    ref.record_sampled_gaussian(0.25, 1.1, steps=4)
    assert ledger.epsilon(1e-5) == ref.epsilon(1e-5)


def test_optimizer_rebuilt_with_same_hyper_params_and_prefix_stripped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters()}], lr=0.01, weight_decay=0.5
    )
    new = rebuild_optimizer(opt, model)
    assert type(new) is torch.optim.Adam
    assert [g["lr"] for g in new.param_groups] == [0.1, 0.01]
    assert all(g["weight_decay"] == 0.5 for g in new.param_groups)
    parts = private(
        model,
        opt,
        DataLoader(TensorDataset(torch.rand(4, 3)), batch_size=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        ledger=PrivacyLedger(),
    )
    assert parts.optimizer.original_optimizer is not opt
    keys = strip_module_prefix(parts.network.state_dict())
    assert set(keys) == set(model.state_dict())
    nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).load_state_dict(keys)


def test_bad_settings_raise():
    model = nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.rand(4, 2)), batch_size=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacyConfigError):
        private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=1.0)
    with pytest.raises(PrivacyConfigError):
        private(model, opt, loader, noise_multiplier=float("nan"), max_grad_norm=1.0)
    with pytest.raises(PrivacyConfigError):
        private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=-1.0)
    with pytest.raises(PrivacyConfigError):
        private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="x")
    with pytest.raises(PrivacyConfigError, match="budget"):
        make_site_private(
            model, opt, loader, settings=DPSettings(1.0, 1.0), budget=PrivacyLedger(),
            sampler_generator=torch.Generator(), noise_generator=torch.Generator(),
        )  # fmt: skip
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(PrivacyConfigError, match="prepare_for_dp"):
        private(bn, torch.optim.SGD(bn.parameters(), lr=0.1), loader, noise_multiplier=1.0, max_grad_norm=1.0)


def test_fixed_size_batches_are_refused_not_accounted_as_poisson():
    # poisson=False used to warn and account as if sampling were Poisson: an epsilon the batches do not have
    with pytest.raises(PrivacyConfigError, match="Poisson"):
        DPSettings(1.0, 1.0, poisson=False)
    with pytest.raises(PrivacyConfigError, match="physical"):
        DPSettings(1.0, 1.0, privacy_unit="patient", max_physical_batch_size=2)
    with pytest.raises(PrivacyConfigError):
        DPSettings(1.0, 1.0, privacy_unit="pixel")


def test_step_that_would_pass_the_budget_is_refused_before_the_weights_change():
    model = nn.Linear(4, 2)
    q, sigma = 0.5, 1.0
    one = PrivacyLedger()
    one.record_sampled_gaussian(q, sigma, steps=3)
    two = PrivacyLedger()
    two.record_sampled_gaussian(q, sigma, steps=4)
    budget = PrivacyBudget(limit=(one.epsilon(1e-5) + two.epsilon(1e-5)) / 2)  # exactly 3 steps fit
    parts = private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(TensorDataset(torch.rand(4, 4)), batch_size=2),
        noise_multiplier=sigma, max_grad_norm=1.0, budget=budget,
    )  # fmt: skip
    for _ in range(3):
        parts.optimizer.zero_grad()
        parts.optimizer.step()
    before = model.weight.detach().clone()
    with pytest.raises(PrivacyBudgetExceeded):
        parts.optimizer.zero_grad()
        parts.optimizer.step()
    assert torch.equal(before, model.weight)
    assert budget.ledger.steps == 3 and budget.exhausted
    assert budget.epsilon() <= budget.limit


# ---------------------------------------------------------------- per-sample losses
from monai.losses import DiceCELoss, DiceLoss  # noqa: E402

from monai_fedpriv.privacy.losses import PerSampleLoss  # noqa: E402


def test_per_sample_loss_is_mean_of_independent_sample_losses():
    torch.manual_seed(0)
    pred, label = torch.randn(4, 3, 8, 8, requires_grad=True), torch.randint(0, 3, (4, 1, 8, 8))
    loss = PerSampleLoss("dicece")
    values = loss.per_sample(pred, label)
    single = torch.stack(
        [DiceCELoss(to_onehot_y=True, softmax=True)(pred[i : i + 1], label[i : i + 1]) for i in range(4)]
    )
    torch.testing.assert_close(values, single)
    torch.testing.assert_close(loss(pred, label), single.mean())
    # the gradient w.r.t. sample 0 does not depend on the other samples
    (g_all,) = torch.autograd.grad(loss(pred, label) * 4, pred)
    (g_one,) = torch.autograd.grad(loss(pred[:1], label[:1]), pred)
    torch.testing.assert_close(g_all[0], g_one[0])
    empty = loss(pred[:0], label[:0])
    assert empty.item() == 0.0 and empty.requires_grad


def test_coupling_losses_are_refused():
    with pytest.raises(PrivacyConfigError, match="batch=True"):
        PerSampleLoss(DiceLoss(batch=True))
    with pytest.raises(PrivacyConfigError, match="batch=True"):
        PerSampleLoss("dice", batch=True)
    with pytest.raises(PrivacyConfigError):
        PerSampleLoss("focal")
