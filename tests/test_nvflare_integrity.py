"""Job integrity under NVIDIA FLARE: a site runs an exported job only as it was exported (digests of every shipped
config and of the client script) and, when its operator pins jobs, only a job whose digest is listed; a refused job
builds nothing, the server records the site's failure with the reason, and ``run-nvflare`` says why a job failed in
one line."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from monai_fedpriv.cli import main
from monai_fedpriv.fl.nvflare.integrity import ACCEPT_ENV, JobIntegrityError, job_digest, verify_job
from monai_fedpriv.fl.nvflare.runner import open_job
from tests.conftest import write_tiny_bundle

pytest.importorskip("nvflare")



@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(ACCEPT_ENV, raising=False)


@pytest.fixture(scope="module")
def job(tiny_data, tmp_path_factory) -> Path:
    """A tiny exported two-site job of one round (copy it before editing)."""
    root = tmp_path_factory.mktemp("integrity")
    bundle = root / "tiny_bundle"
    write_tiny_bundle(bundle, tiny_data)
    flags = [str(bundle), "--sites", "2", "--rounds", "1", "--local-steps", "2", "--partition", "iid",
             "--config-files", "train.json", "tiny.json", "--output", str(root / "job")]  # fmt: skip
    assert main(["export-nvflare", *flags]) == 0
    return root / "job"


def copy_job(job: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(job, dest)
    return dest


def archive(job: Path) -> Path:
    return job / "app" / "custom" / "fedpriv_job.zip"


def script(job: Path) -> Path:
    return job / "app" / "custom" / "fedpriv_client.py"


def rewrite_archive(job: Path, edit) -> None:
    """Rewrite the job's archive with ``edit(members) -> members`` (``{name: bytes}``)."""
    with zipfile.ZipFile(archive(job)) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members = edit(members)
    with zipfile.ZipFile(archive(job), "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def set_json(name: str, **changes):
    def edit(members):
        return {**members, name: json.dumps({**json.loads(members[name]), **changes}).encode()}

    return edit


def resealed(digests: dict, job: Path) -> dict:
    """``digests`` with the settings digest an editor who rewrites digests would also recompute."""
    import dataclasses

    from monai_fedpriv.fl.nvflare.integrity import SETTINGS_KEY, settings_digest

    out = {k: v for k, v in digests.items() if k != SETTINGS_KEY}
    return {**out, SETTINGS_KEY: settings_digest(dataclasses.replace(open_job(job)[0], config_digests=out))}


def refusal(job: Path) -> str:
    with pytest.raises(JobIntegrityError) as info:
        verify_job(archive(job), script(job))
    message = str(info.value)
    assert message.startswith("job integrity: ") and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------- export
def test_export_records_every_shipped_file_and_prints_the_job_digest(job, tmp_path, capsys):
    import hashlib

    settings, unpacked = open_job(job)
    shipped = {k: v for k, v in settings.config_digests.items() if not k.startswith(("package/", "settings/"))}
    assert set(shipped) == {"configs/metadata.json", "configs/train.json", "configs/tiny.json",
                            "custom/fedpriv_client.py"}  # fmt: skip
    configs = unpacked / "tiny_bundle" / "configs"
    assert shipped["configs/tiny.json"] == hashlib.sha256((configs / "tiny.json").read_bytes()).hexdigest()
    assert shipped["custom/fedpriv_client.py"] == hashlib.sha256(script(job).read_bytes()).hexdigest()
    assert verify_job(archive(job), script(job), accept="").name == settings.name  # the untouched job passes
    # the digest export prints is the one a site computes from what it received
    again = tmp_path / "again"
    flags = [str(unpacked / "tiny_bundle"), "--sites", "2", "--rounds", "1", "--local-steps", "2", "--partition",
             "iid", "--config-files", "train.json", "tiny.json", "--privacy", "medium",
             "--output", str(again)]  # fmt: skip
    capsys.readouterr()
    assert main(["export-nvflare", *flags]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("job digest: ")]
    assert printed and printed[0].split()[2] == job_digest(archive(again), script(again))
    # shared override files merged from the installed package are fingerprinted, not checked as shipped files
    assert {"package/dp.json", "package/budget.json"} <= set(open_job(again)[0].config_digests)
    verify_job(archive(again), script(again), accept="")


# ---------------------------------------------------------------------------------------------------- the site's check
def test_an_edited_config_is_refused_naming_the_file_and_both_digests(job, tmp_path):
    edited = copy_job(job, tmp_path / "job")
    expected = open_job(job)[0].config_digests["configs/tiny.json"]
    rewrite_archive(edited, set_json("tiny_bundle/configs/tiny.json", learning_rate=0.5))
    message = refusal(edited)
    assert message.startswith("job integrity: configs/tiny.json has sha256 ")
    assert message.endswith(f", the job's settings say {expected[:12]}...; refusing to run an edited job.")


def test_missing_extra_and_foreign_files_and_an_edited_client_script_are_refused(job, tmp_path):
    missing = copy_job(job, tmp_path / "missing")
    rewrite_archive(missing, lambda m: {k: v for k, v in m.items() if not k.endswith("metadata.json")})
    assert "configs/metadata.json is missing" in refusal(missing)

    extra = copy_job(job, tmp_path / "extra")
    rewrite_archive(extra, lambda m: {**m, "tiny_bundle/configs/evil.json": b'{"x": "$print(1)"}'})
    assert "configs/evil.json is not one of the job's files" in refusal(extra)

    foreign = copy_job(job, tmp_path / "foreign")
    rewrite_archive(foreign, lambda m: {**m, "evil.py": b"print(1)"})
    assert "holds evil.py, which the job never ships" in refusal(foreign)

    code = copy_job(job, tmp_path / "script")
    script(code).write_text(script(code).read_text() + "\nimport os\n")
    assert "custom/fedpriv_client.py has sha256" in refusal(code)


def test_unreadable_settings_and_configs_are_refused_naming_the_file(job, tmp_path):
    broken = copy_job(job, tmp_path / "broken")
    rewrite_archive(broken, lambda m: {**m, "fedpriv_job.json": m["fedpriv_job.json"][:-20]})
    assert "fedpriv_job.json in custom/fedpriv_job.zip is not valid JSON" in refusal(broken)

    # an editor who also rewrote the digest of a config that no longer parses
    import hashlib

    bad = b'{"learning_rate": '
    careless = copy_job(job, tmp_path / "careless")
    digests = resealed({**open_job(job)[0].config_digests, "configs/tiny.json": hashlib.sha256(bad).hexdigest()}, job)
    rewrite_archive(careless, lambda m: set_json("fedpriv_job.json", config_digests=digests)(
        {**m, "tiny_bundle/configs/tiny.json": bad}))  # fmt: skip
    assert "job integrity: configs/tiny.json is not valid JSON" in refusal(careless)

    blank = copy_job(job, tmp_path / "blank")  # settings stripped of their digests
    rewrite_archive(blank, set_json("fedpriv_job.json", config_digests=resealed({}, job)))
    assert "records no digests" in refusal(blank)

    (tmp_path / "zip").mkdir()
    (tmp_path / "zip" / "fedpriv_job.zip").write_bytes(b"not a zip")
    with pytest.raises(JobIntegrityError, match="cannot be read as a zip archive"):
        verify_job(tmp_path / "zip" / "fedpriv_job.zip", script(job))


def test_a_site_that_pins_jobs_runs_only_the_listed_ones(job, tmp_path):
    digest = job_digest(archive(job), script(job))
    accept = tmp_path / "accepted_jobs.txt"
    accept.write_text(f"# jobs reviewed by the site's IT\n{digest}  # brain, round 1\n")
    assert verify_job(archive(job), script(job), accept=str(accept)).name
    accept.write_text(digest.removeprefix("sha256:").upper() + "\n")  # the bare hex, any case
    verify_job(archive(job), script(job), accept=str(accept))

    # an editor who rewrote the config and the digest in the settings passes the digest check, not the pin
    import hashlib

    edited = copy_job(job, tmp_path / "edited")
    tiny = json.dumps({**json.loads(zipfile.ZipFile(archive(job)).read("tiny_bundle/configs/tiny.json")),
                       "learning_rate": 0.5}).encode()  # fmt: skip
    digests = resealed({**open_job(job)[0].config_digests, "configs/tiny.json": hashlib.sha256(tiny).hexdigest()},
                       job)
    rewrite_archive(edited, lambda m: set_json("fedpriv_job.json", config_digests=digests)(
        {**m, "tiny_bundle/configs/tiny.json": tiny}))  # fmt: skip
    verify_job(archive(edited), script(edited), accept="")
    with pytest.raises(JobIntegrityError, match=rf"job digest sha256:\w+ is not listed in \${ACCEPT_ENV}"):
        verify_job(archive(edited), script(edited), accept=str(accept))
    with pytest.raises(JobIntegrityError, match=rf"\${ACCEPT_ENV}={tmp_path}/none.txt cannot be read"):
        verify_job(archive(job), script(job), accept=str(tmp_path / "none.txt"))


class _FakeFlare:
    """The Client API of one site, serving ``tasks`` (name, global round) and recording the answers."""

    def __init__(self, tasks: list[tuple[str, int]]) -> None:
        self.tasks = list(tasks)
        self.sent: list = []
        self.task_name = ""

    def init(self) -> None:
        pass

    def get_site_name(self) -> str:
        return "site-1"

    def is_running(self) -> bool:
        return bool(self.tasks)

    def receive(self):
        from nvflare.app_common.abstract.fl_model import FLModel

        from monai_fedpriv.fl.codec import encode_global
        from monai_fedpriv.fl.update import GlobalModel

        self.task_name, rnd = self.tasks.pop(0)
        return FLModel(params={"global": encode_global(GlobalModel(rnd, {"w": torch.zeros(2)}))})

    def get_task_name(self) -> str:
        return self.task_name

    def send(self, model) -> None:
        self.sent.append(model)


def test_a_refusing_site_builds_nothing_and_answers_every_task_with_the_reason(job, tmp_path, monkeypatch):
    from monai_fedpriv.fl.nvflare import client, transport

    edited = copy_job(job, tmp_path / "job")
    rewrite_archive(edited, set_json("tiny_bundle/configs/tiny.json", learning_rate=0.5))
    flare = _FakeFlare([("train", 0), ("train", 1), ("validate", 2)])
    monkeypatch.setattr(transport, "require_nvflare", lambda: flare)
    monkeypatch.setattr(sys, "argv", [str(script(edited))])

    def never(*args, **kwargs):
        raise AssertionError("a refused job must build nothing")

    monkeypatch.setattr(client, "_Site", never)
    monkeypatch.setattr(client, "open_job_archive", never)  # not even the job's settings are unpacked
    client.run_site(archive(edited))
    assert [m.meta.get("round") for m in flare.sent] == [1, 2, None] and flare.sent[2].meta["validate"]
    for answer in flare.sent:
        assert answer.params == {} and answer.meta["failed"].startswith("job integrity: configs/tiny.json has sha256")
        assert not answer.meta["failed"].endswith(".")  # joined with "; " into the round's reason


# ---------------------------------------------------------------------------------------------------- run-nvflare
def test_run_nvflare_says_in_one_line_that_the_job_settings_are_broken_json(job, tmp_path, capsys):
    broken = copy_job(job, tmp_path / "job")
    rewrite_archive(broken, lambda m: {**m, "fedpriv_job.json": m["fedpriv_job.json"][:-20]})
    assert main(["run-nvflare", str(broken), "--simulator", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: fedpriv_job.json in ")
    assert "fedpriv_job.zip is not valid JSON" in err


def _log(path: Path, *lines: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"2026-01-01 00:00:00,000 - {line}\n" for line in lines))


def test_the_cause_of_a_failed_run_is_found_in_flares_logs(tmp_path):
    from monai_fedpriv.fl.nvflare.diagnose import failure_cause

    sites = ["site-1", "site-2"]
    ws = tmp_path / "a" / "nvflare_simulator"
    _log(ws / "site-1" / "log.txt", "ExternalProcessBackend - INFO - Traceback (most recent call last):",
         "ExternalProcessBackend - INFO - monai_fedpriv.errors.DataError: image /d/1.nii.gz not found",
         "ClientRunner - ERROR - Stopped ClientRunner due to FATAL_SYSTEM_ERROR")  # fmt: skip
    cause = failure_cause(tmp_path / "a", sites)
    assert cause.message == ("a site's trainer failed: site-1: monai_fedpriv.errors.DataError: image /d/1.nii.gz "
                             "not found")  # fmt: skip
    assert cause.input_error

    ws = tmp_path / "b" / "nvflare_simulator"
    _log(ws / "server" / "log.txt", "ServerRunner - ERROR - [identity=simulator_server] - Exception in workflow "
         "fedpriv_controller: RuntimeError: CUDA out of memory")  # fmt: skip
    cause = failure_cause(tmp_path / "b", sites)
    assert cause.message == "the server's workflow failed: RuntimeError: CUDA out of memory" and not cause.input_error

    # a failed round: the server's reason, with the exception of the site whose trainer died
    state = tmp_path / "c" / "state" / "server"
    state.mkdir(parents=True)
    reason = "only 1 of 2 sites sent an acceptable update in round 1 (at least 2 needed, --min-sites)"
    failed = {"site-2": {"rejected": "no answer: the site's trainer failed (NVFlare error reply)"}}
    stopped = {"round": 1, "reason": reason, "failed_round": {"round": 1, "sites": failed}}
    (state / "metrics.json").write_text(json.dumps({"stopped": stopped}))
    _log(tmp_path / "c" / "nvflare_simulator" / "site-2" / "log.txt",
         "ExternalProcessBackend - INFO - MemoryError: cannot allocate")  # fmt: skip
    cause = failure_cause(tmp_path / "c", sites)
    assert cause.message == f"{reason} (site-2: MemoryError: cannot allocate)" and not cause.input_error
    assert failure_cause(tmp_path / "nothing", sites) is None


@pytest.mark.slow
def test_an_edited_job_is_refused_at_every_site_and_run_nvflare_says_why(job, tmp_path, capsys):
    edited = copy_job(job, tmp_path / "job")
    expected = open_job(job)[0].config_digests["configs/tiny.json"]
    rewrite_archive(edited, set_json("tiny_bundle/configs/tiny.json", learning_rate=0.5))
    code = main(["run-nvflare", str(edited), "--simulator", "--output", str(tmp_path / "run"), "--no-report"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith("error: the job was refused by site-1 and site-2: job integrity: configs/tiny.json has "
                          "sha256 ") and err.endswith(f"the job's settings say {expected[:12]}...; refusing to run "
                                                       "an edited job")  # fmt: skip
    # the server recorded each site's failure with the reason, and no round completed
    metrics = json.loads((tmp_path / "run" / "state" / "server" / "metrics.json").read_text())
    assert metrics["final"]["rounds_completed"] == 0
    for site in ("site-1", "site-2"):
        assert metrics["stopped"]["failed_round"]["sites"][site]["rejected"].startswith("job integrity: configs/tiny")


@pytest.mark.slow
def test_run_nvflare_says_in_one_line_that_the_client_script_is_missing(job, tmp_path, capsys):
    broken = copy_job(job, tmp_path / "job")
    script(broken).unlink()
    code = main(["run-nvflare", str(broken), "--simulator", "--output", str(tmp_path / "run"), "--no-report"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err == ("error: site-1 and site-2 could not start the job's client script (fedpriv_client.py: No such file "
                   "or directory); does the job folder lack app/custom/fedpriv_client.py?")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- review gaps
def test_a_package_shadowed_in_custom_is_refused_and_the_script_ignores_its_folder(job, tmp_path):
    shadow = copy_job(job, tmp_path / "shadow")
    evil = script(shadow).parent / "monai_fedpriv" / "fl" / "nvflare" / "client.py"
    evil.parent.mkdir(parents=True)
    evil.write_text("def main():\n    print('not checked')\n")
    assert refusal(shadow) == ("job integrity: custom/monai_fedpriv/fl/nvflare/client.py is not one of the job's "
                               "files (custom/ holds only fedpriv_client.py and fedpriv_job.zip); refusing to run "
                               "an edited job.")  # fmt: skip
    text = script(job).read_text()
    assert text.index("sys.path[:]") < text.index("from monai_fedpriv")


def test_flares_own_config_rewrite_at_submission_keeps_the_job_digest(job, tmp_path):
    """FLARE adds components to config/config_fed_client.json when a job is submitted, so the job digest covers what
    the author ships (archive and client script), not FLARE's config/ (covered by FLARE's own job signature)."""
    accept = tmp_path / "accepted_jobs.txt"
    accept.write_text(job_digest(archive(job), script(job)) + "\n")
    submitted = copy_job(job, tmp_path / "submitted")
    config = submitted / "app" / "config" / "config_fed_client.json"
    layout = json.loads(config.read_text())
    layout["components"] = [{"id": "auto_log_streamer", "path": "nvflare.app_common.logging.job_log_streamer."
                             "JobLogStreamer", "args": {"log_file_name": "error_log.txt"}}]  # fmt: skip
    config.write_text(json.dumps(layout, indent=4))
    (config.parent / "client_api_config.json").write_text("{}")
    verify_job(archive(submitted), script(submitted), accept=str(accept))


def test_an_edited_override_in_the_settings_is_refused(job, tmp_path):
    edited = copy_job(job, tmp_path / "edited")
    overrides = {**open_job(job)[0].overrides, "train#trainer#max_epochs": "$print('x') or 1"}
    rewrite_archive(edited, set_json("fedpriv_job.json", overrides=overrides))
    message = refusal(edited)
    assert message.startswith("job integrity: fedpriv_job.json has settings digest ")
    assert message.endswith("; refusing to run edited settings.")


def test_flares_own_signature_files_are_not_strays(job, tmp_path):
    """A job submitted through FLARE's admin API arrives with .__nvfl_sig.json in every folder: an honest job."""
    signed = copy_job(job, tmp_path / "signed")
    custom = script(signed).parent
    (custom / ".__nvfl_sig.json").write_text("{}")
    (custom / ".__nvfl_submitter.crt").write_text("cert")
    verify_job(archive(signed), script(signed))
    (custom / "monai_fedpriv.py").write_text("# shadow\n")
    assert refusal(signed).startswith("job integrity: custom/monai_fedpriv.py is not one of the job's files")
