"""What one federated round reports: per-site update facts, the global model's privacy (maximum over sites) and the
progress line. Kept apart from the simulator's loop so that the NVFlare controller reports the same
``metrics.json`` entries."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from monai_fedpriv.fl.update import ModelUpdate

__all__ = [
    "add_site_score", "final_summary", "global_privacy", "mean", "progress_cell", "round_record", "update_facts",
]  # fmt: skip


def update_facts(update: ModelUpdate, wire_bytes: int | None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "n_samples": update.n_samples,
        "local_steps": update.local_steps,
        "bytes_sent": wire_bytes,
        "dense_bytes": update.dense_bytes(),
    }
    if _valid_privacy(update.meta.get("privacy")):
        facts["privacy"] = update.meta["privacy"]
    return facts


def _valid_privacy(privacy: Any) -> bool:
    """Whether ``privacy`` (site-reported) is an object whose ``epsilon`` is a finite number or absent; any other
    entry is treated as absent."""
    if not isinstance(privacy, Mapping):
        return False
    eps = privacy.get("epsilon")
    return eps is None or (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps))


def global_privacy(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The global model's guarantee: the largest cumulative epsilon any site has reported so far (each site's
    ledger covers its whole run), with the site it comes from."""
    latest: dict[str, dict[str, Any]] = {}
    for record in history:
        for site, res in record["sites"].items():
            if _valid_privacy(res.get("privacy")) and res["privacy"].get("epsilon") is not None:
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
        return f"{site} REJECTED ({result['rejected']})"  # the whole reason: a cut one can mislead
    if "stopped" in result and "loss" not in result:
        reason = "privacy budget" if str(result["stopped"]).startswith("privacy budget") else result["stopped"]
        return f"{site} stopped ({reason})"
    if isinstance(result.get("upload"), dict):
        up = result["upload"]
        eps = (up.get("privacy") or {}).get("epsilon")
        shield = f"eps {eps:.2f}" if isinstance(eps, (int, float)) else "unprotected"
        return f"{site} sent {up.get('kind')} ({up.get('items')} items, {up.get('bytes', 0) / 1e6:.2f} MB, {shield})"
    if "loss" not in result:
        return f"{site} idle"
    cell = ("(stopping) " if "stopped" in result else "") + f"{site} loss {result['loss']:.3f}"
    if "dice" in result:
        cell += f" dice {result['dice']:.3f}"
    eps = result["privacy"].get("epsilon") if _valid_privacy(result.get("privacy")) else None
    return cell + (f" eps {eps:.2f}" if eps is not None else "")


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def round_record(
    rnd: int,
    sites: dict[str, dict[str, Any]],
    scores: Mapping[str, Any],
    rejected: int,
    seconds: float,
    history: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """One completed round's ``metrics.json`` entry: per-site results, the global model's Dice (``scores``:
    ``dice``, ``per_site`` and optionally ``dice_per_class``), the rejected count, and the global model's privacy
    over ``history`` and this round."""
    record: dict[str, Any] = {
        "round": rnd,
        "sites": sites,
        "global": {"dice": scores.get("dice"), "per_site": dict(scores.get("per_site") or {}), "rejected": rejected},
        "seconds": round(seconds, 3),
    }
    if scores.get("dice_per_class"):
        record["global"]["dice_per_class"] = scores["dice_per_class"]
    privacy = global_privacy([*history, record])
    if privacy:
        record["global"]["privacy"] = privacy
    return record


def add_site_score(record: dict[str, Any], site: str, scored: Mapping[str, Any], order: Sequence[str]) -> None:
    """A site's score of a round's global model on its own validation cases (``global_dice``, ``n_cases``,
    ``dice_per_class``, ``classes``), combined into that round's global Dice over the sites that scored it (cases
    weighted); ``order`` is the federation's site order."""
    from monai_fedpriv.fl.evaluation import combine_scores

    if "global_dice" not in scored:
        return
    if site in record["sites"]:  # the round lists the sites that trained in it; every site may score its model
        record["sites"][site]["global_dice"] = scored["global_dice"]
    scores = record.setdefault("_scores", {})
    scores[site] = {
        "dice": scored["global_dice"], "n_cases": int(scored.get("n_cases", 1)),
        "dice_per_class": scored.get("dice_per_class", []), "classes": scored.get("classes", []),
    }  # fmt: skip
    combined = combine_scores(scores)
    rank = {name: k for k, name in enumerate(order)}
    record["global"]["per_site"][site] = scored["global_dice"]
    record["global"]["per_site"] = dict(sorted(record["global"]["per_site"].items(), key=lambda kv: rank.get(kv[0], 0)))
    record["global"]["n_cases"] = {s: scores[s]["n_cases"] for s in sorted(scores, key=lambda s: rank.get(s, 0))}
    record["global"]["dice"] = combined["dice"]
    if combined["dice_per_class"]:
        record["global"]["dice_per_class"] = combined["dice_per_class"]


def final_summary(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``final`` block of ``metrics.json``: last and best global Dice (rounds not yet scored are skipped for
    the best), per site and per class, and the number of completed rounds."""
    finals = [r["global"]["dice"] for r in history]
    scored = [i for i, d in enumerate(finals) if d is not None]
    best = max(scored, key=lambda i: finals[i]) if scored else None
    final: dict[str, Any] = {
        "global_dice": finals[-1] if finals else None,
        "global_dice_per_site": history[-1]["global"]["per_site"] if history else {},
        "best_global_dice": finals[best] if best is not None else None,
        "best_round": history[best]["round"] if best is not None else None,
        "rounds_completed": len(history),
    }
    if history and history[-1]["global"].get("dice_per_class"):
        final["global_dice_per_class"] = history[-1]["global"]["dice_per_class"]
    return final
