"""Gradient inversion (Eq. 1): the victim's update, the attacker's replay of it, and the attack against DP-SGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from monai_fedpriv.attacks import (
    ThreatModel,
    build_victim_update,
    intensity_label,
    reconstruct,
    replay_update,
    score_reconstruction,
    soft_target_loss,
)
from monai_fedpriv.errors import PrivacyConfigError, UpdateError

SIZE = 24


def _net(dims: int = 2, channels: tuple[int, ...] = (4, 8, 16)) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(dims, 1, 3, channels, (2,) * (len(channels) - 1), norm="INSTANCE", num_res_units=1)


def _phantom(size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A brain-like phantom: bright core, darker ring, a gyral ripple; label = intensity classes."""
    size = size or SIZE
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (xx**2 + (1.2 * yy) ** 2).sqrt()
    img = (0.45 * (r < 0.85).float() + 0.45 * (r < 0.5).float() + 0.1 * torch.sin(7 * xx) * (r < 0.85)).clamp(0, 1)
    img = img[None]
    return img, intensity_label(img, 3)


LOSS = DiceCELoss(to_onehot_y=True, softmax=True)


def test_soft_target_loss_matches_label_loss():
    net = _net()
    img, lbl = _phantom()
    logits = net(img[None])
    onehot = F.one_hot(lbl[None, 0], 3).movedim(-1, 1).float()
    assert torch.allclose(soft_target_loss(LOSS)(logits, onehot), LOSS(logits, lbl[None]), atol=1e-6)
    assert LOSS.dice.to_onehot_y  # the original is untouched


def test_victim_update_is_sgd_step_with_clipping_and_seeded_noise():
    net = _net()
    img, lbl = _phantom()
    grads = torch.autograd.grad(LOSS(net(img[None]), lbl[None]), list(net.parameters()))
    gnorm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    plain = build_victim_update(net, LOSS, img[None], lbl[None], lr=0.1)
    for (name, _), g in zip(net.named_parameters(), grads, strict=True):
        assert torch.allclose(plain[name], -0.1 * g, atol=1e-6)
    clip = gnorm / 4
    clipped = build_victim_update(net, LOSS, img[None], lbl[None], lr=0.1, max_grad_norm=clip)
    norm = float(torch.sqrt(sum((v**2).sum() for v in clipped.values())))
    assert norm == pytest.approx(0.1 * clip, rel=1e-4)
    noisy = [
        build_victim_update(
            net, LOSS, img[None], lbl[None], noise_multiplier=1.0, max_grad_norm=clip,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (3, 3, 4)
    ]  # fmt: skip
    key = next(iter(plain))
    assert torch.equal(noisy[0][key], noisy[1][key]) and not torch.equal(noisy[0][key], noisy[2][key])
    with pytest.raises(PrivacyConfigError):
        build_victim_update(net, LOSS, img[None], lbl[None], noise_multiplier=1.0, max_grad_norm=1.0)


def test_replay_reproduces_multi_step_update_exactly():
    """The attacker's unrolled K-step replay, fed the true image, gives the update the site sent."""
    net = _net()
    img, lbl = _phantom()
    sent = build_victim_update(net, LOSS, img[None], lbl[None], local_steps=3, lr=0.5, max_grad_norm=0.05)
    tm = ThreatModel((SIZE, SIZE), 3, local_steps=3, lr=0.5, max_grad_norm=0.05)
    params = {n: p.detach() for n, p in net.named_parameters()}
    onehot = F.one_hot(lbl[None, 0], 3).movedim(-1, 1).float()
    replay = replay_update(net, params, {}, soft_target_loss(LOSS), img[None], onehot, tm)
    for name in sent:
        assert torch.allclose(replay[name], sent[name], atol=1e-6, rtol=1e-4)


def _attack(noise: float, clip: float | None, iterations: int = 120) -> dict:
    net = _net()
    img, lbl = _phantom()
    gen = torch.Generator().manual_seed(0)
    delta = build_victim_update(net, LOSS, img[None], lbl[None], noise_multiplier=noise, max_grad_norm=clip,
                                generator=gen)  # fmt: skip
    tm = ThreatModel((SIZE, SIZE), 3, noise_multiplier=noise, max_grad_norm=clip)
    recon, stats = reconstruct(delta, net, tm, LOSS, mask=lbl[None], iterations=iterations, restarts=2, num_threads=1,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert stats["winner"] == min(range(2), key=lambda r: stats["restart_losses"][r])
    assert stats["iterations_per_second"] > 0 and stats["vectorized"]
    return score_reconstruction(recon[0], img, lbl) | {"matching_loss": stats["matching_loss"]}


def test_attack_without_privacy_clearly_beats_high_privacy():
    clear = _attack(0.0, None)
    private = _attack(1.5, 0.1)  # the "high" regime of seed 000, Table 1
    assert clear["ssim"] > private["ssim"] + 0.2
    assert clear["psnr"] > private["psnr"] + 3.0
    assert clear["ssim"] > clear["baselines"]["constant"]["ssim"] + 0.2
    assert clear["psnr"] > clear["baselines"]["constant"]["psnr"]
    assert private["ssim"] < private["baselines"]["mask"]["ssim"]
    assert clear["matching_loss"] < private["matching_loss"]


def test_unknown_mask_is_optimised_jointly():
    net = _net()
    img, lbl = _phantom()
    delta = build_victim_update(net, LOSS, img[None], lbl[None])
    tm = ThreatModel((SIZE, SIZE), 3, mask_known=False)
    recon, stats = reconstruct(delta, net, tm, LOSS, iterations=40, restarts=2, num_threads=1)
    assert recon.shape == (1, 1, SIZE, SIZE) and stats["mask"].shape == (1, 1, SIZE, SIZE)
    assert 0.0 <= float(recon.min()) and float(recon.max()) <= 1.0
    with pytest.raises(ValueError, match="no mask"):
        reconstruct(delta, net, ThreatModel((SIZE, SIZE), 3), LOSS, iterations=1)


def test_loop_fallback_matches_vmap():
    net = _net()
    img, lbl = _phantom()
    delta = build_victim_update(net, LOSS, img[None], lbl[None])
    tm = ThreatModel((SIZE, SIZE), 3)
    runs = [
        reconstruct(delta, net, tm, LOSS, mask=lbl[None], iterations=3, restarts=2, vectorize=v, num_threads=1,
                    generator=torch.Generator().manual_seed(5))
        for v in (True, False)
    ]  # fmt: skip
    assert runs[0][1]["vectorized"] and not runs[1][1]["vectorized"]
    assert runs[0][1]["restart_losses"] == pytest.approx(runs[1][1]["restart_losses"], rel=1e-3, abs=1e-4)


def test_3d_volume_matching_loss_decreases():
    net = _net(dims=3, channels=(4, 8))
    vol = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    lbl = intensity_label(vol, 3)
    delta = build_victim_update(net, LOSS, vol[None], lbl[None])
    tm = ThreatModel((8, 8, 8), 3)
    losses = [
        reconstruct(delta, net, tm, LOSS, mask=lbl[None], iterations=it, restarts=1, num_threads=1,
                    generator=torch.Generator().manual_seed(2))[1]["matching_loss"]
        for it in (1, 40)
    ]  # fmt: skip
    assert losses[1] < 0.5 * losses[0]


def test_rejects_bad_updates_and_threat_models():
    net = _net()
    zero = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    with pytest.raises(UpdateError):
        reconstruct(zero, net, ThreatModel((SIZE, SIZE), 3), LOSS, mask=torch.zeros(1, 1, SIZE, SIZE), iterations=1)
    with pytest.raises(PrivacyConfigError):
        ThreatModel((SIZE, SIZE), 3, noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError):
        ThreatModel.for_regime("extreme", image_shape=(SIZE, SIZE), num_classes=3)
    assert ThreatModel.for_regime("medium", image_shape=(SIZE, SIZE), num_classes=3).max_grad_norm == 0.5
