"""``monai-fedpriv attack`` on a tiny bundle, and the pass-through evaluator filter on a tiny Ignite run."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from PIL import Image

from monai_fedpriv.attacks import ThreatModel, intensity_label, load_victim_image
from monai_fedpriv.attacks.cli import attack_main, load_bundle_model, release_epsilon
from monai_fedpriv.cli import main
from monai_fedpriv.errors import BundleError, DataError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.handlers.attack_evaluator import ReconstructionAttackEvaluator

NETWORK = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "norm": "INSTANCE",
    "num_res_units": 1,
}
KEYS = {"psnr", "ssim", "ncc", "baselines", "verdict", "epsilon", "iterations", "seconds"}


def _phantom(size: int = 40) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    r = np.sqrt(xx**2 + (1.2 * yy) ** 2)
    return (400 * (r < 0.85) + 400 * (r < 0.5) + 80 * np.sin(7 * xx) * (r < 0.85)).astype(np.float32)


@pytest.fixture()
def bundle(tmp_path):
    (tmp_path / "bundle" / "configs").mkdir(parents=True)
    config = {
        "network_def": NETWORK,
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "train": {"preprocessing": [{"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}]},
    }
    (tmp_path / "bundle" / "configs" / "train.json").write_text(json.dumps(config))
    volume = np.stack([_phantom() * (0.5 + k / 10) for k in range(5)], axis=-1)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "victim.nii.gz"))
    Image.fromarray((_phantom() / 880 * 255).clip(0, 255).astype(np.uint8)).save(tmp_path / "victim.png")
    return tmp_path


def _run(bundle, out, *extra):
    argv = [str(bundle / "bundle"), "--victim", str(bundle / "victim.nii.gz"), "--size", "24", "--restarts", "2",
            "--threads", "1", "--output", str(out), *extra]  # fmt: skip
    assert attack_main(argv) == 0
    record = json.loads((out / "attack.json").read_text())
    assert KEYS <= set(record) and (out / "attack.png").stat().st_size > 0
    assert set(record["baselines"]) == {"constant", "mask"}
    assert all(set(b) == {"psnr", "ssim"} for b in record["baselines"].values())
    return record


def test_cli_no_privacy_beats_high_privacy(bundle):
    clear = _run(bundle, bundle / "none", "--iterations", "120")
    high = _run(bundle, bundle / "high", "--iterations", "120", "--privacy", "high")
    assert clear["epsilon"] is None and clear["noise_multiplier"] == 0.0 and clear["max_grad_norm"] is None
    assert high["epsilon"] == pytest.approx(release_epsilon(1.5, 1)) and high["max_grad_norm"] == 0.1
    assert 0 < high["epsilon"] < 10
    assert clear["ssim"] > high["ssim"] + 0.2
    assert clear["ssim"] > clear["baselines"]["constant"]["ssim"]
    assert clear["update_norm"] > 0 and clear["iterations"] == 120 and clear["mask_known"] is True


def test_cli_unknown_mask_multi_step_and_png_victim(bundle):
    record = _run(bundle, bundle / "unknown", "--iterations", "5", "--mask", "unknown", "--local-steps", "2")
    assert record["mask_known"] is False and record["local_steps"] == 2
    argv = [str(bundle / "bundle"), "--victim", str(bundle / "victim.png"), "--size", "32", "--iterations", "2",
            "--restarts", "1", "--output", str(bundle / "png")]  # fmt: skip
    assert attack_main(argv) == 0


def test_loaders_and_bundle_errors(bundle, tmp_path):
    net, loss, pixel_range = load_bundle_model(bundle / "bundle")
    assert isinstance(net, UNet) and isinstance(loss, DiceCELoss) and pixel_range == (0.0, 1.0)
    img = load_victim_image(bundle / "victim.nii.gz", slice_index=1, size=32)
    assert img.shape == (1, 32, 32) and float(img.min()) == 0.0 and float(img.max()) == 1.0
    with pytest.raises(DataError, match="slice_index"):
        load_victim_image(bundle / "victim.nii.gz", slice_index=9)
    with pytest.raises(DataError, match="does not exist"):
        load_victim_image(tmp_path / "missing.nii.gz")
    (tmp_path / "empty" / "configs").mkdir(parents=True)
    (tmp_path / "empty" / "configs" / "train.json").write_text(json.dumps({"loss": {"_target_": "DiceLoss"}}))
    with pytest.raises(BundleError, match="network_def"):
        load_bundle_model(tmp_path / "empty")
    with pytest.raises(BundleError, match="train.json"):
        load_bundle_model(tmp_path / "nowhere")


def test_evaluator_filter_attacks_what_is_sent_and_passes_it_through(tmp_path):
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (4, 8, 16), (2, 2), norm="INSTANCE", num_res_units=1)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    image = torch.from_numpy(_phantom(32) / 880).clamp(0, 1)[None, None]
    batch = {"image": image, "label": intensity_label(image[0], 3)[None]}
    tm = ThreatModel((32, 32), 3, lr=0.1)
    evaluator = ReconstructionAttackEvaluator(
        [1], tmp_path / "attack", tm, net, loss, iterations=120, restarts=2, num_threads=1
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, b):
        optimizer.zero_grad()
        loss(net(b["image"]), b["label"]).backward()
        optimizer.step()

    trainer = Engine(step)
    evaluator.attach(trainer)
    evaluator.attach(trainer)  # attaching twice registers once
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainer.run([batch], max_epochs=1)
    delta = {n: p.detach() - start[n] for n, p in net.named_parameters()}
    update = ModelUpdate("site-1", 1, delta, n_samples=1, local_steps=1, meta={"privacy": {"epsilon": None}})
    passed = evaluator(update)  # a copy, as every filter of a chain returns (FilterChain refuses the input object)
    assert passed is not update and passed.meta == update.meta
    assert all(torch.equal(passed.delta[k], v) for k, v in update.delta.items())
    result = evaluator.results[1]
    assert result["ssim"] > 0.3 and result["ssim"] > result["images"][0]["baselines"]["constant"]["ssim"]
    written = json.loads((tmp_path / "attack" / "round_1" / "attack.json").read_text())
    assert written["round"] == 1 and (tmp_path / "attack" / "round_1" / "attack.png").exists()
    skipped = ModelUpdate("site-1", 2, delta, n_samples=1, local_steps=1)
    assert evaluator(skipped) is not skipped and 2 not in evaluator.results
    from monai_fedpriv.privacy.filters import FilterChain

    assert FilterChain([evaluator])(skipped).round == 2  # the audit sits in a site's one filter chain
    restored = ReconstructionAttackEvaluator([1], tmp_path, tm, net, loss)
    restored.load_state_dict(evaluator.state_dict())
    assert restored.results[1]["ssim"] == pytest.approx(result["ssim"])
    with pytest.raises(ValueError):
        ReconstructionAttackEvaluator([0], tmp_path, tm, net, loss)


def test_checkpoint_of_a_dp_trained_batchnorm_model_loads_and_bad_ones_are_named(bundle, tmp_path, capsys):
    from monai_fedpriv.cli import main
    from monai_fedpriv.privacy.model_prep import prepare_for_dp

    config = json.loads((bundle / "bundle" / "configs" / "train.json").read_text())
    config["network_def"] = {**NETWORK, "norm": "BATCH"}
    (bundle / "bundle" / "configs" / "train.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    trained, _ = prepare_for_dp(
        UNet(2, 1, 3, (4, 8, 16), (2, 2), norm="BATCH", num_res_units=1), torch.rand(2, 1, 24, 24)
    )
    torch.save({"_module." + k: v for k, v in trained.state_dict().items()}, tmp_path / "global.pt")
    record = _run(
        bundle, tmp_path / "ok", "--iterations", "5", "--restarts", "1", "--checkpoint", str(tmp_path / "global.pt")
    )
    assert 0.0 <= record["ssim"] <= 1.0
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    argv = ["attack", str(bundle / "bundle"), "--victim", str(bundle / "victim.nii.gz"), "--size", "24",
            "--checkpoint", str(tmp_path / "broken.pt"), "--output", str(tmp_path / "bad")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --checkpoint")


def test_a_dp_checkpoint_loads_with_the_victims_shape_into_a_network_without_in_channels(tmp_path):
    from monai_fedpriv.attacks.audit import load_checkpoint
    from monai_fedpriv.fl.weights import exchangeable_state
    from monai_fedpriv.networks import build_network
    from monai_fedpriv.privacy.model_prep import prepare_for_dp

    example = torch.rand(2, 3, 32, 32)  # 3 slices as channels; MoNet has no in_channels attribute
    trained, _ = prepare_for_dp(build_network("monet", 3, 1), example)
    torch.save(trained.state_dict(), tmp_path / "global.pt")
    loaded = load_checkpoint(build_network("monet", 3, 1), tmp_path / "global.pt", example)
    want, got = exchangeable_state(trained), exchangeable_state(loaded)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_an_unknown_output_convention_is_named_not_guessed(tmp_path):
    from monai_fedpriv.attacks.audit import bundle_activation
    from monai_fedpriv.errors import BundleError

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.json").write_text(json.dumps({"eval_activation": "sigmoid"}))
    assert bundle_activation(tmp_path) == "sigmoid"
    (tmp_path / "configs" / "train.json").write_text(json.dumps({"eval_activation": "relu"}))
    with pytest.raises(BundleError, match="eval_activation"):
        bundle_activation(tmp_path)


def test_a_victim_and_label_in_any_readable_format_are_read_once_and_checked_on_one_grid(tmp_path, monkeypatch):
    import nibabel as nib
    import numpy as np

    import monai_fedpriv.attacks.victim as victim

    rng = np.random.default_rng(0)
    nib.save(nib.MGHImage(rng.random((32, 32, 3)).astype(np.float32), np.eye(4)), tmp_path / "v.mgz")
    nib.save(nib.MGHImage((rng.random((32, 32, 3)) > 0.5).astype(np.int32), np.eye(4)), tmp_path / "l.mgz")
    reads: list[str] = []
    real = victim._read_volume
    monkeypatch.setattr(victim, "_read_volume", lambda p: reads.append(p.name) or real(p))
    image, label, source = victim.load_victim(tmp_path / "v.mgz", tmp_path / "l.mgz", 2, size=16)
    assert image.shape == label.shape == (1, 16, 16) and source == "label" and sorted(reads) == ["l.mgz", "v.mgz"]
    nib.save(nib.MGHImage(np.zeros((30, 32, 3), dtype=np.int32), np.eye(4)), tmp_path / "other.mgz")
    with pytest.raises(DataError, match="one grid"):
        victim.load_victim(tmp_path / "v.mgz", tmp_path / "other.mgz", 2, size=16)


def test_cli_puts_fedreplays_latents_beside_the_update_in_attack_json(bundle, capsys):
    record = _run(bundle, bundle / "table", "--iterations", "150", "--latent-cuts", "1,2",
                  "--latent-noise-multiplier", "2")  # fmt: skip
    rows = record["leakage"]
    assert [(r["method"], r["what"], r["cut_block"], r["latent_mechanism"]) for r in rows] == [
        ("fedavg", "update", None, False), ("fedreplay", "latents", 1, False), ("fedreplay", "latents", 1, True),
        ("fedreplay", "latents", 2, False), ("fedreplay", "latents", 2, True)]  # fmt: skip
    assert rows[0]["ssim"] == record["ssim"] and rows[0]["psnr"] == record["psnr"]
    assert all(r["epsilon"] > 0 for r in rows if r["latent_mechanism"])
    clean, noised = rows[1], rows[2]
    assert clean["ssim"] > noised["ssim"] + 0.2  # the mechanism hides what one block's latents give back
    argv = [str(bundle / "bundle"), "--victim", str(bundle / "victim.nii.gz"), "--output", str(bundle / "x")]
    assert main(["attack", *argv, "--latent-cuts", "0"]) == 2
    assert "--latent-cuts" in capsys.readouterr().err
