import pytest
import torch
from monai.networks.nets import BasicUNet, DynUNet, FlexibleUNet, SegResNet, UNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.dp_sgd import DPSettings, make_site_private, strip_module_prefix
from monai_fedpriv.privacy.losses import PerSampleLoss
from monai_fedpriv.privacy.model_prep import find_dp_problems, prepare_for_dp

SIZE = 16
NETS = {
    "UNet": lambda: UNet(2, 1, 3, (4, 8, 16), (2, 2), num_res_units=1, norm="batch"),
    "BasicUNet": lambda: BasicUNet(2, 1, 3, features=(4, 4, 8, 8, 16, 4)),
    "SegResNet": lambda: SegResNet(
        2, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 1), blocks_up=(1,)
    ),
    "DynUNet": lambda: DynUNet(
        2, 1, 3, [3, 3, 3], [1, 2, 2], [2, 2], filters=(4, 8, 16), norm_name="batch", res_block=True
    ),
}


def _train_one_dp_step(net, size=SIZE):
    ds = TensorDataset(torch.rand(6, 1, size, size), torch.randint(0, 3, (6, 1, size, size)))
    ledger = PrivacyLedger()
    plain_keys = set(net.state_dict())
    parts = make_site_private(
        net,
        torch.optim.Adam(net.parameters(), lr=1e-2),
        DataLoader(ds, batch_size=3),
        settings=DPSettings(1.0, 1.0),
        budget=PrivacyBudget(ledger),
        sampler_generator=torch.Generator().manual_seed(0),
        noise_generator=torch.Generator().manual_seed(1),
    )
    loss_fn = PerSampleLoss("dicece")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = ds.tensors[0][:3], ds.tensors[1][:3]
    parts.optimizer.zero_grad()
    loss = loss_fn(parts.network(x), y)
    loss.backward()
    parts.optimizer.step()
    after = strip_module_prefix(parts.network.state_dict())
    assert set(after) == plain_keys
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert set(trainable) <= set(changed)
    assert ledger.steps == 1 and torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(NETS))
def test_monai_networks_train_under_dp_after_preparation(name):
    torch.manual_seed(0)
    size = 32 if name == "BasicUNet" else SIZE  # 4 poolings: 16x16 would end at 1x1, undefined for InstanceNorm
    net, changes = prepare_for_dp(NETS[name](), torch.rand(2, 1, size, size))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    if name in ("UNet", "DynUNet"):
        assert any("BatchNorm2d -> InstanceNorm2d" in c for c in changes)
    if name == "BasicUNet":
        assert any("LeakyReLU(inplace=True) -> inplace=False" in c for c in changes)
    _train_one_dp_step(net, size=size)


def test_flexible_unet_trains_under_dp():
    # efficientnet-b0 backbone built without pretrained weights (no torchvision, no download). GroupNorm because its
    # deepest features are 1x1 at this input size, where InstanceNorm is undefined.
    net = FlexibleUNet(1, 3, "efficientnet-b0", pretrained=False, spatial_dims=2)
    net, changes = prepare_for_dp(net, torch.rand(2, 1, 32, 32), norm="group")
    assert any("-> GroupNorm" in c for c in changes)
    _train_one_dp_step(net, size=32)


def test_batchnorm_weights_are_kept_and_group_norm_option():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 1, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.arange(4.0))
    original = net
    copy_net, changes = prepare_for_dp(net, torch.rand(2, 1, 8, 8), norm="group", inplace=False)
    assert isinstance(original[1], nn.BatchNorm2d) and original[2].inplace  # untouched
    assert isinstance(copy_net[1], nn.GroupNorm) and not copy_net[2].inplace
    torch.testing.assert_close(copy_net[1].weight.detach(), torch.arange(4.0))
    assert len(changes) == 2
    same, _ = prepare_for_dp(net, torch.rand(2, 1, 8, 8))
    assert same is original and isinstance(original[1], nn.InstanceNorm2d)
    assert original[1].track_running_stats is False


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(1, 1, 3, padding=1)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.shared(self.shared(x))


def test_unused_parameters_are_frozen_and_reuse_reported():
    problems = find_dp_problems(_Odd(), torch.rand(2, 1, 8, 8))
    assert problems["unused"] == ["unused.weight", "unused.bias"]
    assert problems["reused"] == ["shared (called 2 times)"]
    net, changes = prepare_for_dp(_Odd(), torch.rand(2, 1, 8, 8))
    assert not net.unused.weight.requires_grad
    assert any("frozen" in c for c in changes) and any("called 2 times" in c for c in changes)
    _train_one_dp_step(net, size=8)


def test_bad_inputs_raise():
    with pytest.raises(PrivacyConfigError):
        prepare_for_dp("not a model", torch.rand(2, 1, 8, 8))
    with pytest.raises(PrivacyConfigError):
        prepare_for_dp(nn.Linear(2, 2), torch.rand(2))
    with pytest.raises(PrivacyConfigError):
        prepare_for_dp(nn.Conv2d(1, 1, 3), torch.rand(2, 1, 8, 8), norm="layer")
    with pytest.raises(PrivacyConfigError, match="dry run"):
        prepare_for_dp(nn.Conv2d(1, 1, 3), torch.rand(2, 3, 8, 8))  # wrong channel count


def test_preparation_dry_runs_the_mode_training_will_use():
    # stock Opacus hooks cannot take SegResNet's in-place residual adds: refused at preparation, naming the mode
    net = NETS["SegResNet"]()
    x = torch.rand(2, 1, SIZE, SIZE)
    with pytest.raises(PrivacyConfigError, match="'opacus_hooks'"):
        prepare_for_dp(net, x, grad_sample_mode="opacus_hooks")
    for mode in ("hooks", "microbatch", "functorch"):
        prepare_for_dp(net, x, grad_sample_mode=mode, inplace=False)


def test_converted_norms_keep_the_models_dtype():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).double()
    prepared, changes = prepare_for_dp(net, torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    assert changes and all(p.dtype == torch.float64 for p in prepared.parameters())
