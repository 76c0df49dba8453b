"""The fast per-sample path: grouped-convolution samplers, the frozen-weight forward, the lean clip-and-noise step."""

import copy

import pytest
import torch
from monai.networks.nets import UNet
from opacus.optimizers import DPOptimizer
from torch import nn

from monai_fedpriv.privacy.dp_sgd import BudgetedDPOptimizer as _LedgerDPOptimizer
from monai_fedpriv.privacy.grad_sample import (
    TensorHookGradSampleModule,
    _conv_grad_sample,
    _grouped_conv_grad_sample,
)


def _loop_grads(layer, x, g):
    """Per-sample weight/bias gradients of <layer(x_i), g_i> by one backward per sample."""
    out = []
    for i in range(x.shape[0]):
        layer.zero_grad()
        (layer(x[i : i + 1]) * g[i : i + 1]).sum().backward()
        out.append({p: p.grad.detach().clone() for p in layer.parameters()})
    return out


LAYERS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (3, 4, 12, 12)),
    "conv2d_dilated_grouped": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (3, 4, 12, 12)),
    "conv2d_nobias_1x1": (lambda: nn.Conv2d(5, 3, 1, bias=False), (2, 5, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, stride=(1, 2, 2), padding=1), (2, 3, 6, 8, 8)),
    "convT2d": (lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1), (3, 6, 5, 5)),
    "convT2d_grouped": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (2, 4, 5, 5)),
    "convT2d_dilated": (
        lambda: nn.ConvTranspose2d(4, 3, 3, stride=3, padding=1, dilation=2, output_padding=2),
        (2, 4, 5, 5),
    ),
    "convT3d": (lambda: nn.ConvTranspose3d(3, 2, 3, stride=2, padding=1, output_padding=1), (2, 3, 4, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_grouped_conv_grad_sample_equals_per_sample_loop(name):
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = make()
    x = torch.randn(shape)
    g = torch.randn_like(layer(x))
    ref = _loop_grads(layer, x, g)
    got = _grouped_conv_grad_sample(layer, [x], g)
    assert set(got) == set(layer.parameters())
    for p, gs in got.items():
        assert gs.shape == (x.shape[0], *p.shape)
        for i in range(x.shape[0]):
            torch.testing.assert_close(gs[i], ref[i][p], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "channels", "size", "path"),
    [
        ("conv", 8, 8, "im2col"),  # 64 output positions
        ("conv", 8, 16, "grouped"),
        ("conv", 3, 16, "im2col"),  # few channels, small unfolded input
        ("convT", 8, 8, "im2col"),  # the contraction runs over the 64 *input* positions
        ("convT", 8, 16, "grouped"),
        ("convT_grouped", 8, 4, "grouped"),  # im2col handles groups=1 only
    ],
)
def test_shape_rule_picks_the_expected_path_with_same_result(kind, channels, size, path, monkeypatch):
    from monai_fedpriv.privacy import grad_sample

    torch.manual_seed(1)
    layer = {
        "conv": lambda: nn.Conv2d(channels, 8, 3, padding=1),
        "convT": lambda: nn.ConvTranspose2d(channels, 8, 3, padding=1),
        "convT_grouped": lambda: nn.ConvTranspose2d(channels, 8, 3, padding=1, groups=2),
    }[kind]()
    x = torch.randn(2, channels, size, size)
    g = torch.randn_like(layer(x))
    ref = _loop_grads(layer, x, g)
    taken = []
    grouped = grad_sample._grouped_conv_grad_sample
    monkeypatch.setattr(grad_sample, "_grouped_conv_grad_sample", lambda *a: taken.append("grouped") or grouped(*a))
    got = _conv_grad_sample(layer, [x], g)
    assert (taken or ["im2col"]) == [path]
    for p, gs in got.items():
        for i in range(2):
            torch.testing.assert_close(gs[i], ref[i][p], rtol=1e-4, atol=1e-5)


def _unet():
    return UNet(2, 1, 3, (4, 8, 16), (2, 2), num_res_units=1, norm="instance")


@pytest.mark.parametrize("skip", [True, False])
def test_frozen_forward_gives_same_grad_samples_and_no_batch_gradient(skip, monkeypatch):
    torch.manual_seed(0)
    model = _unet().train()
    reference = TensorHookGradSampleModule(copy.deepcopy(model))
    monkeypatch.setattr(reference, "skip_batch_grad", False)
    gsm = TensorHookGradSampleModule(model)
    monkeypatch.setattr(gsm, "skip_batch_grad", skip)
    x = torch.rand(3, 1, 16, 16)
    reference(x).pow(2).mean().backward()
    gsm(x).pow(2).mean().backward()
    for p, q in zip(model.parameters(), reference._module.parameters(), strict=True):
        assert p.requires_grad
        torch.testing.assert_close(p.grad_sample, q.grad_sample, rtol=1e-5, atol=1e-7)
        assert (p.grad is None) == skip  # the batch gradient is only formed without the frozen forward
        assert q.grad is not None


def test_frozen_forward_restores_requires_grad_on_error_and_leaves_eval_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 1))
    frozen = nn.Linear(1, 1).requires_grad_(False)
    model.append(frozen)
    gsm = TensorHookGradSampleModule(model).train()
    with pytest.raises(RuntimeError):
        gsm(torch.rand(2, 1, 5, 5))  # wrong size for the Linear layer
    assert all(p.requires_grad for p in model[:3].parameters())
    assert not any(p.requires_grad for p in frozen.parameters())  # frozen parameters stay frozen
    gsm.eval()
    gsm(torch.rand(2, 1, 8, 8)).sum().backward()  # no per-sample path in eval: the plain batch gradient
    assert model[0].weight.grad is not None and getattr(model[0].weight, "grad_sample", None) is None


def _optimizers(seed=0):
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    mine = _LedgerDPOptimizer(
        torch.optim.SGD(params, lr=1.0), noise_multiplier=0.8, max_grad_norm=1.5, expected_batch_size=6,
        generator=gens[0],
    )  # fmt: skip
    theirs = DPOptimizer(
        torch.optim.SGD(params, lr=1.0), noise_multiplier=0.8, max_grad_norm=1.5, expected_batch_size=6,
        generator=gens[1],
    )  # fmt: skip
    return params, mine, theirs


def test_lean_clip_and_noise_equal_opacus_draw_for_draw():
    params, mine, theirs = _optimizers()
    samples = [torch.randn(6, 4, 3) * 2, torch.randn(6, 5) * 2]
    results = []
    for opt in (mine, theirs):
        for p, s in zip(params, samples, strict=True):
            p.grad_sample = s.clone()
            p.summed_grad = None
            p.grad = None
        assert opt.pre_step()
        results.append([p.grad.clone() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # clipping was active and every clipped per-sample gradient is within the norm
    norms = torch.stack([s.reshape(6, -1).norm(dim=1) for s in samples], 1).norm(dim=1)
    assert (norms > 1.5).any()


def _no_randomness(net):
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "drop_connect_rate"):
            m.drop_connect_rate = 0.0
    return net


@pytest.mark.parametrize("name", ["BasicUNet", "FlexibleUNet"])
def test_prepared_monai_networks_grad_samples_equal_per_sample_loop(name):
    """Depthwise (grouped) convolutions, static-same padding, GroupNorm, LeakyReLU: the fast path stays exact."""
    from monai.networks.nets import BasicUNet, FlexibleUNet

    from monai_fedpriv.privacy.model_prep import prepare_for_dp

    torch.manual_seed(0)
    if name == "BasicUNet":
        net = BasicUNet(2, 1, 3, features=(4, 4, 8, 8, 16, 4))
    else:
        net = FlexibleUNet(1, 3, "efficientnet-b0", pretrained=False, spatial_dims=2)
    x = torch.rand(2, 1, 32, 32)
    net, _ = prepare_for_dp(_no_randomness(net), x, norm="group")
    net.train()
    ref = []
    for i in range(2):
        net.zero_grad()
        net(x[i : i + 1]).pow(2).mean().backward()
        ref.append({n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad})
    net.zero_grad()
    gsm = TensorHookGradSampleModule(net)
    gsm(x).pow(2).mean().backward()
    checked = 0
    for n, p in net.named_parameters():
        if p.requires_grad:
            for i in range(2):
                torch.testing.assert_close(p.grad_sample[i], ref[i][n], rtol=1e-3, atol=1e-6, msg=n)
            checked += 1
    assert checked > 20


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("wrapper", ["ours", "opacus"])
def test_plain_copy_leaves_the_dp_hooks_behind_and_on_the_original(wrapper):
    from opacus import GradSampleModule

    from monai_fedpriv.privacy.grad_sample import plain_copy

    torch.manual_seed(0)
    net = _unet().train()
    user_hook = net.model[0].register_forward_hook(lambda *_: None)  # hooks of others survive, in order
    gsm = TensorHookGradSampleModule(net) if wrapper == "ours" else GradSampleModule(net)
    x = torch.rand(2, 1, 16, 16)
    gsm(x).pow(2).mean().backward()
    order = [list(m._forward_hooks) for m in net.modules()]
    clone = plain_copy(net)
    assert all(not m._forward_hooks and not m._backward_hooks for m in clone.modules() if m is not clone.model[0])
    assert list(clone.model[0]._forward_hooks) == [user_hook.id]
    assert all(not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter") for p in clone.parameters())
    clone(x).pow(2).mean().backward()  # a plain network: batch gradients, no per-sample ones
    assert all(p.grad is not None and not hasattr(p, "grad_sample") for p in clone.parameters())
    # the original still has its hooks and state, and still computes per-sample gradients
    assert [list(m._forward_hooks) for m in net.modules()] == order
    assert all(p.grad_sample is not None for p in net.parameters())
    for p in net.parameters():
        p.grad_sample = None
    gsm(x).pow(2).mean().backward()
    assert all(p.grad_sample.shape[0] == 2 for p in net.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="circular"),
        lambda: nn.Conv3d(2, 3, 3, stride=2, padding=1, padding_mode="replicate"),
    ],
)
def test_non_zero_padding_modes_are_exact(make):
    """Opacus' im2col sampler zero-pads and gets these wrong; the project's sampler pads like the layer does."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn((2, layer.in_channels) + (6,) * (layer.weight.dim() - 2))
    g = torch.randn_like(layer(x))
    ref = _loop_grads(layer, x, g)
    got = _conv_grad_sample(layer, [x], g)
    for p, gs in got.items():
        for i in range(2):
            torch.testing.assert_close(gs[i], ref[i][p], rtol=1e-4, atol=1e-5)
