"""What a tracker logs, read from ``metrics.json``: one round's scalars, its rejections, a run's settings.

Both backends log the same names, so a figure in MLflow and one in TensorBoard mean the same thing:

==============================  =====================================================================
``global/dice``                 the global model's Dice after the round (cases weighted over sites)
``global/dice/<class>``         per class (softmax bundles) or region (sigmoid bundles)
``global/epsilon``              the largest cumulative epsilon any site has reported
``global/rejected``             updates (or uploads) the server refused in the round
``round/seconds``               the round's wall time
``<site>/loss``, ``<site>/dice``   the site's training loss and validation Dice of its local model
``<site>/global_dice``          the site's Dice of the round's global model
``<site>/epsilon``              the site's cumulative epsilon (its one ledger, every mechanism)
``<site>/epsilon_budget``       the site's budget (absent without one)
``<site>/bytes_sent`` etc.      ``bytes_received``, ``messages``, ``local_steps``, ``n_samples``
``<site>/rejected``             1 when the server refused the site's answer (the reason is logged as text)
``baseline/centralised/dice``   the centralised baseline (per round); ``baseline/local_only/<site>/dice``
==============================  =====================================================================

The step of every scalar is the round number. Nothing here reads a key that ``metrics.json`` does not promise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["SITE_SCALARS", "round_scalars", "round_texts", "run_params", "baseline_scalars"]

SITE_SCALARS = ("loss", "dice", "global_dice", "bytes_sent", "bytes_received", "messages", "local_steps", "n_samples")
_STATIC_PRIVACY = ("delta", "accountant", "budget", "policy", "noise_multiplier", "max_grad_norm", "sample_rate",
                   "privacy_unit", "noise_source", "mechanism", "regime")  # fmt: skip


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def _put(out: dict[str, float], tag: str, value: Any) -> None:
    number = _number(value)
    if number is not None:
        out[tag] = number


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one round's ``metrics.json`` entry (``rounds[i]``), by tag."""
    out: dict[str, float] = {}
    glob = record.get("global") or {}
    _put(out, "global/dice", glob.get("dice"))
    _put(out, "global/rejected", glob.get("rejected"))
    for name, value in (glob.get("dice_per_class") or {}).items():
        _put(out, f"global/dice/{name}", value)
    _put(out, "global/epsilon", (glob.get("privacy") or {}).get("epsilon"))
    _put(out, "round/seconds", record.get("seconds"))
    for site, entry in (record.get("sites") or {}).items():
        if not isinstance(entry, Mapping):
            continue
        for key in SITE_SCALARS:
            _put(out, f"{site}/{key}", entry.get(key))
        privacy = entry.get("privacy")
        if not isinstance(privacy, Mapping) and isinstance(entry.get("upload"), Mapping):
            privacy = entry["upload"].get("privacy")  # an upload round: the release is the upload's
        if isinstance(privacy, Mapping):
            _put(out, f"{site}/epsilon", privacy.get("epsilon"))
            _put(out, f"{site}/epsilon_budget", privacy.get("budget"))
        _put(out, f"{site}/rejected", "rejected" in entry)
    return out


def round_texts(record: Mapping[str, Any]) -> dict[str, str]:
    """The round's rejections and stops, ``{"rejected/<site>": reason}``, for the backends' text logs."""
    out: dict[str, str] = {}
    for site, entry in (record.get("sites") or {}).items():
        if isinstance(entry, Mapping):
            for key in ("rejected", "stopped"):
                if entry.get(key):
                    out[f"{key}/{site}"] = str(entry[key])
    if record.get("federation_stopped"):
        out["federation_stopped"] = str(record["federation_stopped"])
    return out


def baseline_scalars(metrics: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    """The baselines a run trained (``metrics.json["baselines"]``), by round: ``baseline/centralised/dice`` (its
    curve when the run kept one, else its final Dice at the last round) and ``baseline/local_only/<site>/dice``."""
    out: dict[int, dict[str, float]] = {}
    last = int((metrics.get("final") or {}).get("rounds_completed") or len(metrics.get("rounds") or []) or 1)
    baselines = metrics.get("baselines") or {}
    central = baselines.get("centralised")
    if isinstance(central, Mapping):
        curve = list(central.get("rounds") or [])
        for step, value in enumerate(curve, start=1):  # a round without a score keeps its place
            _put(out.setdefault(step, {}), "baseline/centralised/dice", value)
        if not any(_number(v) is not None for v in curve):
            _put(out.setdefault(last, {}), "baseline/centralised/dice", central.get("global_dice"))
    local = baselines.get("local_only")
    if isinstance(local, Mapping):
        for site, block in local.items():
            if isinstance(block, Mapping):
                _put(out.setdefault(last, {}), f"baseline/local_only/{site}/dice", block.get("global_dice"))
    return {step: values for step, values in out.items() if values}


def _flat(prefix: str, value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _flat(f"{prefix}.{key}" if prefix else str(key), inner)
    elif isinstance(value, (list, tuple)):
        yield prefix, json.dumps(value, default=str)[:500]
    elif value is not None:
        yield prefix, str(value)[:500]


def run_params(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The run's settings as flat parameters: ``config.*`` (the fingerprint: bundle, local work, seed, screening,
    ...), ``strategy.*`` and each site's privacy settings ``privacy.<site>.*`` as first reported."""
    params = dict(_flat("config", {k: v for k, v in (metrics.get("config") or {}).items() if k != "strategy"}))
    params.update(_flat("strategy", metrics.get("strategy") or {}))
    for record in metrics.get("rounds") or []:
        for site, entry in (record.get("sites") or {}).items():
            privacy = entry.get("privacy") if isinstance(entry, Mapping) else None
            if isinstance(privacy, Mapping):
                for key in _STATIC_PRIVACY:
                    if privacy.get(key) is not None:
                        params.setdefault(f"privacy.{site}.{key}", str(privacy[key])[:500])
    return params
