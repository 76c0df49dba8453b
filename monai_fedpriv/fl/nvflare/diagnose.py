"""Why a local NVIDIA FLARE run failed, in one line: from the server's ``metrics.json`` (a failed round and each
site's reason) and from FLARE's logs of the simulator or POC workspace (a site that refused the job, a client script
that could not start, the exception a site's trainer or the server's workflow ended with).

FLARE itself only says that a job finished, or that a client "stopped due to FATAL_SYSTEM_ERROR"; the cause is a few
lines earlier in one participant's ``log.txt``, where it is hard to find among a thousand lines.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cause", "failure_cause"]

_REFUSED = re.compile(r"(job integrity: .*)$")
_NO_SCRIPT = re.compile(r"can't open file '(?:[^']*/)?([^'/]*)': (?:\[Errno \d+\] )?(.*)$")
_WORKFLOW = re.compile(r"Exception in workflow \S+: (.*)$")
_EXCEPTION = r"(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Fault)\b.*"
_TRAINER = re.compile(rf"ExternalProcessBackend - INFO - ({_EXCEPTION})$")  # the last line of a trainer's traceback
_INPUT_KINDS = ("BundleError", "DataError", "OptionError", "PrivacyConfigError", "ResumeError", "FileNotFoundError",
                "JobIntegrityError", "JSONDecodeError")  # fmt: skip
_MAX = 400


@dataclass
class Cause:
    """One line saying why the job failed; ``input_error`` when the job (or its data) given was at fault."""

    message: str
    input_error: bool


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX else text[: _MAX - 3].rstrip() + "..."


def _who(path: Path, root: Path, names: list[str]) -> str:
    """The participant a log file belongs to: the first folder of its path named like a site or the server."""
    for part in path.relative_to(root).parts[:-1]:
        if part in names:
            return part
        if part in ("server", "simulator_server"):
            return "the server"
    return "a participant"


def _sites(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _logs(out: Path) -> list[Path]:
    found = sorted(out.glob("nvflare_*.log"))
    for workspace in ("nvflare_simulator", "poc"):
        if (out / workspace).is_dir():
            found += sorted((out / workspace).rglob("log.txt"))
    return found


def _scan(out: Path, sites: list[str]) -> dict[str, dict[str, str]]:
    """``{kind: {participant: the last matching message}}`` over every FLARE log of the run."""
    seen: dict[str, dict[str, str]] = {"refused": {}, "script": {}, "trainer": {}, "workflow": {}}
    for path in _logs(out):
        who = _who(path, out, sites) if path.name == "log.txt" else None
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            for kind, pattern in (("refused", _REFUSED), ("script", _NO_SCRIPT), ("trainer", _TRAINER),
                                  ("workflow", _WORKFLOW)):  # fmt: skip
                match = pattern.search(line)
                if match and (who is not None or kind != "trainer"):
                    found = match.group(1) if kind != "script" else f"{match.group(1)}: {match.group(2)}"
                    seen[kind][who or "a participant"] = found.strip()
    for kind, by_who in seen.items():  # a site's own log over the console's copy of it
        seen[kind] = {k: v for k, v in by_who.items() if k in sites} or by_who
    return seen


def _grouped(by_site: dict[str, str]) -> str:
    """``"site-1 and site-2: reason"`` for each distinct reason, joined with ``"; "``."""
    groups: dict[str, list[str]] = {}
    for site, reason in sorted(by_site.items()):
        groups.setdefault(reason, []).append(site)
    return "; ".join(f"{_sites(names)}: {reason}" for reason, names in groups.items())


def _metrics_stop(out: Path) -> dict | None:
    try:
        stopped = json.loads((out / "state" / "server" / "metrics.json").read_text()).get("stopped")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return stopped if isinstance(stopped, dict) and "failed_round" in stopped else None


def failure_cause(out: Path, sites: list[str]) -> Cause | None:
    """Why the job run under ``out`` (``run-nvflare --output``) failed, or ``None`` when nothing says.

    Order: a site that refused the job (``job integrity: ...``), a client script that could not be started, the
    round failure the server recorded (with the exception of a site whose trainer died), the exception a site's
    trainer or the server's workflow ended with.
    """
    out = Path(out)
    seen = _scan(out, list(sites))
    stopped = _metrics_stop(out)
    refused = dict(seen["refused"])
    if stopped:
        for site, entry in (stopped["failed_round"].get("sites") or {}).items():
            reason = str((entry or {}).get("rejected", ""))
            if reason.startswith("job integrity:"):
                refused[site] = reason
    refused = {k: v for k, v in refused.items() if k in sites} or refused
    if refused:
        return Cause(_clip(f"the job was refused by {_grouped(refused)}"), True)
    if seen["script"]:
        reason = next(iter(seen["script"].values()))
        return Cause(_clip(f"{_sites(sorted(seen['script']))} could not start the job's client script ({reason}); does "
                           f"the job folder lack app/custom/fedpriv_client.py?"), True)  # fmt: skip
    trainers = {k: v for k, v in seen["trainer"].items() if k in sites}
    if stopped:
        died = {s: trainers[s] for s in trainers if "trainer failed" in str(
            ((stopped["failed_round"].get("sites") or {}).get(s) or {}).get("rejected", ""))}  # fmt: skip
        extra = f" ({_grouped(died)})" if died else ""
        return Cause(_clip(f"{str(stopped['reason']).rstrip('.')}{extra}"), False)
    if trainers:
        kinds = {reason.split(":", 1)[0].rsplit(".", 1)[-1] for reason in trainers.values()}
        return Cause(_clip(f"a site's trainer failed: {_grouped(trainers)}"), kinds <= set(_INPUT_KINDS))
    if seen["workflow"]:
        reason = next(iter(seen["workflow"].values()))
        kind = reason.split(":", 1)[0].rsplit(".", 1)[-1]
        return Cause(_clip(f"the server's workflow failed: {reason}"), kind in _INPUT_KINDS)
    return None
