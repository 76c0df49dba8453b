"""A finished federated run as a model-zoo bundle: the run's bundle with the global model in ``models/model.pt``.

``monai-fedpriv bundle export RUN --output DIR`` copies the bundle the run trained (configs, docs, LICENSE), writes
the run's final global weights where the zoo's convention and the bundle's ``inference.json`` read them
(``bundle_root/models/model.pt``), adds a version to the changelog and records in ``metadata.json`` how the weights
were trained (``federated_training``: strategy, sites, rounds, global Dice, and the epsilon each site spent, which is
the guarantee the released weights carry). Before anything is written, the weights must load, strictly, into the
network of the bundle's ``inference.json``: a run that changed the network by override cannot be exported as this
bundle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from monai_fedpriv.errors import BundleError
from monai_fedpriv.utils.files import atomic_torch_save, write_json

__all__ = ["export_run", "training_record"]

_COPIED = ("configs", "docs", "LICENSE")


def training_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metadata.json``'s ``federated_training``: what trained the weights and what they guarantee."""
    final = metrics.get("final") or {}
    rounds = metrics.get("rounds") or []
    privacy = (rounds[-1].get("global") or {}).get("privacy") if rounds else None
    return {
        "strategy": metrics.get("strategy"),
        "sites": (metrics.get("config") or {}).get("sites"),
        "rounds_completed": final.get("rounds_completed"),
        "global_dice": final.get("global_dice"),
        "global_dice_per_class": final.get("global_dice_per_class"),
        "epsilon_per_site": (privacy or {}).get("per_site"),
        "delta": (privacy or {}).get("delta"),
        "private": privacy is not None,
        "stopped": (metrics.get("stopped") or {}).get("reason"),
    }


def _next_version(version: str) -> str:
    major, minor, patch = (int(x) for x in version.split("."))
    return f"{major}.{minor}.{patch + 1}"


def _check_loads(bundle: Path, weights: dict[str, Any]) -> None:
    """The weights load strictly into ``inference.json``'s network (else the exported bundle would not run)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise BundleError(
            f"the run's global model does not fit the network of {bundle / 'configs' / 'inference.json'} "
            f"({first[0].strip()}): was the network changed by override or by another config file? Only a run of the "
            f"bundle's own network can be exported as that bundle."
        ) from None


def _check_digests(source: Path, recorded: dict[str, Any]) -> None:
    """The bundle's config files are the ones the run trained with (their digests in ``metrics.json``)."""
    import hashlib

    for name, digest in (recorded or {}).items():
        path = source / "configs" / name
        if digest is None or not path.is_file():
            continue  # a shared override file of the package, or a file the run did not have
        now = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        if now != digest:
            raise BundleError(f"{path} changed since the run trained with it (digest {now}, the run's {digest}): the "
                              f"exported bundle would not describe how its weights were trained.")  # fmt: skip


def export_run(run: Path, output: Path, version: str | None = None, bundle: Path | None = None) -> Path:
    """Write the bundle of ``run`` (a ``simulate`` / ``run-nvflare`` folder) with its global model to ``output``.

    Args:
        bundle: the bundle folder the run trained (default: the one ``metrics.json`` names; a ``run-nvflare`` run
            names the folder inside its job, so give the bundle folder).

    Raises:
        BundleError: the run is unfinished or unreadable, the output exists, the bundle's configs changed since the
            run, or the weights do not fit the bundle.
    """
    import torch

    run, output = Path(run), Path(output)
    try:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        named = Path(metrics["config"]["bundle"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{run / 'metrics.json'}: not the metrics of a finished run ({exc}).") from None
    source = Path(bundle) if bundle is not None else named
    if bundle is None and not named.is_absolute():
        raise BundleError(f"{run} names its bundle as {str(named)!r} (a folder inside an NVIDIA FLARE job): give the "
                          f"bundle folder with --bundle.")  # fmt: skip
    model = run / "federated" / "models" / "model.pt"
    if not model.is_file() or not (metrics.get("final") or {}).get("rounds_completed"):
        raise BundleError(f"{run}: no completed round, so no global model to export ({model}).")
    if not (source / "configs" / "inference.json").is_file():
        raise BundleError(f"{source}: the run's bundle is gone or has no configs/inference.json.")
    if output.exists() and any(output.iterdir()):
        raise BundleError(f"--output {output} already holds files; choose a new folder.")
    _check_digests(source, (metrics.get("config") or {}).get("config_digests") or {})
    weights = torch.load(model, map_location="cpu", weights_only=True)
    _check_loads(source, weights)
    meta = json.loads((source / "configs" / "metadata.json").read_text(encoding="utf-8"))
    new_version = version or _next_version(str(meta.get("version", "0.0.0")))
    if new_version in (meta.get("changelog") or {}):
        raise BundleError(f"--version {new_version} is already in {source}'s changelog; give a new one.")
    record = training_record(metrics)
    dice = record["global_dice"]
    eps = record["epsilon_per_site"]
    note = (f"weights from a federated run ({(record['strategy'] or {}).get('name')}, {len(record['sites'] or [])} "
            f"sites, {record['rounds_completed']} rounds, global Dice {'-' if dice is None else f'{dice:.4f}'}, "
            + (f"epsilon per site {eps} at delta {record['delta']}" if eps else "no differential privacy") + ")")
    meta["version"] = new_version
    meta["changelog"] = {new_version: note, **(meta.get("changelog") or {})}
    meta["federated_training"] = record
    output.mkdir(parents=True, exist_ok=True)
    for name in _COPIED:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, output / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, output / name)
    write_json(meta, output / "configs" / "metadata.json", indent=4, ascii_only=False)
    atomic_torch_save(weights, output / "models" / "model.pt")
    return output
