"""``monai-fedpriv simulate``: federated training of a bundle over in-process sites (and, with ``--baselines``,
centralised and local-only training with the same total work); writes ``DIR/metrics.json`` after every round and
``DIR/report.md`` at the end."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.cli.run_flags import add_run_flags

if TYPE_CHECKING:
    from monai_fedpriv.cli.plan import RunPlan

__all__ = ["build_simulate_parser", "finish_run", "refuse_used_output", "simulate_main", "write_run_report"]


def build_simulate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="monai-fedpriv simulate",
        description="Simulate federated training of a MONAI bundle over N sites on this machine.",
    )
    return add_run_flags(p)


def simulate_main(argv: list[str]) -> int:
    args = build_simulate_parser().parse_args(argv)
    refuse_used_output(args.output, args.resume)
    import torch

    from monai_fedpriv.cli.plan import plan_run

    plan = plan_run(args, log=lambda line: print(line, flush=True))
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _simulate(args, plan)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a notebook, a test) keeps its own setting


def refuse_used_output(output: Path, resume: bool) -> None:
    """A new run never replaces an earlier one: its checkpoints, ``metrics.json`` and report stay as they are."""
    from monai_fedpriv.cli.options import OptionError

    if resume or not output.is_dir():
        return
    held = sorted(p.name for p in output.iterdir())
    if held:
        raise OptionError(
            f"--output {output} already holds a run ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
            f"continue it with --resume, or choose a new --output. Nothing was changed."
        )


def _simulate(args: argparse.Namespace, plan: RunPlan) -> int:
    from monai_fedpriv.cli.tracking import run_artifacts, start_tracker

    resume = args.resume and (args.output / "federated" / "checkpoints" / "latest.pt").is_file()
    tracker = start_tracker(args, args.output, resume)
    try:
        metrics = _train(args, plan, None if tracker is None else tracker.update)
        code = finish_run(metrics, plan.bundle, plan.split.val, args.output, report=not args.no_report)
    except BaseException as exc:
        if tracker is not None:
            tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None:
        tracker.finish(metrics, run_artifacts(args.output))
    return code


def _train(args: argparse.Namespace, plan: RunPlan, on_metrics: Callable[[dict], None] | None) -> dict:
    from monai_fedpriv.experiments import run_experiment
    from monai_fedpriv.privacy.ledger_store import LedgerStore

    settings = plan.settings  # the run's one settings tree (the same an exported job carries)
    return run_experiment(
        plan.bundle,
        plan.split,
        args.output,
        settings.rounds,
        plan.local_work,
        seed=settings.seed,
        momentum=settings.momentum,
        strategy_factory=plan.build_strategy,
        baselines=args.baselines,
        resume=args.resume,
        device=args.device,
        federation={
            "screen": plan.screen,
            "min_sites": settings.min_sites,
            "faults": plan.faults,
            "secure_noise": settings.secure_noise,
            "round_timeout": settings.round_timeout,
            "latents_unprotected": settings.latents_unprotected,
            "ledger_store": LedgerStore(args.ledger_dir) if args.ledger_dir else LedgerStore.default(),
            "fresh_budget": args.fresh_budget,
            "secure_aggregation": _secure(settings.secure_aggregation),
        },  # fmt: skip
        extra=plan.extra,
        on_metrics=on_metrics,
    )


def _secure(fields: dict | None) -> object:
    if fields is None:
        return None
    from monai_fedpriv.fl.secure import SecureAggregation

    return SecureAggregation(**fields)


def finish_run(
    metrics: dict, bundle: BundleSpec, val: dict[str, list[dict]], output: Path, report: bool = True
) -> int:
    """The end of a run, in-process or on NVIDIA FLARE: the report (unless ``report=False``) and one line naming
    ``metrics.json`` and the final global Dice; returns the exit code."""
    if report:
        write_run_report(metrics, bundle, val, output)
    final = metrics["final"]["global_dice"]
    print(f"metrics: {output / 'metrics.json'}" + (f"; final global Dice {final:.4f}" if final is not None else ""))
    return 0


def write_run_report(metrics: dict, bundle: BundleSpec, val: dict[str, list[dict]], output: Path) -> Path:
    """``output/report.md`` with example segmentations of ``output/federated/models/model.pt`` on the sites'
    validation cases ``val``."""
    import torch

    from monai_fedpriv.report.markdown import write_report
    from monai_fedpriv.report.segmentations import plot_example_segmentations

    weights = torch.load(output / "federated" / "models" / "model.pt", map_location="cpu")
    seg = plot_example_segmentations(bundle, weights, val, output / "figures" / "segmentations.png")
    report = write_report(metrics, output, {"Example segmentations of the federated model": seg})
    print(f"report: {report}")
    return report
