"""What defines a simulated run: the local work per round, and the fingerprint a checkpoint must match to be
resumed (every setting but the number of rounds)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.fl.server.round import ServerRound
from monai_fedpriv.fl.strategies import Strategy

__all__ = ["LocalWork", "config_digests", "run_fingerprint"]


@dataclass(frozen=True)
class LocalWork:
    """Local work per round: ``epochs`` full passes or ``steps`` optimiser steps (exactly one must be set)."""

    epochs: int | None = 1
    steps: int | None = None

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("set exactly one of local epochs or local steps.")
        value = self.epochs if self.epochs is not None else self.steps
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"local work per round must be an int >= 1, got {value!r}.")

    def describe(self) -> dict[str, int | None]:
        return {"local_epochs": self.epochs, "local_steps": self.steps}


def _describe(value: Any) -> Any:
    """A JSON description of an override value (objects by type, so the fingerprint stays comparable)."""
    return json.loads(json.dumps(value, default=lambda o: f"<{type(o).__module__}.{type(o).__qualname__}>"))


def config_digests(bundle: BundleSpec) -> dict[str, str | None]:
    """``{config file name: short SHA-256 of its bytes}`` for every config file the run merges (``None`` for a
    missing file), so a run resumed with an edited config is refused."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None for p in bundle.config_paths()
    }


def run_fingerprint(
    bundle: BundleSpec,
    overrides: Mapping[str, Any],
    train_sites: Mapping[str, Sequence[Mapping[str, Any]]],
    local_work: LocalWork,
    momentum: str,
    strategy: Strategy,
    server: ServerRound,
    seed: int,
    secure_noise: bool,
    partition: str | None = None,
) -> dict[str, Any]:
    """Every setting that must match for a checkpoint to be resumed: the bundle (its config files' digests
    included), overrides, each site's cases (and the ``partition`` scheme that made them, when known), local work,
    momentum, strategy, screening, seed and noise source."""
    extra = {} if partition is None else {"partition": partition}
    return {
        "bundle": str(Path(bundle.root).resolve()),
        "config_files": list(bundle.config_files),
        "config_digests": config_digests(bundle),
        "overrides": _describe({**bundle.overrides, **overrides}),
        "sites": {k: [str(c.get("image")) for c in v] for k, v in train_sites.items()},
        "local_work": local_work.describe(),
        "momentum": momentum,
        "strategy": strategy.config(),
        "screen": server.screen.to_dict(),
        "min_sites": server.min_sites,
        "seed": seed,
        "secure_noise": secure_noise,
        **extra,
    }
