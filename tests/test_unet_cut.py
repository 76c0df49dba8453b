"""Cutting a MONAI UNet into FedReplay's encoder/primary and SplitNN's site/server parts, exactly equal to the whole."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from opacus import GradSampleModule

from monai_fedpriv.networks import build_network
from monai_fedpriv.networks.unet_cut import (
    LatentEncoder,
    LocalLink,
    PrimaryModel,
    SiteHead,
    depth_to_space,
    encoder_and_primary,
    part_keys,
    server_keys,
    server_part,
    site_keys,
    space_to_depth,
    unet_levels,
)


def _net(spatial_dims: int = 2, res_units: int = 1, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims, 3 if spatial_dims == 2 else 1, 2, (4, 8, 16), (2, 2), num_res_units=res_units,
                norm="INSTANCE")  # fmt: skip


def _input(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_levels_of_a_monai_unet_and_resolution_of_x1():
    net = _net()
    levels = unet_levels(net)
    assert len(levels.downs) == len(levels.ups) == len(levels.skips) == 2
    assert levels.downs[0] is net.model[0] and levels.ups[0] is net.model[2]
    assert levels.bottom is net.model[1].submodule[1].submodule
    x = _input(2, 3, 32, 32)
    with torch.no_grad():
        x1 = levels.downs[0](x)
        x2 = levels.downs[1](x1)
    assert x1.shape == (2, 4, 16, 16) and x2.shape == (2, 8, 8, 8)  # down_1 already downsamples
    with torch.no_grad():
        assert levels.bottom(x2).shape == (2, 16, 8, 8)  # the bottom block keeps the resolution


@pytest.mark.parametrize("bad", [torch.nn.Conv2d(1, 1, 3), torch.nn.Sequential(torch.nn.Linear(2, 2))])
def test_not_a_unet_is_refused(bad):
    with pytest.raises(ValueError, match="expected a MONAI UNet.*got (Conv2d|Sequential)"):
        unet_levels(bad)
    with pytest.raises(ValueError, match="expected a MONAI UNet"):
        encoder_and_primary(bad, 1)


@pytest.mark.parametrize("cut", [0, 3, -1, True])
def test_cut_block_out_of_range_is_refused(cut):
    with pytest.raises(ValueError, match=r"cut_block must be in \[1, 2\]"):
        encoder_and_primary(_net(), cut)


def test_space_to_depth_is_pixel_unshuffle_in_2d_and_lossless_in_3d():
    x = _input(2, 3, 8, 12)
    assert torch.equal(space_to_depth(x, (4, 4)), F.pixel_unshuffle(x, 4))
    assert torch.equal(depth_to_space(F.pixel_unshuffle(x, 4), (4, 4)), x)
    assert torch.equal(depth_to_space(space_to_depth(x, (2, 4)), (2, 4)), x)
    v = _input(1, 2, 4, 8, 6)
    packed = space_to_depth(v, (2, 4, 3))
    assert packed.shape == (1, 2 * 24, 2, 2, 2) and torch.equal(depth_to_space(packed, (2, 4, 3)), v)
    with pytest.raises(ValueError, match="not divisible"):
        space_to_depth(v, (3, 1, 1))


@pytest.mark.parametrize("cut", [1, 2])
@pytest.mark.parametrize("res_units", [1, 2])
def test_primary_of_encoder_equals_network_2d(cut, res_units):
    net = _net(res_units=res_units)
    encoder, primary = encoder_and_primary(net, cut)
    assert encoder.downs[0] is net.model[0] and primary.ups[0] is net.model[2]  # references, not copies
    x = _input(2, 3, 32, 32)
    with torch.no_grad():
        latent = encoder(x)
        feats = [net.model[0](x)]
        if cut == 2:
            feats.append(net.model[1].submodule[0](feats[0]))
        assert torch.allclose(primary(latent), net(x), atol=1e-6)
    channels = {1: 4, 2: 4 * 2 * 2 + 8}[cut]  # cut 2: x_1 (4 ch, 16x16) folded 2x2 next to x_2 (8 ch, 8x8)
    assert latent.shape == (2, channels, 32 // 2**cut, 32 // 2**cut)
    for got, want in zip(primary.unpack(latent), feats, strict=True):
        assert torch.equal(got, want)  # lossless packing


@pytest.mark.parametrize("cut", [1, 2])
def test_primary_of_encoder_equals_network_3d(cut):
    net = _net(spatial_dims=3)
    encoder, primary = encoder_and_primary(net, cut)
    x = _input(1, 1, 16, 16, 16)
    with torch.no_grad():
        latent = encoder(x)
        assert latent.shape[2:] == (16 // 2**cut,) * 3
        assert torch.equal(primary.unpack(latent)[0], net.model[0](x))
        assert torch.allclose(primary(latent), net(x), atol=1e-6)


def test_primary_trains_like_the_network():
    net = _net(seed=3)
    ref = copy.deepcopy(net)
    encoder, primary = encoder_and_primary(net, 2)
    x = _input(2, 3, 32, 32)
    with torch.no_grad():
        latent = encoder(x)
    primary(latent).square().mean().backward()
    ref(x).square().mean().backward()
    grads = dict(ref.named_parameters())
    for name, p in primary.named_parameters():
        full = part_keys(net, primary)[name]
        assert torch.allclose(p.grad, grads[full].grad, atol=1e-6), name


def test_indivisible_input_is_refused_with_a_clear_message():
    encoder, primary = encoder_and_primary(_net(), 2)
    with torch.no_grad(), pytest.raises(ValueError, match="divisible"):
        encoder(_input(1, 3, 34, 34))  # x_1 is 17 wide, x_2 9
    with pytest.raises(ValueError, match="channels"):
        primary(_input(1, 5, 8, 8))


def test_probe_leaves_batchnorm_statistics_and_modes_alone():
    torch.manual_seed(0)
    net = UNet(2, 1, 1, (4, 8, 16), (2, 2), num_res_units=1, norm="BATCH").train()
    before = copy.deepcopy(net.state_dict())
    encoder, primary = encoder_and_primary(net, 2)
    assert all(m.training for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    net.eval()
    with torch.no_grad():
        x = _input(2, 1, 16, 16)
        assert torch.allclose(primary(encoder(x)), net(x), atol=1e-6)


def test_bundle_network_cut_after_the_first_block():
    torch.manual_seed(0)
    net = build_network("unet", in_channels=3, out_channels=1, spatial_dims=2)
    encoder, primary = encoder_and_primary(net, 1)
    x = _input(1, 3, 64, 64)
    with torch.no_grad():
        latent = encoder(x)
        assert latent.shape == (1, 16, 32, 32)
        assert torch.allclose(primary(latent), net(x), atol=1e-6)
    assert len(unet_levels(net).downs) == 4


def test_split_forward_and_gradients_equal_the_network():
    net = _net(seed=5)
    ref = copy.deepcopy(net)
    head = SiteHead(net, LocalLink(server_part(net)))
    x, y = _input(2, 3, 32, 32), (_input(2, 2, 32, 32, seed=2) > 0).float()
    out = head(x)
    assert torch.allclose(out, ref(x), atol=1e-6)
    F.binary_cross_entropy_with_logits(out, y).backward()
    F.binary_cross_entropy_with_logits(ref(x), y).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.allclose(p.grad, ref_params[name].grad, atol=1e-6), name


@pytest.mark.parametrize("train", [True, False])
def test_split_without_grad_equals_the_network(train):
    net = _net(seed=6).train(train)
    head = SiteHead(net, LocalLink(server_part(net)))
    x = _input(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(head(x), net(x), atol=1e-6)
    with pytest.raises(RuntimeError, match="forward in training mode"):
        head.link.backward(torch.zeros(2, 4, 16, 16))  # no graph was recorded


def test_one_split_sgd_step_equals_one_network_step():
    net = _net(res_units=2, seed=7)
    ref, start = copy.deepcopy(net), copy.deepcopy(net.state_dict())
    server = server_part(net)
    head = SiteHead(net, LocalLink(server, torch.optim.SGD(server.parameters(), lr=0.1)))
    site_opt = torch.optim.SGD(head.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = _input(2, 3, 32, 32), (_input(2, 2, 32, 32, seed=2) > 0).float()
    site_opt.zero_grad()
    F.binary_cross_entropy_with_logits(head(x), y).backward()
    site_opt.step()
    ref_opt.zero_grad()
    F.binary_cross_entropy_with_logits(ref(x), y).backward()
    ref_opt.step()
    want = ref.state_dict()
    for key, value in net.state_dict().items():
        assert torch.allclose(value, want[key], atol=1e-6), key
    moved = {k for k, p in net.named_parameters() if not torch.equal(p, start[k])}
    assert moved & set(site_keys(net)) and moved & set(server_keys(net))  # both sides took their step
    assert all(k in moved for k in start if k.endswith("weight"))  # (biases before instance norm get no gradient)


def test_keys_partition_the_network():
    net = _net(res_units=2)
    keys = list(net.state_dict())
    site, server = site_keys(net), server_keys(net)
    assert sorted(site + server) == sorted(keys) and not set(site) & set(server)
    assert all(k.startswith(("model.0.", "model.2.")) for k in site)
    encoder, primary = encoder_and_primary(net, 2)
    enc, prim = part_keys(net, encoder), part_keys(net, primary)
    assert sorted([*enc.values(), *prim.values()]) == sorted(keys)
    assert set(enc) == set(encoder.state_dict()) and set(prim) == set(primary.state_dict())
    state = net.state_dict()
    assert all(torch.equal(encoder.state_dict()[k], state[full]) for k, full in enc.items())
    with pytest.raises(ValueError, match="not a tensor of the network"):
        part_keys(net, torch.nn.Conv2d(1, 1, 3))


def test_dp_wrapped_network_is_unwrapped():
    net = _net()
    wrapped = GradSampleModule(net)
    assert LatentEncoder(wrapped, 1).downs[0] is net.model[0]
    assert PrimaryModel(wrapped, 1).ups[0] is net.model[2]
    assert server_part(wrapped) is net.model[1].submodule
    assert all(k.startswith("_module.model.") for k in site_keys(wrapped))  # the keys of the state given
