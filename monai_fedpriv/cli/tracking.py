"""``--tracking mlflow|tensorboard`` of ``simulate``, ``compare`` and ``run-nvflare``: the flags, their checks, the
tracker of a run folder and the files it keeps (:mod:`monai_fedpriv.tracking`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monai_fedpriv.tracking import RunTracker

__all__ = ["MLFLOW_SCHEMES", "add_tracking_flags", "check_tracking_flags", "run_artifacts", "start_tracker"]

#: URI schemes of MLflow tracking stores
MLFLOW_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")


def add_tracking_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment tracking")
    g.add_argument("--tracking", default=None, metavar="mlflow|tensorboard|mlflow,tensorboard",
                   help="log every round (loss, Dice per class, epsilon and budget per site, bytes, rejections with "
                   "their reasons), the settings and, at the end, the report, figures and model: MLflow into "
                   "OUTPUT/mlruns.db, TensorBoard into OUTPUT/tensorboard (pip install "
                   "'monai-fedpriv[tracking]')")  # fmt: skip
    g.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///OUTPUT/mlruns.db)")
    g.add_argument("--experiment-name", default=None, help="MLflow experiment name (default monai_fedpriv)")


def check_tracking_flags(args: argparse.Namespace) -> None:
    """Refuse a tracker whose package is missing, and MLflow's flags without ``--tracking mlflow``."""
    from monai_fedpriv.cli.options import OptionError
    from monai_fedpriv.tracking import parse_trackers

    kinds = parse_trackers(args.tracking)
    for flag, value in (("--tracking-uri", args.tracking_uri), ("--experiment-name", args.experiment_name)):
        if value is not None and "mlflow" not in kinds:
            raise OptionError(f"{flag} is MLflow's: add --tracking mlflow, or drop {flag}.")
    if args.experiment_name is not None and not args.experiment_name.strip():
        raise OptionError("--experiment-name is empty; give a name or drop the flag.")
    if args.tracking_uri is not None:
        from monai_fedpriv.tracking import redact

        scheme = args.tracking_uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in args.tracking_uri else ""
        if scheme not in MLFLOW_SCHEMES:
            raise OptionError(f"--tracking-uri {redact(args.tracking_uri)!r}: give an MLflow tracking URI "
                              f"({', '.join(s + ':' for s in MLFLOW_SCHEMES)}...).")  # fmt: skip


def start_tracker(args: argparse.Namespace, folder: Path, resume: bool, name: str | None = None) -> RunTracker | None:
    """The tracker of the run in ``folder`` (``None`` without ``--tracking``); ``resume`` (the run really continues
    from a checkpoint) continues its tracked run. A store that cannot be opened is refused before anything trains,
    naming the flag."""
    if args.tracking is None:
        return None
    from monai_fedpriv.cli.options import OptionError
    from monai_fedpriv.tracking import open_tracker, redact

    try:
        tracker = open_tracker(args.tracking, folder, name or Path(folder).resolve().name, uri=args.tracking_uri,
                               experiment=args.experiment_name, resume=resume)  # fmt: skip
    except OptionError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line naming the flag, before anything trains
        flag = "--tracking-uri" if args.tracking_uri else "--tracking"
        raise OptionError(f"{flag}: could not open the tracking store: {type(exc).__name__}: "
                          f"{redact(str(exc))[:300]}") from None  # fmt: skip
    print(f"tracking: {_where(tracker)}", flush=True)
    return tracker


def _where(tracker: RunTracker) -> str:
    facts = tracker.backend.describe()
    said = []
    if "run_id" in facts:
        uri = facts["tracking_uri"]
        how = f" (watch it: mlflow ui --backend-store-uri {uri})" if uri.startswith("sqlite:") else ""
        said.append(f"MLflow run {facts['run_id']} in {uri}{how}")
    if "logdir" in facts:
        said.append(f"TensorBoard events in {facts['logdir']} (watch them: tensorboard --logdir {facts['logdir']})")
    return "; ".join(said)


def run_artifacts(output: Path, model: Path | None = None) -> list[tuple[Path, str]]:
    """The files a finished run keeps in its tracker: ``metrics.json`` / ``compare.json``, the report, its figures
    and the final global model (``(path, folder in the run)``; missing ones are skipped)."""
    output = Path(output)
    files: list[tuple[Path, str]] = [(output / name, "") for name in ("metrics.json", "compare.json", "report.md")]
    files += [(png, "figures") for png in sorted((output / "figures").glob("*.png"))]
    files.append((model or output / "federated" / "models" / "model.pt", "model"))
    return files
