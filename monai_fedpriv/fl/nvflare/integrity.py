"""Job integrity: a site runs an exported job only as it was exported, and only a job its operator accepted.

Bundle configs are code (MONAI's ``$`` expressions run Python), so an edited job archive would run whatever the
editor wrote at every site. At export the job's settings record the SHA-256 of every file the job ships under the
bundle's ``configs/`` (keys ``configs/<path>``) and of the client script (``custom/fedpriv_client.py``), next to
the digests of the package's shared override files it merges (``package/<name>``, part of the resume fingerprint
only: they are the site's own installed code). Before it builds anything, a site recomputes them from the archive
and the script it runs (:func:`verify_job`): a changed, missing or extra file, a file in ``custom/`` other than the
script and the archive (a shadow of the package), a config that is not JSON, or settings whose own digest
(``settings/fedpriv_job.json``) no longer matches, is refused with one line naming the file. The script removes its
own folder from ``sys.path`` before it imports the package, so the site's installed code is what runs.

A hostile editor could also rewrite the digests in the settings, so the site operator can pin jobs: export prints
one job digest (:func:`job_digest`, over every file the job's author ships in the app folder: the archive with the
settings and the client script; not FLARE's ``config/``, which FLARE itself rewrites at submission and covers with its
own job signature in provisioned mode), and a site whose environment sets
``$MONAI_FEDPRIV_ACCEPT_JOBS`` (a file of accepted job digests, one per line, ``#`` comments allowed) refuses any
job not listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

from monai_fedpriv.errors import BundleError
from monai_fedpriv.fl.nvflare.settings import JOB_ARCHIVE, JOB_FILE, JobSettings

__all__ = [
    "ACCEPT_ENV", "CLIENT_SCRIPT", "JobIntegrityError", "job_digest", "refuse_job",
    "settings_digest", "shipped_digests", "verify_job",
]  # fmt: skip

logger = logging.getLogger("monai_fedpriv.nvflare.integrity")

ACCEPT_ENV = "MONAI_FEDPRIV_ACCEPT_JOBS"
CLIENT_SCRIPT = "fedpriv_client.py"
SCRIPT_KEY = f"custom/{CLIENT_SCRIPT}"
_SHIPPED = ("configs/", "custom/")  # digest keys a site checks; "package/..." ones are the site's own code


SETTINGS_KEY = f"settings/{JOB_FILE}"
# left out of the settings digest as they are of the resume fingerprint (which covers config_digests): a job that
# resumes a federation (more rounds, --resume, another name) keeps its state folder and checkpoint
_UNPINNED_FIELDS = ("name", "rounds", "faults", "resume")


class JobIntegrityError(BundleError):
    """A job that a site refuses to run: edited since export, incomplete, unreadable, or not accepted."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shipped_digests(configs: Path, script: bytes) -> dict[str, str]:
    """``{"configs/<path>": sha256, "custom/fedpriv_client.py": sha256}`` of the bundle's ``configs/`` folder and
    the client script text, as the job ships them."""
    configs = Path(configs)
    out = {f"configs/{f.relative_to(configs).as_posix()}": _sha256(f.read_bytes())
           for f in sorted(configs.rglob("*")) if f.is_file()}  # fmt: skip
    out[SCRIPT_KEY] = _sha256(script)
    return out


def settings_digest(settings: JobSettings) -> str:
    """SHA-256 of the canonical settings (sorted-key JSON) without their own digest entry and the fields the resume
    fingerprint leaves out: what ``config_digests["settings/fedpriv_job.json"]`` records at export."""
    from dataclasses import asdict

    from monai_fedpriv.utils.files import json_safe

    raw = {k: v for k, v in asdict(settings).items() if k not in _UNPINNED_FIELDS}
    digests = raw.get("config_digests")
    raw["config_digests"] = ({k: v for k, v in digests.items() if k != SETTINGS_KEY}
                             if isinstance(digests, dict) else digests)  # fmt: skip
    return _sha256(json.dumps(json_safe(raw), sort_keys=True).encode())


def _read_archive(archive: Path) -> dict[str, bytes]:
    """Every file member of the job archive, by name."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise JobIntegrityError(f"job integrity: custom/{JOB_ARCHIVE} cannot be read as a zip archive: {exc}") from exc


def _read_script(script: Path) -> bytes:
    try:
        return Path(script).read_bytes()
    except OSError as exc:
        raise JobIntegrityError(f"job integrity: {SCRIPT_KEY} cannot be read: {exc}") from exc


FLARE_PREFIX = ".__nvfl_"  # FLARE's signature files (.__nvfl_sig.json, .__nvfl_submitter.crt) in every signed folder


def _flare_own(rel: str) -> bool:
    """Whether a path inside ``custom/`` is FLARE's own signature file or a byte-code cache: no part of what the
    job's author shipped, and never importable code."""
    parts = rel.split("/")
    return "__pycache__" in parts or parts[-1].startswith(FLARE_PREFIX)


def job_digest(archive: Path, script: Path) -> str:
    """``sha256:<hex>`` over every member of the job archive (settings and configs) and the client script: what
    export prints and what ``$MONAI_FEDPRIV_ACCEPT_JOBS`` lists. FLARE's own ``config/`` is not part of it: FLARE
    rewrites it at submission and covers it with its own job signature in provisioned mode."""
    members = _read_archive(Path(archive))
    lines = [f"{_sha256(data)}  archive/{name}\n" for name, data in sorted(members.items())]
    lines.append(f"{_sha256(_read_script(Path(script)))}  {SCRIPT_KEY}\n")
    return "sha256:" + _sha256("".join(lines).encode())


def _accepted(path: str) -> set[str]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise JobIntegrityError(f"job integrity: ${ACCEPT_ENV}={path} cannot be read: {exc}") from exc
    out = set()
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip().lower()
        if entry:
            out.add(entry if entry.startswith("sha256:") else f"sha256:{entry}")
    return out


def _settings(members: dict[str, bytes]) -> JobSettings:
    where = f"job integrity: {JOB_FILE} in custom/{JOB_ARCHIVE}"
    if JOB_FILE not in members:
        raise JobIntegrityError(f"{where} is missing; export the job again.")
    try:
        return JobSettings.from_bytes(members[JOB_FILE], where)
    except BundleError as exc:
        raise JobIntegrityError(str(exc)) from exc


def _short(digest: object) -> str:
    return f"{str(digest)[:12]}..." if digest else "nothing"


def verify_job(archive: Path, script: Path, accept: str | None = None) -> JobSettings:
    """Check the job archive and the client script against the job's settings (and ``accept``, by default
    ``$MONAI_FEDPRIV_ACCEPT_JOBS``) without unpacking or parsing any bundle config; returns the settings.

    Raises:
        JobIntegrityError: one line naming the file (or the job digest) and why the job is refused.
    """
    archive, script = Path(archive), Path(script).resolve()
    custom = script.parent
    try:
        present = [f.relative_to(custom).as_posix() for f in custom.rglob("*") if f.is_file()]
    except OSError as exc:
        raise JobIntegrityError(f"job integrity: the job's custom/ folder {custom} cannot be read: {exc}") from exc
    strays = sorted(n for n in present if n not in (CLIENT_SCRIPT, JOB_ARCHIVE) and not _flare_own(n))
    if strays:
        raise JobIntegrityError(f"job integrity: custom/{strays[0]} is not one of the job's files (custom/ holds only "
                                f"{CLIENT_SCRIPT} and {JOB_ARCHIVE}); refusing to run an edited job.")  # fmt: skip
    accept = os.environ.get(ACCEPT_ENV) if accept is None else accept
    if accept:
        digest = job_digest(archive, script)
        if digest not in _accepted(accept):
            raise JobIntegrityError(
                f"job integrity: job digest {digest} is not listed in ${ACCEPT_ENV} ({accept}); refusing a job this "
                f"site has not accepted."
            )
    members = _read_archive(archive)
    settings = _settings(members)
    recorded = settings.config_digests if isinstance(settings.config_digests, dict) else {}
    expected = {k: v for k, v in recorded.items() if str(k).startswith(_SHIPPED)}
    if not any(k.startswith("configs/") for k in expected) or SCRIPT_KEY not in expected:
        raise JobIntegrityError(
            f"job integrity: {JOB_FILE} records no digests of the job's configs and client script (config_digests); "
            f"export the job again with this version of monai-fedpriv."
        )
    if SETTINGS_KEY not in recorded:
        raise JobIntegrityError(f"job integrity: {JOB_FILE} records no digest of its own settings; export the job "
                                f"again with this version of monai-fedpriv.")  # fmt: skip
    found = settings_digest(settings)
    if found != recorded[SETTINGS_KEY]:
        raise JobIntegrityError(f"job integrity: {JOB_FILE} has settings digest {_short(found)}, its record says "
                                f"{_short(recorded[SETTINGS_KEY])}; refusing to run edited settings.")  # fmt: skip
    prefix = f"{settings.bundle}/configs/"
    actual: dict[str, bytes] = {}
    for name, data in members.items():
        if name == JOB_FILE:
            continue
        if not name.startswith(prefix):
            raise JobIntegrityError(f"job integrity: custom/{JOB_ARCHIVE} holds {name}, which the job never ships.")
        actual[f"configs/{name[len(prefix) :]}"] = data
    actual[SCRIPT_KEY] = _read_script(script)
    for key in sorted(set(expected) | set(actual)):
        if key not in actual:
            raise JobIntegrityError(f"job integrity: {key} is missing, the job's settings list it; refusing to run an "
                                    f"incomplete job.")  # fmt: skip
        if key not in expected:
            raise JobIntegrityError(f"job integrity: {key} is not one of the job's files (its settings do not list "
                                    f"it); refusing to run an edited job.")  # fmt: skip
        found = _sha256(actual[key])
        if found != expected[key]:
            raise JobIntegrityError(f"job integrity: {key} has sha256 {_short(found)}, the job's settings say "
                                    f"{_short(expected[key])}; refusing to run an edited job.")  # fmt: skip
    for key, data in sorted(actual.items()):
        if key.endswith(".json"):
            try:
                json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise JobIntegrityError(f"job integrity: {key} is not valid JSON: {exc}") from exc
    return settings


def refuse_job(reason: str) -> None:
    """Run a refused job at this site without building anything of it: answer every task with ``reason`` as the
    site's failure (the server records it for the round) until the job ends."""
    from monai_fedpriv.fl.nvflare.transport import NVFlareTransport

    reason = reason.rstrip(".")  # the server joins the sites' reasons with "; "
    logger.error(reason)
    transport = NVFlareTransport()
    transport.flare.init()
    while (task := transport.pull()) is not None:
        meta = {"validate": True} if task.name == "validate" else {"round": task.model.round + 1, "result": {}}
        transport.reply_bytes(None, {**meta, "failed": reason})
