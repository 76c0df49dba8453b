"""Experiment tracking: what ``--tracking mlflow|tensorboard`` logs is what ``metrics.json`` says, read back with
MLflow's own client and TensorBoard's own event reader; resumes continue the run; bundle runs with MONAI's own
tracking get the site's epsilon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_fedpriv.cli import main
from tests.conftest import write_tiny_bundle

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_earlier_tests(monkeypatch):
    """``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``, which a run honours: every test starts
    without it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri("")


@pytest.fixture(scope="module")
def bundle(tiny_data, tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("tracking") / "tiny_bundle", tiny_data)


# DP-SGD with a budget that the tiny data set does not exhaust in two rounds
PRIVATE = ("--privacy", "custom", "--noise-multiplier", "1.5", "--max-grad-norm", "1.0", "--epsilon-budget", "100")


def simulate(bundle: Path, out: Path, *extra: str) -> dict:
    argv = ["simulate", str(bundle), "--sites", "2", "--rounds", "2", "--local-steps", "2", "--partition", "iid",
            "--config-files", "train.json", "tiny.json", "--output", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def only_run(uri: str, experiment: str = "monai_fedpriv"):
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment])
    assert len(runs) == 1
    return runs.iloc[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def same_series(logged: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float = 1e-9) -> bool:
    """Same steps, values equal within ``rel`` (TensorBoard stores float32)."""
    return [s for s, _ in logged] == [s for s, _ in expected] and \
        [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=rel)  # fmt: skip


def per_round(metrics: dict, site: str, *path: str) -> list[tuple[int, float]]:
    out = []
    for record in metrics["rounds"]:
        value = record["sites"].get(site)
        for key in path:
            value = None if value is None else value.get(key)
        if value is not None:
            out.append((record["round"], value))
    return out


def test_mlflow_run_holds_epsilon_per_round_and_site_dice_bytes_rejections_settings_and_files(bundle, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    metrics = simulate(bundle, out, *PRIVATE, "--inject-fault", "site-2:nan:2", "--tracking", "mlflow")
    uri = "sqlite:///" + str(out.resolve() / "mlruns.db")
    run = only_run(uri)
    assert run.status == "FINISHED" and run["tags.mlflow.runName"] == "run"
    client = MlflowClient(uri)
    for site in ("site-1", "site-2"):
        eps = per_round(metrics, site, "privacy", "epsilon")
        assert len(eps) == 2 and same_series(history(client, run.run_id, f"{site}/epsilon"), eps)
        assert history(client, run.run_id, f"{site}/bytes_sent") == per_round(metrics, site, "bytes_sent")
        budget = per_round(metrics, site, "privacy", "budget")
        assert history(client, run.run_id, f"{site}/epsilon_budget") == budget
    assert same_series(history(client, run.run_id, "global/dice"),
                       [(r["round"], r["global"]["dice"]) for r in metrics["rounds"]])  # fmt: skip
    for cls in metrics["rounds"][-1]["global"]["dice_per_class"]:
        assert len(history(client, run.run_id, f"global/dice/{cls}")) == 2
    assert history(client, run.run_id, "site-2/rejected") == [(1, 0.0), (2, 1.0)]  # the NaN update of round 2
    assert history(client, run.run_id, "global/rejected") == [(1, 0.0), (2, 1.0)]
    reason = metrics["rounds"][1]["sites"]["site-2"]["rejected"]
    events = Path(client.download_artifacts(run.run_id, "events/round-0002/rejected_site-2.txt", str(tmp_path)))
    assert f"rejected/site-2: {reason}" in events.read_text()
    params = client.get_run(run.run_id).data.params
    assert params["strategy.name"] == "fedavg" and params["config.seed"] == "0"
    assert params["privacy.site-1.noise_multiplier"] == "1.5" and params["privacy.site-1.accountant"] == "rdp"
    files = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"metrics.json", "report.md", "figures", "model"} <= files
    assert {a.path for a in client.list_artifacts(run.run_id, "model")} == {"model/model.pt"}
    assert (out / "mlruns").is_dir()  # artifacts next to the store, inside the run folder


def test_tensorboard_events_hold_the_same_values_and_both_trackers_run_at_once(bundle, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    metrics = simulate(bundle, out, *PRIVATE, "--tracking", "mlflow,tensorboard")
    run = only_run("sqlite:///" + str(out.resolve() / "mlruns.db"))
    assert same_series(history(MlflowClient("sqlite:///" + str(out.resolve() / "mlruns.db")), run.run_id,
                               "site-1/epsilon"), per_round(metrics, "site-1", "privacy", "epsilon"))  # fmt: skip
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    for site in ("site-1", "site-2"):
        logged = [(e.step, e.value) for e in events.Scalars(f"{site}/epsilon")]
        assert same_series(logged, per_round(metrics, site, "privacy", "epsilon"), rel=1e-6)  # float32 events
    assert [e.step for e in events.Scalars("global/dice")] == [1, 2]
    assert {"figures/dice_per_round", "figures/segmentations"} <= set(events.Tags()["images"])
    assert "settings/text_summary" in events.Tags()["tensors"]


def test_a_resumed_run_continues_the_same_mlflow_run_without_logging_a_round_twice(bundle, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    simulate(bundle, out, "--tracking", "mlflow")
    first = only_run("sqlite:///" + str(out.resolve() / "mlruns.db"))
    metrics = simulate(bundle, out, "--tracking", "mlflow", "--resume", "--rounds", "3")
    again = only_run("sqlite:///" + str(out.resolve() / "mlruns.db"))
    assert again.run_id == first.run_id and again.status == "FINISHED"
    client = MlflowClient("sqlite:///" + str(out.resolve() / "mlruns.db"))
    logged = history(client, again.run_id, "global/dice")
    assert [step for step, _ in logged] == [1, 2, 3]
    assert same_series(logged, [(r["round"], r["global"]["dice"]) for r in metrics["rounds"]])
    run = client.get_run(again.run_id)
    assert run.data.params["config.rounds"] == "2" and run.data.tags["changed.config.rounds"] == "3"
    # the store no longer holds the run: the resumed part starts a new run that gets every round and the settings
    state = json.loads((out / "tracking.json").read_text())
    (out / "tracking.json").write_text(json.dumps({**state, "run_id": "0" * 32}))
    simulate(bundle, out, "--tracking", "mlflow", "--resume", "--rounds", "4")
    mlflow.set_tracking_uri("sqlite:///" + str(out.resolve() / "mlruns.db"))
    (fresh,) = [r for _, r in mlflow.search_runs(experiment_names=["monai_fedpriv"]).iterrows()
                if r.run_id != first.run_id]  # fmt: skip
    assert fresh["params.config.rounds"] == "4"
    assert [step for step, _ in history(client, fresh.run_id, "global/dice")] == [1, 2, 3, 4]


class _Backend:
    name = "fake"

    def __init__(self) -> None:
        self.scalars_logged: list[tuple[int, dict]] = []
        self.texts_logged: list[tuple[int, dict]] = []
        self.params_logged: list[dict] = []

    def describe(self):
        return {"backend": self.name}

    def params(self, params):
        self.params_logged.append(dict(params))

    def scalars(self, step, values):
        self.scalars_logged.append((step, dict(values)))

    def texts(self, step, texts):
        self.texts_logged.append((step, dict(texts)))

    def artifacts(self, paths):
        pass

    def close(self, status):
        pass


def test_tracker_logs_a_late_score_once_and_nothing_twice(tmp_path):
    """Under NVIDIA FLARE a round's global Dice arrives with the next round's answers: it is logged then, and
    feeding the same metrics again logs nothing."""
    from monai_fedpriv.tracking import RunTracker

    backend = _Backend()
    tracker = RunTracker(backend, tmp_path)
    round1 = {"round": 1, "sites": {"a": {"loss": 1.0, "bytes_sent": 10}}, "global": {"dice": None, "rejected": 0}}
    tracker.update({"config": {"seed": 1}, "strategy": {"name": "fedavg"}, "rounds": [round1]})
    assert backend.scalars_logged == [(1, {"global/rejected": 0.0, "a/loss": 1.0, "a/bytes_sent": 10.0,
                                           "a/rejected": 0.0})]  # fmt: skip
    scored = {**round1, "global": {"dice": 0.5, "rejected": 0}}
    round2 = {"round": 2, "sites": {"a": {"rejected": "bad update"}}, "global": {"dice": None, "rejected": 1}}
    metrics = {"config": {"seed": 1}, "rounds": [scored, round2]}
    tracker.update(metrics)
    assert backend.scalars_logged[1] == (1, {"global/dice": 0.5})
    assert backend.scalars_logged[2] == (2, {"global/rejected": 1.0, "a/rejected": 1.0})
    assert backend.texts_logged == [(2, {"rejected/a": "bad update"})]
    count = len(backend.scalars_logged)
    tracker.update(metrics)
    RunTracker(backend, tmp_path, RunTracker.saved_state(tmp_path, "fake")).update(metrics)  # a resumed process
    assert len(backend.scalars_logged) == count and backend.params_logged == [{"config.seed": "1",
                                                                               "strategy.name": "fedavg"}]


def test_a_failing_backend_is_left_out_and_the_others_go_on(tmp_path, caplog):
    from monai_fedpriv.tracking import RunTracker
    from monai_fedpriv.tracking.backends import FanOut

    class Broken(_Backend):
        name = "broken"

        def scalars(self, step, values):
            raise ConnectionError("server down")

    good, bad = _Backend(), Broken()
    tracker = RunTracker(FanOut([bad, good]), tmp_path)
    rounds = [{"round": r, "sites": {"a": {"loss": float(r)}}, "global": {"dice": 0.1 * r}} for r in (1, 2)]
    tracker.update({"rounds": rounds[:1]})
    tracker.update({"rounds": rounds})
    assert [step for step, _ in good.scalars_logged] == [1, 2]
    assert sum("broken: stopped logging" in r.message for r in caplog.records) == 1


def test_settings_reported_later_are_logged_when_they_appear_and_uris_lose_their_password(tmp_path):
    from monai_fedpriv.tracking import RunTracker, redact

    backend = _Backend()
    tracker = RunTracker(backend, tmp_path)
    one = {"round": 1, "sites": {"a": {"privacy": {"epsilon": 1.0, "delta": 1e-5}}}, "global": {}}
    two = {"round": 2, "sites": {"b": {"privacy": {"epsilon": 2.0, "delta": 1e-5}}}, "global": {}}  # cyclic: b later
    tracker.update({"strategy": {"name": "cwt"}, "rounds": [one]})
    tracker.update({"strategy": {"name": "cwt"}, "rounds": [one, two]})
    assert backend.params_logged == [{"strategy.name": "cwt", "privacy.a.delta": "1e-05"}, {"privacy.b.delta": "1e-05"}]
    assert redact("postgresql://me:secret@db:5432/mlflow?sslmode=require") == "postgresql://***@db:5432/mlflow"
    assert redact("sqlite:////tmp/x/mlruns.db") == "sqlite:////tmp/x/mlruns.db"


def test_tracking_flags_are_checked_before_anything_runs(bundle, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["simulate", str(bundle), "--output", str(out)]
    assert main([*base, "--tracking-uri", "sqlite:///x.db"]) == 2
    assert "--tracking-uri is MLflow's" in capsys.readouterr().err
    assert main([*base, "--tracking", "tensorboard", "--experiment-name", "x"]) == 2
    assert "--experiment-name is MLflow's" in capsys.readouterr().err
    assert main([*base, "--tracking", "mlflow,wandb"]) == 2
    assert "--tracking 'wandb': choose mlflow, tensorboard" in capsys.readouterr().err
    assert main([*base, "--tracking", "mlflow", "--tracking-uri", "ftp://me:pw@host/x"]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri 'ftp://***@host/x': give an MLflow tracking URI" in err and "pw" not in err
    assert main([*base, "--tracking", "mlflow", "--experiment-name", " "]) == 2
    assert "--experiment-name is empty" in capsys.readouterr().err
    import builtins

    real = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError("no mlflow")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    assert main([*base, "--tracking", "mlflow"]) == 2
    assert "pip install 'monai-fedpriv[tracking]'" in capsys.readouterr().err
    assert not out.exists()


def test_a_bundle_run_with_monais_own_mlflow_tracking_logs_the_sites_epsilon(tmp_path):
    """``python -m monai.bundle run ... --tracking mlflow`` adds MONAI's ``MLFlowHandler``; the budget handler puts
    the epsilon spent after each epoch where that handler logs the epoch's metrics."""
    import torch
    from ignite.engine import Events
    from mlflow.tracking import MlflowClient
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS
    from monai.bundle.workflows import ConfigWorkflow

    from monai_fedpriv.bundle.loader import shared_config
    from tests.conftest import BUNDLE_DIR

    data = "$[{'image': torch.rand(1, 32, 32), 'label': torch.randint(0, 3, (1, 32, 32)).float()} for _ in range(16)]"
    overrides = {
        "dataset_dir": "/nonexistent", "datalist": [], "max_epochs": 2, "batch_size": 2, "bundle_root": str(tmp_path),
        "device": "$torch.device('cpu')", "network_def#channels": [4, 8], "network_def#strides": [2],
        "train#dataset": {"_target_": "Dataset", "data": data},
        "validate#dataset": {"_target_": "Dataset", "data": data},
        "dp_regime": "medium", "output_dir": str(tmp_path / "eval"),
    }  # fmt: skip
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_DIR / "configs" / "train.json"), str(shared_config("budget.json")),
                        str(shared_config("dp.json"))])  # fmt: skip
    parser.update(overrides)
    ConfigWorkflow.patch_bundle_tracking(parser, DEFAULT_MLFLOW_SETTINGS)  # what `--tracking mlflow` does
    torch.manual_seed(0)
    trainer = parser.get_parsed_content("train#trainer")
    seen: list[float] = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.metrics["privacy_epsilon"]))
    trainer.run()
    budget = parser.get_parsed_content("privacy_budget")
    uri = parser.get_parsed_content("tracking_uri")
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])[0]
    logged = history(client, run.info.run_id, "privacy_epsilon")
    assert [v for _, v in logged] == pytest.approx(seen) and len(logged) == trainer.state.epoch == 2
    assert logged[-1][1] == pytest.approx(budget.epsilon()) and seen == sorted(seen) and seen[0] > 0
    assert history(client, run.info.run_id, "privacy_budget")[-1][1] == budget.limit
