"""Recipes for the update filters of Li et al. 2019 (selective sharing, SVT, Gaussian update privacy).

:class:`ShareSettings` turns a method and its settings into the shared override file that wires it
(``percentile.json``, ``svt.json`` or ``gaussian.json``) and the values of that file's ids: exactly what
``monai-fedpriv simulate --share ...`` merges. The override files are the one place the filters are wired.

:func:`run_sharing_study` runs the grid behind ``scripts/reproduce_sharing_figures.py`` (the shape of Li et al.
Figures 2 and 3: Dice against the shared fraction and clip, and Dice against epsilon for the SVT).

Example::

    share = ShareSettings("svt", fraction=0.1, clip=1e-3, epsilon_select=1.0, epsilon3=1.0, threshold=5e-4)
    bundle = BundleSpec(root, ("train.json", "fed.json", "budget.json", share.config_file),
                        {**share.overrides(), "privacy_epsilon_budget": 20.0})
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_fedpriv.bundle.loader import BundleSpec

__all__ = ["SHARE_METHODS", "ShareSettings", "run_sharing_study"]

SHARE_METHODS = ("percentile", "svt", "gaussian")


@dataclass(frozen=True)
class ShareSettings:
    """One share filter and its settings, as ``monai-fedpriv simulate --share ...`` takes them.

    Args:
        method: ``"percentile"`` (:class:`~monai_fedpriv.privacy.PercentileSharing`, no DP), ``"svt"``
            (:class:`~monai_fedpriv.privacy.SparseVectorFilter`, selection budget ``epsilon_select`` split as Lyu et
            al. recommend) or ``"gaussian"`` (:class:`~monai_fedpriv.privacy.GaussianUpdatePrivacy`).
        fraction, clip: shared fraction ``q`` and clip ``gamma`` (percentile, svt).
        epsilon_select, epsilon3, threshold: SVT budget of the selection (``eps1 + eps2``), of the answers, and the
            public threshold ``h``.
        clip_norm, noise_multiplier: Gaussian update privacy.
    """

    method: str
    fraction: float | None = None
    clip: float | None = None
    epsilon_select: float | None = None
    epsilon3: float | None = None
    threshold: float | None = None
    clip_norm: float | None = None
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if self.method not in SHARE_METHODS:
            raise ValueError(f"share method must be one of {SHARE_METHODS}, got {self.method!r}.")

    @property
    def config_file(self) -> str:
        """The shared override file that wires the filter."""
        return f"{self.method}.json"

    @property
    def needs_budget(self) -> bool:
        """Whether the filter releases under a DP guarantee (and so spends from the site's budget)."""
        return self.method in ("svt", "gaussian")

    def overrides(self) -> dict[str, Any]:
        """Values of the override file's ids (settings left ``None`` keep the file's defaults)."""
        ids = {
            "percentile": {"percentile_fraction": self.fraction, "percentile_clip": self.clip},
            "svt": {
                "svt_fraction": self.fraction,
                "svt_clip": self.clip,
                "svt_threshold": self.threshold,
                "svt_epsilon_select": self.epsilon_select,
                "svt_epsilon3": self.epsilon3,
            },
            "gaussian": {"gaussian_clip_norm": self.clip_norm, "gaussian_noise_multiplier": self.noise_multiplier},
        }[self.method]
        out: dict[str, Any] = {k: v for k, v in ids.items() if v is not None}
        if self.method == "percentile":
            out["percentile_clip"] = self.clip  # None is a value here: no clipping
        return out


# ------------------------------------------------------------------------------------------------- the study
def run_sharing_study(
    bundle: BundleSpec,
    output: Path,
    settings: Sequence[Mapping[str, Any]],
    rounds: int,
    n_sites: int = 3,
    partition: str = "institution",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run one federation per setting (``{"name", "method", ...share_filter_overrides kwargs}``) and collect results.

    Every run has momentum restart, one local epoch per round and FedAvg weighted by local steps (Li et al.'s
    setting). A run already finished in ``output/runs/NAME/metrics.json`` is read back instead of re-run.
    """
    from monai_fedpriv.experiments import bundle_datalist, run_experiment, split_sites
    from monai_fedpriv.fl.simulator import LocalWork

    output.mkdir(parents=True, exist_ok=True)
    split = split_sites(bundle_datalist(bundle), n_sites, partition, seed)
    results = []
    for setting in settings:
        name = str(setting["name"])
        run_dir = output / "runs" / name
        metrics_path = run_dir / "metrics.json"
        t0 = time.perf_counter()
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        if metrics is None or metrics.get("final", {}).get("rounds_completed") != rounds:
            kwargs = {k: v for k, v in setting.items() if k not in ("name", "method", "group", "epsilon_budget")}
            method = setting.get("method")
            overrides = dict(bundle.overrides)
            files = list(bundle.config_files)
            if method is not None:
                share = ShareSettings(str(method), **kwargs)
                overrides.update(share.overrides())
                if share.needs_budget:
                    files.append("budget.json")
                    overrides["privacy_epsilon_budget"] = float(setting.get("epsilon_budget", 1e6))
                files.append(share.config_file)
            spec = BundleSpec(bundle.root, tuple(files), overrides)
            metrics = run_experiment(spec, split, run_dir, rounds, LocalWork(epochs=1), seed=seed, momentum="restart")
        results.append(summarise(setting, metrics, time.perf_counter() - t0))
        log(f"{name}: final global Dice {results[-1]['final_dice']:.4f}, best {results[-1]['best_dice']:.4f}")
    return results


def summarise(setting: Mapping[str, Any], metrics: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """One row of the study: final/best global Dice, bytes ratio, fraction shared and epsilon of the last round."""
    rounds = metrics["rounds"]
    last = rounds[-1]
    sites = [s for s in last["sites"].values() if "bytes_sent" in s]
    sent = sum(s["bytes_sent"] or 0 for s in sites)
    dense = sum(s["dense_bytes"] or 0 for s in sites)
    privs = [s.get("privacy") or {} for s in sites]
    fractions = [p["fraction_shared"] for p in privs if p.get("fraction_shared") is not None]
    eps = [p["epsilon"] for p in privs if p.get("epsilon") is not None]
    svt = [f for p in privs for f in p.get("filters", []) if f.get("filter") == "svt"]
    row = {k: v for k, v in setting.items()}
    row.update(
        {
            "final_dice": metrics["final"]["global_dice"],
            "best_dice": metrics["final"]["best_global_dice"],
            "dice_per_round": [r["global"]["dice"] for r in rounds],
            "dense_over_sent": dense / sent if sent else None,
            "fraction_shared": sum(fractions) / len(fractions) if fractions else 1.0,
            "epsilon_total": max(eps) if eps else None,
            "epsilon_per_round": (max(eps) / len(rounds)) if eps else None,
            "svt_noise_scales": svt[0]["noise_scales"] if svt else None,
            "seconds": round(seconds, 1),
        }
    )
    return row
