"""The leakage table of a compare grid (seed 004's Table 2, measured here): FedReplay's latents and FedAvg's update
of the same victims, inverted and scored the same way (:func:`monai_fedpriv.attacks.leakage.leakage_rows`), on the
global model of the grid's FedReplay cell (its encoder is the one the sites used), with and without the latent
mechanism, at the seed's cut and one block deeper.

Victims are the first cases of the grid's ``--data`` through the bundle's own validation preprocessing, centre-cropped
to ``crop`` pixels to keep the attacks within minutes on a CPU; without ``--data`` there is no table (the grid's
data list has no victims to read)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["grid_leakage"]


def _crop(t: torch.Tensor, size: int) -> torch.Tensor:
    out = t
    for dim in range(1, t.dim()):
        start = max(0, (t.shape[dim] - size) // 2)
        out = out.narrow(dim, start, min(size, t.shape[dim]))
    return out


def grid_leakage(settings: Any, log: Callable[[str], None] = print, victims: int = 2, crop: int = 64,
                 iterations: int = 600, update_iterations: int = 150) -> list[dict[str, Any]] | None:  # fmt: skip
    """``compare.json``'s ``leakage`` rows, or ``None`` when the grid has no fedreplay cell or no ``--data``."""
    if "fedreplay" not in settings.strategies or settings.data is None:
        return None
    from monai_fedpriv.attacks.bundle_model import bundle_activation, load_bundle_model
    from monai_fedpriv.attacks.leakage import leakage_rows
    from monai_fedpriv.attacks.victims import victim_from_dataset
    from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
    from monai_fedpriv.experiments.compare import cell_dir
    from monai_fedpriv.fl.weights import load_exchangeable_state

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    overrides: dict[str, Any] = {}
    for case in range(victims):
        image, label, overrides, _ = victim_from_dataset(settings.bundle_dir, settings.data, case, settings.layout)
        pairs.append((_crop(image, crop), _crop(label, crop)))
    network, loss, _ = load_bundle_model(settings.bundle_dir, overrides)
    parser = load_bundle(BundleSpec(Path(settings.bundle_dir)), overrides, required=())
    low, high = (float(v) for v in parser.get_parsed_content("attack_pixel_range"))
    weights = cell_dir(settings.output, "fedreplay", settings.partitions[0]) / "federated" / "models" / "model.pt"
    trained = weights.is_file()
    if trained:
        load_exchangeable_state(network, torch.load(weights, map_location="cpu"))
    log(f"leakage table: {victims} victims, FedReplay latents (cut 1, 2; clean and noised) against FedAvg's update, "
        f"on the {'FedReplay cell' if trained else 'untrained'} model ...")  # fmt: skip
    rows = leakage_rows(network, pairs, loss=loss, pixel_range=(low, high),
                        activation=bundle_activation(settings.bundle_dir), cut_blocks=(1, 2),
                        latent_noise=(None, 1.0), iterations=iterations, update_iterations=update_iterations,
                        restarts=1, latent_step_size=0.05 * (high - low), seed=settings.seed)  # fmt: skip
    for row in rows:
        row["model"] = "fedreplay cell" if trained else "untrained"
    return rows
