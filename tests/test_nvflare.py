"""NVIDIA FLARE deployment: an exported job runs in FLARE's simulator and in POC mode (real processes on 127.0.0.1),
trains exactly what the in-process simulator trains, survives a failing site, a poisoned update, a killed site
process and a killed server, and never lets a site pass its budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from monai_fedpriv.cli import main
from monai_fedpriv.fl.nvflare.runner import open_job
from monai_fedpriv.fl.nvflare.settings import JOB_FILE, JobSettings
from tests.conftest import write_tiny_bundle
from tests.test_work_claims import assert_hostile_sites_rejected

pytest.importorskip("nvflare")

CLI = str(Path(sys.executable).parent / "monai-fedpriv")


@pytest.fixture(autouse=True)
def _one_thread_per_process(monkeypatch):
    """FLARE's site processes compute with one thread like this test process (the conftest sets it), so that the
    float sums and the weights match bit for bit (Adam turns tiny differences in a conv bias before a norm, whose
    gradient is rounding noise, into steps of the learning rate)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def bundle(tiny_data, tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("nvflare") / "tiny_bundle", tiny_data)


def run_flags(bundle: Path, rounds: int, *extra: str) -> list[str]:
    work = [] if "--local-epochs" in extra else ["--local-steps", "4"]
    return [str(bundle), "--sites", "3", "--rounds", str(rounds), *work, "--partition", "iid",
            "--config-files", "train.json", "tiny.json", *extra]  # fmt: skip


def export(bundle: Path, job: Path, rounds: int, *extra: str) -> JobSettings:
    assert main(["export-nvflare", *run_flags(bundle, rounds, *extra), "--output", str(job)]) == 0
    return open_job(job)[0]


def simulate(bundle: Path, out: Path, rounds: int, *extra: str) -> dict:
    extra = tuple(f for f in extra if f != "--seeded-noise")  # the simulator seeds its noise by default
    # the in-process reference of a job: the same data, so a ledger store of its own (or it carries the job's epsilon)
    ledgers = ["--ledger-dir", str(out.with_name(out.name + "_ledgers"))]
    assert main(["simulate", *run_flags(bundle, rounds, *extra), "--output", str(out), "--no-report", *ledgers]) == 0
    return json.loads((out / "metrics.json").read_text())


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "federated" / "models" / "model.pt", map_location="cpu")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def job_and_reference(bundle: Path, tmp_path: Path, rounds: int, *method: str) -> tuple[dict, dict]:
    """``(metrics of the exported job run in FLARE's simulator, metrics of the same run in process)``, after
    checking that both trained the same weights."""
    export(bundle, tmp_path / "job", rounds, *method)
    assert main(["run-nvflare", str(tmp_path / "job"), "--simulator", "--output", str(tmp_path / "run"),
                 "--no-report"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    reference = simulate(bundle, tmp_path / "sim", rounds, *method)
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "sim"))
    return metrics, reference


def site_epsilons(metrics: dict) -> dict[str, float]:
    return dict(metrics["rounds"][-1]["global"]["privacy"]["per_site"])


# ---------------------------------------------------------------------------------------------------- export
def test_export_writes_a_byoc_job_with_secure_noise_by_default(bundle, tmp_path):
    settings = export(bundle, tmp_path / "job", 2, "--privacy", "medium", "--min-sites", "2")
    app = tmp_path / "job" / "app"
    server = json.loads((app / "config" / "config_fed_server.json").read_text())
    client = json.loads((app / "config" / "config_fed_client.json").read_text())
    assert server["workflows"][0]["path"] == "monai_fedpriv.fl.nvflare.controller.FedPrivController"
    executor = client["executors"][0]["executor"]["args"]
    assert executor["execution_mode"] == "external_process" and executor["shutdown_timeout"] >= 30
    assert (app / "custom" / "fedpriv_client.py").is_file()
    assert (open_job(tmp_path / "job")[1] / "tiny_bundle" / "configs" / "tiny.json").is_file()
    # nvflare job submit rewrites every .json under custom/ as HOCON ('#' starts a comment): nothing of ours is one
    assert [f.name for f in (app / "custom").rglob("*.json")] == []
    assert settings.secure_noise is True  # deployment: OS entropy unless --seeded-noise
    assert settings.sites == ["site-1", "site-2", "site-3"] and settings.min_sites == 2
    assert "dp.json" in settings.config_files and "budget.json" in settings.config_files
    assert all(settings.data[s]["train"] for s in settings.sites)
    assert export(bundle, tmp_path / "job2", 2, "--seeded-noise").secure_noise is False
    assert export(bundle, tmp_path / "job3", 2, "--noise", "seeded").secure_noise is False


def test_export_refuses_bad_flags_before_writing(bundle, tmp_path, capsys):
    job = tmp_path / "job"
    assert main(["export-nvflare", *run_flags(bundle, 2, "--name", "a b"), "--output", str(job)]) == 2
    assert "--name" in capsys.readouterr().err
    assert main(["export-nvflare", *run_flags(bundle, 2, "--share", "svt", "--momentum", "aggregate"),
                 "--output", str(job)]) == 2  # fmt: skip
    assert not job.exists()
    with pytest.raises(SystemExit):  # simulation-only flags are not flags of a job
        main(["export-nvflare", *run_flags(bundle, 2, "--baselines"), "--output", str(job)])


def test_a_resuming_job_shares_the_fingerprint_and_state_folder_of_the_job_it_continues(bundle, tmp_path, monkeypatch):
    monkeypatch.delenv("MONAI_FEDPRIV_STATE_ROOT", raising=False)
    first = export(bundle, tmp_path / "job", 2, "--privacy", "medium")
    again = export(bundle, tmp_path / "later", 4, "--privacy", "medium", "--resume")
    assert again.resume and not first.resume and again.name != first.name
    assert again.fingerprint() == first.fingerprint() and again.state_root() == first.state_root()
    assert str(first.state_root()).startswith(str(Path.home() / ".monai_fedpriv" / "state"))
    other = export(bundle, tmp_path / "other", 2, "--privacy", "high")
    assert other.state_root() != first.state_root()


def test_a_job_reexported_with_an_edited_config_does_not_resume_the_earlier_state(bundle, tmp_path, monkeypatch):
    import shutil

    monkeypatch.delenv("MONAI_FEDPRIV_STATE_ROOT", raising=False)
    copy = tmp_path / "tiny_bundle"
    shutil.copytree(bundle, copy)
    first = export(copy, tmp_path / "job", 2)
    config = json.loads((copy / "configs" / "tiny.json").read_text())
    (copy / "configs" / "tiny.json").write_text(json.dumps({**config, "learning_rate": 0.5}))
    edited = export(copy, tmp_path / "later", 4, "--resume")
    assert set(first.config_digests) == {"configs/metadata.json", "configs/train.json", "configs/tiny.json",
                                         "custom/fedpriv_client.py", "settings/fedpriv_job.json"}  # fmt: skip
    assert edited.config_digests["configs/tiny.json"] != first.config_digests["configs/tiny.json"]
    assert edited.fingerprint() != first.fingerprint() and edited.state_root() != first.state_root()


def test_job_settings_refuse_unknown_fields_and_fingerprint_ignores_rounds(tmp_path):
    settings = JobSettings(name="j", bundle="b", config_files=["train.json"], overrides={}, rounds=2, sites=["s"])
    settings.save(tmp_path / JOB_FILE)
    again = JobSettings.load(tmp_path / JOB_FILE)
    assert again == settings
    longer = JobSettings(**{**again.__dict__, "rounds": 5})
    assert longer.fingerprint() == settings.fingerprint()
    assert JobSettings(**{**again.__dict__, "seed": 1}).fingerprint() != settings.fingerprint()
    (tmp_path / JOB_FILE).write_text(json.dumps({**json.loads((tmp_path / JOB_FILE).read_text()), "extra": 1}))
    with pytest.raises(Exception, match="unknown fields"):
        JobSettings.load(tmp_path / JOB_FILE)


def test_a_resuming_server_without_its_checkpoint_refuses_instead_of_starting_over(tmp_path):
    from monai_fedpriv.errors import ResumeError
    from monai_fedpriv.fl.nvflare.controller import FedPrivController
    from monai_fedpriv.fl.workflow import RunState

    settings = JobSettings(name="j", bundle="b", config_files=["train.json"], overrides={}, rounds=2, sites=["s"],
                           resume=True)  # fmt: skip
    with pytest.raises(ResumeError, match="no checkpoint"):
        FedPrivController.check_resume(settings, tmp_path / "server")  # a fresh start would make the sites drop state
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    FedPrivController.check_resume(settings, tmp_path / "server")  # there is one: the run loop reads it
    with pytest.raises(ResumeError, match="cannot read the checkpoint"):
        RunState.load(tmp_path / "server" / "checkpoint.pt", settings.describe(), 2)


def test_run_nvflare_refuses_a_folder_that_is_not_a_job(tmp_path, capsys):
    assert main(["run-nvflare", str(tmp_path), "--simulator", "--output", str(tmp_path / "out")]) == 2
    assert "export-nvflare" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- simulator
# not marked slow: the default suite runs one real NVIDIA FLARE job end to end
def test_simulator_job_trains_what_the_in_process_simulator_trains(bundle, tmp_path):
    pytest.importorskip("mlflow")
    export(bundle, tmp_path / "job", 2)
    assert main(["run-nvflare", str(tmp_path / "job"), "--simulator", "--output", str(tmp_path / "run"),
                 "--tracking", "mlflow", "--tracking-uri", "sqlite:///" + str(tmp_path / "run" / "mlruns.db")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    _assert_tracked(tmp_path / "run", metrics)
    reference = simulate(bundle, tmp_path / "sim", 2)
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "sim"))
    dice = [r["global"]["dice"] for r in metrics["rounds"]]
    assert dice == pytest.approx([r["global"]["dice"] for r in reference["rounds"]], abs=1e-5)
    assert dice[-1] > dice[0]  # the global model improves
    assert metrics["final"]["rounds_completed"] == 2 and metrics["nvflare"]["mode"] == "simulator"
    assert (tmp_path / "run" / "report.md").is_file()
    for record in metrics["rounds"]:  # codec bytes crossed the wire and were counted
        assert all(s["bytes_sent"] > 0 for s in record["sites"].values())


def _assert_tracked(run: Path, metrics: dict) -> None:
    """The MLflow run of ``run-nvflare --tracking mlflow`` holds every round's global Dice (which FLARE's sites
    report a round late), each site's bytes, and the report and model."""
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.tracking.MlflowClient("sqlite:///" + str(run / "mlruns.db"))
    (found,) = client.search_runs([client.get_experiment_by_name("monai_fedpriv").experiment_id])
    dice = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, "global/dice"))
    assert dice == [(r["round"], r["global"]["dice"]) for r in metrics["rounds"]]
    sent = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, "site-3/bytes_sent"))
    assert sent == [(r["round"], r["sites"]["site-3"]["bytes_sent"]) for r in metrics["rounds"]]
    assert {"report.md", "model", "metrics.json"} <= {a.path for a in client.list_artifacts(found.info.run_id)}
    assert found.info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("method", [("--strategy", "fedprox", "--prox-mu", "0.5"),
                                    ("--strategy", "cwt", "--local-epochs", "1")])  # CWT sets its own steps
def test_simulator_job_of_a_method_trains_what_the_in_process_run_trains(bundle, tmp_path, method):
    metrics, reference = job_and_reference(bundle, tmp_path, 3, *method)
    assert metrics["strategy"] == reference["strategy"] and metrics["strategy"]["name"] == method[1]
    assert [list(r["sites"]) for r in metrics["rounds"]] == [list(r["sites"]) for r in reference["rounds"]]
    for ours, theirs in zip(metrics["rounds"], reference["rounds"], strict=True):
        for site, entry in ours["sites"].items():
            assert entry["local_steps"] == theirs["sites"][site]["local_steps"]
            assert entry["messages"] == theirs["sites"][site]["messages"] == 2
            assert entry["bytes_received"] == theirs["sites"][site]["bytes_received"]


@pytest.mark.slow
def test_simulator_job_survives_a_failing_site_and_rejects_poisoned_updates(bundle, tmp_path):
    faults = ["--inject-fault", "site-2:crash:2", "--inject-fault", "site-3:nan:3", "--inject-fault",
              "site-1:scale:3", "--min-sites", "1"]  # fmt: skip
    export(bundle, tmp_path / "job", 3, *faults)
    assert main(["run-nvflare", str(tmp_path / "job"), "--simulator", "--output", str(tmp_path / "run"),
                 "--no-report"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    r2, r3 = metrics["rounds"][1], metrics["rounds"][2]
    assert "InjectedFault" in r2["sites"]["site-2"]["rejected"] and r2["global"]["rejected"] == 1
    assert "not finite" in r3["sites"]["site-3"]["rejected"] or "NaN" in r3["sites"]["site-3"]["rejected"]
    assert "median" in r3["sites"]["site-1"]["rejected"] and r3["global"]["rejected"] == 2
    assert "rejected" not in r3["sites"]["site-2"]
    reference = simulate(bundle, tmp_path / "sim", 3, *faults)
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "sim"))
    assert [sorted(r["sites"]) for r in metrics["rounds"]] == [sorted(r["sites"]) for r in reference["rounds"]]


@pytest.mark.slow
def test_a_round_without_enough_answers_fails_the_job_with_the_reason(bundle, tmp_path, capsys):
    export(bundle, tmp_path / "job", 2, "--inject-fault", "site-2:crash:1", "--min-sites", "3")
    code = main(["run-nvflare", str(tmp_path / "job"), "--simulator", "--output", str(tmp_path / "run"),
                 "--no-report"])  # fmt: skip
    assert code == 1
    assert "only 2 of 3" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final"]["rounds_completed"] == 0 and metrics["stopped"]["round"] == 1


# ---------------------------------------------------------------------------------------------------- POC
def _poc_processes(out: Path, role: str) -> list[int]:
    """PIDs of the POC job processes of ``role`` (``server`` or a site name) under ``out``."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    marker = "server.runner_process" if role == "server" else "client.worker_process"
    return [int(line.split()[0]) for line in table.splitlines()[1:]
            if marker in line and str(out) in line and (role == "server" or f"-c {role} " in line)]  # fmt: skip


def _run_and_kill(job: Path, out: Path, role: str, when, resume: bool) -> subprocess.CompletedProcess:
    """``run-nvflare --poc`` in a child process; ``kill -9`` the job process of ``role`` once ``when()`` holds."""
    cmd = [CLI, "run-nvflare", str(job), "--poc", "--output", str(out), "--no-report", *(["--resume"] * resume)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while not when():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the job never reached the point to kill it"
        time.sleep(0.3)
    pids = _poc_processes(out.resolve(), role)
    assert pids, f"no job process of {role}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


def _server_rounds(out: Path) -> int:
    try:
        return len(json.loads((out / "state" / "server" / "metrics.json").read_text())["rounds"])
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
def test_poc_job_resumes_after_a_killed_site_and_a_killed_server(bundle, tmp_path):
    """Real processes on 127.0.0.1: a site's job process killed in round 2 fails the job (FLARE's behaviour); the
    resumed job continues after round 1; its server killed after two sites answered round 3 fails it again; the
    next resume sends those sites' saved round-3 answers again (no new release), site-2 trains round 3, and the
    job finishes. Weights and every site's epsilon equal
    an uninterrupted in-process run with the same seeds (DP-SGD, seeded noise), and no site passes its budget."""
    flags = ("--privacy", "medium", "--epsilon-budget", "100", "--seeded-noise")
    stalls = ("--inject-fault", "site-2:stall:2", "--inject-fault", "site-2:stall:3", "--min-sites", "3")
    export(bundle, tmp_path / "job", 3, *flags, *stalls)
    out = tmp_path / "run"

    # site-2 is slow in round 2 (a 10 s stall): its job process is killed then
    first = _run_and_kill(tmp_path / "job", out, "site-2", lambda: _server_rounds(out) >= 1, resume=False)
    assert first.returncode == 1, first.stdout
    assert "--resume continues" in first.stdout
    assert json.loads((out / "metrics.json").read_text())["final"]["rounds_completed"] == 1

    # resumed: round 2 completes; in round 3 sites 1 and 3 answer, site-2 stalls, and the server is killed
    answered = lambda: all((out / "state" / s / "round_3.pt").is_file() for s in ("site-1", "site-3"))  # noqa: E731
    second = _run_and_kill(tmp_path / "job", out, "server", answered, resume=True)
    assert second.returncode == 1, second.stdout
    assert json.loads((out / "metrics.json").read_text())["final"]["rounds_completed"] == 2

    third = subprocess.run([CLI, "run-nvflare", str(tmp_path / "job"), "--poc", "--output", str(out), "--resume"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert third.returncode == 0, third.stdout + third.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["rounds_completed"] == 3 and metrics["nvflare"]["status"] == "FINISHED:COMPLETED"
    assert metrics["noise_source"] == "seeded (simulation only)" or "seed" in metrics["noise_source"]
    reference = simulate(bundle, tmp_path / "sim", 3, *flags)
    assert_same_weights(weights(out), weights(tmp_path / "sim"))
    assert site_epsilons(metrics) == pytest.approx(site_epsilons(reference), rel=1e-9)
    for site, eps in site_epsilons(metrics).items():
        budget = metrics["rounds"][-1]["sites"][site]["privacy"]["budget"]
        assert eps <= budget
    dice = [r["global"]["dice"] for r in metrics["rounds"]]
    assert dice[-1] > dice[0]


@pytest.mark.slow
def test_simulator_job_rejects_malformed_bytes_and_an_overclaim_and_aggregates_the_others(bundle, tmp_path):
    """Issue 16: one site answers with bytes whose header claims an overflowing shape, one claims 1e12 local steps;
    the controller rejects both with the reason and aggregates the third, exactly as the in-process simulator."""
    faults = ["--inject-fault", "site-2:bytes:1", "--inject-fault", "site-3:overclaim:1", "--min-sites", "1"]
    export(bundle, tmp_path / "job", 2, *faults)
    assert main(["run-nvflare", str(tmp_path / "job"), "--simulator", "--output", str(tmp_path / "run"),
                 "--no-report"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert_hostile_sites_rejected(metrics, asked_steps=4)
    reference = simulate(bundle, tmp_path / "sim", 2, *faults)
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "sim"))
    in_process = [r["sites"][s].get("rejected") for r in reference["rounds"] for s in ("site-2", "site-3")]
    r1 = metrics["rounds"][0]["sites"]
    assert in_process == [r1["site-2"]["rejected"], r1["site-3"]["rejected"], None, None]


@pytest.mark.slow
def test_a_second_job_on_the_same_data_starts_from_the_epsilon_the_first_spent(bundle, tmp_path, capsys):
    """The sites' ledger store outlives jobs: a new job on the same cases carries what the first released, never
    passes the budget; a rerun into a used run folder is refused and changes nothing."""
    svt = ["--share", "svt", "--svt-epsilon", "1", "--svt-epsilon3", "1", "--epsilon-budget", "7", "--seeded-noise"]
    store = ["--ledger-dir", str(tmp_path / "site_ledgers")]
    export(bundle, tmp_path / "job", 2, *svt)
    runs = {}
    for name, extra in (("first", []), ("second", [])):
        assert main(["run-nvflare", str(tmp_path / "job"), "--simulator", "--output", str(tmp_path / name),
                     "--no-report", *store, *extra]) == 0  # fmt: skip
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    first = [[s["privacy"]["epsilon"] for s in r["sites"].values()] for r in runs["first"]["rounds"]]
    assert first == [[2.0] * 3, [4.0] * 3]
    second = runs["second"]["rounds"]
    assert [s["privacy"]["epsilon"] for s in second[0]["sites"].values()] == [6.0] * 3  # 4 carried + 2
    assert all(s["privacy"]["epsilon"] <= 7.0 for r in second for s in r["sites"].values() if "privacy" in s)
    assert all(s["privacy"]["carried_epsilon"] == 4.0 for s in second[0]["sites"].values())
    before = {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["run-nvflare", str(tmp_path / "job"), "--simulator", "--output", str(tmp_path / "first")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file()} == before


def test_only_the_sites_own_environment_starts_a_fresh_budget(tmp_path, monkeypatch):
    """A job carries no fresh-budget switch: the site reads MONAI_FEDPRIV_FRESH_BUDGET and its store from its own
    environment (run-nvflare --fresh-budget / --ledger-dir set them for the sites it starts)."""
    from types import SimpleNamespace

    from monai_fedpriv.cli.nvflare import _site_environment
    from monai_fedpriv.fl.nvflare import client

    seen = {}

    def bind(store, run_id, cases, fresh, resumed):
        seen.update(root=store.root, fresh=fresh, cases=cases, resumed=resumed)

    site = SimpleNamespace(name="site-1", train=[{"image": "a.nii.gz"}],
                           site=SimpleNamespace(bind_ledger_store=bind, setup={}))  # fmt: skip
    store = client.SiteStateStore(tmp_path / "state")
    monkeypatch.delenv("MONAI_FEDPRIV_FRESH_BUDGET", raising=False)
    client._bind_ledger(site, store, resumed=False)
    assert seen["fresh"] is False and seen["cases"] == site.train
    with _site_environment(tmp_path / "ledgers", fresh=True):
        client._bind_ledger(site, store, resumed=True)
        assert seen == {"root": (tmp_path / "ledgers").resolve(), "fresh": True, "cases": site.train, "resumed": True}
    assert "MONAI_FEDPRIV_FRESH_BUDGET" not in os.environ
    assert store.run_id() == store.run_id() and (tmp_path / "state" / "run_id").is_file()
    first = store.run_id()
    store.clear()  # a new federation is a new run in the store
    assert store.run_id() != first



def test_a_resumed_site_restores_what_it_saved_whenever_the_server_last_asked_it(tmp_path):
    """Cyclic weight transfer leaves a site's latest state older than the server's round, and a site the server
    never asked may have none; whatever a site saved (its ledger above all) is restored, a stale one is refused."""
    from types import SimpleNamespace

    from monai_fedpriv.errors import ResumeError
    from monai_fedpriv.fl.nvflare.client import SiteStateStore, _restore

    loaded = []
    runtime = SimpleNamespace(load_state_dict=lambda state, _: loaded.append(state), snapshot=lambda: {"snap": 1})
    site = SimpleNamespace(name="site-2", max_epochs=4, site=runtime)
    store = SiteStateStore(tmp_path / "site-2")
    assert _restore(site, store, 3, {"last_trained": {"site-1": 3}}) is None  # never asked, nothing saved: it joins
    with pytest.raises(ResumeError, match="no saved state"):
        _restore(site, store, 3, {"last_trained": {"site-2": 2}})  # asked in round 2 but saved nothing
    store.save(2, {"active": True, "round": 2}, b"bytes", {"round": 2})
    snapshot, replay = _restore(site, store, 3, {"last_trained": {"site-2": 2}})  # CWT: its turn was round 2
    assert loaded[-1]["round"] == 2 and replay is None and snapshot == {"snap": 1}
    assert _restore(site, store, 3, {"last_trained": {}}) is not None  # saved state is restored even if not listed
    with pytest.raises(ResumeError, match="last saved state is of round 2"):
        _restore(site, store, 4, {"last_trained": {"site-2": 4}})  # the server saw round 4 from it: stale
    store.save(4, {"active": True, "round": 4}, b"again", {"round": 4})
    _, replay = _restore(site, store, 3, {"last_trained": {"site-2": 2}})  # answered round 4 before the kill
    assert replay == (4, b"again", {"round": 4})


@pytest.mark.slow
def test_simulator_job_of_fedreplay_trains_what_the_in_process_run_trains(bundle, tmp_path):
    method = ("--strategy", "fedreplay", "--latents-unprotected", "--local-epochs", "1")
    metrics, reference = job_and_reference(bundle, tmp_path, 4, *method)
    assert metrics["upload"].keys() == reference["upload"].keys() == {"site-1", "site-2", "site-3"}
    for site, facts in metrics["upload"].items():
        assert facts["items"] == reference["upload"][site]["items"] and facts["protected"] is False
        assert facts["bytes"] == reference["upload"][site]["bytes"]
    assert [("server" in r) for r in metrics["rounds"]] == [False, False, True, True]


@pytest.mark.slow
def test_simulator_job_of_cwt_replay_trains_what_the_in_process_run_trains(tmp_path):
    from monai_fedpriv.data.synthetic import write_brats_folder

    data = write_brats_folder(tmp_path / "BraTS", 6, shape=(16, 16, 16), institutions=("CBICA", "TCIA_08"))
    flair = Path(__file__).resolve().parents[1] / "bundles" / "brain_tumour_2d_flair"
    flags = [str(flair), "--data", str(data), "--sites", "2", "--rounds", "4", "--strategy", "cwt-replay",
             "--latents-unprotected", "--override", "patch_size=[32,32]", "--override", "batch_size=4"]  # fmt: skip
    assert main(["export-nvflare", *flags, "--output", str(tmp_path / "job")]) == 0
    assert main(["run-nvflare", str(tmp_path / "job"), "--simulator", "--output", str(tmp_path / "run"),
                 "--no-report"]) == 0  # fmt: skip
    assert main(["simulate", *flags, "--output", str(tmp_path / "sim"), "--no-report"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    reference = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "sim"))
    assert [list(r["sites"]) for r in metrics["rounds"]] == [["site-1"], ["site-2"], ["site-1"], ["site-2"]]
    for site, facts in metrics["upload"].items():
        assert facts["kind"] == "generator" and facts["items"] == reference["upload"][site]["items"]
        assert facts["bytes"] == reference["upload"][site]["bytes"]


@pytest.mark.slow
def test_simulator_job_with_secure_aggregation_trains_what_the_in_process_run_trains(bundle, tmp_path):
    """The four stages as FLARE tasks: the server sees only the sum, and the job ends with the in-process weights
    (fresh keys each round; the sum, the rounding and the seeded noise are the same)."""
    flags = ("--secure-aggregation", "--max-update-norm", "5", "--distributed-dp", "--noise-multiplier", "0.5",
             "--epsilon-budget", "500", "--seeded-noise", "--inject-fault", "site-3:drop-after-send:2")  # fmt: skip
    metrics, reference = job_and_reference(bundle, tmp_path, 2, *flags)
    assert metrics["secure_aggregation"] == reference["secure_aggregation"]
    for ours, theirs in zip(metrics["rounds"], reference["rounds"], strict=True):
        assert ours["secure_aggregation"]["server_saw"] == "sum"
        assert ours["secure_aggregation"]["survivors"] == theirs["secure_aggregation"]["survivors"]
    assert metrics["rounds"][1]["secure_aggregation"]["left_after_sending"] == ["site-3"]  # its input still counts
    assert site_epsilons(metrics) == pytest.approx(site_epsilons(reference), rel=1e-9)
