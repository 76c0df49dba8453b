"""Command line: ``monai-fedpriv simulate | privacy | attack | data``.

``simulate`` runs the in-process federation of a bundle (and, with ``--baselines``, centralised and local-only
training with the same total epochs) and writes ``DIR/metrics.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_simulate_parser"]

PARTITIONS = ("iid", "institution", "quantity", "skew-low", "skew-mid", "skew-high")


def build_simulate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="monai-fedpriv simulate",
        description="Simulate federated training of a MONAI bundle over N sites on this machine.",
    )
    p.add_argument("bundle_dir", type=Path, help="MONAI bundle directory (with configs/train.json)")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    work = p.add_mutually_exclusive_group()
    work.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (default 1)")
    work.add_argument("--local-steps", type=int, default=None, help="local optimiser steps per round")
    p.add_argument("--partition", choices=PARTITIONS, default="institution", help="how cases are split onto sites")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last completed round in --output")
    p.add_argument("--output", type=Path, required=True, help="run directory (metrics.json, report.md, checkpoints)")
    p.add_argument(
        "--config-files",
        nargs="+",
        default=["train.json"],
        help="bundle config files merged in order, e.g. train.json dp.json (default train.json)",
    )
    p.add_argument(
        "--momentum",
        choices=("restart", "local", "aggregate"),
        default="restart",
        help="client optimiser state across rounds (Li et al. 2019): default restart",
    )
    p.add_argument("--aggregator", choices=("fedavg", "fedavgm"), default="fedavg")
    p.add_argument(
        "--weighting",
        choices=("steps", "samples", "uniform"),
        default="steps",
        help="FedAvg weights: local steps (Li et al. Alg. 3), samples, or plain mean",
    )
    p.add_argument("--server-momentum", type=float, default=0.9, help="FedAvgM server momentum")
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also train centralised and local-only models with the same total epochs",
    )
    priv = p.add_argument_group("privacy (DP-SGD at every site, Ziller et al. Table 1 regimes)")
    priv.add_argument(
        "--privacy",
        choices=("none", "low", "medium", "high", "custom"),
        default="none",
        help="add the bundle's configs/dp.json with this regime (default none)",
    )
    priv.add_argument("--noise-multiplier", type=float, default=None, help="custom (or overridden) noise multiplier")
    priv.add_argument("--max-grad-norm", type=float, default=None, help="custom (or overridden) per-sample clip norm")
    priv.add_argument("--delta", type=float, default=None, help="custom (or overridden) delta")
    priv.add_argument(
        "--epsilon-budget",
        type=float,
        default=None,
        help="per-site epsilon budget (default: the regime's; training stops before passing it)",
    )
    priv.add_argument(
        "--budget-policy",
        choices=("stop_site", "stop_federation"),
        default=None,
        help="when a site's budget runs out: continue without it (default) or stop everyone",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-report", action="store_true", help="skip report.md and figures")
    return p


def privacy_overrides(args: argparse.Namespace, config_files: list[str]) -> tuple[list[str], dict]:
    """Config files and overrides for ``--privacy``: ``dp.json`` merged last, with the regime's values."""
    custom = {
        k: v
        for k, v in (
            ("noise_multiplier", args.noise_multiplier),
            ("max_grad_norm", args.max_grad_norm),
            ("delta", args.delta),
            ("budget", args.epsilon_budget),
        )
        if v is not None
    }
    if args.privacy == "none":
        if custom or args.budget_policy:
            raise ValueError("--noise-multiplier/--max-grad-norm/--delta/--epsilon-budget need --privacy.")
        return config_files, {}
    if args.privacy == "custom" and not {"noise_multiplier", "max_grad_norm"} <= set(custom):
        raise ValueError("--privacy custom needs --noise-multiplier and --max-grad-norm.")
    if not (Path(args.bundle_dir) / "configs" / "dp.json").is_file():
        raise ValueError(f"--privacy needs {args.bundle_dir}/configs/dp.json (see bundles/brain_tissue_2d).")
    if "dp.json" not in config_files:
        config_files.append("dp.json")
    overrides: dict = {
        "dp_regime_def": {
            "_target_": "monai_fedpriv.privacy.regimes.get_regime",
            "name": args.privacy,
            "setting": "federated" if args.sites > 1 else "local",
            **custom,
        },
    }
    if args.budget_policy:
        overrides["dp_policy"] = args.budget_policy
    return config_files, overrides


def simulate_main(argv: list[str]) -> int:
    args = build_simulate_parser().parse_args(argv)
    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.experiments import bundle_datalist, run_experiment, split_sites
    from monai_fedpriv.fl.aggregation import FedAvg, FedAvgM
    from monai_fedpriv.fl.simulator import LocalWork

    if args.sites < 1:
        print(f"error: --sites should be >= 1, got {args.sites}", file=sys.stderr)
        return 2
    local_work = (
        LocalWork(epochs=None, steps=args.local_steps) if args.local_steps else LocalWork(epochs=args.local_epochs or 1)
    )
    try:
        config_files, overrides = privacy_overrides(args, list(args.config_files))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bundle = BundleSpec(args.bundle_dir, tuple(config_files), overrides)
    print(f"loading data list of {args.bundle_dir} ...", flush=True)
    cases = bundle_datalist(bundle)
    split = split_sites(cases, args.sites, args.partition, args.seed)
    print(f"partition {args.partition}: train {split.sizes}, mean KS {split.mean_ks}", flush=True)

    def aggregator():
        if args.aggregator == "fedavgm":
            return FedAvgM(momentum=args.server_momentum, weighting=args.weighting)
        return FedAvg(weighting=args.weighting)

    metrics = run_experiment(
        bundle,
        split,
        args.output,
        args.rounds,
        local_work,
        seed=args.seed,
        momentum=args.momentum,
        aggregator_factory=aggregator,
        baselines=args.baselines,
        resume=args.resume,
        device=args.device,
    )
    if not args.no_report:
        import torch

        from monai_fedpriv.report.markdown import write_report
        from monai_fedpriv.report.segmentations import plot_example_segmentations

        weights = torch.load(args.output / "federated" / "models" / "model.pt", map_location="cpu")
        seg = plot_example_segmentations(bundle, weights, split.val, args.output / "figures" / "segmentations.png")
        report = write_report(metrics, args.output, {"Example segmentations of the federated model": seg})
        print(f"report: {report}")
    print(f"metrics: {args.output / 'metrics.json'}; final global Dice {metrics['final']['global_dice']:.4f}")
    return 0


def data_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="monai-fedpriv data", description="Build the embedded default data set.")
    p.add_argument("--output", type=Path, default=None, help="target folder (default $MONAI_FEDPRIV_DATA or cache)")
    args = p.parse_args(argv)
    from monai_fedpriv.data.brain_tissue import ensure_default_data

    print(ensure_default_data(args.output))
    return 0


COMMANDS = {
    "simulate": ("monai_fedpriv.cli", "simulate_main"),
    "data": ("monai_fedpriv.cli", "data_main"),
    "privacy": ("monai_fedpriv.privacy.cli", "privacy_main"),
    "attack": ("monai_fedpriv.attacks.cli", "attack_main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            "usage: monai-fedpriv {" + ",".join(COMMANDS) + "} ...\n\n"
            "  simulate  federated training of a bundle over in-process sites (+ baselines, report)\n"
            "  privacy   epsilon of DP-SGD for (sample rate, noise multiplier, steps, delta)\n"
            "  attack    gradient-inversion audit of one site's update\n"
            "  data      build the embedded default data set",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import importlib

    module, func = COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
