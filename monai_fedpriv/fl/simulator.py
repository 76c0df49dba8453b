"""In-process simulation of N federated sites built from one MONAI bundle.

Each site gets its own ``ConfigParser`` of the bundle with its data list and a reproducible stream loader, so its
``SupervisedTrainer`` is the bundle's own trainer; :class:`~monai_fedpriv.handlers.FederatedSync` is attached to it.
Every round the simulator resumes each site's engine until the handler has sent its update and interrupted the run,
aggregates with a pure strategy from :mod:`monai_fedpriv.fl.aggregation`, publishes the new global model, evaluates,
and checkpoints. A run resumed from the last checkpoint continues with identical results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle, parser_get
from monai_fedpriv.data.stream import StreamSampler, derive_seed
from monai_fedpriv.errors import BundleError, DataError
from monai_fedpriv.fl.aggregation import Aggregator, FedAvg
from monai_fedpriv.fl.checkpoint import CHECKPOINT_VERSION, atomic_torch_save, load_round_checkpoint, write_json
from monai_fedpriv.fl.evaluation import DiceEvaluator
from monai_fedpriv.fl.inprocess import InProcessTransport
from monai_fedpriv.fl.round_records import global_privacy, mean, privacy_setup, progress_cell, update_facts
from monai_fedpriv.fl.update import GlobalModel
from monai_fedpriv.fl.weights import exchangeable_state, load_exchangeable_state, unwrap
from monai_fedpriv.handlers.federated_sync import FederatedSync
from monai_fedpriv.privacy.grad_sample import plain_copy

__all__ = ["FederatedSimulator", "LocalWork", "SiteRuntime"]

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
        if value is None or int(value) < 1:
            raise ValueError(f"local work per round must be >= 1, got {value}.")

    def describe(self) -> dict[str, int | None]:
        return {"local_epochs": self.epochs, "local_steps": self.steps}


class SiteRuntime:
    """One simulated site: its bundle parser, trainer, sync handler, sampler and evaluator."""

    def __init__(
        self,
        name: str,
        parser: ConfigParser,
        trainer: Any,
        sync: FederatedSync,
        sampler: StreamSampler | None,
        batch_size: int,
        stateful: Mapping[str, Any],
    ) -> None:
        self.name = name
        self.parser = parser
        self.trainer = trainer
        self.sync = sync
        self.sampler = sampler
        self.batch_size = batch_size
        self.stateful = dict(stateful)
        self.losses: list[float] = []
        self.active = True
        self.setup: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "engine": self.trainer.state_dict(),
            "optimizer": self.trainer.optimizer.state_dict(),
            "sync": self.sync.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "stateful": {k: v.state_dict() for k, v in self.stateful.items()},
            "active": self.active,
        }

    def load_state_dict(self, state: Mapping[str, Any], max_epochs: int) -> None:
        for key in ("engine", "optimizer", "sync", "sampler", "stateful", "active"):
            if key not in state:
                raise KeyError(f"checkpoint of {self.name} lacks required key {key!r}.")
        engine_state = dict(state["engine"])
        engine_state["max_epochs"] = max_epochs
        self.trainer.load_state_dict(engine_state)
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.sync.load_state_dict(state["sync"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
            # consumed samples, not the prefetch position: every batch of a stream is full
            self.sampler.position = self.trainer.state.iteration * self.batch_size
        for key, obj in self.stateful.items():
            if key not in state["stateful"]:
                raise KeyError(f"checkpoint of {self.name} lacks state of {key!r}.")
            obj.load_state_dict(state["stateful"][key])
        self.active = bool(state["active"])


class FederatedSimulator:
    """Run federated training of a bundle over in-process sites.

    Args:
        bundle: the bundle and config files to train (``BundleSpec``).
        train_sites: ``{site name: training data list}``; order fixes the site order.
        eval_sets: ``{name: validation data list}``; a site's own Dice uses the set of the same name, the global
            model is scored on every set and on their union.
        rounds: number of federated rounds.
        local_work: local epochs or steps per round.
        aggregator: server strategy (default weighted :class:`FedAvg`).
        momentum: client optimiser policy, ``"restart"``, ``"local"`` or ``"aggregate"``.
        seed: run seed (model init, data streams, augmentation).
        output_dir: where ``metrics.json`` and ``checkpoints/`` go.
        device: training device.
        overrides: extra bundle overrides applied to every parser.
        filters_factory: ``site name -> list of update filters`` (privatizers), built once per site.
        num_workers: data-loader workers per site.
        progress: print one line per round.

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
        aggregator: Aggregator | None = None,
        momentum: str = "restart",
        seed: int = 0,
        device: str | torch.device = "cpu",
        overrides: Mapping[str, Any] | None = None,
        filters_factory: Callable[[str], list[Any]] | None = None,
        num_workers: int = 0,
        progress: bool = True,
        label: str = "federated",
    ) -> None:
        if rounds < 1:
            raise ValueError(f"rounds should be >= 1, got {rounds}.")
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
        self.aggregator = aggregator or FedAvg()
        self.momentum = momentum
        self.seed = int(seed)
        self.device = torch.device(device)
        self.overrides = dict(overrides or {})
        self.filters_factory = filters_factory
        self.num_workers = int(num_workers)
        self.progress = progress
        self.label = label
        self.transport = InProcessTransport()
        self.sites: dict[str, SiteRuntime] = {}
        self.history: list[dict[str, Any]] = []
        self.global_weights: dict[str, torch.Tensor] = {}
        self.evaluators: dict[str, DiceEvaluator] = {}
        self._server_network: torch.nn.Module | None = None

    # -- construction -------------------------------------------------------------------------------------------
    def _common_overrides(self) -> dict[str, Any]:
        return {"device": f"$torch.device('{self.device}')", "seed": self.seed, **self.overrides}

    def _build_server(self) -> None:
        torch.manual_seed(derive_seed(self.seed, "init"))
        parser = load_bundle(self.bundle, self._common_overrides())
        network = parser.get_parsed_content("network")
        self._server_network = network
        self.global_weights = exchangeable_state(network)
        transform = parser.get_parsed_content("validate#preprocessing")
        inferer = parser.get_parsed_content("validate#inferer") if parser_get(parser, "validate#inferer") else None
        for name, data in self.eval_sets.items():
            self.evaluators[name] = DiceEvaluator(data, transform, self.device, inferer)

    def _build_site(self, name: str, data: list[dict[str, Any]]) -> SiteRuntime:
        probe = load_bundle(self.bundle, self._common_overrides())
        batch_size = int(probe.get_parsed_content("train#dataloader#batch_size"))
        site_seed = derive_seed(self.seed, "site", name)
        n_batches = -(-len(data) // batch_size)
        if self.local_work.epochs is not None:
            max_epochs, epoch_length, every, unit = (
                self.rounds * self.local_work.epochs,
                n_batches,
                self.local_work.epochs,
                "epochs",
            )
        else:
            max_epochs, epoch_length, every, unit = self.rounds, int(self.local_work.steps or 1), 1, "epochs"
        overrides = {
            **self._common_overrides(),
            "train#dataset#data": data,
            "train#dataloader": {
                "_target_": "monai_fedpriv.data.stream.make_stream_loader",
                "dataset": "@train#dataset",
                "batch_size": batch_size,
                "seed": site_seed,
                "num_workers": self.num_workers,
            },
            "site_seed": site_seed,
            # anything the bundle writes (checkpoints, evaluation, attack audits) goes into the run, not the bundle
            "ckpt_dir": str(self.output_dir / "sites" / name / "models"),
            "output_dir": str(self.output_dir / "sites" / name),
            "train#trainer#max_epochs": max_epochs,
            "train#trainer#epoch_length": epoch_length,
            "train#trainer#train_handlers": [],
            # read by the bundle's fed.json, when it has one
            "fed_transport": self.transport,
            "fed_site": name,
            "fed_every": every,
            "fed_unit": unit,
            "fed_momentum": self.momentum,
        }
        parser = load_bundle(self.bundle, overrides)
        trainer = parser.get_parsed_content("train#trainer")
        sampler = getattr(trainer.data_loader, "sampler", None)
        if not isinstance(sampler, StreamSampler):
            # an override (e.g. dp.json's Poisson loader) replaced the stream; its own state must then be listed in
            # fed_stateful for exact resume
            sampler = None
        extra = list(self.filters_factory(name)) if self.filters_factory else []
        stateful = dict(parser.get_parsed_content("fed_stateful")) if parser_get(parser, "fed_stateful") else {}
        if parser_get(parser, "fed_sync") is not None:  # the bundle's fed.json wires the handler: use it
            sync = parser.get_parsed_content("fed_sync")
            if not isinstance(sync, FederatedSync):
                raise BundleError(f"bundle id 'fed_sync' should build a FederatedSync, got {type(sync).__name__}.")
            sync.filters.extend(extra)
            sync.n_samples = len(data)
        else:
            filters = list(parser.get_parsed_content("fed_filters")) if parser_get(parser, "fed_filters") else []
            sync = FederatedSync(
                self.transport,
                site=name,
                every=every,
                unit=unit,
                momentum=self.momentum,
                filters=filters + extra,
                n_samples=len(data),
            )
        sync.attach(trainer)
        # privacy and audit handlers of the override files (attaching the sync handler twice is a no-op)
        for handler in parser.get_parsed_content("fed_handlers") if parser_get(parser, "fed_handlers") else []:
            handler.attach(trainer)
        site = SiteRuntime(name, parser, trainer, sync, sampler, batch_size, stateful)
        site.setup = privacy_setup(parser)
        if site.setup.get("dp_network_changes"):
            print(f"[{self.label}] {name}: network prepared for DP-SGD:", flush=True)
            for change in site.setup["dp_network_changes"]:
                print(f"  {change}", flush=True)

        def _record_loss(engine: Any) -> None:
            out = engine.state.output
            if isinstance(out, list):  # MONAI returns a list of dicts for list-collated batches
                out = out[0]
            loss = out.get("loss") if isinstance(out, dict) else None
            if loss is not None:
                site.losses.append(float(loss))

        trainer.add_event_handler(Events.ITERATION_COMPLETED, _record_loss)
        return site

    # -- checkpointing ------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (rounds may grow)."""
        return {
            "bundle": str(Path(self.bundle.root).resolve()),
            "config_files": list(self.bundle.config_files),
            "sites": {k: [str(c.get("image")) for c in v] for k, v in self.train_sites.items()},
            "local_work": self.local_work.describe(),
            "momentum": self.momentum,
            "aggregator": type(self.aggregator).__name__,
            "seed": self.seed,
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
            "aggregator": self.aggregator.state_dict(),
            "optimizer_state": self.transport.current.optimizer_state if self.transport.current else None,
            "sites": {name: site.state_dict() for name, site in self.sites.items()},
            "history": self.history,
        }
        atomic_torch_save(state, self.checkpoint_path)
        atomic_torch_save(self.global_weights, self.output_dir / "models" / "model.pt")

    def _load_checkpoint(self) -> int:
        state = load_round_checkpoint(self.checkpoint_path, self.fingerprint())
        self.global_weights = state["global_weights"]
        self.aggregator.load_state_dict(state["aggregator"])
        max_epochs = self.rounds * (self.local_work.epochs or 1)
        for name, site in self.sites.items():
            site.load_state_dict(state["sites"][name], max_epochs)
        self.history = list(state["history"])
        self.transport.publish(GlobalModel(state["round"], self.global_weights, state["optimizer_state"]))
        return int(state["round"])

    # -- the loop -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self._build_server()
        for name, data in self.train_sites.items():
            self.sites[name] = self._build_site(name, data)
        self._match_server_to_sites()
        self.transport.publish(GlobalModel(0, self.global_weights))

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

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run all rounds (continuing from the last checkpoint with ``resume=True``); returns the metrics dict."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not self.sites:
            self.setup()
        start = self._load_checkpoint() if resume else 0
        if start >= self.rounds and self.progress:
            logger.info(f"checkpoint already at round {start} of {self.rounds}: nothing to do.")
        try:
            for rnd in range(start + 1, self.rounds + 1):
                if not any(site.active for site in self.sites.values()):  # e.g. resumed after every site stopped
                    break
                self.history.append(self._run_round(rnd))
                self._save_checkpoint(rnd)
                self.write_metrics()
                if not any(site.active for site in self.sites.values()):
                    logger.warning(f"every site has stopped after round {rnd}; ending the federation.")
                    break
        finally:
            self._release_paused_engines()
        return self.write_metrics()

    def _release_paused_engines(self) -> None:
        """Close engines left interrupted mid-run (a stopped federation, an error) so that Ignite does not report
        their suspended runs as failures when they are garbage-collected."""
        for site in self.sites.values():
            paused = getattr(site.trainer, "_internal_run_generator", None)  # Ignite's interrupt/resume state
            if paused is None:
                continue
            level = site.trainer.logger.level
            site.trainer.logger.setLevel(logging.CRITICAL)
            try:
                paused.close()
            finally:
                site.trainer.logger.setLevel(level)
                site.trainer._internal_run_generator = None

    def _run_round(self, rnd: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        site_results: dict[str, dict[str, Any]] = {}
        stop_all = False
        stop_reason = ""
        for name, site in self.sites.items():
            if not site.active:
                continue
            site.losses = []
            site.trainer.run()
            sent = name in self.transport.inbox
            exhausted = [o for o in site.stateful.values() if getattr(o, "exhausted", False)]
            if any(getattr(o, "policy", None) == "stop_federation" for o in exhausted):
                stop_all = True
                stop_reason = f"privacy budget of {name} exhausted (policy stop_federation)"
            result: dict[str, Any] = {}
            if not sent:
                reason = "privacy budget exhausted" if exhausted else "sent no update"
                logger.warning(f"{name} {reason} in round {rnd} and leaves the federation.")
                result["stopped"] = reason
                if exhausted and _send_partial_round(site):
                    sent = True  # DP-SGD steps taken before the stop: their result is post-processing, send it
            if sent:
                result["loss"] = mean(site.losses)
                if name in self.evaluators:
                    result["dice"] = self.evaluators[name](site.trainer.network)["dice"]
            elif "stopped" in result:
                # a stopped site still reports what it has spent (the ledger covers the whole run)
                facts = [o.privacy_facts() for o in site.stateful.values() if hasattr(o, "privacy_facts")]
                if facts:
                    result["privacy"] = max(facts, key=lambda f: f.get("epsilon") or 0.0)
            if "stopped" in result:
                site.active = False
            site_results[name] = result
        updates = self.transport.collect()
        if updates:
            self.global_weights = self.aggregator(self.global_weights, updates)
            opt_state = self.aggregator.aggregate_optimizer_state(updates)
            self.transport.publish(GlobalModel(rnd, self.global_weights, opt_state))
        for u in updates:
            site_results[u.site].update(update_facts(u, self.transport.wire_bytes.get(u.site)))
        assert self._server_network is not None
        load_exchangeable_state(self._server_network, self.global_weights)
        glob = self.evaluate_global()
        for name, res in site_results.items():
            if name in glob["per_set"]:
                res["global_dice"] = glob["per_set"][name]
        record: dict[str, Any] = {
            "round": rnd,
            "sites": site_results,
            "global": {"dice": glob["dice"], "per_site": glob["per_set"]},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        privacy = global_privacy([*self.history, record])
        if privacy:
            record["global"]["privacy"] = privacy
        if stop_all:
            logger.warning(f"a site's privacy budget is exhausted with policy 'stop_federation': stopping after {rnd}.")
            record["federation_stopped"] = stop_reason
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
        total = sum(r["n_cases"] for r in per_set.values())
        mean = sum(r["dice"] * r["n_cases"] for r in per_set.values()) / total if total else float("nan")
        return {"dice": mean, "per_set": {k: v["dice"] for k, v in per_set.items()}}

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
        setup = {name: site.setup for name, site in self.sites.items() if site.setup}
        if setup:
            out["setup"] = setup
        stops = [(r["round"], r["federation_stopped"]) for r in self.history if r.get("federation_stopped")]
        if stops:
            out["stopped"] = {"round": stops[0][0], "reason": stops[0][1]}
        return out

    def write_metrics(self) -> dict[str, Any]:
        metrics = self.metrics()
        write_json(metrics, self.output_dir / "metrics.json")
        return metrics


def _site_network(site: SiteRuntime) -> torch.nn.Module:
    """The plain network a site trains (under any privacy wrapper)."""
    return unwrap(site.sync.network if site.sync.network is not None else site.trainer.network)


def _send_partial_round(site: SiteRuntime) -> bool:
    """Send the update of a round cut short by a budget stop, if the site took any step in it.

    The steps already taken are accounted in the site's ledger; their result passes through the same filters as any
    update (post-processing of a DP output costs no privacy). Returns whether an update was sent.
    """
    sync, state = site.sync, site.trainer.state
    if state.output is None and state.iteration > 0:
        # Ignite counts an iteration before ITERATION_STARTED, where the budget stop terminated it: it never ran
        # (its output is still None), so it is neither a local step nor part of the update.
        state.iteration -= 1
    start = getattr(sync, "_round_start_iteration", None)
    if start is None or sync._global is None or state.iteration <= start:
        return False
    sync._on_round_end(site.trainer)
    return True
