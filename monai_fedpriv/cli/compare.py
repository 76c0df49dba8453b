"""``monai-fedpriv compare``: a grid of federated simulations (strategies x partitions) and a report in the shape of
Qu et al. (seed paper 004, Figs. 5-6 and Table 1): ``DIR/compare.json``, ``DIR/report.md``,
``DIR/figures/dice_vs_ks.png``. Rerunning the same command continues an interrupted grid."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from monai_fedpriv.cli.options import OptionError, check_number, check_output_folder
from monai_fedpriv.cli.tracking import add_tracking_flags, check_tracking_flags
from monai_fedpriv.experiments.compare import (
    STRATEGY_NAMES,
    STRATEGY_OPTIONS,
    UPLOADING,
    CompareSettings,
    cell_argv,
)

__all__ = ["build_compare_parser", "check_cells", "compare_main", "parse_names", "settings_from_args"]


def build_compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="monai-fedpriv compare",
        description="Run one federated simulation per strategy x partition (each `monai-fedpriv simulate` in "
        "DIR/cells/STRATEGY__PARTITION) and report Dice against the label skew (mean pairwise KS), centralised "
        "training, bytes and messages, and cyclic weight transfer's forgetting (Qu et al., seed paper 004).",
    )
    p.add_argument("bundle_dir", type=Path, help="MONAI bundle directory (with configs/train.json)")
    p.add_argument("--strategies", default="fedavg,fedavgm,fedprox,cwt,fedavg-share",
                   help=f"comma-separated, from {', '.join(STRATEGY_NAMES)} (default: seed 004's five)")  # fmt: skip
    p.add_argument("--partitions", default="iid,skew-low,skew-mid,skew-high",
                   help="comma-separated partition schemes (default iid,skew-low,skew-mid,skew-high)")  # fmt: skip
    p.add_argument("--output", type=Path, required=True,
                   help="the compare folder (new, or holding this compare run: then it continues)")  # fmt: skip
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds per cell (default 10)")
    work = p.add_mutually_exclusive_group()
    work.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (default 1)")
    work.add_argument("--local-steps", type=int, default=None, help="local optimiser steps per round")
    p.add_argument("--seed", type=int, default=0, help="run seed of every cell (default 0)")
    p.add_argument("--data", type=Path, default=None, help="an MSD task or BraTS release folder (as simulate)")
    p.add_argument("--layout", choices=("msd", "brats"), default=None, help="layout of --data (default: detected)")
    p.add_argument("--config-files", nargs="+", default=["train.json"], help="bundle config files (as simulate)")
    p.add_argument("--override", action="append", default=[], metavar="ID=JSON",
                   help="bundle config override of every cell (repeatable)")  # fmt: skip
    p.add_argument("--privacy", choices=("none", "low", "medium", "high"), default="none",
                   help="DP-SGD regime of every cell; each cell starts from a fresh budget (default none)")  # fmt: skip
    p.add_argument("--prox-mu", type=float, default=None, help="FedProx proximal weight (fedprox cells only)")
    p.add_argument("--share-data-fraction", type=float, default=None,
                   help="fraction of data shared globally (fedavg-share cells only)")  # fmt: skip
    p.add_argument("--generator-epochs", type=int, default=None,
                   help="CWT+Replay's generator epochs per site visit (cwt-replay cells only)")
    p.add_argument("--latents-unprotected", action="store_true",
                   help="splitnn / fedreplay / cwt-replay cells: send features, latents, codes with no mechanism; the "
                   "report says so")
    p.add_argument("--threads", type=int, default=None, help="CPU threads torch may use (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_tracking_flags(p)  # every cell is a run of its own; the grid's summary one more
    sec = p.add_argument_group("secure aggregation of every cell (as simulate)")
    sec.add_argument("--secure-aggregation", action="store_true", help="the server learns only each round's sum")
    sec.add_argument("--max-update-norm", type=float, default=None, help="the norm every site clips its update to")
    sec.add_argument("--secagg-threshold", type=int, default=None, help="shares needed to unmask (default majority)")
    sec.add_argument("--secagg-bits", type=int, default=None, help="bits per coordinate (default 16)")
    sec.add_argument("--secagg-neighbours", type=int, default=None, help="SecAgg+ neighbours per site")
    sec.add_argument("--distributed-dp", action="store_true", help="Skellam noise shares (needs --noise-multiplier)")
    sec.add_argument("--noise-multiplier", type=float, default=None, help="distributed DP's noise over the clip")
    return p


def parse_names(flag: str, text: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """Comma-separated names of ``flag``, each in ``allowed``, in order and without repeats."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        got = ", ".join(repr(n) for n in bad) if bad else "nothing"
        raise OptionError(f"{flag}: unknown {got}; choose from {', '.join(allowed)} (comma-separated).")
    return names


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    """Check compare's own flags (names, ranges, flags a strategy of the grid must use) and build the settings."""
    from monai_fedpriv.data.partition import SCHEMES

    strategies = parse_names("--strategies", args.strategies, STRATEGY_NAMES)
    partitions = parse_names("--partitions", args.partitions, SCHEMES)
    for strategy, (field, flag) in STRATEGY_OPTIONS.items():
        if getattr(args, field) is not None and strategy not in strategies:
            raise OptionError(f"{flag} is used by the {strategy} strategy only; add it to --strategies or drop {flag}.")
    if args.latents_unprotected and not set(UPLOADING) & set(strategies):
        raise OptionError("--latents-unprotected is used by the splitnn, fedreplay and cwt-replay cells only; add one "
                          "to --strategies or drop it.")  # fmt: skip
    uploading = [s for s in strategies if s in UPLOADING]
    if uploading and not args.latents_unprotected:
        raise OptionError(f"--strategies {', '.join(uploading)}: their sites upload latents (codes) that no mechanism "
                          f"of a compare grid covers; pass --latents-unprotected to run them (the report says so).")
    check_number("--prox-mu", args.prox_mu, low=0)
    check_number("--generator-epochs", args.generator_epochs, low=1, integer=True)
    check_number("--share-data-fraction", args.share_data_fraction, low=0, high=1, low_open=True)
    check_output_folder(args.output)
    check_tracking_flags(args)
    return CompareSettings(
        args.bundle_dir, args.output, strategies, partitions, sites=args.sites, rounds=args.rounds,
        local_epochs=args.local_epochs, local_steps=args.local_steps, seed=args.seed, data=args.data,
        layout=args.layout, config_files=tuple(args.config_files), overrides=tuple(args.override),
        privacy=args.privacy, threads=args.threads, device=args.device, prox_mu=args.prox_mu,
        share_data_fraction=args.share_data_fraction, latents_unprotected=args.latents_unprotected,
        generator_epochs=args.generator_epochs, tracking=args.tracking, tracking_uri=args.tracking_uri,
        experiment_name=args.experiment_name, secure_aggregation=args.secure_aggregation,
        max_update_norm=args.max_update_norm, secagg_threshold=args.secagg_threshold, secagg_bits=args.secagg_bits,
        secagg_neighbours=args.secagg_neighbours, distributed_dp=args.distributed_dp,
        noise_multiplier=args.noise_multiplier,
    )  # fmt: skip


def check_cells(settings: CompareSettings) -> None:
    """Parse and range-check every strategy's simulate flags before anything is written or trained (one
    ``OptionError`` naming the strategy when simulate refuses them, e.g. a strategy it does not know yet)."""
    from monai_fedpriv.cli.run_flags import check_run_flags
    from monai_fedpriv.cli.simulate import build_simulate_parser

    for strategy in settings.strategies:
        parser = build_simulate_parser()
        parser.exit_on_error = False
        try:
            check_run_flags(parser.parse_args(cell_argv(settings, strategy, settings.partitions[0])))
        except (argparse.ArgumentError, SystemExit) as exc:
            why = f" ({exc})" if isinstance(exc, argparse.ArgumentError) else " (see above)"
            raise OptionError(f"--strategies {strategy}: monai-fedpriv simulate refuses its flags{why}.") from None


def track_grid(settings: CompareSettings, result: dict) -> None:
    """The grid's summary run next to its cells' runs: the grid's settings, each cell's final Dice
    (``final_dice/<strategy>/<partition>``) and centralised Dice, ``compare.json``, the report and its figures.
    A rerun of the same grid continues this run. Tracking never ends the grid: a failure is a warning."""
    if settings.tracking is None:
        return
    import logging

    from monai_fedpriv.cli.tracking import run_artifacts
    from monai_fedpriv.tracking import open_tracker

    try:
        tracker = open_tracker(settings.tracking, settings.output, f"compare {settings.output.resolve().name}",
                               uri=settings.tracking_uri, experiment=settings.experiment_name, resume=True,
                               logdir=settings.output / "tensorboard" / "grid")  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        logging.getLogger("monai_fedpriv.tracking").warning(f"the grid's summary run was not logged: {exc!r}"[:400])
        return
    values = {f"final_dice/{c['strategy']}/{c['partition']}": c["dice"] for c in result["cells"]
              if isinstance(c.get("dice"), (int, float))}  # fmt: skip
    values.update({f"centralised/{p}": d for p, d in result.get("centralised", {}).items() if d is not None})
    params = {f"compare.{k}": str(v)[:500] for k, v in settings.recorded().items()}
    tracker.log_once(settings.rounds, values, params=params)
    tracker.finish({}, run_artifacts(settings.output))


def compare_main(argv: list[str]) -> int:
    from monai_fedpriv.errors import FederationError
    from monai_fedpriv.experiments.compare import check_output, run_grid
    from monai_fedpriv.report.compare import write_compare_report

    settings = settings_from_args(build_compare_parser().parse_args(argv))
    check_output(settings)
    check_cells(settings)
    result = run_grid(settings, log=lambda line: print(line, flush=True))
    report = write_compare_report(result, settings.output)
    print(f"compare: {settings.output / 'compare.json'}; report: {report}")
    track_grid(settings, result)
    failed = [f"{c['strategy']} on {c['partition']}" for c in result["cells"] if c.get("error")]
    if failed:
        raise FederationError(f"{len(failed)} cell(s) stopped ({'; '.join(failed)}): see compare.json; rerun the same "
                              f"command to continue them.")  # fmt: skip
    return 0
