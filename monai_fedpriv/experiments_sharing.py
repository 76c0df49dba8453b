"""Recipes for the update filters of Li et al. 2019 (selective sharing, SVT, Gaussian update privacy).

:func:`share_filter_overrides` turns a method and its settings into bundle overrides that fill the
``fed_share_filters`` slot of ``train.json`` (and ``fed_share_stateful``, plus a ``privacy_ledger`` when the bundle
has none), exactly what ``monai-fedpriv simulate --share ...`` passes to the simulator. :func:`validate_share` builds
the filter once with the given settings, so bad values fail before any data is loaded.

:func:`run_sharing_study` runs the grid behind ``scripts/reproduce_sharing_figures.py`` (the shape of Li et al.
Figures 2 and 3: Dice against the shared fraction and clip, and Dice against epsilon for the SVT).

Example::

    overrides = share_filter_overrides("svt", fraction=0.1, clip=1e-3, epsilon_select=1.0, epsilon3=1.0,
                                       threshold=5e-4, define_ledger=True)
    bundle = BundleSpec(root, ("train.json", "fed.json"), overrides)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle, parser_get

__all__ = [
    "SHARE_METHODS",
    "ShareSettings",
    "share_filter_overrides",
    "validate_share",
    "bundle_defines",
    "run_sharing_study",
]

SHARE_METHODS = ("percentile", "svt", "gaussian")

# number of floating-point coordinates of the bundle's network, as the filters count them
_FLOAT_SIZE = "$sum(p.numel() for p in @network_def.state_dict().values() if p.is_floating_point())"
# the filters' generators: derived from the site seed, but a different stream from DP-SGD's (which uses site_seed)
_SHARE_SEED = "$(int(@site_seed) * 1000003 + 7919) % (2 ** 62)"


@dataclass(frozen=True)
class ShareSettings:
    """One share filter and its settings, as ``monai-fedpriv simulate --share ...`` takes them.

    Args:
        method: ``"percentile"`` (:class:`~monai_fedpriv.privacy.selective.PercentileSharing`, no DP),
            ``"svt"`` (:class:`~monai_fedpriv.privacy.svt.SparseVectorFilter`, selection budget ``epsilon_select``
            split by :func:`~monai_fedpriv.privacy.svt.lyu_budget_split`) or ``"gaussian"``
            (:class:`~monai_fedpriv.privacy.gaussian_update.GaussianUpdatePrivacy`).
        fraction, clip: shared fraction ``q`` and clip ``gamma`` (percentile, svt).
        epsilon_select, epsilon3, threshold: SVT budget of the selection (``eps1 + eps2``), of the answers, and the
            public threshold ``h``.
        clip_norm, noise_multiplier, delta: Gaussian update privacy (``delta`` only for the reported epsilon).
    """

    method: str
    fraction: float | None = None
    clip: float | None = None
    epsilon_select: float | None = None
    epsilon3: float | None = None
    threshold: float | None = None
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None

    def validate(self) -> None:
        """Build the filter once (with a throw-away generator), so bad values raise ``PrivacyConfigError`` before
        any data is loaded."""
        from monai_fedpriv.privacy.gaussian_update import GaussianUpdatePrivacy
        from monai_fedpriv.privacy.selective import PercentileSharing
        from monai_fedpriv.privacy.svt import SparseVectorFilter, lyu_budget_split

        v: Any = self  # the filters check for None themselves, with messages naming the setting
        if v.method == "percentile":
            PercentileSharing(v.fraction, v.clip)
        elif v.method == "svt":
            eps1, eps2 = lyu_budget_split(v.epsilon_select, 1)
            SparseVectorFilter(v.fraction, eps1, eps2, v.epsilon3, v.clip, v.threshold, generator=0)
        elif v.method == "gaussian":
            GaussianUpdatePrivacy(v.clip_norm, v.noise_multiplier, generator=0, delta=v.delta)
        else:
            raise ValueError(f"share method must be one of {SHARE_METHODS}, got {v.method!r}.")

    def overrides(self, define_ledger: bool = True) -> dict[str, Any]:
        """Bundle overrides that make every site send its update through this filter.

        Args:
            define_ledger: also define ``privacy_ledger`` (set ``False`` when the bundle's config files, e.g.
                ``dp.json``, already define it, so that DP-SGD and the filter record into one ledger).

        Returns:
            ``{id: value}`` overrides; the filter is ``share_filter``, built per site with a generator seeded from
            ``@site_seed``.
        """
        method = self.method
        if method not in SHARE_METHODS:
            raise ValueError(f"share method must be one of {SHARE_METHODS}, got {method!r}.")
        out: dict[str, Any] = {}
        stateful: dict[str, Any] = {}
        if method == "percentile":
            out["share_filter"] = {
                "_target_": "monai_fedpriv.privacy.selective.PercentileSharing",
                "fraction": self.fraction,
                "clip": self.clip,
            }
        elif method == "svt":
            out.update(
                {
                    "share_fraction": self.fraction,
                    "share_count": {
                        "_target_": "monai_fedpriv.privacy.filters.shared_count",
                        "fraction": "@share_fraction",
                        "size": _FLOAT_SIZE,
                    },
                    "share_budget": {
                        "_target_": "monai_fedpriv.privacy.svt.lyu_budget_split",
                        "epsilon": self.epsilon_select,
                        "count": "@share_count",
                    },
                    "share_filter": {
                        "_target_": "monai_fedpriv.privacy.svt.SparseVectorFilter",
                        "fraction": "@share_fraction",
                        "epsilon1": "$@share_budget[0]",
                        "epsilon2": "$@share_budget[1]",
                        "epsilon3": self.epsilon3,
                        "clip": self.clip,
                        "threshold": self.threshold,
                        "ledger": "@privacy_ledger",
                        "generator": _SHARE_SEED,
                    },
                }
            )
            stateful["share_filter"] = "@share_filter"
        else:
            out["share_filter"] = {
                "_target_": "monai_fedpriv.privacy.gaussian_update.GaussianUpdatePrivacy",
                "clip_norm": self.clip_norm,
                "noise_multiplier": self.noise_multiplier,
                "ledger": "@privacy_ledger",
                "generator": _SHARE_SEED,
                "delta": self.delta,
            }
            stateful["share_filter"] = "@share_filter"
        if method != "percentile" and define_ledger:
            out["privacy_ledger"] = {"_target_": "monai_fedpriv.privacy.accounting.PrivacyLedger"}
            stateful["share_ledger"] = "@privacy_ledger"  # without dp.json nothing else checkpoints the ledger
        out["fed_share_filters"] = "$[@share_filter]"
        out["fed_share_stateful"] = stateful
        return out


def share_filter_overrides(method: str, *, define_ledger: bool = True, **settings: Any) -> dict[str, Any]:
    """``ShareSettings(method, **settings).overrides(define_ledger)``."""
    return ShareSettings(method, **settings).overrides(define_ledger)


def validate_share(method: str, **settings: Any) -> None:
    """``ShareSettings(method, **settings).validate()``."""
    ShareSettings(method, **settings).validate()


def bundle_defines(bundle: BundleSpec, rid: str) -> bool:
    """Whether the bundle's config files (and overrides) define ``rid`` (nothing is instantiated)."""
    return parser_get(load_bundle(bundle, required=()), rid) is not None


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
            kwargs = {k: v for k, v in setting.items() if k not in ("name", "method", "group")}
            method = setting.get("method")
            overrides = dict(bundle.overrides)
            if method is not None:
                overrides.update(share_filter_overrides(str(method), **kwargs))
            spec = BundleSpec(bundle.root, bundle.config_files, overrides)
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
