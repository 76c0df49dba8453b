"""Experiment recipes built on the simulator: federated run, centralised and local-only baselines.

These are what ``monai-fedpriv simulate`` and ``make demo`` run; each writes its own ``metrics.json`` and checkpoint
directory so that ``--resume`` continues every part of an interrupted experiment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle, parser_get
from monai_fedpriv.data.partition import Partition, partition_cases
from monai_fedpriv.errors import BundleError, DataError, FederationError
from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
from monai_fedpriv.fl.strategies import FedAvg, Strategy
from monai_fedpriv.utils.files import write_json

__all__ = ["SiteSplit", "split_sites", "bundle_datalist", "run_experiment"]


@dataclass
class SiteSplit:
    """Per-site training and validation lists, and how they were made."""

    train: dict[str, list[dict[str, Any]]]
    val: dict[str, list[dict[str, Any]]]
    scheme: str
    mean_ks: float | None
    sizes: dict[str, int]

    def describe(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "mean_ks": self.mean_ks,
            "train_sizes": self.sizes,
            "val_sizes": {k: len(v) for k, v in self.val.items()},
        }


def bundle_datalist(bundle: BundleSpec) -> list[dict[str, Any]]:
    """All cases of a bundle, each with ``split`` = ``"train"``/``"val"``.

    Uses the bundle id ``datalist`` (items carry ``split``) or else ``train_datalist`` + ``val_datalist``.
    """
    parser = load_bundle(bundle, required=())
    if parser_get(parser, "datalist") is not None:
        cases = list(parser.get_parsed_content("datalist"))
        bad = [c for c in cases if c.get("split") not in ("train", "val")]
        if bad:
            raise DataError(f"bundle id 'datalist' item {bad[0].get('image')} has no split 'train'/'val'.")
        return cases
    if parser_get(parser, "train_datalist") is None or parser_get(parser, "val_datalist") is None:
        raise BundleError(f"bundle {bundle.root} defines neither 'datalist' nor 'train_datalist' + 'val_datalist'.")
    train = [{**c, "split": "train"} for c in parser.get_parsed_content("train_datalist")]
    val = [{**c, "split": "val"} for c in parser.get_parsed_content("val_datalist")]
    return train + val


def split_sites(cases: Sequence[dict[str, Any]], n_sites: int, scheme: str, seed: int) -> SiteSplit:
    """Partition training and validation cases onto ``n_sites`` sites with the same scheme and seed.

    Validation cases are partitioned separately so that each site is scored on held-out cases drawn the way its
    training cases were (same institution, same skew).
    """
    train_cases = [c for c in cases if c.get("split") == "train"]
    val_cases = [c for c in cases if c.get("split") == "val"]
    if not train_cases:
        raise DataError("the data list has no training cases.")
    feature = "feature" if all("feature" in c for c in cases) else None
    kwargs: dict[str, Any] = {"feature": feature} if feature else {}
    train_part: Partition = partition_cases(train_cases, n_sites, scheme, seed=seed, **kwargs)
    val_sites: dict[str, list[dict[str, Any]]] = {}
    if val_cases:
        val_part = partition_cases(val_cases, n_sites, scheme, seed=seed + 1, **kwargs)
        if scheme == "institution" and train_part.site_institutions != val_part.site_institutions:
            raise DataError(
                f"training and validation cases group institutions differently: {train_part.site_institutions} vs "
                f"{val_part.site_institutions}."
            )
        val_sites = val_part.sites
    return SiteSplit(train_part.sites, val_sites, scheme, train_part.mean_ks, train_part.sizes())


def run_experiment(
    bundle: BundleSpec,
    split: SiteSplit,
    output_dir: Path,
    rounds: int,
    local_work: LocalWork,
    *,
    seed: int = 0,
    momentum: str = "restart",
    strategy_factory: Callable[[], Strategy] = FedAvg,
    baselines: bool = False,
    resume: bool = False,
    device: str = "cpu",
    overrides: Mapping[str, Any] | None = None,
    filters_factory: Callable[[str], list[Any]] | None = None,
    federation: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Federated training plus (optionally) centralised and local-only baselines with the same total epochs.

    ``output_dir/metrics.json`` (the contract file) is rewritten after every federated round, so it is current
    during a run and after a crash; the baselines are added when they finish.

    Args:
        federation: simulator options of the federated run only (``screen``, ``min_sites``, ``faults``,
            ``secure_noise``, ``round_timeout``); the baselines train one model each and are not screened, faulted
            or timed out.
        extra: more top-level entries for ``metrics.json`` (e.g. which data were used).
        on_metrics: called with ``metrics.json``'s content whenever it is written (a tracker).

    Returns:
        The federated metrics with ``partition`` and ``baselines`` sections.
    """
    output_dir = Path(output_dir)
    common: dict[str, Any] = {"seed": seed, "device": device, "overrides": overrides}
    contract = output_dir / "metrics.json"
    previous = json.loads(contract.read_text()) if resume and contract.is_file() else {}

    def with_context(metrics: dict[str, Any]) -> dict[str, Any]:
        out = {**metrics, "partition": split.describe(), **dict(extra or {})}
        if "baselines" in previous:  # keep baselines of the run being resumed until new ones are computed
            out["baselines"] = previous["baselines"]
        return out

    def publish(metrics: dict[str, Any]) -> None:
        write_json(metrics, output_dir / "metrics.json")
        if on_metrics is not None:
            on_metrics(metrics)

    fed = FederatedSimulator(
        bundle,
        split.train,
        split.val,
        rounds,
        local_work,
        output_dir / "federated",
        strategy=strategy_factory(),
        momentum=momentum,
        filters_factory=filters_factory,
        label="federated",
        partition=split.scheme,
        on_round=lambda m: publish(with_context(m)),
        **dict(federation or {}),
        **common,
    )
    try:
        metrics = with_context(_run(fed, resume))
    except FederationError:  # a stopped federation still leaves its metrics (with the reason) in the contract file
        if (output_dir / "federated" / "metrics.json").is_file():
            latest = json.loads((output_dir / "federated" / "metrics.json").read_text())
            publish(with_context(latest))
        raise
    if baselines:
        metrics["baselines"] = _baselines(bundle, split, output_dir, rounds, local_work, resume, common)
    publish(metrics)
    return metrics


def _run(sim: FederatedSimulator, resume: bool) -> dict[str, Any]:
    if resume and not sim.checkpoint_path.is_file():
        print(f"[{sim.label}] --resume: no checkpoint at {sim.checkpoint_path}, starting at round 1", flush=True)
    return sim.run(resume=resume and sim.checkpoint_path.is_file())


def _baselines(
    bundle: BundleSpec,
    split: SiteSplit,
    output_dir: Path,
    rounds: int,
    local_work: LocalWork,
    resume: bool,
    common: dict[str, Any],
) -> dict[str, Any]:
    # one "site" training continuously (momentum kept) for the same number of passes over its data
    union = [c for cases in split.train.values() for c in cases]
    bundle = _local_setting(bundle)
    # same total work: an epoch over the union, or as many steps per round as all sites together
    central_work = local_work if local_work.steps is None else LocalWork(None, local_work.steps * len(split.train))
    central = FederatedSimulator(
        bundle,
        {"central": union},
        split.val,
        rounds,
        central_work,
        output_dir / "baselines" / "centralised",
        momentum="local",
        label="centralised",
        **common,
    )
    central_m = _run(central, resume)
    out: dict[str, Any] = {
        "centralised": {
            "global_dice": central_m["final"]["global_dice"],
            "per_site": central_m["final"]["global_dice_per_site"],
            "rounds": [r["global"]["dice"] for r in central_m["rounds"]],
        },
        "local_only": {},
    }
    for name, cases in split.train.items():
        local = FederatedSimulator(
            bundle,
            {name: cases},
            split.val,
            rounds,
            local_work,
            output_dir / "baselines" / f"local-{name}",
            momentum="local",
            label=f"local {name}",
            **common,
        )
        m = _run(local, resume)
        per_site = m["final"]["global_dice_per_site"]
        others = [v for k, v in per_site.items() if k != name and v is not None]
        out["local_only"][name] = {
            "own_site_dice": per_site.get(name),
            "other_sites_dice": sum(others) / len(others) if others else None,
            "per_site": per_site,
            "global_dice": m["final"]["global_dice"],
        }
    return out


def _local_setting(bundle: BundleSpec) -> BundleSpec:
    """Baselines train one model alone: under DP they get the local-setting budget of Table 1, not the federated."""
    regime = bundle.overrides.get("dp_regime_def")
    if not isinstance(regime, dict) or regime.get("setting") != "federated":
        return bundle
    return BundleSpec(
        bundle.root, bundle.config_files, {**bundle.overrides, "dp_regime_def": {**regime, "setting": "local"}}
    )
