"""``monai-fedpriv compare``: a grid of tiny simulations, compare.json, resumability, flag errors, the CWT forgetting
matrix and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_fedpriv.cli import main
from monai_fedpriv.cli.compare import build_compare_parser, settings_from_args
from monai_fedpriv.experiments.compare import (
    STRATEGY_FLAG,
    cell_argv,
    cell_dir,
    forgetting_matrix,
    run_grid,
    strategy_flags,
    summarise_cell,
)
from tests.conftest import write_tiny_bundle

GRID = ["--strategies", "fedavg,fedavgm", "--partitions", "iid,skew-high"]


@pytest.fixture(scope="module")
def tiny_compare_bundle(tmp_path_factory, tiny_data) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("compare") / "bundle", tiny_data)


def _flags(bundle: Path, out: Path, *more: str) -> list[str]:
    return [str(bundle), "--sites", "2", "--rounds", "2", "--local-steps", "2", "--output", str(out),
            "--config-files", "train.json", "tiny.json", *more]  # fmt: skip


def _cells_metrics(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted((out / "cells").glob("*/metrics.json"))}


def test_compare_grid_writes_json_report_and_resumes(tiny_compare_bundle, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *_flags(tiny_compare_bundle, out, *GRID)]) == 0
    printed = capsys.readouterr().out
    assert "cell 1/4: fedavg on iid" in printed and "cell 4/4: fedavgm on skew-high" in printed
    result = json.loads((out / "compare.json").read_text())
    assert {"cells", "centralised", "settings"} <= set(result) and "forgetting" not in result
    assert len(result["cells"]) == 4
    assert {(c["strategy"], c["partition"]) for c in result["cells"]} == {
        (s, p) for s in ("fedavg", "fedavgm") for p in ("iid", "skew-high")
    }
    for cell in result["cells"]:
        assert {"strategy", "partition", "mean_ks", "dice", "bytes_sent", "messages"} <= set(cell)
        assert 0 <= cell["dice"] <= 1 and cell["bytes_sent"] > 0
        rounds = json.loads((out / cell["cell"] / "metrics.json").read_text())["rounds"]
        sent = [res for r in rounds for res in r["sites"].values()]
        assert len(sent) == 2 * 2 and cell["messages"] == sum(res.get("messages", 1) for res in sent) >= 4
        if any("bytes_received" in res for res in sent):
            assert cell["bytes_received"] == sum(res.get("bytes_received") or 0 for res in sent) > 0
    ks = {c["partition"]: c["mean_ks"] for c in result["cells"]}
    assert ks["skew-high"] == pytest.approx(1.0) and ks["iid"] < 1
    assert set(result["centralised"]) == {"iid", "skew-high"}
    assert all(0 <= v <= 1 for v in result["centralised"].values())
    assert {k: result["settings"][k] for k in ("rounds", "sites", "seed", "data")} == {
        "rounds": 2, "sites": 2, "seed": 0, "data": None,
    }  # fmt: skip
    # the baselines ran once per partition, on the first strategy's cell
    with_baselines = [p.parent.name for p in (out / "cells").glob("*/baselines")]
    assert sorted(with_baselines) == ["fedavg__iid", "fedavg__skew-high"]
    report = (out / "report.md").read_text()
    assert "| fedavgm |" in report and "*centralised*" in report and "skew-high (KS 1.00)" in report
    assert "What the default data can and cannot show" in report
    assert (out / "figures" / "dice_vs_ks.png").stat().st_size > 1000

    # a second call trains nothing; one interrupted cell (its metrics.json gone, checkpoints kept) is resumed
    settings = settings_from_args(build_compare_parser().parse_args(_flags(tiny_compare_bundle, out, *GRID)))
    before, calls = _cells_metrics(out), []

    def record(argv: list[str]) -> int:
        calls.append(argv)
        from monai_fedpriv.cli.simulate import simulate_main

        return simulate_main(argv)

    again = run_grid(settings, run_cell=record, log=lambda line: None)
    assert calls == [] and _cells_metrics(out) == before
    assert again["cells"] == result["cells"]
    (cell_dir(out, "fedavgm", "iid") / "metrics.json").unlink()
    resumed = run_grid(settings, run_cell=record, log=lambda line: None)
    assert len(calls) == 1 and "--resume" in calls[0] and "--baselines" not in calls[0]
    assert resumed["cells"] == result["cells"]

    # the same folder with other settings, or a folder holding something else, is refused naming --output
    assert main(["compare", *_flags(tiny_compare_bundle, out, *GRID, "--seed", "1")]) == 2
    assert "--output" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["compare", *_flags(tiny_compare_bundle, other, *GRID)]) == 2
    assert "--output" in capsys.readouterr().err and not (other / "compare.json").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--strategies", "fedavg,fedavgx"], ["--strategies", "fedavgx"]),
        (["--partitions", "iid,skew-huge"], ["--partitions", "skew-huge"]),
        (["--strategies", ""], ["--strategies"]),
        (["--prox-mu", "0.01"], ["--prox-mu", "fedprox"]),
    ],
)
def test_bad_grid_flags_are_one_error_naming_the_flag(tiny_compare_bundle, tmp_path, capsys, flags, named):
    out = tmp_path / "cmp"
    assert main(["compare", *_flags(tiny_compare_bundle, out, "--strategies", "fedavg"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(n in err for n in named), err
    assert not out.exists()


def test_cell_flags_pass_strategy_options_to_their_strategy_only(tmp_path):
    args = build_compare_parser().parse_args(
        ["b", "--output", str(tmp_path / "o"), "--strategies", "fedavg,fedprox,fedavg-share,cwt", "--prox-mu", "0.01",
         "--share-data-fraction", "0.05", "--override", "a=1", "--override", "b=2", "--local-epochs", "2"]
    )  # fmt: skip
    s = settings_from_args(args)
    assert strategy_flags("fedavg", s) == [STRATEGY_FLAG, "fedavg"]
    assert strategy_flags("cwt", s) == [STRATEGY_FLAG, "cwt"]
    assert strategy_flags("fedprox", s) == [STRATEGY_FLAG, "fedprox", "--prox-mu", "0.01"]
    assert strategy_flags("fedavg-share", s) == [STRATEGY_FLAG, "fedavg-share", "--share-data-fraction", "0.05"]
    argv = cell_argv(s, "fedavg", "skew-mid", baselines=True)
    assert "--prox-mu" not in argv and "--share-data-fraction" not in argv and "--resume" not in argv
    assert argv[argv.index("--partition") + 1] == "skew-mid" and argv.count("--override") == 2
    assert argv[argv.index("--output") + 1] == str(tmp_path / "o" / "cells" / "fedavg__skew-mid")
    assert "--baselines" in argv and "--local-epochs" in argv and "--no-report" in argv


def _cwt_metrics() -> dict:
    """Three sites trained one per round in the order 1, 2, 3, 1; per_site = the model's Dice after the round."""
    dice = {1: (0.9, 0.5, 0.2), 2: (0.6, 0.8, 0.3), 3: (0.3, 0.4, 0.95), 4: (0.92, 0.55, 0.25)}
    sites = ["site-1", "site-2", "site-3"]
    rounds = [
        {
            "round": r,
            "sites": {sites[(r - 1) % 3]: {"bytes_sent": 100, "local_steps": 2}},
            "global": {"dice": sum(d) / 3, "per_site": dict(zip(sites, d, strict=True))},
        }
        for r, d in dice.items()
    ]
    final = {"global_dice": sum(dice[4]) / 3, "rounds_completed": 4, "global_dice_per_site": {}}
    return {"config": {"sites": sites}, "rounds": rounds, "final": final, "partition": {"mean_ks": 0.5}}


def test_forgetting_matrix_rows_are_the_last_round_each_site_trained():
    m = _cwt_metrics()
    assert forgetting_matrix(m) == [[0.92, 0.55, 0.25], [0.6, 0.8, 0.3], [0.3, 0.4, 0.95]]
    m["rounds"] = m["rounds"][:2]  # site-3 never trained: a row of None
    assert forgetting_matrix(m)[2] == [None, None, None]
    m["rounds"][0]["sites"]["site-2"] = {}
    with pytest.raises(ValueError, match="round 1 trained 2 sites"):
        forgetting_matrix(m)


def test_summarise_cell_counts_messages_and_bytes():
    m = _cwt_metrics()
    assert summarise_cell(m) | {"dice_per_site": None} == {
        "mean_ks": 0.5, "dice": pytest.approx(1.72 / 3), "bytes_sent": 400, "bytes_received": None, "messages": 4,
        "rounds_completed": 4, "dice_per_site": None, "sites": ["site-1", "site-2", "site-3"],
    }  # fmt: skip
    for r in m["rounds"]:
        for res in r["sites"].values():
            res.update(messages=2, bytes_received=50, bytes_sent=None)
    got = summarise_cell(m)
    assert (got["messages"], got["bytes_received"], got["bytes_sent"]) == (8, 200, 0)


def test_compare_with_mlflow_logs_a_run_per_cell_and_the_grid_into_one_store(tiny_compare_bundle, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "cmp"
    grid = ["--strategies", "fedavg,fedprox", "--partitions", "iid", "--tracking", "mlflow"]
    assert main(["compare", *_flags(tiny_compare_bundle, out, *grid)]) == 0
    result = json.loads((out / "compare.json").read_text())
    client = mlflow.tracking.MlflowClient("sqlite:///" + str(out.resolve() / "mlruns.db"))
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("monai_fedpriv")
                                                            .experiment_id])}  # fmt: skip
    assert set(runs) == {"fedavg__iid", "fedprox__iid", "compare cmp"}
    for cell in result["cells"]:
        run = runs[f"{cell['strategy']}__{cell['partition']}"]
        dice = client.get_metric_history(run.info.run_id, "global/dice")
        assert max(m.step for m in dice) == 2 and run.info.status == "FINISHED"
        grid_dice = client.get_metric_history(runs["compare cmp"].info.run_id,
                                              f"final_dice/{cell['strategy']}/{cell['partition']}")  # fmt: skip
        assert [m.value for m in grid_dice] == [cell["dice"]]
    assert "compare.json" in {a.path for a in client.list_artifacts(runs["compare cmp"].info.run_id)}
    assert main(["compare", *_flags(tiny_compare_bundle, out, *grid)]) == 0  # a rerun: the same runs, no repeats
    again = client.search_runs([client.get_experiment_by_name("monai_fedpriv").experiment_id])
    assert len(again) == 3
    assert len(client.get_metric_history(runs["compare cmp"].info.run_id, "final_dice/fedavg/iid")) == 1
