"""Run an exported job on this machine: in NVIDIA FLARE's simulator, or in POC mode (server and sites as separate
processes talking over 127.0.0.1), and collect what the controller wrote.

Both set ``$MONAI_FEDPRIV_STATE_ROOT`` to the run folder's ``state/`` (server and site checkpoints,
``metrics.json``) and put this Python first on ``PATH`` (FLARE starts ``python3``). To resume, run a copy of the
job marked ``resume`` (:func:`resumed_job`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai_fedpriv.fl.nvflare.settings import (
    JOB_ARCHIVE,
    STATE_ENV,
    JobSettings,
    open_job_archive,
    write_job_archive,
)  # fmt: skip

__all__ = ["PocRun", "job_environment", "job_settings", "open_job", "resumed_job", "run_simulator"]


def open_job(job_dir: Path) -> tuple[JobSettings, Path]:
    """The settings of an exported job and the folder its archive was unpacked to (the bundle is in it)."""
    return open_job_archive(Path(job_dir) / "app" / "custom" / JOB_ARCHIVE)


def job_settings(job_dir: Path) -> JobSettings:
    return open_job(job_dir)[0]


def resumed_job(job_dir: Path, dest: Path) -> Path:
    """A copy of the job at ``dest`` (replaced) that continues the federation its state folder holds."""
    settings, unpacked = open_job(job_dir)
    settings.resume = True
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(job_dir, dest)
    write_job_archive(settings, unpacked / settings.bundle / "configs", dest / "app" / "custom" / JOB_ARCHIVE)
    return dest


def job_environment(state_root: Path, home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env[STATE_ENV] = str(Path(state_root).resolve())
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if home is not None:
        env["HOME"] = str(home)
    return env


def _watch(proc: subprocess.Popen, on_poll: Callable[[], str | None] | None, interval: float = 1.0) -> str | None:
    """Wait for ``proc``, calling ``on_poll`` every ``interval`` s; a reason it returns ends the wait (and ``proc``)."""
    while proc.poll() is None:
        time.sleep(interval)
        reason = on_poll() if on_poll is not None else None
        if reason:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            return reason
    return None


def run_simulator(
    job_dir: Path, out: Path, log: Callable[[str], None] = print, on_poll: Callable[[], str | None] | None = None
) -> int:
    """Run the job in FLARE's simulator (one client thread per site, each launching its trainer process); returns
    the simulator's exit code."""
    settings = job_settings(job_dir)
    workspace = Path(out) / "nvflare_simulator"
    shutil.rmtree(workspace, ignore_errors=True)
    cmd = [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", str(Path(job_dir).resolve()),
           "-w", str(workspace), "-c", ",".join(settings.sites), "-t", str(len(settings.sites))]  # fmt: skip
    log(f"NVFlare simulator: {len(settings.sites)} sites, workspace {workspace}, log {out}/nvflare_simulator.log")
    with open(Path(out) / "nvflare_simulator.log", "w") as console:
        proc = subprocess.Popen(cmd, env=job_environment(Path(out) / "state"), stdout=console,
                                stderr=subprocess.STDOUT, cwd=out)  # fmt: skip
        _watch(proc, on_poll)
        return int(proc.returncode)


class PocRun:
    """A POC federation on 127.0.0.1: ``nvflare poc prepare/start``, ``job submit/wait/download``, ``poc stop``."""

    def __init__(self, n_sites: int, out: Path, log: Callable[[str], None] = print) -> None:
        self.out = Path(out).resolve()
        self.home = self.out / "poc_home"
        self.workspace = self.out / "poc"
        self.env = job_environment(self.out / "state", home=self.home)
        self.env["NVFLARE_POC_WORKSPACE"] = str(self.workspace)
        self.n_sites = n_sites
        self.log = log
        self.console = open(self.out / "nvflare_poc.log", "a")  # noqa: SIM115 - closed in stop()

    def _nvflare(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).parent / "nvflare"), *args]
        self.console.write(f"$ {' '.join(cmd)}\n")
        self.console.flush()
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
                                cwd=self.out)  # fmt: skip
        self.console.write(result.stdout + result.stderr)
        self.console.flush()
        return result

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._nvflare("poc", "stop")
        shutil.rmtree(self.workspace, ignore_errors=True)
        prepared = self._nvflare("poc", "prepare", "-n", str(self.n_sites), "--force", timeout=120)
        if prepared.returncode != 0:
            raise RuntimeError(f"nvflare poc prepare failed: {prepared.stderr.strip()[-500:]}")
        t0 = time.perf_counter()
        started = self._nvflare("poc", "start", timeout=300)
        if started.returncode != 0:
            raise RuntimeError(f"nvflare poc start failed: {started.stderr.strip()[-500:]}")
        self.log(f"POC started ({self.n_sites} sites on 127.0.0.1) in {time.perf_counter() - t0:.1f} s")

    def submit(self, job_dir: Path) -> str:
        res = self._nvflare("--format", "json", "job", "submit", "-j", str(Path(job_dir).resolve()), timeout=120)
        job_id = _json_field(res.stdout, "job_id")
        if not job_id:
            raise RuntimeError(f"nvflare job submit failed: {(res.stdout + res.stderr).strip()[-500:]}")
        self.log(f"submitted job {job_id}")
        return job_id

    def wait(self, job_id: str, timeout: float, on_poll: Callable[[], str | None] | None = None) -> str:
        """The job's final status (``nvflare job wait``), or ``ABORTED: <reason>`` when ``on_poll`` gave a reason to
        stop waiting (the job is then aborted)."""
        cmd = [str(Path(sys.executable).parent / "nvflare"), "--format", "json", "job", "wait", job_id,
               "--timeout", str(int(timeout)), "--interval", "1"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=self.out)  # fmt: skip
        reason = _watch(proc, on_poll)
        output = proc.stdout.read() if proc.stdout is not None else ""
        self.console.write(f"$ {' '.join(cmd)}\n{output}")
        if reason:
            self._nvflare("job", "abort", job_id, "--force", timeout=60)
            return f"ABORTED: {reason}"
        return _job_status(output)

    def status(self, job_id: str) -> str:
        return _job_status(self._nvflare("--format", "json", "job", "meta", job_id, timeout=60).stdout)

    def stop(self) -> None:
        self._nvflare("poc", "stop", timeout=180)
        self.console.close()

    def job_processes(self, job_id: str) -> dict[str, list[int]]:
        """PIDs of the job's processes in this POC: ``"server"`` (the server job process) and one entry per site
        (the site's job process; the trainer it launched is its child)."""
        out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=False).stdout
        found: dict[str, list[int]] = {"server": []}
        for line in out.splitlines()[1:]:
            pid, _, args = line.strip().partition(" ")
            if f"-n {job_id}" not in args or str(self.workspace) not in args:
                continue
            if "server.runner_process" in args:
                found["server"].append(int(pid))
            elif "client.worker_process" in args and " -c " in args:
                site = args.split(" -c ", 1)[1].split()[0]
                found.setdefault(site, []).append(int(pid))
        return found


def _job_status(text: str) -> str:
    """The job's status (e.g. ``FINISHED:COMPLETED``) from ``nvflare --format json job wait|meta`` output."""
    data = _json_field(text, "data")
    status = _find(data, "status") if isinstance(data, dict) else None
    return str(status or _json_field(text, "status") or "UNKNOWN")


def _json_field(text: str, key: str) -> Any:
    """A field of the JSON object an ``nvflare --format json`` command printed (searched recursively)."""
    for line in reversed([*text.strip().splitlines(), text]):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        found = _find(obj, key)
        if found is not None:
            return found
    return None


def _find(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for value in obj.values():
            found = _find(value, key)
            if found is not None:
                return found
    if isinstance(obj, list):
        for value in obj:
            found = _find(value, key)
            if found is not None:
                return found
    return None
