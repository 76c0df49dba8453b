"""Issue 10: a team's own MSD or BraTS folder in one flag, checked up front; every bad input one line."""

from __future__ import annotations

import json

import pytest
import torch

from monai_fedpriv.cli import main
from monai_fedpriv.data.msd import load_msd_datalist
from monai_fedpriv.data.synthetic import corrupt_case, write_brats_folder, write_msd_task
from tests.conftest import BUNDLE_DIR

SMALL = ["--override", "network_def#channels=[4, 8]", "--override", "network_def#strides=[2]",
         "--override", "batch_size=4", "--override", "patch_size=[32, 32]"]  # fmt: skip


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    return write_msd_task(tmp_path_factory.mktemp("msd") / "Task99", 8, shape=(40, 40, 12), seed=1)


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    return write_brats_folder(tmp_path_factory.mktemp("brats") / "BraTS2020", 6, shape=(32, 32, 12), seed=2,
                              institutions=("CBICA", "TCIA_08"))  # fmt: skip


def simulate(*args, rounds=2):
    argv = ["simulate", str(BUNDLE_DIR), "--rounds", str(rounds), "--local-steps", "2", "--no-report", *SMALL]
    return main([*argv, *args])


def test_a_standard_msd_folder_trains_the_2d_bundle_on_its_3d_volumes(msd, tmp_path, capsys):
    assert "validation" not in json.loads((msd / "dataset.json").read_text())
    out = tmp_path / "run"
    assert simulate("--data", str(msd), "--sites", "2", "--output", str(out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["final"]["rounds_completed"] == 2 and 0.0 <= m["final"]["global_dice"] <= 1.0
    data = m["data"]
    assert data["name"] == "SyntheticTask" and data["layout"] == "msd" and data["spatial_dims"] == 3
    assert data["modalities"] == ["MR"] and data["labels"] == {"0": "background", "1": "lesion"}
    assert data["validation"]["made_by"] == "seeded split by patient at each site"
    per_site = data["cases_per_site"]
    assert sum(v["train"] + v["val"] for v in per_site.values()) == 8 and all(v["val"] >= 1 for v in per_site.values())
    assert m["partition"]["scheme"] == "iid"  # no institutions in the folder: iid, said on the console
    assert "partition: iid" in capsys.readouterr().out
    assert set(m["config"]["overrides"]).issuperset({"train#preprocessing", "validate#inferer", "num_classes"})
    assert m["config"]["overrides"]["validate#inferer"]["_target_"] == "SliceInferer"


def test_a_brats_folder_gives_a_four_channel_network_split_by_institution(brats, tmp_path):
    out = tmp_path / "run"
    assert simulate("--data", str(brats), "--sites", "2", "--output", str(out), "--val-fraction", "0.3") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["n_channels"] == 4 and m["data"]["layout"] == "brats"
    assert m["partition"]["scheme"] == "institution"
    weights = torch.load(out / "federated" / "models" / "model.pt")
    first = next(v for k, v in weights.items() if k.endswith("weight") and v.ndim == 4)
    assert first.shape[1] == 4  # one input channel per modality
    last = [v for k, v in weights.items() if v.ndim == 4][-1]
    assert 4 in last.shape  # BraTS labels 0, 1, 2, 4 mapped onto 4 contiguous classes


def test_every_bad_case_is_named_in_one_error_before_training(tmp_path, capsys):
    root = write_msd_task(tmp_path / "broken", 6, shape=(20, 20, 8), seed=3)
    cases = load_msd_datalist(root)
    bad = [corrupt_case(cases[0], "truncate_image"), corrupt_case(cases[2], "label_shape"),
           corrupt_case(cases[4], "label_value", value=7)]  # fmt: skip
    assert simulate("--data", str(root), "--sites", "2", "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 of 6 cases failed the checks") and "Traceback" not in err
    for path in bad:
        assert path.name in err
    assert "{7}" in err and not (tmp_path / "out").exists()


def test_institutions_csv_and_marked_validation_items_are_what_the_run_uses(msd, tmp_path):
    from monai_fedpriv.experiments.own_data import load_own_data, split_own_data

    cases = load_msd_datalist(msd)
    csv = tmp_path / "sites.csv"
    csv.write_text("case,institution\n" + "".join(f"{c['patient']},h{i % 2}\n" for i, c in enumerate(cases)))
    own = load_own_data(msd, institutions_csv=csv, check=False, log=lambda _: None)
    assert own.info.institutions == {"h0": 4, "h1": 4}  # what metrics.json reports is what the sites are built from
    assert {c["institution"] for c in own.cases} == {"h0", "h1"}

    marked = tmp_path / "marked"
    marked.mkdir()
    meta = json.loads((msd / "dataset.json").read_text())
    for item in meta["training"]:
        for key in ("image", "label"):
            item[key] = str((msd / item[key]).resolve())
    meta["training"][0]["split"] = meta["training"][1]["split"] = "val"
    (marked / "dataset.json").write_text(json.dumps(meta))
    own = load_own_data(marked, check=False, log=lambda _: None)
    assert own.info.has_validation and len(own.val_cases) == 2 and len(own.cases) == 6
    split = split_own_data(own, 2, "iid", 0.2, 0, log=lambda _: None)
    trained = {c["patient"] for site in split.train.values() for c in site}
    assert trained.isdisjoint(c["patient"] for c in own.val_cases)  # never trained on a declared validation case


def test_a_handful_of_patients_still_validates_every_site_or_says_why(tmp_path, capsys):
    root = write_msd_task(tmp_path / "tiny", 4, shape=(20, 20, 8), seed=4)
    assert simulate("--data", str(root), "--sites", "3", "--output", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "1 patient" in err and "use fewer sites" in err
    assert simulate("--data", str(root), "--sites", "2", "--output", str(tmp_path / "ok"), rounds=1) == 0


@pytest.mark.parametrize(
    "args,named",
    [
        (["--privacy", "custom", "--noise-multiplier", "0", "--max-grad-norm", "1"], "--noise-multiplier"),
        (["--privacy", "custom", "--noise-multiplier", "-1", "--max-grad-norm", "1"], "--noise-multiplier"),
        (["--privacy", "custom", "--noise-multiplier", "nan", "--max-grad-norm", "1"], "--noise-multiplier"),
        (["--privacy", "custom", "--noise-multiplier", "1", "--max-grad-norm", "-1"], "--max-grad-norm"),
        (["--privacy", "medium", "--epsilon-budget", "-1"], "--epsilon-budget"),
        (["--privacy", "medium", "--delta", "2"], "--delta"),
        (["--rounds", "0"], "--rounds"),
        (["--rounds", "-1"], "--rounds"),
        (["--local-steps", "-3"], "--local-steps"),
        (["--local-steps", "0"], "--local-steps"),
        (["--local-epochs", "0"], "--local-epochs"),
        (["--server-momentum", "1.5"], "--server-momentum"),
        (["--threads", "0"], "--threads"),
        (["--val-fraction", "0.5"], "need --data"),
        (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    ],
)  # fmt: skip
def test_every_bad_flag_is_one_line_and_exit_2(tmp_path, capsys, args, named):
    argv = ["simulate", str(BUNDLE_DIR), "--output", str(tmp_path / "o"), *args]
    if "--local-epochs" not in args and "--local-steps" not in args:
        argv += ["--local-steps", "1"]
    if "--rounds" not in args:
        argv += ["--rounds", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err


def test_threads_apply_to_the_run_and_are_restored_after_it(tmp_path, monkeypatch):
    import torch

    import monai_fedpriv.cli.simulate as simulate_cli

    before = torch.get_num_threads()
    seen: list[int] = []
    monkeypatch.setattr(simulate_cli, "_simulate", lambda args, plan: seen.append(torch.get_num_threads()) or 0)
    wanted = 1 if before != 1 else 2
    argv = ["simulate", str(BUNDLE_DIR), "--output", str(tmp_path / "o"), "--rounds", "1", "--threads", str(wanted)]
    assert main(argv) == 0
    assert seen == [wanted] and torch.get_num_threads() == before


def test_bundle_without_an_id_the_run_needs(tmp_path, capsys):
    config = json.loads((BUNDLE_DIR / "configs" / "train.json").read_text())
    del config["network_def"]
    (tmp_path / "b" / "configs").mkdir(parents=True)
    (tmp_path / "b" / "configs" / "train.json").write_text(json.dumps(config))
    assert main(["simulate", str(tmp_path / "b"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'@network_def'" in err[0] and "no config defines" in err[0]


def test_unknown_command_attack_flags_and_help(tmp_path, capsys, msd):
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "simulate" in capsys.readouterr().out  # help goes to stdout
    attack = ["attack", str(BUNDLE_DIR), "--output", str(tmp_path / "a")]
    assert main([*attack, "--data", str(msd), "--iterations", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --iterations must be >= 1, got 0."
    cases = load_msd_datalist(msd)
    other = load_msd_datalist(write_msd_task(tmp_path / "other", 2, shape=(30, 30, 12), seed=5))
    assert main([*attack, "--victim", cases[0]["image"], "--victim-label", other[0]["label"]]) == 2
    err = capsys.readouterr().err
    assert "shape" in err and "one grid" in err and not (tmp_path / "a").exists()
    for flags, line in (
        (["--share", "svt", "--svt-epsilon", "-1"], "error: --svt-epsilon must be > 0, got -1.0."),
        (["--share", "percentile", "--share-clip", "-1"], "error: --share-clip must be > 0, got -1.0."),
        (["--svt-epsilon", "5"], "error: --svt-epsilon need --share."),
        (["--share", "percentile", "--svt-epsilon3", "2"], "error: --svt-epsilon3: not used by --share percentile."),
    ):  # the share flags as simulate checks them, before any work
        assert main([*attack, "--data", str(msd), *flags]) == 2
        assert capsys.readouterr().err.strip() == line
    assert not (tmp_path / "a").exists()


def test_attack_picks_its_victim_from_the_data_as_the_network_sees_it(tmp_path, msd):
    out = tmp_path / "a"
    argv = ["attack", str(BUNDLE_DIR), "--data", str(msd), "--case", "3", "--iterations", "3", "--restarts", "1",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "attack.json").read_text())
    assert record["victim"]["case"] == 3 and record["victim"]["slice"] is not None and record["mask_source"] == "label"


def test_metrics_json_is_current_after_every_round_even_when_the_run_stops(msd, tmp_path):
    out = tmp_path / "stop"
    args = ["--data", str(msd), "--sites", "2", "--inject-fault", "site-1:nan:2", "--min-sites", "2"]
    assert simulate(*args, "--output", str(out), rounds=3) == 1
    m = json.loads((out / "metrics.json").read_text())  # the contract file, not only federated/metrics.json
    assert m["final"]["rounds_completed"] == 1 and m["stopped"]["round"] == 2 and m["data"]["name"]


def test_bundle_outputs_never_land_in_the_working_directory(tmp_path, monkeypatch):
    from monai_fedpriv.bundle.paths import output_root

    monkeypatch.chdir(tmp_path)
    assert output_root(".", "brain_tissue_2d") == "runs/brain_tissue_2d"
    assert output_root(str(BUNDLE_DIR), "brain_tissue_2d") == str(BUNDLE_DIR)
    monkeypatch.chdir(BUNDLE_DIR)
    assert output_root(".", "brain_tissue_2d") == "."  # run from inside the bundle: its own folders


def test_errors_raised_inside_monais_config_parser_reach_the_cli_unwrapped(tmp_path, capsys):
    argv = ["simulate", str(BUNDLE_DIR), "--override", f"dataset_dir={tmp_path / 'none'}", "--rounds", "1"]
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2  # the DataError comes out of the datalist expression
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: MSD data set root") and "dataset.json" in err[0]


def test_skew_partitions_of_a_segmentation_data_set_sort_patients_by_their_foreground(msd):
    from monai_fedpriv.experiments.own_data import load_own_data, split_own_data

    data = load_own_data(msd, log=lambda _: None)
    split = split_own_data(data, 2, "skew-high", 0.25, 0, log=lambda _: None)
    features = {site: [c["feature"] for c in cases] for site, cases in split.train.items()}
    assert all(0.0 < f < 1.0 for fs in features.values() for f in fs)
    assert max(features["site-1"]) <= min(features["site-2"])  # skew-high: the lowest foreground at site-1
    assert split.mean_ks is not None and split.mean_ks > 0.5
