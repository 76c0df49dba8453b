"""``monai-fedpriv export-nvflare`` (a federated run of a bundle as an NVIDIA FLARE 2.9 job) and
``monai-fedpriv run-nvflare`` (run such a job here, in FLARE's simulator or in POC mode, and write the same
``metrics.json`` and report as ``simulate``)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from monai_fedpriv.cli.options import OptionError
from monai_fedpriv.cli.run_flags import add_run_flags
from monai_fedpriv.cli.tracking import add_tracking_flags, check_tracking_flags

__all__ = ["export_main", "run_nvflare_main"]

_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


#: strategies an exported job cannot run yet, and why (one line each)
NOT_ON_FLARE = {
    "splitnn": "SplitNN exchanges features and gradients every batch, and this job's NVIDIA FLARE Client API loop "
    "exchanges one model per task; run SplitNN with monai-fedpriv simulate.",
}


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="monai-fedpriv export-nvflare",
        description="Write a federated run of a MONAI bundle as an NVIDIA FLARE 2.9 job folder: every site runs the "
        "bundle's trainer with the project's sync handler and privacy filters, the server runs the project's "
        "strategy. Run it with monai-fedpriv run-nvflare, or submit it to a provisioned federation.",
    )
    args = add_run_flags(p, deploy=True).parse_args(argv)
    name = args.name or args.output.name
    if not _JOB_NAME.match(name):
        raise OptionError(f"--name {name!r}: a job name is letters, digits, '_', '.' and '-' (at most 64).")
    from monai_fedpriv.cli.plan import plan_run
    from monai_fedpriv.fl.nvflare.job import export_job, exported_job_digest

    if args.strategy in NOT_ON_FLARE:
        raise OptionError(f"--strategy {args.strategy}: {NOT_ON_FLARE[args.strategy]}")
    if args.secure_aggregation and args.resume:  # a site's keys die with its process: a stage cannot be resent
        raise OptionError("--resume of a job with --secure-aggregation is not supported yet: a resumed site would "
                          "have to rejoin a round's key exchange it had already answered. Nothing was written.")
    plan = plan_run(args, log=lambda line: print(line, flush=True))
    settings = dataclasses.replace(plan.settings, name=name)  # config_digests: export_job takes them from its files
    job = export_job(settings, args.bundle_dir, args.output)
    noise = "seeded from --seed (simulation only)" if args.noise == "seeded" else "from OS entropy"
    print(f"job: {job} ({len(settings.sites)} sites {', '.join(settings.sites)}; {args.rounds} rounds; privacy "
          f"noise {noise})")  # fmt: skip
    print(f"job digest: {exported_job_digest(job)} (a site that pins jobs lists it in $MONAI_FEDPRIV_ACCEPT_JOBS)")
    print(f"run it here: monai-fedpriv run-nvflare {job} --simulator --output DIR")
    return 0


def build_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="monai-fedpriv run-nvflare",
        description="Run a job written by export-nvflare on this machine, in NVIDIA FLARE's simulator or in POC mode "
        "(server and sites as separate processes on 127.0.0.1); writes DIR/metrics.json and DIR/report.md.",
    )
    p.add_argument("job_dir", type=Path, help="the job folder (from monai-fedpriv export-nvflare)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--simulator", action="store_true", help="NVFlare's simulator (one process per site)")
    mode.add_argument("--poc", action="store_true", help="POC mode: a server and N sites on 127.0.0.1")
    p.add_argument("--output", type=Path, required=True, help="run directory (metrics.json, report.md, state/)")
    p.add_argument("--resume", action="store_true", help="a new job that continues after the last completed round")
    p.add_argument("--timeout", type=int, default=None, help="seconds to wait for the job (default: rounds x the "
                   "job's round timeout + 10 minutes)")  # fmt: skip
    p.add_argument("--no-report", action="store_true", help="skip report.md and figures")
    add_tracking_flags(p)
    p.add_argument("--ledger-dir", type=Path, default=None, help="the sites' ledger store on this machine (sets "
                   "$MONAI_FEDPRIV_LEDGER_DIR for them; default theirs, else ~/.monai_fedpriv/ledgers)")  # fmt: skip
    p.add_argument("--fresh-budget", action="store_true", help="the sites start their budgets at zero although earlier "
                   "runs spent epsilon on the same cases (sets MONAI_FEDPRIV_FRESH_BUDGET=1 for them)")  # fmt: skip
    return p


def run_nvflare_main(argv: list[str]) -> int:
    args = build_run_parser().parse_args(argv)
    check_tracking_flags(args)
    from monai_fedpriv.cli.simulate import refuse_used_output
    from monai_fedpriv.fl.nvflare.runner import open_job

    settings, unpacked = open_job(args.job_dir)
    out = Path(args.output).resolve()
    refuse_used_output(out, args.resume)
    with _site_environment(args.ledger_dir, args.fresh_budget):
        return _run_job(args, settings, unpacked, out)


@contextlib.contextmanager
def _site_environment(ledger_dir: Path | None, fresh: bool) -> Iterator[None]:
    """What the sites this command starts on this machine read from their environment: where their ledger store
    is and whether they start a fresh budget (a deployed site's operator sets these; a job cannot)."""
    from monai_fedpriv.privacy.ledger_store import FRESH_ENV, LEDGER_ENV

    saved = {k: os.environ.get(k) for k in (LEDGER_ENV, FRESH_ENV)}
    if ledger_dir is not None:
        os.environ[LEDGER_ENV] = str(Path(ledger_dir).expanduser().resolve())
    if fresh:
        os.environ[FRESH_ENV] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_job(args: argparse.Namespace, settings: Any, unpacked: Path, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    server_dir = out / "state" / "server"
    resume = args.resume and (server_dir / "checkpoint.pt").is_file()
    if args.resume and not resume:
        print(f"--resume: no checkpoint in {server_dir}, starting at round 1", flush=True)
    job_dir = Path(args.job_dir)
    if resume:
        from monai_fedpriv.fl.nvflare.runner import resumed_job

        job_dir = resumed_job(job_dir, out / "resume_job")
    else:
        shutil.rmtree(out / "state", ignore_errors=True)
    from monai_fedpriv.cli.tracking import run_artifacts, start_tracker

    tracker = start_tracker(args, out, resume)
    try:
        metrics = _run_and_collect(args, settings, unpacked, out, resume, job_dir, tracker)
    except BaseException as exc:
        if tracker is not None:
            tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.cli.simulate import finish_run

    bundle = BundleSpec(unpacked / settings.bundle, tuple(settings.config_files), dict(settings.overrides))
    val = {site: lists.get("val", []) for site, lists in settings.data.items() if lists.get("val")}
    code = finish_run(metrics, bundle, val, out, report=not args.no_report)
    if tracker is not None:
        tracker.finish(metrics, run_artifacts(out))
    return code


def _run_and_collect(args: argparse.Namespace, settings: Any, unpacked: Path, out: Path, resume: bool, job_dir: Path,
                     tracker: Any) -> dict[str, Any]:  # fmt: skip
    """Run the job, following its rounds (and feeding the tracker), and collect its metrics; raises the job's cause
    when it stopped early."""
    server_dir = out / "state" / "server"
    progress = _Progress(server_dir / "metrics.json", settings.rounds, None if tracker is None else tracker.update)
    started = time.perf_counter()
    if args.simulator:
        from monai_fedpriv.fl.nvflare.runner import run_simulator

        code = run_simulator(job_dir, out, on_poll=progress)
        status = "FINISHED" if code == 0 else f"simulator exit code {code}"
    else:
        status = _run_poc(job_dir, args.timeout, settings, out, progress)
    progress()
    if not (server_dir / "metrics.json").is_file():
        _raise_cause(out, settings, f"the job wrote no metrics ({status})", f"See {out}/nvflare_*.log.")
    metrics = _collect(out, settings, status, "simulator" if args.simulator else "poc", time.perf_counter() - started)
    stopped = metrics.get("stopped") or {}
    if "failed_round" in stopped:
        _raise_cause(out, settings, stopped["reason"], f"The job stopped; the last completed round and every site's "
                     f"state are intact in {out}: fix the cause and run-nvflare --resume.")  # fmt: skip
    done = metrics["final"]["rounds_completed"]
    if done < settings.rounds and not stopped:
        _raise_cause(out, settings, f"the job ended after round {done} of {settings.rounds} ({status})", f"See "
                     f"{out}/nvflare_*.log. The completed rounds and every site's state are intact: run-nvflare "
                     "--resume continues.")  # fmt: skip
    return metrics


def _raise_cause(out: Path, settings: Any, fallback: str, hint: str) -> NoReturn:
    """Raise the one-line cause of a failed job found in its metrics and FLARE's logs (:mod:`~monai_fedpriv.fl.
    nvflare.diagnose`): a ``BundleError`` (exit 2) when the job given was at fault (refused at a site, no client
    script, unreadable), else a ``FederationError`` (exit 1) with ``hint``; ``fallback`` when nothing says why."""
    from monai_fedpriv.errors import BundleError, FederationError
    from monai_fedpriv.fl.nvflare.diagnose import failure_cause

    cause = failure_cause(out, list(settings.sites))
    if cause is not None and cause.input_error:
        raise BundleError(cause.message)
    reason = fallback.rstrip(".")
    if cause is not None:  # what the logs add to what the run itself knows
        reason = cause.message if cause.message.startswith(reason) else f"{reason}; {cause.message}"
    raise FederationError(f"{reason.rstrip('.')}. {hint}")


def _run_poc(job_dir: Path, timeout: int | None, settings: Any, out: Path, progress: _Progress) -> str:
    from monai_fedpriv.fl.nvflare.runner import PocRun

    poc = PocRun(len(settings.sites), out, log=lambda line: print(line, flush=True))
    try:
        poc.start()
        job_id = poc.submit(job_dir)
        timeout = timeout or settings.rounds * (settings.round_timeout or 3600) + 600
        watch = _ServerWatch(poc, job_id)

        def poll() -> str | None:
            progress()
            return watch()

        status = poc.wait(job_id, timeout, on_poll=poll)
        print(f"job {job_id}: {status}", flush=True)
        return status
    finally:
        poc.stop()


class _ServerWatch:
    """Notices a server job process that died: FLARE 2.9 then leaves the job RUNNING for good, so the wait is ended
    (after a grace period in which a normally finishing job reports its status) and the job aborted."""

    GRACE_S = 30.0

    def __init__(self, poc: Any, job_id: str) -> None:
        self.poc = poc
        self.job_id = job_id
        self.seen = False
        self.gone_since: float | None = None

    def __call__(self) -> str | None:
        alive = bool(self.poc.job_processes(self.job_id)["server"])
        self.seen = self.seen or alive
        if alive or not self.seen:
            self.gone_since = None
            return None
        self.gone_since = self.gone_since or time.monotonic()
        if time.monotonic() - self.gone_since > self.GRACE_S:
            return "the server's job process is gone and the job never finished"
        return None


class _Progress:
    """Prints one line per round completed, read from the controller's ``metrics.json``."""

    def __init__(self, path: Path, rounds: int, on_metrics: Callable[[dict], None] | None = None) -> None:
        self.path = path
        self.rounds = rounds
        self.on_metrics = on_metrics
        self.shown = 0
        self.mtime = 0.0

    def __call__(self) -> str | None:
        from monai_fedpriv.fl.server.records import progress_cell

        try:
            mtime = self.path.stat().st_mtime
            if mtime == self.mtime:
                return None
            self.mtime = mtime
            metrics = json.loads(self.path.read_text())
            history = metrics.get("rounds", [])
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        for record in history[self.shown :]:
            cells = " | ".join(progress_cell(n, r) for n, r in record["sites"].items())
            print(f"[nvflare] round {record['round']}/{self.rounds} | {cells} | {record['seconds']:.1f}s", flush=True)
        self.shown = max(self.shown, len(history))
        return None


def _collect(out: Path, settings: Any, status: str, mode: str, seconds: float) -> dict[str, Any]:
    """``out/metrics.json`` and ``out/federated/models/model.pt`` from what the controller wrote."""
    from monai_fedpriv.errors import FederationError
    from monai_fedpriv.utils.files import write_json

    server = out / "state" / "server"
    if not (server / "metrics.json").is_file():
        raise FederationError(f"the job wrote no metrics ({status}); see {out}/nvflare_*.log.")
    metrics = json.loads((server / "metrics.json").read_text())
    metrics["nvflare"] = {"mode": mode, "status": status, "seconds": round(seconds, 1)}
    if (server / "models" / "model.pt").is_file():
        (out / "federated" / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy2(server / "models" / "model.pt", out / "federated" / "models" / "model.pt")
    write_json(metrics, out / "metrics.json")
    return metrics
