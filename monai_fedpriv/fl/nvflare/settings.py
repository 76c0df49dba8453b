"""What an exported NVIDIA FLARE job carries: one archive (``custom/fedpriv_job.zip``) with the run's settings
(``fedpriv_job.json``) and the bundle's ``configs/``, read by the server controller and by every site, so both
sides build exactly what ``monai-fedpriv simulate`` would with the same flags.

Why an archive: ``nvflare job submit`` parses and rewrites every ``.json``/``.conf``/``.yml`` file under an app's
``custom/`` folder as HOCON, where ``#`` starts a comment, and MONAI bundle ids (``train#trainer#max_epochs``) do
not survive it. A zip travels unchanged; each process unpacks it into a private temporary folder.

Where state lives: every site keeps its own checkpoint (engine, optimiser, privacy ledger, random state) under
``<state root>/<site>``, the server its round checkpoint under ``<state root>/server``. The state root is
``$MONAI_FEDPRIV_STATE_ROOT`` when set in the FLARE process's environment (``run-nvflare`` sets it to its output
folder), else ``~/.monai_fedpriv/state/<fingerprint>``: outside the NVFlare workspace (which FLARE deletes with the
job), and the same for a later job of the same settings, which continues from it when exported with ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monai_fedpriv.errors import BundleError, DataError
from monai_fedpriv.utils.files import json_safe

__all__ = [
    "DATALIST_ENV", "JOB_ARCHIVE", "JOB_FILE", "STATE_ENV", "JobSettings", "open_job_archive", "write_job_archive",
]  # fmt: skip

JOB_ARCHIVE = "fedpriv_job.zip"
JOB_FILE = "fedpriv_job.json"
STATE_ENV = "MONAI_FEDPRIV_STATE_ROOT"
DATALIST_ENV = "MONAI_FEDPRIV_DATALIST"


@dataclass
class JobSettings:
    """Settings of one federated job (the flags of ``monai-fedpriv export-nvflare``).

    Args:
        name: job name.
        bundle: the bundle folder name inside the job (its ``configs/`` travel with the job).
        config_files: bundle config files merged in order (shared overrides resolved from the installed package).
        overrides: bundle overrides (privacy, sharing, data adaptation, ``--override`` values).
        rounds, local_epochs, local_steps, seed, momentum: as for ``simulate``.
        strategy: ``{"name": ..., options}`` for :func:`~monai_fedpriv.fl.strategies.build_strategy`.
        screen: :class:`~monai_fedpriv.fl.server.ScreenSettings` fields.
        min_sites: acceptable updates a round needs (``None``: all but one).
        round_timeout: seconds the server waits for a round (0: no limit).
        wait_after_min: seconds the server keeps waiting for slower sites once ``min_sites`` answered (NVFlare counts
            an error reply as an answer, so without this a failed site could end the round early).
        secure_noise: privacy noise from OS entropy (default for a deployment); ``False`` seeds it from ``seed``
            (reproducible runs, reported as simulation-only).
        latents_unprotected: the sites may upload latents no mechanism covers (``--latents-unprotected``).
        sites: the site names.
        data: per site ``{"train": [...], "val": [...]}`` data lists (local runs); a deployed site may instead point
            ``$MONAI_FEDPRIV_DATALIST`` at its own JSON file of that shape.
        faults: ``SITE:KIND:ROUND`` fault injections (testing only).
        partition, data_summary: what ``metrics.json`` and the report say about the split and the data.
        resume: continue after the last round completed by an earlier job of the same settings (its saved server
            and site state), instead of starting at round 1.
        config_digests: SHA-256 digests taken at export of every file the job ships under the bundle's ``configs/``
            (``configs/<path>``), of the client script (``custom/fedpriv_client.py``) and of the package's shared
            override files it merges (``package/<name>``): every site checks the shipped ones before it builds
            anything (:mod:`.integrity`), and all are part of the fingerprint, so a job re-exported with an edited
            config does not resume the earlier one's state.
        secure_aggregation: :class:`~monai_fedpriv.fl.secure.SecureAggregation` fields (``None``: the server sees
            every update).
    """

    name: str
    bundle: str
    config_files: list[str]
    overrides: dict[str, Any]
    rounds: int
    sites: list[str]
    local_epochs: int | None = 1
    local_steps: int | None = None
    seed: int = 0
    momentum: str = "restart"
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    screen: dict[str, Any] = field(default_factory=dict)
    min_sites: int | None = None
    round_timeout: int = 3600
    wait_after_min: int = 10
    secure_noise: bool = True
    latents_unprotected: bool = False
    data: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    partition: dict[str, Any] = field(default_factory=dict)
    data_summary: dict[str, Any] | None = None
    resume: bool = False
    config_digests: dict[str, str | None] = field(default_factory=dict)
    secure_aggregation: dict[str, Any] | None = None

    # ---------------------------------------------------------------- files
    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(json_safe(asdict(self)), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> JobSettings:
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"job settings {path} not found; export the job with monai-fedpriv export-nvflare.")
        return cls.from_bytes(path.read_bytes(), f"job settings {path}")

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> JobSettings:
        """Settings from the bytes of a ``fedpriv_job.json``; ``where`` names it in the one-line error.

        Raises:
            BundleError: not JSON, not an object, unknown or missing fields.
        """
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise BundleError(f"{where} is not a JSON object.")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise BundleError(f"{where} has unknown fields {unknown}.")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise BundleError(f"{where} lacks required fields: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        """Everything that defines the run but its name, the number of rounds, injected faults and whether it
        resumes: what a checkpoint must match to be resumed (every change named on refusal)."""
        left_out = ("name", "rounds", "faults", "resume", "data")
        out = {k: v for k, v in json_safe(asdict(self)).items() if k not in left_out}
        lists = {site: self.data.get(site, {}) for site in self.sites}
        out["sites"] = {site: [str(c.get("image")) for c in lists[site].get("train", [])] for site in self.sites}
        out["val"] = {site: [str(c.get("image")) for c in lists[site].get("val", [])] for site in self.sites}
        data = json.dumps(json_safe(self.data), sort_keys=True).encode()
        out["data_digest"] = hashlib.sha256(data).hexdigest()[:16]  # labels, patients, public flags: every field
        return out

    def fingerprint(self) -> str:
        """A digest of everything that defines the run but its name, the number of rounds, injected faults and
        whether it resumes (checked on resume; names the default state folder)."""
        raw = {k: v for k, v in asdict(self).items() if k not in ("name", "rounds", "faults", "resume")}
        return hashlib.sha256(json.dumps(json_safe(raw), sort_keys=True).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- where things are
    def state_root(self) -> Path:
        root = os.environ.get(STATE_ENV)
        return Path(root) if root else Path.home() / ".monai_fedpriv" / "state" / self.fingerprint()

    def site_data(self, site: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(train, val)`` data lists of ``site``: ``$MONAI_FEDPRIV_DATALIST`` if set, else the job's own."""
        local = os.environ.get(DATALIST_ENV)
        if local:
            try:
                lists = json.loads(Path(local).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise DataError(f"${DATALIST_ENV}={local}: cannot read a JSON data list: {exc}") from exc
        elif site in self.data:
            lists = self.data[site]
        else:
            raise DataError(
                f"no data for {site}: the job lists data for {sorted(self.data)}; set ${DATALIST_ENV} to a JSON file "
                f'{{"train": [...], "val": [...]}} of this site\'s cases.'
            )
        if not isinstance(lists, dict) or not lists.get("train"):
            raise DataError(f"the data list of {site} has no training cases ('train').")
        return list(lists["train"]), list(lists.get("val", []))


def write_job_archive(settings: JobSettings, configs: Path, path: Path) -> Path:
    """Write ``path``: ``fedpriv_job.json`` and the bundle's ``configs/`` as ``<settings.bundle>/configs/...``."""
    configs = Path(configs)
    if not configs.is_dir():
        raise BundleError(f"{configs.parent} is not a MONAI bundle: it has no configs/ directory.")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(JOB_FILE, json.dumps(json_safe(asdict(settings)), indent=1))
        for file in sorted(f for f in configs.rglob("*") if f.is_file()):
            archive.write(file, f"{settings.bundle}/configs/{file.relative_to(configs).as_posix()}")
    return Path(path)


_UNPACKED: dict[Path, tempfile.TemporaryDirectory] = {}  # kept for the life of the process


def open_job_archive(path: str | Path) -> tuple[JobSettings, Path]:
    """The settings in a job archive and the folder it was unpacked to (``<folder>/<bundle>`` is the bundle)."""
    path = Path(path).resolve()
    if path in _UNPACKED:
        folder = Path(_UNPACKED[path].name)
        return JobSettings.load(folder / JOB_FILE), folder
    if not path.is_file():
        raise BundleError(f"{path} not found: not a job folder written by monai-fedpriv export-nvflare.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            unsafe = [n for n in names if n.startswith("/") or ".." in Path(n).parts]
            if unsafe:
                raise BundleError(f"job archive {path} has unsafe member paths {unsafe[:3]}.")
            unpacked = tempfile.TemporaryDirectory(prefix="fedpriv_job_")
            archive.extractall(unpacked.name)
    except zipfile.BadZipFile as exc:
        raise BundleError(f"job archive {path} is not a zip file: {exc}") from exc
    folder = Path(unpacked.name)
    if not (folder / JOB_FILE).is_file():
        raise BundleError(f"job archive {path} lacks {JOB_FILE}; export the job again.")
    settings = JobSettings.from_bytes((folder / JOB_FILE).read_bytes(), f"{JOB_FILE} in {path}")
    if not (folder / settings.bundle / "configs").is_dir():
        raise BundleError(f"job archive {path} lacks the bundle's configs ({settings.bundle}/configs).")
    _UNPACKED[path] = unpacked
    return settings, folder
