"""The seeds' tasks as bundles (liver_ct_2d, brain_tumour_3d, brain_tumour_2d_flair): model-zoo metadata, MONAI's
own network check, one federated round with DP-SGD on generated data of each layout, per-region Dice for sigmoid
outputs, three-slice inputs, inference back on the input grid, and the leakage audit on region labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import verify_net_in_out

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
from monai_fedpriv.cli import main
from monai_fedpriv.data import task
from monai_fedpriv.data.synthetic import write_brats_folder, write_msd_task
from monai_fedpriv.data.transforms import ContextSliceInferer, SelectChannelsd, SlicesToChannelsd
from monai_fedpriv.errors import BundleError, DataError
from monai_fedpriv.fl.evaluation import DiceEvaluator, combine_scores
from monai_fedpriv.networks import build_network, count_parameters

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
TASK_BUNDLES = ("liver_ct_2d", "brain_tumour_3d", "brain_tumour_2d_flair")
ZOO_FIELDS = (
    "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
    "description", "authors", "copyright", "network_data_format",
)  # fmt: skip


@pytest.fixture(scope="module")
def liver_data(tmp_path_factory) -> Path:
    labels = {0: "background", 1: "liver", 2: "cancer"}
    return write_msd_task(tmp_path_factory.mktemp("liver") / "Task03_Liver", 6, shape=(24, 24, 6), modalities=("CT",),
                          labels=labels, institutions=("A", "B"), name="Liver")  # fmt: skip


@pytest.fixture(scope="module")
def brats_data(tmp_path_factory) -> Path:
    return write_brats_folder(tmp_path_factory.mktemp("brats") / "BraTS", 6, shape=(16, 16, 16),
                              institutions=("CBICA", "TCIA_08"))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- bundles
@pytest.mark.parametrize("name", [*TASK_BUNDLES, "brain_tissue_2d"])
def test_every_bundle_has_the_model_zoo_fields_and_passes_monai_network_check(name):
    configs = BUNDLES / name / "configs"
    meta = json.loads((configs / "metadata.json").read_text())
    missing = [f for f in ZOO_FIELDS if f not in meta]
    assert not missing, f"{name} metadata lacks {missing}"
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    assert {"image"} <= set(fmt["inputs"]) and {"pred"} <= set(fmt["outputs"])
    for config in ("train.json", "inference.json"):  # raises when the network does not map the declared shapes
        verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                          config_file=str(configs / config))  # fmt: skip
    for needed in ("evaluate.json", "inference.json"):
        assert (configs / needed).is_file()
    assert (BUNDLES / name / "docs" / "README.md").is_file()


def test_bundle_networks_are_the_seeds():
    assert count_parameters(build_network("segresnet", 4, 3, spatial_dims=3)) == 1_176_843  # seed 001: "about 1.2M"
    assert count_parameters(build_network("monet", 1, 1)) == 399_009  # the paper's MoNet, skips concatenated
    with pytest.raises(ValueError, match="2D network"):
        build_network("monet", 1, 1, spatial_dims=3)
    with pytest.raises(ValueError, match="network_name"):
        build_network("resnet50", 1, 1)


def test_a_task_bundle_without_data_says_how_to_point_it_at_data(tmp_path, capsys):
    assert main(["simulate", str(BUNDLES / "liver_ct_2d"), "--sites", "2", "--rounds", "1",
                 "--output", str(tmp_path)]) == 2  # fmt: skip
    assert "--data DIR" in capsys.readouterr().err
    with pytest.raises(BundleError, match="dataset_dir"):
        task.task_info(None)


# ---------------------------------------------------------------------------------------------------- transforms
def test_three_slices_as_channels_match_slice_wise_inference():
    volume = torch.randn(1, 2, 8, 8, 5)  # (B, C, H, W, D)
    net = torch.nn.Conv2d(6, 1, 3, padding=1)
    out = ContextSliceInferer(context=3, batch_size=2)(volume, net)
    assert out.shape == (1, 1, 8, 8, 5)
    for z in (0, 2, 4):  # slice z from slices z-1, z, z+1 (edges repeated), laid out as SlicesToChannelsd does
        around = [min(max(z + k, 0), 4) for k in (-1, 0, 1)]
        crop = {"image": volume[0][..., around], "label": torch.zeros(1, 8, 8, 3)}
        sample = SlicesToChannelsd()(crop)
        assert sample["image"].shape == (6, 8, 8) and sample["label"].shape == (1, 8, 8)
        torch.testing.assert_close(out[0, ..., z], net(sample["image"][None])[0])
    with pytest.raises(ValueError, match="odd"):
        SlicesToChannelsd()({"image": torch.zeros(1, 4, 4, 2)})
    selected = SelectChannelsd("image", [3])({"image": torch.arange(4.0)[:, None, None].expand(4, 2, 2)})
    assert selected["image"].shape == (1, 2, 2) and float(selected["image"][0, 0, 0]) == 3.0


def test_brats_regions_follow_each_label_convention(tmp_path, brats_data):
    assert task.brats_regions(task.task_info(brats_data)) == {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}
    new = task.task_info(write_brats_folder(tmp_path / "b23", 2, shape=(8, 8, 8), naming="2023"))
    assert task.brats_regions(new)["ET"] == (3,)
    labels = {0: "background", 1: "edema", 2: "non-enhancing", 3: "enhancing"}
    msd = task.task_info(write_msd_task(tmp_path / "Task01", 2, shape=(8, 8, 8), multimodal_4d=True,
                                        modalities=("FLAIR", "T1w", "t1gd", "T2w"), labels=labels))  # fmt: skip
    assert task.brats_regions(msd) == {"TC": (2, 3), "WT": (1, 2, 3), "ET": (3,)}
    # one channel order for the network whatever the release's order
    assert task.channel_indices(msd, ["t1", "t1ce", "t2", "flair"]) == (1, 2, 3, 0)
    assert task.channel_indices(new, ["flair"]) == (3,)
    with pytest.raises(DataError, match="no pd channel"):
        task.channel_indices(msd, ["pd"])


def test_sigmoid_regions_are_scored_per_region_not_by_argmax():
    label = torch.zeros(3, 4, 4)
    label[1, :2] = 1  # WT: top half
    label[0, :1] = 1  # TC inside it (overlap)
    perfect = (label * 20 - 10)[None]  # logits whose sigmoid thresholds to the label

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.logits.expand(x.shape[0], -1, -1, -1)

    data = [{"image": torch.zeros(1, 4, 4), "label": label}]
    ev = DiceEvaluator(data, lambda d: d, activation="sigmoid", class_names=["TC", "WT", "ET"])
    out = ev(Fixed(perfect))
    assert out["classes"] == ["TC", "WT", "ET"]
    assert out["dice_per_class"][:2] == [1.0, 1.0] and np.isnan(out["dice_per_class"][2])  # ET empty: not scored
    half = perfect.clone()
    half[0, 1] = -10  # WT predicted empty
    assert ev(Fixed(half))["dice_per_class"][1] == 0.0
    # argmax over overlapping regions would score TC/WT as competing classes: the softmax reading differs
    assert DiceEvaluator(data, lambda d: {**d, "label": d["label"][1:2]})(Fixed(perfect))["dice"] != 1.0
    with pytest.raises(ValueError, match="one label channel per region"):
        DiceEvaluator([{"image": torch.zeros(1, 4, 4), "label": label[:1]}], lambda d: d, activation="sigmoid")(
            Fixed(perfect)
        )
    merged = combine_scores({"a": {**out, "n_cases": 1}, "b": {**ev(Fixed(half)), "n_cases": 3}})
    assert merged["dice_per_class"]["WT"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------- federated
def _simulate(bundle: str, data: Path, out: Path, *extra: str) -> dict:
    argv = ["simulate", str(BUNDLES / bundle), "--data", str(data), "--sites", "2", "--rounds", "1",
            "--local-steps", "1", "--output", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_liver_bundle_trains_a_federated_dp_round_and_reports_the_region(liver_data, tmp_path):
    m = _simulate("liver_ct_2d", liver_data, tmp_path, "--override", "patch_size=[16,16]", "--override",
                  "batch_size=2", "--privacy", "medium", "--epsilon-budget", "100")  # fmt: skip
    assert m["final"]["rounds_completed"] == 1
    assert list(m["final"]["global_dice_per_class"]) == ["liver"]
    assert "sigmoid" in m["metric"]
    assert all(s["privacy"]["epsilon"] > 0 for s in m["rounds"][0]["sites"].values())
    assert (tmp_path / "report.md").read_text().count("| liver |") == 1


@pytest.mark.slow
def test_brain_tumour_3d_bundle_trains_by_institution_with_patient_level_dp(brats_data, tmp_path):
    m = _simulate("brain_tumour_3d", brats_data, tmp_path, "--override", "patch_size=[16,16,16]", "--privacy",
                  "medium", "--epsilon-budget", "100", "--no-report")  # fmt: skip
    assert list(m["final"]["global_dice_per_class"]) == ["TC", "WT", "ET"]
    assert m["partition"]["scheme"] == "institution"
    assert all(s["dp_privacy_unit"] == "patient" for s in m["setup"].values())


@pytest.mark.slow
def test_flair_bundle_takes_three_slices_and_predicts_whole_volumes(brats_data, tmp_path):
    m = _simulate("brain_tumour_2d_flair", brats_data, tmp_path, "--override", "patch_size=[32,32]",
                  "--override", "batch_size=4", "--no-report")  # fmt: skip
    assert list(m["final"]["global_dice_per_class"]) == ["WT"]
    parser = load_bundle(BundleSpec(BUNDLES / "brain_tumour_2d_flair"),
                         {"dataset_dir": str(brats_data), "patch_size": [32, 32]}, required=())  # fmt: skip
    assert parser.get_parsed_content("network").model[0].conv.unit0.conv.in_channels == 3  # FLAIR x 3 slices
    assert isinstance(parser.get_parsed_content("validate#inferer"), ContextSliceInferer)


@pytest.mark.slow
@pytest.mark.parametrize("bundle_name", ["liver_ct_2d", "brain_tumour_2d_flair"])
def test_inference_writes_masks_on_each_input_grid(bundle_name, liver_data, brats_data, tmp_path):
    from monai.bundle import run

    bundle = tmp_path / bundle_name
    (bundle / "models").mkdir(parents=True)
    (bundle / "inputs").mkdir()
    if bundle_name == "liver_ct_2d":
        image, net = sorted((liver_data / "imagesTr").glob("*.nii.gz"))[0], build_network("monet", 1, 1)
    else:  # FLAIR volumes, each slice predicted from its neighbourhood (MetaTensor inputs)
        image, net = sorted(brats_data.glob("*/*_flair.nii.gz"))[0], build_network("unet", 3, 1)
    (bundle / "inputs" / image.name).write_bytes(image.read_bytes())
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    run(config_file=str(BUNDLES / bundle_name / "configs" / "inference.json"), bundle_root=str(bundle),
        patch_size=[16, 16])  # fmt: skip
    import nibabel as nib

    written = list((bundle / "predictions").glob("*.nii.gz"))
    assert len(written) == 1
    pred, src = nib.load(written[0]), nib.load(image)
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


@pytest.mark.slow
def test_3d_inference_from_modality_files_writes_regions_named_after_the_case(brats_data, tmp_path):
    from monai.bundle import run

    bundle = tmp_path / "brain_tumour_3d"
    (bundle / "models").mkdir(parents=True)
    case = sorted(p for p in brats_data.iterdir() if p.is_dir())[0]
    files = [str(case / f"{case.name}_{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair")]
    (tmp_path / "cases.json").write_text(json.dumps([{"image": files}]))
    torch.save(build_network("segresnet", 4, 3, spatial_dims=3).state_dict(), bundle / "models" / "model.pt")
    run(config_file=str(BUNDLES / "brain_tumour_3d" / "configs" / "inference.json"), bundle_root=str(bundle),
        input_datalist=str(tmp_path / "cases.json"), patch_size=[16, 16, 16])  # fmt: skip
    import nibabel as nib

    written = sorted(p.name for p in (bundle / "predictions").glob("*.nii.gz"))
    assert written == [f"{case.name}_regions.nii.gz"]  # the case, not its first modality
    pred, src = nib.load(bundle / "predictions" / written[0]), nib.load(files[0])
    assert pred.shape[:3] == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_case_name_formatter_strips_only_a_modality_ending():
    from types import SimpleNamespace

    saver = SimpleNamespace(_data_index=0)
    name = lambda f: Path(task.case_name_formatter({"filename_or_obj": f}, saver)["subject"]).name  # noqa: E731
    assert name("/d/BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz") == "BraTS20_Training_001.nii.gz"
    assert name("/d/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz") == "BraTS-GLI-00001-000.nii.gz"
    assert name("/d/imagesTr/BRATS_001_0000.nii.gz") == "BRATS_001.nii.gz"
    assert name("/d/imagesTr/BRATS_001.nii.gz") == "BRATS_001.nii.gz"


@pytest.mark.slow
def test_attack_audit_on_a_region_bundle(liver_data, tmp_path):
    out = tmp_path / "attack"
    assert main(["attack", str(BUNDLES / "liver_ct_2d"), "--data", str(liver_data), "--case", "0",
                 "--iterations", "5", "--restarts", "1", "--output", str(out)]) == 0  # fmt: skip
    record = json.loads((out / "attack.json").read_text())
    assert record["mask_known"] and record["verdict"]
    assert record["victim"]["data"] == "Liver"


def test_an_unreadable_inference_datalist_is_named(tmp_path):
    from monai_fedpriv.errors import DataError

    (tmp_path / "cases.json").write_text("[{'image': 'not json'}]")
    with pytest.raises(DataError, match="cases.json"):
        task.inference_datalist(tmp_path, tmp_path / "cases.json")
