"""Export a federated run of a bundle as an NVIDIA FLARE 2.9 job folder.

The job has one app for the server and every site (``deploy_map: @ALL``):

* server: :class:`~monai_fedpriv.fl.nvflare.controller.FedPrivController`;
* sites: NVFlare's Client API executor running ``custom/fedpriv_client.py`` as an external process launched once
  (the bundle's trainer in an ordinary main-thread process, what MONAI's data loaders and CUDA expect), with 30 s to
  save at job end;
* ``custom/fedpriv_job.zip``: the settings both sides read and the bundle's configs (:mod:`.settings` says why
  a zip).

Because ``custom/`` holds code (the client script), FLARE treats the job as BYOC ("bring your own code"): sites skip
their ``class_allow_list`` for it, and the submitter needs the ``byoc`` right (project admins and leads have it).
The ``monai_fedpriv`` classes are imported from the package installed at every site; nothing else is shipped.

The settings record the digests of every shipped config and of the client script, which each site checks before it
builds anything; :func:`exported_job_digest` is the one digest a site operator can pin (:mod:`.integrity`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from monai_fedpriv.fl.nvflare.integrity import CLIENT_SCRIPT, SETTINGS_KEY, job_digest, settings_digest, shipped_digests
from monai_fedpriv.fl.nvflare.settings import JOB_ARCHIVE, JobSettings, write_job_archive

__all__ = ["CLIENT_SCRIPT", "export_job", "exported_job_digest", "job_config_digests"]

_SCRIPT = '''"""Site entry point of a monai_fedpriv NVIDIA FLARE job (written by monai-fedpriv export-nvflare)."""

import os
import sys

# the site's installed monai_fedpriv runs, never a package of that name shipped next to this script
_HERE = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(os.path.abspath(p or os.curdir)) != _HERE]

from monai_fedpriv.fl.nvflare.client import main  # noqa: E402

if __name__ == "__main__":
    main()
'''


def job_config_digests(settings: JobSettings, bundle_dir: Path) -> dict[str, str | None]:
    """What ``settings.config_digests`` holds for a job of ``bundle_dir``: the shipped configs and client script
    (:func:`~monai_fedpriv.fl.nvflare.integrity.shipped_digests`) and the package's shared override files the run
    merges (``package/<name>``), and the digest of the settings themselves (``settings/fedpriv_job.json``)."""
    from monai_fedpriv.bundle.loader import BundleSpec

    configs = Path(bundle_dir) / "configs"
    out: dict[str, str | None] = dict(shipped_digests(configs, _SCRIPT.encode()))
    for path in BundleSpec(Path(bundle_dir), tuple(settings.config_files), {}).config_paths():
        if path.parent.resolve() != configs.resolve():
            out[f"package/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    out[SETTINGS_KEY] = settings_digest(dataclasses.replace(settings, config_digests=out))
    return out


def exported_job_digest(job_dir: Path) -> str:
    """The job digest of an exported job folder (what a site lists in ``$MONAI_FEDPRIV_ACCEPT_JOBS``): over every
    file of its app folder (``app/``, deployed to every site)."""
    custom = Path(job_dir) / "app" / "custom"
    return job_digest(custom / JOB_ARCHIVE, custom / CLIENT_SCRIPT)


def export_job(settings: JobSettings, bundle_dir: Path, job_dir: Path, task_request_interval: float = 0.5) -> Path:
    """Write the job folder ``job_dir`` (replaced if it exists) and return it.

    Args:
        settings: the run (``settings.bundle`` is the bundle folder's name inside the job); its ``config_digests``
            are taken here, from the files the job ships.
        bundle_dir: the bundle whose ``configs/`` are shipped.
        job_dir: where the job folder goes.
        task_request_interval: how often idle sites ask the server for work, seconds (FLARE's default 2 s makes
            every round last at least that long).
    """
    from monai_fedpriv.fl.nvflare.transport import require_nvflare

    require_nvflare()
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    from monai_fedpriv.fl.nvflare.controller import FedPrivController

    configs = Path(bundle_dir) / "configs"
    job_dir = Path(job_dir).resolve()
    settings = dataclasses.replace(settings, config_digests=job_config_digests(settings, bundle_dir))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / CLIENT_SCRIPT).write_bytes(_SCRIPT.encode())
        write_job_archive(settings, configs, work / JOB_ARCHIVE)
        job = FedJob(name=settings.name, min_clients=1)
        job.set_app_packages(["monai_fedpriv"])
        job.to_server(FedPrivController(job_archive=JOB_ARCHIVE), id="fedpriv_controller")
        job.to_server({"server": {"task_request_interval": float(task_request_interval)}})
        runner = ScriptRunner(
            script=CLIENT_SCRIPT,  # relative: found in app/custom at the site
            launch_external_process=True,
            command="python3 -u",
            framework=FrameworkType.RAW,
            launch_once=True,
            shutdown_timeout=30.0,
        )
        cwd = Path.cwd()
        try:
            os.chdir(work)
            job.to_clients(runner)
            job.add_file_to_clients(str(work / JOB_ARCHIVE))
            job.add_file_to_server(str(work / JOB_ARCHIVE))
            job.export_job(str(work / "export"))
        finally:
            os.chdir(cwd)
        exported = work / "export" / settings.name
        if job_dir.exists():
            shutil.rmtree(job_dir)
        job_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(exported, job_dir)
    return job_dir
