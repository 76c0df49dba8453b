"""Bundles as the MONAI model zoo expects them: the offline minimum checks (each fails on the problem it names), and
a finished federated run exported as a bundle whose weights MONAI's own inference loads from ``bundle_root/models``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from monai_fedpriv.bundle.zoo_check import bundle_problems
from monai_fedpriv.cli import main
from monai_fedpriv.errors import BundleError

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
NAMES = ("liver_ct_2d", "brain_tumour_3d", "brain_tumour_2d_flair", "brain_tissue_2d")


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n")


def test_every_bundle_passes_the_zoos_minimum_checks_offline(capsys):
    assert main(["bundle", "check", *[str(BUNDLES / n) for n in NAMES]]) == 0
    assert "4 bundle(s) pass" in capsys.readouterr().out
    # the zoo's TorchScript step needs weights: none ships with these bundles (a team trains them); the check says so
    assert main(["bundle", "check", str(BUNDLES / "liver_ct_2d"), "--weights"]) == 1
    err = capsys.readouterr().err
    assert "inference.json: loads models/model.pt, which is neither in the bundle nor in a large_files.yml" in err


def test_each_zoo_problem_is_one_line_naming_the_file(tmp_path, capsys):
    from importlib.metadata import version

    broken = tmp_path / "broken"
    shutil.copytree(BUNDLES / "brain_tissue_2d", broken, ignore=shutil.ignore_patterns("models", "eval"))
    (broken / "LICENSE").unlink()
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    meta["version"] = "9.9.9"
    meta["optional_packages_version"] = {"monai_fedpriv": "0.0.1"}
    meta["required_packages_version"]["monai_fedpriv"] = "0.0.1"
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    _edit_json(broken / "configs" / "inference.json", ckpt_dir="$@output_root + '/models'")
    readme = broken / "docs" / "README.md"
    readme.write_text("\n".join(line for line in readme.read_text().splitlines() if "Performance" not in line))
    (broken / "large_files.yml").write_text("large_files:\n  - path: models/model.pt\n    url: https://x/model.pt\n")
    problems = bundle_problems(broken)
    expected = [
        "LICENSE: missing", "9.9.9 is not in the changelog", "indent 4", "deprecated name of required_packages_version",
        f"names monai_fedpriv 0.0.1, but pip installs {version('monai-fedpriv')}", "not from $@bundle_root",
        "no 'Performance' section", "large_files.yml: entry 0 lacks hash_val, hash_type",
    ]  # fmt: skip
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected)
    assert main(["bundle", "check", str(broken)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == len(problems)


def _small_bundle(root: Path, data: Path) -> Path:
    """brain_tissue_2d with a 4-8 channel network in both train.json and inference.json (it trains in seconds)."""
    shutil.copytree(BUNDLES / "brain_tissue_2d", root, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    for name in ("train.json", "inference.json"):
        net = json.loads((root / "configs" / name).read_text())["network_def"]
        _edit_json(root / "configs" / name, network_def={**net, "channels": [4, 8], "strides": [2]})
    (root / "configs" / "tiny.json").write_text(json.dumps({"dataset_dir": str(data), "batch_size": 4}, indent=4))
    return root


def test_a_finished_run_exports_as_a_bundle_whose_inference_loads_its_weights(tiny_data, tmp_path, capsys):
    from monai.bundle import ConfigParser

    bundle = _small_bundle(tmp_path / "bundle", tiny_data)
    run = tmp_path / "run"
    assert main(["simulate", str(bundle), "--sites", "2", "--rounds", "1", "--local-steps", "1", "--partition", "iid",
                 "--config-files", "train.json", "tiny.json", "--privacy", "custom", "--noise-multiplier", "1.0",
                 "--max-grad-norm", "1.0", "--epsilon-budget", "100", "--output", str(run), "--no-report"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "exported"
    assert main(["bundle", "export", str(run), "--output", str(out)]) == 0  # checked with --weights, too
    assert "1 bundle(s) pass" in capsys.readouterr().out
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    source = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] != source["version"] and meta["version"] in meta["changelog"]
    record = meta["federated_training"]
    assert record["private"] and record["epsilon_per_site"] == metrics["rounds"][-1]["global"]["privacy"]["per_site"]
    assert record["global_dice"] == metrics["final"]["global_dice"] and record["sites"] == ["site-1", "site-2"]
    saved = torch.load(out / "models" / "model.pt", weights_only=True)
    trained = torch.load(run / "federated" / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    # MONAI's own inference of the exported bundle reads bundle_root/models/model.pt
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    case = next(p for p in sorted(Path(tiny_data).rglob("*.nii.gz")) if "label" not in str(p))
    shutil.copy(case, inputs / case.name)
    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    parser.update({"bundle_root": str(out), "input_dir": str(inputs), "device": "$torch.device('cpu')"})
    parser.get_parsed_content("evaluator").run()
    network = parser.get_parsed_content("network")
    assert all(torch.equal(network.state_dict()[k], trained[k]) for k in trained)
    assert len(list((out / "predictions").rglob("*.nii.gz"))) == 1
    assert main(["bundle", "export", str(run), "--output", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_a_run_of_another_network_is_not_exported_as_the_bundle(tiny_data, tmp_path):
    from monai_fedpriv.bundle.export import export_run

    bundle = _small_bundle(tmp_path / "bundle", tiny_data)
    _edit_json(bundle / "configs" / "tiny.json", dataset_dir=str(tiny_data), batch_size=4,
               **{"network_def#channels": [4, 16]})  # fmt: skip
    run = tmp_path / "run"
    assert main(["simulate", str(bundle), "--sites", "2", "--rounds", "1", "--local-steps", "1", "--partition", "iid",
                 "--config-files", "train.json", "tiny.json", "--output", str(run), "--no-report"]) == 0
    with pytest.raises(BundleError, match=r"does not fit the network of .*inference.json"):
        export_run(run, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    with pytest.raises(BundleError, match="no completed round|not the metrics"):
        export_run(tmp_path / "nothing", tmp_path / "exported")


def test_export_refuses_a_bundle_edited_since_the_run_and_asks_a_flare_run_for_its_bundle(tiny_data, tmp_path):
    from monai_fedpriv.bundle.export import export_run

    bundle = _small_bundle(tmp_path / "bundle", tiny_data)
    run = tmp_path / "run"
    assert main(["simulate", str(bundle), "--sites", "2", "--rounds", "1", "--local-steps", "1", "--partition", "iid",
                 "--config-files", "train.json", "tiny.json", "--output", str(run), "--no-report"]) == 0
    _edit_json(bundle / "configs" / "train.json", learning_rate=0.5)
    with pytest.raises(BundleError, match=r"train.json changed since the run trained with it"):
        export_run(run, tmp_path / "exported")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"]["bundle"] = "bundle"  # what a run-nvflare run records: the folder inside its job
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(BundleError, match="give the bundle folder with --bundle"):
        export_run(run, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
