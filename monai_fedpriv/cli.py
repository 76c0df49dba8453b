"""Command line: ``monai-fedpriv simulate | privacy | attack | data``.

``simulate`` runs the in-process federation of a bundle (and, with ``--baselines``, centralised and local-only
training with the same total epochs) and writes ``DIR/metrics.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_simulate_parser", "privacy_overrides", "share_overrides"]

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
    share = p.add_argument_group(
        "update sharing (Li et al. 2019, section 2.2): filters on what every site sends, after DP-SGD if any"
    )
    share.add_argument(
        "--share",
        choices=("none", "percentile", "svt", "gaussian"),
        default="none",
        help="percentile: largest fraction of |dw| (no DP); svt: sparse vector technique (pure DP per round); "
        "gaussian: clip the update norm and add Gaussian noise (client-level DP); default none",
    )
    share.add_argument("--share-fraction", type=float, default=None, help="fraction q shared (default 0.1)")
    share.add_argument(
        "--share-clip",
        type=float,
        default=None,
        help="clip gamma per local iteration (percentile: default none; svt: default 1e-3)",
    )
    share.add_argument(
        "--svt-epsilon",
        type=float,
        default=None,
        help="SVT selection budget eps1 + eps2 per round, split as Lyu et al. 2017 recommend (default 1)",
    )
    share.add_argument("--svt-epsilon3", type=float, default=None, help="SVT budget of the released values (default 1)")
    share.add_argument(
        "--svt-threshold", type=float, default=None, help="SVT public threshold h on |dw| (default gamma / 2)"
    )
    share.add_argument("--gaussian-clip", type=float, default=None, help="L2 clip norm C of the update (gaussian)")
    share.add_argument("--gaussian-noise", type=float, default=None, help="noise multiplier sigma (gaussian)")
    share.add_argument(
        "--share-delta",
        type=float,
        default=None,
        help="delta of the reported epsilon for --share gaussian without --privacy (default 1e-5)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="ID=JSON",
        help="bundle config override applied last, e.g. --override learning_rate=0.001 (repeatable)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-report", action="store_true", help="skip report.md and figures")
    return p


def parse_overrides(items: list[str]) -> dict:
    """``["a#b=1", "c=\"x\""]`` -> ``{"a#b": 1, "c": "x"}``; a value that is not JSON is taken as a string."""
    import json

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override expects ID=VALUE, got {item!r}.")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


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


SHARE_OPTIONS = {
    "percentile": ("share_fraction", "share_clip"),
    "svt": ("share_fraction", "share_clip", "svt_epsilon", "svt_epsilon3", "svt_threshold"),
    "gaussian": ("gaussian_clip", "gaussian_noise", "share_delta"),
}


def share_overrides(args: argparse.Namespace, config_files: list[str] | None = None) -> dict:
    """Overrides for ``--share``: the ``fed_share_filters`` slot (+ ``fed_share_stateful``, ``privacy_ledger``).

    The filter is built once here with the given values, so a bad value raises ``ValueError`` (the CLI exits 2)
    before any data is loaded; every site then builds its own with a generator seeded from ``@site_seed``.
    """
    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.errors import PrivacyConfigError
    from monai_fedpriv.experiments_sharing import bundle_defines, share_filter_overrides, validate_share

    given = {name for names in SHARE_OPTIONS.values() for name in names if getattr(args, name, None) is not None}
    if args.share == "none":
        if given:
            raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in sorted(given))} need --share.")
        return {}
    unused = given - set(SHARE_OPTIONS[args.share])
    if unused:
        names = ", ".join("--" + n.replace("_", "-") for n in sorted(unused))
        raise ValueError(f"{names}: not used by --share {args.share}.")
    if args.share == "gaussian":
        if args.gaussian_clip is None or args.gaussian_noise is None:
            raise ValueError("--share gaussian needs --gaussian-clip and --gaussian-noise.")
        settings = {
            "clip_norm": args.gaussian_clip,
            "noise_multiplier": args.gaussian_noise,
            "delta": args.share_delta if args.share_delta is not None else (None if args.privacy != "none" else 1e-5),
        }
    else:
        settings = {"fraction": 0.1 if args.share_fraction is None else args.share_fraction, "clip": args.share_clip}
        if args.share == "svt":
            clip = 1e-3 if args.share_clip is None else args.share_clip
            settings.update(
                clip=clip,
                epsilon_select=1.0 if args.svt_epsilon is None else args.svt_epsilon,
                epsilon3=1.0 if args.svt_epsilon3 is None else args.svt_epsilon3,
                threshold=clip / 2 if args.svt_threshold is None else args.svt_threshold,
            )
    try:
        validate_share(args.share, **settings)
    except PrivacyConfigError as exc:
        raise ValueError(f"--share {args.share}: {exc}") from exc
    files = tuple(config_files or args.config_files)
    define_ledger = not bundle_defines(BundleSpec(args.bundle_dir, files), "privacy_ledger")
    return share_filter_overrides(args.share, define_ledger=define_ledger, **settings)


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
        overrides = {**overrides, **share_overrides(args, config_files)}
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        overrides.update(parse_overrides(args.override))
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

    from monai_fedpriv.errors import BundleError, DataError, PrivacyConfigError, UpdateError

    module, func = COMMANDS[argv[0]]
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except (BundleError, DataError, PrivacyConfigError, UpdateError, FileNotFoundError) as exc:
        # bad input: one clear line (the exception names the file, key or setting), no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
