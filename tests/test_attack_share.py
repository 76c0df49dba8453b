"""``monai-fedpriv attack --share``: the attack on sparse (selectively shared / SVT) updates, and the report tables."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from monai_fedpriv.attacks import ThreatModel, build_victim_update, reconstruct, score_reconstruction
from monai_fedpriv.attacks.cli import attack_main, build_share_filter, load_victim
from monai_fedpriv.attacks.report import attack_table, latent_table, noise_break
from monai_fedpriv.errors import DataError, PrivacyConfigError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.filters import PercentileSharing
from tests.test_attack_cli import NETWORK


def _phantom(size: int = 24) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    r = np.sqrt(xx**2 + (1.2 * yy) ** 2)
    return ((r < 0.85) * 0.5 + (r < 0.5) * 0.4 + 0.1 * np.sin(7 * xx) * (r < 0.85)).astype(np.float32)


def _label(size: int = 24) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    r = np.sqrt(xx**2 + (1.2 * yy) ** 2)
    return ((r < 0.85).astype(np.int16) + (r < 0.5)).astype(np.float32)


@pytest.fixture()
def bundle(tmp_path):
    (tmp_path / "bundle" / "configs").mkdir(parents=True)
    config = {"network_def": NETWORK, "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True}}
    (tmp_path / "bundle" / "configs" / "train.json").write_text(json.dumps(config))
    nib.save(nib.Nifti1Image(_phantom(), np.eye(4)), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(_label(), np.eye(4)), str(tmp_path / "lbl.nii.gz"))
    return tmp_path


def _run(bundle, name, *extra):
    argv = [str(bundle / "bundle"), "--victim", str(bundle / "img.nii.gz"),
            "--victim-label", str(bundle / "lbl.nii.gz"), "--size", "24", "--restarts", "1", "--threads", "1",
            "--iterations", "120", "--output", str(bundle / name), *extra]  # fmt: skip
    assert attack_main(argv) == 0
    return json.loads((bundle / name / "attack.json").read_text())


def test_cli_share_percentile_leaks_and_svt_does_not(bundle):
    torch.manual_seed(0)
    shared = _run(bundle, "pct", "--share", "percentile", "--share-fraction", "0.2")
    torch.manual_seed(0)
    svt = _run(bundle, "svt", "--share", "svt")
    assert shared["mask_source"] == "label" and shared["share"] == "percentile"
    assert shared["fraction_shared"] == pytest.approx(0.2, abs=1e-3) and shared["epsilon"] is None
    assert svt["share"] == "svt" and svt["epsilon"] == pytest.approx(2.0) and svt["fraction_shared"] <= 0.1 + 1e-3
    # percentile sharing is no privacy: the attack on 20% of the coordinates still leaks (on this phantom the label
    # is nearly the image, so the constant baseline is the bar), the attack on SVT's noisy coordinates does not
    assert shared["ssim"] > shared["baselines"]["constant"]["ssim"] + 0.2 and shared["ssim"] > svt["ssim"] + 0.3
    assert svt["ssim"] < svt["baselines"]["constant"]["ssim"] + 0.05


def test_sparse_update_is_matched_on_shared_coordinates_only():
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (4, 8, 16), (2, 2), norm="INSTANCE", num_res_units=1)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    image = torch.from_numpy(_phantom())[None]
    label = torch.from_numpy(_label()).long()[None]
    delta = build_victim_update(net, loss, image[None], label[None])
    sparse = PercentileSharing(0.3)(ModelUpdate("s", 1, delta, n_samples=1, local_steps=1))
    garbage = {k: torch.where(m, v, torch.randn_like(v) * 1e3) for (k, v), m in zip(sparse.delta.items(),
               sparse.masks.values(), strict=True)}  # fmt: skip
    polluted = ModelUpdate("s", 1, garbage, n_samples=1, local_steps=1, masks=sparse.masks)
    tm = ThreatModel((24, 24), 3)
    kw = {"iterations": 60, "restarts": 1, "num_threads": 1}
    a, sa = reconstruct(sparse, net, tm, loss, mask=label[None], generator=torch.Generator().manual_seed(1), **kw)
    b, sb = reconstruct(polluted, net, tm, loss, mask=label[None], generator=torch.Generator().manual_seed(1), **kw)
    assert torch.allclose(a, b) and sa["matching_loss"] == pytest.approx(sb["matching_loss"])
    scores = score_reconstruction(a[0], image, label)
    assert scores["ssim"] > scores["baselines"]["constant"]["ssim"]


def test_share_filter_and_victim_validation(bundle):
    assert build_share_filter("none") is None
    assert isinstance(build_share_filter("percentile", fraction=0.1), PercentileSharing)
    with pytest.raises(PrivacyConfigError):
        build_share_filter("svt", fraction=0.1, epsilon_select=-1.0)
    with pytest.raises(ValueError, match="share"):
        build_share_filter("random")
    image, label, source = load_victim(bundle / "img.nii.gz", bundle / "lbl.nii.gz", 3, size=24)
    assert source == "label" and set(label.unique().tolist()) == {0, 1, 2} and float(image.max()) == 1.0
    with pytest.raises(DataError, match="outside"):
        load_victim(bundle / "img.nii.gz", bundle / "lbl.nii.gz", 2, size=24)
    assert load_victim(bundle / "img.nii.gz", None, 3, size=24)[2] == "intensity"


def test_report_tables_and_noise_break():
    base = {"constant": {"psnr": 10.0, "ssim": 0.1}, "mask": {"psnr": 12.0, "ssim": 0.3}}
    sweep = [
        {"noise_multiplier": 0.1, "psnr": 11.0, "ssim": 0.05, "baselines": base},
        {"noise_multiplier": 0.01, "psnr": 15.0, "ssim": 0.5, "baselines": base},
        {"noise_multiplier": 0.03, "psnr": 13.0, "ssim": 0.2, "baselines": base},
    ]
    assert noise_break(sweep) == {"mask": 0.03, "constant": 0.1}
    assert noise_break(sweep[1:2]) == {"mask": None, "constant": None}
    # higher SSIM but lower PSNR than the constant image: not beaten, as in the verdict column
    sweep[2] = {**sweep[2], "psnr": 9.0}
    assert noise_break(sweep) == {"mask": 0.03, "constant": 0.03}
    row = {"case": "none", "victim": "v", "epsilon": None, "psnr": 20.0, "ssim": 0.7, "ncc": 0.9, "baselines": base,
           "verdict": "leaks"}  # fmt: skip
    assert "| none | v | inf | 20.00 | 0.700 |" in attack_table([row])
    lat = [{"depth": d, "latent_shape": [4, 8, 8], "psnr": 20.0 - d, "ssim": 0.5, "ncc": 0.9} for d in (1, 2, 1)]
    table = latent_table(lat)
    assert "| UNet blocks 1..1 | 4x8x8 | 19.00 | 0.500 | 0.900 | 2 |" in table and "1..2" in table
