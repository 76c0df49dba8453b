"""A grid of federated simulations, one cell per strategy x partition, in the shape of Qu et al. (seed paper 004,
sec. 4.2: Figs. 5-6, Table 1): the final global Dice of each strategy against the label skew of the partition
(mean pairwise KS), centralised training with the same total work as the reference, the bytes and messages each
strategy sends, and cyclic weight transfer's catastrophic forgetting as a matrix.

Every cell is ``monai-fedpriv simulate`` run in-process in ``OUTPUT/cells/<strategy>__<partition>/``; the first
strategy's cell of each partition also trains the baselines (``--baselines``), whose centralised Dice is the
partition's reference. ``OUTPUT/compare.json`` is rewritten after every cell; running the grid again skips the
finished cells and continues the interrupted ones with ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from monai_fedpriv.cli.options import OptionError
from monai_fedpriv.errors import FederationError
from monai_fedpriv.fl.strategies import STRATEGIES
from monai_fedpriv.utils.files import json_safe, write_json

__all__ = ["CYCLIC", "STRATEGY_NAMES", "UPLOADING", "CompareSettings", "cell_argv", "cell_dir", "check_output",
           "collect", "forgetting_matrix", "run_grid", "strategy_flags", "summarise_cell"]  # fmt: skip

#: the strategies a grid may name: the registry's
STRATEGY_NAMES = STRATEGIES
#: the simulate flag that picks the strategy
STRATEGY_FLAG = "--strategy"
#: the settings only one strategy's cells get: strategy -> (CompareSettings field, simulate flag)
STRATEGY_OPTIONS = {
    "fedprox": ("prox_mu", "--prox-mu"),
    "fedavg-share": ("share_data_fraction", "--share-data-fraction"),
    "cwt-replay": ("generator_epochs", "--generator-epochs"),
}
#: the strategies whose sites send features (SplitNN, every batch), latents (FedReplay) or generator codes
#: (CWT+Replay): their cells get ``--latents-unprotected`` when the grid was given it
UPLOADING = ("splitnn", "fedreplay", "cwt-replay")
#: cyclic strategies (one site a round), whose catastrophic forgetting the grid reports
CYCLIC = ("cwt", "splitnn", "cwt-replay")
#: settings that do not change a result (not recorded), and the grid (which a resume may grow)
_NOT_RECORDED = ("output", "threads", "device", "tracking", "tracking_uri", "experiment_name")
_GRID = ("strategies", "partitions")


@dataclass(frozen=True)
class CompareSettings:
    """What a grid runs: its cells (strategies x partitions) and the simulate flags every cell shares."""

    bundle_dir: Path
    output: Path
    strategies: tuple[str, ...]
    partitions: tuple[str, ...]
    sites: int = 3
    rounds: int = 10
    local_epochs: int | None = None
    local_steps: int | None = None
    seed: int = 0
    data: Path | None = None
    layout: str | None = None
    config_files: tuple[str, ...] = ("train.json",)
    overrides: tuple[str, ...] = ()
    privacy: str = "none"
    threads: int | None = None
    device: str = "cpu"
    prox_mu: float | None = None
    share_data_fraction: float | None = None
    latents_unprotected: bool = False
    generator_epochs: int | None = None
    tracking: str | None = None
    tracking_uri: str | None = None
    experiment_name: str | None = None
    secure_aggregation: bool = False
    max_update_norm: float | None = None
    secagg_threshold: int | None = None
    secagg_bits: int | None = None
    secagg_neighbours: int | None = None
    distributed_dp: bool = False
    noise_multiplier: float | None = None

    def recorded(self) -> dict[str, Any]:
        """``compare.json``'s ``settings``: everything that defines the result, and the grid."""
        out = {k: v for k, v in asdict(self).items() if k not in _NOT_RECORDED}
        out["bundle_dir"] = Path(self.bundle_dir).resolve()
        return json_safe(out)  # as read back from compare.json: lists and strings


def strategy_flags(strategy: str, settings: CompareSettings) -> list[str]:
    """The simulate flags that make a cell run ``strategy``: the one place to switch ``--aggregator`` to
    ``--strategy``; ``--prox-mu`` / ``--share-data-fraction`` go to the cells of the strategy that uses them only."""
    flags = [STRATEGY_FLAG, strategy]
    if strategy in STRATEGY_OPTIONS:
        field, flag = STRATEGY_OPTIONS[strategy]
        value = getattr(settings, field)
        if value is not None:
            flags += [flag, str(value)]
    if strategy in UPLOADING and settings.latents_unprotected:
        flags.append("--latents-unprotected")
    return flags


def cell_dir(output: Path, strategy: str, partition: str) -> Path:
    return Path(output) / "cells" / f"{strategy}__{partition}"


def cell_argv(settings: CompareSettings, strategy: str, partition: str, *, baselines: bool = False,
              resume: bool = False) -> list[str]:  # fmt: skip
    """``monai-fedpriv simulate``'s arguments for one cell."""
    s = settings
    argv = [str(s.bundle_dir), "--sites", str(s.sites), "--rounds", str(s.rounds), "--seed", str(s.seed),
            "--partition", partition, "--output", str(cell_dir(s.output, strategy, partition)), "--no-report",
            "--config-files", *s.config_files, "--privacy", s.privacy, "--device", s.device,
            *strategy_flags(strategy, s)]  # fmt: skip
    for flag, value in (("--local-epochs", s.local_epochs), ("--local-steps", s.local_steps), ("--data", s.data),
                        ("--layout", s.layout), ("--threads", s.threads)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    for override in s.overrides:
        argv += ["--override", override]
    if s.privacy != "none" or s.distributed_dp:  # every cell starts from the same budget (earlier cells' spending
        # stays recorded)
        argv.append("--fresh-budget")
    argv += tracking_flags(s) + secure_flags(s)
    return argv + ["--baselines"] * baselines + ["--resume"] * resume


def secure_flags(settings: CompareSettings) -> list[str]:
    """A cell's secure-aggregation flags (every cell of the grid aggregates securely, or none)."""
    s = settings
    flags = ["--secure-aggregation"] * s.secure_aggregation + ["--distributed-dp"] * s.distributed_dp
    for flag, value in (("--max-update-norm", s.max_update_norm), ("--secagg-threshold", s.secagg_threshold),
                        ("--secagg-bits", s.secagg_bits), ("--secagg-neighbours", s.secagg_neighbours),
                        ("--noise-multiplier", s.noise_multiplier)):  # fmt: skip
        if value is not None:
            flags += [flag, str(value)]
    return flags


def tracking_flags(settings: CompareSettings) -> list[str]:
    """A cell's tracking flags: its own TensorBoard folder, or a run in the grid's one MLflow store (by default
    ``DIR/mlruns.db``), named after the cell."""
    if settings.tracking is None:
        return []
    from monai_fedpriv.tracking import parse_trackers

    flags = ["--tracking", settings.tracking]
    if "mlflow" in parse_trackers(settings.tracking):
        from monai_fedpriv.tracking import default_mlflow_uri

        uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(settings.output)
        flags += ["--tracking-uri", uri, "--experiment-name", settings.experiment_name or "monai_fedpriv"]
    return flags


def forgetting_matrix(metrics: dict[str, Any]) -> list[list[float | None]]:
    """Catastrophic forgetting of cyclic weight transfer (seed 004, Table 1) from a CWT run's ``metrics.json``.

    Row k: the Dice, on every site's validation data (columns in ``config.sites`` order), of the model after the
    last round in which site k trained; a site that never trained has a row of ``None``.

    Raises:
        ValueError: a round in which not exactly one site trained (not a cyclic run).
    """
    sites = list(metrics["config"]["sites"])
    last: dict[str, dict[str, Any]] = {}
    for record in metrics["rounds"]:
        if "server" in record or any("upload" in r for r in record["sites"].values()):
            continue  # FedReplay's server rounds, CWT+Replay's generator visits: no model was trained at a site
        trained = list(record["sites"])
        if len(trained) != 1:
            raise ValueError(f"round {record['round']} trained {len(trained)} sites; cyclic weight transfer: one.")
        last[trained[0]] = record["global"].get("per_site") or {}
    return [[last[k].get(j) if k in last else None for j in sites] for k in sites]


def summarise_cell(metrics: dict[str, Any]) -> dict[str, Any]:
    """A cell's entry of ``compare.json`` (without its names): Dice, mean KS, and what it sent over the run."""
    sent = received = messages = 0
    has_received = False
    for record in metrics["rounds"]:
        for res in record["sites"].values():
            if res.get("bytes_sent") is not None:
                sent += res["bytes_sent"]
            if res.get("bytes_received") is not None:
                received, has_received = received + res["bytes_received"], True
            if res.get("messages") is not None:
                messages += res["messages"]
            elif "bytes_sent" in res:
                messages += 1  # one update message
    final = metrics["final"]
    return {
        "mean_ks": (metrics.get("partition") or {}).get("mean_ks"), "dice": final["global_dice"],
        "bytes_sent": sent, "bytes_received": received if has_received else None, "messages": messages,
        "rounds_completed": final["rounds_completed"], "dice_per_site": final.get("global_dice_per_site"),
        "sites": list(metrics["config"]["sites"]),
    }  # fmt: skip


def _metrics(folder: Path) -> dict[str, Any] | None:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _finished(metrics: dict[str, Any] | None, rounds: int, baselines: bool) -> bool:
    if metrics is None or (baselines and "baselines" not in metrics):
        return False
    stopped = metrics.get("stopped") or {}
    return metrics["final"]["rounds_completed"] == rounds or (bool(stopped) and "failed_round" not in stopped)


def _baseline_strategy(settings: CompareSettings, partition: str) -> str:
    """The strategy whose cell of ``partition`` trains the baselines: one that already has them, else the first."""
    for strategy in settings.strategies:
        if "baselines" in (_metrics(cell_dir(settings.output, strategy, partition)) or {}):
            return strategy
    return settings.strategies[0]


def check_output(settings: CompareSettings) -> None:
    """The output folder may be new, empty, or hold a compare run of the same settings (that is a resume)."""
    out = Path(settings.output)
    if not out.is_dir() or not any(out.iterdir()):
        return
    path = out / "compare.json"
    held = json.loads(path.read_text()) if path.is_file() else None
    if not isinstance(held, dict) or "settings" not in held:
        names = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise OptionError(f"--output {out} holds something other than a compare run ({names}); choose a new folder.")
    if not any((out / "cells").glob("*/*")):
        return  # no cell started: the folder is simply reused
    now = settings.recorded()
    differ = [k for k, v in held["settings"].items() if k not in _GRID and now.get(k) != v]
    if differ:
        raise OptionError(f"--output {out} holds a compare run with other settings ({', '.join(differ)}); rerun it "
                          f"with the same settings to resume it, or choose a new --output.")  # fmt: skip


def collect(settings: CompareSettings, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """``compare.json`` from the cells' ``metrics.json`` files as they are now."""
    cells: list[dict[str, Any]] = []
    centralised: dict[str, Any] = {}
    forgetting: dict[str, dict[str, list[list[float | None]] | None]] = {s: {} for s in CYCLIC}
    for partition in settings.partitions:
        for strategy in settings.strategies:
            name = cell_dir(settings.output, strategy, partition).name
            m = _metrics(cell_dir(settings.output, strategy, partition))
            entry: dict[str, Any] = {"strategy": strategy, "partition": partition, "cell": f"cells/{name}"}
            if m is not None:
                entry.update(summarise_cell(m))
                if "baselines" in m:
                    centralised[partition] = m["baselines"]["centralised"]["global_dice"]
                if strategy in CYCLIC:
                    try:
                        forgetting[strategy][partition] = forgetting_matrix(m)
                    except ValueError:  # not one site per round: not a cyclic run
                        forgetting[strategy][partition] = None
            if errors and name in errors:
                entry["error"] = errors[name]
            cells.append(entry)
    out: dict[str, Any] = {"settings": settings.recorded(), "cells": cells, "centralised": centralised}
    if "cwt" in settings.strategies:
        out["forgetting"] = forgetting["cwt"]
    cyclic = {s: forgetting[s] for s in CYCLIC if s in settings.strategies}
    if cyclic:
        out["forgetting_by_strategy"] = cyclic
    return out


def run_grid(settings: CompareSettings, run_cell: Callable[[list[str]], int] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run (or continue) every cell, rewriting ``compare.json`` after each; returns its content. The cells' flags
    are checked before (``monai_fedpriv.cli.compare.check_cells``).

    A cell whose federation stops (``FederationError``) is recorded with its ``error`` and the grid goes on (rerun
    the same command to continue that cell); any other error stops the grid.
    """
    if run_cell is None:
        from monai_fedpriv.cli.simulate import simulate_main

        run_cell = simulate_main
    check_output(settings)
    out = Path(settings.output)
    write_json(collect(settings), out / "compare.json")
    grid = [(s, p) for p in settings.partitions for s in settings.strategies]
    errors: dict[str, str] = {}
    for i, (strategy, partition) in enumerate(grid, 1):
        folder = cell_dir(out, strategy, partition)
        baselines = strategy == _baseline_strategy(settings, partition)
        head = f"cell {i}/{len(grid)}: {strategy} on {partition}"
        if _finished(_metrics(folder), settings.rounds, baselines):
            log(f"{head} (finished, skipped)")
            continue
        resume = (folder / "federated" / "checkpoints" / "latest.pt").is_file()
        if not resume and folder.is_dir():  # a cell that stopped before its first checkpoint starts again
            shutil.rmtree(folder)
        log(head + (" (resuming)" if resume else "") + (" + centralised and local-only baselines" if baselines else ""))
        try:
            run_cell(cell_argv(settings, strategy, partition, baselines=baselines, resume=resume))
        except FederationError as exc:
            log(f"{head}: stopped: {exc}")
            errors[folder.name] = str(exc)
        write_json(collect(settings, errors), out / "compare.json")
    result = collect(settings, errors)
    from monai_fedpriv.experiments.leakage_study import grid_leakage

    leakage = grid_leakage(settings, log)
    if leakage is not None:
        result["leakage"] = leakage
    write_json(result, out / "compare.json")
    return result
