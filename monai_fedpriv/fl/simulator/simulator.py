"""In-process simulation of N federated sites built from one MONAI bundle.

Each site gets its own ``ConfigParser`` of the bundle with its data list and a reproducible stream loader, so its
``SupervisedTrainer`` is the bundle's own trainer; :class:`~monai_fedpriv.handlers.FederatedSync` is attached to it
(:mod:`.site`). Every round the simulator lets the strategy choose the round's sites, resumes each one's engine
until the handler has sent its update and interrupted the run, and hands the updates to the shared server round
(:class:`~monai_fedpriv.fl.server.ServerRound`: screen, aggregate, publish, record); then it evaluates and
checkpoints.

Faults: a site whose training raises is rolled back to its state at the start of the round (its privacy ledger
kept as spent) and is rejected for that round with the reason; a malformed or outlying update is rejected by the
server's screening. The round aggregates when enough sites answered (``min_sites``); otherwise the run stops with
the last completed round's global model and checkpoint intact, and :class:`~monai_fedpriv.errors.FederationError`
is raised. A run resumed from the last checkpoint continues with identical results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
from monai_fedpriv.data.splits import check_patients_at_one_site
from monai_fedpriv.data.stream import derive_seed
from monai_fedpriv.errors import BundleError, DataError, FederationError
from monai_fedpriv.fl.evaluation import DiceEvaluator, combine_scores, evaluator_from_bundle
from monai_fedpriv.fl.server.checkpoint import CHECKPOINT_VERSION, load_round_checkpoint
from monai_fedpriv.fl.server.records import global_privacy, progress_cell
from monai_fedpriv.fl.server.round import ServerRound
from monai_fedpriv.fl.server.screening import ScreenSettings
from monai_fedpriv.fl.simulator.faults import Fault, FaultInjector
from monai_fedpriv.fl.simulator.site import SiteRuntime, SiteSpec, build_site, train_round
from monai_fedpriv.fl.strategies import FedAvg, Strategy
from monai_fedpriv.fl.transport.inprocess import InProcessTransport
from monai_fedpriv.fl.update import GlobalModel
from monai_fedpriv.fl.weights import exchangeable_state, load_exchangeable_state, unwrap
from monai_fedpriv.privacy.grad_sample import plain_copy
from monai_fedpriv.privacy.noise import NOISE_SECURE, NOISE_SEEDED
from monai_fedpriv.utils.files import atomic_torch_save, write_json

__all__ = ["FederatedSimulator", "LocalWork"]

logger = logging.getLogger("monai_fedpriv.simulator")


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


class FederatedSimulator:
    """Run federated training of a bundle over in-process sites.

    Args:
        bundle: the bundle and config files to train (``BundleSpec``).
        train_sites: ``{site name: training data list}``; order fixes the site order.
        eval_sets: ``{name: validation data list}``; a site's own Dice uses the set of the same name, the global
            model is scored on every set and on their union.
        rounds: number of federated rounds.
        local_work: local epochs or steps per round.
        output_dir: where ``metrics.json``, ``models/`` and ``checkpoints/`` go.
        strategy: server strategy (default :class:`~monai_fedpriv.fl.strategies.FedAvg` weighted by local steps).
        momentum: client optimiser policy, ``"restart"``, ``"local"`` or ``"aggregate"``.
        seed: run seed (model init, data streams, augmentation, and privacy noise unless ``secure_noise``).
        device: training device.
        overrides: extra bundle overrides applied to every parser.
        filters_factory: ``site name -> list of update filters``, appended to each site's chain.
        num_workers: data-loader workers per site.
        progress: print one line per round.
        label: name in progress lines.
        screen: how the server screens updates (:class:`~monai_fedpriv.fl.server.ScreenSettings`).
        min_sites: acceptable updates a round needs (default all but one of its sites, at least one).
        faults: faults to inject (:mod:`.faults`).
        secure_noise: draw every site's privacy noise from OS entropy instead of the run seed.
        on_round: called with the metrics dict after every completed round (e.g. to keep a report current).

    Example::

        sim = FederatedSimulator(BundleSpec(Path("bundles/brain_tissue_2d")), train_sites, eval_sets,
                                 rounds=10, local_work=LocalWork(epochs=1), output_dir=Path("runs/x"))
        metrics = sim.run()
    """

    def __init__(
        self,
        bundle: BundleSpec,
        train_sites: Mapping[str, Sequence[dict[str, Any]]],
        eval_sets: Mapping[str, Sequence[dict[str, Any]]],
        rounds: int,
        local_work: LocalWork,
        output_dir: Path,
        strategy: Strategy | None = None,
        momentum: str = "restart",
        seed: int = 0,
        device: str | torch.device = "cpu",
        overrides: Mapping[str, Any] | None = None,
        filters_factory: Callable[[str], list[Any]] | None = None,
        num_workers: int = 0,
        progress: bool = True,
        label: str = "federated",
        screen: ScreenSettings | None = None,
        min_sites: int | None = None,
        faults: Sequence[Fault] = (),
        secure_noise: bool = False,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds should be an int >= 1, got {rounds!r}.")
        if not train_sites:
            raise DataError("no training sites were given.")
        for name, data in train_sites.items():
            if not data:
                raise DataError(f"site {name!r} has no training cases.")
        self.bundle = bundle
        self.train_sites = {k: list(v) for k, v in train_sites.items()}
        self.eval_sets = {k: list(v) for k, v in eval_sets.items() if v}
        self.rounds = int(rounds)
        self.local_work = local_work
        self.output_dir = Path(output_dir)
        self.strategy = strategy or FedAvg()
        self.server = ServerRound(self.strategy, screen, min_sites)
        self.momentum = momentum
        self.seed = int(seed)
        self.device = torch.device(device)
        self.overrides = dict(overrides or {})
        self.filters_factory = filters_factory
        self.num_workers = int(num_workers)
        self.progress = progress
        self.label = label
        self.faults = FaultInjector(faults)
        self.faults.check_sites(list(self.train_sites))
        self.secure_noise = bool(secure_noise)
        self.on_round = on_round
        self.transport = InProcessTransport(tamper=self.faults.tamper if self.faults.faults else None)
        self.sites: dict[str, SiteRuntime] = {}
        self.history: list[dict[str, Any]] = []
        self.stopped: dict[str, Any] | None = None
        self._fingerprint: dict[str, Any] | None = None
        self.global_weights: dict[str, torch.Tensor] = {}
        self.evaluators: dict[str, DiceEvaluator] = {}
        self._server_network: torch.nn.Module | None = None
        self._snapshots: dict[str, dict[str, Any]] = {}

    # -- construction -------------------------------------------------------------------------------------------
    @property
    def max_epochs(self) -> int:
        return self.rounds * (self.local_work.epochs or 1)

    def _site_spec(self) -> SiteSpec:
        return SiteSpec(
            rounds=self.rounds, epochs=self.local_work.epochs, steps=self.local_work.steps, seed=self.seed,
            device=str(self.device), momentum=self.momentum, output_dir=self.output_dir,
            num_workers=self.num_workers, secure_noise=self.secure_noise, overrides=self.overrides,
        )  # fmt: skip

    def _build_server(self) -> None:
        common = {"device": f"$torch.device('{self.device}')", "seed": self.seed, **self.overrides}
        with torch.random.fork_rng(devices=[]):  # the initial model is a function of the seed, not of global state
            torch.manual_seed(derive_seed(self.seed, "init"))
            parser = load_bundle(self.bundle, common)
            network = parser.get_parsed_content("network")
        self._server_network = network
        self.global_weights = exchangeable_state(network)
        for name, data in self.eval_sets.items():
            self.evaluators[name] = evaluator_from_bundle(parser, data, self.device)

    def setup(self) -> None:
        self._build_server()
        spec = self._site_spec()
        for name, data in self.train_sites.items():
            with torch.random.fork_rng(devices=[]):
                site = build_site(self.bundle, name, data, spec, self.transport, self.filters_factory)
            self.faults.attach(name, site.trainer, _round_in_training(site))
            if site.setup.get("dp_network_changes"):
                print(f"[{self.label}] {name}: network prepared for DP-SGD:", flush=True)
                for change in site.setup["dp_network_changes"]:
                    print(f"  {change}", flush=True)
            self.sites[name] = site
        self._check_patient_unit()
        self._match_server_to_sites()
        self._fingerprint = self._describe_run()
        self.transport.publish(GlobalModel(0, self.global_weights))
        self._snapshots = {name: site.snapshot() for name, site in self.sites.items()}

    def _check_patient_unit(self) -> None:
        """Patient-level DP needs every patient at one site: a patient split across sites would be counted twice."""
        if any(site.setup.get("dp_privacy_unit") == "patient" for site in self.sites.values()):
            check_patients_at_one_site(self.train_sites)

    def _match_server_to_sites(self) -> None:
        """Give the server the sites' network structure when an override changed it at the sites.

        DP-SGD prepares each site's network before training (``dp.json``: BatchNorm becomes InstanceNorm, which has
        no running statistics), so the bundle's plain network no longer matches what the sites train and send.
        The server then evaluates and aggregates a copy of the prepared network, starting from the server's own
        initial weights wherever the names agree (the converted norms keep their affine weights).
        """
        assert self._server_network is not None
        keys = {name: sorted(_site_network(site).state_dict()) for name, site in self.sites.items()}
        first, site_keys = next(iter(keys.items()))
        differing = [name for name, k in keys.items() if k != site_keys]
        if differing:
            raise BundleError(f"sites {differing} train a different network structure from {first}'s.")
        if site_keys == sorted(self.global_weights):
            return
        server = plain_copy(_site_network(self.sites[first]))
        self.global_weights = {k: self.global_weights.get(k, v) for k, v in exchangeable_state(server).items()}
        load_exchangeable_state(server, self.global_weights)
        self._server_network = server

    # -- checkpointing ------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """Every setting that must match for a checkpoint to be resumed (only the number of rounds may grow), as
        the run was set up: taken once in :meth:`setup` (a config file edited mid-run does not change it)."""
        return self._fingerprint if self._fingerprint is not None else self._describe_run()

    def _describe_run(self) -> dict[str, Any]:
        root = Path(self.bundle.root)
        digests = {}
        for path in self.bundle.config_paths():
            digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
        return {
            "bundle": str(root.resolve()),
            "config_files": list(self.bundle.config_files),
            "config_digests": digests,
            "overrides": _describe({**self.bundle.overrides, **self.overrides}),
            "sites": {k: [str(c.get("image")) for c in v] for k, v in self.train_sites.items()},
            "local_work": self.local_work.describe(),
            "momentum": self.momentum,
            "strategy": self.strategy.config(),
            "screen": self.server.screen.to_dict(),
            "min_sites": self.server.min_sites,
            "seed": self.seed,
            "secure_noise": self.secure_noise,
        }

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoints" / "latest.pt"

    def _save_checkpoint(self, completed_round: int) -> None:
        state = {
            "version": CHECKPOINT_VERSION,
            "round": completed_round,
            "fingerprint": self.fingerprint(),
            "global_weights": self.global_weights,
            "strategy": self.strategy.state_dict(),
            "optimizer_state": self.transport.current.optimizer_state if self.transport.current else None,
            "sites": self._snapshots,
            "history": self.history,
        }
        atomic_torch_save(state, self.checkpoint_path)
        atomic_torch_save(self.global_weights, self.output_dir / "models" / "model.pt")

    def _load_checkpoint(self) -> int:
        state = load_round_checkpoint(self.checkpoint_path, self.fingerprint())
        self.global_weights = state["global_weights"]
        self.strategy.load_state_dict(state["strategy"])
        for name, site in self.sites.items():
            site.load_state_dict(state["sites"][name], self.max_epochs)
        self._snapshots = {name: site.snapshot() for name, site in self.sites.items()}
        self.history = list(state["history"])
        ended = [r for r in self.history if r.get("federation_stopped")]
        if ended:  # a run that ended for a site's budget (stop_federation) says so again after a resume
            self.stopped = {"round": ended[-1]["round"], "reason": ended[-1]["federation_stopped"]}
        self.transport.publish(GlobalModel(state["round"], self.global_weights, state["optimizer_state"]))
        return int(state["round"])

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run all rounds (continuing from the last checkpoint with ``resume=True``); returns the metrics dict.

        Raises:
            FederationError: a round had too few acceptable updates; ``metrics.json`` says why and the checkpoint of
                the last completed round is intact (``resume=True`` continues from it).
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not self.sites:
            self.setup()
        start = self._load_checkpoint() if resume else 0
        if start >= self.rounds and self.progress:
            logger.info(f"checkpoint already at round {start} of {self.rounds}: nothing to do.")
        try:
            for rnd in range(start + 1, self.rounds + 1):
                if not any(site.active for site in self.sites.values()):  # e.g. resumed after every site stopped
                    self._note_all_stopped(rnd - 1)
                    break
                record = self._run_round(rnd)
                if record.get("failed"):
                    self.stopped = {"round": rnd, "reason": record["failed"], "failed_round": record}
                    self.write_metrics()
                    reason = record["failed"].rstrip(".")
                    raise FederationError(
                        f"{reason}. The federation stopped; the last completed round ({rnd - 1}) and its checkpoint "
                        f"are intact in {self.output_dir}: fix the cause and --resume."
                    )
                self.history.append(record)
                self._snapshots = {name: site.snapshot() for name, site in self.sites.items()}
                self._save_checkpoint(rnd)
                metrics = self.write_metrics()
                if self.on_round is not None:
                    self.on_round(metrics)
                if record.get("federation_stopped"):
                    break
                if not any(site.active for site in self.sites.values()):
                    self._note_all_stopped(rnd)
                    break
        finally:
            for site in self.sites.values():
                site.release_engine()
        return self.write_metrics()

    def _note_all_stopped(self, rnd: int) -> None:
        if self.stopped is not None:
            return
        reasons = []
        for record in self.history:
            for name, res in record["sites"].items():
                if res.get("stopped"):
                    reasons.append(f"{name} in round {record['round']}: {res['stopped']}")
        reason = "every site has stopped" + (": " + "; ".join(reasons) if reasons else "")
        logger.warning(f"{reason}; ending the federation after round {rnd}.")
        self.stopped = {"round": rnd, "reason": reason}

    def _run_round(self, rnd: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        active = [name for name, site in self.sites.items() if site.active]
        selected = self.strategy.select_sites(rnd, active)
        site_results: dict[str, dict[str, Any]] = {}
        expected: list[str] = []
        failures: dict[str, str] = {}
        stop_reason = ""
        for name in selected:
            site = self.sites[name]
            result, answers, failure = train_round(
                site, rnd, self.transport, self._snapshots[name], self.max_epochs, self.evaluators.get(name)
            )
            site_results[name] = result
            if answers:
                expected.append(name)
            if failure:
                failures[name] = failure
            if any(b.policy == "stop_federation" for b in site.exhausted_budgets()):
                stop_reason = f"privacy budget of {name} exhausted (policy stop_federation)"
        updates = self.transport.collect()
        reference = dict(self.global_weights)
        outcome = self.server(
            rnd, reference, updates, expected, failures, publish=self.transport.publish,
            wire_bytes=self.transport.wire_bytes,
        )  # fmt: skip
        for name, entry in outcome.sites.items():
            site_results.setdefault(name, {}).update(entry)
        if outcome.failed:
            return {"round": rnd, "sites": site_results, "failed": outcome.failed}
        assert outcome.weights is not None
        self.global_weights = outcome.weights
        assert self._server_network is not None
        load_exchangeable_state(self._server_network, self.global_weights)
        glob = self.evaluate_global()
        for name, res in site_results.items():
            if name in glob["per_set"]:
                res["global_dice"] = glob["per_set"][name]
        record: dict[str, Any] = {
            "round": rnd,
            "sites": site_results,
            "global": {"dice": glob["dice"], "per_site": glob["per_set"], "rejected": len(outcome.rejected)},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if glob["per_class"]:
            record["global"]["dice_per_class"] = glob["per_class"]
        privacy = global_privacy([*self.history, record])
        if privacy:
            record["global"]["privacy"] = privacy
        if stop_reason:
            logger.warning(f"{stop_reason}: stopping after round {rnd}.")
            record["federation_stopped"] = stop_reason
            self.stopped = {"round": rnd, "reason": stop_reason}
            for site in self.sites.values():
                site.active = False
        if self.progress:
            parts = " | ".join(progress_cell(n, r) for n, r in site_results.items())
            print(
                f"[{self.label}] round {rnd}/{self.rounds} | {parts} | global dice {glob['dice']:.3f} "
                f"| {record['seconds']:.1f}s",
                flush=True,
            )
        return record

    def evaluate_global(self, weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Dice of the global model (or of ``weights``) on every evaluation set and their case-weighted mean."""
        assert self._server_network is not None
        if weights is not None:
            load_exchangeable_state(self._server_network, weights)
        per_set = {name: ev(self._server_network) for name, ev in self.evaluators.items()}
        combined = combine_scores(per_set)
        return {"dice": combined["dice"], "per_set": {k: v["dice"] for k, v in per_set.items()},
                "per_class": combined["dice_per_class"]}  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        finals = [r["global"]["dice"] for r in self.history]
        best = max(range(len(finals)), key=lambda i: finals[i]) if finals else None
        out: dict[str, Any] = {
            "label": self.label,
            "config": {**self.fingerprint(), "rounds": self.rounds, "sites": list(self.train_sites)},
            "rounds": self.history,
            "final": {
                "global_dice": finals[-1] if finals else None,
                "global_dice_per_site": self.history[-1]["global"]["per_site"] if self.history else {},
                "best_global_dice": finals[best] if best is not None else None,
                "best_round": self.history[best]["round"] if best is not None else None,
                "rounds_completed": len(self.history),
            },
        }
        if self.history and self.history[-1]["global"].get("dice_per_class"):
            out["final"]["global_dice_per_class"] = self.history[-1]["global"]["dice_per_class"]
        if self.evaluators:
            out["metric"] = next(iter(self.evaluators.values())).describe()
        setup = {name: site.setup for name, site in self.sites.items() if site.setup}
        if setup:
            out["setup"] = setup
        if any(site.budgets or site.setup for site in self.sites.values()):
            out["noise_source"] = NOISE_SECURE if self.secure_noise else NOISE_SEEDED
        if self.stopped is not None:
            out["stopped"] = dict(self.stopped)
        return out

    def write_metrics(self) -> dict[str, Any]:
        metrics = self.metrics()
        write_json(metrics, self.output_dir / "metrics.json")
        return metrics


def _site_network(site: SiteRuntime) -> torch.nn.Module:
    """The plain network a site trains (under any privacy wrapper)."""
    return unwrap(site.sync.network if site.sync.network is not None else site.trainer.network)


def _round_in_training(site: SiteRuntime) -> Callable[[], int]:
    """The round ``site`` is training (1-based): one more than the rounds it has completed."""
    return lambda: site.sync.round + 1
