import json

from monai_fedpriv.cli import main
from tests.conftest import BUNDLE_DIR


def test_simulate_cli_writes_metrics_and_report(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    overrides = json.dumps(
        {
            "dataset_dir": str(tiny_data),
            "network_def": {
                "_target_": "UNet",
                "spatial_dims": 2,
                "in_channels": 1,
                "out_channels": 3,
                "channels": [4, 8],
                "strides": [2],
                "num_res_units": 1,
                "norm": "INSTANCE",
            },
        }
    )
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    for f in ("train.json", "metadata.json"):  # fed.json, budget.json, dp.json...: the package's shared overrides
        (bundle / "configs" / f).write_text((BUNDLE_DIR / "configs" / f).read_text())
    (bundle / "configs" / "tiny.json").write_text(overrides)
    common = ["simulate", str(bundle), "--sites", "2", "--rounds", "2", "--local-steps", "2", "--output", str(out)]
    common += ["--config-files", "train.json", "fed.json", "tiny.json", "--partition", "iid"]
    rc = main([*common, "--baselines"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in m["rounds"]] == [1, 2]
    assert set(m["rounds"][0]["sites"]) == {"site-1", "site-2"}
    assert m["rounds"][0]["sites"]["site-1"]["local_steps"] == 2
    assert m["partition"]["scheme"] == "iid"
    assert set(m["baselines"]["local_only"]) == {"site-1", "site-2"}
    assert (out / "report.md").read_text().startswith("# Federated training report")
    assert (out / "figures" / "dice_per_round.png").stat().st_size > 1000
    assert (out / "figures" / "segmentations.png").stat().st_size > 1000
    # resume after completion does nothing and keeps the result
    assert main([*common, "--resume", "--no-report"]) == 0
    assert json.loads((out / "metrics.json").read_text())["final"] == m["final"]


def test_cli_usage_and_bad_args(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert main(["simulate", "x", "--sites", "0", "--output", "o"]) == 2


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "missing_bundle"), "--output", str(tmp_path / "o")]) == 2
    assert "missing_bundle does not exist" in capsys.readouterr().err
