"""Data set description and adapted MONAI chains, run for real on synthetic MSD / BraTS folders."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNet
from monai.transforms import Compose

from monai_fedpriv.data import load_brats_datalist, load_msd_datalist
from monai_fedpriv.data.adapt import (
    BRATS_REGIONS,
    AdaptTarget,
    adapted_transforms,
    contiguous_label_mapping,
    inferer_config,
    network_channels,
)
from monai_fedpriv.data.dataset_info import describe_dataset, detect_layout
from monai_fedpriv.data.synthetic import write_brats_folder, write_msd_task
from monai_fedpriv.errors import DataError

T01 = ("FLAIR", "T1w", "t1gd", "T2w")


def _build(chain: list[dict]):
    """What a bundle does with the override: parse the (JSON round-tripped) dicts, compose them."""
    return ConfigParser({"chain": json.loads(json.dumps(chain))}).get_parsed_content("chain")


def _run(chains: dict, parts: tuple[str, ...], case: dict, seed: int = 0):
    compose = Compose(_build([t for p in parts for t in chains[p]]))
    compose.set_random_state(seed=seed)
    return compose(dict(case))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    return {
        "mr": write_msd_task(root / "mr", 2, seed=1),
        "mr_lps": write_msd_task(root / "mr_lps", 2, seed=1, orientation="LPS"),
        "ct": write_msd_task(root / "ct", 2, modalities=("CT",), labels={0: "bg", 1: "organ", 2: "tumour"}),
        "t01": write_msd_task(root / "t01", 1, modalities=T01, multimodal_4d=True, orientation="LPS"),
        "mixed": write_msd_task(root / "mixed", 1, modalities=("CT", "MR")),
        "flat": write_msd_task(root / "flat", 2, shape=(20, 20), spacing=(1.0, 1.0)),
        "brats": write_brats_folder(root / "brats", 2),
        "brats23": write_brats_folder(root / "brats23", 1, naming="2023"),
    }


def test_describe_msd_and_brats(data):
    info = describe_dataset(data["t01"])
    assert (info.layout, info.modalities, info.n_channels, info.channel_layout) == ("msd", T01, 4, "last")
    assert (info.spatial_dims, info.n_classes, info.n_cases, info.has_validation) == (3, 2, 1, False)
    mixed = describe_dataset(data["mixed"])
    assert mixed.channel_layout == "files" and mixed.modality_kinds == ("ct", "mr")
    assert describe_dataset(data["flat"]).spatial_dims == 2
    brats = describe_dataset(data["brats"])
    assert brats.layout == "brats" and brats.modalities == ("t1", "t1ce", "t2", "flair") and brats.naming == "2020"
    assert (
        sorted(brats.labels) == [0, 1, 2, 4]
        and brats.n_classes == 4
        and brats.institutions == {"CBICA": 1, "TCIA_08": 1}
    )
    b23 = describe_dataset(data["brats23"], layout="brats")
    assert b23.modalities == ("t1n", "t1c", "t2w", "t2f") and sorted(b23.labels) == [0, 1, 2, 3]
    summary = brats.summary()
    assert json.loads(json.dumps(summary)) == summary and summary["labels"]["4"] == "enhancing tumour"


def test_detect_layout_errors_name_the_folder(data, tmp_path):
    assert detect_layout(data["ct"]) == "msd" and detect_layout(data["brats"]) == "brats"
    (tmp_path / "case1").mkdir()
    (tmp_path / "case1" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=str(tmp_path)):
        detect_layout(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(tmp_path / "missing")
    with pytest.raises(DataError, match="unknown data layout"):
        describe_dataset(data["ct"], layout="nnunet")


def test_declared_modalities_must_match_the_image(data, tmp_path):
    root = write_msd_task(tmp_path, 1)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "T2", "1": "ADC"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"declares 2 modalities.*synth_001\.nii\.gz.*\(24, 24, 12\)"):
        describe_dataset(root)


def test_chains_are_json_and_pick_the_right_transforms(data):
    ct = describe_dataset(data["ct"])
    chains = adapted_transforms(ct, AdaptTarget(2, (16, 16), spacing=(1.5, 1.5, None)))
    assert json.loads(json.dumps(chains)) == chains
    names = [t["_target_"] for t in chains["deterministic"]]
    assert names[:2] == ["LoadImaged", "EnsureChannelFirstd"] and "ScaleIntensityRanged" in names
    assert [t for t in chains["deterministic"] if t["_target_"] == "Spacingd"][0]["pixdim"] == [1.5, 1.5, -1.0]
    crop = [t for t in chains["random"] if t["_target_"] == "RandCropByPosNegLabeld"][0]
    assert crop["spatial_size"] == [16, 16, 1] and crop["image_threshold"] == 0.0
    assert chains["random"][2]["_target_"] == "SqueezeDimd"
    mr = adapted_transforms(describe_dataset(data["mr"]), AdaptTarget(3, (8, 8, 8)))
    assert "NormalizeIntensityd" in [t["_target_"] for t in mr["deterministic"]]
    assert "SqueezeDimd" not in [t["_target_"] for t in mr["random"]]


def test_2d_network_on_3d_mr_gets_axial_slices(data):
    info = describe_dataset(data["mr"])
    case = load_msd_datalist(data["mr"])[0]
    target = AdaptTarget(2, (16, 16), samples_per_volume=3, pos=1.0, neg=0.0, augment=False)
    chains = adapted_transforms(info, target)
    volume = _run(chains, ("deterministic",), case)
    label = volume["label"][0]
    assert volume["image"].shape == (1, 24, 24, 12) and label.dtype == torch.uint8
    assert (label.sum(dim=(0, 1)) == 0).float().mean() > 0.3  # many slices hold no lesion
    windows = volume["image"][0].unfold(0, 16, 1).unfold(1, 16, 1)  # (9, 9, 12, 16, 16): every axial window
    for seed in range(3):
        samples = _run(chains, ("deterministic", "random", "final"), case, seed=seed)
        assert len(samples) == 3
        for s in samples:
            assert s["image"].shape == s["label"].shape == (1, 16, 16) and s["image"].dtype == torch.float32
            assert s["label"].sum() > 0  # foreground-centred (pos=1, neg=0)
            assert (windows == s["image"][0]).flatten(3).all(-1).any()  # an axial slice of the volume
    small = _run(adapted_transforms(info, AdaptTarget(2, (32, 32), augment=False)), ("deterministic", "random"), case)
    assert small[0]["image"].shape == (1, 32, 32)  # padded first: patch larger than the 24x24 slices
    augmented = adapted_transforms(info, AdaptTarget(2, (16, 16)))
    a = _run(augmented, ("deterministic", "random", "final"), case, seed=7)
    b = _run(augmented, ("deterministic", "random", "final"), case, seed=7)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))  # seeded, no global RNG


def test_validation_volume_and_slice_inferer(data):
    torch.manual_seed(0)
    info = describe_dataset(data["mr"])
    case = load_msd_datalist(data["mr"])[0]
    target = AdaptTarget(2, (32, 32), divisible_by=16)
    chains = adapted_transforms(info, target)
    val = _run(chains, ("validate",), case)
    assert val["image"].shape == val["label"].shape == (1, 32, 32, 12)  # in-plane padded to 32, slices kept
    inferer = _build([inferer_config(info, target)])[0]
    ch = network_channels(info, target)
    net = UNet(2, ch["in_channels"], ch["out_channels"], channels=(4, 8), strides=(2,)).eval()
    with torch.no_grad():
        pred = inferer(val["image"][None], net)
        assert pred.shape == (1, 2, 32, 32, 12)
        for z in (0, 5, 11):  # slices along the last (axial) axis, each through the 2D network
            assert torch.allclose(pred[..., z], net(val["image"][None][..., z]), atol=1e-5)


def test_ct_window_and_mr_zscore(data):
    ct_case = load_msd_datalist(data["ct"])[0]
    ct = _run(adapted_transforms(describe_dataset(data["ct"]), AdaptTarget(2, (16, 16))), ("deterministic",), ct_case)
    raw = np.asarray(nib.load(ct_case["image"]).dataobj)
    assert np.allclose(ct["image"][0].numpy(), np.clip((raw + 175.0) / 425.0, 0, 1), atol=1e-5)
    assert ct["image"].min() == 0.0 and ct["image"].max() <= 1.0
    case = load_msd_datalist(data["t01"])[0]
    out = _run(adapted_transforms(describe_dataset(data["t01"]), AdaptTarget(3, (8, 8, 8))), ("deterministic",), case)
    img = out["image"]
    assert img.shape == (4, 24, 24, 12)  # 4D file, channels last -> channels first
    raw = np.asarray(nib.load(case["image"]).dataobj)[::-1, ::-1]  # LPS file -> RAS
    for c in range(4):
        body = raw[..., c] > 0
        assert torch.equal(img[c] != 0, torch.from_numpy(body.copy()))  # background stays 0
        assert abs(float(img[c][img[c] != 0].mean())) < 1e-4 and abs(float(img[c][img[c] != 0].std()) - 1) < 1e-2
        z = (raw[..., c] - raw[..., c][body].mean()) / raw[..., c][body].std()
        assert np.allclose(img[c].numpy()[body], z[body], atol=1e-4)  # channel c stays channel c


def test_mixed_modalities_are_normalised_per_channel(data):
    case = load_msd_datalist(data["mixed"])[0]
    out = _run(adapted_transforms(describe_dataset(data["mixed"]), AdaptTarget(2, (16, 16))), ("deterministic",), case)
    assert set(out) >= {"image", "label"} and not any(k.startswith("image_") for k in out)
    ct_raw, mr_raw = (np.asarray(nib.load(p).dataobj) for p in case["image"])
    assert np.allclose(out["image"][0].numpy(), np.clip((ct_raw + 175.0) / 425.0, 0, 1), atol=1e-5)
    body = mr_raw > 0
    assert np.allclose(
        out["image"][1].numpy()[body], (mr_raw[body] - mr_raw[body].mean()) / mr_raw[body].std(), atol=1e-4
    )


def test_lps_and_anisotropic_volumes_are_reoriented_and_resampled(data, tmp_path):
    info = describe_dataset(data["mr"])
    target = AdaptTarget(2, (16, 16), spacing=(1.5, 1.5, 1.5))
    ras = _run(adapted_transforms(info, target), ("deterministic",), load_msd_datalist(data["mr"])[0])
    lps = _run(adapted_transforms(info, target), ("deterministic",), load_msd_datalist(data["mr_lps"])[0])
    assert ras["image"].shape == (1, 24, 24, 23)  # 12 slices of 3 mm -> 1.5 mm
    assert torch.equal(ras["label"], lps["label"]) and torch.allclose(ras["image"], lps["image"], atol=1e-5)
    assert np.allclose(ras["image"].affine, lps["image"].affine)
    raw = torch.from_numpy(np.asarray(nib.load(load_msd_datalist(data["mr"])[0]["label"]).dataobj).copy())
    lab = ras["label"][0]
    assert torch.equal(lab[..., ::2], raw)  # the 1.5 mm grid passes through every 3 mm slice
    for k in range(11):  # nearest neighbour in between: a whole copy of the slice below or above, never a blend
        assert torch.equal(lab[..., 2 * k + 1], raw[..., k]) or torch.equal(lab[..., 2 * k + 1], raw[..., k + 1])
    # one bright voxel in an LPS, 1 x 1 x 3 mm volume lands at its world position after RAS + 1.5 mm through-plane
    arr = np.full((10, 12, 6), 10.0, np.float32)
    arr[2, 3, 4] = 1000.0
    affine = np.diag([-1.0, -1.0, 3.0, 1.0])
    affine[:3, 3] = [20.0, 30.0, -5.0]
    nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / "img.nii.gz"))
    lab = np.zeros(arr.shape, np.uint8)
    lab[2, 3, 4] = 2
    nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / "lab.nii.gz"))
    case = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    out = _run(adapted_transforms(info, AdaptTarget(2, (8, 8), spacing=(None, None, 1.5))), ("deterministic",), case)
    img = out["image"][0]
    assert img.shape == (10, 12, 11)
    peak = np.unravel_index(int(img.argmax()), img.shape)
    assert peak == (7, 8, 8)  # x, y flipped; z index 4 at 3 mm -> 8 at 1.5 mm
    assert out["label"][0][peak] == 2 and set(out["label"].unique().tolist()) == {0, 2}  # nearest: no blended 1
    background, top = float(img[0, 0, 0]), float(img[peak])
    for z in (7, 9):  # bilinear: half-way between the bright voxel and its neighbours
        assert abs(float(img[7, 8, z]) - (background + top) / 2) < 1e-3 * (top - background)
    world = out["image"].affine.numpy() @ np.array([*peak, 1.0])
    assert np.allclose(world, affine @ np.array([2, 3, 4, 1.0]))


def test_brats_for_a_3d_network(data):
    info = describe_dataset(data["brats"])
    case = load_brats_datalist(data["brats"])[0]
    mapping = contiguous_label_mapping(info)
    assert mapping == {4: 3}
    target = AdaptTarget(3, (16, 16, 8), label_mapping=mapping, samples_per_volume=2)
    assert network_channels(info, target) == {"in_channels": 4, "out_channels": 4}
    assert network_channels(info, AdaptTarget(3, (16, 16, 8))) == {"in_channels": 4, "out_channels": 5}
    chains = adapted_transforms(info, target)
    out = _run(chains, ("deterministic",), case)
    raw = np.asarray(nib.load(case["label"]).dataobj)[::-1, ::-1].copy()  # LPS -> RAS
    assert out["image"].shape == (4, 24, 24, 16)  # 4 modality files -> 4 channels
    assert torch.equal(out["label"][0], torch.from_numpy(np.where(raw == 4, 3, raw)).to(torch.uint8))
    samples = _run(chains, ("deterministic", "random", "final"), case)
    assert [tuple(s["image"].shape) for s in samples] == [(4, 16, 16, 8)] * 2
    assert inferer_config(info, target)["_target_"] == "SlidingWindowInferer"
    regions = adapted_transforms(info, AdaptTarget(3, (16, 16, 8), regions=BRATS_REGIONS))
    lab = _run(regions, ("deterministic",), case)["label"].bool()
    assert (
        lab.shape == (3, 24, 24, 16)
        and network_channels(info, AdaptTarget(3, (8,) * 3, regions=BRATS_REGIONS))["out_channels"] == 3
    )
    tc, wt, et = lab
    assert torch.equal(wt, torch.from_numpy(raw > 0)) and torch.equal(et, torch.from_numpy(raw == 4))
    assert bool((et <= tc).all() and (tc <= wt).all()) and bool(et.any())
    with pytest.raises(DataError, match=r"label values \[4\]"):
        adapted_transforms(info, AdaptTarget(3, (8,) * 3, label_mapping={4: 3}, regions=BRATS_REGIONS))


def test_2d_data_and_bad_targets(data):
    info = describe_dataset(data["flat"])
    case = load_msd_datalist(data["flat"])[0]
    target = AdaptTarget(2, (16, 16), divisible_by=8)
    samples = _run(adapted_transforms(info, target), ("deterministic", "random", "final"), case)
    assert samples[0]["image"].shape == (1, 16, 16)
    assert _run(adapted_transforms(info, target), ("validate",), case)["image"].shape == (1, 24, 24)
    assert inferer_config(info, target) == {"_target_": "SimpleInferer"}
    with pytest.raises(DataError, match="3D network"):
        adapted_transforms(info, AdaptTarget(3, (8, 8, 8)))
    with pytest.raises(ValueError, match="patch_size"):
        AdaptTarget(2, (16, 16, 16))
    with pytest.raises(ValueError, match="spatial_dims"):
        AdaptTarget(4, (1, 1, 1, 1))
