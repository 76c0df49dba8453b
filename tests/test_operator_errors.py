"""Issue 16: a careless operator gets one clear ``error:`` line (exit 2) or the behaviour the flag promises.

Resumes refused for changed settings or fewer rounds leave every file as it was and name the flag; bad flags and
overrides are one line; missing data files are all named; a 3D image into the 2D bundle's inference is refused
naming it; a stalled site is rejected after ``--round-timeout`` as under NVIDIA FLARE; every privacy report states
its unit; ``monai-fedpriv data --synthetic`` writes the data the task bundles read.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_fedpriv.cli import main
from monai_fedpriv.data.msd import load_msd_datalist
from monai_fedpriv.data.synthetic import write_brats_folder, write_msd_task
from monai_fedpriv.errors import DataError, PrivacyConfigError
from tests.conftest import BUNDLE_DIR
from tests.test_fail_closed import bundle, simulate  # noqa: F401 - fixture and helper

REPO = Path(__file__).resolve().parents[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


# ---------------------------------------------------------------- operators' paths: refused resumes
def test_a_refused_resume_names_the_flag_and_leaves_every_file_as_it_was(bundle, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert simulate(bundle, out, rounds=2, steps=1) == 0
    before = _checksums(out)
    capsys.readouterr()
    for changed, named in (
        (["--partition", "skew-high"], "--partition: iid -> skew-high"),
        (["--sites", "3"], "--sites: 2 -> 3"),
    ):
        argv = ["simulate", str(bundle), "--sites", "2", "--rounds", "3", "--local-steps", "1", "--output", str(out),
                "--config-files", "train.json", "fed.json", "tiny.json", "--partition", "iid", "--no-report",
                "--resume", *changed]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --resume") and named in err and "site-1': [" not in err, err
        assert _checksums(out) == before  # metrics.json's partition included
    assert simulate(bundle, out, "--resume", rounds=1, steps=1) == 2
    line = _one_error_line(capsys)
    assert "already has 2 rounds; --rounds must be >= 2 (got 1)" in line
    assert _checksums(out) == before


def test_changed_data_lists_are_summed_up_not_printed():
    from monai_fedpriv.fl.server.checkpoint import fingerprint_changes

    saved = {"sites": {"site-1": ["a", "b"], "site-2": ["c"]}, "seed": 0}
    moved = {"sites": {"site-1": ["a"], "site-2": ["c", "b", "d"]}, "seed": 0}
    assert fingerprint_changes(saved, moved) == [
        "the sites' data lists changed (data, --data, --partition or --seed): site-1: 0 added, 1 removed; "
        "site-2: 2 added, 0 removed"
    ]
    # a checkpoint written before the partition was recorded still resumes
    assert fingerprint_changes(saved, {**saved, "partition": "iid"}) == []


# ---------------------------------------------------------------- tracebacks and silences: one line, exit 2
@pytest.mark.parametrize(
    "args,named",
    [
        (["--override", "learning_rate=abc"], "--override learning_rate=abc: the bundle's 'learning_rate' is a number"),
        (["--override", "learning_rate=[1]"], "'learning_rate' is a number"),
        (["--override", "nonexistent_id=1"], "defines the id 'nonexistent_id'"),
        (["--override", "learning_rat=0.1"], "Did you mean learning_rate"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--seed", str(2**32)], "--seed must be"),
        (["--inject-fault", "site-1:nan:5"], "--inject-fault site-1:nan:5: beyond --rounds 1"),
    ],
)  # fmt: skip
def test_every_careless_flag_is_one_line_and_exit_2(tmp_path, capsys, args, named):
    argv = ["simulate", str(BUNDLE_DIR), "--output", str(tmp_path / "o"), "--rounds", "1", "--local-steps", "1"]
    assert main([*argv, *args]) == 2
    assert named in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_an_output_that_is_a_file_and_cuda_without_cuda(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    for output in (target, target / "run"):
        assert main(["simulate", str(BUNDLE_DIR), "--output", str(output)]) == 2
        assert f"--output {output}" in _one_error_line(capsys) and target.read_text() == "keep me"
    if not torch.cuda.is_available():
        assert main(["simulate", str(BUNDLE_DIR), "--output", str(tmp_path / "o"), "--device", "cuda"]) == 2
        assert "no CUDA device" in _one_error_line(capsys)


def test_overrides_of_the_shared_files_and_new_component_arguments_are_accepted():
    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.cli.overrides import check_overrides, parse_overrides

    spec = BundleSpec(BUNDLE_DIR, ("train.json",))
    given = parse_overrides(["svt_fraction=0.2", "network_def#dropout=0.1", "dataset_dir=/d", "patch_size=[32, 32]",
                             "learning_rate=1", "privacy_noise_seed=3", "batch_size=null"])  # fmt: skip
    assert check_overrides(spec, given) == {"svt_fraction": 0.2, "network_def#dropout": 0.1, "dataset_dir": "/d",
                                            "patch_size": [32, 32], "learning_rate": 1, "privacy_noise_seed": 3,
                                            "batch_size": None}  # fmt: skip
    assert type(check_overrides(spec, parse_overrides(["dataset_dir=/x y"]))["dataset_dir"]) is str


def test_attack_checkpoint_that_is_not_a_checkpoint_names_the_file(tiny_data, tmp_path, capsys):
    from monai_fedpriv.attacks.bundle_model import load_checkpoint

    text, empty, noise = tmp_path / "notes.txt", tmp_path / "empty.pt", tmp_path / "noise.pt"
    text.write_text("hello\n")
    empty.write_bytes(b"")
    noise.write_bytes(bytes(range(256)) * 3)
    torch.save({"epoch": 3}, tmp_path / "counter.pt")
    net = torch.nn.Conv2d(1, 2, 3)
    for path in (text, empty, noise, tmp_path / "counter.pt", tmp_path / "absent.pt"):
        with pytest.raises(DataError, match=re.escape(f"--checkpoint {path}")):
            load_checkpoint(net, path, 8)
    image = sorted((tiny_data / "imagesTr").glob("*.nii.gz"))[0]
    argv = ["attack", str(BUNDLE_DIR), "--victim", str(image), "--output", str(tmp_path / "a")]
    assert main([*argv, "--checkpoint", str(text)]) == 2
    assert f"--checkpoint {text} is not a PyTorch checkpoint" in _one_error_line(capsys)
    assert main([*argv, "--device", "cuda:7"]) == 2
    assert "--device cuda:7" in _one_error_line(capsys)


def test_every_missing_file_is_named_in_one_error_block(tmp_path):
    from monai_fedpriv.data.brats import load_brats_datalist

    root = write_msd_task(tmp_path / "msd", 4, shape=(8, 8, 4), seed=1)
    cases = load_msd_datalist(root)
    gone = [Path(cases[0]["image"]), Path(cases[0]["label"]), Path(cases[2]["image"])]
    for path in gone:
        path.unlink()
    with pytest.raises(DataError) as err:
        load_msd_datalist(root)
    message = str(err.value)
    assert message.startswith("2 of 4 cases failed the checks:") and all(p.name in message for p in gone)
    brats = write_brats_folder(tmp_path / "brats", 3, shape=(8, 8, 8))
    folders = sorted(p for p in brats.iterdir() if p.is_dir())
    (folders[0] / f"{folders[0].name}_flair.nii.gz").unlink()
    (folders[2] / f"{folders[2].name}_seg.nii.gz").unlink()
    with pytest.raises(DataError) as err:
        load_brats_datalist(brats)
    message = str(err.value)
    assert message.startswith("2 of 3 cases failed the checks:") and "'flair' modality" in message
    assert f"{folders[2].name} has no segmentation" in message


def test_items_per_patient_on_3d_volumes_is_refused_with_the_reason(tmp_path, capsys):
    root = write_msd_task(tmp_path / "msd", 6, shape=(20, 20, 8), seed=2)
    argv = ["simulate", str(BUNDLE_DIR), "--data", str(root), "--sites", "2", "--output", str(tmp_path / "o"),
            "--privacy", "low", "--items-per-patient", "3"]  # fmt: skip
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "--items-per-patient 3: no patient has more than 1 training item(s)" in line and "3D volume" in line
    assert main([*argv, "--privacy-unit", "slice"]) == 2
    assert "patient privacy unit only" in _one_error_line(capsys)


# ---------------------------------------------------------------- privacy reports
def test_gaussian_over_budget_names_its_own_flag(bundle, tmp_path, capsys):  # noqa: F811
    from monai_fedpriv.privacy import GaussianUpdatePrivacy
    from monai_fedpriv.privacy.budget import PrivacyBudget

    with pytest.raises(PrivacyConfigError, match="--gaussian-noise") as err:
        GaussianUpdatePrivacy(0.1, 0.1, PrivacyBudget(limit=0.5))
    assert "--svt-epsilon" not in str(err.value)
    args = ["--share", "gaussian", "--gaussian-clip", "0.1", "--gaussian-noise", "0.1", "--epsilon-budget", "0.5"]
    assert simulate(bundle, tmp_path / "g", *args) == 2
    line = _one_error_line(capsys)
    assert "--gaussian-noise" in line and "--svt-epsilon" not in line


@pytest.mark.parametrize("share", [["--share", "svt"], ["--share", "gaussian", "--gaussian-clip", "0.1",
                                                        "--gaussian-noise", "2"]])  # fmt: skip
def test_an_update_filter_alone_states_its_privacy_unit(bundle, tmp_path, capsys, share):  # noqa: F811
    out = tmp_path / "run"
    argv = ["simulate", str(bundle), "--sites", "2", "--rounds", "1", "--local-steps", "1", "--output", str(out),
            "--config-files", "train.json", "fed.json", "tiny.json", "--partition", "iid", *share,
            "--epsilon-budget", "20"]  # fmt: skip
    assert main(argv) == 0
    assert "'privacy_unit': 'update'" in capsys.readouterr().out  # the console's privacy line
    m = json.loads((out / "metrics.json").read_text())
    units = [s["privacy"].get("privacy_unit") for r in m["rounds"] for s in r["sites"].values()]
    assert units == ["update", "update"]
    assert "Privacy unit: **update** (epsilon is per site update" in (out / "report.md").read_text()


# ---------------------------------------------------------------- the console and the round timeout
def test_progress_lines_print_whole_rejection_reasons():
    from monai_fedpriv.fl.server.records import progress_cell

    reason = "update norm 123.4 is more than 100 times the median of the other sites' norms (0.5); refused whole"
    assert progress_cell("site-3", {"rejected": reason}) == f"site-3 REJECTED ({reason})"


def test_a_stalled_site_is_rejected_after_the_round_timeout(bundle, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr("monai_fedpriv.fl.simulator.faults.STALL_SECONDS", 5.0)
    out = tmp_path / "run"
    args = ["--privacy", "low", "--epsilon-budget", "100", "--round-timeout", "3", "--inject-fault", "site-2:stall:2"]
    assert simulate(bundle, out, *args, rounds=3, steps=2) == 0
    printed = capsys.readouterr().out
    assert "site-2 REJECTED (no answer within the round's timeout (3 s))" in printed
    m = json.loads((out / "metrics.json").read_text())
    r1, r2, r3 = (r["sites"] for r in m["rounds"])
    assert r2["site-2"]["rejected"] == "no answer within the round's timeout (3 s)"
    assert m["rounds"][1]["global"]["rejected"] == 1 and "loss" in r2["site-1"]  # the round aggregated site-1
    # the step taken before the timeout stays spent: 2 steps in round 1, +1 in the stopped round, +2 in round 3
    assert r1["site-2"]["privacy"]["steps"] == 2 and r2["site-2"]["privacy"]["steps"] == 3
    assert r3["site-2"]["privacy"]["steps"] == 5 and "rejected" not in r3["site-2"]


def test_a_round_that_ends_past_the_timeout_is_refused_after_the_fact():
    import time

    from ignite.engine import Engine, Events

    from monai_fedpriv.fl.simulator.site_round import train_round

    class SlowSite:  # no iteration boundary after the deadline: the round ends late, then is refused
        name, budgets, rolled_back = "site-1", [], []
        trainer = Engine(lambda engine, batch: None)

        def run_round(self):
            time.sleep(0.3)

        def rollback(self, snapshot, max_epochs):
            self.rolled_back.append((snapshot, max_epochs))

    site = SlowSite()
    result, answers, failure = train_round(site, 1, None, {"state": 0}, 4, timeout=0.1)
    assert (result, answers, failure) == ({}, True, "no answer within the round's timeout (0.1 s)")
    assert site.rolled_back == [({"state": 0}, 4)] and not site.trainer._event_handlers.get(Events.ITERATION_COMPLETED)


# ---------------------------------------------------------------- data and the bundles' own commands
def test_data_writes_the_synthetic_folders_the_task_bundles_read(tmp_path, capsys):
    from monai_fedpriv.experiments.own_data import load_own_data

    for kind, layout in (("msd", "msd"), ("brats", "brats")):
        folder = tmp_path / kind
        assert main(["data", "--synthetic", kind, "--output", str(folder), "--cases", "4", "--seed", "1"]) == 0
        assert capsys.readouterr().out.strip() == str(folder)
        own = load_own_data(folder, log=lambda _: None)  # every case opened and checked
        assert own.info.layout == layout and len(own.cases) == 4
        assert main(["data", "--synthetic", kind, "--output", str(folder)]) == 2
        assert "already holds files" in _one_error_line(capsys)
    assert main(["data", "--synthetic", "msd", "--output", str(tmp_path / "few"), "--cases", "2"]) == 2
    assert "--cases must be >= 4" in _one_error_line(capsys)


def _readme_commands() -> list[tuple[str, list[str]]]:
    out = []
    for readme in sorted(REPO.glob("bundles/*/docs/README.md")):
        for line in readme.read_text().splitlines():
            if line.startswith("python -m monai.bundle run"):
                out.append((readme.parent.parent.name, shlex.split(line)))
    return out


def test_every_bundle_readme_command_resolves_from_the_repository_root():
    commands = _readme_commands()
    assert {name for name, _ in commands} == {p.name for p in REPO.glob("bundles/*") if (p / "configs").is_dir()}
    for name, argv in commands:
        config = argv[argv.index("--config_file") + 1]
        files = ast.literal_eval(config) if config.startswith("[") else [config]
        assert files and all((REPO / f).is_file() for f in files), (name, files)
        root = argv[argv.index("--bundle_root") + 1]
        assert (REPO / root) == REPO / "bundles" / name and all(Path(f).parent.parent == Path(root) for f in files)


def test_a_3d_image_into_the_2d_bundles_inference_is_one_line(tmp_path):
    inputs = tmp_path / "inputs"
    volume = write_msd_task(tmp_path / "msd", 1, shape=(16, 16, 6), seed=3)
    inputs.mkdir()
    source = next((volume / "imagesTr").glob("*.nii.gz"))
    (inputs / source.name).write_bytes(source.read_bytes())
    _, argv = next(c for c in _readme_commands() if c[0] == "brain_tissue_2d")
    argv = [a.replace("train.json", "inference.json") for a in argv]  # the README's command form, for inference
    argv = [sys.executable, *argv[1:], "--input_dir", str(inputs), "--ckpt_dir", str(tmp_path / "none")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: image {inputs / source.name} has shape (16, 16, 6) (3D)")
    assert "bundle brain_tissue_2d segments 2D images" in last and "Traceback" not in proc.stderr


def test_the_inference_input_check_raises_inside_other_programs(tmp_path):
    """Only MONAI's own runner gets the one line and exit code 2; a config parsed in a notebook or workflow raises."""
    from monai_fedpriv.data.checks import inference_inputs
    from monai_fedpriv.errors import DataError

    volume = write_msd_task(tmp_path / "msd", 1, shape=(16, 16, 6), seed=3)
    with pytest.raises(DataError, match=r"has shape \(16, 16, 6\) \(3D\), but bundle b segments 2D"):
        inference_inputs(volume / "imagesTr", spatial_dims=2, bundle="b", exit_on_error=True)


def test_overrides_take_monai_name_and_args_pairs_where_the_bundle_holds_a_name():
    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.cli.overrides import check_overrides

    spec = BundleSpec(BUNDLE_DIR, ("train.json",), {})
    values = {"network_def#norm": ["INSTANCE", {"affine": True}], "network_def#kernel_size": [3, 3]}
    assert check_overrides(spec, values) == values


@pytest.mark.parametrize("key", ["train#nothing", "train#dataloaderr#batch_size", "network#x"])
def test_override_typos_inside_the_bundles_own_ids_are_refused(key):
    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.cli.options import OptionError
    from monai_fedpriv.cli.overrides import check_overrides

    with pytest.raises(OptionError, match="would change nothing"):
        check_overrides(BundleSpec(BUNDLE_DIR, ("train.json",), {}), {key: 1})
