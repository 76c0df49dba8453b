"""The one run loop (see :mod:`monai_fedpriv.fl.workflow`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from monai_fedpriv.errors import FederationError
from monai_fedpriv.fl.server.records import add_site_score, final_summary, progress_cell, round_record
from monai_fedpriv.fl.server.round import ServerRound
from monai_fedpriv.fl.update import GlobalModel
from monai_fedpriv.fl.workflow.channel import Gathered, RoundRequest, ServerChannel
from monai_fedpriv.fl.workflow.state import RunState
from monai_fedpriv.fl.workflow.stop import Stop, StopKind, StopPolicy, budget_stop_reason
from monai_fedpriv.fl.workflow.uploads import ServerTraining
from monai_fedpriv.utils.files import atomic_torch_save, write_json

__all__ = ["RunLoop"]

logger = logging.getLogger("monai_fedpriv.workflow")


class RunLoop:
    """Run a federation's rounds over a :class:`ServerChannel`.

    Args:
        channel: the transport's server side.
        server: the :class:`~monai_fedpriv.fl.server.ServerRound` (its strategy configures and aggregates).
        rounds: the number of rounds.
        fingerprint: every setting a checkpoint must match to be resumed.
        folder: where ``metrics.json``, ``checkpoint`` and ``models/model.pt`` go.
        weights: the round-0 global model.
        label: the run's name in ``metrics.json`` and progress lines.
        checkpoint: the checkpoint's path (default ``folder/checkpoints/latest.pt``).
        log: called with one progress line per round (``None``: silent).
        on_round: called with the metrics after every completed round.
        server_training: training at the server for strategies whose rounds include it (FedReplay).
    """

    def __init__(
        self, channel: ServerChannel, server: ServerRound, rounds: int, fingerprint: dict[str, Any], folder: Path,
        weights: dict[str, Any], label: str = "federated", checkpoint: Path | None = None,
        log: Callable[[str], None] | None = None, on_round: Callable[[dict[str, Any]], None] | None = None,
        server_training: ServerTraining | None = None,
    ) -> None:  # fmt: skip
        self.channel = channel
        self.server = server
        self.strategy = server.strategy
        self.rounds = int(rounds)
        self.fingerprint = fingerprint
        self.folder = Path(folder)
        self.checkpoint = checkpoint or self.folder / "checkpoints" / "latest.pt"
        self.label = label
        self.log = log
        self.on_round = on_round
        self.server_training = server_training
        self.state = RunState(weights=dict(weights), active=list(channel.sites))
        self.strategy.start(channel.sites)
        if self.strategy.upload_kind and server_training is None:
            raise ValueError(f"--strategy {self.strategy.name} keeps its sites' uploads at the server, but the run "
                             f"has nothing to keep them.")  # fmt: skip

    # ---------------------------------------------------------------- the rounds
    def resume(self) -> None:
        """Continue from the checkpoint (``ResumeError`` when it is of other settings or unreadable)."""
        self.state = RunState.load(self.checkpoint, self.fingerprint, self.rounds)
        self.strategy.load_state_dict(self.state.strategy)
        self.channel.load_state_dict(self.state.channel)
        if self.server_training is not None:
            self.server_training.load_state_dict(self.state.server)
        self.channel.publish(GlobalModel(self.state.round, self.state.weights, self.state.optimizer_state))

    def run(self, resume: bool = False) -> dict[str, Any]:
        """All rounds (after the checkpoint's with ``resume``); returns the metrics.

        Raises:
            FederationError: a round had too few acceptable updates; ``metrics.json`` says why and the last
                completed round's checkpoint is intact.
        """
        if resume:
            self.resume()
        try:
            for rnd in range(self.state.round + 1, self.rounds + 1):
                if self.state.stopped is not None or self._all_left(rnd - 1) or self.channel.aborted():
                    break
                if not self._round(rnd):
                    return self.write_metrics()  # aborted
            if self.channel.aborted():
                return self.write_metrics()
            final = GlobalModel(self.state.round, self.state.weights, None, stop=True)
            scored = self.channel.finish(final, self._last_trained())
            if scored and self.state.history:
                self._note_scores(scored)
                self._save()
            return self.write_metrics()
        finally:
            try:
                self.channel.close()
            except Exception:  # noqa: BLE001 - never mask why the run ended
                logger.exception("releasing the channel failed")

    def _last_trained(self) -> dict[str, int]:
        """The last round each site was asked to train, by the history."""
        return {site: r["round"] for r in self.state.history for site in r["sites"]}

    def _round(self, rnd: int) -> bool:
        t0 = time.perf_counter()
        kind = self.strategy.round_kind(rnd)
        if kind == "server":  # nothing crosses the wire: the server trains on what was uploaded
            assert self.server_training is not None
            try:
                self.state.weights, facts = self.server_training.train(rnd, self.state.weights)
            except Exception as exc:  # noqa: BLE001 - the round fails with its reason, the checkpoint stays intact
                self._fail(rnd, f"round {rnd}: training at the server failed: {type(exc).__name__}: {exc}", {})
            self._complete(rnd, {}, 0, t0, server=facts)
            return True
        instructions = self.strategy.configure_round(rnd, self.state.active)
        model = GlobalModel(rnd - 1, self.state.weights, self.state.optimizer_state, instructions=instructions)
        request = RoundRequest(rnd, model, list(instructions), self._last_trained())
        got = self.channel.gather(request)
        self._note_scores(got.scored)
        if self.channel.aborted():
            return False
        extra: dict[str, Any] = {}
        if kind == "upload":
            sites, rejected = self._uploads(rnd, request, got)
        elif got.secure is not None:
            sites, rejected = self._aggregate_sum(rnd, request, got)
            extra["secure_aggregation"] = got.secure.record()
        else:
            sites, rejected = self._aggregate(rnd, request, got, instructions)
        self.state.active = [s for s in self.state.active if s not in got.left]
        self._complete(rnd, sites, rejected, t0, **extra)
        return True

    def _aggregate_sum(self, rnd: int, request: RoundRequest, got: Gathered) -> tuple[dict, int]:
        """A training round under secure aggregation: the server holds the survivors' mean update only (no
        per-site screening can run; the sites clipped their updates); the strategy aggregates it as one update."""
        secure = got.secure
        screened = secure.screened(got.failures)
        sites = self._site_entries(request, got, screened)
        for name, entry in sites.items():
            entry["messages"] = secure.messages.get(name, entry["messages"])
        problem = secure.problem(rnd, self.server.min_sites)
        if problem is not None:
            self._fail(rnd, problem, sites, got)
        try:
            self.state.weights = self.strategy.aggregate(self.state.weights, [secure.mean_update(rnd)])
        except (ValueError, RuntimeError) as exc:
            self._fail(rnd, f"aggregation failed in round {rnd}: {exc}", sites, got)
        self.state.optimizer_state = None
        return sites, len(screened) - len(secure.survivors)

    def _aggregate(self, rnd: int, request: RoundRequest, got: Gathered, instructions: dict) -> tuple[dict, int]:
        """A training round's server side: screen and aggregate the updates (and take what the server side
        trained itself)."""
        outcome = self.server(
            rnd, self.state.weights, got.updates, got.expected, got.failures, wire_bytes=got.wire_bytes,
            work_bounds=self.channel.work_bounds(instructions, self.state.declared),
        )  # fmt: skip
        sites = self._site_entries(request, got, outcome.sites)
        for name in outcome.accepted:  # declared once, after screening weighed the claim
            self.state.declared.setdefault(name, int(outcome.sites[name]["n_samples"]))
        if outcome.failed:
            self._fail(rnd, outcome.failed, sites, got)
        assert outcome.weights is not None
        self.state.weights = {**outcome.weights, **got.server_weights}
        self.state.optimizer_state = outcome.optimizer_state
        return sites, len(outcome.rejected)

    def _uploads(self, rnd: int, request: RoundRequest, got: Gathered) -> tuple[dict, int]:
        """An upload round's server side: screen each site's dataset upload and hand the accepted ones to the
        server's training; the global model does not change."""
        assert self.server_training is not None
        accepted, rejected = self.server_training.screen(got.uploads, request.targets, rnd)
        screened: dict[str, dict[str, Any]] = {}
        for upload in accepted:
            facts = self.server_training.facts(upload, got.wire_bytes.get(upload.site))
            screened[upload.site] = {"accepted": True, "upload": facts, "bytes_sent": facts["bytes"]}
            self.state.uploads[upload.site] = facts
        for name, reason in {**got.failures, **rejected}.items():
            screened[name] = {"accepted": False, "rejected": reason}
            logger.warning(f"round {rnd}: {reason}")
        for name in request.targets:
            screened.setdefault(name, {"accepted": False, "rejected": "sent no upload"})
        sites = self._site_entries(request, got, screened)
        if not accepted:
            self._fail(rnd, f"round {rnd}: no site's upload was acceptable", sites, got)
        try:
            self.server_training.receive(accepted)
        except Exception as exc:  # noqa: BLE001 - the round fails with its reason, the checkpoint stays intact
            self._fail(rnd, f"round {rnd}: the server could not keep the uploads: {type(exc).__name__}: {exc}",
                       sites, got)  # fmt: skip
        return sites, len(request.targets) - len(accepted)

    def _fail(self, rnd: int, why: str, sites: dict, got: Gathered | None = None) -> NoReturn:
        if got is not None:
            self.state.active = [s for s in self.state.active if s not in got.left]
        self.state.stopped = Stop(rnd, StopKind.ROUND_FAILED, why, {"round": rnd, "sites": sites})
        self.write_metrics()
        raise FederationError(
            f"{why.rstrip('.')}. The federation stopped; the last completed round ({rnd - 1}) and its "
            f"checkpoint are intact in {self.folder}: fix the cause and --resume."
        )

    def _complete(self, rnd: int, sites: dict[str, dict], rejected: int, t0: float, **extra: Any) -> None:
        """Score the round's global model, record the round, checkpoint it and report it."""
        scores = self.channel.score(self.state.weights)
        for name, entry in sites.items():
            if name in (scores.get("per_site") or {}):
                entry["global_dice"] = scores["per_site"][name]
        record = round_record(rnd, sites, scores, rejected, time.perf_counter() - t0, self.state.history)
        record.update(extra)
        self._budget_stop(rnd, record)
        self.state.history.append(record)
        self.state.round = rnd
        self.state.strategy = self.strategy.state_dict()
        if self.server_training is not None:
            self.state.server = self.server_training.state_dict()
        self.channel.publish(GlobalModel(rnd, self.state.weights, self.state.optimizer_state))
        self._all_left(rnd)
        self._save()
        metrics = self.write_metrics()
        if self.log is not None:
            dice = record["global"]["dice"]
            cells = " | ".join(progress_cell(n, r) for n, r in sites.items()) or "server training"
            self.log(f"round {rnd}/{self.rounds} | {cells} | global dice "
                     f"{'-' if dice is None else f'{dice:.3f}'} | {record['seconds']:.1f}s")  # fmt: skip
        if self.on_round is not None:
            self.on_round(metrics)

    def _site_entries(self, request: RoundRequest, got: Gathered, screened: dict[str, dict]) -> dict[str, dict]:
        """Each asked site's record entry, in the federation's order: its own report, the server's screening, the
        bytes it received and sent and the messages it exchanged."""
        order = [s for s in self.channel.sites if s in request.targets or s in screened]
        sites: dict[str, dict[str, Any]] = {}
        for name in order:
            entry = {**got.sites.get(name, {}), **screened.get(name, {})}
            if name in got.received_bytes:
                entry["bytes_received"] = got.received_bytes[name]
            entry["messages"] = int(name in got.received_bytes) + int(name in got.wire_bytes)
            if "batch_messages" in entry:  # SplitNN: every batch's features and gradients crossed the wire too
                entry["messages"] += int(entry["batch_messages"])
                entry["bytes_sent"] = int(entry.get("bytes_sent") or 0) + int(entry["batch_bytes_sent"])
                entry["bytes_received"] = int(entry.get("bytes_received") or 0) + int(entry["batch_bytes_received"])
            sites[name] = entry
        return sites

    def _budget_stop(self, rnd: int, record: dict[str, Any]) -> None:
        for name, entry in record["sites"].items():
            privacy = entry.get("privacy")
            if isinstance(privacy, dict) and privacy.get("exhausted") and \
                    StopPolicy.of(privacy.get("policy")) is StopPolicy.STOP_FEDERATION:  # fmt: skip
                reason = budget_stop_reason(name)
                logger.warning(f"{reason}: stopping after round {rnd}.")
                record["federation_stopped"] = reason
                self.state.stopped = Stop(rnd, StopKind.BUDGET, reason)
                self.state.active = []
                return

    def _all_left(self, rnd: int) -> bool:
        """Whether every site has left (then the federation ends after round ``rnd``, saying why)."""
        if self.state.active or self.state.stopped is not None:
            return self.state.stopped is not None
        reasons = [f"{name} in round {r['round']}: {res['stopped']}" for r in self.state.history
                   for name, res in r["sites"].items() if res.get("stopped")]  # fmt: skip
        reason = "every site has stopped" + (": " + "; ".join(reasons) if reasons else "")
        logger.warning(f"{reason}; ending the federation after round {rnd}.")
        self.state.stopped = Stop(rnd, StopKind.ALL_STOPPED, reason)
        return True

    def _note_scores(self, scored: dict[str, dict[str, Any]]) -> None:
        """Sites' scores of the last completed round's global model go into that round's record."""
        if not self.state.history:
            return
        for site in self.channel.sites:
            if site in scored:
                try:  # a site's own report: whatever is wrong with it is left out, never the end of the run
                    add_site_score(self.state.history[-1], site, scored[site], self.channel.sites)
                except Exception as exc:  # noqa: BLE001
                    logger.warning(f"left out the score {site} reported: {exc!r}"[:300])

    # ---------------------------------------------------------------- files
    def _save(self) -> None:
        self.state.channel = self.channel.state_dict()
        self.state.save(self.checkpoint, self.fingerprint)
        atomic_torch_save(self.state.weights, self.folder / "models" / "model.pt")

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "config": {**self.fingerprint, "rounds": self.rounds, "sites": list(self.channel.sites)},
            "strategy": self.strategy.config(),
            "rounds": [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.state.history],
            "final": final_summary(self.state.history),
        }
        out.update(self.channel.describe())
        if self.state.uploads:
            out["upload"] = dict(self.state.uploads)
        if self.state.stopped is not None:
            out["stopped"] = self.state.stopped.to_json()
        return out

    def write_metrics(self) -> dict[str, Any]:
        metrics = self.metrics()
        write_json(metrics, self.folder / "metrics.json")
        return metrics
