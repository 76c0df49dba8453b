"""Seed 004's Table 2 on a U-Net: FedReplay's latents (Eq. 2) against FedAvg's update (Eq. 1), on the same victims."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from monai_fedpriv.attacks.leakage import ROW_KEYS, latent_release, leakage_markdown, leakage_rows, mask_dice
from monai_fedpriv.attacks.scores import psnr, ssim
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.filters.latents import latent_event

SIZE = 32


def _net(out_channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(2, 1, out_channels, (4, 8, 16), (2, 2), norm="INSTANCE", num_res_units=1)


def _victim(shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A brain-like phantom (bright core, darker ring, a ripple) and its core as the binary mask."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    r = ((xx - shift) ** 2 + (1.2 * yy) ** 2).sqrt()
    img = (0.45 * (r < 0.85).float() + 0.45 * (r < 0.5).float() + 0.1 * torch.sin(7 * xx) * (r < 0.85)).clamp(0, 1)
    return img[None], (r < 0.5).long()[None]


def _rows(**kw):
    settings = {"activation": "sigmoid", "iterations": 4, "restarts": 1, "latent_noise": (None, 50.0), **kw}
    return leakage_rows(_net(), [_victim(), _victim(0.2)], **settings)


@pytest.fixture(scope="module")
def rows():
    return _rows()


def test_rows_follow_the_contract_one_per_victim_and_attack(rows):
    assert len(rows) == 2 * (1 + 2 * 2)  # per victim: the update, then cuts 1 and 2 clean and noised
    assert all(tuple(r) == ROW_KEYS for r in rows)
    combos = {(r["victim"], r["method"], r["what"], r["cut_block"], r["latent_mechanism"]) for r in rows}
    assert len(combos) == len(rows) and {r["victim"] for r in rows} == {0, 1}
    for r in rows:
        assert isinstance(r["ssim"], float) and isinstance(r["psnr"], float)
        assert isinstance(r["latent_mechanism"], bool)
        if r["method"] == "fedavg":
            assert r["what"] == "update" and r["cut_block"] is None and r["epsilon"] is None
            assert not r["latent_mechanism"] and isinstance(r["dice"], float) and 0.0 <= r["dice"] <= 1.0
        else:
            assert r["method"] == "fedreplay" and r["what"] == "latents" and r["cut_block"] in (1, 2)
            assert r["dice"] is None  # FedReplay uploads the labels themselves
            assert (r["epsilon"] is not None) == r["latent_mechanism"]
    assert _rows() == rows  # every draw seeded


def test_clean_cut1_latents_give_the_image_back_and_the_mechanism_stops_it():
    img, lbl = _victim()
    got = leakage_rows(_net(), [(img, lbl)], activation="sigmoid", cut_blocks=(1,), latent_noise=(None, 1e-3, 50.0),
                       include_update=False, iterations=300, restarts=1)  # fmt: skip
    clean, tiny, large = got
    constant = torch.full_like(img, float(img.mean()))  # what knowing the intensity statistics gives
    assert clean["ssim"] > 0.5 and clean["ssim"] > ssim(constant, img) + 0.4
    assert clean["psnr"] > psnr(constant, img) + 5.0
    assert tiny["ssim"] > clean["ssim"] - 0.1  # the attacker replays the clip: clipping alone hides nothing
    assert large["ssim"] < clean["ssim"] - 0.4 and large["psnr"] < clean["psnr"] - 5.0
    for row, sigma in ((tiny, 1e-3), (large, 50.0)):
        assert row["epsilon"] == pytest.approx(PrivacyLedger().epsilon_with([latent_event(sigma, 1)], 1e-5))


def test_latent_release_is_the_mechanism_with_its_epsilon():
    latents, labels = 10 * torch.ones(1, 4, 8, 8), torch.ones(1, 1, 16, 16)
    sent, eps = latent_release(latents, labels, clip_norm=2.0, noise_multiplier=5.0,
                               generator=torch.Generator().manual_seed(3))  # fmt: skip
    again, _ = latent_release(latents, labels, clip_norm=2.0, noise_multiplier=5.0,
                              generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(sent, again) and sent.shape == latents.shape
    assert float((sent - latents * 2.0 / latents.norm()).std()) == pytest.approx(10.0, rel=0.2)  # sigma C
    assert eps == pytest.approx(PrivacyLedger().epsilon_with([latent_event(5.0, 1)], 1e-5))


def test_mask_dice_for_regions_and_classes():
    true = torch.zeros(1, 8, 8, dtype=torch.long)
    true[0, :4] = 1
    assert mask_dice(true[None].float(), true, 1, "sigmoid") == 1.0
    assert mask_dice(1 - true[None].float(), true, 1, "sigmoid") == 0.0
    classes = true.clone()
    classes[0, 6:] = 2
    pred = classes.clone()
    pred[0, 6:] = 1  # class 2 predicted as 1: class 1 Dice 2*32/(48+32), class 2 Dice 0
    assert mask_dice(pred[None], classes, 3, "softmax") == pytest.approx((64 / 80 + 0.0) / 2)
    assert mask_dice(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8), 1, "sigmoid") == 1.0


def test_markdown_has_every_row_and_reads_the_numbers(rows):
    text = leakage_markdown(rows)
    for label in ("FedAvg update", "cut 1 (Eq. 2), clean", "block 2's output alone (Eq. 2), clean",
                  "cut 1 (Eq. 2), mechanism eps", "block 2's output alone (Eq. 2), mechanism eps"):  # fmt: skip
        assert sum(label in line for line in text.splitlines() if line.startswith("|")) == 1
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + 5
    base = {"what": "latents", "latent_mechanism": False, "epsilon": None, "victim": 0, "dice": None}
    update = {**base, "method": "fedavg", "what": "update", "cut_block": None, "psnr": 10.0, "dice": 0.5}
    latent = {**base, "method": "fedreplay", "cut_block": 1, "psnr": 20.0}
    high = leakage_markdown([{**update, "ssim": 0.2}, {**latent, "ssim": 0.9}])
    low = leakage_markdown([{**update, "ssim": 0.9}, {**latent, "ssim": 0.2}])
    assert "leaks more than FedAvg's update" in high and "leaks less than FedAvg's update" in low
    assert "about as little as" in leakage_markdown([{**update, "ssim": 0.02}, {**latent, "ssim": 0.05}])


def test_bad_victims_cuts_and_sigmas_are_refused():
    net, victim = _net(), _victim()
    with pytest.raises(ValueError, match="at least one"):
        leakage_rows(net, [])
    with pytest.raises(ValueError, match="one grid"):
        leakage_rows(net, [(victim[0], victim[1][:, :16])])
    with pytest.raises(ValueError, match="only 3"):
        leakage_rows(net, [victim], cut_blocks=(4,))
    with pytest.raises(ValueError, match="sigmas"):
        leakage_rows(net, [victim], latent_noise=(0.0,))
    with pytest.raises(ValueError, match="at least one row"):
        leakage_markdown([])
