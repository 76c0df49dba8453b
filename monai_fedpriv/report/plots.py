"""Matplotlib figures (Agg backend, PNG) of a run's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_dice_per_round", "plot_baselines", "save_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder created) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_dice_per_round(metrics: dict[str, Any], path: Path) -> Path:
    """Global Dice and each site's local-model Dice per round; centralised baseline as a reference line."""
    plt = _pyplot()
    rounds = metrics["rounds"]
    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(xs, [r["global"]["dice"] for r in rounds], "k-o", lw=2, ms=3, label="global model (all sites' val)")
    sites = sorted({s for r in rounds for s in r["sites"]})
    for s in sites:
        ax.plot(xs, [r["sites"].get(s, {}).get("dice") for r in rounds], "--", lw=1, label=f"{s} local model")
    central = metrics.get("baselines", {}).get("centralised", {}).get("rounds")
    if central:
        ax.plot(range(1, len(central) + 1), central, ":", color="tab:gray", lw=2, label="centralised")
    ax.set_xlabel("federated round")
    ax.set_ylabel("mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Dice per round")
    return save_figure(fig, path)


def plot_baselines(metrics: dict[str, Any], path: Path) -> Path | None:
    """Bar chart: federated vs centralised vs each local-only model, on own site and on the other sites."""
    base = metrics.get("baselines")
    if not base:
        return None
    plt = _pyplot()
    labels = ["federated", "centralised"]
    values = [metrics["final"]["global_dice"], base["centralised"]["global_dice"]]
    for site, res in base["local_only"].items():
        labels += [f"local {site}\nown site", f"local {site}\nother sites"]
        values += [res["own_site_dice"], res["other_sites_dice"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(labels)), 4), dpi=110)
    colors = ["tab:blue", "tab:gray"] + ["tab:green", "tab:red"] * len(base["local_only"])
    ax.bar(range(len(labels)), [v or 0 for v in values], color=colors)
    for i, v in enumerate(values):
        ax.text(i, (v or 0) + 0.01, f"{v:.3f}" if v is not None else "n/a", ha="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean foreground Dice")
    ax.set_title("Final Dice: federated vs baselines")
    return save_figure(fig, path)
