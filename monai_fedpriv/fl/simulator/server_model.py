"""The server's copy of the global model: built from the run seed (the round-0 model of the simulator and of an
NVIDIA FLARE job alike), given the structure the sites train, and scored on every evaluation set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.bundle import ConfigParser

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
from monai_fedpriv.data.stream import derive_seed
from monai_fedpriv.errors import BundleError
from monai_fedpriv.fl.evaluation import DiceEvaluator, combine_scores, evaluator_from_bundle
from monai_fedpriv.fl.weights import exchangeable_state, load_exchangeable_state
from monai_fedpriv.privacy.grad_sample import plain_copy

__all__ = ["ServerModel", "initial_network"]


def initial_network(
    bundle: BundleSpec, seed: int, device: str | torch.device = "cpu", overrides: Mapping[str, Any] | None = None
) -> tuple[ConfigParser, torch.nn.Module]:
    """``(parser, network)``: the bundle's network of round 0, a function of the run seed only (never of global
    random state)."""
    common = {"device": f"$torch.device('{torch.device(device)}')", "seed": seed, **dict(overrides or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        parser = load_bundle(bundle, common)
        network = parser.get_parsed_content("network")
    return parser, network


class ServerModel:
    """The simulator's server network, its evaluators and the global weights of round 0.

    Args:
        bundle: the run's bundle. eval_sets: ``{name: validation data list}``.
        seed, device, overrides: as the run's.
    """

    def __init__(
        self,
        bundle: BundleSpec,
        eval_sets: Mapping[str, Sequence[dict[str, Any]]],
        seed: int,
        device: str | torch.device,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        parser, self.network = initial_network(bundle, seed, device, overrides)
        self.initial_weights = exchangeable_state(self.network)
        self.evaluators: dict[str, DiceEvaluator] = {
            name: evaluator_from_bundle(parser, data, torch.device(device)) for name, data in eval_sets.items()
        }

    def match_sites(self, site_networks: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
        """Take the sites' network structure when an override changed it at the sites; returns the round-0 weights.

        DP-SGD prepares each site's network before training (``dp.json``: BatchNorm becomes InstanceNorm, which has
        no running statistics), so the bundle's plain network no longer matches what the sites train and send.
        The server then evaluates and aggregates a copy of the prepared network, starting from the server's own
        initial weights wherever the names agree (the converted norms keep their affine weights).

        Raises:
            BundleError: two sites train different structures.
        """
        keys = {name: sorted(net.state_dict()) for name, net in site_networks.items()}
        first, site_keys = next(iter(keys.items()))
        differing = [name for name, k in keys.items() if k != site_keys]
        if differing:
            raise BundleError(f"sites {differing} train a different network structure from {first}'s.")
        if site_keys == sorted(self.initial_weights):
            return self.initial_weights
        server = plain_copy(site_networks[first])
        weights = {k: self.initial_weights.get(k, v) for k, v in exchangeable_state(server).items()}
        load_exchangeable_state(server, weights)
        self.network, self.initial_weights = server, weights
        return weights

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Dice of ``weights`` on every evaluation set and their case-weighted mean (``dice``, ``per_set``,
        ``per_class``)."""
        load_exchangeable_state(self.network, weights)
        per_set = {name: ev(self.network) for name, ev in self.evaluators.items()}
        combined = combine_scores(per_set)
        return {"dice": combined["dice"], "per_set": {k: v["dice"] for k, v in per_set.items()},
                "per_class": combined["dice_per_class"]}  # fmt: skip

    def metric(self) -> str | None:
        """What the evaluation measures (``metrics.json``'s ``metric``), or ``None`` without evaluation sets."""
        return next(iter(self.evaluators.values())).describe() if self.evaluators else None
