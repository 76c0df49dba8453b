"""Recipe for the shape of Table 3 of Ziller et al.: Dice of local and federated training under each privacy regime.

Every cell is one :class:`~monai_fedpriv.fl.simulator.FederatedSimulator` run of the bundle with ``dp.json`` merged
last and the Table 1 regime of its setting (``local`` budgets for one site alone, ``federated`` budgets for the
federation); the budget stop applies, so a cell may end before its last round. ``none`` is the same run without
``dp.json``. Each cell writes its own ``metrics.json`` and checkpoints under ``output_dir/cells/<setting>-<regime>``,
so an interrupted table resumes cell by cell.

Example::

    results = run_dp_table(Path("bundles/brain_tissue_2d"), {"dataset_dir": "runs/dp_table/data"},
                           Path("runs/dp_table"), rounds=8)
    results["cells"]["federated"]["medium"]["dice"]
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.experiments import bundle_datalist, split_sites
from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
from monai_fedpriv.privacy.regimes import get_regime
from monai_fedpriv.utils.files import write_json

__all__ = ["PRIVACY_LEVELS", "SETTINGS", "dp_table_bundle", "run_dp_table", "summarise_cell"]

PRIVACY_LEVELS = ("none", "low", "medium", "high")
SETTINGS = ("local", "federated")


def dp_table_bundle(
    bundle_dir: Path, overrides: Mapping[str, Any], regime: str, setting: str, policy: str = "stop_site"
) -> BundleSpec:
    """The bundle of one cell: ``train.json`` (+ ``dp.json`` with the Table 1 regime of ``setting``)."""
    if regime not in PRIVACY_LEVELS:
        raise ValueError(f"regime must be one of {PRIVACY_LEVELS}, got {regime!r}.")
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}.")
    if regime == "none":
        return BundleSpec(Path(bundle_dir), ("train.json",), dict(overrides))
    get_regime(regime, setting)  # fail early on a bad regime
    dp = {
        "dp_setting": setting,
        "dp_regime_def": {
            "_target_": "monai_fedpriv.privacy.regimes.get_regime",
            "name": regime,
            "setting": setting,
        },
        "privacy_policy": policy,
    }
    return BundleSpec(Path(bundle_dir), ("train.json", "budget.json", "dp.json"), {**overrides, **dp})


def summarise_cell(metrics: Mapping[str, Any], setting: str, regime: str, local_site: str) -> dict[str, Any]:
    """One table cell from a run's metrics: final Dice, epsilon spent, steps, and whether the budget stopped it."""
    rounds = metrics["rounds"]
    final = metrics["final"]
    last_privacy: dict[str, dict[str, Any]] = {}
    stopped: dict[str, str] = {}
    for r in rounds:
        for site, res in r["sites"].items():
            if isinstance(res.get("privacy"), dict):
                last_privacy[site] = res["privacy"]
            if res.get("stopped"):
                stopped.setdefault(site, f"round {r['round']}: {res['stopped']}")
    glob = rounds[-1]["global"].get("privacy") if rounds else None
    per_site = final.get("global_dice_per_site", {})
    budget = next((p.get("budget") for p in last_privacy.values()), None)
    return {
        "setting": setting,
        "regime": regime,
        "dice": final["global_dice"],
        "own_site_dice": per_site.get(local_site) if setting == "local" else None,
        "dice_per_site": per_site,
        "best_dice": final["best_global_dice"],
        "epsilon": glob["epsilon"] if glob else None,
        "delta": glob.get("delta") if glob else None,
        "budget": budget,
        "steps": max((p["steps"] for p in last_privacy.values()), default=None),
        "sample_rate": next((p.get("sample_rate") for p in last_privacy.values()), None),
        "noise_multiplier": next((p.get("noise_multiplier") for p in last_privacy.values()), None),
        "max_grad_norm": next((p.get("max_grad_norm") for p in last_privacy.values()), None),
        "stopped": stopped,
        "stopped_on_budget": any("budget" in v for v in stopped.values()),
        "rounds_completed": final["rounds_completed"],
        "dice_per_round": [r["global"]["dice"] for r in rounds],
    }


def run_dp_table(
    bundle_dir: Path,
    overrides: Mapping[str, Any],
    output_dir: Path,
    rounds: int,
    local_work: LocalWork | None = None,
    *,
    n_sites: int = 3,
    local_site: str = "site-1",
    regimes: Sequence[str] = PRIVACY_LEVELS,
    settings: Sequence[str] = SETTINGS,
    partition: str = "institution",
    seed: int = 0,
    policy: str = "stop_site",
    progress: bool = True,
) -> dict[str, Any]:
    """Run every (setting, regime) cell and write ``output_dir/results.json``.

    Args:
        bundle_dir: the bundle (needs ``configs/dp.json``).
        overrides: bundle overrides shared by every cell (e.g. ``dataset_dir``).
        output_dir: results folder; cells go to ``cells/<setting>-<regime>``.
        rounds: federated rounds; the local cell trains ``local_site`` alone for as many rounds (same local work).
        local_work: local work per round (default one epoch).
        n_sites: sites of the federated setting.
        local_site: the site trained alone in the local setting.
        regimes, settings: which cells to run.
        partition, seed: site split and run seed.
        policy: budget policy of the DP cells.
        progress: print one line per round.

    Returns:
        ``{"config": ..., "cells": {setting: {regime: cell}}, "target": ...}`` (see :func:`summarise_cell`).
    """
    output_dir = Path(output_dir)
    work = local_work or LocalWork(epochs=1)
    base = dp_table_bundle(Path(bundle_dir), overrides, "none", "federated")
    split = split_sites(bundle_datalist(base), n_sites, partition, seed)
    if local_site not in split.train:
        raise ValueError(f"local_site {local_site!r} is not one of the sites {sorted(split.train)}.")
    cells: dict[str, dict[str, Any]] = {s: {} for s in settings}
    for setting in settings:
        train = split.train if setting == "federated" else {local_site: split.train[local_site]}
        for regime in regimes:
            bundle = dp_table_bundle(Path(bundle_dir), overrides, regime, setting, policy)
            out = output_dir / "cells" / f"{setting}-{regime}"
            sim = FederatedSimulator(
                bundle,
                train,
                split.val,
                rounds,
                work,
                out,
                seed=seed,
                momentum="restart" if setting == "federated" else "local",
                progress=progress,
                label=f"{setting} {regime}",
            )
            t0 = time.perf_counter()
            metrics = sim.run(resume=sim.checkpoint_path.is_file())
            cell = summarise_cell(metrics, setting, regime, local_site)
            cell["seconds"] = round(time.perf_counter() - t0, 1)
            cells[setting][regime] = cell
    results = {
        "config": {
            "bundle": str(bundle_dir),
            "rounds": rounds,
            "local_work": work.describe(),
            "n_sites": n_sites,
            "local_site": local_site,
            "train_sizes": split.sizes,
            "val_sizes": {k: len(v) for k, v in split.val.items()},
            "partition": partition,
            "seed": seed,
            "policy": policy,
            "budgets": {s: {r: get_regime(r, s).budget for r in regimes if r != "none"} for s in settings},
        },
        "cells": cells,
        "target": medium_target(cells),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, output_dir / "results.json")
    return results


def medium_target(cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """Issue 3's target: federated Dice under the medium regime >= 95% of the non-private federated Dice."""
    fed = cells.get("federated", {})
    if "medium" not in fed or "none" not in fed or not fed["none"].get("dice"):
        return None
    ratio = fed["medium"]["dice"] / fed["none"]["dice"]
    return {"ratio": ratio, "required": 0.95, "met": ratio >= 0.95}
