"""``simulate --secure-aggregation [--distributed-dp]``: the run trains what plain FedAvg trains (within the
quantisation), the server never holds a site's update, dropouts are survived while the threshold holds and fail the
round cleanly when it does not, every site's ledger holds its Skellam releases, and what cannot run is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from monai_fedpriv.cli import main
from tests.conftest import write_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tiny_data, tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("secure") / "tiny_bundle", tiny_data)


def run(bundle: Path, out: Path, *extra: str, sites: int = 3, rounds: int = 2) -> int:
    return main(["simulate", str(bundle), "--sites", str(sites), "--rounds", str(rounds), "--local-steps", "2",
                 "--partition", "iid", "--config-files", "train.json", "tiny.json", "--output", str(out),
                 "--no-report", *extra])  # fmt: skip


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "federated" / "models" / "model.pt", weights_only=True)


def test_secure_aggregation_trains_what_plain_fedavg_trains_and_the_server_sees_only_the_sum(bundle, tmp_path,
                                                                                            monkeypatch):  # fmt: skip
    from monai_fedpriv.fl.secure.gather import HeldTransport

    seen: list[int] = []
    collect = HeldTransport.collect
    monkeypatch.setattr(HeldTransport, "collect", lambda self: seen.append(len(self.inbox)) or collect(self))
    assert run(bundle, tmp_path / "secure", "--secure-aggregation", "--max-update-norm", "1000",
               "--secagg-bits", "32", "--weighting", "uniform") == 0  # fmt: skip
    assert seen == [0, 0]  # no site's update ever reached the server's inbox
    assert run(bundle, tmp_path / "plain", "--weighting", "uniform") == 0
    assert run(bundle, tmp_path / "secure1", "--secure-aggregation", "--max-update-norm", "1000", "--secagg-bits",
               "32", "--weighting", "uniform", rounds=1) == 0  # fmt: skip
    assert run(bundle, tmp_path / "plain1", "--weighting", "uniform", rounds=1) == 0
    a, b = weights(tmp_path / "secure1"), weights(tmp_path / "plain1")
    for k in b:  # one round: the same sum within the 32-bit fixed point (later rounds let Adam amplify the rounding
        # in conv biases before a norm, whose gradient is rounding noise, into steps of the learning rate)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    metrics = json.loads((tmp_path / "secure" / "metrics.json").read_text())
    assert metrics["secure_aggregation"] == {"threshold": None, "bits": 32, "neighbours": None,
                                             "distributed_dp": False, "noise_multiplier": 0.0, "clip": 1000.0}
    for record in metrics["rounds"]:
        assert record["secure_aggregation"] == {"survivors": ["site-1", "site-2", "site-3"], "dropped": [],
                                                "server_saw": "sum"}  # fmt: skip
        plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["rounds"][0]["sites"]["site-1"]
        for site in record["sites"].values():  # every stage's bytes: more than the update alone, 4 bytes a weight
            assert site["bytes_sent"] > plain["bytes_sent"] and site["messages"] == 8


def test_dropouts_before_and_after_sending_are_survived_and_too_many_fail_the_round_cleanly(bundle, tmp_path):
    out = tmp_path / "drops"
    assert main(["simulate", str(bundle), "--sites", "4", "--rounds", "2", "--local-steps", "2", "--partition", "iid",
                 "--config-files", "train.json", "tiny.json", "--output", str(out), "--secure-aggregation",
                 "--max-update-norm", "10", "--secagg-threshold", "2", "--inject-fault", "site-2:drop-before-send:2",
                 "--inject-fault", "site-4:drop-after-send:2"]) == 0  # with its report  # fmt: skip
    report = (out / "report.md").read_text()
    assert "## What the server saw: secure aggregation" in report
    assert "| 2 | site-1, site-3, site-4 | site-2 | sum |" in report
    record = json.loads((out / "metrics.json").read_text())["rounds"][1]
    assert record["secure_aggregation"]["survivors"] == ["site-1", "site-3", "site-4"]
    assert record["secure_aggregation"]["dropped"] == ["site-2"]
    assert record["secure_aggregation"]["left_after_sending"] == ["site-4"]
    assert "dropped before sending" in record["sites"]["site-2"]["rejected"]
    # it took part in the key stages (so the server had to remove the masks the others paired with it)
    assert record["sites"]["site-2"]["messages"] == 5 and 0 < record["sites"]["site-2"]["bytes_sent"] < 2000
    assert record["sites"]["site-4"]["messages"] == 7 and record["sites"]["site-1"]["messages"] == 8
    assert all(float(v.abs().max()) < 5 for v in weights(out).values())  # unremoved masks would be noise of ~2^15
    failing = tmp_path / "too_many"
    assert run(bundle, failing, "--secure-aggregation", "--max-update-norm", "10", "--secagg-threshold", "3",
               "--inject-fault", "site-1:drop-before-send:2", "--inject-fault", "site-2:drop-before-send:2",
               sites=4) == 1  # fmt: skip
    metrics = json.loads((failing / "metrics.json").read_text())
    assert metrics["final"]["rounds_completed"] == 1 and "masked input stage" in metrics["stopped"]["reason"]
    checkpoint = torch.load(failing / "federated" / "checkpoints" / "latest.pt", weights_only=False)
    assert checkpoint["round"] == 1  # the last completed round's checkpoint is intact


def test_distributed_dp_charges_every_sites_ledger_as_an_independent_accountant_does(bundle, tmp_path):
    out = tmp_path / "ddp"
    assert run(bundle, out, "--secure-aggregation", "--max-update-norm", "1", "--distributed-dp",
               "--noise-multiplier", "2.0", "--epsilon-budget", "100") == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["secure_aggregation"]["distributed_dp"] is True
    from monai_fedpriv.fl.secure import SecureAggregation

    dim = sum(v.numel() for v in weights(out).values() if v.is_floating_point())
    event = SecureAggregation(1.0, None, 16, None, True, 2.0).encoding(dim, 3, 2, 0).event()
    for rnd, record in enumerate(metrics["rounds"], start=1):
        for site, entry in record["sites"].items():
            best = math.inf
            l1, l2, mu = event.l1, event.l2, event.variance
            for a in range(2, 257):  # the paper's bound, composed rnd times, converted as Balle et al. 2020
                tail = min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
                rdp = rnd * (a * l2**2 / (2 * mu) + tail)
                best = min(best, rdp + math.log((a - 1) / a) - (math.log(1e-5) + math.log(a)) / (a - 1))
            assert entry["privacy"]["epsilon"] == pytest.approx(best, rel=1e-6), (site, rnd)


@pytest.mark.parametrize("flags,named", [
    (["--sites", "2"], "with two, each site learns the other's"),
    (["--strategy", "median"], "--strategy median cannot run under --secure-aggregation"),
    (["--momentum", "aggregate"], "--momentum aggregate cannot run"),
    (["--share", "svt", "--svt-epsilon", "1"], "--share svt/percentile cannot run"),
    (["--no-clip"], "needs --max-update-norm"),
    (["--distributed-dp"], "--distributed-dp needs --noise-multiplier"),
    (["--min-sites", "1"], "--min-sites 1 is below the secure-aggregation threshold 2"),
])  # fmt: skip
def test_what_cannot_run_under_secure_aggregation_is_refused_in_one_line(bundle, tmp_path, capsys, flags, named):
    argv = ["simulate", str(bundle), "--rounds", "1", "--output", str(tmp_path / "x"), "--secure-aggregation"]
    argv += [] if "--no-clip" in flags else ["--max-update-norm", "1"]
    argv += [f for f in flags if f != "--no-clip"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "x").exists()


def test_secure_aggregation_flags_need_it_and_export_refuses_a_resumed_secure_job(bundle, tmp_path, capsys):
    assert main(["simulate", str(bundle), "--output", str(tmp_path / "x"), "--secagg-threshold", "2"]) == 2
    assert "--secagg-threshold" in capsys.readouterr().err
    assert main(["simulate", str(bundle), "--output", str(tmp_path / "x"), "--inject-fault",
                 "site-1:drop-before-send:1"]) == 2  # fmt: skip
    assert "add --secure-aggregation" in capsys.readouterr().err
    assert main(["export-nvflare", str(bundle), "--output", str(tmp_path / "job"), "--secure-aggregation",
                 "--max-update-norm", "1", "--resume"]) == 2  # fmt: skip
    assert "Nothing was written" in capsys.readouterr().err and not (tmp_path / "job").exists()


def test_a_resumed_secure_run_redoes_the_key_exchange_and_ends_where_an_uninterrupted_one_does(bundle, tmp_path):
    flags = ("--secure-aggregation", "--max-update-norm", "1", "--distributed-dp", "--noise-multiplier", "1.0",
             "--epsilon-budget", "100", "--ledger-dir")  # fmt: skip
    assert run(bundle, tmp_path / "full", *flags, str(tmp_path / "l1"), rounds=3) == 0
    assert run(bundle, tmp_path / "part", *flags, str(tmp_path / "l2"), rounds=2) == 0
    assert run(bundle, tmp_path / "part", *flags, str(tmp_path / "l2"), "--resume", rounds=3) == 0
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)  # fresh keys each round; the sum and the seeded noise are exact
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())["rounds"][-1]["global"]["privacy"]
    part = json.loads((tmp_path / "part" / "metrics.json").read_text())["rounds"][-1]["global"]["privacy"]
    assert full["per_site"] == part["per_site"]


def test_compare_runs_every_cell_with_secure_aggregation(bundle, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(bundle), "--strategies", "fedavg", "--partitions", "iid", "--sites", "3",
                 "--rounds", "1", "--local-steps", "1", "--config-files", "train.json", "tiny.json", "--output",
                 str(out), "--secure-aggregation", "--max-update-norm", "5"]) == 0  # fmt: skip
    cell = json.loads((out / "cells" / "fedavg__iid" / "metrics.json").read_text())
    assert cell["secure_aggregation"]["clip"] == 5.0 and cell["rounds"][0]["secure_aggregation"]["server_saw"] == "sum"
    assert json.loads((out / "compare.json").read_text())["settings"]["secure_aggregation"] is True


def test_integer_buffers_travel_unchanged_and_a_round_without_enough_sites_fails_cleanly():
    from monai_fedpriv.fl.secure import SecureAggregation, SecureGather
    from monai_fedpriv.fl.update import ModelUpdate

    global_weights = {"w": torch.zeros(6), "steps": torch.tensor(3)}
    held = {f"site-{i}": ModelUpdate(f"site-{i}", 1, {"w": torch.full((6,), float(i)), "steps": torch.tensor(1)},
                                     n_samples=1, local_steps=1) for i in (1, 2, 3)}  # fmt: skip
    gather = SecureGather(SecureAggregation(clip=100.0, bits=24), 0, lambda _s: None)
    out = gather.run(1, list(held), held, global_weights)
    assert out.failed is None and torch.equal(out.delta["steps"], torch.tensor(0))
    torch.testing.assert_close(out.delta["w"], torch.full((6,), 2.0), atol=1e-4, rtol=0)
    two = gather.run(2, ["site-1", "site-2"], {k: held[k] for k in ("site-1", "site-2")}, global_weights)
    assert two.delta is None and "at least 3 distinct sites" in two.failed
    strict = SecureGather(SecureAggregation(clip=1.0, threshold=3), 0, lambda _s: None)
    assert "fewer than --secagg-threshold 3" in strict.run(3, ["site-1", "site-2"], held, global_weights).failed


def test_distributed_dp_keeps_the_dp_sgd_regime_and_refuses_an_accountant_that_cannot_count_it(bundle, tmp_path,
                                                                                                capsys):  # fmt: skip
    import argparse

    from monai_fedpriv.cli.options import privacy_files_and_overrides
    from monai_fedpriv.cli.simulate import build_simulate_parser

    args: argparse.Namespace = build_simulate_parser().parse_args(
        [str(bundle), "--output", str(tmp_path / "o"), "--privacy", "low", "--secure-aggregation",
         "--max-update-norm", "1", "--distributed-dp", "--noise-multiplier", "3"])  # fmt: skip
    files, overrides = privacy_files_and_overrides(args, ["train.json"])
    assert "noise_multiplier" not in overrides["dp_regime_def"] and "budget.json" in files
    assert run(bundle, tmp_path / "prv", "--secure-aggregation", "--max-update-norm", "1", "--distributed-dp",
               "--noise-multiplier", "1", "--accountant", "prv") == 2  # fmt: skip
    assert "Skellam" in capsys.readouterr().err and not (tmp_path / "prv" / "federated" / "metrics.json").exists()
