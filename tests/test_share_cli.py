"""``monai-fedpriv simulate --share ...`` end to end on a tiny bundle: sparse transport, epsilon reporting, errors."""

import functools
import json

import pytest

from monai_fedpriv.cli import main
from monai_fedpriv.privacy.accounting import PrivacyLedger
from tests.conftest import BUNDLE_DIR


@pytest.fixture()
def tiny_cli_bundle(tiny_data, tmp_path):
    # the bundle's own U-Net (205,856 parameters): big enough that the codec header does not hide the 8x
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    for f in ("train.json", "metadata.json"):  # fed.json, budget.json, dp.json...: the package's shared overrides
        (bundle / "configs" / f).write_text((BUNDLE_DIR / "configs" / f).read_text())
    tiny = {
        "dataset_dir": str(tiny_data),
        "batch_size": 4,
        "dp_example_input_shape": [2, 1, 32, 32],
    }
    (bundle / "configs" / "tiny.json").write_text(json.dumps(tiny))
    # a 4-8 channel U-Net for the runs that check epsilon only (DP-SGD on the full one is slow on a busy CPU)
    small = {"network_def#channels": [4, 8], "network_def#strides": [2]}
    (bundle / "configs" / "small.json").write_text(json.dumps(small))
    return bundle


def _simulate(bundle, out, *extra, small=False, sites=2):
    argv = ["simulate", str(bundle), "--sites", str(sites), "--rounds", "2", "--local-steps", "2", "--output", str(out)]
    files = ["train.json", "fed.json", "tiny.json"] + (["small.json"] if small else [])
    argv += ["--config-files", *files, "--partition", "iid", "--no-report", *extra]
    return main(argv)


def _site_rounds(out):
    m = json.loads((out / "metrics.json").read_text())
    return [(r["round"], name, s) for r in m["rounds"] for name, s in r["sites"].items()], m


def test_percentile_sends_at_most_an_eighth(tiny_cli_bundle, tmp_path):
    out = tmp_path / "pct"
    assert _simulate(tiny_cli_bundle, out, "--share", "percentile", "--share-fraction", "0.1") == 0
    rows, _ = _site_rounds(out)
    assert len(rows) == 4
    for _, _, s in rows:
        assert s["bytes_sent"] * 8 <= s["dense_bytes"], s
        assert s["privacy"]["dp"] is False and s["privacy"]["filter_epsilon"] is None
        assert s["privacy"]["fraction_shared"] == pytest.approx(0.1, abs=1e-3)


def test_svt_reports_filter_epsilon_per_round_and_total(tiny_cli_bundle, tmp_path):
    out = tmp_path / "svt"
    args = ["--share", "svt", "--share-fraction", "0.1", "--svt-epsilon", "2", "--svt-epsilon3", "0.5"]
    assert _simulate(tiny_cli_bundle, out, *args, "--epsilon-budget", "100") == 0
    rows, m = _site_rounds(out)
    for rnd, _, s in rows:
        priv = s["privacy"]
        assert s["bytes_sent"] * 8 <= s["dense_bytes"]
        assert priv["dp"] is True
        assert priv["filter_epsilon"] == pytest.approx(2.5)
        assert priv["filter_epsilon_total"] == pytest.approx(2.5 * rnd)
        assert priv["epsilon"] == pytest.approx(2.5 * rnd)  # pure DP only: basic composition (at any delta)
    assert m["rounds"][-1]["global"]["privacy"]["epsilon"] == pytest.approx(5.0)


def test_dp_sgd_and_svt_report_the_combined_epsilon(tiny_cli_bundle, tmp_path):
    out = tmp_path / "dp_svt"
    dp_svt = ["--privacy", "medium", "--epsilon-budget", "1000", "--share", "svt", "--svt-epsilon", "0.5"]
    assert _simulate(tiny_cli_bundle, out, *dp_svt, small=True, sites=1) == 0  # one site: RDP here is slow
    rows, _ = _site_rounds(out)
    assert len(rows) == 2

    @functools.cache
    def recomputed(q, sigma, steps, rnd, delta):
        """From the events: DP-SGD steps so far, and one SVT release per round (this one included)."""
        dp_only = PrivacyLedger()
        dp_only.record_sampled_gaussian(q, sigma, steps=steps)
        both = PrivacyLedger()
        both.load_state_dict(dp_only.state_dict())
        both.record_pure(1.5, label="svt", count=rnd)
        return dp_only.epsilon(delta), both.epsilon(delta)  # RDP at q = 2/3 is slow: the sites share the result

    for rnd, _, s in rows:
        priv = s["privacy"]
        assert priv["filter_epsilon"] == pytest.approx(1.5) and priv["filter_epsilon_total"] == pytest.approx(1.5 * rnd)
        eps_dp, eps_both = recomputed(priv["sample_rate"], priv["noise_multiplier"], priv["steps"], rnd, priv["delta"])
        assert priv["epsilon"] == pytest.approx(eps_both, rel=1e-9)
        assert eps_dp < priv["epsilon"] <= eps_dp + priv["filter_epsilon_total"] + 1e-9


@pytest.mark.parametrize(
    "args",
    [
        ["--share", "percentile", "--share-fraction", "0"],
        ["--share", "percentile", "--share-fraction", "1.5"],
        ["--share", "svt", "--svt-epsilon", "-1"],
        ["--share", "svt", "--svt-threshold", "-0.1"],
        ["--share", "svt", "--share-clip", "0"],
        ["--share", "gaussian", "--gaussian-clip", "1"],
        ["--share", "gaussian", "--gaussian-clip", "1", "--gaussian-noise", "0"],
        ["--share", "percentile", "--svt-epsilon", "1"],
        ["--share-fraction", "0.1"],
        ["--share", "svt"],  # no budget: SVT releases would compose without bound
        ["--share", "gaussian", "--gaussian-clip", "1", "--gaussian-noise", "1"],
        ["--share", "svt", "--epsilon-budget", "1.5"],  # one round (1 + 1) costs more than the budget
        ["--share", "svt", "--epsilon-budget", "10", "--accountant", "prv"],  # PRV cannot account for SVT
        ["--share", "svt", "--epsilon-budget", "10", "--momentum", "aggregate"],  # moments not covered by SVT
        ["--share", "percentile", "--momentum", "aggregate"],
        ["--epsilon-budget", "3"],
    ],
)
def test_bad_share_values_exit_2(tiny_cli_bundle, tmp_path, capsys, args):
    assert _simulate(tiny_cli_bundle, tmp_path / "bad", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--" in err
    assert not (tmp_path / "bad").exists()


def test_svt_state_and_ledger_survive_resume(tiny_cli_bundle, tmp_path):
    """Round 2 after --resume equals round 2 of an uninterrupted run: filter generator, epsilon total and ledger."""
    share = ["--share", "svt", "--svt-epsilon", "1e4", "--svt-epsilon3", "1e4", "--epsilon-budget", "1e6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # two runs on the same data: each keeps its ledger store, or the second would carry the first's epsilon
    assert _simulate(tiny_cli_bundle, straight, *share, "--ledger-dir", str(tmp_path / "ledgers_straight")) == 0
    argv = ["simulate", str(tiny_cli_bundle), "--sites", "2", "--local-steps", "2", "--output", str(resumed)]
    argv += ["--config-files", "train.json", "fed.json", "tiny.json", "--partition", "iid", "--no-report", *share]
    argv += ["--ledger-dir", str(tmp_path / "ledgers_resumed")]
    assert main([*argv, "--rounds", "1"]) == 0
    assert main([*argv, "--rounds", "2", "--resume"]) == 0
    a, _ = _site_rounds(straight)
    b, _ = _site_rounds(resumed)
    assert [(r, n, s["privacy"], s["bytes_sent"], s["global_dice"]) for r, n, s in a] == [
        (r, n, s["privacy"], s["bytes_sent"], s["global_dice"]) for r, n, s in b
    ]


def test_in_training_attack_runs_on_a_dp_site(tiny_cli_bundle, tmp_path):
    """attack.json + --privacy: the evaluator attacks the DP-noised update; its server copy of the network carries
    none of the per-sample hooks the DP wrapper installed (they used to crash the attack)."""
    configs = tiny_cli_bundle / "configs"
    configs.joinpath("fast_attack.json").write_text(json.dumps({"attack_iterations": 5, "attack_restarts": 1}))
    out = tmp_path / "dp_attack"
    files = ["train.json", "fed.json", "tiny.json", "small.json", "attack.json", "fast_attack.json"]
    assert _simulate(tiny_cli_bundle, out, "--privacy", "medium", "--config-files", *files) == 0
    rows, _ = _site_rounds(out)
    for name in ("site-1", "site-2"):
        record = json.loads((out / "federated" / "sites" / name / "attack" / "round_1" / "attack.json").read_text())
        eps = next(s["privacy"]["epsilon"] for rnd, n, s in rows if rnd == 1 and n == name)
        assert record["epsilon"] == pytest.approx(eps) and record["noise_multiplier"] == 1.0
        assert 0.0 <= record["ssim"] <= 1.0 and record["iterations"] == 5


def test_dp_report_for_a_batchnorm_network(tiny_cli_bundle, tmp_path):
    """--privacy on a BatchNorm network, with the report: the segmentation figure loads the global model into the
    prepared (InstanceNorm) network, and the report lists the conversion."""
    out = tmp_path / "bn"
    argv = [
        "simulate",
        str(tiny_cli_bundle),
        "--sites",
        "2",
        "--rounds",
        "1",
        "--local-steps",
        "1",
        "--output",
        str(out),
    ]
    argv += ["--config-files", "train.json", "fed.json", "tiny.json", "small.json", "--partition", "iid"]
    assert main([*argv, "--privacy", "medium", "--override", 'network_def#norm="batch"']) == 0
    report = (out / "report.md").read_text()
    assert "Network preparation" in report and "BatchNorm2d -> InstanceNorm2d" in report
    assert (out / "figures" / "segmentations.png").stat().st_size > 0
