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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.data.splits import check_patients_at_one_site
from monai_fedpriv.errors import DataError, FederationError
from monai_fedpriv.fl.evaluation import DiceEvaluator
from monai_fedpriv.fl.server.checkpoint import CHECKPOINT_VERSION, load_round_checkpoint
from monai_fedpriv.fl.server.records import final_summary, progress_cell, round_record, stop_federation_reason
from monai_fedpriv.fl.server.round import ServerRound
from monai_fedpriv.fl.server.screening import ScreenSettings
from monai_fedpriv.fl.server.work import WorkBound, bound_for
from monai_fedpriv.fl.simulator.faults import Fault, FaultInjector
from monai_fedpriv.fl.simulator.ledgers import SiteLedgers
from monai_fedpriv.fl.simulator.run_config import LocalWork, run_fingerprint
from monai_fedpriv.fl.simulator.server_model import ServerModel
from monai_fedpriv.fl.simulator.site import SiteRuntime, SiteSpec, build_site
from monai_fedpriv.fl.simulator.site_round import train_round
from monai_fedpriv.fl.strategies import FedAvg, Strategy
from monai_fedpriv.fl.transport.inprocess import InProcessTransport
from monai_fedpriv.fl.update import GlobalModel
from monai_fedpriv.privacy.noise import NOISE_SECURE, NOISE_SEEDED
from monai_fedpriv.utils.files import atomic_torch_save, write_json

__all__ = ["FederatedSimulator", "LocalWork"]

logger = logging.getLogger("monai_fedpriv.simulator")


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
        partition: the scheme that split the cases onto the sites (``--partition``), part of the fingerprint.
        round_timeout: seconds of wall time each site has to send its round's update (``None`` or 0: no limit); a
            site past it is rejected for the round as under NVIDIA FLARE (:func:`.site_round.train_round`).
        ledger_store: a :class:`~monai_fedpriv.privacy.ledger_store.LedgerStore`: each site's budget carries what
            earlier runs spent on its cases and records its releases there (``None``: this run's ledger only).
        fresh_budget: start every site's budget at zero even if the store holds earlier spending (stated in
            ``metrics.json``).

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
        partition: str | None = None,
        round_timeout: float | None = None,
        ledger_store: Any = None,
        fresh_budget: bool = False,
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
        self.partition = partition
        self.round_timeout = round_timeout or None
        self.ledgers = SiteLedgers(ledger_store, fresh_budget)
        self.transport = InProcessTransport(
            tamper=self.faults.tamper if self.faults.faults else None,
            tamper_bytes=self.faults.tamper_bytes if self.faults.faults else None,
        )
        self.sites: dict[str, SiteRuntime] = {}
        self.history: list[dict[str, Any]] = []
        self.stopped: dict[str, Any] | None = None
        self._fingerprint: dict[str, Any] | None = None
        self.global_weights: dict[str, torch.Tensor] = {}
        self.server_model: ServerModel | None = None
        self.evaluators: dict[str, DiceEvaluator] = {}
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

    def setup(self) -> None:
        self.server_model = ServerModel(self.bundle, self.eval_sets, self.seed, self.device, self.overrides)
        self.evaluators = self.server_model.evaluators
        spec = self._site_spec()
        for name, data in self.train_sites.items():
            with torch.random.fork_rng(devices=[]):
                site = build_site(self.bundle, name, data, spec, self.transport, self.filters_factory)
            self.faults.attach(name, site.trainer, site.round_in_training)
            if site.setup.get("dp_network_changes"):
                print(f"[{self.label}] {name}: network prepared for DP-SGD:", flush=True)
                for change in site.setup["dp_network_changes"]:
                    print(f"  {change}", flush=True)
            self.sites[name] = site
        self._check_patient_unit()
        self.global_weights = self.server_model.match_sites({n: site.network for n, site in self.sites.items()})
        self._fingerprint = self._describe_run()
        self.transport.publish(GlobalModel(0, self.global_weights))
        self._snapshots = {name: site.snapshot() for name, site in self.sites.items()}

    def _check_patient_unit(self) -> None:
        """Patient-level DP needs every patient at one site: a patient split across sites would be counted twice."""
        if any(site.setup.get("dp_privacy_unit") == "patient" for site in self.sites.values()):
            check_patients_at_one_site(self.train_sites)

    # -- checkpointing ------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """Every setting that must match for a checkpoint to be resumed (only the number of rounds may grow), as
        the run was set up: taken once in :meth:`setup` (a config file edited mid-run does not change it)."""
        return self._fingerprint if self._fingerprint is not None else self._describe_run()

    def _describe_run(self) -> dict[str, Any]:
        described = run_fingerprint(
            self.bundle, self.overrides, self.train_sites, self.local_work, self.momentum, self.strategy,
            self.server, self.seed, self.secure_noise, self.partition,
        )  # fmt: skip
        if self.ledgers.describe() is not None:
            described["ledger_store"] = self.ledgers.describe()
        return described

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
            "run_id": self.ledgers.run_id,
        }
        atomic_torch_save(state, self.checkpoint_path)
        atomic_torch_save(self.global_weights, self.output_dir / "models" / "model.pt")

    def _load_checkpoint(self) -> int:
        state = load_round_checkpoint(self.checkpoint_path, self.fingerprint(), self.rounds)
        self.global_weights = state["global_weights"]
        self.strategy.load_state_dict(state["strategy"])
        for name, site in self.sites.items():
            site.load_state_dict(state["sites"][name], self.max_epochs)
        self._snapshots = {name: site.snapshot() for name, site in self.sites.items()}
        self.history = list(state["history"])
        self.ledgers.run_id = str(state.get("run_id") or self.ledgers.run_id)
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
        log = (lambda line: print(f"[{self.label}] {line}", flush=True)) if self.progress else None
        self.ledgers.bind(self.sites, self.train_sites, resumed=resume, log=log)
        self._snapshots = {name: site.snapshot() for name, site in self.sites.items()}
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
            self.ledgers.save(self.sites)
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
                site, rnd, self.transport, self._snapshots[name], self.max_epochs, self.evaluators.get(name),
                timeout=self.round_timeout,
            )  # fmt: skip
            site_results[name] = result
            if answers:
                expected.append(name)
            if failure:
                failures[name] = failure
            if any(b.policy == "stop_federation" for b in site.exhausted_budgets()):
                stop_reason = stop_federation_reason(name)
        updates = self.transport.collect()
        failures.update(self.transport.take_rejected())  # bytes that did not decode: that site's rejection
        reference = dict(self.global_weights)
        outcome = self.server(
            rnd, reference, updates, expected, failures, publish=self.transport.publish,
            wire_bytes=self.transport.wire_bytes, work_bounds=self._work_bounds(selected),
        )  # fmt: skip
        for name, entry in outcome.sites.items():
            site_results.setdefault(name, {}).update(entry)
        if outcome.failed:
            return {"round": rnd, "sites": site_results, "failed": outcome.failed}
        assert outcome.weights is not None
        self.global_weights = outcome.weights
        glob = self.evaluate_global()
        for name, res in site_results.items():
            if name in glob["per_set"]:
                res["global_dice"] = glob["per_set"][name]
        scores = {"dice": glob["dice"], "per_site": glob["per_set"], "dice_per_class": glob["per_class"]}
        record = round_record(
            rnd, site_results, scores, len(outcome.rejected), time.perf_counter() - t0, self.history
        )
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

    def _work_bounds(self, names: Sequence[str]) -> dict[str, WorkBound]:
        """The most each site may claim in a round: the steps the server asks of it and the size of the training
        data it was built with."""
        epochs, steps = self.local_work.epochs, self.local_work.steps
        return {
            name: bound_for(len(self.train_sites[name]), self.sites[name].batch_size, epochs, steps,
                            self.sites[name].dp_sgd)
            for name in names
        }  # fmt: skip

    def evaluate_global(self, weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Dice of the global model (or of ``weights``) on every evaluation set and their case-weighted mean."""
        assert self.server_model is not None
        return self.server_model.evaluate(self.global_weights if weights is None else weights)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "config": {**self.fingerprint(), "rounds": self.rounds, "sites": list(self.train_sites)},
            "rounds": self.history,
            "final": final_summary(self.history),
        }
        metric = self.server_model.metric() if self.server_model is not None else None
        if metric is not None:
            out["metric"] = metric
        setup = {name: site.setup for name, site in self.sites.items() if site.setup}
        if setup:
            out["setup"] = setup
        if any(site.budgets or site.setup for site in self.sites.values()):
            out["noise_source"] = NOISE_SECURE if self.secure_noise else NOISE_SEEDED
        if self.stopped is not None:
            out["stopped"] = dict(self.stopped)
        if self.ledgers.summary() is not None:
            out["ledger_store"] = self.ledgers.summary()
        return out

    def write_metrics(self) -> dict[str, Any]:
        metrics = self.metrics()
        write_json(metrics, self.output_dir / "metrics.json")
        return metrics
