"""What one federated round reports: per-site update facts, the global model's privacy (maximum over sites) and the
progress line. Kept apart from the simulator's loop so that the NVFlare controller reports the same
``metrics.json`` entries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai_fedpriv.fl.update import ModelUpdate

__all__ = ["global_privacy", "mean", "progress_cell", "update_facts"]


def update_facts(update: ModelUpdate, wire_bytes: int | None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "n_samples": update.n_samples,
        "local_steps": update.local_steps,
        "bytes_sent": wire_bytes,
        "dense_bytes": update.dense_bytes(),
    }
    if "privacy" in update.meta:
        facts["privacy"] = update.meta["privacy"]
    return facts


def global_privacy(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The global model's guarantee: the largest cumulative epsilon any site has reported so far (each site's
    ledger covers its whole run), with the site it comes from."""
    latest: dict[str, dict[str, Any]] = {}
    for record in history:
        for site, res in record["sites"].items():
            if isinstance(res.get("privacy"), dict) and res["privacy"].get("epsilon") is not None:
                latest[site] = res["privacy"]
    if not latest:
        return None
    site, worst = max(latest.items(), key=lambda kv: kv[1]["epsilon"])
    return {
        "epsilon": worst["epsilon"],
        "delta": worst.get("delta"),
        "site": site,
        "per_site": {k: v["epsilon"] for k, v in latest.items()},
    }


def progress_cell(site: str, result: dict[str, Any]) -> str:
    if "rejected" in result:
        return f"{site} REJECTED ({str(result['rejected'])[:60]})"
    if "stopped" in result and "loss" not in result:
        reason = "privacy budget" if str(result["stopped"]).startswith("privacy budget") else result["stopped"]
        return f"{site} stopped ({reason})"
    if "loss" not in result:
        return f"{site} idle"
    cell = ("(stopping) " if "stopped" in result else "") + f"{site} loss {result['loss']:.3f}"
    if "dice" in result:
        cell += f" dice {result['dice']:.3f}"
    eps = result.get("privacy", {}).get("epsilon")
    return cell + (f" eps {eps:.2f}" if eps is not None else "")


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
