"""The deployment runbook (docs/deployment.md) followed on one machine: its own ``project.yml`` provisioned with
``nvflare provision``, the server and two sites started with the generated start scripts (mTLS, on 127.0.0.1
only), an exported job submitted and waited for with the admin kit, the metrics read where the runbook says, and
everything stopped with the runbook's stop procedure, leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from monai_fedpriv.cli import main
from monai_fedpriv.fl.nvflare.runner import open_job
from tests.conftest import write_tiny_bundle

pytest.importorskip("nvflare")

RUNBOOK_PROJECT = Path(__file__).resolve().parents[1] / "docs" / "deployment" / "project.yml"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Federation:
    """The processes of one provisioned federation under ``root``: started, queried with the admin kit, stopped."""

    def __init__(self, root: Path, kits: Path) -> None:
        self.root = root
        self.kits = kits
        self.admin_kit = kits / "admin@coordinator.org"
        self.sessions: set[int] = set()
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "HOME": str(root / "home"), "PYTHONUNBUFFERED": "1"}  # fmt: skip

    def start(self, name: str, **env: str) -> None:
        """``cd <kit> && bash startup/start.sh`` with the runbook's environment (a session of its own)."""
        with open(self.root / f"{name}.console", "w") as console:
            proc = subprocess.Popen(["bash", "startup/start.sh"], cwd=self.kits / name, env={**self.env, **env},
                                    stdout=console, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.sessions.add(proc.pid)
        proc.wait(timeout=30)  # start.sh leaves its watchdog (sub_start.sh) running and returns

    def admin(self, *args: str, timeout: float = 120) -> dict:
        """An ``nvflare --format json`` command with the admin kit; its JSON envelope."""
        cmd = [str(BIN / "nvflare"), "--format", "json", *args, "--startup-kit", str(self.admin_kit)]
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        for line in reversed(res.stdout.strip().splitlines()):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
        return {"status": "error", "output": res.stdout + res.stderr}

    def wait_for_sites(self, sites: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.admin("system", "status", "client", timeout=30)
            found = {c.get("client_name") for c in (status.get("data") or {}).get("client_status", [])}
            if set(sites) <= found:
                return
            time.sleep(2)
        raise AssertionError(f"the sites {sites} never connected; see {self.root}/*.console and <kit>/log.txt")

    def processes(self) -> list[int]:
        """Our processes: in a session this test started, or run from (or naming) a folder under ``root``."""
        table = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
        ours = []
        for line in table.splitlines():
            pid, sid, args = (line.split(None, 2) + [""])[:3]
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = ""
            if int(sid) in self.sessions or str(self.root) in args or cwd.startswith(str(self.root)):
                ours.append(int(pid))
        return [p for p in ours if p != os.getpid()]

    def wait_gone(self, pids: list[int] | None, timeout: float) -> list[int]:
        """Wait until none of ``pids`` (default: all of ours) runs; the ones still running."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [p for p in (pids if pids is not None else self.processes()) if _alive(p)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(1)

    def kill_all(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _listeners(port: int) -> set[str]:
    """The IPv4 addresses a TCP socket listens on at ``port`` (from ``/proc/net/tcp``)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def _kit_processes(fed: Federation, kit: Path) -> list[int]:
    """Our processes started from ``kit`` (its watchdog, FLARE, the job's processes)."""
    found = []
    for pid in fed.processes():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if str(kit) in args or cwd.startswith(str(kit)):
            found.append(pid)
    return found


@pytest.mark.slow
def test_the_runbooks_provisioned_federation_runs_a_job_on_loopback_and_stops(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MONAI_FEDPRIV_ACCEPT_JOBS", raising=False)
    root = tmp_path.resolve()
    # the runbook's project.yml, on a free port (the server is "localhost": FLARE listens on 127.0.0.1 only)
    project = yaml.safe_load(RUNBOOK_PROJECT.read_text())
    server = next(p for p in project["participants"] if p["type"] == "server")
    assert server["name"] == "localhost"
    server["fed_learn_port"] = free_port()
    (root / "project.yml").write_text(yaml.safe_dump(project))
    cmd = [str(BIN / "nvflare"), "provision", "-p", "project.yml", "-w", "provision"]
    env = {**os.environ, "HOME": str(root)}
    prov = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert prov.returncode == 0, prov.stdout + prov.stderr
    kits = root / "provision" / project["name"] / "prod_00"
    assert (kits / "site-1" / "local" / "resources.json.default").is_file()  # what the runbook tells sites to copy

    # a tiny two-site job, exported as the runbook says; each site's own data list as $MONAI_FEDPRIV_DATALIST
    bundle = root / "tiny_bundle"
    write_tiny_bundle(bundle, tiny_data)
    flags = [str(bundle), "--sites", "2", "--rounds", "1", "--local-steps", "2", "--partition", "iid",
             "--config-files", "train.json", "tiny.json", "--output", str(root / "jobs" / "brain")]  # fmt: skip
    assert main(["export-nvflare", *flags]) == 0
    settings = open_job(root / "jobs" / "brain")[0]
    from monai_fedpriv.fl.nvflare.job import exported_job_digest

    (root / "site-1_accepted_jobs.txt").write_text(exported_job_digest(root / "jobs" / "brain") + "\n")

    fed = Federation(root, kits)
    try:
        fed.start("localhost", MONAI_FEDPRIV_STATE_ROOT=str(root / "state" / "server"))
        for site in ("site-1", "site-2"):
            (root / f"{site}_datalist.json").write_text(json.dumps(settings.data[site]))
            env = {"MONAI_FEDPRIV_DATALIST": str(root / f"{site}_datalist.json"),
                   "MONAI_FEDPRIV_STATE_ROOT": str(root / "state" / site)}  # fmt: skip
            if site == "site-1":  # this site pins jobs: it runs only the digest export printed
                env["MONAI_FEDPRIV_ACCEPT_JOBS"] = str(root / "site-1_accepted_jobs.txt")
            fed.start(site, **env)
        fed.wait_for_sites(["site-1", "site-2"], timeout=120)
        assert _listeners(server["fed_learn_port"]) == {"127.0.0.1"}  # the server named localhost: loopback only

        submitted = fed.admin("job", "submit", "-j", str(root / "jobs" / "brain"))
        job_id = (submitted.get("data") or {}).get("job_id")
        assert job_id, submitted
        waited = fed.admin("job", "wait", job_id, "--timeout", "300", "--interval", "1", timeout=330)
        assert (waited.get("data") or {}).get("status") == "FINISHED:COMPLETED", waited

        # the metrics are where the runbook says: the server's $MONAI_FEDPRIV_STATE_ROOT/server/metrics.json
        metrics = json.loads((root / "state" / "server" / "server" / "metrics.json").read_text())
        assert metrics["final"]["rounds_completed"] == 1 and "stopped" not in metrics
        assert sorted(metrics["rounds"][0]["sites"]) == ["site-1", "site-2"]
        assert all(s["bytes_sent"] > 0 and "rejected" not in s for s in metrics["rounds"][0]["sites"].values())
        assert metrics["rounds"][0]["global"]["dice"] is not None  # scored by the sites on their own cases
        for site in ("site-1", "site-2"):  # each site's state lives under its own state root
            assert (root / "state" / site / site / "round_1.pt").is_file()

        # the runbook's stop procedure: one site without the admin console, then the whole federation
        site2 = _kit_processes(fed, kits / "site-2")
        assert site2, "site-2's watchdog and FLARE process should be running"
        (kits / "site-2" / "shutdown.fl").touch()
        assert fed.wait_gone(site2, timeout=60) == [], "touch shutdown.fl did not stop site-2"
        stopped = fed.admin("system", "shutdown", "all", "--force")
        assert stopped.get("status") == "ok", stopped
        assert fed.wait_gone(None, timeout=90) == [], "the stop procedure left processes running"
    finally:  # whatever failed above: nothing of this federation outlives the test
        fed.kill_all()
        fed.wait_gone(None, timeout=30)
