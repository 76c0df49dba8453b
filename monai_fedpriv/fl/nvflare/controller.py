"""The server of an NVIDIA FLARE job: a ``ModelController`` whose ``run()`` drives the project's server round.

Every round it lets the strategy choose the sites, broadcasts the global model as codec bytes with
``min_responses`` (the rounds's ``--min-sites``), a timeout and ``wait_time_after_min_received`` (NVFlare counts an
error reply as an answer; waiting on lets slower good results in), turns the answers into updates and failures,
and hands them to the same :class:`~monai_fedpriv.fl.server.ServerRound` the in-process simulator uses (screen,
aggregate, record). After each completed round it checkpoints its state atomically under ``<state root>/server``
and writes ``metrics.json`` in the simulator's format. Sites score each global model on their own validation cases
(reported with their next answer, and in a final ``validate`` task): the server never sees data.

Resume: NVFlare 2.9 has no job-level resume, so a resumed federation is a new job of the same settings exported
with ``--resume`` (``run-nvflare --resume`` makes one): this controller reloads its checkpoint (refusing one of
other settings) and continues after the last completed round, and every site restores its own state of that round.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from monai_fedpriv.bundle.loader import BundleSpec, parser_get
from monai_fedpriv.errors import ResumeError, UpdateError
from monai_fedpriv.fl.codec import Expected, decode_update, encode_global
from monai_fedpriv.fl.evaluation import combine_scores
from monai_fedpriv.fl.nvflare.answers import MalformedAnswer, Rejected, privacy_problem, read_answer
from monai_fedpriv.fl.nvflare.settings import JOB_ARCHIVE, JobSettings, open_job_archive
from monai_fedpriv.fl.server import ScreenSettings, ServerRound
from monai_fedpriv.fl.server.records import final_summary, round_record, stop_federation_reason
from monai_fedpriv.fl.server.work import bundle_work, work_bounds
from monai_fedpriv.fl.simulator.server_model import initial_network
from monai_fedpriv.fl.strategies import build_strategy
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate
from monai_fedpriv.fl.weights import exchangeable_state
from monai_fedpriv.fl.wire import MOMENTS
from monai_fedpriv.privacy.noise import NOISE_SECURE, NOISE_SEEDED
from monai_fedpriv.utils.files import atomic_torch_save, json_safe, write_json

__all__ = ["FedPrivController", "initial_weights"]

CHECKPOINT_VERSION = 1


def _client_name(res: Any) -> str:
    """The site an answer comes from (as NVFlare names it; anything unreadable names no site)."""
    try:
        return str(dict(res.meta or {}).get("client_name"))
    except Exception:  # noqa: BLE001
        return "None"


def initial_weights(bundle: BundleSpec, seed: int) -> dict[str, torch.Tensor]:
    """The global model of round 0: the bundle's network built from the run seed, as the simulator builds it, with
    the structure the sites train when they run DP-SGD (BatchNorm replaced the way ``dp.json`` replaces it, affine
    weights kept)."""
    parser, network = initial_network(bundle, seed)
    if parser_get(parser, "dp") is not None:
        from monai_fedpriv.privacy.model_prep import convert_batchnorm

        network, _ = convert_batchnorm(network, norm=parser_get(parser, "dp#norm") or "instance")
    return exchangeable_state(network)


class FedPrivController(ModelController):
    """``run()`` of an exported job (see the module docstring).

    Args:
        job_archive: the job archive's file name in the app's ``custom/`` folder.
    """

    def __init__(self, job_archive: str = JOB_ARCHIVE) -> None:
        super().__init__(persistor_id="", ignore_result_error=True)  # failures are decided by ServerRound
        self.job_archive = job_archive
        self._strategy_config: dict[str, Any] = {}

    # ---------------------------------------------------------------- set-up
    def _settings(self) -> tuple[JobSettings, Path]:
        app = Path(self.get_app_dir())
        for folder in (app / "custom", app):
            if (folder / self.job_archive).is_file():
                return open_job_archive(folder / self.job_archive)
        raise FileNotFoundError(f"{self.job_archive} not found in {app}/custom.")

    def _start(self, settings: JobSettings, job_dir: Path, state_dir: Path) -> dict[str, Any]:
        checkpoint = state_dir / "checkpoint.pt"
        if settings.resume:
            # never a silent fresh start: the sites would then drop the rounds they saved for this resume
            if not checkpoint.is_file():
                raise ResumeError(
                    f"this job resumes a federation, but the server has no checkpoint at {checkpoint} (is "
                    f"$MONAI_FEDPRIV_STATE_ROOT the same as for the earlier job?); export the job without --resume "
                    f"to start over."
                )
            try:
                state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is one resume error naming it
                raise ResumeError(f"cannot read the server checkpoint {checkpoint}: {exc}") from exc
            fingerprint = state.get("fingerprint") if isinstance(state, dict) else None
            if fingerprint != settings.fingerprint() or state.get("version") != CHECKPOINT_VERSION:
                raise ResumeError(f"{checkpoint} belongs to another job configuration; start a new run.")
            self.info(f"resuming after round {state['round']} from {checkpoint}")
            return state
        bundle = BundleSpec(job_dir / settings.bundle, tuple(settings.config_files), dict(settings.overrides))
        return {
            "version": CHECKPOINT_VERSION,
            "fingerprint": settings.fingerprint(),
            "round": 0,
            "weights": initial_weights(bundle, settings.seed),
            "optimizer_state": None,
            "strategy": {},
            "history": [],
            "active": list(settings.sites),
            "stopped": None,
        }

    # ---------------------------------------------------------------- the rounds
    def run(self) -> None:
        settings, job_dir = self._settings()
        state_dir = settings.state_root() / "server"
        state = self._start(settings, job_dir, state_dir)
        strategy = build_strategy(**settings.strategy)
        strategy.load_state_dict(state["strategy"])
        self._strategy_config = strategy.config()
        server = ServerRound(strategy, ScreenSettings(**settings.screen), settings.min_sites)
        for rnd in range(state["round"] + 1, settings.rounds + 1):
            if self.abort_signal is not None and self.abort_signal.triggered:
                return
            targets = strategy.select_sites(rnd, list(state["active"]))
            if not targets:
                break
            if not self._round(rnd, targets, settings, server, state, state_dir):
                return
            if state.get("stopped"):
                break
        self._validate(settings, state, state_dir)

    def _broadcast(self, rnd: int, targets: list[str], server: ServerRound, settings: JobSettings, state: dict) -> list:
        model = GlobalModel(rnd - 1, state["weights"], state["optimizer_state"])
        data = FLModel(params_type=ParamsType.FULL, params={"global": encode_global(model)},
                       current_round=rnd - 1, total_rounds=settings.rounds, meta={"round": rnd})  # fmt: skip
        return self.broadcast_model(
            data=data, task_name="train", targets=targets,
            min_responses=min(server.required(len(targets)), len(targets)), timeout=int(settings.round_timeout),
            wait_time_after_min_received=int(settings.wait_after_min),
        ) or []  # fmt: skip

    def _round(
        self, rnd: int, targets: list[str], settings: JobSettings, server: ServerRound, state: dict, state_dir: Path
    ) -> bool:
        t0 = time.perf_counter()
        results = self._broadcast(rnd, targets, server, settings, state)
        if self.abort_signal is not None and self.abort_signal.triggered:
            return False
        updates: list[ModelUpdate] = []
        failures: dict[str, str] = {}
        expected: list[str] = []
        sites: dict[str, dict[str, Any]] = {}
        wire: dict[str, int] = {}
        order = {name: k for k, name in enumerate(settings.sites)}
        moments = MOMENTS if settings.momentum == "aggregate" else 0
        for res in sorted(results, key=lambda r: order.get(_client_name(r), len(order))):
            name = _client_name(res)
            if name not in targets or name in sites:
                self.warning(f"round {rnd}: ignored an answer from {name!r}, which was not asked or already answered")
                continue
            sites[name] = {}
            # everything in an answer is site-controlled: whatever is wrong with it is this site's rejection, never
            # the end of the round
            try:
                self._read_answer(rnd, name, res, state, moments, sites, updates, failures, expected, wire)
            except Exception as exc:  # noqa: BLE001
                failures[name] = str(exc) if isinstance(exc, Rejected) else f"malformed answer: {exc!r}"[:500]
                sites[name] = {}
                updates[:] = [u for u in updates if u.site != name]
                wire.pop(name, None)
                if name not in expected:
                    expected.append(name)
        errored = set(getattr(self, "_current_failed_clients", set()) or set())
        for name in targets:
            if name not in sites:
                failures[name] = (
                    "no answer: the site's trainer failed (NVFlare error reply)"
                    if name in errored
                    else f"no answer within the round's timeout ({settings.round_timeout} s)"
                )
                expected.append(name)
        bounds = work_bounds(settings, *self._bundle_work(settings), state.get("declared_samples", {}))
        outcome = server(rnd, state["weights"], updates, expected, failures, wire_bytes=wire, work_bounds=bounds)
        for name, entry in outcome.sites.items():
            sites.setdefault(name, {}).update(entry)
        for name in outcome.accepted:  # recorded only after the round screened (and weighed) it: see work_bounds
            state.setdefault("declared_samples", {}).setdefault(name, int(outcome.sites[name]["n_samples"]))
        if outcome.failed:
            state["stopped"] = {"round": rnd, "reason": outcome.failed, "failed_round": {"round": rnd, "sites": sites}}
            self._write_metrics(settings, state, state_dir)
            self.error(outcome.failed)
            return False
        state["weights"], state["optimizer_state"] = outcome.weights, outcome.optimizer_state
        # scored when the sites answer the next task (they hold the validation data)
        record = round_record(rnd, sites, {}, len(outcome.rejected), time.perf_counter() - t0, state["history"])
        stop = [n for n, e in sites.items() if isinstance(e.get("privacy"), dict)
                and e["privacy"].get("policy") == "stop_federation" and e["privacy"].get("exhausted")]  # fmt: skip
        if stop:
            record["federation_stopped"] = stop_federation_reason(stop[0])
            state["stopped"] = {"round": rnd, "reason": record["federation_stopped"]}
        state["history"].append(record)
        state["round"] = rnd
        state["strategy"] = server.strategy.state_dict()
        if not state["active"] and not state.get("stopped"):
            state["stopped"] = {"round": rnd, "reason": "every site has stopped"}
        atomic_torch_save(state, state_dir / "checkpoint.pt")
        atomic_torch_save(state["weights"], state_dir / "models" / "model.pt")
        self._write_metrics(settings, state, state_dir)
        self.info(f"round {rnd}: aggregated {outcome.accepted}, rejected {sorted(outcome.rejected)}")
        return True

    def _read_answer(
        self, rnd: int, name: str, res: Any, state: dict, moments: int, sites: dict, updates: list, failures: dict,
        expected: list, wire: dict,
    ) -> None:  # fmt: skip
        """Take one site's answer into the round (raises :class:`MalformedAnswer` or anything else for a malformed
        one, which the caller turns into that site's rejection)."""
        answer = read_answer(dict(res.meta or {}))
        blob = (res.params or {}).get("update")
        update = None
        if not answer.failed and isinstance(blob, (bytes, bytearray)):
            # untrusted bytes: decoded against the model, the site asked and the round, so nothing larger than the
            # model is allocated
            expect = Expected.of(state["weights"], site=name, round=rnd, moments=moments)
            try:
                update = decode_update(bytes(blob), expect)
            except Exception as exc:  # noqa: BLE001
                detail = exc if isinstance(exc, UpdateError) else repr(exc)
                raise Rejected(f"undecodable update: {detail}") from None
            if "privacy" in update.meta and (problem := privacy_problem(update.meta["privacy"])):
                raise MalformedAnswer(f"update {problem}")
        # checked: now it may change the server's state
        sites[name] = answer.result
        if answer.setup:
            state.setdefault("setup", {})[name] = answer.setup
        self._note_global_dice(state, name, answer.scored)
        if answer.failed:
            failures[name] = answer.failed
            expected.append(name)
        elif update is not None and isinstance(blob, (bytes, bytearray)):
            expected.append(name)
            wire[name] = len(blob)
            updates.append(update)
        if answer.result.get("stopped"):
            state["active"] = [s for s in state["active"] if s != name]

    def _bundle_work(self, settings: JobSettings) -> tuple[int, bool]:
        """The bundle's training batch size and whether it trains with DP-SGD (read once, for the work bounds)."""
        if getattr(self, "_work", None) is None:
            _, job_dir = self._settings()
            bundle = BundleSpec(job_dir / settings.bundle, tuple(settings.config_files), dict(settings.overrides))
            self._work = bundle_work(bundle, settings.seed)
        return self._work

    def _note_global_dice(self, state: dict, site: str, scored: dict) -> None:
        """A site's score of the last completed round's global model goes into that round's record."""
        if "global_dice" not in scored or not state["history"]:
            return
        record = state["history"][-1]
        record["sites"].setdefault(site, {})["global_dice"] = scored["global_dice"]
        scores = record.setdefault("_scores", {})
        scores[site] = {
            "dice": scored["global_dice"], "n_cases": int(scored.get("n_cases", 1)),
            "dice_per_class": scored.get("dice_per_class", []), "classes": scored.get("classes", []),
        }  # fmt: skip
        combined = combine_scores(scores)
        record["global"]["per_site"][site] = scored["global_dice"]
        record["global"]["n_cases"] = {s: v["n_cases"] for s, v in scores.items()}
        record["global"]["dice"] = combined["dice"]
        if combined["dice_per_class"]:
            record["global"]["dice_per_class"] = combined["dice_per_class"]
        if scored.get("metric"):
            state["metric"] = scored["metric"]

    def _validate(self, settings: JobSettings, state: dict, state_dir: Path) -> None:
        """Every site scores the final global model on its own validation cases."""
        if state["history"]:
            model = GlobalModel(state["round"], state["weights"], None, stop=True)
            blob = encode_global(model)
            data = FLModel(params_type=ParamsType.FULL, params={"global": blob}, meta={"validate": True})
            results = self.broadcast_model(data=data, task_name="validate", targets=list(settings.sites),
                                           timeout=int(settings.round_timeout) or 600,
                                           wait_time_after_min_received=int(settings.wait_after_min)) or []  # fmt: skip
            for res in results:
                meta = dict(res.meta or {})
                self._note_global_dice(state, str(meta.get("client_name")), meta.get("global") or {})
            atomic_torch_save(state, state_dir / "checkpoint.pt")
        self._write_metrics(settings, state, state_dir)

    def _write_metrics(self, settings: JobSettings, state: dict, state_dir: Path) -> None:
        history = state["history"]
        order = {name: k for k, name in enumerate(settings.sites)}
        for record in history:  # sites in the job's order, whatever order their answers came in
            for key in ("per_site", "n_cases"):
                if key in record["global"]:
                    record["global"][key] = dict(sorted(record["global"][key].items(), key=lambda kv: order[kv[0]]))
        metrics: dict[str, Any] = {
            "label": "federated (NVIDIA FLARE)",
            "config": {
                "job": settings.name, "bundle": settings.bundle, "config_files": list(settings.config_files),
                "overrides": json_safe(settings.overrides), "rounds": settings.rounds, "sites": list(settings.sites),
                "local_work": {"local_epochs": settings.local_epochs, "local_steps": settings.local_steps},
                "momentum": settings.momentum, "strategy": self._strategy_config,
                "screen": settings.screen, "min_sites": settings.min_sites, "seed": settings.seed,
                "secure_noise": settings.secure_noise, "fingerprint": settings.fingerprint(),
            },  # fmt: skip
            "rounds": [{k: v for k, v in r.items() if k != "_scores"} for r in history],
            "final": final_summary(history),
            "partition": settings.partition,
        }
        if state.get("metric"):
            metrics["metric"] = state["metric"]
        if state.get("setup"):
            metrics["setup"] = state["setup"]
        if state.get("setup") or any((e or {}).get("privacy") for r in history for e in r["sites"].values()):
            metrics["noise_source"] = NOISE_SECURE if settings.secure_noise else NOISE_SEEDED
        if settings.data_summary:
            metrics["data"] = settings.data_summary
        if state.get("stopped"):
            metrics["stopped"] = state["stopped"]
        write_json(metrics, state_dir / "metrics.json")
