"""Seed 000's networks: MoNet (written from Knolle et al. 2021), the smp U-Nets, exact MAC counts, DP exactness."""

import copy
import sys

import pytest
import torch
from torch import nn

from monai_fedpriv.networks import MoNet, count_macs, count_parameters, smp_unet
from monai_fedpriv.privacy.grad_sample import TensorHookGradSampleModule
from monai_fedpriv.privacy.model_prep import prepare_for_dp

# seed 000 (Ziller et al.), Table 2, at in_channels=1, classes=1
SMP_PARAMETERS = {"mobilenet_v2": 6_628_369, "resnet18": 14_321_937, "vgg11_bn": 18_258_385}
_BUILT: dict[str, nn.Module] = {}  # VGG11 takes ~1.5 s to build (torchvision first makes its 100M-value classifier)


def _smp(encoder: str) -> nn.Module:
    if encoder not in _BUILT:
        _BUILT[encoder] = smp_unet(encoder)
    return copy.deepcopy(_BUILT[encoder])


def _per_sample_errors(net: nn.Module, x: torch.Tensor) -> float:
    """Largest relative error, over samples, of the whole per-sample gradient of the project's DP path
    (``TensorHookGradSampleModule``) against one backward pass per sample."""
    net.train()
    loop = copy.deepcopy(net)
    ref = []
    for i in range(x.shape[0]):
        loop.zero_grad()
        loop(x[i : i + 1]).pow(2).mean().backward()
        ref.append(torch.cat([p.grad.reshape(-1) for p in loop.parameters() if p.requires_grad]))
    TensorHookGradSampleModule(net)(x).pow(2).mean().backward()
    params = [p for p in net.parameters() if p.requires_grad]
    assert all(p.grad_sample.shape == (x.shape[0], *p.shape) for p in params)
    got = torch.cat([p.grad_sample.reshape(x.shape[0], -1) for p in params], 1)
    return max(((got[i] - ref[i]).norm() / ref[i].norm()).item() for i in range(x.shape[0]))


def _prepared_float64(net: nn.Module, x: torch.Tensor) -> nn.Module:
    net, changes = prepare_for_dp(net, x)
    assert any("BatchNorm2d -> InstanceNorm2d" in line for line in changes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    return net.double()  # float64: the comparison tests the maths, not float32 rounding


# ---------------------------------------------------------------- MoNet


@pytest.mark.parametrize(("in_ch", "out_ch", "depth", "norm"), [(1, 1, 2, "batch"), (3, 4, 3, "instance")])
def test_monet_output_shape(in_ch, out_ch, depth, norm):
    net = MoNet(in_channels=in_ch, out_channels=out_ch, base_filters=4, depth=depth, norm=norm)
    assert net(torch.rand(2, in_ch, 32, 24)).shape == (2, out_ch, 32, 24)


def test_monet_paper_size_and_exact_macs():
    net = MoNet(in_channels=1, out_channels=1, base_filters=16, depth=2, norm="batch")
    assert count_parameters(net) == 399_009
    assert sum(b.numel() for b in net.buffers() if b.is_floating_point()) == 1_792  # BatchNorm running statistics
    assert count_parameters(MoNet(concat_skips=False)) == 387_489  # the skip-less variant of seed 000's Table 2
    # every layer is convolutional, so MACs scale exactly with the pixels: 64x64 is 1/16 of the 256x256 count
    assert count_macs(net, (1, 64, 64), include_norm=False) * 16 == 4_741_660_672
    assert count_macs(net, (1, 64, 64)) * 16 == 4_761_845_760
    assert count_parameters(MoNet(in_channels=3, out_channels=4)) == 399_009 + 2 * 9 * 16 + 3 * 17


def test_monet_rejects_bad_settings_and_inputs():
    with pytest.raises(ValueError, match="norm must be one of"):
        MoNet(norm="layer")
    with pytest.raises(ValueError, match="depth must be"):
        MoNet(depth=0)
    with pytest.raises(ValueError, match="dilations"):
        MoNet(dilations=(4, 0))
    net = MoNet(base_filters=4)
    with pytest.raises(ValueError, match=r"divisible by 4, got \(1, 1, 30, 32\)"):
        net(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match="MoNet is 2D"):
        net(torch.rand(1, 1, 8, 8, 8))


def test_monet_dp_per_sample_gradients_are_exact():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    net = _prepared_float64(MoNet(), x)
    assert _per_sample_errors(net, x.double()) < 1e-10


# ---------------------------------------------------------------- complexity


def test_transposed_conv_macs_equal_those_of_the_convolution_it_is_the_adjoint_of():
    up = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1)
    down = nn.Conv2d(4, 6, 4, stride=2, padding=1)
    assert up(torch.zeros(1, 6, 8, 8)).shape == (1, 4, 16, 16)
    assert count_macs(up, (6, 8, 8)) == count_macs(down, (4, 16, 16)) == 6 * 8 * 8 * 4 * 16
    grouped = nn.ConvTranspose3d(4, 6, 3, stride=2, groups=2)
    assert count_macs(grouped, (4, 3, 3, 3)) == 4 * 27 * (6 // 2) * 27


def test_conv_linear_and_norm_macs():
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 5 * 5, 3)
    )
    conv, norm, linear = 8 * 25 * 2 * 9, 8 * 25, 8 * 25 * 3
    net.train()
    assert count_macs(net, (4, 5, 5)) == conv + norm + linear
    assert count_macs(net, (4, 5, 5), include_norm=False, batch_size=3) == conv + linear
    assert net.training  # the mode is restored
    assert count_parameters(net) == 8 * 2 * 9 + 8 + 16 + 200 * 3 + 3
    net[0].requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 16 + 200 * 3 + 3
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(net, ())


# ---------------------------------------------------------------- segmentation-models-pytorch U-Nets


def test_smp_unet_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)
    with pytest.raises(ImportError, match=r"pip install monai-fedpriv\[networks\]"):
        smp_unet("resnet18")
    with pytest.raises(ValueError, match="encoder must be one of"):
        smp_unet("resnet50")


def _no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")

    import huggingface_hub
    import segmentation_models_pytorch.encoders as smp_encoders

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(smp_encoders, "hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("encoder", sorted(SMP_PARAMETERS))
def test_smp_unets_have_table_2_sizes_and_download_nothing(encoder, monkeypatch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    _no_downloads(monkeypatch)
    calls = []
    unet = smp.Unet
    monkeypatch.setattr(smp, "Unet", lambda **kw: calls.append(kw) or unet(**kw))
    net = smp_unet(encoder, in_channels=1, classes=1)
    assert calls == [{"encoder_name": encoder, "encoder_weights": None, "in_channels": 1, "classes": 1}]
    assert count_parameters(net) == SMP_PARAMETERS[encoder]
    _BUILT.setdefault(encoder, net)


def test_smp_unet_loads_local_weights_of_the_network_or_its_encoder(tmp_path, monkeypatch):
    pytest.importorskip("segmentation_models_pytorch")
    _no_downloads(monkeypatch)
    torch.manual_seed(0)
    trained = smp_unet("resnet18")
    whole = tmp_path / "unet.pt"
    torch.save({"state_dict": {f"_module.{k}": v for k, v in trained.state_dict().items()}}, whole)
    loaded = smp_unet("resnet18", weights_path=whole)
    for (k, a), b in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    nested = tmp_path / "ddp_opacus.pt"  # DDP around Opacus: module._module.<key>
    torch.save({f"module._module.{k}": v for k, v in trained.state_dict().items()}, nested)
    again = smp_unet("resnet18", weights_path=nested)
    pairs = zip(trained.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # an RGB encoder checkpoint (torchvision keys, classifier included) into a 1-channel U-Net: summed over RGB
    rgb = smp_unet("resnet18", in_channels=3).encoder.state_dict()
    rgb["fc.weight"], rgb["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(rgb, tmp_path / "encoder.pt")
    gray = smp_unet("resnet18", in_channels=1, weights_path=tmp_path / "encoder.pt")
    torch.testing.assert_close(gray.encoder.conv1.weight, rgb["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(gray.encoder.layer4[1].bn2.bias, rgb["layer4.1.bn2.bias"])


def test_smp_unet_weights_that_do_not_fit_name_the_file(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    wrong = tmp_path / "mobilenet.pt"
    torch.save(smp_unet("mobilenet_v2").state_dict(), wrong)
    with pytest.raises(ValueError, match=r"mobilenet\.pt.*does not fit the U-Net's network"):
        smp_unet("resnet18", weights_path=wrong)
    with pytest.raises(ValueError, match="does not exist"):
        smp_unet("resnet18", weights_path=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        smp_unet("resnet18", weights_path=tmp_path / "junk.pt")


@pytest.mark.parametrize("encoder", sorted(SMP_PARAMETERS))
def test_smp_unets_dp_per_sample_gradients_are_exact(encoder):
    pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))  # 64: 2x2 maps at stride 32
    net = _prepared_float64(_smp(encoder), x)
    assert _per_sample_errors(net, x.double()) < 1e-10
